//! The seven projections of a Llama layer, as one type: each knows its checkpoint name, its
//! shape, whether it belongs to attention or the MLP, and where it sits in the fused weights the
//! decoder runs (Q|K|V, O, gate|up, down). Loading, conversion, LoRA and saving all derive from
//! here instead of restating index tables.

use crate::config::ModelConfig;

/// One projection of a decoder layer, in checkpoint order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// A weight the decoder holds: one or more projections stacked along the output dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fused {
    Qkv,
    O,
    GateUp,
    Down,
}

impl Projection {
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// Position in [`Projection::ALL`] (and in per-projection arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    /// `q_proj`, `k_proj`, ...
    pub fn name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// Whether it belongs to attention (else the MLP).
    pub fn is_attention(self) -> bool {
        matches!(
            self,
            Projection::Q | Projection::K | Projection::V | Projection::O
        )
    }

    /// Its path inside a Hugging Face layer: `self_attn.q_proj`, `mlp.up_proj`, ...
    pub fn path(self) -> String {
        let module = if self.is_attention() {
            "self_attn"
        } else {
            "mlp"
        };
        format!("{module}.{}", self.name())
    }

    /// Its tensor name inside a GGUF block: `attn_q`, `ffn_up`, ...
    pub fn gguf_name(self) -> &'static str {
        match self {
            Projection::Q => "attn_q",
            Projection::K => "attn_k",
            Projection::V => "attn_v",
            Projection::O => "attn_output",
            Projection::Gate => "ffn_gate",
            Projection::Up => "ffn_up",
            Projection::Down => "ffn_down",
        }
    }

    /// `[out, in]`.
    pub fn shape(self, cfg: &ModelConfig) -> [usize; 2] {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        match self {
            Projection::Q => [cfg.q_dim(), h],
            Projection::K | Projection::V => [cfg.kv_dim(), h],
            Projection::O => [h, cfg.q_dim()],
            Projection::Gate | Projection::Up => [f, h],
            Projection::Down => [h, f],
        }
    }

    /// The fused weight it is part of.
    pub fn fused(self) -> Fused {
        match self {
            Projection::Q | Projection::K | Projection::V => Fused::Qkv,
            Projection::O => Fused::O,
            Projection::Gate | Projection::Up => Fused::GateUp,
            Projection::Down => Fused::Down,
        }
    }

    /// Its first output column in the fused weight.
    pub fn fused_offset(self, cfg: &ModelConfig) -> usize {
        self.fused()
            .parts()
            .iter()
            .take_while(|&&p| p != self)
            .map(|p| p.shape(cfg)[0])
            .sum()
    }
}

impl Fused {
    pub const ALL: [Fused; 4] = [Fused::Qkv, Fused::O, Fused::GateUp, Fused::Down];

    /// Output columns: its projections' outputs side by side.
    pub fn out_dim(self, cfg: &ModelConfig) -> usize {
        self.parts().iter().map(|p| p.shape(cfg)[0]).sum()
    }

    /// Input features (all its projections read the same input).
    pub fn in_dim(self, cfg: &ModelConfig) -> usize {
        self.parts()[0].shape(cfg)[1]
    }

    /// Its projections, in the order their outputs are stacked.
    pub fn parts(self) -> &'static [Projection] {
        match self {
            Fused::Qkv => &[Projection::Q, Projection::K, Projection::V],
            Fused::O => &[Projection::O],
            Fused::GateUp => &[Projection::Gate, Projection::Up],
            Fused::Down => &[Projection::Down],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_shapes_and_fused_columns() {
        let cfg = ModelConfig {
            hidden_size: 8,
            intermediate_size: 20,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 2,
            vocab_size: 10,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            max_position_embeddings: 16,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        assert_eq!(
            Projection::ALL.map(Projection::index),
            [0, 1, 2, 3, 4, 5, 6]
        );
        assert_eq!(Projection::Up.path(), "mlp.up_proj");
        assert_eq!(Projection::O.path(), "self_attn.o_proj");
        assert_eq!(Projection::V.shape(&cfg), [4, 8]);
        assert_eq!(Projection::Down.shape(&cfg), [8, 20]);
        let offsets = Projection::ALL.map(|p| p.fused_offset(&cfg));
        assert_eq!(offsets, [0, 8, 12, 0, 0, 20, 0]);
        assert_eq!(Fused::ALL.map(|f| f.out_dim(&cfg)), [16, 8, 40, 8]);
        assert_eq!(Fused::ALL.map(|f| f.in_dim(&cfg)), [8, 8, 8, 20]);
        // Every projection is in exactly one fused weight, in checkpoint order.
        let flat: Vec<Projection> = Fused::ALL
            .iter()
            .flat_map(|f| f.parts().iter().copied())
            .collect();
        assert_eq!(flat, Projection::ALL);
    }
}
