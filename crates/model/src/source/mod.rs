//! Where weights come from. A [`TensorSource`] hands out tensors by their Hugging Face name
//! (`model.layers.3.self_attn.q_proj.weight`), whatever the file format, so the weight loader
//! knows one naming scheme. Each implementation turns its format's problems into errors that
//! name the file and the tensor.

pub mod gguf;
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
