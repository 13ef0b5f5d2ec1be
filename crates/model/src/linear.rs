//! A bias-free linear layer with weights in `[out, in]` layout (the fast layout for candle's gemm
//! on this CPU). Inputs up to [`matmul_nt_max_rows`] rows take rrt's own [`matmul_nt`] kernel;
//! larger ones use candle.

use candle_core::{DType, Tensor};

use crate::kernels::{matmul_nt, matmul_nt_max_rows};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    /// `weight` is `[out, in]`; it is made contiguous once here.
    pub fn new(weight: Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            weight: weight.contiguous()?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// `x [rows, in]` (f32) -> `[rows, out]` (f32).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        if rows <= matmul_nt_max_rows()
            && self.weight.dtype() == DType::F32
            && x.dtype() == DType::F32
        {
            return self.forward_nt(x);
        }
        self.forward_gemm(x)
    }

    /// candle's gemm: the reference path, and the fast one for many rows.
    pub fn forward_gemm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.weight.dtype() == x.dtype() {
            x.matmul(&self.weight.t()?)
        } else {
            x.to_dtype(self.weight.dtype())?
                .matmul(&self.weight.t()?)?
                .to_dtype(x.dtype())
        }
    }

    fn forward_nt(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, k) = x.dims2()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let n = self.out_dim();
        let (storage, layout) = self.weight.storage_and_layout();
        let out = match &*storage {
            candle_core::Storage::Cpu(cpu) => {
                let w = cpu.as_slice::<f32>()?;
                let w = &w[layout.start_offset()..layout.start_offset() + n * k];
                matmul_nt(&xs, rows, k, w, n)
            }
            _ => {
                drop(storage);
                return self.forward_gemm(x);
            }
        };
        Tensor::from_vec(out, (rows, n), x.device())
    }
}
