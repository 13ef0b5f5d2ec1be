//! Training text: files tokenized into one token stream (each file followed by the end-of-text
//! token), cut into windows of `t + 1` tokens that overlap by one (every token is a target
//! once), a held-out set of windows the training never sees, and a seeded order per epoch.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rrt_model::Tokenizer;

use crate::error::{Result, TrainError};

/// Tokens of one or more text files.
#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    pub tokens: Vec<u32>,
    pub files: Vec<PathBuf>,
}

/// Lines per tokenizer call (bounds memory on large files; BPE merges never cross lines here
/// since each chunk ends with its newline).
const LINES_PER_CALL: usize = 256;

impl Corpus {
    /// Reads and tokenizes `files`; errors name the file (missing, unreadable, empty).
    pub fn read(files: &[PathBuf], tokenizer: &Tokenizer) -> Result<Self> {
        if files.is_empty() {
            return Err(TrainError::Input(
                "no training data: give --data FILE".into(),
            ));
        }
        let mut tokens = Vec::new();
        for path in files {
            tokens.extend(tokenize_file(path, tokenizer)?);
            tokens.extend(tokenizer.eos.first().copied());
        }
        Ok(Self {
            tokens,
            files: files.to_vec(),
        })
    }

    /// Windows of `t + 1` tokens.
    pub fn windows(&self, t: usize) -> usize {
        self.tokens.len().saturating_sub(1) / t
    }

    /// Window `i`: tokens `i t ..= (i + 1) t`.
    pub fn window(&self, i: usize, t: usize) -> &[u32] {
        &self.tokens[i * t..(i + 1) * t + 1]
    }

    /// An FNV-1a hash of the tokens (names cached teacher outputs).
    pub fn fingerprint(&self) -> u64 {
        fnv(self.tokens.iter().flat_map(|t| t.to_le_bytes()))
    }
}

pub(crate) fn fnv(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn tokenize_file(path: &Path, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::file(path, format!("cannot read training data: {e}")))?;
    if text.trim().is_empty() {
        return Err(TrainError::file(path, "the training data file is empty"));
    }
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut tokens = Vec::new();
    for chunk in lines.chunks(LINES_PER_CALL) {
        let piece: String = chunk.concat();
        let ids = tokenizer
            .encode(&piece)
            .map_err(|e| TrainError::file(path, format!("tokenizing: {e}")))?;
        // A model that starts prompts with BOS gets one per file, not one per chunk.
        let skip = (!tokens.is_empty()
            && tokenizer.add_bos
            && ids.first() == tokenizer.bos.as_ref()) as usize;
        tokens.extend_from_slice(&ids[skip..]);
    }
    Ok(tokens)
}

/// Which windows train and which are held out.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Vec<usize>,
    pub eval: Vec<usize>,
}

impl Split {
    /// Holds out every `1 / fraction`-th window (spread over the text, at least one) unless the
    /// evaluation text is separate (`held_out == false`: all windows train).
    pub fn new(windows: usize, eval_windows: usize, held_out: bool) -> Result<Self> {
        if windows == 0 {
            return Err(TrainError::Input(
                "the training text is shorter than one sequence (lower --seq-len or add text)"
                    .into(),
            ));
        }
        if !held_out || eval_windows == 0 {
            return Ok(Self {
                train: (0..windows).collect(),
                eval: Vec::new(),
            });
        }
        if windows < 2 * eval_windows {
            return Err(TrainError::Input(format!(
                "{windows} training sequences cannot spare {eval_windows} for evaluation (give --eval-data or lower --eval-windows)"
            )));
        }
        let stride = windows / eval_windows;
        let eval: Vec<usize> = (0..eval_windows).map(|i| i * stride + stride / 2).collect();
        let train = (0..windows).filter(|i| !eval.contains(i)).collect();
        Ok(Self { train, eval })
    }

    /// The training windows of `epoch` in a seeded order.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order = self.train.clone();
        order.shuffle(&mut StdRng::seed_from_u64(
            seed ^ epoch.wrapping_mul(0x9e3779b97f4a7c15),
        ));
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_overlap_by_one_and_splits_are_disjoint_and_seeded() {
        let c = Corpus {
            tokens: (0..21).collect(),
            files: vec![],
        };
        assert_eq!(c.windows(4), 5);
        assert_eq!(c.window(1, 4), &[4, 5, 6, 7, 8]);
        let s = Split::new(100, 5, true).unwrap();
        assert_eq!(s.eval.len(), 5);
        assert_eq!(s.train.len(), 95);
        assert!(s.eval.iter().all(|e| !s.train.contains(e)));
        assert_eq!(s.epoch_order(1, 0), s.epoch_order(1, 0));
        assert_ne!(s.epoch_order(1, 0), s.epoch_order(1, 1));
        assert!(Split::new(0, 5, true)
            .unwrap_err()
            .to_string()
            .contains("shorter than one sequence"));
        assert!(Split::new(6, 5, true).is_err());
    }
}
