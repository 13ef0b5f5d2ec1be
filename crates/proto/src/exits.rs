//! The arithmetic of the exit statistics a worker reports and the coordinator and router read:
//! one definition of the mean exit loop of a histogram, of the throughput assumed before a
//! worker has measured any, and of reading a model's exit trade-off ([`ExitTradeoff`]: exit
//! chances and agreement at a threshold; the lowest threshold that keeps a quality floor).

use crate::v1::{ExitCascadePoint, ExitCurve, ExitCurvePoint, ExitPolicy, RegisterRequest};

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

/// `f` of the points at threshold `t` (each point's threshold by `at`), linear between
/// measured points and held at the ends; `None` without points.
fn interpolate<P>(
    points: &[P],
    at: impl Fn(&P) -> f32,
    t: f32,
    f: impl Fn(&P) -> f64,
) -> Option<f64> {
    let first = points.first()?;
    let last = points.last()?;
    if t <= at(first) {
        return Some(f(first));
    }
    if t >= at(last) {
        return Some(f(last));
    }
    let hi = points.iter().position(|p| at(p) >= t)?;
    let (a, b) = (&points[hi - 1], &points[hi]);
    let span = (at(b) - at(a)) as f64;
    let w = if span > 0.0 {
        (t - at(a)) as f64 / span
    } else {
        1.0
    };
    Some(f(a) + w * (f(b) - f(a)))
}

/// Share of tokens that exit at threshold `t` (interpolated).
pub fn exit_rate_at(points: &[ExitCurvePoint], t: f32) -> Option<f64> {
    interpolate(points, |p| p.threshold, t, |p| p.exit_rate)
}

/// Share of tokens that agree with full depth at threshold `t` (interpolated).
pub fn agreement_at(points: &[ExitCurvePoint], t: f32) -> Option<f64> {
    interpolate(points, |p| p.threshold, t, |p| p.agreement)
}

/// A model's measured exit trade-off as its workers register it: each exit's curve alone and,
/// with several exits, the cascade (the exits together as the engine runs them, a token leaving
/// at the first exit it passes). Where the cascade was measured it is read as it is; without
/// it the separate curves are combined, an estimate (a token that would pass an earlier exit is
/// taken to pass the later ones too, and the exits' agreements multiply).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExitTradeoff {
    pub curves: Vec<ExitCurve>,
    pub cascade: Vec<ExitCascadePoint>,
}

impl ExitTradeoff {
    /// What a worker's registration says.
    pub fn of(req: &RegisterRequest) -> Self {
        Self {
            curves: req.exit_curves.clone(),
            cascade: req.exit_cascade.clone(),
        }
    }

    /// Nothing measured.
    pub fn is_empty(&self) -> bool {
        self.curves.is_empty() && self.cascade.is_empty()
    }

    /// Checks what a file or a registration says: thresholds in [0, 1] and increasing, shares
    /// and agreements in [0, 1], a cascade's shares adding up to at most 1. The error names
    /// the field.
    pub fn check(&self) -> Result<(), String> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        fn increasing(t: impl Iterator<Item = f32>) -> bool {
            let mut last = f32::NEG_INFINITY;
            for x in t {
                if !(0.0..=1.0).contains(&x) || x <= last {
                    return false;
                }
                last = x;
            }
            true
        }
        for c in &self.curves {
            let at = format!("curves (after loop {})", c.after_loop);
            if c.after_loop == 0 {
                return Err("curves: after_loop is 1-based, got 0".into());
            }
            if !increasing(c.points.iter().map(|p| p.threshold)) {
                return Err(format!("{at}: thresholds must be in [0, 1] and increasing"));
            }
            if let Some(p) = c
                .points
                .iter()
                .find(|p| !unit(p.exit_rate) || !unit(p.agreement))
            {
                return Err(format!(
                    "{at}: exit_rate and agreement must be in [0, 1] (threshold {})",
                    p.threshold
                ));
            }
        }
        if !increasing(self.cascade.iter().map(|p| p.threshold)) {
            return Err("cascade: thresholds must be in [0, 1] and increasing".into());
        }
        for p in &self.cascade {
            let total: f64 = p.exit_share.iter().sum();
            if !unit(p.agreement) || !p.exit_share.iter().all(|&x| unit(x)) || total > 1.0 + 1e-6 {
                return Err(format!(
                    "cascade (threshold {}): shares and agreement must be in [0, 1] and the shares add up to at most 1 (they add up to {total})",
                    p.threshold
                ));
            }
        }
        Ok(())
    }

    /// The chance that a token still running at exit `j` leaves there, for the exits after
    /// loops `1..loops` at threshold `t` (index `j - 1`): what the share gone by exit `j` adds
    /// over the share gone before it, over the share still running. From the cascade the
    /// share gone is the sum of the shares leaving so far; from the separate curves it is the
    /// highest exit rate so far (with one exit, its rate). An exit without a curve or share
    /// takes nobody.
    pub fn exit_chances(&self, t: f32, loops: usize) -> impl Iterator<Item = f64> + '_ {
        (1..loops).scan(0.0f64, move |gone, j| {
            let by_now = if self.cascade.is_empty() {
                let rate = self
                    .curves
                    .iter()
                    .find(|c| c.after_loop as usize == j)
                    .and_then(|c| exit_rate_at(&c.points, t))
                    .unwrap_or(0.0);
                gone.max(rate.clamp(0.0, 1.0))
            } else {
                let share = interpolate(
                    &self.cascade,
                    |p| p.threshold,
                    t,
                    |p| p.exit_share.get(j - 1).copied().unwrap_or(0.0),
                )
                .unwrap_or(0.0);
                (*gone + share.max(0.0)).min(1.0)
            };
            let chance = if *gone < 1.0 {
                (by_now - *gone) / (1.0 - *gone)
            } else {
                0.0
            };
            *gone = by_now;
            Some(chance)
        })
    }

    /// The mean agreement with full depth a threshold keeps over every exit: the cascade's,
    /// or the product of the exits' agreements (a token that reached a later exit passed the
    /// earlier ones). `None` when nothing was measured.
    pub fn expected_agreement(&self, t: f32) -> Option<f64> {
        if !self.cascade.is_empty() {
            return interpolate(&self.cascade, |p| p.threshold, t, |p| p.agreement);
        }
        let mut any = false;
        let mut agree = 1.0;
        for c in &self.curves {
            if let Some(a) = agreement_at(&c.points, t) {
                agree *= a;
                any = true;
            }
        }
        any.then_some(agree)
    }

    /// The lowest threshold that keeps at least `floor` agreement with full depth over every
    /// exit ([`ExitTradeoff::expected_agreement`]: with several exits their losses add up, so
    /// each exit alone must keep more than the floor), read at the measured thresholds from the
    /// highest down while the floor holds (so a dip below it is never crossed). `None` when
    /// nothing was measured, or when even the highest threshold misses the floor.
    pub fn floor_threshold(&self, floor: f64) -> Option<f32> {
        let mut thresholds: Vec<f32> = if self.cascade.is_empty() {
            self.curves
                .iter()
                .flat_map(|c| c.points.iter().map(|p| p.threshold))
                .collect()
        } else {
            self.cascade.iter().map(|p| p.threshold).collect()
        };
        thresholds.sort_by(|a, b| b.total_cmp(a));
        thresholds.dedup();
        let mut lowest = None;
        for t in thresholds {
            if self.expected_agreement(t)? + 1e-12 < floor {
                break;
            }
            lowest = Some(t);
        }
        lowest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curves(c: &[ExitCurve]) -> ExitTradeoff {
        ExitTradeoff {
            curves: c.to_vec(),
            cascade: Vec::new(),
        }
    }

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
        assert_eq!(
            curves(std::slice::from_ref(&c)).floor_threshold(0.95),
            Some(0.9)
        );
        assert_eq!(
            curves(std::slice::from_ref(&c)).floor_threshold(0.88),
            Some(0.7)
        );
        assert_eq!(
            curves(std::slice::from_ref(&c)).floor_threshold(0.5),
            Some(0.5)
        );
        assert_eq!(
            curves(std::slice::from_ref(&c)).floor_threshold(0.995),
            None
        );
        assert_eq!(curves(&[]).floor_threshold(0.9), None);
        // A dip below the floor is not crossed on the way down.
        let dip = curve(&[(0.5, 0.9, 0.96), (0.7, 0.5, 0.90), (0.9, 0.2, 0.97)]);
        assert_eq!(
            curves(std::slice::from_ref(&dip)).floor_threshold(0.95),
            Some(0.9)
        );
        // Two exits: agreements multiply, and the floor holds for the product (each exit
        // alone keeps 0.95 at 0.9, both together only 0.94; at 0.95 0.990 x 0.97 = 0.960).
        let both = curves(&[c.clone(), dip.clone()])
            .expected_agreement(0.9)
            .unwrap();
        assert!((both - 0.969 * 0.97).abs() < 1e-9);
        assert_eq!(
            curves(&[c.clone(), dip.clone()]).floor_threshold(0.95),
            Some(0.95)
        );
        assert_eq!(
            curves(&[c.clone(), dip.clone()]).floor_threshold(0.93),
            Some(0.9)
        );
        assert_eq!(curves(&[c, dip]).floor_threshold(0.97), None);
    }

    #[test]
    fn exit_chances_follow_the_highest_rate_so_far() {
        let at = |after_loop: u32, rate: f64| ExitCurve {
            after_loop,
            ..curve(&[(0.5, rate, 0.9), (0.9, rate / 2.0, 0.99)])
        };
        // One exit: its rate.
        let one: Vec<f64> = curves(&[at(1, 0.4)]).exit_chances(0.5, 2).collect();
        assert_eq!(one, vec![0.4]);
        // Four exits: 20% by loop 1, 50% by loop 2, still 50% by loop 3 (its own rate is
        // lower), 80% by loop 4.
        let c = [at(1, 0.2), at(2, 0.5), at(3, 0.3), at(4, 0.8)];
        let p: Vec<f64> = curves(&c).exit_chances(0.5, 5).collect();
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
            curves(&[at(2, 0.4)])
                .exit_chances(0.9, 3)
                .collect::<Vec<_>>(),
            vec![0.0, 0.2]
        );
        // Everyone gone: later exits have nobody left to take.
        assert_eq!(
            curves(&[at(1, 1.0), at(2, 1.0)])
                .exit_chances(0.5, 3)
                .collect::<Vec<_>>(),
            vec![1.0, 0.0]
        );
    }

    #[test]
    fn a_measured_cascade_is_read_as_it_is() {
        // Two exits whose separate curves combine to 30% by loop 1 and 60% by loop 2 at 0.5,
        // while the cascade measured 30% at exit 1 and 40% more at exit 2, agreeing 80%.
        let at = |after_loop: u32, rate: f64, agree: f64| ExitCurve {
            after_loop,
            ..curve(&[(0.5, rate, agree), (0.9, rate / 3.0, 0.99)])
        };
        let point = |threshold: f32, shares: [f64; 2], agreement: f64| ExitCascadePoint {
            threshold,
            exit_share: shares.to_vec(),
            agreement,
        };
        let mut t = curves(&[at(1, 0.3, 0.9), at(2, 0.6, 0.9)]);
        let combined: Vec<f64> = t.exit_chances(0.5, 3).collect();
        assert!((combined[1] - 0.3 / 0.7).abs() < 1e-12, "{combined:?}");
        assert!((t.expected_agreement(0.5).unwrap() - 0.81).abs() < 1e-12);
        t.cascade = vec![point(0.5, [0.3, 0.4], 0.8), point(0.9, [0.1, 0.1], 0.98)];
        let chances: Vec<f64> = t.exit_chances(0.5, 3).collect();
        assert!((chances[0] - 0.3).abs() < 1e-12 && (chances[1] - 0.4 / 0.7).abs() < 1e-12);
        // Walked through, 70% leave by loop 2, as measured.
        let left = (1.0 - chances[0]) * (1.0 - chances[1]);
        assert!((left - 0.3).abs() < 1e-12, "{chances:?}");
        // Interpolated between thresholds (halfway: 20% and 25%).
        let mid: Vec<f64> = t.exit_chances(0.7, 3).collect();
        assert!(
            (mid[0] - 0.2).abs() < 1e-9 && (mid[1] - 0.25 / 0.8).abs() < 1e-9,
            "{mid:?}"
        );
        assert!((t.expected_agreement(0.5).unwrap() - 0.8).abs() < 1e-12);
        // The floor is read from the cascade's agreement, at its thresholds.
        assert_eq!(t.floor_threshold(0.8), Some(0.5));
        assert_eq!(t.floor_threshold(0.85), Some(0.9));
        assert_eq!(t.floor_threshold(0.99), None);
        // A model with more loops than the cascade has shares: the rest take nobody.
        assert_eq!(t.exit_chances(0.9, 4).nth(2), Some(0.0));
        assert_eq!(t.check(), Ok(()));
        // What a file or a registration may get wrong is named.
        let mut bad = t.clone();
        bad.cascade[1].exit_share = vec![0.7, 0.4];
        assert!(bad.check().unwrap_err().contains("at most 1"));
        let mut bad = t.clone();
        bad.cascade.swap(0, 1);
        assert!(bad.check().unwrap_err().contains("cascade: thresholds"));
        let mut bad = t.clone();
        bad.curves[1].points[0].agreement = 1.5;
        assert!(bad.check().unwrap_err().contains("after loop 2"));
        let mut bad = t;
        bad.curves[0].after_loop = 0;
        assert!(bad.check().unwrap_err().contains("1-based"));
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
