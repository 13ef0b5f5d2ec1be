//! A bias-free linear layer. Weights are packed once at load and run by rrt's own kernels: f32
//! ([`PackedWeight`], [`matmul`]: beats candle's gemm at every batch size a server sees, `rrt
//! bench matmul` measures both), bf16 ([`PackedBf16`]) and int8 blocks ([`PackedQ8`]); f16 keeps
//! a candle tensor in `[out, in]` layout.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::dtype::WeightDtype;
use crate::kernels::bf16::{matmul_bf16, PackedBf16};
use crate::kernels::q8::{matmul_q8, PackedQ8};
use crate::kernels::{matmul, PackedWeight};

#[derive(Debug, Clone)]
enum Storage {
    Packed(Arc<PackedWeight>),
    Bf16(Arc<PackedBf16>),
    Q8(Arc<PackedQ8>),
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

    /// `weight` (`[out, in]`, any float dtype) held as `dtype`: packed f32, bf16 or int8
    /// blocks, or an f16 tensor.
    pub fn with_dtype(weight: Tensor, dtype: WeightDtype) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let f32s = || -> candle_core::Result<Vec<f32>> {
            weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        let storage = match dtype {
            WeightDtype::F32 => {
                Storage::Packed(Arc::new(PackedWeight::pack(&f32s()?, out_dim, in_dim)))
            }
            WeightDtype::F16 => Storage::Tensor(weight.to_dtype(DType::F16)?.contiguous()?),
            WeightDtype::Bf16 => {
                Storage::Bf16(Arc::new(PackedBf16::pack(&f32s()?, out_dim, in_dim)))
            }
            WeightDtype::Q8 => Storage::Q8(Arc::new(PackedQ8::quantize(&f32s()?, out_dim, in_dim))),
        };
        Ok(Self {
            storage,
            out_dim,
            in_dim,
        })
    }

    /// An int8 weight from blocks already quantized (a GGUF Q8_0 tensor, as it is).
    pub fn from_q8(packed: PackedQ8) -> Self {
        Self {
            out_dim: packed.n(),
            in_dim: packed.k(),
            storage: Storage::Q8(Arc::new(packed)),
        }
    }

    /// How the weight is held.
    pub fn dtype(&self) -> WeightDtype {
        match &self.storage {
            Storage::Packed(_) => WeightDtype::F32,
            Storage::Bf16(_) => WeightDtype::Bf16,
            Storage::Q8(_) => WeightDtype::Q8,
            Storage::Tensor(_) => WeightDtype::F16,
        }
    }

    /// The weight as a `[out, in]` f32 tensor (rebuilt from the packed form: exactly the values
    /// the kernels multiply).
    pub fn weight(&self) -> candle_core::Result<Tensor> {
        let dev = &candle_core::Device::Cpu;
        let shape = (self.out_dim, self.in_dim);
        match &self.storage {
            Storage::Tensor(t) => Ok(t.clone()),
            Storage::Packed(p) => Tensor::from_vec(p.unpack(), shape, dev),
            Storage::Bf16(p) => Tensor::from_vec(p.unpack(), shape, dev),
            Storage::Q8(p) => Tensor::from_vec(p.dequantize(), shape, dev),
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
            Storage::Bf16(p) => p.bytes(),
            Storage::Q8(p) => p.bytes(),
            Storage::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// `x` (`[rows, in]`, row-major) -> `[rows, out]`.
    pub fn forward_slice(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        match &self.storage {
            Storage::Packed(p) => Ok(matmul(x, rows, p)),
            Storage::Bf16(p) => Ok(matmul_bf16(x, rows, p)),
            Storage::Q8(p) => Ok(matmul_q8(x, rows, p)),
            Storage::Tensor(_) => {
                let t = Tensor::from_slice(x, (rows, self.in_dim), &candle_core::Device::Cpu)?;
                self.forward(&t)?.flatten_all()?.to_vec1::<f32>()
            }
        }
    }

    /// `x [rows, in]` (f32) -> `[rows, out]` (f32).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.storage {
            Storage::Packed(_) | Storage::Bf16(_) | Storage::Q8(_) => {
                let rows = x.dim(0)?;
                let y = with_f32_slice(x, |xs| self.forward_slice(xs, rows))??;
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
