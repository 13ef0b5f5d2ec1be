//! Where weights come from. A [`TensorSource`] hands out tensors by their Hugging Face name
//! (`model.layers.3.self_attn.q_proj.weight`), whatever the file format, so the weight loader
//! knows one naming scheme. Each implementation turns its format's problems into errors that
//! name the file and the tensor.

pub mod gguf;
pub mod gguf_types;
pub mod safetensors;

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};

/// A file (or directory) of named tensors.
pub trait TensorSource {
    /// The file or directory errors should name.
    fn path(&self) -> &Path;

    /// Loads the tensor called `name` (Hugging Face naming) as `dtype`, or `None` if absent.
    fn load(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>>;

    /// The tensor `name` as int8 blocks, when the file holds it quantized that way (GGUF Q8_0):
    /// `None` otherwise, and the caller quantizes the float tensor. Rows are in Hugging Face
    /// order.
    fn load_q8_blocks(&mut self, _name: &str) -> Result<Option<Q8Blocks>> {
        Ok(None)
    }

    /// Loads a tensor that must exist with exactly `shape`.
    fn load_shaped(&mut self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let tensor = self
            .load(name, dtype)?
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path().into(),
                name: name.into(),
            })?;
        check_shape(self.path(), name, &tensor, shape)?;
        Ok(tensor)
    }
}

/// A `[n, k]` weight as symmetric int8 blocks of 32 along k: `scales` is `[n, k / 32]`, `q` is
/// `[n, k / 32, 32]` (what [`crate::kernels::q8::PackedQ8::from_blocks`] packs).
#[derive(Debug, Clone)]
pub struct Q8Blocks {
    pub n: usize,
    pub k: usize,
    pub scales: Vec<f32>,
    pub q: Vec<i8>,
}

impl Q8Blocks {
    /// The rows of several weights stacked (a fused projection); all have the same k.
    pub fn concat(parts: Vec<Q8Blocks>) -> Q8Blocks {
        let k = parts.first().map_or(0, |p| p.k);
        let mut out = Q8Blocks {
            n: 0,
            k,
            scales: Vec::new(),
            q: Vec::new(),
        };
        for p in parts {
            assert_eq!(p.k, k, "stacked weights differ in k");
            out.n += p.n;
            out.scales.extend(p.scales);
            out.q.extend(p.q);
        }
        out
    }
}

pub(crate) fn check_shape(path: &Path, name: &str, tensor: &Tensor, shape: &[usize]) -> Result<()> {
    if tensor.dims() != shape {
        return Err(ModelError::ShapeMismatch {
            path: path.into(),
            name: name.into(),
            expected: shape.to_vec(),
            actual: tensor.dims().to_vec(),
        });
    }
    Ok(())
}
