//! Per-loop LoRA: each unrolled layer adds its own low-rank delta `B_l A_l x` to every projection
//! of the shared layer it runs (`h = W'_k x + B_l A_l x`, scaling exactly 1, as the SVD
//! initialisation requires).

use candle_core::Tensor;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::linear::Linear;
use crate::projection::{Fused, Projection};

/// One projection's low-rank delta: `A` is `[rank, in]`, `B` is `[out, rank]`.
#[derive(Debug, Clone)]
pub struct ProjLora {
    pub a: Linear,
    pub b: Linear,
}

impl ProjLora {
    pub fn new(a: Tensor, b: Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            a: Linear::new(a)?,
            b: Linear::new(b)?,
        })
    }

    pub fn rank(&self) -> usize {
        self.a.out_dim()
    }

    pub fn params(&self) -> usize {
        self.rank() * (self.a.in_dim() + self.b.out_dim())
    }

    /// `B (A x)` for `rows` rows of `x` (`[rows, in]`): `[rows, out]`.
    pub fn delta(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let t = self.a.forward_slice(x, rows)?;
        self.b.forward_slice(&t, rows)
    }
}

/// The LoRA deltas of one unrolled layer, indexed by [`Projection::index`] (`None`: rank 0).
#[derive(Debug, Clone, Default)]
pub struct LayerLora {
    pub proj: [Option<ProjLora>; 7],
}

impl LayerLora {
    pub fn params(&self) -> usize {
        self.proj.iter().flatten().map(ProjLora::params).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.proj.iter().all(Option::is_none)
    }

    pub fn get(&self, p: Projection) -> Option<&ProjLora> {
        self.proj[p.index()].as_ref()
    }
}

/// Adds `delta` (`[rows, width]`) into columns `col..col + width` of `y` (`[.., y_width]`),
/// starting at row `row0` of `y`.
pub(crate) fn add_columns(
    y: &mut [f32],
    y_width: usize,
    row0: usize,
    col: usize,
    delta: &[f32],
    width: usize,
) {
    for (r, d) in delta.chunks_exact(width).enumerate() {
        let start = (row0 + r) * y_width + col;
        for (o, v) in y[start..start + width].iter_mut().zip(d) {
            *o += v;
        }
    }
}

/// Adds a layer's LoRA deltas of the projections fused into `f` to `y` (the fused output,
/// `[.., f.out_dim()]`): `x` holds the input rows of a group starting at row `row0` of `y`.
pub(crate) fn add_fused(
    y: &mut [f32],
    row0: usize,
    x: &[f32],
    lora: &LayerLora,
    f: Fused,
    cfg: &ModelConfig,
) -> Result<()> {
    let (y_width, rows) = (f.out_dim(cfg), x.len() / f.in_dim(cfg).max(1));
    for &p in f.parts() {
        if let Some(l) = lora.get(p) {
            let d = l.delta(x, rows)?;
            add_columns(y, y_width, row0, p.fused_offset(cfg), &d, p.shape(cfg)[0]);
        }
    }
    Ok(())
}
