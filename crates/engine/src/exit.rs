//! Early exit: after each loop a token's confidence decides whether it leaves the shared block
//! (CALM's measures), plus two policies for benchmarks: one replays exit depths from an
//! [`ExitTrace`], the other records the oracle depth into one (exit at the first loop whose
//! argmax equals the last loop's). Everything a policy decides goes through [`ExitPolicy`]'s
//! methods, so the depth-wise step does not branch on which policy a unit has.

use rrt_model::sampling::argmax;

use crate::trace::{ExitTrace, TraceKey};

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
    /// The model's learned exit classifier: probability that the (adapted) exit agrees with
    /// the last loop >= threshold (one dot product; the LM head runs only for tokens that exit).
    Learned,
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

/// What a policy says after a loop that is not the unit's last, before any exit head runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Stay,
    Leave,
    /// Decided by [`ExitPolicy::exits_on`] from the exit head's logits.
    ReadHead,
}

impl Verdict {
    fn leave_if(exit: bool) -> Self {
        if exit {
            Verdict::Leave
        } else {
            Verdict::Stay
        }
    }
}

impl ExitPolicy {
    pub const NONE: ExitPolicy = ExitPolicy {
        kind: ExitKind::None,
        threshold: 1.0,
    };

    /// The verdict after `after` loops of the generated token `key`. `signals` reads what a
    /// policy needs of the token's hidden state, only when it reads it.
    pub(crate) fn verdict<E>(
        &self,
        trace: &ExitTrace,
        key: TraceKey,
        after: usize,
        signals: &dyn Signals<E>,
    ) -> Result<Verdict, E> {
        Ok(match self.kind {
            ExitKind::None => Verdict::Stay,
            ExitKind::Replay => Verdict::leave_if(trace.get(key.0, key.1) == Some(after)),
            ExitKind::Cosine => Verdict::leave_if(signals.cosine()? >= self.threshold),
            ExitKind::Learned => Verdict::leave_if(
                signals
                    .exit_probability()?
                    .is_some_and(|p| p >= self.threshold),
            ),
            ExitKind::MaxProb | ExitKind::Margin | ExitKind::Oracle => Verdict::ReadHead,
        })
    }

    /// Whether the exit head's `logits` make the token leave (for a [`Verdict::ReadHead`]).
    /// Pure, so a step runs it for all its units in parallel (a softmax over the vocabulary).
    pub(crate) fn exits_on(&self, logits: &[f32]) -> bool {
        match self.kind {
            ExitKind::MaxProb => confidence(logits).0 >= self.threshold,
            ExitKind::Margin => confidence(logits).1 >= self.threshold,
            _ => false,
        }
    }

    /// Called with the exit head's logits of every loop the token ran but the last: the oracle
    /// records the argmax.
    pub(crate) fn observe(&self, trace: &mut ExitTrace, key: TraceKey, logits: &[f32]) {
        if self.kind == ExitKind::Oracle {
            trace.observe(key, argmax(logits));
        }
    }

    /// Called with the logits the token is sampled from: the oracle writes its depth.
    pub(crate) fn close(&self, trace: &mut ExitTrace, key: TraceKey, logits: &[f32]) {
        if self.kind == ExitKind::Oracle {
            trace.close(key, argmax(logits));
        }
    }
}

/// What a policy may read of a token's hidden state after a loop.
pub(crate) trait Signals<E> {
    /// Cosine of the hidden state before and after the loop.
    fn cosine(&self) -> Result<f32, E>;
    /// The learned exit classifier's probability (`None`: no classifier for this loop).
    fn exit_probability(&self) -> Result<Option<f32>, E>;
}

/// How the K/V of the loops an exited token skipped are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFill {
    /// Project the exit hidden state through each skipped layer's K/V projections (CALM).
    Propagate,
    /// Reuse the exit loop's K/V for the deeper loops (recursive KV sharing, MoR).
    Copy,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_and_cosine() {
        let (p, m) = confidence(&[0.0, 0.0, 10.0]);
        assert!(p > 0.99 && m > 0.99);
        let (p, m) = confidence(&[1.0, 1.0, 1.0, 1.0]);
        assert!((p - 0.25).abs() < 1e-6 && m.abs() < 1e-6);
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-6);
    }

    struct Fixed(f32, Option<f32>);

    impl Signals<()> for Fixed {
        fn cosine(&self) -> Result<f32, ()> {
            Ok(self.0)
        }
        fn exit_probability(&self) -> Result<Option<f32>, ()> {
            Ok(self.1)
        }
    }

    /// Signals a policy must not read.
    struct Unread;

    impl Signals<()> for Unread {
        fn cosine(&self) -> Result<f32, ()> {
            panic!("cosine read by a policy that needs none")
        }
        fn exit_probability(&self) -> Result<Option<f32>, ()> {
            panic!("exit probability read by a policy that needs none")
        }
    }

    #[test]
    fn policies_decide_through_one_interface() {
        let mut trace = ExitTrace::default();
        trace.insert(7, 0, 2);
        let never = &Unread;
        let replay = ExitPolicy {
            kind: ExitKind::Replay,
            threshold: 0.0,
        };
        assert_eq!(replay.verdict(&trace, (7, 0), 1, never), Ok(Verdict::Stay));
        assert_eq!(replay.verdict(&trace, (7, 0), 2, never), Ok(Verdict::Leave));
        let cos = ExitPolicy {
            kind: ExitKind::Cosine,
            threshold: 0.5,
        };
        assert_eq!(
            cos.verdict(&trace, (1, 0), 1, &Fixed(0.9, None)),
            Ok(Verdict::Leave)
        );
        assert_eq!(
            cos.verdict(&trace, (1, 0), 1, &Fixed(0.1, None)),
            Ok(Verdict::Stay)
        );
        let learned = ExitPolicy {
            kind: ExitKind::Learned,
            threshold: 0.8,
        };
        assert_eq!(
            learned.verdict(&trace, (1, 0), 1, &Fixed(0.0, Some(0.9))),
            Ok(Verdict::Leave)
        );
        assert_eq!(
            learned.verdict(&trace, (1, 0), 1, &Fixed(0.0, Some(0.7))),
            Ok(Verdict::Stay)
        );
        assert_eq!(
            learned.verdict(&trace, (1, 0), 1, &Fixed(0.0, None)),
            Ok(Verdict::Stay)
        );
        let max_prob = ExitPolicy {
            kind: ExitKind::MaxProb,
            threshold: 0.9,
        };
        assert_eq!(
            max_prob.verdict(&trace, (1, 0), 1, never),
            Ok(Verdict::ReadHead)
        );
        assert!(max_prob.exits_on(&[0.0, 0.0, 10.0]));
        assert!(!max_prob.exits_on(&[1.0, 1.0, 1.0]));
        // The oracle reads every loop's head, never exits, and records the first loop whose
        // argmax equals the last one's.
        let oracle = ExitPolicy {
            kind: ExitKind::Oracle,
            threshold: 0.0,
        };
        assert!(!oracle.exits_on(&[0.0, 0.0, 10.0]));
        oracle.observe(&mut trace, (3, 4), &[0.0, 5.0, 1.0]);
        oracle.observe(&mut trace, (3, 4), &[0.0, 1.0, 5.0]);
        oracle.close(&mut trace, (3, 4), &[0.0, 1.0, 7.0]);
        assert_eq!(trace.get(3, 4), Some(2));
        max_prob.observe(&mut trace, (9, 9), &[1.0]);
        max_prob.close(&mut trace, (9, 9), &[1.0]);
        assert_eq!(trace.get(9, 9), None, "only the oracle records");
    }
}
