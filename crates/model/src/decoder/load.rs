//! Building a [`Llama`] from a [`TensorSource`]: the plain layers, and for a converted model the
//! per-loop LoRA and norms its `rrt_recursive` config section announces.

use candle_core::{DType, Tensor};

use super::{LayerWeights, Llama};
use crate::config::ModelConfig;
use crate::dtype::WeightDtype;
use crate::error::{ModelError, Result};
use crate::kernels::q8::PackedQ8;
use crate::linear::Linear;
use crate::projection::{Fused, Projection};
use crate::recursive::lora::{LayerLora, ProjLora};
use crate::recursive::mapping::check_shape;
use crate::recursive::{LoopNorms, Recursion, RecursiveMeta};
use crate::source::{Q8Blocks, TensorSource};

impl LayerWeights {
    /// Builds a layer from its projections (indexed by [`Projection::index`]) and two norms.
    pub fn from_projections(
        proj: &[Tensor; 7],
        attn_norm: Tensor,
        mlp_norm: Tensor,
    ) -> Result<Self> {
        let fuse = |f: Fused| -> Result<Linear> {
            let parts: Vec<&Tensor> = f.parts().iter().map(|p| &proj[p.index()]).collect();
            Ok(Linear::new(Tensor::cat(&parts, 0)?)?)
        };
        Ok(Self {
            attn_norm,
            qkv: fuse(Fused::Qkv)?,
            o: fuse(Fused::O)?,
            mlp_norm,
            gate_up: fuse(Fused::GateUp)?,
            down: fuse(Fused::Down)?,
        })
    }

    /// The fused weight `f`.
    pub fn linear(&self, f: Fused) -> &Linear {
        match f {
            Fused::Qkv => &self.qkv,
            Fused::O => &self.o,
            Fused::GateUp => &self.gate_up,
            Fused::Down => &self.down,
        }
    }

    /// The projection weights, unfused, indexed by [`Projection::index`].
    pub fn projections(&self, cfg: &ModelConfig) -> Result<[Tensor; 7]> {
        // Fused weights list their parts in checkpoint order.
        let mut out = Vec::with_capacity(7);
        for f in Fused::ALL {
            let w = self.linear(f).weight()?;
            for p in f.parts() {
                out.push(w.narrow(0, p.fused_offset(cfg), p.shape(cfg)[0])?);
            }
        }
        out.try_into()
            .map_err(|_| ModelError::InvalidInput("7 projections".into()))
    }
}

impl Llama {
    /// Loads every tensor the config calls for, checking each shape, with the projections and
    /// the LM head held as `dtype` (per-loop LoRA and norms stay f32). With `recursive`, `cfg`
    /// describes the K shared layers and the per-loop parts are loaded too.
    pub fn load(
        mut cfg: ModelConfig,
        src: &mut dyn TensorSource,
        dtype: WeightDtype,
        recursive: Option<RecursiveMeta>,
    ) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let read = dtype.read_dtype();
        let embed = src.load_shaped("model.embed_tokens.weight", &[v, h], read)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let attn_norm =
                src.load_shaped(&format!("{p}.input_layernorm.weight"), &[h], DType::F32)?;
            let mlp_norm = src.load_shaped(
                &format!("{p}.post_attention_layernorm.weight"),
                &[h],
                DType::F32,
            )?;
            let mut fused = Vec::with_capacity(4);
            for f in Fused::ALL {
                fused.push(load_fused(src, &cfg, &p, f, dtype)?);
            }
            let [qkv, o, gate_up, down]: [Linear; 4] = fused
                .try_into()
                .map_err(|_| ModelError::InvalidInput("4 fused projections".into()))?;
            layers.push(LayerWeights {
                attn_norm,
                qkv,
                o,
                mlp_norm,
                gate_up,
                down,
            });
        }
        let norm = src.load_shaped("model.norm.weight", &[h], DType::F32)?;
        // int8 blocks as the file holds them (GGUF Q8_0), else the float tensor packed.
        let head_name = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let lm_head = match q8_blocks(src, head_name, &[v, h], dtype)? {
            Some(blocks) => q8_linear(blocks),
            None if cfg.tie_word_embeddings => Linear::with_dtype(embed.clone(), dtype)?,
            None => match src.load(head_name, read)? {
                Some(w) => {
                    crate::source::check_shape(src.path(), head_name, &w, &[v, h])?;
                    Linear::with_dtype(w, dtype)?
                }
                None => {
                    return Err(ModelError::MissingTensor {
                        path: src.path().into(),
                        name: "lm_head.weight (config says tie_word_embeddings = false)".into(),
                    })
                }
            },
        };
        let recursion = match recursive {
            None => None,
            Some(meta) => {
                let r = load_recursion(&cfg, src, meta)?;
                cfg.num_layers = r.meta.source_layers;
                Some(r)
            }
        };
        // The table is only gathered from: the compact formats keep it in bf16.
        let embed = embed.to_dtype(dtype.embed_dtype())?;
        Ok(Self::from_parts(
            cfg, embed, layers, norm, lm_head, recursion,
        ))
    }
}

/// A linear layer of int8 blocks taken as they are.
fn q8_linear(b: Q8Blocks) -> Linear {
    Linear::from_q8(PackedQ8::from_blocks(b.n, b.k, &b.scales, &b.q))
}

/// `name` as int8 blocks when `dtype` is q8 and the file holds it as such, its shape checked.
fn q8_blocks(
    src: &mut dyn TensorSource,
    name: &str,
    shape: &[usize],
    dtype: WeightDtype,
) -> Result<Option<Q8Blocks>> {
    if dtype != WeightDtype::Q8 {
        return Ok(None);
    }
    let Some(b) = src.load_q8_blocks(name)? else {
        return Ok(None);
    };
    if [b.n, b.k] != shape {
        return Err(ModelError::ShapeMismatch {
            path: src.path().into(),
            name: name.into(),
            expected: shape.to_vec(),
            actual: vec![b.n, b.k],
        });
    }
    Ok(Some(b))
}

/// Layer `prefix`'s fused weight `f` held as `dtype`: int8 blocks taken as they are when every
/// part is stored that way (GGUF Q8_0), else the float parts stacked and packed.
fn load_fused(
    src: &mut dyn TensorSource,
    cfg: &ModelConfig,
    prefix: &str,
    f: Fused,
    dtype: WeightDtype,
) -> Result<Linear> {
    let name = |p: &Projection| format!("{prefix}.{}.weight", p.path());
    let mut blocks = Vec::new();
    for p in f.parts() {
        match q8_blocks(src, &name(p), &p.shape(cfg), dtype)? {
            Some(b) => blocks.push(b),
            None => break,
        }
    }
    if blocks.len() == f.parts().len() {
        return Ok(q8_linear(Q8Blocks::concat(blocks)));
    }
    let mut parts = Vec::with_capacity(f.parts().len());
    for p in f.parts() {
        parts.push(src.load_shaped(&name(p), &p.shape(cfg), dtype.read_dtype())?);
    }
    Ok(Linear::with_dtype(Tensor::cat(&parts, 0)?, dtype)?)
}

/// The per-loop parts of a converted model, in f32 (small next to the shared weights).
fn load_recursion(
    cfg: &ModelConfig,
    src: &mut dyn TensorSource,
    meta: RecursiveMeta,
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
        for p in Projection::ALL {
            let base = format!("rrt.lora.{l}.{}", p.path());
            let a = src.load(&format!("{base}.lora_A.weight"), DType::F32)?;
            let b = src.load(&format!("{base}.lora_B.weight"), DType::F32)?;
            let [out, inp] = p.shape(cfg);
            layer.proj[p.index()] = match (a, b) {
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
