//! Learned exits: for each loop but the last, a small *exit adapter* (a low-rank residual map
//! `h + U (V h)` in front of the shared final norm and LM head, so the loop's hidden state reads
//! like the last loop's) and an *exit classifier* (`sigmoid(w . rmsnorm(h) + b)`: how likely the
//! adapted exit agrees with the last loop). Deciding costs one dot product of the hidden size;
//! only a token that exits pays for the LM head. They live beside a model in
//! `exit-heads.safetensors` (`rrt.exit.{loop}.*`) with `exit-heads.json` saying how they were
//! made, so they can be trained, shipped and swapped without touching the model's weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::linear::Linear;
use crate::source::TensorSource;

/// The file names of exit heads inside a model directory.
pub const WEIGHTS_FILE: &str = "exit-heads.safetensors";
pub const META_FILE: &str = "exit-heads.json";

/// How a set of exit heads was made (`exit-heads.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitHeadsMeta {
    /// Rank of each adapter (0: no adapter, the plain head reads the hidden state).
    pub adapter_rank: usize,
    /// Loops with a head (every loop but the last).
    pub loops: usize,
    /// Free text: data, steps, the model they were trained on, measured agreement.
    #[serde(default)]
    pub trained: String,
    /// Per exit, what its classifier's threshold does on held-out text (teacher-forced): what
    /// load-adaptive exits read to keep a quality floor. Empty for heads saved before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curves: Vec<ExitCurve>,
    /// With several exits, what they do together as the engine runs them (a token leaves at
    /// the first exit it passes), measured on the same text: exact where combining the
    /// separate `curves` is an estimate. Empty with one exit or for heads saved before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cascade: Vec<CascadePoint>,
}

/// Several learned exits at one threshold, as a cascade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CascadePoint {
    pub threshold: f32,
    /// Share of tokens leaving at each exit (index `j`: after loop `j + 1`; loops without a
    /// classifier 0).
    pub exit_share: Vec<f64>,
    /// Per-token agreement with the last loop (tokens that never exit agree).
    pub agreement: f64,
    /// Loops a token runs on average.
    pub mean_loops: f64,
}

/// One exit's threshold trade-off on held-out text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitCurve {
    /// The loop (1-based) the exit follows.
    pub after_loop: usize,
    /// What text it was measured on.
    #[serde(default)]
    pub measured_on: String,
    /// In increasing threshold order.
    pub points: Vec<ExitPoint>,
}

/// What a learned-exit threshold does on held-out tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExitPoint {
    pub threshold: f32,
    /// Share of tokens whose classifier probability reaches the threshold.
    pub exit_rate: f64,
    /// Of those, the share whose exit agrees with the last loop.
    pub exit_agreement: f64,
    /// Per-token agreement with the last loop if those tokens exit (the rest run every loop).
    pub overall_agreement: f64,
}

/// The metadata of the exit heads in model directory `dir`, if it has any (no weights read).
pub fn read_meta(dir: &Path) -> Result<Option<ExitHeadsMeta>> {
    let path = dir.join(META_FILE);
    if !path.exists() {
        return Ok(None);
    }
    crate::json::read(&path, "exit-heads metadata").map(Some)
}

/// One loop's exit head.
#[derive(Debug, Clone)]
pub struct ExitHead {
    /// `V` (`[rank, hidden]`) and `U` (`[hidden, rank]`).
    pub adapter: Option<(Linear, Linear)>,
    /// `w` of the classifier, `[hidden]`.
    pub classifier: Vec<f32>,
    pub bias: f32,
}

/// The exit heads of a recursive model.
#[derive(Debug, Clone)]
pub struct ExitHeads {
    pub meta: ExitHeadsMeta,
    /// Per loop but the last.
    pub heads: Vec<ExitHead>,
}

/// Tensor names of loop `j`'s head.
pub fn names(j: usize) -> [String; 4] {
    [
        format!("rrt.exit.{j}.adapter_down.weight"),
        format!("rrt.exit.{j}.adapter_up.weight"),
        format!("rrt.exit.{j}.classifier.weight"),
        format!("rrt.exit.{j}.classifier.bias"),
    ]
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl ExitHead {
    /// The probability that the adapted exit after this loop agrees with the last loop, from
    /// the hidden state `h` (`[hidden]`); `eps` as the model's RMSNorm.
    pub fn exit_probability(&self, h: &[f32], eps: f32) -> f32 {
        let ms = h.iter().map(|x| x * x).sum::<f32>() / h.len().max(1) as f32;
        let r = 1.0 / (ms + eps).sqrt();
        let z = r * h
            .iter()
            .zip(&self.classifier)
            .map(|(a, b)| a * b)
            .sum::<f32>()
            + self.bias;
        1.0 / (1.0 + (-z).exp())
    }

    /// `h + U (V h)` for rows `h` (`[rows, hidden]`).
    pub fn adapt(&self, h: &Tensor) -> Result<Tensor> {
        match &self.adapter {
            None => Ok(h.clone()),
            Some((down, up)) => Ok((h + up.forward(&down.forward(h)?)?)?),
        }
    }
}

impl ExitHeads {
    /// Loads the heads of a model directory, if it has any.
    pub fn load_dir(dir: &Path, src: &mut dyn TensorSource, hidden: usize) -> Result<Option<Self>> {
        let meta_path = dir.join(META_FILE);
        if !meta_path.exists() {
            return Ok(None);
        }
        let meta: ExitHeadsMeta = crate::json::read(&meta_path, "exit-heads metadata")?;
        let mut heads = Vec::with_capacity(meta.loops);
        for j in 0..meta.loops {
            let [down, up, w, b] = names(j);
            let adapter = if meta.adapter_rank > 0 {
                let r = meta.adapter_rank;
                let d = src.load_shaped(&down, &[r, hidden], candle_core::DType::F32)?;
                let u = src.load_shaped(&up, &[hidden, r], candle_core::DType::F32)?;
                Some((Linear::new(d)?, Linear::new(u)?))
            } else {
                None
            };
            let classifier = values(&src.load_shaped(&w, &[hidden], candle_core::DType::F32)?)?;
            let bias = values(&src.load_shaped(&b, &[1], candle_core::DType::F32)?)?[0];
            heads.push(ExitHead {
                adapter,
                classifier,
                bias,
            });
        }
        Ok(Some(Self { meta, heads }))
    }

    /// Writes `exit-heads.safetensors` and `exit-heads.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let mut tensors = HashMap::new();
        for (j, h) in self.heads.iter().enumerate() {
            let [down, up, w, b] = names(j);
            if let Some((d, u)) = &h.adapter {
                tensors.insert(down, d.weight()?);
                tensors.insert(up, u.weight()?);
            }
            tensors.insert(
                w,
                Tensor::from_slice(&h.classifier, h.classifier.len(), &dev)?,
            );
            tensors.insert(b, Tensor::from_slice(&[h.bias], 1, &dev)?);
        }
        let path = dir.join(WEIGHTS_FILE);
        crate::weights_file::save(&tensors, &path)?;
        crate::json::write(&dir.join(META_FILE), &self.meta)
    }
}
