//! Opening a model from disk: a Hugging Face directory (`config.json`, `*.safetensors`,
//! `tokenizer.json`) or a GGUF file, detected from the path.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::config::{HfLlamaConfig, ModelConfig};
use crate::decoder::Llama;
use crate::dtype::WeightDtype;
use crate::error::{ModelError, Result};
use crate::recursive::exit_heads::ExitHeads;
use crate::recursive::RecursiveMeta;
use crate::source::gguf::GgufSource;
use crate::source::safetensors::SafetensorsSource;
use crate::tokenizer::Tokenizer;

/// A model with its tokenizer, ready to run.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    pub format: &'static str,
}

/// Loads a model directory or GGUF file; projection and LM-head weights are converted (or
/// dequantized, or quantized) to `dtype`.
pub fn load(path: &Path, dtype: WeightDtype) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() {
        load_hf_dir(path, dtype)
    } else if is_gguf(path)? {
        load_gguf(path, dtype)
    } else {
        Err(ModelError::config(
            path,
            "neither a model directory (config.json + *.safetensors) nor a GGUF file (bad magic)",
        ))
    }
}

/// A model's shape without its weights: what a simulated worker serves as.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub cfg: ModelConfig,
    /// Shared layers (K) and loops (N / K); a plain model is N layers looped once.
    pub block_layers: usize,
    pub loops: usize,
}

/// Reads a model directory's `config.json` and tokenizer, not its weights (a simulated worker:
/// real token counts and chat template, modelled compute).
pub fn load_shape(dir: &Path) -> Result<(ModelShape, Tokenizer)> {
    let config_path = dir.join("config.json");
    let hf = HfLlamaConfig::read(&config_path)?;
    let cfg = ModelConfig::from_hf(&hf, &config_path)?;
    let (block_layers, loops) = match &hf.rrt_recursive {
        None => (cfg.num_layers, 1),
        Some(v) => {
            let meta = serde_json::from_value::<RecursiveMeta>(v.clone()).map_err(|e| {
                ModelError::config(&config_path, format!("field `rrt_recursive`: {e}"))
            })?;
            (meta.block_layers, meta.loops)
        }
    };
    let tokenizer = Tokenizer::from_hf_dir(dir, cfg.bos_token_id, cfg.eos_token_ids.clone())?;
    let shape = ModelShape {
        cfg,
        block_layers,
        loops,
    };
    Ok((shape, tokenizer))
}

fn is_gguf(path: &Path) -> Result<bool> {
    if path.extension().is_some_and(|e| e == "gguf") {
        return Ok(true);
    }
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

fn load_hf_dir(dir: &Path, dtype: WeightDtype) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let hf = HfLlamaConfig::read(&config_path)?;
    let cfg = ModelConfig::from_hf(&hf, &config_path)?;
    let recursive = match &hf.rrt_recursive {
        None => None,
        Some(v) => Some(
            serde_json::from_value::<RecursiveMeta>(v.clone()).map_err(|e| {
                ModelError::config(&config_path, format!("field `rrt_recursive`: {e}"))
            })?,
        ),
    };
    let mut src = SafetensorsSource::open_dir(dir)?;
    let tokenizer = Tokenizer::from_hf_dir(dir, cfg.bos_token_id, cfg.eos_token_ids.clone())?;
    let hidden = cfg.hidden_size;
    let mut model = Llama::load(cfg, &mut src, dtype, recursive)?;
    model.exit_heads = ExitHeads::load_dir(dir, &mut src, hidden)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        path: dir.into(),
        format: "safetensors",
    })
}

fn load_gguf(path: &Path, dtype: WeightDtype) -> Result<LoadedModel> {
    let mut src = GgufSource::open(path)?;
    let cfg = src.config()?;
    let tokenizer = Tokenizer::from_gguf(path, src.tokenizer_parts()?)?;
    let model = Llama::load(cfg, &mut src, dtype, None)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        path: path.into(),
        format: "gguf",
    })
}
