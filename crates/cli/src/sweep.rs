//! `rrt sweep`: the paper's initialisation / rank curve on one model, in one run. Perplexity on a
//! held-out text for the source, for each init without LoRA, and for Average + SVD-LoRA at a
//! list of ranks (the SVDs are computed once and every rank is cut from them).

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use rrt_model::perplexity::perplexity;
use rrt_model::recursive::convert::Converter;
use rrt_model::recursive::mapping::Init;
use rrt_model::Llama;

use crate::convert::{block_layers, decompose_with_progress};
use crate::eval_text::EvalText;
use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: EvalText,
    /// Shared layers K.
    #[arg(long, conflicts_with = "loops")]
    block_layers: Option<usize>,
    /// Loops B = N / K.
    #[arg(long, default_value_t = 2)]
    loops: usize,
    /// LoRA ranks for the Average init (`full` = min of each matrix's dims).
    #[arg(long, value_delimiter = ',', default_value = "8,32,128,256,384,full")]
    ranks: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

struct Row {
    model: String,
    params: usize,
    ppl: f64,
    /// The same model with per-loop norms (LoRA rows only).
    per_loop_norms: Option<f64>,
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let src = &loaded.model;
    let ids = args.text.token_ids(&loaded.tokenizer)?;
    let k = block_layers(src.layers.len(), args.block_layers, Some(args.loops))?;
    let ranks = args
        .ranks
        .iter()
        .map(|r| match r.as_str() {
            "full" => Ok(usize::MAX),
            s => s
                .parse::<usize>()
                .with_context(|| format!("--ranks: `{s}` is not a rank")),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!(
        "sweep: {} as {k} shared layers x {} loops; perplexity on {} ({} tokens, windows of {})",
        loaded.path.display(),
        src.layers.len() / k,
        args.text.data.display(),
        ids.len(),
        args.text.window
    );
    let started = Instant::now();
    let eval = |name: String, m: &Llama| -> anyhow::Result<Row> {
        let ppl = perplexity(m, &ids, args.text.window)?.perplexity();
        eprintln!(
            "  {name}: {ppl:.3} ({:.0}s)",
            started.elapsed().as_secs_f64()
        );
        Ok(Row {
            model: name,
            params: m.non_embedding_params(),
            ppl,
            per_loop_norms: None,
        })
    };
    let mut rows = vec![eval(format!("source ({} layers)", src.layers.len()), src)?];
    for init in [Init::Stepwise, Init::Average, Init::Lower, Init::Random] {
        let rec = Converter::new(src, k, init, args.seed)?.build(0, 0, false, "sweep")?;
        rows.push(eval(format!("{init}, no LoRA"), &rec)?);
    }
    let mut c = Converter::new(src, k, Init::Average, args.seed)?;
    decompose_with_progress(&mut c)?;
    for &r in &ranks {
        let label = if r == usize::MAX {
            "full".to_string()
        } else {
            r.to_string()
        };
        let name = format!("average + SVD-LoRA r{label}");
        let mut row = eval(name.clone(), &c.build(r, r, false, "sweep")?)?;
        let per_loop = eval(
            format!("{name}, per-loop norms"),
            &c.build(r, r, true, "sweep")?,
        )?;
        row.per_loop_norms = Some(per_loop.ppl);
        rows.push(row);
    }
    println!("| model | non-embedding params | perplexity (shared norms) | perplexity (per-loop norms) |");
    println!("|---|---|---|---|");
    for r in &rows {
        let per_loop = r.per_loop_norms.map_or("".into(), |p| format!("{p:.3}"));
        println!(
            "| {} | {:.2}M | {:.3} | {per_loop} |",
            r.model,
            r.params as f64 / 1e6,
            r.ppl
        );
    }
    println!(
        "(per-loop norms add {} parameters: two norm vectors per unrolled layer)",
        2 * src.cfg.hidden_size * src.cfg.num_layers
    );
    Ok(())
}
