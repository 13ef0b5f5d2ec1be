//! Early exit: after each loop a token's confidence decides whether it leaves the shared block
//! (CALM's measures), plus a replay policy that takes exit depths from a recorded trace and an
//! oracle recorder that writes one (exit at the first loop whose argmax equals the last loop's).

use std::collections::HashMap;

/// Which signal decides an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Every token runs every loop.
    None,
    /// Softmax max probability of the exit head >= threshold.
    MaxProb,
    /// Top-1 minus top-2 probability >= threshold.
    Margin,
    /// Cosine similarity of the hidden state before and after the loop >= threshold (no LM head).
    Cosine,
    /// Exit depths from the engine's trace (benchmarks).
    Replay,
    /// Run every loop and record the oracle exit depth into the engine's trace.
    Oracle,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExitPolicy {
    pub kind: ExitKind,
    pub threshold: f32,
}

impl ExitPolicy {
    pub const NONE: ExitPolicy = ExitPolicy {
        kind: ExitKind::None,
        threshold: 1.0,
    };

    /// Whether deciding needs the exit head's logits.
    pub fn needs_logits(&self) -> bool {
        matches!(
            self.kind,
            ExitKind::MaxProb | ExitKind::Margin | ExitKind::Oracle
        )
    }
}

/// How the K/V of the loops an exited token skipped are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFill {
    /// Project the exit hidden state through each skipped layer's K/V projections (CALM).
    Propagate,
    /// Reuse the exit loop's K/V for the deeper loops (recursive KV sharing, MoR).
    Copy,
}

/// Exit depths (1-based loop) by (request id, generated-token index).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExitTrace {
    depths: HashMap<(u64, usize), usize>,
}

impl ExitTrace {
    pub fn get(&self, request: u64, index: usize) -> Option<usize> {
        self.depths.get(&(request, index)).copied()
    }

    pub fn insert(&mut self, request: u64, index: usize, exit_loop: usize) {
        self.depths.insert((request, index), exit_loop);
    }

    pub fn len(&self) -> usize {
        self.depths.len()
    }

    /// `((request, index), exit loop)` in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&(u64, usize), &usize)> {
        self.depths.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.depths.is_empty()
    }

    /// Mean exit loop over the recorded tokens.
    pub fn mean_depth(&self) -> f64 {
        if self.depths.is_empty() {
            return 0.0;
        }
        self.depths.values().sum::<usize>() as f64 / self.depths.len() as f64
    }
}

/// Softmax max probability and top-1 minus top-2 margin of a logits row.
pub fn confidence(logits: &[f32]) -> (f32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    let (mut p1, mut p2) = (0f32, 0f32);
    for &l in logits {
        let e = (l - max).exp();
        sum += e;
        if e > p1 {
            p2 = p1;
            p1 = e;
        } else if e > p2 {
            p2 = e;
        }
    }
    (p1 / sum, (p1 - p2) / sum)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    (ab / (aa.sqrt() * bb.sqrt()).max(1e-30)) as f32
}

/// The oracle depth: first loop (1-based) whose argmax equals the last loop's.
pub fn oracle_depth(argmaxes: &[u32]) -> usize {
    let last = *argmaxes.last().expect("at least one loop");
    argmaxes
        .iter()
        .position(|&a| a == last)
        .map_or(argmaxes.len(), |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_cosine_and_oracle_depth() {
        let (p, m) = confidence(&[0.0, 0.0, 10.0]);
        assert!(p > 0.99 && m > 0.99);
        let (p, m) = confidence(&[1.0, 1.0, 1.0, 1.0]);
        assert!((p - 0.25).abs() < 1e-6 && m.abs() < 1e-6);
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-6);
        assert_eq!(oracle_depth(&[5, 7, 7]), 2);
        assert_eq!(oracle_depth(&[7, 5, 7]), 1);
        assert_eq!(oracle_depth(&[1, 2, 3]), 3);
    }
}
