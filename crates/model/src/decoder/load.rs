//! Building a [`Llama`] from a [`TensorSource`]: the plain layers, and for a converted model the
//! per-loop LoRA and norms its `rrt_recursive` config section announces.

use candle_core::{DType, Tensor};

use super::{LayerWeights, Llama};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::recursive::lora::{projection_path, LayerLora, ProjLora, PROJECTIONS};
use crate::recursive::mapping::check_shape;
use crate::recursive::{LoopNorms, Recursion, RecursiveMeta};
use crate::source::TensorSource;

/// `[out, in]` of projection `p` (see [`PROJECTIONS`]).
pub(crate) fn projection_shape(cfg: &ModelConfig, p: usize) -> [usize; 2] {
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    match p {
        0 => [cfg.q_dim(), h],
        1 | 2 => [cfg.kv_dim(), h],
        3 => [h, cfg.q_dim()],
        4 | 5 => [f, h],
        _ => [h, f],
    }
}

impl LayerWeights {
    /// Builds a layer from its 7 projections (in [`PROJECTIONS`] order) and two norms.
    pub fn from_projections(
        proj: &[Tensor; 7],
        attn_norm: Tensor,
        mlp_norm: Tensor,
    ) -> Result<Self> {
        Ok(Self {
            attn_norm,
            qkv: Linear::new(Tensor::cat(&[&proj[0], &proj[1], &proj[2]], 0)?)?,
            o: Linear::new(proj[3].clone())?,
            mlp_norm,
            gate_up: Linear::new(Tensor::cat(&[&proj[4], &proj[5]], 0)?)?,
            down: Linear::new(proj[6].clone())?,
        })
    }

    /// The 7 projection weights, unfused, in [`PROJECTIONS`] order.
    pub fn projections(&self, cfg: &ModelConfig) -> Result<[Tensor; 7]> {
        let (qd, kvd, f) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let qkv = self.qkv.weight()?;
        let gu = self.gate_up.weight()?;
        Ok([
            qkv.narrow(0, 0, qd)?,
            qkv.narrow(0, qd, kvd)?,
            qkv.narrow(0, qd + kvd, kvd)?,
            self.o.weight()?,
            gu.narrow(0, 0, f)?,
            gu.narrow(0, f, f)?,
            self.down.weight()?,
        ])
    }
}

impl Llama {
    /// Loads every tensor the config calls for, checking each shape. With `recursive`, `cfg`
    /// describes the K shared layers and the per-loop parts are loaded too.
    pub fn load(
        mut cfg: ModelConfig,
        src: &mut dyn TensorSource,
        dtype: DType,
        recursive: Option<RecursiveMeta>,
    ) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = src.load_shaped("model.embed_tokens.weight", &[v, h], dtype)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut proj = Vec::with_capacity(7);
            for (j, _) in PROJECTIONS.iter().enumerate() {
                let name = format!("{p}.{}.weight", projection_path(j));
                proj.push(src.load_shaped(&name, &projection_shape(&cfg, j), dtype)?);
            }
            let proj: [Tensor; 7] = proj
                .try_into()
                .map_err(|_| ModelError::InvalidInput("7 projections".into()))?;
            let attn_norm =
                src.load_shaped(&format!("{p}.input_layernorm.weight"), &[h], DType::F32)?;
            let mlp_norm = src.load_shaped(
                &format!("{p}.post_attention_layernorm.weight"),
                &[h],
                DType::F32,
            )?;
            layers.push(LayerWeights::from_projections(&proj, attn_norm, mlp_norm)?);
        }
        let norm = src.load_shaped("model.norm.weight", &[h], DType::F32)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            match src.load("lm_head.weight", dtype)? {
                Some(w) => {
                    crate::source::check_shape(src.path(), "lm_head.weight", &w, &[v, h])?;
                    w
                }
                None => {
                    return Err(ModelError::MissingTensor {
                        path: src.path().into(),
                        name: "lm_head.weight (config says tie_word_embeddings = false)".into(),
                    })
                }
            }
        };
        let recursion = match recursive {
            None => None,
            Some(meta) => {
                let r = load_recursion(&cfg, src, meta, dtype)?;
                cfg.num_layers = r.meta.source_layers;
                Some(r)
            }
        };
        Ok(Self::from_parts(
            cfg,
            embed,
            layers,
            norm,
            Linear::new(lm_head)?,
            recursion,
        ))
    }
}

fn load_recursion(
    cfg: &ModelConfig,
    src: &mut dyn TensorSource,
    meta: RecursiveMeta,
    dtype: DType,
) -> Result<Recursion> {
    let bad = |message: String| ModelError::config(src.path().join("config.json"), message);
    if meta.block_layers != cfg.num_layers {
        return Err(bad(format!(
            "field `rrt_recursive.block_layers` is {} but num_hidden_layers is {}",
            meta.block_layers, cfg.num_layers
        )));
    }
    let loops = check_shape(meta.source_layers, meta.block_layers)
        .map_err(|e| bad(format!("field `rrt_recursive`: {e}")))?;
    if loops != meta.loops {
        return Err(bad(format!(
            "field `rrt_recursive.loops` is {} but N / K is {loops}",
            meta.loops
        )));
    }
    let h = cfg.hidden_size;
    let mut lora = Vec::with_capacity(meta.source_layers);
    let mut loop_norms = Vec::new();
    for l in 0..meta.source_layers {
        let mut layer = LayerLora::default();
        for p in 0..PROJECTIONS.len() {
            let base = format!("rrt.lora.{l}.{}", projection_path(p));
            let a = src.load(&format!("{base}.lora_A.weight"), dtype)?;
            let b = src.load(&format!("{base}.lora_B.weight"), dtype)?;
            let [out, inp] = projection_shape(cfg, p);
            layer.proj[p] = match (a, b) {
                (None, None) => None,
                (Some(a), Some(b)) => {
                    let r = a.dim(0)?;
                    crate::source::check_shape(
                        src.path(),
                        &format!("{base}.lora_A.weight"),
                        &a,
                        &[r, inp],
                    )?;
                    crate::source::check_shape(
                        src.path(),
                        &format!("{base}.lora_B.weight"),
                        &b,
                        &[out, r],
                    )?;
                    Some(ProjLora::new(a, b)?)
                }
                _ => {
                    return Err(ModelError::MissingTensor {
                        path: src.path().into(),
                        name: format!("{base}.lora_A/lora_B (only one of the pair is present)"),
                    })
                }
            };
        }
        lora.push(layer);
        if meta.per_loop_norms {
            let p = format!("rrt.loop_norms.{l}");
            loop_norms.push(LoopNorms {
                attn: src.load_shaped(&format!("{p}.input_layernorm.weight"), &[h], DType::F32)?,
                mlp: src.load_shaped(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    DType::F32,
                )?,
            });
        }
    }
    Ok(Recursion {
        meta,
        lora,
        loop_norms,
    })
}
