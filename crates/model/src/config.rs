//! Model hyper-parameters: the Hugging Face `config.json` schema for the Llama family, and the
//! validated runtime [`ModelConfig`] that every other module uses (GGUF metadata maps onto it too).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Architectures the decoder implements (Llama-family: pre-norm, RoPE, GQA, SwiGLU, no biases).
pub const SUPPORTED_ARCHITECTURES: &str = "llama";

/// A token id or a list of them (`eos_token_id` is either in Hugging Face configs).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `config.json` of a Hugging Face Llama-family checkpoint (the fields the decoder needs).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HfLlamaConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `{"rope_theta": .., "rope_type": "default"}` here instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// Present in models written by `rrt convert` (see `recursive::RecursiveMeta`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rrt_recursive: Option<serde_json::Value>,
}

impl HfLlamaConfig {
    /// Parses `config.json`; errors name the file and the field.
    pub fn read(path: &Path) -> Result<Self> {
        crate::json::read(path, "config")
    }

    /// The `config.json` of a Llama model with hyper-parameters `cfg` and `layers` layers (a
    /// recursive model stores its K shared layers; the caller adds `rrt_recursive`).
    pub fn from_model(cfg: &ModelConfig, layers: usize) -> Self {
        Self {
            model_type: Some("llama".into()),
            architectures: Some(vec!["LlamaForCausalLM".into()]),
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: cfg.num_heads,
            num_key_value_heads: Some(cfg.num_kv_heads),
            head_dim: Some(cfg.head_dim),
            vocab_size: cfg.vocab_size,
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope_theta,
            rope_scaling: None,
            rope_parameters: None,
            max_position_embeddings: cfg.max_position_embeddings,
            tie_word_embeddings: cfg.tie_word_embeddings,
            bos_token_id: cfg.bos_token_id,
            eos_token_id: Some(TokenIds::Many(cfg.eos_token_ids.clone())),
            attention_bias: false,
            mlp_bias: false,
            hidden_act: Some("silu".into()),
            torch_dtype: Some("float32".into()),
            rrt_recursive: None,
        }
    }
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}

/// Validated hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        Self::from_hf(&HfLlamaConfig::read(path)?, path)
    }

    /// Validates a parsed Hugging Face config; `path` names the file in errors.
    pub fn from_hf(hf: &HfLlamaConfig, path: &Path) -> Result<Self> {
        let arch = hf.model_type.clone().unwrap_or_else(|| "llama".into());
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture {
                path: path.into(),
                arch,
                supported: SUPPORTED_ARCHITECTURES,
            });
        }
        if let Some(scaling) = &hf.rope_scaling {
            if !scaling.is_null() {
                return Err(ModelError::config(
                    path,
                    format!("field `rope_scaling`: {scaling} is not supported (only no scaling)"),
                ));
            }
        }
        let mut rope_theta = hf.rope_theta;
        if let Some(params) = hf.rope_parameters.as_ref().filter(|p| !p.is_null()) {
            let kind = params
                .get("rope_type")
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(ModelError::config(
                    path,
                    format!("field `rope_parameters.rope_type`: `{kind}` is not supported (only default)"),
                ));
            }
            if let Some(theta) = params.get("rope_theta") {
                rope_theta = theta.as_f64().ok_or_else(|| {
                    ModelError::config(path, "field `rope_parameters.rope_theta` must be a number")
                })?;
            }
        }
        if hf.attention_bias || hf.mlp_bias {
            return Err(ModelError::config(
                path,
                "fields `attention_bias`/`mlp_bias`: biases are not supported",
            ));
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(ModelError::config(
                    path,
                    format!("field `hidden_act`: `{act}` is not supported (only silu)"),
                ));
            }
        }
        let num_heads = hf.num_attention_heads;
        let cfg = ModelConfig {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(num_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / num_heads.max(1)),
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            bos_token_id: hf.bos_token_id,
            eos_token_ids: hf
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the relations between fields; `path` names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ModelError::config(
                    path,
                    format!("field `{field}` must be > 0"),
                ));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ModelError::config(
                path,
                format!(
                    "field `num_key_value_heads`: {} does not divide num_attention_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::config(
                path,
                "field `head_dim` must be even for RoPE",
            ));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Weight count of one decoder layer (projections and norms).
    pub fn layer_params(&self) -> usize {
        let h = self.hidden_size;
        h * (self.q_dim() + 2 * self.kv_dim())
            + self.q_dim() * h
            + 3 * h * self.intermediate_size
            + 2 * h
    }

    /// Multiply-add FLOPs per token of the projections and LM head (2 per weight), without attention.
    pub fn matmul_flops_per_token(&self) -> f64 {
        let h = self.hidden_size;
        2.0 * (self.num_layers * (self.layer_params() - 2 * h) + h * self.vocab_size) as f64
    }

    /// Bytes of K and V per cached token over all layers, in f32.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.num_layers * 2 * self.kv_dim() * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_config_reads_back_as_the_same_model_config() {
        let cfg = ModelConfig {
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 6,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            vocab_size: 300,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2, 3],
        };
        let text = serde_json::to_string(&HfLlamaConfig::from_model(&cfg, 6)).unwrap();
        let back: HfLlamaConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(ModelConfig::from_hf(&back, Path::new("x")).unwrap(), cfg);
        assert!(!text.contains("null"), "unset options are left out: {text}");
        assert!(text.contains("\"torch_dtype\":\"float32\""), "{text}");
    }
}
