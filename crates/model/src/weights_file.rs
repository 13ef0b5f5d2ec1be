//! Writing a `.safetensors` file of a model directory. The safetensors crate writes through a
//! temporary file (atomic replace) and so leaves the file readable by its owner only (0600);
//! a model converted by one user (a Kubernetes Job, `make`) is served by another (the image's
//! uid 10001), so the file gets the mode `std::fs::write` would give it under the usual umask.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{ModelError, Result};

/// Writes `tensors` to `path` (replacing it atomically), readable by everyone (0644).
pub fn save(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| ModelError::io(path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(unix)]
    fn a_saved_file_is_readable_by_other_users() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        save(&HashMap::from([("t".to_string(), t)]), &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let back = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        assert_eq!(back["t"].dims(), &[2]);
    }
}
