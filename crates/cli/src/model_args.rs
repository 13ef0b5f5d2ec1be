//! Options every model-running command shares: which model, and in which precision.

use std::path::PathBuf;

use candle_core::DType;
use clap::{Args, ValueEnum};
use rrt_model::LoadedModel;

/// The bundled default: SmolLM2-135M-Instruct (GGUF), fetched by `make model`.
pub const DEFAULT_MODEL: &str = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json) or a GGUF file.
    #[arg(long, env = "RRT_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Precision the weights are held in (GGUF tensors are dequantized to it).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Precision {
    F32,
    F16,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        if !self.model.exists() && self.model == std::path::Path::new(DEFAULT_MODEL) {
            anyhow::bail!(
                "{}: the default model is not downloaded yet; run `make model` (or pass --model PATH)",
                self.model.display()
            );
        }
        let dtype = match self.dtype {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        };
        // Model errors already name the file and the field at fault.
        Ok(rrt_model::load(&self.model, dtype)?)
    }
}
