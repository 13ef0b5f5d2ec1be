//! Writing a (recursive) model as a directory every rrt command loads: `config.json` (Hugging
//! Face Llama fields with `num_hidden_layers` = K, plus the `rrt_recursive` section),
//! `model.safetensors` (shared layers under the usual names, `rrt.lora.{l}.*` and
//! `rrt.loop_norms.{l}.*` per unrolled layer), `tokenizer.json` and `tokenizer_config.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::config::HfLlamaConfig;
use crate::decoder::Llama;
use crate::error::{ModelError, Result};
use crate::projection::Projection;
use crate::tokenizer::Tokenizer;

/// Writes `model` and `tokenizer` into `dir` (created if missing; files replaced).
pub fn save(model: &Llama, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let weights = dir.join("model.safetensors");
    crate::weights_file::save(&tensors(model)?, &weights)?;
    let mut config = HfLlamaConfig::from_model(&model.cfg, model.layers.len());
    if let Some(r) = &model.recursion {
        config.rrt_recursive = Some(
            serde_json::to_value(&r.meta).map_err(|e| ModelError::InvalidInput(e.to_string()))?,
        );
    }
    crate::json::write(&dir.join("config.json"), &config)?;
    tokenizer.save(dir)
}

/// Every tensor of the model by its checkpoint name.
fn tensors(model: &Llama) -> Result<HashMap<String, Tensor>> {
    let cfg = &model.cfg;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("model.embed_tokens.weight".into(), model.embed.clone());
    tensors.insert("model.norm.weight".into(), model.norm.clone());
    if !cfg.tie_word_embeddings {
        tensors.insert("lm_head.weight".into(), model.lm_head.weight()?);
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (proj, t) in Projection::ALL.iter().zip(layer.projections(cfg)?) {
            tensors.insert(format!("{p}.{}.weight", proj.path()), t.contiguous()?);
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
    let Some(r) = &model.recursion else {
        return Ok(tensors);
    };
    for (l, lora) in r.lora.iter().enumerate() {
        for p in Projection::ALL {
            if let Some(proj) = lora.get(p) {
                let base = format!("rrt.lora.{l}.{}", p.path());
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
    Ok(tensors)
}
