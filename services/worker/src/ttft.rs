//! The times to first token of the requests whose first token came since the last report:
//! recorded by the relay, taken by the reporter as a 90th percentile and a count (the
//! coordinator's load-adaptive exits read it as a saturation signal). Bounded: past
//! [`KEPT`] samples in one interval, every other one is kept.

use std::sync::Mutex;

/// Samples kept per interval at most.
const KEPT: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct TtftWindow {
    /// (samples, how many were recorded in all).
    state: Mutex<(Vec<f32>, u32)>,
}

impl TtftWindow {
    pub fn record(&self, seconds: f64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 = st.1.saturating_add(1);
        if st.0.len() >= KEPT {
            // Thin to every other sample: the quantile stays representative.
            let thinned: Vec<f32> = st.0.iter().step_by(2).copied().collect();
            st.0 = thinned;
        }
        st.0.push(seconds as f32);
    }

    /// The 90th percentile of the samples since the previous call (0 without any) and how many
    /// first tokens there were; starts the next interval.
    pub fn take_p90(&self) -> (f64, u32) {
        let (mut samples, n) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *st)
        };
        if samples.is_empty() {
            return (0.0, 0);
        }
        samples.sort_by(f32::total_cmp);
        let i = ((samples.len() - 1) as f64 * 0.9).round() as usize;
        (samples[i] as f64, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ninetieth_percentile_of_each_interval() {
        let w = TtftWindow::default();
        assert_eq!(w.take_p90(), (0.0, 0));
        for i in 1..=100 {
            w.record(i as f64 / 100.0);
        }
        let (p90, n) = w.take_p90();
        assert_eq!(n, 100);
        assert!((p90 - 0.90).abs() < 0.011, "{p90}");
        // The next interval starts empty.
        assert_eq!(w.take_p90(), (0.0, 0));
        // Past the bound the samples thin out but the quantile and the count hold.
        for i in 0..(3 * KEPT) {
            w.record((i % 10) as f64);
        }
        let (p90, n) = w.take_p90();
        assert_eq!(n as usize, 3 * KEPT);
        assert!((8.0..=9.0).contains(&p90), "{p90}");
    }
}
