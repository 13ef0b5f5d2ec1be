//! The arithmetic of the exit statistics a worker reports and the coordinator and router read:
//! one definition of the mean exit loop of a histogram, and of the throughput assumed before a
//! worker has measured any.

/// Loop-steps per second assumed for a worker that has not measured any yet.
pub const PRIOR_LOOP_STEPS_PER_SECOND: f64 = 1000.0;

/// A worker's measured loop-steps per second, or [`PRIOR_LOOP_STEPS_PER_SECOND`] before it has
/// measured any.
pub fn rate_or_prior(measured: f64) -> f64 {
    if measured > 0.0 {
        measured
    } else {
        PRIOR_LOOP_STEPS_PER_SECOND
    }
}

/// Mean exit loop of a histogram (`hist[i]` = tokens that exited after loop `i + 1`); `None`
/// while it is empty.
pub fn mean_exit_loop(hist: &[u64]) -> Option<f64> {
    let n: u64 = hist.iter().sum();
    (n > 0).then(|| {
        hist.iter()
            .enumerate()
            .map(|(i, &c)| (i + 1) as f64 * c as f64)
            .sum::<f64>()
            / n as f64
    })
}

/// Adds `delta` into `into` (growing it when `delta` has deeper loops).
pub fn add_histogram(into: &mut Vec<u64>, delta: &[u64]) {
    if into.len() < delta.len() {
        into.resize(delta.len(), 0);
    }
    for (a, d) in into.iter_mut().zip(delta) {
        *a += d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sum_of_histograms() {
        assert_eq!(mean_exit_loop(&[]), None);
        assert_eq!(mean_exit_loop(&[0, 0]), None);
        assert_eq!(mean_exit_loop(&[1, 0, 1]), Some(2.0));
        assert_eq!(mean_exit_loop(&[3, 1]), Some(1.25));
        let mut h = vec![1];
        add_histogram(&mut h, &[1, 2]);
        assert_eq!(h, vec![2, 2]);
        assert_eq!(rate_or_prior(0.0), PRIOR_LOOP_STEPS_PER_SECOND);
        assert_eq!(rate_or_prior(5.0), 5.0);
    }
}
