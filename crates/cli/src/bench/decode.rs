//! Decode throughput of the plain decoder at several batch sizes: every sequence gets a prompt,
//! then each step feeds one new token per sequence through one batched forward. Reports tokens/s,
//! achieved GFLOP/s against the measured matmul roofline, and how many cores were busy.

use std::time::Instant;

use clap::Args;
use rrt_model::sampling::argmax;
use rrt_model::{BatchItem, Llama, Logits, SeqCache};

use super::cpu_time::process_cpu_time;
use super::matmul::roofline;
use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Prompt tokens per sequence before decoding starts.
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// Runs per batch size; the best is reported (this machine is a shared VM: best-of-N
    /// against a best-of-N roofline compares peak with peak).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

struct Row {
    batch: usize,
    tokens_per_s: f64,
    ms_per_step: f64,
    gflops: f64,
    cores: Option<f64>,
}

fn decode(model: &Llama, batch: usize, prompt_len: usize, steps: usize) -> anyhow::Result<Row> {
    let vocab = model.cfg.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|s| {
            (0..prompt_len)
                .map(|i| (1000 + 7 * i as u32 + 131 * s as u32) % vocab)
                .collect()
        })
        .collect();
    let mut caches: Vec<SeqCache> = (0..batch).map(|_| model.new_cache()).collect();
    let mut items: Vec<BatchItem> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, c)| BatchItem {
            tokens: p,
            offset: 0,
            cache: c,
            logits: Logits::Last,
        })
        .collect();
    let logits = model.forward(&mut items)?.to_vec2::<f32>()?;
    let mut next: Vec<[u32; 1]> = logits.iter().map(|l| [argmax(l)]).collect();
    let cpu0 = process_cpu_time();
    let started = Instant::now();
    for step in 0..steps {
        let mut items: Vec<BatchItem> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, c)| BatchItem {
                tokens: t,
                offset: prompt_len + step,
                cache: c,
                logits: Logits::Last,
            })
            .collect();
        let logits = model.forward(&mut items)?.to_vec2::<f32>()?;
        next = logits.iter().map(|l| [argmax(l)]).collect();
    }
    let secs = started.elapsed().as_secs_f64();
    let cores = match (cpu0, process_cpu_time()) {
        (Some(a), Some(b)) => Some((b - a).as_secs_f64() / secs),
        _ => None,
    };
    let tokens = (batch * steps) as f64;
    let cfg = &model.cfg;
    let mean_ctx = prompt_len as f64 + steps as f64 / 2.0;
    let attn_flops = 4.0 * cfg.num_layers as f64 * cfg.q_dim() as f64 * mean_ctx;
    let flops_per_token = cfg.matmul_flops_per_token() + attn_flops;
    Ok(Row {
        batch,
        tokens_per_s: tokens / secs,
        ms_per_step: secs * 1e3 / steps as f64,
        gflops: tokens * flops_per_token / secs / 1e9,
        cores,
    })
}

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    // The roofline is measured before, between and after the decode runs; its best is the peak.
    let mut peak = roofline()?;
    println!(
        "decode benchmark: {} ({}), weights {:?}, {} threads, prompt {} tokens, {} steps, best of {}",
        loaded.path.display(),
        loaded.format,
        args.model.dtype,
        rayon::current_num_threads(),
        args.prompt_len,
        args.steps,
        args.repeats
    );
    println!(
        "model: {:.3} GFLOP/token in matmuls (plus attention, counted at the mean context)",
        model.cfg.matmul_flops_per_token() / 1e9
    );
    let mut rows = Vec::new();
    for &b in &args.batches {
        let mut best: Option<Row> = None;
        for _ in 0..args.repeats.max(1) {
            let r = decode(model, b, args.prompt_len, args.steps)?;
            if best
                .as_ref()
                .is_none_or(|x| r.tokens_per_s > x.tokens_per_s)
            {
                best = Some(r);
            }
        }
        rows.extend(best);
        peak = peak.max(roofline()?);
    }
    println!(
        "matmul roofline of this machine (best of {} measurements on large shapes): candle gemm {:.1} GFLOP/s, \
         rrt kernel {:.1} GFLOP/s",
        args.batches.len() + 1,
        peak.candle,
        peak.rrt
    );
    println!(
        "{:>6} {:>10} {:>9} {:>9} {:>12} {:>12} {:>11}",
        "batch", "tokens/s", "ms/step", "GFLOP/s", "% of candle", "% of rrt", "cores busy"
    );
    for r in rows {
        println!(
            "{:>6} {:>10.1} {:>9.2} {:>9.1} {:>11.0}% {:>11.0}% {:>11}",
            r.batch,
            r.tokens_per_s,
            r.ms_per_step,
            r.gflops,
            100.0 * r.gflops / peak.candle,
            100.0 * r.gflops / peak.rrt,
            r.cores.map_or("n/a".into(), |c| format!("{c:.2}")),
        );
    }
    Ok(())
}
