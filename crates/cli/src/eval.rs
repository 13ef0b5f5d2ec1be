//! `rrt eval`: perplexity on a text file (a fixed prefix of it, in fixed windows), with speed and
//! size figures.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use rrt_model::perplexity::perplexity;

use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Plain text to score.
    #[arg(long, default_value = ".cache/data/kjv-heldout.txt")]
    data: PathBuf,
    /// Score only the first N tokens of the file.
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    /// Tokens per independently scored window.
    #[arg(long, default_value_t = 512)]
    window: usize,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("{}: cannot read the evaluation text", args.data.display()))?;
    let loaded = args.model.load()?;
    let mut ids = loaded.tokenizer.encode(&text)?;
    ids.truncate(args.max_tokens);
    let started = Instant::now();
    let report = perplexity(&loaded.model, &ids, args.window)?;
    let secs = started.elapsed().as_secs_f64();
    let cfg = &loaded.model.cfg;
    let params = loaded.model.non_embedding_params();
    println!(
        "model:          {} ({})",
        loaded.path.display(),
        loaded.format
    );
    println!(
        "data:           {} (first {} tokens, windows of {})",
        args.data.display(),
        ids.len(),
        args.window
    );
    println!("layers:         {}", cfg.num_layers);
    println!("non-emb params: {:.2}M", params as f64 / 1e6);
    println!(
        "weight memory:  {:.1} MiB",
        weight_bytes(&loaded.model) as f64 / (1 << 20) as f64
    );
    println!("scored tokens:  {}", report.scored);
    println!("nll:            {:.4} nats/token", report.nll);
    println!("perplexity:     {:.3}", report.perplexity());
    println!("speed:          {:.0} tokens/s", ids.len() as f64 / secs);
    Ok(())
}

/// Bytes of weights held in memory (a tied LM head is packed separately from the embedding).
fn weight_bytes(model: &rrt_model::Llama) -> usize {
    let t = |t: &candle_core::Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let mut total = t(&model.embed) + t(&model.norm) + model.lm_head.bytes();
    for l in &model.layers {
        total += t(&l.attn_norm) + t(&l.mlp_norm);
        total += [&l.qkv, &l.o, &l.gate_up, &l.down]
            .iter()
            .map(|x| x.bytes())
            .sum::<usize>();
    }
    total
}
