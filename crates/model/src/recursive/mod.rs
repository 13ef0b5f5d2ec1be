//! Recursive transformers: K shared layers looped N/K times, each unrolled layer with its own
//! LoRA delta (and, optionally, its own norms). [`mapping`] decides which original layers
//! initialise the shared ones, [`svd`] and [`convert`] build the relaxed model from a pretrained
//! one, [`save`] writes it as a loadable directory.

pub mod convert;
pub mod exit_heads;
pub mod lora;
pub mod mapping;
pub mod save;
pub mod svd;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use lora::{LayerLora, ProjLora};
pub use mapping::Init;

/// What a converted model records about its making (the `rrt_recursive` section of its config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecursiveMeta {
    /// The model it was converted from.
    pub source: String,
    /// Layers of the source (N, the unrolled depth).
    pub source_layers: usize,
    /// Shared layers (K).
    pub block_layers: usize,
    /// N / K.
    pub loops: usize,
    pub init: Init,
    pub seed: u64,
    pub lora_rank_attn: usize,
    pub lora_rank_mlp: usize,
    pub per_loop_norms: bool,
    /// For each shared layer, the source layers that initialised it.
    pub layer_mapping: Vec<Vec<usize>>,
}

/// The two RMSNorm weights of one unrolled layer (when norms are per loop).
#[derive(Debug, Clone)]
pub struct LoopNorms {
    pub attn: Tensor,
    pub mlp: Tensor,
}

/// The recursive part of a model: one LoRA (and optional norms) per unrolled layer.
#[derive(Debug, Clone)]
pub struct Recursion {
    pub meta: RecursiveMeta,
    /// Per unrolled layer (N entries).
    pub lora: Vec<LayerLora>,
    /// Per unrolled layer when `meta.per_loop_norms`, else empty.
    pub loop_norms: Vec<LoopNorms>,
}

impl Recursion {
    pub fn lora_params(&self) -> usize {
        self.lora.iter().map(LayerLora::params).sum()
    }

    pub fn loop_norm_params(&self) -> usize {
        self.loop_norms
            .iter()
            .map(|n| n.attn.elem_count() + n.mlp.elem_count())
            .sum()
    }
}
