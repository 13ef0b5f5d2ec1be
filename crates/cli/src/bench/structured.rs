//! `rrt bench structured`: what constrained decoding costs, on the engine directly (no gRPC),
//! side by side in one run. For each batch size: free generation, and the same prompts under a
//! regular expression that cannot end before the token limit (every token masked: the plain
//! cost of the masks), a JSON schema and a JSON object (realistic: they end when the JSON is
//! complete). Per run: decode tokens/s while every request decodes (from the last first sampled
//! token, after the prompt and any tokens the grammar forces from the start, to the first end,
//! so neither prefill nor requests that end early count as decoding) and its ratio
//! to free generation, mask time per token on the mask thread, and the time sampling waited for
//! a mask. Then the compile time of each constraint, cold and cached.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use rrt_constrain::{Compiler, Spec};
use rrt_engine::{Constraint, Engine, EngineConfig, Event, GenParams, Request, Scheduler};
use rrt_model::WeightDtype;

#[derive(Args, Debug)]
pub struct StructuredBenchArgs {
    /// Model (default: the bundled GGUF).
    #[arg(long, default_value = crate::model_args::DEFAULT_MODEL)]
    model: PathBuf,
    #[arg(long, default_value_t = WeightDtype::Q8)]
    dtype: WeightDtype,
    /// Batch sizes (requests at once).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batches: Vec<usize>,
    /// New tokens per request at most.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Runs of each row, interleaved; the best decode rate of each is kept (a shared machine's
    /// other work only ever slows a run down).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

const PERSON: &str = r#"{"type":"object","properties":{"name":{"type":"string","maxLength":24},"age":{"type":"integer","minimum":0,"maximum":120},"city":{"type":"string","maxLength":20},"pets":{"type":"array","items":{"enum":["cat","dog","fish"]},"maxItems":3}},"required":["name","age","city"],"additionalProperties":false}"#;

fn specs() -> Vec<(&'static str, Option<Spec>)> {
    vec![
        ("free", None),
        (
            "regex [a-zA-Z ,.]{1000,} (ends at the token limit)",
            Some(Spec::Regex("[a-zA-Z ,.]{1000,}".into())),
        ),
        (
            "JSON schema (person)",
            Some(Spec::JsonSchema(PERSON.into())),
        ),
        ("JSON object", Some(Spec::JsonObject)),
    ]
}

struct Run {
    tokens: usize,
    decode_tokens: usize,
    decode_s: f64,
    masks: u64,
    mask_ns: u64,
    wait_ns: u64,
    forced: u64,
}

fn run(
    model: &rrt_model::Llama,
    compiler: &Compiler,
    prompts: &[Vec<u32>],
    spec: Option<&Spec>,
    max_tokens: usize,
) -> anyhow::Result<Run> {
    let mut engine = Engine::new(
        model.clone(),
        EngineConfig {
            scheduler: Scheduler::Cdb,
            max_batch_rows: 512,
            max_sequences: prompts.len(),
            prefix_cache: false,
            ..EngineConfig::default()
        },
    )?;
    let mut receivers = Vec::new();
    // Tokens each request's grammar forces before anything is sampled (streamed at admission,
    // before its prompt is computed): its decoding starts after them.
    let mut opening = vec![0; prompts.len()];
    for (i, p) in prompts.iter().enumerate() {
        let params = GenParams {
            max_new_tokens: max_tokens,
            // Free runs generate every token (no end of sequence).
            stop_tokens: Vec::new(),
            ..GenParams::default()
        };
        let (mut req, rx) = Request::with_channel(i as u64, p.clone(), params, None);
        if let Some(s) = spec {
            let mut probe = compiler.compile(s)?;
            opening[i] = probe.forced().map_err(anyhow::Error::msg)?.0.len();
            req.constraint = Some(Box::new(compiler.compile(s)?));
        }
        engine.submit(req);
        receivers.push(rx);
    }
    let mut received = vec![0; prompts.len()];
    let mut tokens = 0;
    let mut decode_from: Option<(Instant, usize)> = None;
    // The window is while every request decodes: from the last first token to the first end
    // (so requests that end early do not count as a slower, smaller batch).
    let mut decode_to: Option<(Instant, usize)> = None;
    while engine.pending() > 0 {
        engine.step();
        let mut ended = false;
        for (i, rx) in receivers.iter().enumerate() {
            for e in rx.try_iter() {
                match e {
                    Event::Token { .. } => {
                        tokens += 1;
                        received[i] += 1;
                    }
                    Event::Finished { .. } => ended = true,
                    Event::Failed(e) => anyhow::bail!("request {i} failed: {e}"),
                    _ => {}
                }
            }
        }
        if decode_from.is_none() && received.iter().zip(&opening).all(|(r, o)| r > o) {
            decode_from = Some((Instant::now(), tokens));
        }
        if ended && decode_to.is_none() {
            decode_to = Some((Instant::now(), tokens));
        }
    }
    let (t0, n0) = decode_from.unwrap_or((Instant::now(), tokens));
    let (t1, n1) = decode_to.unwrap_or((Instant::now(), tokens));
    let c = engine.mask_counts();
    Ok(Run {
        tokens,
        decode_tokens: n1.saturating_sub(n0),
        decode_s: t1.saturating_duration_since(t0).as_secs_f64(),
        masks: c.masks,
        mask_ns: c.mask_ns,
        wait_ns: c.wait_ns,
        forced: c.forced,
    })
}

pub fn run_bench(args: StructuredBenchArgs) -> anyhow::Result<()> {
    let loaded = rrt_model::load(&args.model, args.dtype)?;
    let tokenizer = Arc::new(loaded.tokenizer);
    let model = loaded.model;
    let vocab = model.cfg.vocab_size;
    let started = Instant::now();
    let compiler = Compiler::new(tokenizer.clone(), vocab)?;
    println!(
        "rrt bench structured: {} at {}, {} new tokens at most, depth-wise batching, best of {} interleaved runs; the vocabulary's token trie built in {:.0} ms",
        args.model.display(),
        args.dtype,
        args.max_tokens,
        args.repeats,
        1e3 * started.elapsed().as_secs_f64()
    );
    let subjects = [
        "a sailor",
        "a painter",
        "a chess player",
        "a baker",
        "an astronaut",
        "a librarian",
        "a runner",
        "a pianist",
    ];
    println!("| batch | output | tokens (forced) | decode tokens/s | vs free | mask per token (mask thread) | sampling waited per token |");
    println!("|---|---|---|---|---|---|---|");
    for &batch in &args.batches {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|i| {
                let text = tokenizer.chat_prompt(&format!(
                    "Describe {} as JSON with a name, an age and a city.",
                    subjects[i % subjects.len()]
                ))?;
                Ok(tokenizer.encode(&text)?)
            })
            .collect::<anyhow::Result<_>>()?;
        let specs = specs();
        let mut best: Vec<Option<(f64, Run)>> = specs.iter().map(|_| None).collect();
        for _ in 0..args.repeats.max(1) {
            for (i, (_, spec)) in specs.iter().enumerate() {
                let r = run(&model, &compiler, &prompts, spec.as_ref(), args.max_tokens)?;
                let rate = r.decode_tokens as f64 / r.decode_s.max(1e-9);
                if best[i].as_ref().is_none_or(|(b, _)| rate > *b) {
                    best[i] = Some((rate, r));
                }
            }
        }
        let mut free_rate = None;
        for ((name, _), b) in specs.iter().zip(best) {
            let Some((rate, r)) = b else { continue };
            let base = *free_rate.get_or_insert(rate);
            let per = |ns: u64, n: u64| {
                if n == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1} us", ns as f64 / n as f64 / 1e3)
                }
            };
            println!(
                "| {batch} | {name} | {} ({}) | {rate:.1} | {:.2}x | {} | {} |",
                r.tokens,
                r.forced,
                rate / base,
                per(r.mask_ns, r.masks),
                per(r.wait_ns, r.tokens as u64),
            );
        }
    }
    println!();
    println!("| constraint | compile (cold) | from the cache |");
    println!("|---|---|---|");
    let fresh = Compiler::new(tokenizer, vocab)?;
    for (name, spec) in specs() {
        let Some(spec) = spec else { continue };
        let t = Instant::now();
        fresh.compile(&spec)?;
        let cold = t.elapsed().as_secs_f64();
        let t = Instant::now();
        fresh.compile(&spec)?;
        let cached = t.elapsed().as_secs_f64();
        println!("| {name} | {:.2} ms | {:.3} ms |", 1e3 * cold, 1e3 * cached);
    }
    Ok(())
}
