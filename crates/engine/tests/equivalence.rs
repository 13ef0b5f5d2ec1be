//! Batching must not change results: with exits disabled, greedy outputs of 16 concurrent
//! requests through each scheduler equal one-at-a-time generation token for token, on a relaxed
//! recursive model (3 loops, per-loop LoRA and norms, so row groups really differ). Also:
//! cancellation frees KV, and requests that cannot run fail clearly.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};

use candle_core::DType;
use rrt_engine::{
    Engine, EngineConfig, EngineError, Event, FinishReason, GenParams, Request, Scheduler,
};
use rrt_model::generate::{generate, GenerateParams};
use rrt_model::recursive::convert::{convert, ConvertOptions};
use rrt_model::recursive::mapping::Init;
use rrt_model::source::safetensors::SafetensorsSource;
use rrt_model::{Llama, ModelConfig, SamplingParams};

fn tiny_recursive() -> Llama {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-mha-untied");
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut src = SafetensorsSource::open_dir(&dir).unwrap();
    let plain = Llama::load(cfg, &mut src, DType::F32, None).unwrap();
    let opts = ConvertOptions {
        block_layers: 1,
        init: Init::Average,
        seed: 0,
        rank_attn: 4,
        rank_mlp: 4,
        per_loop_norms: true,
        source: "fixture".into(),
    };
    convert(&plain, &opts, &|| {}).unwrap()
}

fn params(max_new: usize) -> GenParams {
    GenParams {
        max_new_tokens: max_new,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
    }
}

fn prompts(vocab: u32) -> Vec<(Vec<u32>, usize)> {
    (0..16u32)
        .map(|i| {
            let len = 3 + (i as usize * 7) % 18;
            let prompt = (0..len as u32)
                .map(|j| (i * 31 + j * 17 + 3) % vocab)
                .collect();
            (prompt, 5 + (i as usize % 4) * 3)
        })
        .collect()
}

fn collect(rx: &Receiver<Event>) -> (Vec<u32>, Option<FinishReason>) {
    let mut tokens = Vec::new();
    let mut finish = None;
    for ev in rx.try_iter() {
        match ev {
            Event::Token { token, .. } => tokens.push(token),
            Event::Finished { reason, .. } => finish = Some(reason),
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
    (tokens, finish)
}

#[test]
fn every_scheduler_matches_one_at_a_time_generation() {
    let model = tiny_recursive();
    assert_eq!(model.loops(), 3);
    let cases = prompts(model.cfg.vocab_size as u32);
    let want: Vec<Vec<u32>> = cases
        .iter()
        .map(|(p, n)| {
            let params = GenerateParams {
                max_new_tokens: *n,
                sampling: SamplingParams::default(),
                stop_tokens: vec![],
            };
            generate(&model, p, &params, |_| Ok(true)).unwrap().tokens
        })
        .collect();
    for scheduler in [Scheduler::Static, Scheduler::Csb, Scheduler::Cdb] {
        let cfg = EngineConfig {
            scheduler,
            // Small budgets force chunked prefill, mixed steps and admission churn.
            max_batch_rows: 24,
            max_sequences: 7,
            kv_budget_bytes: 1 << 30,
        };
        let mut engine = Engine::new(model.clone(), cfg);
        let receivers: Vec<Receiver<Event>> = cases
            .iter()
            .enumerate()
            .map(|(i, (p, n))| {
                let (tx, rx) = channel();
                engine.submit(Request {
                    id: i as u64,
                    prompt: p.clone(),
                    params: params(*n),
                    events: tx,
                });
                rx
            })
            .collect();
        engine.run_until_idle();
        assert_eq!(
            engine.kv_reserved_bytes(),
            0,
            "{scheduler:?}: KV not released"
        );
        for (i, rx) in receivers.iter().enumerate() {
            let (tokens, finish) = collect(rx);
            assert_eq!(
                tokens, want[i],
                "{scheduler:?}: request {i} differs from one-at-a-time"
            );
            assert_eq!(
                finish,
                Some(FinishReason::Length),
                "{scheduler:?}: request {i}"
            );
        }
    }
}

#[test]
fn a_dropped_receiver_cancels_and_frees_kv() {
    let model = tiny_recursive();
    let mut engine = Engine::new(model, EngineConfig::default());
    let (tx, rx) = channel();
    engine.submit(Request {
        id: 1,
        prompt: vec![1, 2, 3],
        params: params(50),
        events: tx,
    });
    engine.step();
    engine.step();
    assert!(engine.kv_reserved_bytes() > 0);
    drop(rx);
    for _ in 0..6 {
        engine.step();
    }
    assert_eq!(engine.pending(), 0);
    assert_eq!(engine.kv_reserved_bytes(), 0);
}

#[test]
fn requests_that_cannot_run_fail_with_a_reason() {
    let model = tiny_recursive();
    let context = model.cfg.max_position_embeddings;
    let mut engine = Engine::new(
        model,
        EngineConfig {
            kv_budget_bytes: 64 * 1024,
            ..EngineConfig::default()
        },
    );
    let cases = [
        (vec![], 4, "empty"),
        (vec![1; context], 4, "context"),
        (vec![1; 60], 60, "KV cache"),
        (vec![100_000], 4, "vocabulary"),
    ];
    for (prompt, n, expect) in cases {
        let (tx, rx) = channel();
        engine.submit(Request {
            id: 0,
            prompt,
            params: params(n),
            events: tx,
        });
        match rx.try_recv() {
            Ok(Event::Failed(e)) => assert!(e.to_string().contains(expect), "{e}"),
            other => panic!("expected a failure mentioning {expect}, got {other:?}"),
        }
    }
    assert!(matches!(EngineError::EmptyPrompt, EngineError::EmptyPrompt));
    assert_eq!(engine.pending(), 0);
}
