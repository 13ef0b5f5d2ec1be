//! The Llama-family decoder: embeddings, pre-norm layers (RMSNorm, RoPE grouped-query attention,
//! SwiGLU MLP), final norm and LM head.
//!
//! The forward works on a *flattened batch*: the new tokens of several independent sequences,
//! each with its own position and [`SeqCache`], are stacked into one `[rows, hidden]` matrix so
//! every projection is one matmul for all of them; only attention is per sequence. The layer-level
//! pieces ([`Llama::embed`], [`Llama::layer_forward`], [`Llama::logits`]) are public because the
//! depth-wise engine schedules rows of different sequences *and different loop depths* through
//! the layers itself.

use candle_core::{DType, Device, Tensor};

use crate::attention::{attention, AttnDims, AttnSegment};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kernels::swiglu;
use crate::kv_cache::SeqCache;
use crate::linear::{with_f32_slice, Linear};
use crate::rope::Rope;
use crate::source::TensorSource;

/// Weights of one decoder layer. Q, K, V are fused into one projection, gate and up into another.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub qkv: Linear,
    pub o: Linear,
    pub mlp_norm: Tensor,
    pub gate_up: Linear,
    pub down: Linear,
}

/// Which logits a batch item wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (e.g. a prefill chunk that is not the last).
    None,
    /// The last new token's (generation).
    Last,
    /// Every new token's (scoring, perplexity).
    All,
}

/// One sequence's part of a batch: its new tokens, where they start, and its cache.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; the cache is cut back to this length (so a caller can roll back).
    pub offset: usize,
    pub cache: &'a mut SeqCache,
    pub logits: Logits,
}

/// A loaded Llama-family model.
#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    pub lm_head: Linear,
    pub rope: Rope,
}

impl Llama {
    /// Loads every tensor the config calls for, checking each shape.
    pub fn load(cfg: ModelConfig, src: &mut dyn TensorSource, dtype: DType) -> Result<Self> {
        let (h, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let embed = src.load_shaped("model.embed_tokens.weight", &[v, h], dtype)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut get = |name: &str, shape: &[usize], dt: DType| {
                src.load_shaped(&format!("{p}.{name}"), shape, dt)
            };
            let attn_norm = get("input_layernorm.weight", &[h], DType::F32)?;
            let q = get("self_attn.q_proj.weight", &[qd, h], dtype)?;
            let k = get("self_attn.k_proj.weight", &[kvd, h], dtype)?;
            let vw = get("self_attn.v_proj.weight", &[kvd, h], dtype)?;
            let o = get("self_attn.o_proj.weight", &[h, qd], dtype)?;
            let mlp_norm = get("post_attention_layernorm.weight", &[h], DType::F32)?;
            let gate = get("mlp.gate_proj.weight", &[f, h], dtype)?;
            let up = get("mlp.up_proj.weight", &[f, h], dtype)?;
            let down = get("mlp.down_proj.weight", &[h, f], dtype)?;
            layers.push(LayerWeights {
                attn_norm,
                qkv: Linear::new(Tensor::cat(&[&q, &k, &vw], 0)?)?,
                o: Linear::new(o)?,
                mlp_norm,
                gate_up: Linear::new(Tensor::cat(&[&gate, &up], 0)?)?,
                down: Linear::new(down)?,
            });
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
        Ok(Self::from_parts(
            cfg,
            embed,
            layers,
            norm,
            Linear::new(lm_head)?,
        ))
    }

    pub fn from_parts(
        cfg: ModelConfig,
        embed: Tensor,
        layers: Vec<LayerWeights>,
        norm: Tensor,
        lm_head: Linear,
    ) -> Self {
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings);
        Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        }
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.layers.len(), self.cfg.kv_dim())
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    fn dims(&self) -> AttnDims {
        AttnDims {
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Embeddings of `tokens`, `[rows, hidden]` f32.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let vocab = self.cfg.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let ids = Tensor::new(tokens, self.device())?;
        Ok(self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?)
    }

    /// One decoder layer over a flattened batch `x [rows, hidden]`; `segments` say which rows
    /// belong to which sequence and hold that sequence's cache for this layer.
    pub fn layer_forward(
        &self,
        layer: &LayerWeights,
        x: &Tensor,
        segments: &mut [AttnSegment<'_>],
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        let rows = x.dim(0)?;
        let h = candle_nn::ops::rms_norm(x, &layer.attn_norm, eps)?;
        let qkv = layer.qkv.forward(&h)?;
        let mut qkv = qkv.flatten_all()?.to_vec1::<f32>()?;
        let attn = attention(&mut qkv, segments, self.dims(), &self.rope);
        let attn = Tensor::from_vec(attn, (rows, self.cfg.q_dim()), x.device())?;
        let x = (x + layer.o.forward(&attn)?)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, eps)?;
        let gu = layer.gate_up.forward(&h)?;
        let f = self.cfg.intermediate_size;
        let act = with_f32_slice(&gu, |gu| swiglu(gu, f))?;
        let act = Tensor::from_vec(act, (rows, f), x.device())?;
        Ok((x + layer.down.forward(&act)?)?)
    }

    /// Final norm and LM head over hidden states `[rows, hidden]` -> logits `[rows, vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = candle_nn::ops::rms_norm(hidden, &self.norm, self.cfg.rms_norm_eps as f32)?;
        Ok(self.lm_head.forward(&h)?)
    }

    /// Checks a batch before any cache is touched.
    fn validate(&self, items: &[BatchItem<'_>]) -> Result<()> {
        for (i, item) in items.iter().enumerate() {
            if item.tokens.is_empty() {
                return Err(ModelError::InvalidInput(format!(
                    "batch item {i} has no tokens"
                )));
            }
            if item.offset > item.cache.len() {
                return Err(ModelError::InvalidInput(format!(
                    "batch item {i} starts at position {} but its cache holds only {}",
                    item.offset,
                    item.cache.len()
                )));
            }
            let end = item.offset + item.tokens.len();
            if end > self.rope.max_positions() {
                return Err(ModelError::InvalidInput(format!(
                    "batch item {i} reaches position {end}, beyond the context of {}",
                    self.rope.max_positions()
                )));
            }
        }
        Ok(())
    }

    /// Runs the batch through every layer and returns the requested logits, stacked in item
    /// order (`Last` gives one row, `All` one row per new token, `None` none).
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Tensor> {
        self.validate(items)?;
        let tokens: Vec<u32> = items
            .iter()
            .flat_map(|it| it.tokens.iter().copied())
            .collect();
        let mut x = self.embed(&tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut row = 0;
            let mut segments: Vec<AttnSegment<'_>> = items
                .iter_mut()
                .map(|it| {
                    let seg = AttnSegment {
                        rows: row..row + it.tokens.len(),
                        start: it.offset,
                        cache: &mut it.cache.layers[l],
                    };
                    row += it.tokens.len();
                    seg
                })
                .collect();
            x = self.layer_forward(layer, &x, &mut segments)?;
        }
        let mut keep = Vec::new();
        let mut row = 0u32;
        for it in items.iter() {
            let n = it.tokens.len() as u32;
            match it.logits {
                Logits::None => {}
                Logits::Last => keep.push(row + n - 1),
                Logits::All => keep.extend(row..row + n),
            }
            row += n;
        }
        if keep.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.cfg.vocab_size),
                DType::F32,
                self.device(),
            )?);
        }
        let keep = Tensor::new(keep.as_slice(), self.device())?;
        self.logits(&x.index_select(&keep, 0)?)
    }

    /// Non-embedding parameter count (the paper's convention).
    pub fn non_embedding_params(&self) -> usize {
        self.cfg.num_layers * self.cfg.layer_params() + self.cfg.hidden_size
    }
}
