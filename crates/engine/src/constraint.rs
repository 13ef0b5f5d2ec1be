//! Constrained decoding as the engine sees it. A request may carry a [`Constraint`] (a grammar
//! compiled elsewhere, e.g. by `rrt-constrain`): before each of its tokens is sampled the
//! engine masks the logits to the tokens the constraint allows, and after it tells the
//! constraint which token was chosen. An early exit whose head picks a token the mask forbids
//! does not exit: the token runs its next loop (the last loop samples from the masked logits).
//!
//! Masks are computed on the engine's mask thread, started with the first constrained request:
//! the mask for a sequence's next token is asked for as soon as its previous token is chosen,
//! so it is computed while the block pass for that token runs, and sampling waits only for
//! what is left of it. Times are counted in [`MaskStats`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// A per-request restriction of what may be generated.
pub trait Constraint: Send {
    /// The tokens allowed next: bit `t % 32` of word `t / 32` is set for an allowed token `t`.
    /// An error ends the request.
    fn mask(&mut self) -> Result<Vec<u32>, String>;
    /// Records the token chosen; `Ok(true)` when the constraint is complete and allows nothing
    /// more (the request then ends).
    fn commit(&mut self, token: u32) -> Result<bool, String>;
    /// At the start and after a commit that did not complete it: the tokens the constraint
    /// allows as the only way on (a JSON key, a literal, the opening of a tool call), recorded
    /// as taken, and whether it is complete after them.
    /// The engine appends them without sampling and runs them as one chunk (fast-forward).
    fn forced(&mut self) -> Result<(Vec<u32>, bool), String> {
        Ok((Vec::new(), false))
    }
}

/// Counters of the mask thread and of the waits for it (nanoseconds), shared with the engine.
#[derive(Debug, Default)]
pub struct MaskStats {
    pub masks: AtomicU64,
    pub mask_ns: AtomicU64,
    /// Time sampling waited for a mask not computed yet.
    pub wait_ns: AtomicU64,
    /// Early exits the mask turned into another loop (the head's pick was not allowed).
    pub exits_denied: AtomicU64,
    /// Tokens the constraints forced (appended without sampling: fast-forward).
    pub forced: AtomicU64,
}

/// A snapshot of [`MaskStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskCounts {
    pub masks: u64,
    pub mask_ns: u64,
    pub wait_ns: u64,
    pub exits_denied: u64,
    pub forced: u64,
}

impl MaskStats {
    pub fn counts(&self) -> MaskCounts {
        MaskCounts {
            masks: self.masks.load(Ordering::Relaxed),
            mask_ns: self.mask_ns.load(Ordering::Relaxed),
            wait_ns: self.wait_ns.load(Ordering::Relaxed),
            exits_denied: self.exits_denied.load(Ordering::Relaxed),
            forced: self.forced.load(Ordering::Relaxed),
        }
    }
}

type MaskResult = Result<Arc<Vec<u32>>, String>;

struct SlotState {
    constraint: Box<dyn Constraint>,
    /// The mask for the next token, once computed.
    mask: Option<MaskResult>,
}

/// One sequence's constraint and the mask being computed for it.
struct Slot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The engine's mask thread (started with the first constrained request).
pub(crate) struct MaskThread {
    tx: mpsc::Sender<Arc<Slot>>,
    pub stats: Arc<MaskStats>,
}

impl MaskThread {
    pub fn start(stats: Arc<MaskStats>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Arc<Slot>>();
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("rrt-mask".into())
            .spawn(move || {
                for slot in rx {
                    let started = Instant::now();
                    let mut s = slot.lock();
                    let mask = s.constraint.mask().map(Arc::new);
                    // Counted before the mask is seen, so a reader after it sees the count.
                    thread_stats.masks.fetch_add(1, Ordering::Relaxed);
                    thread_stats
                        .mask_ns
                        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    s.mask = Some(mask);
                    drop(s);
                    slot.ready.notify_all();
                }
            })?;
        Ok(Self { tx, stats })
    }

    /// A sequence's handle on `constraint`, with the tokens it forces before anything is
    /// sampled (at most `room`; already recorded) and whether it is complete after them; the
    /// first mask is asked for unless it is.
    pub fn constrain(
        &self,
        mut constraint: Box<dyn Constraint>,
        room: usize,
    ) -> Result<(Constrained, Vec<u32>, bool), String> {
        let (mut forced, done) = if room > 0 {
            constraint.forced()?
        } else {
            (Vec::new(), false)
        };
        forced.truncate(room);
        self.stats
            .forced
            .fetch_add(forced.len() as u64, Ordering::Relaxed);
        let c = Constrained {
            slot: Arc::new(Slot {
                state: Mutex::new(SlotState {
                    constraint,
                    mask: done.then(|| Err("the constraint is complete".to_string())),
                }),
                ready: Condvar::new(),
            }),
            tx: self.tx.clone(),
            stats: self.stats.clone(),
        };
        if !done {
            c.ask();
        }
        Ok((c, forced, done))
    }
}

/// A sequence's side of its constraint.
pub(crate) struct Constrained {
    slot: Arc<Slot>,
    tx: mpsc::Sender<Arc<Slot>>,
    stats: Arc<MaskStats>,
}

/// Whether token `t` is set in `mask`.
pub(crate) fn allows(mask: &[u32], t: u32) -> bool {
    mask.get(t as usize / 32)
        .is_some_and(|w| w & (1 << (t % 32)) != 0)
}

impl Constrained {
    fn ask(&self) {
        if self.tx.send(self.slot.clone()).is_err() {
            self.slot.lock().mask = Some(Err("the mask thread is gone".into()));
        }
    }

    /// The mask for the next token, waiting for the mask thread if it is not done.
    pub fn mask(&self) -> MaskResult {
        let mut s = self.slot.lock();
        if s.mask.is_none() {
            let started = Instant::now();
            while s.mask.is_none() {
                s = self.slot.ready.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            self.stats
                .wait_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        s.mask.clone().unwrap_or_else(|| Err("no mask".into()))
    }

    /// Whether an early exit on `token` may leave (counts the ones it may not).
    pub fn allows_exit(&self, token: u32) -> bool {
        let ok = self.mask().is_ok_and(|m| allows(&m, token));
        if !ok {
            self.stats.exits_denied.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// `logits` with every token the mask forbids at minus infinity.
    pub fn apply(&self, logits: &[f32]) -> Result<Vec<f32>, String> {
        let mask = self.mask()?;
        let mut out = logits.to_vec();
        let mut any = false;
        for (t, l) in out.iter_mut().enumerate() {
            if allows(&mask, t as u32) {
                any = true;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if !any {
            return Err("the constraint allows no token of the vocabulary here".into());
        }
        Ok(out)
    }

    /// Records the chosen token, takes the tokens the constraint forces after it (at most
    /// `room`), and asks for the next mask: `(complete, forced tokens)`.
    pub fn commit(&self, token: u32, room: usize) -> Result<(bool, Vec<u32>), String> {
        let (done, forced) = {
            let mut s = self.slot.lock();
            let step = s.constraint.commit(token).and_then(|done| {
                if done || room == 0 {
                    return Ok((done, Vec::new()));
                }
                s.constraint.forced().map(|(forced, done)| (done, forced))
            });
            match step {
                Ok((done, mut forced)) => {
                    forced.truncate(room);
                    s.mask = done.then(|| Err("the constraint is complete".to_string()));
                    self.stats
                        .forced
                        .fetch_add(forced.len() as u64, Ordering::Relaxed);
                    (done, forced)
                }
                Err(e) => {
                    s.mask = Some(Err(e.clone()));
                    return Err(e);
                }
            }
        };
        if !done {
            self.ask();
        }
        Ok((done, forced))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allows only token `next`, which counts up; complete after `until`.
    struct Counting {
        next: u32,
        until: u32,
    }

    impl Constraint for Counting {
        fn mask(&mut self) -> Result<Vec<u32>, String> {
            let mut m = vec![0u32; 4];
            m[self.next as usize / 32] |= 1 << (self.next % 32);
            Ok(m)
        }
        fn commit(&mut self, token: u32) -> Result<bool, String> {
            if token != self.next {
                return Err(format!("{token} is not allowed"));
            }
            self.next += 1;
            Ok(self.next > self.until)
        }
    }

    #[test]
    fn masks_come_from_the_thread_and_follow_commits() {
        let stats = Arc::new(MaskStats::default());
        let t = MaskThread::start(stats.clone()).unwrap();
        let (c, forced, done) = t
            .constrain(Box::new(Counting { next: 3, until: 5 }), 8)
            .unwrap();
        assert!(forced.is_empty() && !done);
        let logits = vec![1.0f32; 100];
        let masked = c.apply(&logits).unwrap();
        assert_eq!(masked[3], 1.0);
        assert!(masked
            .iter()
            .enumerate()
            .all(|(i, &l)| i == 3 || l == f32::NEG_INFINITY));
        assert!(c.allows_exit(3));
        assert!(!c.allows_exit(4));
        assert_eq!(c.commit(3, 8), Ok((false, vec![])));
        assert!(c.allows_exit(4));
        assert_eq!(c.commit(4, 8), Ok((false, vec![])));
        // The engine always reads the mask before it commits the next token.
        assert!(c.allows_exit(5));
        assert_eq!(c.commit(5, 8), Ok((true, vec![])));
        let n = stats.counts();
        assert_eq!(n.masks, 3);
        assert_eq!(n.exits_denied, 1);
        assert!(allows(&[0b100], 2) && !allows(&[0b100], 1) && !allows(&[0b100], 40));
    }
}
