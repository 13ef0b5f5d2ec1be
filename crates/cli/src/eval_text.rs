//! The evaluation text options `eval` and `sweep` share: which file, how much of it, and the
//! scoring window; and turning them into token ids.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use rrt_model::Tokenizer;

#[derive(Args, Debug, Clone)]
pub struct EvalText {
    /// Plain text to score (default: the held-out KJV slice, `make data`).
    #[arg(long, default_value = ".cache/data/kjv-heldout.txt")]
    pub data: PathBuf,
    /// Score only the first N tokens of the file.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Tokens per independently scored window.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
}

impl EvalText {
    /// The first `max_tokens` token ids of the file.
    pub fn token_ids(&self, tokenizer: &Tokenizer) -> anyhow::Result<Vec<u32>> {
        let text = std::fs::read_to_string(&self.data)
            .with_context(|| format!("{}: cannot read the evaluation text", self.data.display()))?;
        let mut ids = tokenizer.encode(&text)?;
        ids.truncate(self.max_tokens);
        Ok(ids)
    }
}
