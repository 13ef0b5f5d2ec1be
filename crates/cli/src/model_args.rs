//! Options every model-running command shares: which model, and in which precision.

use std::path::PathBuf;

use clap::Args;
use rrt_model::{LoadedModel, WeightDtype};

/// The bundled default: SmolLM2-135M-Instruct (GGUF), fetched by `make model`.
pub const DEFAULT_MODEL: &str = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or a GGUF file.
    #[arg(long, env = "RRT_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// How the projection and LM-head weights are held: f32, bf16 (half the bytes), q8 (int8
    /// blocks of 32 with a scale each: 1.125 bytes a weight) or f16 (candle's matmul, slow).
    /// GGUF tensors are dequantized to it, or kept as they are when they are Q8_0 and it is q8.
    #[arg(long, env = "RRT_DTYPE", default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        if !self.model.exists() && self.model == std::path::Path::new(DEFAULT_MODEL) {
            anyhow::bail!(
                "{}: the default model is not downloaded yet; run `make model` (or pass --model PATH)",
                self.model.display()
            );
        }
        if let (_, Some(note)) = self.dtype.cpu_note() {
            tracing::warn!("{note}");
        }
        // Model errors already name the file and the field at fault.
        Ok(rrt_model::load(&self.model, self.dtype)?)
    }
}
