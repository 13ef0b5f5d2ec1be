//! Expected loops per request, learned from the requests the router relayed: a recursive
//! model's tokens exit at different depths, and requests of one class (one system prompt, one
//! template) tend to exit alike. The history keeps a moving average of each class's mean exit
//! loop, bounded like the prefix index.

use std::collections::HashMap;
use std::sync::Mutex;

use super::prefix::sweep_oldest;

/// Weight of a new request's mean in its class's average.
const ALPHA: f64 = 0.2;

#[derive(Debug, Default)]
struct State {
    /// class -> (mean loops, requests seen, tick of the latest).
    map: HashMap<u64, (f64, u64, u64)>,
    tick: u64,
}

#[derive(Debug)]
pub struct DepthHistory {
    state: Mutex<State>,
    capacity: usize,
}

impl DepthHistory {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            capacity: capacity.max(4),
        }
    }

    /// The class's expected loops per token, once a request of it has finished.
    pub fn predict(&self, class: u64) -> Option<f64> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.map.get(&class).map(|e| e.0)
    }

    /// A request of `class` finished with tokens exiting after `mean_loops` loops on average.
    pub fn observe(&self, class: u64, mean_loops: f64) {
        if !mean_loops.is_finite() || mean_loops <= 0.0 {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.tick += 1;
        let tick = st.tick;
        let e = st.map.entry(class).or_insert((mean_loops, 0, tick));
        // The first requests count fully (a plain mean), then the average moves.
        let w = (1.0 / (e.1 + 1) as f64).max(ALPHA);
        e.0 += w * (mean_loops - e.0);
        e.1 += 1;
        e.2 = tick;
        if st.map.len() > self.capacity {
            sweep_oldest(&mut st.map, |e| e.2);
        }
    }

    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_learn_their_own_depth_and_follow_changes() {
        let d = DepthHistory::new(16);
        assert_eq!(d.predict(1), None);
        d.observe(1, 1.0);
        d.observe(1, 2.0);
        d.observe(2, 4.0);
        assert!((d.predict(1).unwrap() - 1.5).abs() < 1e-9);
        assert_eq!(d.predict(2), Some(4.0));
        for _ in 0..40 {
            d.observe(1, 3.0);
        }
        assert!((d.predict(1).unwrap() - 3.0).abs() < 0.01);
        d.observe(3, f64::NAN);
        assert_eq!(d.predict(3), None);
    }

    #[test]
    fn the_history_stays_bounded() {
        let d = DepthHistory::new(8);
        for c in 0..100 {
            d.observe(c, 2.0);
            assert!(d.len() <= 8);
        }
        assert_eq!(d.predict(99), Some(2.0));
    }
}
