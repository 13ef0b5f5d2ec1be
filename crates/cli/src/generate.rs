//! `rrt generate`: one prompt, tokens streamed to stdout as they are sampled.

use std::io::Write;

use clap::Args;
use rrt_model::generate::{generate, GenerateParams};
use rrt_model::{SamplingParams, TextStream};

use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (one user turn).
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Print timing to stderr after the text.
    #[arg(long)]
    stats: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    sampling.validate()?;
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    let text = if args.chat {
        tok.chat_prompt(&args.prompt)?
    } else {
        args.prompt.clone()
    };
    let ids = tok.encode(&text)?;
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_tokens: tok.eos.clone(),
    };
    let mut out = std::io::stdout().lock();
    if !args.chat {
        write!(out, "{}", args.prompt)?;
        out.flush()?;
    }
    let mut stream = TextStream::new();
    let generation = generate(&loaded.model, &ids, &params, |id| {
        if let Some(piece) = stream.push(tok, id)? {
            // A closed stdout (e.g. `| head`) ends generation quietly.
            if write!(out, "{piece}").and_then(|_| out.flush()).is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    writeln!(out).ok();
    if args.stats {
        let n = generation.tokens.len();
        eprintln!(
            "prompt {} tokens in {:.2}s; generated {n} tokens in {:.2}s ({:.1} tokens/s); finish: {:?}",
            ids.len(),
            generation.prefill_time.as_secs_f64(),
            generation.decode_time.as_secs_f64(),
            n as f64 / generation.decode_time.as_secs_f64().max(1e-9),
            generation.finish
        );
    }
    Ok(())
}
