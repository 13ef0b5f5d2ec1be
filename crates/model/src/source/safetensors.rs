//! Hugging Face `*.safetensors` files, memory-mapped. A directory may hold several shards; each
//! tensor is looked up in the shard that declares it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::TensorSource;
use crate::error::{ModelError, Result};

/// All `*.safetensors` files of a directory, memory-mapped.
pub struct SafetensorsSource {
    dir: PathBuf,
    files: Vec<(PathBuf, MmapedSafetensors)>,
    index: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Maps every `*.safetensors` file in `dir` and checks each header and size.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::config(
                dir,
                "no *.safetensors files in the directory",
            ));
        }
        Self::open_files(dir, &paths)
    }

    /// Maps the given files; `dir` names the model in errors about missing tensors.
    pub fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            // SAFETY: the file is mapped read-only; like every mmap user we assume nobody
            // truncates it while the model is loaded (the tensors are copied out at load).
            let st =
                unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    message: root_message(&e),
                })?;
            for (name, _) in st.tensors() {
                index.insert(name, files.len());
            }
            files.push((path.clone(), st));
        }
        Ok(Self {
            dir: dir.into(),
            files,
            index,
        })
    }
}

fn root_message(e: &candle_core::Error) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().to_string()
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn load(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let Some(&file) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, st) = &self.files[file];
        let view = st.get(name).map_err(|e| ModelError::Safetensors {
            path: path.clone(),
            message: root_message(&e),
        })?;
        use ::safetensors::Dtype as D;
        match view.dtype() {
            D::F32 | D::F16 | D::BF16 | D::F64 => {}
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: path.clone(),
                    name: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        }
        let tensor = st
            .load(name, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                message: format!("tensor `{name}`: {}", root_message(&e)),
            })?;
        Ok(Some(tensor))
    }
}
