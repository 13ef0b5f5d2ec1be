//! Reading and writing the JSON files of a model directory (`config.json`,
//! `tokenizer_config.json`), with errors that name the file. A leaf: it knows no model types.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ModelError, Result};

/// Writes `value` as pretty-printed JSON, replacing `path`.
pub fn write(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| ModelError::config(path, format!("cannot serialise: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}

/// Reads `path` as `T`; errors name the file, `what` it should be, and what is wrong (serde
/// names the field and position).
pub fn read<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::config(path, format!("invalid {what}: {e}")))
}
