//! Exit traces: the exit depth of each generated token, by request and token index. A
//! benchmark replays one ([`crate::ExitKind::Replay`]) or records the oracle's into one
//! ([`crate::ExitKind::Oracle`]: the first loop whose argmax equals the last loop's).

use std::collections::HashMap;

/// `(request id, generated-token index)`.
pub type TraceKey = (u64, usize);

/// Exit depths (1-based loop) by (request id, generated-token index).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExitTrace {
    depths: HashMap<TraceKey, usize>,
    /// Argmax after each loop so far of tokens the oracle is recording.
    observed: HashMap<TraceKey, Vec<u32>>,
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
    pub fn iter(&self) -> impl Iterator<Item = (&TraceKey, &usize)> {
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

    /// Records the argmax of one more loop of a token the oracle follows.
    pub(crate) fn observe(&mut self, key: TraceKey, argmax: u32) {
        self.observed.entry(key).or_default().push(argmax);
    }

    /// The token's last loop: its depth is the first loop whose argmax equals this one.
    pub(crate) fn close(&mut self, key: TraceKey, last_argmax: u32) {
        let mut argmaxes = self.observed.remove(&key).unwrap_or_default();
        argmaxes.push(last_argmax);
        self.depths.insert(key, oracle_depth(&argmaxes));
    }
}

/// The oracle depth: the first loop (1-based) whose argmax equals the last loop's.
pub fn oracle_depth(argmaxes: &[u32]) -> usize {
    match argmaxes.last() {
        None => 0,
        Some(last) => argmaxes.iter().position(|a| a == last).map_or(0, |i| i + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oracle_depth_is_the_first_loop_agreeing_with_the_last() {
        assert_eq!(oracle_depth(&[5, 7, 7]), 2);
        assert_eq!(oracle_depth(&[7, 5, 7]), 1);
        assert_eq!(oracle_depth(&[1, 2, 3]), 3);
        assert_eq!(oracle_depth(&[]), 0);
    }

    #[test]
    fn recording_closes_into_a_depth() {
        let mut t = ExitTrace::default();
        t.observe((1, 0), 4);
        t.observe((1, 0), 9);
        t.close((1, 0), 9);
        t.close((1, 1), 3);
        assert_eq!(t.get(1, 0), Some(2));
        assert_eq!(t.get(1, 1), Some(1));
        assert_eq!(t.len(), 2);
        assert!((t.mean_depth() - 1.5).abs() < 1e-12);
    }
}
