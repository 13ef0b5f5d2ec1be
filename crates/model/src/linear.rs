//! A bias-free linear layer. f32 weights are packed once at load ([`PackedWeight`]) and run by
//! rrt's own [`matmul`] kernel, which beats candle's gemm at every batch size a server sees (`rrt
//! bench matmul` measures both); other dtypes keep a candle tensor in `[out, in]` layout.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::kernels::{matmul, PackedWeight};

#[derive(Debug, Clone)]
enum Storage {
    Packed(Arc<PackedWeight>),
    Tensor(Tensor),
}

#[derive(Debug, Clone)]
pub struct Linear {
    storage: Storage,
    out_dim: usize,
    in_dim: usize,
}

impl Linear {
    /// `weight` is `[out, in]`.
    pub fn new(weight: Tensor) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let storage = if weight.dtype() == DType::F32 {
            let w = weight.flatten_all()?.to_vec1::<f32>()?;
            Storage::Packed(Arc::new(PackedWeight::pack(&w, out_dim, in_dim)))
        } else {
            Storage::Tensor(weight.contiguous()?)
        };
        Ok(Self {
            storage,
            out_dim,
            in_dim,
        })
    }

    /// The weight as a `[out, in]` tensor (rebuilt from the packed form when needed).
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        match &self.storage {
            Storage::Tensor(t) => Ok(t.clone()),
            Storage::Packed(p) => Tensor::from_vec(
                p.unpack(),
                (self.out_dim, self.in_dim),
                &candle_core::Device::Cpu,
            ),
        }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes the weight occupies in memory.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::Packed(p) => p.bytes(),
            Storage::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// `x` (`[rows, in]`, row-major) -> `[rows, out]`.
    pub fn forward_slice(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        match &self.storage {
            Storage::Packed(p) => Ok(matmul(x, rows, p)),
            Storage::Tensor(_) => {
                let t = Tensor::from_slice(x, (rows, self.in_dim), &candle_core::Device::Cpu)?;
                self.forward(&t)?.flatten_all()?.to_vec1::<f32>()
            }
        }
    }

    /// `x [rows, in]` (f32) -> `[rows, out]` (f32).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.storage {
            Storage::Packed(p) => {
                let rows = x.dim(0)?;
                let y = with_f32_slice(x, |xs| matmul(xs, rows, p))?;
                Tensor::from_vec(y, (rows, self.out_dim), x.device())
            }
            Storage::Tensor(w) => x.to_dtype(w.dtype())?.matmul(&w.t()?)?.to_dtype(DType::F32),
        }
    }
}

/// Calls `f` on the f32 data of `x`, borrowed in place when `x` is a contiguous f32 CPU tensor
/// (the usual case: activations), copied otherwise.
pub fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    if x.dtype() == DType::F32 && x.is_contiguous() {
        let (storage, layout) = x.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let data = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            return Ok(f(&data[start..start + x.elem_count()]));
        }
    }
    let copy = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&copy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn packed_and_f16_paths_match_candle_matmul() {
        let w = Tensor::randn(0f32, 1.0, (37, 29), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 29), &Device::Cpu).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let got = Linear::new(w.clone()).unwrap().forward(&x).unwrap();
        let diff = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "packed: {diff}");
        let half = Linear::new(w.to_dtype(DType::F16).unwrap()).unwrap();
        let got = half.forward(&x).unwrap();
        let diff = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 0.1, "f16: {diff}");
        assert_eq!(
            Linear::new(w.clone())
                .unwrap()
                .weight()
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
    }
}
