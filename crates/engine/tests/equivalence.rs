//! Batching must not change results: with exits disabled, greedy outputs of 16 concurrent
//! requests through each scheduler equal one-at-a-time generation token for token, on a relaxed
//! recursive model (3 loops, per-loop LoRA and norms, so row groups really differ). Also:
//! cancellation frees KV, requests that cannot run fail clearly, and with exits from a fixed
//! trace depth-wise batching equals a sequential reference that applies the same exits.

#![forbid(unsafe_code)]

mod common;

use std::sync::mpsc::Receiver;

use common::{collect, kv_block_bytes, params, tiny_recursive};

use rrt_engine::{
    generate_with_exits, Engine, EngineConfig, EngineError, Event, ExitKind, ExitPolicy, ExitTrace,
    FinishReason, GenParams, KvFill, Received, Request, Scheduler,
};
use rrt_model::generate::greedy;
use rrt_model::{Llama, WeightDtype};

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

/// Submits every case (request id = its index) with `exit`; the receivers in case order.
fn submit_all(
    engine: &mut Engine,
    cases: &[(Vec<u32>, usize)],
    exit: Option<ExitPolicy>,
) -> Vec<Receiver<Event>> {
    cases
        .iter()
        .enumerate()
        .map(|(i, (p, n))| {
            let (req, rx) = Request::with_channel(i as u64, p.clone(), params(*n), exit);
            engine.submit(req);
            rx
        })
        .collect()
}

#[test]
fn every_scheduler_matches_one_at_a_time_generation() {
    // At every weight dtype: bf16 and int8 kernels give a row the same bits whatever rows sit
    // beside it, so batching must not change a single token there either.
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Q8] {
        let mut model = tiny_recursive();
        model.set_weight_dtype(dtype).unwrap();
        one_at_a_time_vs_every_scheduler(&model, dtype);
    }
}

fn one_at_a_time_vs_every_scheduler(model: &Llama, dtype: WeightDtype) {
    assert_eq!(model.loops(), 3);
    let cases = prompts(model.cfg.vocab_size as u32);
    let want: Vec<Vec<u32>> = cases
        .iter()
        .map(|(p, n)| greedy(model, p, *n).unwrap())
        .collect();
    for scheduler in [Scheduler::Static, Scheduler::Csb, Scheduler::Cdb] {
        let cfg = EngineConfig {
            scheduler,
            // Small budgets force chunked prefill, mixed steps and admission churn.
            max_batch_rows: 24,
            max_sequences: 7,
            kv_budget_bytes: 1 << 30,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(model.clone(), cfg).unwrap();
        let receivers = submit_all(&mut engine, &cases, None);
        engine.run_until_idle();
        assert_eq!(engine.kv_used_bytes(), 0, "{scheduler:?}: KV not released");
        for (i, rx) in receivers.iter().enumerate() {
            let got = collect(rx);
            assert_eq!(
                got.tokens, want[i],
                "{dtype} {scheduler:?}: request {i} differs from one-at-a-time"
            );
            assert_eq!(
                got.finish,
                Some(FinishReason::Length),
                "{scheduler:?}: request {i}"
            );
        }
        // Without exits the exit head runs once per sampled token (not for prompt chunks that
        // sample nothing, which the small row budget makes plenty of), and the profile filled.
        let stats = engine.stats();
        assert_eq!(stats.head_rows, stats.tokens, "{scheduler:?}: {stats:?}");
        assert!(stats.time.block > std::time::Duration::ZERO, "{stats:?}");
        assert!(stats.time.total() >= stats.time.block + stats.time.head);
    }
}

#[test]
fn an_injected_step_error_fails_the_running_requests_as_the_engine_s_fault_and_serving_goes_on() {
    let model = tiny_recursive();
    let cfg = EngineConfig {
        fault: Some("error@3".parse().unwrap()),
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, cfg).unwrap();
    let (req, rx) = Request::with_channel(1, vec![1, 2, 3], params(50), None);
    engine.submit(req);
    for _ in 0..3 {
        engine.step();
    }
    let err = Received::drain(&rx).expect_err("the step failed under it");
    assert!(
        matches!(err, EngineError::StepFailed(ref m) if m.contains("injected")),
        "{err:?}"
    );
    assert_eq!(
        (engine.stats().failed_steps, engine.kv_used_bytes()),
        (1, 0)
    );
    // The engine goes on serving.
    let (req, rx) = Request::with_channel(2, vec![1, 2, 3], params(4), None);
    engine.submit(req);
    while engine.pending() > 0 {
        engine.step();
    }
    assert_eq!(collect(&rx).tokens.len(), 4);
    assert!("panic@x".parse::<rrt_engine::InjectedFault>().is_err());
}

#[test]
fn a_dropped_receiver_cancels_and_frees_kv() {
    let model = tiny_recursive();
    let mut engine = Engine::new(model, EngineConfig::default()).unwrap();
    let (req, rx) = Request::with_channel(1, vec![1, 2, 3], params(50), None);
    engine.submit(req);
    engine.step();
    engine.step();
    assert!(engine.kv_used_bytes() > 0);
    drop(rx);
    for _ in 0..6 {
        engine.step();
    }
    assert_eq!(engine.pending(), 0);
    assert_eq!(engine.kv_used_bytes(), 0);
}

#[test]
fn requests_that_cannot_run_fail_with_a_reason() {
    let model = tiny_recursive();
    let context = model.cfg.max_position_embeddings;
    let kv_budget_bytes = 4 * kv_block_bytes(&model);
    let mut engine = Engine::new(
        model,
        EngineConfig {
            // Four blocks: 64 positions.
            kv_budget_bytes,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    type Check = fn(&EngineError) -> bool;
    let cases: [(Vec<u32>, usize, &str, Check); 4] = [
        (vec![], 4, "empty", |e| *e == EngineError::EmptyPrompt),
        (vec![1; context], 4, "context", |e| {
            matches!(e, EngineError::TooLong { .. })
        }),
        (vec![1; 60], 60, "KV cache", |e| {
            matches!(e, EngineError::KvBudget { .. })
        }),
        (vec![100_000], 4, "vocabulary", |e| {
            matches!(e, EngineError::Invalid(_))
        }),
    ];
    for (prompt, n, expect, variant) in cases {
        let (req, rx) = Request::with_channel(0, prompt, params(n), None);
        engine.submit(req);
        match rx.try_recv() {
            Ok(Event::Failed(e)) => {
                assert!(e.to_string().contains(expect), "{e}");
                assert!(variant(&e), "{expect}: unexpected variant {e:?}");
            }
            other => panic!("expected a failure mentioning {expect}, got {other:?}"),
        }
    }
    assert_eq!(engine.pending(), 0);
}

/// Submits the cases with `exit` and runs to completion; returns (token, exit loop) per request.
fn run_cdb(
    engine: &mut Engine,
    cases: &[(Vec<u32>, usize)],
    exit: ExitPolicy,
) -> Vec<Vec<(u32, usize)>> {
    let rxs = submit_all(engine, cases, Some(exit));
    engine.run_until_idle();
    rxs.iter().map(|rx| collect(rx).pairs()).collect()
}

/// Exits at the depths of the engine's trace.
fn replay() -> ExitPolicy {
    ExitPolicy {
        kind: ExitKind::Replay,
        threshold: 0.0,
    }
}

fn cdb(model: &Llama, fill: KvFill) -> Engine {
    Engine::new(
        model.clone(),
        EngineConfig {
            scheduler: Scheduler::Cdb,
            max_batch_rows: 24,
            max_sequences: 7,
            kv_fill: fill,
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

#[test]
fn cdb_with_a_fixed_exit_trace_equals_the_sequential_reference() {
    let model = tiny_recursive();
    let cases = prompts(model.cfg.vocab_size as u32);
    let mut trace = ExitTrace::default();
    for (i, (_, n)) in cases.iter().enumerate() {
        for t in 0..*n {
            trace.insert(i as u64, t, 1 + (i * 7 + t * 5 + t * t) % 3);
        }
    }
    let mut references = Vec::new();
    for fill in [KvFill::Propagate, KvFill::Copy] {
        let mut engine = cdb(&model, fill);
        engine.set_trace(trace.clone());
        let got = run_cdb(&mut engine, &cases, replay());
        let mut early = 0;
        let mut wants = Vec::new();
        for (i, (p, n)) in cases.iter().enumerate() {
            let want = generate_with_exits(&model, i as u64, p, &params(*n), &trace, fill).unwrap();
            assert_eq!(got[i], want, "{fill:?}: request {i}");
            early += want.iter().filter(|(_, l)| *l < 3).count();
            wants.push(want);
        }
        assert!(
            early > 20,
            "the trace should make many tokens exit early ({early})"
        );
        // Tokens left after every loop depth (a stop token is not one).
        let hist = &engine.stats().exit_histogram;
        assert!(
            hist.len() == 3 && hist.iter().all(|&n| n > 0),
            "exits at every depth: {hist:?}"
        );
        references.push(wants);
    }
    // Propagation and copy fill the skipped K/V differently: outputs should not all agree.
    assert_ne!(
        references[0], references[1],
        "the two KV fill modes never made a difference"
    );
}

#[test]
fn oracle_recording_then_confidence_policies_run_and_count_exits() {
    let model = tiny_recursive();
    let cases = prompts(model.cfg.vocab_size as u32);
    let mut engine = cdb(&model, KvFill::Propagate);
    let oracle = ExitPolicy {
        kind: ExitKind::Oracle,
        threshold: 0.0,
    };
    let full = run_cdb(&mut engine, &cases, oracle);
    let recorded = engine.trace().clone();
    let processed: usize = cases.iter().map(|(_, n)| n - 1).sum();
    assert_eq!(
        recorded.len(),
        processed,
        "one oracle depth per generated token that was run"
    );
    assert!((1.0..=3.0).contains(&recorded.mean_depth()));
    // The oracle run itself runs full depth: same tokens as no exit.
    let mut plain = cdb(&model, KvFill::Propagate);
    assert_eq!(run_cdb(&mut plain, &cases, ExitPolicy::NONE), full);
    for kind in [ExitKind::MaxProb, ExitKind::Margin, ExitKind::Cosine] {
        let mut engine = cdb(&model, KvFill::Copy);
        let out = run_cdb(
            &mut engine,
            &cases,
            ExitPolicy {
                kind,
                threshold: -1.0,
            },
        );
        // Threshold -1 (below any probability or cosine) exits every generated token after loop 1.
        for (i, toks) in out.iter().enumerate() {
            assert_eq!(toks.len(), cases[i].1);
            assert!(toks[1..].iter().all(|(_, l)| *l == 1), "{kind:?}: {toks:?}");
        }
        assert_eq!(
            engine.stats().tokens as usize,
            cases.iter().map(|(_, n)| n).sum::<usize>()
        );
    }
}

#[test]
fn moving_the_default_threshold_moves_requests_that_follow_the_default_only() {
    let model = tiny_recursive();
    let vocab = model.cfg.vocab_size as u32;
    // Margin >= 1 never holds: with the default at 1 every token runs every loop.
    let mut engine = Engine::new(
        model,
        EngineConfig {
            scheduler: Scheduler::Cdb,
            max_batch_rows: 24,
            max_sequences: 4,
            default_exit: ExitPolicy {
                kind: ExitKind::Margin,
                threshold: 1.0,
            },
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let prompt: Vec<u32> = (0..6).map(|j| (j * 13 + 5) % vocab).collect();
    let strict = ExitPolicy {
        kind: ExitKind::Margin,
        threshold: 1.0,
    };
    let (adaptive, rx_adaptive) = Request::with_channel(0, prompt.clone(), params(12), None);
    let (pinned, rx_pinned) = Request::with_channel(1, prompt, params(12), Some(strict));
    engine.submit(adaptive);
    engine.submit(pinned);
    for _ in 0..12 {
        engine.step();
    }
    // Under load the coordinator lowers the default: 0 lets every token leave after loop 1.
    engine.set_default_threshold(0.0);
    assert_eq!(engine.config().default_exit.threshold, 0.0);
    engine.run_until_idle();
    let adaptive = collect(&rx_adaptive).pairs();
    let pinned = collect(&rx_pinned).pairs();
    assert_eq!(adaptive.len(), 12);
    let first_early = adaptive.iter().position(|(_, l)| *l == 1);
    let first_early =
        first_early.expect("after the change the default-following request exits early");
    assert!(
        first_early > 1,
        "before the change it ran full depth: {adaptive:?}"
    );
    assert!(
        adaptive[..first_early].iter().all(|(_, l)| *l == 3),
        "{adaptive:?}"
    );
    assert!(
        adaptive[first_early..].iter().all(|(_, l)| *l == 1),
        "{adaptive:?}"
    );
    assert!(
        pinned.iter().all(|(_, l)| *l == 3),
        "a request that named its policy keeps it: {pinned:?}"
    );
    // A new request takes the moved default.
    let (late, rx_late) = Request::with_channel(2, vec![7, 8, 9], params(5), None);
    engine.submit(late);
    engine.run_until_idle();
    let late = collect(&rx_late).pairs();
    assert!(late[1..].iter().all(|(_, l)| *l == 1), "{late:?}");
}

/// Allows only tokens that are multiples of 3; complete after `len` tokens.
struct MultiplesOfThree {
    vocab: u32,
    taken: usize,
    len: usize,
}

impl rrt_engine::Constraint for MultiplesOfThree {
    fn mask(&mut self) -> Result<Vec<u32>, String> {
        let mut m = vec![0u32; (self.vocab as usize).div_ceil(32)];
        for t in (0..self.vocab).step_by(3) {
            m[t as usize / 32] |= 1 << (t % 32);
        }
        Ok(m)
    }
    fn commit(&mut self, token: u32) -> Result<bool, String> {
        if !token.is_multiple_of(3) {
            return Err(format!("{token} was not allowed"));
        }
        self.taken += 1;
        Ok(self.taken >= self.len)
    }
}

#[test]
fn constrained_tokens_follow_the_mask_and_exit_early_only_on_allowed_tokens() {
    let model = tiny_recursive();
    let vocab = model.cfg.vocab_size as u32;
    let cases = prompts(vocab);
    // Every token may leave after loop 1 (threshold 0 of max-prob), unless its pick there is
    // not allowed.
    let exit_early = ExitPolicy {
        kind: ExitKind::MaxProb,
        threshold: 0.0,
    };
    let run = |constrained: bool| {
        let mut engine = cdb(&model, KvFill::Propagate);
        let rxs: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (p, n))| {
                let (mut req, rx) =
                    Request::with_channel(i as u64, p.clone(), params(*n + 4), Some(exit_early));
                if constrained {
                    req.constraint = Some(Box::new(MultiplesOfThree {
                        vocab,
                        taken: 0,
                        len: *n,
                    }));
                }
                engine.submit(req);
                rx
            })
            .collect();
        engine.run_until_idle();
        let out: Vec<Received> = rxs.iter().map(collect).collect();
        (out, engine.mask_counts())
    };
    let (free, _) = run(false);
    let free_odd: usize = free
        .iter()
        .map(|r| r.tokens.iter().filter(|t| !t.is_multiple_of(3)).count())
        .sum();
    assert!(
        free_odd > 10,
        "unconstrained output has other tokens ({free_odd})"
    );
    let (constrained, counts) = run(true);
    let mut deeper = 0;
    for (i, r) in constrained.iter().enumerate() {
        assert!(
            r.tokens.iter().all(|t| t.is_multiple_of(3)),
            "request {i}: {:?}",
            r.tokens
        );
        // The grammar completes after n tokens: a natural end before max_new_tokens.
        assert_eq!(r.tokens.len(), cases[i].1, "request {i}");
        assert_eq!(r.finish, Some(FinishReason::Stop));
        deeper += r.exit_loops[1..].iter().filter(|&&l| l > 1).count();
    }
    assert!(
        deeper > 0,
        "some tokens' loop-1 picks were not allowed and went deeper"
    );
    // A token denied after loop 1 may be denied after loop 2 as well.
    assert!(counts.exits_denied as usize >= deeper, "{counts:?}");
    let tokens: usize = cases.iter().map(|(_, n)| n).sum();
    assert_eq!(
        counts.masks as usize, tokens,
        "one mask per token: {counts:?}"
    );
}

/// Samples a multiple of 3, then the grammar forces 30 and 60, and so on; complete after `len`
/// tokens. `fast_forward`: the forced pair comes from `forced()` (appended without sampling);
/// otherwise each is the only token its mask allows (sampled one by one).
struct Script {
    vocab: u32,
    fast_forward: bool,
    taken: usize,
    len: usize,
    /// Forced tokens still to come (mask mode).
    queue: Vec<u32>,
    /// Whether a token was sampled since the last forced pair (fast-forward mode).
    sampled: bool,
}

const SCRIPTED: [u32; 2] = [30, 60];

impl rrt_engine::Constraint for Script {
    fn mask(&mut self) -> Result<Vec<u32>, String> {
        let mut m = vec![0u32; (self.vocab as usize).div_ceil(32)];
        match self.queue.first() {
            Some(&t) => m[t as usize / 32] |= 1 << (t % 32),
            None => {
                for t in (0..self.vocab).step_by(3) {
                    m[t as usize / 32] |= 1 << (t % 32);
                }
            }
        }
        Ok(m)
    }
    fn commit(&mut self, token: u32) -> Result<bool, String> {
        match self.queue.first() {
            Some(&t) if t != token => return Err(format!("{token} instead of {t}")),
            Some(_) => {
                self.queue.remove(0);
            }
            None if !self.fast_forward => self.queue = SCRIPTED.to_vec(),
            None => self.sampled = true,
        }
        self.taken += 1;
        Ok(self.taken >= self.len)
    }
    fn forced(&mut self) -> Result<(Vec<u32>, bool), String> {
        if !self.fast_forward || !std::mem::take(&mut self.sampled) {
            return Ok((Vec::new(), false));
        }
        let n = SCRIPTED.len().min(self.len - self.taken);
        self.taken += n;
        Ok((SCRIPTED[..n].to_vec(), self.taken >= self.len))
    }
}

#[test]
fn forced_tokens_fast_forward_as_one_chunk_and_match_sampling_them_one_by_one() {
    let model = tiny_recursive();
    let vocab = model.cfg.vocab_size as u32;
    let cases = prompts(vocab);
    // `opening`: the grammar forces the pair before anything is sampled, too.
    let run = |fast_forward: bool, opening: bool| {
        let mut engine = cdb(&model, KvFill::Propagate);
        let rxs: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (p, n))| {
                let len = n + 3;
                let (mut req, rx) =
                    Request::with_channel(i as u64, p.clone(), params(len + 2), None);
                req.constraint = Some(Box::new(Script {
                    vocab,
                    fast_forward,
                    taken: 0,
                    len,
                    queue: if opening && !fast_forward {
                        SCRIPTED.to_vec()
                    } else {
                        Vec::new()
                    },
                    sampled: opening,
                }));
                engine.submit(req);
                rx
            })
            .collect();
        engine.run_until_idle();
        let out: Vec<Received> = rxs.iter().map(collect).collect();
        (out, engine.mask_counts(), engine.stats().steps)
    };
    let (one_by_one, masks_one, steps_one) = run(false, false);
    let (forwarded, masks_ff, steps_ff) = run(true, false);
    for (i, (a, b)) in one_by_one.iter().zip(&forwarded).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}");
        assert_eq!(a.tokens.len(), cases[i].1 + 3, "request {i}");
        assert_eq!(b.finish, Some(FinishReason::Stop));
        // Every sampled token is followed by the forced pair.
        for w in b.tokens.windows(3).step_by(3) {
            assert_eq!(&w[1..], &SCRIPTED, "request {i}: {:?}", b.tokens);
        }
        // Forced tokens are streamed as having run every loop.
        for (t, l) in b.pairs().iter().skip(1) {
            if SCRIPTED.contains(t) {
                assert_eq!(*l, 3, "request {i}");
            }
        }
    }
    assert!(masks_ff.forced > 0 && masks_one.forced == 0);
    assert!(
        masks_ff.masks < masks_one.masks,
        "{masks_ff:?} vs {masks_one:?}"
    );
    assert!(
        steps_ff < steps_one,
        "fast-forward takes fewer steps: {steps_ff} vs {steps_one}"
    );
    // Forced from the start: streamed at admission, computed with the prompt.
    let (one_by_one, _, _) = run(false, true);
    let (forwarded, _, _) = run(true, true);
    for (i, (a, b)) in one_by_one.iter().zip(&forwarded).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}");
        assert_eq!(&b.tokens[..2], &SCRIPTED, "request {i}");
        assert_eq!(&b.exit_loops[..2], &[3, 3], "request {i}");
        assert_eq!(b.finish, Some(FinishReason::Stop));
    }
}

/// Submits one teacher-forced request (logprobs on) and returns `(token, exit loop, logprob)`.
fn score(
    engine: &mut Engine,
    id: u64,
    prompt: &[u32],
    forced: &[u32],
    exit: Option<ExitPolicy>,
) -> Vec<(u32, usize, f32)> {
    let params = GenParams {
        max_new_tokens: forced.len(),
        forced: forced.to_vec(),
        logprobs: true,
        ..GenParams::default()
    };
    let (req, rx) = Request::with_channel(id, prompt.to_vec(), params, exit);
    engine.submit(req);
    engine.run_until_idle();
    let got = collect(&rx);
    assert_eq!(
        got.logprobs.len(),
        got.tokens.len(),
        "logprobs were asked for"
    );
    let pairs = got.pairs().into_iter().zip(got.logprobs);
    pairs.map(|((t, l), p)| (t, l, p)).collect()
}

#[test]
fn teacher_forcing_scores_a_text_as_a_full_forward_does_and_follows_exits() {
    use rrt_model::perplexity::nll_sum;
    use rrt_model::{BatchItem, Logits};

    let model = tiny_recursive();
    let vocab = model.cfg.vocab_size as u32;
    let text: Vec<u32> = (0..40u32).map(|j| (j * 13 + j * j + 5) % vocab).collect();
    let (prompt, forced) = text.split_at(9);
    // The reference: one forward over the text, log-softmax of each next token.
    let mut cache = model.new_cache();
    let mut kv = model.new_kv_pool();
    let logits = model
        .forward(
            &mut kv,
            &mut [BatchItem {
                tokens: &text[..text.len() - 1],
                offset: 0,
                cache: &mut cache,
                logits: Logits::All,
            }],
        )
        .unwrap();
    let want_nll = nll_sum(
        &logits.narrow(0, prompt.len() - 1, forced.len()).unwrap(),
        forced,
    )
    .unwrap();
    for scheduler in [Scheduler::Static, Scheduler::Csb, Scheduler::Cdb] {
        let mut engine = Engine::new(
            model.clone(),
            EngineConfig {
                scheduler,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        let got = score(&mut engine, 0, prompt, forced, None);
        let tokens: Vec<u32> = got.iter().map(|t| t.0).collect();
        assert_eq!(tokens, forced, "{scheduler:?}: forced tokens are emitted");
        let nll: f64 = got.iter().map(|t| -t.2 as f64).sum();
        assert!(
            (nll - want_nll).abs() < 1e-3 * want_nll.abs().max(1.0),
            "{scheduler:?}: nll {nll} vs a full forward {want_nll}"
        );
    }
    // With exits from a trace, forced scoring goes through the same exits as the sequential
    // reference does.
    let mut trace = ExitTrace::default();
    for t in 0..forced.len() {
        trace.insert(3, t, 1 + (t * 5 + t * t) % 3);
    }
    let mut engine = cdb(&model, KvFill::Propagate);
    engine.set_trace(trace.clone());
    let got: Vec<(u32, usize)> = score(&mut engine, 3, prompt, forced, Some(replay()))
        .into_iter()
        .map(|(token, exit_loop, _)| (token, exit_loop))
        .collect();
    let params = GenParams {
        max_new_tokens: forced.len(),
        forced: forced.to_vec(),
        ..GenParams::default()
    };
    let want = generate_with_exits(&model, 3, prompt, &params, &trace, KvFill::Propagate).unwrap();
    assert_eq!(got, want);
    assert!(want.iter().filter(|(_, l)| *l < 3).count() > 10);
}

#[test]
fn a_forced_token_outside_the_vocabulary_is_refused() {
    let model = tiny_recursive();
    let mut engine = cdb(&model, KvFill::Propagate);
    let forced = GenParams {
        max_new_tokens: 2,
        forced: vec![4, model.cfg.vocab_size as u32],
        ..GenParams::default()
    };
    let (req, rx) = Request::with_channel(0, vec![1, 2, 3], forced, None);
    engine.submit(req);
    match rx.try_recv() {
        Ok(Event::Failed(EngineError::Invalid(msg))) => {
            assert!(msg.contains("vocabulary"), "{msg}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// One request through a fresh engine: its tokens, finish reason, and the engine's stats.
fn run_one(
    model: &Llama,
    scheduler: Scheduler,
    prompt: &[u32],
    params: GenParams,
) -> (Vec<u32>, Option<FinishReason>, rrt_engine::EngineStats) {
    let mut engine = Engine::new(
        model.clone(),
        EngineConfig {
            scheduler,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let (req, rx) = Request::with_channel(0, prompt.to_vec(), params, None);
    engine.submit(req);
    engine.run_until_idle();
    let got = collect(&rx);
    (got.tokens, got.finish, engine.stats().clone())
}

#[test]
fn a_stop_token_ends_the_sequence_without_counting_as_a_token() {
    let model = tiny_recursive();
    let prompt = [3, 1, 4, 1, 5];
    for scheduler in [Scheduler::Csb, Scheduler::Cdb] {
        // Greedy's first two tokens; then the second one is made the stop token.
        let (first, _, stats) = run_one(&model, scheduler, &prompt, params(2));
        assert_eq!(stats.tokens, 2);
        assert_ne!(
            first[0], first[1],
            "pick a prompt whose first two tokens differ"
        );
        let mut stop = params(8);
        stop.stop_tokens = vec![first[1]];
        let (tokens, finish, stats) = run_one(&model, scheduler, &prompt, stop);
        assert_eq!(tokens, vec![first[0]], "{scheduler:?}");
        assert_eq!(finish, Some(FinishReason::Stop));
        assert_eq!(stats.tokens, 1, "{scheduler:?}: {stats:?}");
        assert_eq!(stats.exit_histogram.iter().sum::<u64>(), 1, "{stats:?}");
    }
}
