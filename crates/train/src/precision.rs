//! The precision of the training's matrix products: f32 (the tested reference), or bf16
//! operands with f32 accumulation (mixed precision: the master weights, the optimizer state, the
//! norms, softmaxes and losses stay f32; only the products' inputs are rounded). Every large
//! product of a step goes through [`matmul`].

use rrt_model::kernels::gemm::{
    gemm, gemm_bf16, gemm_bf16_packed, gemm_bf16_pp, MatMut, MatRef, PackedA, PackedB,
};
use serde::{Deserialize, Serialize};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::params::{Id, TrainModel};

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

/// Shared weights packed for bf16 products, each packed once per optimizer step however many
/// loops and micro-batches use it (a 15 x 2 model uses each shared weight twice a batch, forward
/// and backward). [`PackCache::clear`] after the weights change.
#[derive(Debug, Default)]
pub struct PackCache(Mutex<HashMap<(Id, bool), Arc<PackedB>>>);

impl Clone for PackCache {
    /// A clone starts empty (its weights may change apart from the original's).
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PackCache {
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn get(&self, key: (Id, bool), pack: impl FnOnce() -> PackedB) -> Arc<PackedB> {
        if let Some(p) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return p.clone();
        }
        let packed = Arc::new(pack());
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, packed.clone());
        packed
    }
}

/// An activation several products read on the same side (a projection's input: the shared
/// weight's product and each LoRA part's), rounded and packed once at bf16.
pub struct Operand<'a> {
    pub view: MatRef<'a>,
    left: Option<PackedA>,
    right: Option<PackedB>,
}

impl<'a> Operand<'a> {
    fn packs(model: &TrainModel) -> bool {
        model.precision == Precision::Bf16 && PackedB::fast()
    }

    /// `view` as the left operand of the products to come.
    pub fn left(model: &TrainModel, view: MatRef<'a>) -> Self {
        Self {
            view,
            left: Self::packs(model).then(|| PackedA::new(view)),
            right: None,
        }
    }

    /// `view` as the right operand of the products to come.
    pub fn right(model: &TrainModel, view: MatRef<'a>) -> Self {
        Self {
            view,
            left: None,
            right: Self::packs(model).then(|| PackedB::new(view)),
        }
    }
}

/// `c = a b` (`accumulate`: `c += a b`) at the model's precision, `a` packed once.
pub fn matmul_left(
    model: &TrainModel,
    c: MatMut<'_>,
    a: &Operand<'_>,
    b: MatRef<'_>,
    accumulate: bool,
) {
    match &a.left {
        Some(pa) => gemm_bf16_pp(c, pa, &PackedB::new(b), accumulate),
        None => matmul(model.precision, c, a.view, b, accumulate),
    }
}

/// `c = a b` (`accumulate`: `c += a b`) at the model's precision, `b` packed once.
pub fn matmul_right(
    model: &TrainModel,
    c: MatMut<'_>,
    a: MatRef<'_>,
    b: &Operand<'_>,
    accumulate: bool,
) {
    match &b.right {
        Some(pb) => gemm_bf16_packed(c, a, pb, accumulate),
        None => matmul(model.precision, c, a, b.view, accumulate),
    }
}

/// `c = a W^T` (`transposed`) or `c = a W` for the weight `id` (`[rows, cols]` = `shape`), at the
/// model's precision; at bf16 the packed weight is reused until the cache is cleared.
pub fn weight_product(
    model: &TrainModel,
    c: MatMut<'_>,
    a: &Operand<'_>,
    id: Id,
    shape: (usize, usize),
    transposed: bool,
) {
    let w = MatRef::new(model.params.get(id), shape.0, shape.1);
    let b = if transposed { w.t() } else { w };
    if model.precision == Precision::Bf16 && PackedB::fast() {
        let packed = model.packs.get((id, transposed), || PackedB::new(b));
        return match &a.left {
            Some(pa) => gemm_bf16_pp(c, pa, &packed, false),
            None => gemm_bf16_packed(c, a.view, &packed, false),
        };
    }
    matmul(model.precision, c, a.view, b, false)
}
