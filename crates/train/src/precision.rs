//! The precision of the training's matrix products: f32 (the tested reference), or bf16
//! operands with f32 accumulation (mixed precision: the master weights, the optimizer state, the
//! norms, softmaxes and losses stay f32; only the products' inputs are rounded). Every large
//! product of a step goes through [`matmul`].

use rrt_model::kernels::gemm::{gemm, gemm_bf16, gemm_bf16_packed, MatMut, MatRef, PackedB};
use serde::{Deserialize, Serialize};

use crate::params::TrainModel;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("unknown precision {other:?} (f32 or bf16)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

/// `c = a b` (`accumulate`: `c += a b`) at `precision`.
pub fn matmul(precision: Precision, c: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    match precision {
        Precision::F32 => gemm(c, a, b, accumulate),
        Precision::Bf16 => gemm_bf16(c, a, b, accumulate),
    }
}

/// The LM head (`[vocab, hidden]`) packed as the right operand of the logits (`head^T`) and of
/// their input gradient (`head`): 28 M weights for SmolLM2, packed once instead of four times a
/// batch.
#[derive(Debug, Clone)]
pub struct PackedHead {
    pub transposed: PackedB,
    pub plain: PackedB,
}

/// The packed head when the products run at bf16 and the head is frozen (it is in every group
/// the trainer has: the embedding never trains), so packing it once stays right.
pub fn packed_head(model: &TrainModel) -> Option<&PackedHead> {
    let id = model.head();
    if model.precision != Precision::Bf16 || model.params.trainable(id) || !PackedB::fast() {
        return None;
    }
    Some(model.packed_head.get_or_init(|| {
        let (v, h) = (model.cfg.vocab_size, model.cfg.hidden_size);
        let w = model.params.get(id);
        PackedHead {
            transposed: PackedB::new(MatRef::new(w, v, h).t()),
            plain: PackedB::new(MatRef::new(w, v, h)),
        }
    }))
}

/// `c = a b` with `b` packed beforehand (bf16 only).
pub fn matmul_packed(c: MatMut<'_>, a: MatRef<'_>, b: &PackedB, accumulate: bool) {
    gemm_bf16_packed(c, a, b, accumulate)
}
