//! The arithmetic of the exit statistics a worker reports and the coordinator and router read:
//! one definition of the mean exit loop of a histogram, of the throughput assumed before a
//! worker has measured any, and of reading a model's threshold curve (exit rate and agreement
//! at a threshold; the lowest threshold that keeps a quality floor).

use crate::v1::{ExitCurve, ExitCurvePoint, ExitPolicy};

/// The exit policies by the names the worker's `--exit` flag and the OpenAI extension
/// (`rrt_exit.policy`) use: one table for both.
pub const POLICY_NAMES: [(&str, ExitPolicy); 5] = [
    ("none", ExitPolicy::None),
    ("max-prob", ExitPolicy::MaxProb),
    ("margin", ExitPolicy::Margin),
    ("cosine", ExitPolicy::Cosine),
    ("learned", ExitPolicy::Learned),
];

/// The policy named `name` (`max_prob` is taken for `max-prob`), or what the names are.
pub fn policy_by_name(name: &str) -> Result<ExitPolicy, String> {
    let name = if name == "max_prob" { "max-prob" } else { name };
    POLICY_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| *p)
        .ok_or_else(|| {
            let names: Vec<&str> = POLICY_NAMES.iter().map(|(n, _)| *n).collect();
            format!("one of {}", names.join(", "))
        })
}

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

/// `f` of the curve at threshold `t`, linear between measured points and held at the ends;
/// `None` for an empty curve.
fn interpolate(
    points: &[ExitCurvePoint],
    t: f32,
    f: impl Fn(&ExitCurvePoint) -> f64,
) -> Option<f64> {
    let first = points.first()?;
    let last = points.last()?;
    if t <= first.threshold {
        return Some(f(first));
    }
    if t >= last.threshold {
        return Some(f(last));
    }
    let hi = points.iter().position(|p| p.threshold >= t)?;
    let (a, b) = (&points[hi - 1], &points[hi]);
    let span = (b.threshold - a.threshold) as f64;
    let w = if span > 0.0 {
        (t - a.threshold) as f64 / span
    } else {
        1.0
    };
    Some(f(a) + w * (f(b) - f(a)))
}

/// Share of tokens that exit at threshold `t` (interpolated).
pub fn exit_rate_at(points: &[ExitCurvePoint], t: f32) -> Option<f64> {
    interpolate(points, t, |p| p.exit_rate)
}

/// Share of tokens that agree with full depth at threshold `t` (interpolated).
pub fn agreement_at(points: &[ExitCurvePoint], t: f32) -> Option<f64> {
    interpolate(points, t, |p| p.agreement)
}

/// The chance that a token still running at exit `j` leaves there, for the exits after loops
/// `1..loops` at threshold `t` (index `j - 1`). Each curve's exit rate is measured over all
/// tokens, each exit alone; a token that would pass an earlier exit is taken to pass the later
/// ones too (a token sure after loop 1 stays sure), so by exit `j` the share gone is the
/// highest rate of exits `1..=j`, and the chance at `j` is what it adds over the share still
/// running. With one exit it is that exit's rate. An exit without a curve takes nobody.
pub fn exit_chances(curves: &[ExitCurve], t: f32, loops: usize) -> impl Iterator<Item = f64> + '_ {
    (1..loops).scan(0.0f64, move |gone, j| {
        let rate = curves
            .iter()
            .find(|c| c.after_loop as usize == j)
            .and_then(|c| exit_rate_at(&c.points, t))
            .unwrap_or(0.0)
            .clamp(0.0, 1.0);
        let by_now = gone.max(rate);
        let chance = if *gone < 1.0 {
            (by_now - *gone) / (1.0 - *gone)
        } else {
            0.0
        };
        *gone = by_now;
        Some(chance)
    })
}

/// The lowest threshold that keeps at least `floor` agreement with full depth over every exit
/// ([`expected_agreement`]: with several exits their losses add up, so each exit alone must
/// keep more than the floor): the curves are read at their measured thresholds from the
/// highest down while the floor holds (so a dip below it is never crossed). `None` without
/// curves, or when even the highest threshold misses the floor.
pub fn floor_threshold(curves: &[ExitCurve], floor: f64) -> Option<f32> {
    let mut thresholds: Vec<f32> = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.threshold))
        .collect();
    thresholds.sort_by(|a, b| b.total_cmp(a));
    thresholds.dedup();
    let mut lowest = None;
    for t in thresholds {
        if expected_agreement(curves, t)? + 1e-12 < floor {
            break;
        }
        lowest = Some(t);
    }
    lowest
}

/// The mean agreement with full depth a threshold keeps over every exit's curve (the product
/// of the exits' agreements: a token that reached a later exit passed the earlier ones).
pub fn expected_agreement(curves: &[ExitCurve], t: f32) -> Option<f64> {
    let mut any = false;
    let mut agree = 1.0;
    for c in curves {
        if let Some(a) = agreement_at(&c.points, t) {
            agree *= a;
            any = true;
        }
    }
    any.then_some(agree)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(points: &[(f32, f64, f64)]) -> ExitCurve {
        ExitCurve {
            after_loop: 1,
            points: points
                .iter()
                .map(|&(threshold, exit_rate, agreement)| ExitCurvePoint {
                    threshold,
                    exit_rate,
                    agreement,
                })
                .collect(),
        }
    }

    #[test]
    fn curves_interpolate_and_give_the_lowest_threshold_that_keeps_a_floor() {
        // The r128 model's learned exit on general text (docs/uptraining.md).
        let c = curve(&[
            (0.5, 0.747, 0.799),
            (0.7, 0.542, 0.889),
            (0.8, 0.401, 0.932),
            (0.9, 0.245, 0.969),
            (0.95, 0.146, 0.990),
        ]);
        assert_eq!(exit_rate_at(&c.points, 0.3), Some(0.747));
        assert_eq!(exit_rate_at(&c.points, 0.99), Some(0.146));
        let mid = exit_rate_at(&c.points, 0.85).unwrap();
        assert!((mid - 0.323).abs() < 1e-6, "{mid}");
        assert_eq!(floor_threshold(std::slice::from_ref(&c), 0.95), Some(0.9));
        assert_eq!(floor_threshold(std::slice::from_ref(&c), 0.88), Some(0.7));
        assert_eq!(floor_threshold(std::slice::from_ref(&c), 0.5), Some(0.5));
        assert_eq!(floor_threshold(std::slice::from_ref(&c), 0.995), None);
        assert_eq!(floor_threshold(&[], 0.9), None);
        // A dip below the floor is not crossed on the way down.
        let dip = curve(&[(0.5, 0.9, 0.96), (0.7, 0.5, 0.90), (0.9, 0.2, 0.97)]);
        assert_eq!(floor_threshold(std::slice::from_ref(&dip), 0.95), Some(0.9));
        // Two exits: agreements multiply, and the floor holds for the product (each exit
        // alone keeps 0.95 at 0.9, both together only 0.94; at 0.95 0.990 x 0.97 = 0.960).
        let both = expected_agreement(&[c.clone(), dip.clone()], 0.9).unwrap();
        assert!((both - 0.969 * 0.97).abs() < 1e-9);
        assert_eq!(floor_threshold(&[c.clone(), dip.clone()], 0.95), Some(0.95));
        assert_eq!(floor_threshold(&[c.clone(), dip.clone()], 0.93), Some(0.9));
        assert_eq!(floor_threshold(&[c, dip], 0.97), None);
    }

    #[test]
    fn exit_chances_follow_the_highest_rate_so_far() {
        let at = |after_loop: u32, rate: f64| ExitCurve {
            after_loop,
            ..curve(&[(0.5, rate, 0.9), (0.9, rate / 2.0, 0.99)])
        };
        // One exit: its rate.
        let one: Vec<f64> = exit_chances(&[at(1, 0.4)], 0.5, 2).collect();
        assert_eq!(one, vec![0.4]);
        // Four exits: 20% by loop 1, 50% by loop 2, still 50% by loop 3 (its own rate is
        // lower), 80% by loop 4.
        let c = [at(1, 0.2), at(2, 0.5), at(3, 0.3), at(4, 0.8)];
        let p: Vec<f64> = exit_chances(&c, 0.5, 5).collect();
        let want = [0.2, 0.3 / 0.8, 0.0, 0.3 / 0.5];
        for (g, w) in p.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{p:?}");
        }
        // The share that exits by each loop, walked through the chances, is the running max.
        let mut running = 1.0;
        let mut by = Vec::new();
        for q in &p {
            running *= 1.0 - q;
            by.push(1.0 - running);
        }
        for (g, w) in by.iter().zip([0.2, 0.5, 0.5, 0.8]) {
            assert!((g - w).abs() < 1e-12, "{by:?}");
        }
        // Interpolated at another threshold; a missing exit takes nobody.
        assert_eq!(
            exit_chances(&[at(2, 0.4)], 0.9, 3).collect::<Vec<_>>(),
            vec![0.0, 0.2]
        );
        // Everyone gone: later exits have nobody left to take.
        assert_eq!(
            exit_chances(&[at(1, 1.0), at(2, 1.0)], 0.5, 3).collect::<Vec<_>>(),
            vec![1.0, 0.0]
        );
    }

    #[test]
    fn policies_by_name() {
        assert_eq!(policy_by_name("learned"), Ok(ExitPolicy::Learned));
        assert_eq!(policy_by_name("max_prob"), Ok(ExitPolicy::MaxProb));
        let e = policy_by_name("best").unwrap_err();
        assert!(e.contains("max-prob") && e.contains("none"), "{e}");
    }

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
