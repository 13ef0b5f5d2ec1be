//! `rrt eval`: perplexity on a text file (a fixed prefix of it, in fixed windows), with speed and
//! size figures.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use rrt_model::perplexity::perplexity_per_loop;

use crate::eval_text::EvalText;
use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: EvalText,
    /// How K and V are held while scoring: f32, bf16 or int8.
    #[arg(long, default_value_t = rrt_model::KvDtype::F32)]
    kv_dtype: rrt_model::KvDtype,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let ids = args.text.token_ids(&loaded.tokenizer)?;
    let started = Instant::now();
    let per_loop = perplexity_per_loop(&loaded.model, &ids, args.text.window, true, args.kv_dtype)?;
    let report = *per_loop.last().context("no loops")?;
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
        args.text.data.display(),
        ids.len(),
        args.text.window
    );
    match &loaded.model.recursion {
        Some(r) => println!(
            "layers:         {} shared x {} loops = {} unrolled (init {}, LoRA rank attn {} / mlp {})",
            r.meta.block_layers, r.meta.loops, cfg.num_layers, r.meta.init, r.meta.lora_rank_attn, r.meta.lora_rank_mlp
        ),
        None => println!("layers:         {}", cfg.num_layers),
    }
    println!("non-emb params: {:.2}M", params as f64 / 1e6);
    let kv = loaded
        .model
        .kv_layout(rrt_model::kv::DEFAULT_BLOCK_TOKENS, args.kv_dtype)?;
    println!(
        "KV cache:       {} bytes a token ({}, every layer and loop)",
        kv.bytes_per_token(),
        args.kv_dtype
    );
    println!(
        "weight memory:  {} ({}, {} kernel)",
        crate::memory::mib(loaded.model.weight_bytes() as u64),
        args.model.dtype,
        args.model.dtype.cpu_note().0
    );
    if let Some((rss, peak)) = crate::memory::rss() {
        println!(
            "resident set:   {} now, {} peak",
            crate::memory::mib(rss),
            crate::memory::mib(peak)
        );
    }
    println!("scored tokens:  {}", report.scored);
    println!("nll:            {:.4} nats/token", report.nll);
    println!("perplexity:     {:.3}", report.perplexity());
    if per_loop.len() > 1 {
        for (i, r) in per_loop.iter().enumerate() {
            println!(
                "  exit after loop {}/{}: perplexity {:.3}",
                i + 1,
                per_loop.len(),
                r.perplexity()
            );
        }
    }
    println!("speed:          {:.0} tokens/s", ids.len() as f64 / secs);
    Ok(())
}
