//! Per-loop LoRA: each unrolled layer adds its own low-rank delta `B_l A_l x` to every projection
//! of the shared layer it runs (`h = W'_k x + B_l A_l x`, scaling exactly 1, as the SVD
//! initialisation requires).

use candle_core::Tensor;

use crate::error::Result;
use crate::linear::Linear;

/// The projections a LoRA can relax, in checkpoint naming.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Whether projection `p` (an index into [`PROJECTIONS`]) belongs to attention (else the MLP).
pub fn is_attention(p: usize) -> bool {
    p < 4
}

/// The checkpoint path of projection `p` inside a layer (`self_attn.q_proj`, `mlp.up_proj`, ...).
pub fn projection_path(p: usize) -> String {
    let module = if is_attention(p) { "self_attn" } else { "mlp" };
    format!("{module}.{}", PROJECTIONS[p])
}

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

/// The LoRA deltas of one unrolled layer, indexed like [`PROJECTIONS`] (`None`: rank 0).
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

/// Applies a layer's LoRA for projection indices `projs` whose outputs sit side by side in `y`
/// (a fused projection): `x` holds the input rows of the group starting at `row0`.
pub(crate) fn add_fused(
    y: &mut [f32],
    y_width: usize,
    row0: usize,
    x: &[f32],
    rows: usize,
    lora: &LayerLora,
    projs: &[(usize, usize, usize)],
) -> Result<()> {
    for &(p, col, width) in projs {
        if let Some(l) = &lora.proj[p] {
            let d = l.delta(x, rows)?;
            add_columns(y, y_width, row0, col, &d, width);
        }
    }
    Ok(())
}
