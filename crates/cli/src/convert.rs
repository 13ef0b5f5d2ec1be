//! `rrt convert`: a pretrained model -> a relaxed recursive model directory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rrt_model::recursive::convert::Converter;
use rrt_model::recursive::mapping::Init;
use rrt_model::Llama;

use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Shared layers K (must divide the source's N layers).
    #[arg(long, conflicts_with = "loops", required_unless_present = "loops")]
    block_layers: Option<usize>,
    /// Loops B = N / K (alternative to --block-layers).
    #[arg(long)]
    loops: Option<usize>,
    /// How the shared layers are initialised: stepwise, average, lower, random.
    #[arg(long, default_value = "stepwise")]
    init: Init,
    /// Seed of the random init.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// LoRA rank of every projection (0: the pure recursive model; >= min(dims): full rank).
    #[arg(long, default_value_t = 0, value_parser = parse_rank, allow_hyphen_values = true)]
    lora_rank: usize,
    /// LoRA rank of q, k, v, o (overrides --lora-rank).
    #[arg(long, value_parser = parse_rank, allow_hyphen_values = true)]
    lora_rank_attn: Option<usize>,
    /// LoRA rank of gate, up, down (overrides --lora-rank).
    #[arg(long, value_parser = parse_rank, allow_hyphen_values = true)]
    lora_rank_mlp: Option<usize>,
    /// Norm weights: shared by the loops (the paper) or each unrolled layer's own.
    #[arg(long, value_enum, default_value_t = Norms::Shared)]
    norms: Norms,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norms {
    Shared,
    PerLoop,
}

/// A LoRA rank: a whole number >= 0.
fn parse_rank(s: &str) -> Result<usize, String> {
    match s.parse::<i64>() {
        Ok(r) if r < 0 => Err(format!("a LoRA rank must be >= 0, got {r}")),
        Ok(r) => Ok(r as usize),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// K from `--block-layers` or `--loops`, checked against the source's depth.
pub fn block_layers(n: usize, block: Option<usize>, loops: Option<usize>) -> anyhow::Result<usize> {
    match (block, loops) {
        (Some(k), _) => Ok(k),
        (None, Some(b)) if b > 0 && n.is_multiple_of(b) => Ok(n / b),
        (None, Some(b)) => bail!("--loops {b} does not divide the source's {n} layers"),
        (None, None) => bail!("give --block-layers K or --loops B"),
    }
}

/// Runs the residual SVDs with a progress bar on stderr.
pub fn decompose_with_progress(c: &mut Converter<'_>) -> anyhow::Result<()> {
    let bar = ProgressBar::new(c.svd_jobs() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "SVD of residuals {bar:40} {pos}/{len} [{elapsed_precise}, eta {eta}]",
        )
        .context("progress template")?,
    );
    c.decompose(&|| bar.inc(1))?;
    bar.finish_and_clear();
    Ok(())
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let loaded = args.model.load()?;
    let src = &loaded.model;
    let n = src.layers.len();
    let k = block_layers(n, args.block_layers, args.loops)?;
    let rank_attn = args.lora_rank_attn.unwrap_or(args.lora_rank);
    let rank_mlp = args.lora_rank_mlp.unwrap_or(args.lora_rank);
    let mut c = Converter::new(src, k, args.init, args.seed)?;
    if rank_attn > 0 || rank_mlp > 0 {
        decompose_with_progress(&mut c)?;
    }
    let source = loaded.path.display().to_string();
    let rec = c.build(rank_attn, rank_mlp, args.norms == Norms::PerLoop, &source)?;
    rrt_model::recursive::save::save(&rec, &loaded.tokenizer, &args.out)?;
    print_summary(src, &rec, &args.out);
    println!("time: {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn print_summary(src: &Llama, rec: &Llama, out: &std::path::Path) {
    let meta = &rec
        .recursion
        .as_ref()
        .expect("a converted model is recursive")
        .meta;
    println!("wrote {}", out.display());
    println!(
        "recursive: {} shared layers x {} loops (source {} layers), init {}, LoRA rank attn {} / mlp {}, norms {}",
        meta.block_layers,
        meta.loops,
        meta.source_layers,
        meta.init,
        meta.lora_rank_attn,
        meta.lora_rank_mlp,
        if meta.per_loop_norms { "per-loop" } else { "shared" }
    );
    println!(
        "layer mapping (shared layer <- source layers): {:?}",
        meta.layer_mapping
    );
    println!(
        "non-embedding parameters: {:.2}M (source {:.2}M, {:.0}%)",
        rec.non_embedding_params() as f64 / 1e6,
        src.non_embedding_params() as f64 / 1e6,
        100.0 * rec.non_embedding_params() as f64 / src.non_embedding_params() as f64
    );
}
