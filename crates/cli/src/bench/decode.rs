//! Decode throughput of the plain decoder at several batch sizes, for each weight dtype: every
//! sequence gets a prompt, then each step feeds one new token per sequence through one batched
//! forward. Per dtype (each in its own process, so its resident memory is its own): weight bytes,
//! resident set, prompt processing (tokens/s over one window), decode tokens/s, achieved GFLOP/s
//! against the measured matmul roofline and cores busy; then the dtypes side by side in one
//! process, taking turns run by run, and one table of ratios to f32.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use rrt_model::kv::DEFAULT_BLOCK_TOKENS;
use rrt_model::sampling::argmax;
use rrt_model::{BatchItem, KvDtype, KvPool, Llama, Logits, SeqCache, WeightDtype};

use super::cpu_time::process_cpu_time;
use super::matmul::roofline;
use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct DecodeArgs {
    /// Model: a Hugging Face directory or a GGUF file.
    #[arg(long, env = "RRT_MODEL", default_value = crate::model_args::DEFAULT_MODEL)]
    model: PathBuf,
    /// Weight dtypes to compare (each run in its own process; the first is the baseline of the
    /// ratios).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,q8")]
    dtypes: Vec<WeightDtype>,
    /// Tokens of each sequence whose prompt processing is timed.
    #[arg(long, default_value_t = 256)]
    prefill_window: usize,
    /// With several dtypes, the side-by-side speeds take `rounds x repeats` runs per dtype and
    /// figure, the dtypes taking turns run by run (f32, bf16, q8, f32, ...) in one process, so a
    /// slow spell of this shared machine lands on every dtype alike.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print the figures of the (single) dtype as one JSON line too (what the parent reads).
    #[arg(long, hide = true)]
    json: bool,
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
    // A pool sized for the run, as a worker's is (sequences' blocks interleave in it).
    let layout = model.kv_layout(DEFAULT_BLOCK_TOKENS, KvDtype::F32)?;
    let mut kv = KvPool::new(layout, layout.blocks_for(prompt_len + steps) * batch)?;
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
    let logits = model.forward(&mut kv, &mut items)?.to_vec2::<f32>()?;
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
        let logits = model.forward(&mut kv, &mut items)?.to_vec2::<f32>()?;
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

/// Tokens/s of the prompt pass over [`PREFILL_SEQS`] sequences of `window` tokens, one after the
/// other (a single 256-token pass lasts well under a second: too short on a drifting machine).
fn prefill(model: &Llama, window: usize) -> anyhow::Result<f64> {
    let vocab = model.cfg.vocab_size as u32;
    let started = Instant::now();
    for s in 0..PREFILL_SEQS {
        let tokens: Vec<u32> = (0..window)
            .map(|i| (1000 + 13 * i as u32 + 101 * s as u32) % vocab)
            .collect();
        let mut cache = model.new_cache();
        let mut kv = model.new_kv_pool();
        let mut items = [BatchItem {
            tokens: &tokens,
            offset: 0,
            cache: &mut cache,
            logits: Logits::Last,
        }];
        model.forward(&mut kv, &mut items)?;
    }
    Ok((PREFILL_SEQS * window) as f64 / started.elapsed().as_secs_f64())
}

/// Sequences whose prompt pass [`prefill`] times.
const PREFILL_SEQS: usize = 4;

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.dtypes.is_empty(), "--dtypes lists no dtype");
    if args.dtypes.len() == 1 {
        return run_one(&args, args.dtypes[0]);
    }
    // One process per dtype for its memory and its own figures: a model dropped does not give
    // its pages back to the OS, so the resident set of the next would include it.
    let exe = std::env::current_exe()?;
    let batches: Vec<String> = args.batches.iter().map(|b| b.to_string()).collect();
    let mut figures = Vec::new();
    for d in &args.dtypes {
        println!("== {d} on its own");
        let out = std::process::Command::new(&exe)
            .args(["bench", "decode", "--json", "--model"])
            .arg(&args.model)
            .arg(format!("--dtypes={d}"))
            .arg(format!("--batches={}", batches.join(",")))
            .arg(format!("--steps={}", args.steps))
            .arg(format!("--prompt-len={}", args.prompt_len))
            .arg(format!("--repeats={}", args.repeats))
            .arg(format!("--prefill-window={}", args.prefill_window))
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().filter(|l| !l.starts_with("json: ")) {
            println!("{line}");
        }
        anyhow::ensure!(out.status.success(), "the {d} run failed");
        let json = text
            .lines()
            .find_map(|l| l.strip_prefix("json: "))
            .context("the child printed no figures")?;
        figures.push(serde_json::from_str::<serde_json::Value>(json)?);
        println!();
    }
    side_by_side(&args, &mut figures)?;
    print_comparison(&args, &figures);
    Ok(())
}

/// The speeds of the comparison, measured with every dtype's model loaded in this one process
/// and the dtypes taking turns run by run (f32, bf16, q8, f32, ...), each keeping its best:
/// this shared VM's memory bandwidth drifts by ~20-40% between minutes, so dtypes measured in
/// processes a minute apart (the per-dtype figures above) can land in different spells and
/// their ratio measures the drift; taking turns every few hundred milliseconds puts every
/// dtype through the same spells. Overwrites the speeds of `figures` (one per dtype).
fn side_by_side(args: &DecodeArgs, figures: &mut [serde_json::Value]) -> anyhow::Result<()> {
    let models = args
        .dtypes
        .iter()
        .map(|&dtype| {
            let loaded = ModelArgs {
                model: args.model.clone(),
                dtype,
            }
            .load()?;
            Ok(loaded.model)
        })
        .collect::<anyhow::Result<Vec<Llama>>>()?;
    let turns = args.rounds.max(1) * args.repeats.max(1);
    println!("== side by side: the dtypes take turns, {turns} runs each per figure, best kept");
    let best = best_in_turns(&models, turns, |m| prefill(m, args.prefill_window))?;
    for (f, b) in figures.iter_mut().zip(&best) {
        f["prefill"] = serde_json::json!(b);
    }
    for &batch in &args.batches {
        let best = best_in_turns(&models, turns, |m| {
            Ok(decode(m, batch, args.prompt_len, args.steps)?.tokens_per_s)
        })?;
        let line: Vec<String> = args
            .dtypes
            .iter()
            .zip(&best)
            .map(|(d, b)| format!("{d} {b:.1}"))
            .collect();
        println!("batch {batch}: {} tokens/s", line.join(", "));
        for (f, b) in figures.iter_mut().zip(&best) {
            f[format!("batch_{batch}")] = serde_json::json!(b);
        }
    }
    println!();
    Ok(())
}

/// The best of `turns` runs of `run` for each model, the models taking turns run by run.
fn best_in_turns(
    models: &[Llama],
    turns: usize,
    run: impl Fn(&Llama) -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<f64>> {
    let mut best = vec![0f64; models.len()];
    for _ in 0..turns {
        for (b, m) in best.iter_mut().zip(models) {
            *b = b.max(run(m)?);
        }
    }
    Ok(best)
}

/// The dtypes side by side, ratios to the first.
fn print_comparison(args: &DecodeArgs, figures: &[serde_json::Value]) {
    let base = &figures[0];
    let f = |v: &serde_json::Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    println!(
        "weight dtypes side by side ({}; speeds from one process, the dtypes taking turns, best of {} runs each; memory from each dtype's own process; ratios to {}):",
        args.model.display(),
        args.rounds.max(1) * args.repeats.max(1),
        base["dtype"].as_str().unwrap_or("?")
    );
    let mut header = "| dtype | kernel | weights | resident (peak) | prompt tok/s |".to_string();
    let mut rule = "|---|---|---|---|---|".to_string();
    for b in &args.batches {
        header.push_str(&format!(" batch {b} tok/s |"));
        rule.push_str("---|");
    }
    println!(
        "{header}
{rule}"
    );
    for v in figures {
        let ratio = |key: &str| f(v, key) / f(base, key);
        let mut line = format!(
            "| {} | {} | {} ({:.2}x) | {} | {:.1} ({:.2}x) |",
            v["dtype"].as_str().unwrap_or("?"),
            v["kernel"].as_str().unwrap_or("?"),
            crate::memory::mib(f(v, "weight_bytes") as u64),
            ratio("weight_bytes"),
            crate::memory::mib(f(v, "rss_peak") as u64),
            f(v, "prefill"),
            ratio("prefill"),
        );
        for b in &args.batches {
            let key = format!("batch_{b}");
            line.push_str(&format!(" {:.1} ({:.2}x) |", f(v, &key), ratio(&key)));
        }
        println!("{line}");
    }
}

fn run_one(args: &DecodeArgs, dtype: WeightDtype) -> anyhow::Result<()> {
    let loaded = ModelArgs {
        model: args.model.clone(),
        dtype,
    }
    .load()?;
    let model = &loaded.model;
    let (kernel, _) = dtype.cpu_note();
    let (rss, _) = crate::memory::rss().unwrap_or_default();
    // The roofline is measured before, between and after the decode runs; its best is the peak.
    let mut peak = roofline()?;
    println!(
        "decode benchmark: {} ({}), weights {dtype} ({kernel} kernel, {} in memory, resident set {} after load), {} threads, prompt {} tokens, {} steps, best of {}",
        loaded.path.display(),
        loaded.format,
        crate::memory::mib(model.weight_bytes() as u64),
        crate::memory::mib(rss),
        rayon::current_num_threads(),
        args.prompt_len,
        args.steps,
        args.repeats
    );
    println!(
        "model: {:.3} GFLOP/token in matmuls (plus attention, counted at the mean context)",
        model.cfg.matmul_flops_per_token() / 1e9
    );
    let mut prefill_best = 0f64;
    for _ in 0..args.repeats.max(1) {
        prefill_best = prefill_best.max(prefill(model, args.prefill_window)?);
    }
    println!(
        "prompt processing: {prefill_best:.1} tokens/s ({} sequences of {} tokens)",
        PREFILL_SEQS, args.prefill_window
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
    let (_, peak_rss) = crate::memory::rss().unwrap_or_default();
    let mut json = serde_json::json!({
        "dtype": dtype.name(),
        "kernel": kernel,
        "weight_bytes": model.weight_bytes(),
        "rss_loaded": rss,
        "rss_peak": peak_rss,
        "prefill": prefill_best,
    });
    for r in &rows {
        json[format!("batch_{}", r.batch)] = serde_json::json!(r.tokens_per_s);
    }
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
    println!("resident set: {} peak", crate::memory::mib(peak_rss));
    if args.json {
        println!("json: {json}");
    }
    Ok(())
}
