//! `rrt corpus`: general training text written by the source model (sequence-level
//! distillation) through the batched engine: seeded prompts of five kinds, sampled answers,
//! short, looping and near-duplicate answers dropped. Writes the text file the trainer reads
//! and, beside it, a JSON report (settings, tokens/s, distinct n-gram shares, a sample).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rrt_model::{KvDtype, WeightDtype};
use rrt_train::corpus::{self, Options, PromptSet};

use crate::model_args::{ModelArgs, DEFAULT_MODEL};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SetArg {
    /// The training prompts.
    Train,
    /// Held-out prompts: other topics and templates (use another --seed too).
    Heldout,
}

#[derive(Args, Debug)]
pub struct CorpusArgs {
    /// The model that writes (the source the recursive model is distilled from).
    #[arg(long, env = "RRT_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Weight precision of the writer (bf16: the engine's fastest here at 64 sequences of a
    /// few hundred tokens, ahead of q8, whose tiles win at smaller batches).
    #[arg(long, default_value_t = WeightDtype::Bf16)]
    dtype: WeightDtype,
    /// The text file to write (its report goes beside it, as .json).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "train")]
    set: SetArg,
    /// Answer tokens to write.
    #[arg(long, default_value_t = 2_000_000)]
    tokens: usize,
    #[arg(long, default_value_t = 320)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Requests generating at once.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    #[arg(long, default_value_t = 256)]
    max_batch_rows: usize,
    /// KV cache precision: bf16 (half the bytes decode attention reads), f32, or int8 (0.53x
    /// bf16's bytes; measured 1.02-1.06x the generated tokens/s, a slightly different teacher).
    #[arg(long, default_value = "bf16")]
    kv_dtype: KvDtype,
    /// No progress bar (logs).
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: CorpusArgs) -> anyhow::Result<()> {
    let opts = Options {
        set: match args.set {
            SetArg::Train => PromptSet::Train,
            SetArg::Heldout => PromptSet::Heldout,
        },
        tokens: args.tokens,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        in_flight: args.in_flight,
        max_batch_rows: args.max_batch_rows,
        kv_dtype: args.kv_dtype,
    };
    corpus::check(&opts)?;
    let loaded = ModelArgs {
        model: args.model.clone(),
        dtype: args.dtype,
    }
    .load()?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Written to a temporary name and renamed at the end: an interrupted run leaves no corpus
    // that looks whole.
    let partial = args.out.with_extension("partial");
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&partial)
            .with_context(|| format!("writing {}", partial.display()))?,
    );
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(args.tokens as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} tokens {elapsed_precise} ETA {eta_precise}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };
    let mut sample = None;
    let mut last_log = 0usize;
    let generated = corpus::generate(
        loaded.model,
        &loaded.tokenizer,
        &opts,
        &mut |doc| {
            file.write_all(doc.text.as_bytes())
                .with_context(|| format!("writing {}", partial.display()))
                .map_err(|e| rrt_train::TrainError::Input(format!("{e:#}")))?;
            if sample.is_none() {
                sample = Some(doc.clone());
            }
            Ok(())
        },
        &mut |p| {
            bar.set_position(p.kept_tokens as u64);
            bar.set_message(format!(
                "{} docs ({} dropped) | {:.0} tok/s",
                p.documents,
                p.dropped,
                p.generated_tokens as f64 / p.seconds.max(1e-9)
            ));
            if args.quiet && p.kept_tokens >= last_log + args.tokens.div_ceil(20) {
                last_log = p.kept_tokens;
                eprintln!(
                    "{} of {} tokens, {} documents ({} dropped), {:.0} s, {:.0} generated tokens/s",
                    p.kept_tokens,
                    args.tokens,
                    p.documents,
                    p.dropped,
                    p.seconds,
                    p.generated_tokens as f64 / p.seconds.max(1e-9)
                );
            }
        },
    );
    bar.finish_and_clear();
    let report = match generated {
        Ok(r) => r,
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(&partial);
            return Err(e.into());
        }
    };
    file.flush()
        .with_context(|| format!("writing {}", partial.display()))?;
    drop(file);
    std::fs::rename(&partial, &args.out)
        .with_context(|| format!("renaming {} to {}", partial.display(), args.out.display()))?;
    let json = args.out.with_extension("json");
    let mut value = serde_json::to_value(&report)?;
    value["model"] = serde_json::json!(args.model.display().to_string());
    value["dtype"] = serde_json::json!(args.dtype.to_string());
    value["sample"] = serde_json::to_value(&sample)?;
    std::fs::write(&json, serde_json::to_string_pretty(&value)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    eprintln!(
        "{}: {} documents, {} answer tokens ({} tokens as trained on) in {:.0} s: {:.0} generated tokens/s, {:.0} kept/s",
        args.out.display(),
        report.documents,
        report.answer_tokens,
        report.text_tokens,
        report.seconds,
        report.generated_per_s,
        report.kept_per_s
    );
    eprintln!(
        "kinds: {}; dropped: {:?}; ended by themselves: {:.1}%; distinct n-grams (n=1..4): {}",
        corpus::kinds_line(&report),
        report.dropped,
        100.0 * report.ended_share,
        report
            .distinct_ngrams
            .iter()
            .map(|(_, s)| format!("{:.3}", s))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    eprintln!("report: {}", json.display());
    Ok(())
}
