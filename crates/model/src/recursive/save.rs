//! Writing a (recursive) model as a directory every rrt command loads: `config.json` (Hugging
//! Face Llama fields with `num_hidden_layers` = K, plus the `rrt_recursive` section),
//! `model.safetensors` (shared layers under the usual names, `rrt.lora.{l}.*` and
//! `rrt.loop_norms.{l}.*` per unrolled layer), `tokenizer.json` and `tokenizer_config.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use super::lora::{projection_path, PROJECTIONS};
use crate::decoder::Llama;
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// Writes `model` and `tokenizer` into `dir` (created if missing; files replaced).
pub fn save(model: &Llama, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let cfg = &model.cfg;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("model.embed_tokens.weight".into(), model.embed.clone());
    tensors.insert("model.norm.weight".into(), model.norm.clone());
    if !cfg.tie_word_embeddings {
        tensors.insert("lm_head.weight".into(), model.lm_head.weight()?);
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (j, t) in layer.projections(cfg)?.into_iter().enumerate() {
            tensors.insert(
                format!("{p}.{}.weight", projection_path(j)),
                t.contiguous()?,
            );
        }
        tensors.insert(
            format!("{p}.input_layernorm.weight"),
            layer.attn_norm.clone(),
        );
        tensors.insert(
            format!("{p}.post_attention_layernorm.weight"),
            layer.mlp_norm.clone(),
        );
    }
    let mut recursive = serde_json::Value::Null;
    if let Some(r) = &model.recursion {
        for (l, lora) in r.lora.iter().enumerate() {
            for (p, proj) in lora.proj.iter().enumerate() {
                if let Some(proj) = proj {
                    let base = format!("rrt.lora.{l}.{}", projection_path(p));
                    tensors.insert(format!("{base}.lora_A.weight"), proj.a.weight()?);
                    tensors.insert(format!("{base}.lora_B.weight"), proj.b.weight()?);
                }
            }
        }
        for (l, n) in r.loop_norms.iter().enumerate() {
            tensors.insert(
                format!("rrt.loop_norms.{l}.input_layernorm.weight"),
                n.attn.clone(),
            );
            tensors.insert(
                format!("rrt.loop_norms.{l}.post_attention_layernorm.weight"),
                n.mlp.clone(),
            );
        }
        recursive =
            serde_json::to_value(&r.meta).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
    }
    debug_assert_eq!(PROJECTIONS.len(), 7);
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).map_err(|e| ModelError::Safetensors {
        path: weights.clone(),
        message: e.to_string(),
    })?;
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": model.layers.len(),
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids,
        "torch_dtype": "float32",
    });
    if !recursive.is_null() {
        config["rrt_recursive"] = recursive;
    }
    write_json(&dir.join("config.json"), &config)?;
    tokenizer.save(dir)?;
    Ok(())
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}
