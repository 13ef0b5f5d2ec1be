//! Checkpoints: the trainable tensors, the optimizer's moments and the run's position, written
//! into a fresh directory and swapped in by renames, so an interrupted or failed write (a full
//! disk) leaves the previous checkpoint whole. Resuming restores all of it; the data order is a
//! function of the seed and the epoch, so the position is enough to continue exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::params::Params;

/// Where a run stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// Micro-batches of the epoch's order consumed.
    pub offset: usize,
    /// Training tokens seen.
    pub tokens: u64,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    position: Position,
    adam_step: u64,
    /// The run's settings, to refuse resuming a different run.
    settings: serde_json::Value,
}

/// The checkpoint directory of a run's output directory.
pub fn dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// Where checkpoint files are written: the disk, or in tests a disk that fills up.
pub trait Storage {
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()>;
}

/// The real file system.
pub struct Disk;

impl Storage for Disk {
    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::write(path, bytes)
    }
}

/// Writes a checkpoint of `params` (trainable tensors), `opt` and `position` under `out`,
/// through `storage` ([`Disk`] outside tests). A failed write removes the partial new checkpoint
/// and leaves the previous one in place.
pub fn save(
    storage: &dyn Storage,
    out: &Path,
    params: &Params,
    opt: &AdamW,
    position: &Position,
    settings: &serde_json::Value,
) -> Result<()> {
    let tmp = out.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::file(&tmp, e))?;
    let written = write_files(storage, &tmp, params, opt, position, settings);
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written?;
    swap_in(out, &tmp)
}

/// The checkpoint's two files, into `tmp`.
fn write_files(
    storage: &dyn Storage,
    tmp: &Path,
    params: &Params,
    opt: &AdamW,
    position: &Position,
    settings: &serde_json::Value,
) -> Result<()> {
    let mut tensors = HashMap::new();
    for (i, p) in params.list.iter().enumerate() {
        if !p.trainable {
            continue;
        }
        let t = |v: &[f32]| Tensor::from_slice(v, p.shape.as_slice(), &Device::Cpu);
        tensors.insert(format!("param.{}", p.name), t(&p.value)?);
        tensors.insert(format!("m.{}", p.name), t(&opt.m[i])?);
        tensors.insert(format!("v.{}", p.name), t(&opt.v[i])?);
    }
    let weights = tmp.join("train.safetensors");
    let bytes =
        safetensors::serialize(&tensors, None).map_err(|e| TrainError::file(&weights, e))?;
    storage
        .write(&weights, &bytes)
        .map_err(|e| TrainError::file(&weights, e))?;
    let state = State {
        position: position.clone(),
        adam_step: opt.step,
        settings: settings.clone(),
    };
    let json =
        serde_json::to_string_pretty(&state).map_err(|e| TrainError::Input(e.to_string()))?;
    let state_path = tmp.join("state.json");
    storage
        .write(&state_path, json.as_bytes())
        .map_err(|e| TrainError::file(&state_path, e))
}

/// Renames the complete checkpoint in `tmp` into place; the old one stays until then.
fn swap_in(out: &Path, tmp: &Path) -> Result<()> {
    let final_dir = dir(out);
    let old = out.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if final_dir.exists() {
        std::fs::rename(&final_dir, &old).map_err(|e| TrainError::file(&final_dir, e))?;
    }
    std::fs::rename(tmp, &final_dir).map_err(|e| TrainError::file(&final_dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The run's settings without its length (`steps` and the schedule's `total`): a run may be
/// resumed longer (or shorter, not before its position) than it was planned, the learning-rate
/// schedule stretched from the step it stands at.
fn without_length(settings: &serde_json::Value) -> serde_json::Value {
    let mut s = settings.clone();
    if let Some(o) = s.as_object_mut() {
        o.remove("steps");
        if let Some(schedule) = o.get_mut("schedule").and_then(|v| v.as_object_mut()) {
            schedule.remove("total");
        }
    }
    s
}

/// The length (`steps`) the checkpoint under `out` was planned for, if there is one.
pub fn planned_steps(out: &Path) -> Option<u64> {
    let mut d = dir(out);
    if !d.exists() {
        d = out.join("checkpoint.old");
    }
    let text = std::fs::read_to_string(d.join("state.json")).ok()?;
    let state: State = serde_json::from_str(&text).ok()?;
    state.settings.get("steps")?.as_u64()
}

/// Restores the checkpoint under `out` into `params` and `opt`; returns the position. A swap
/// cut short (only the old checkpoint left) is recovered. The settings must be the
/// checkpoint's except for the run's length ([`without_length`]).
pub fn load(
    out: &Path,
    params: &mut Params,
    opt: &mut AdamW,
    settings: &serde_json::Value,
) -> Result<Position> {
    let mut d = dir(out);
    if !d.exists() && out.join("checkpoint.old").exists() {
        d = out.join("checkpoint.old");
    }
    let state_path = d.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| TrainError::file(&state_path, format!("no checkpoint to resume ({e})")))?;
    let state: State = serde_json::from_str(&text).map_err(|e| TrainError::file(&state_path, e))?;
    if without_length(&state.settings) != without_length(settings) {
        return Err(TrainError::file(&state_path, format!(
            "the checkpoint is of a run with other settings; resume with the same flags (only --steps may change) (checkpoint: {}, now: {settings})",
            state.settings
        )));
    }
    let planned = settings.get("steps").and_then(|v| v.as_u64()).unwrap_or(0);
    if planned < state.position.step {
        return Err(TrainError::file(
            &state_path,
            format!(
                "the checkpoint is at step {}; --steps {planned} would end before it",
                state.position.step
            ),
        ));
    }
    let weights = d.join("train.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
        .map_err(|e| TrainError::file(&weights, e))?;
    for (i, p) in params.list.iter_mut().enumerate() {
        if !p.trainable {
            continue;
        }
        let len = p.value.len();
        let get = |prefix: &str| -> Result<Vec<f32>> {
            let name = format!("{prefix}.{}", p.name);
            let t = tensors
                .get(&name)
                .ok_or_else(|| TrainError::file(&weights, format!("missing tensor {name}")))?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if v.len() != len {
                return Err(TrainError::file(
                    &weights,
                    format!("{name} has {} values, the model {len}", v.len()),
                ));
            }
            Ok(v)
        };
        p.value = get("param")?;
        opt.m[i] = get("m")?;
        opt.v[i] = get("v")?;
    }
    opt.step = state.adam_step;
    Ok(state.position)
}
