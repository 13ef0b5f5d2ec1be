//! Load-adaptive exits: per model, a controller that lowers the threshold of the workers'
//! default exit policy as the model's workers saturate and restores it as load falls, never
//! below the threshold its measured curve says keeps the configured quality floor (agreement
//! with full depth). Each interval it reads the model's load from the registry (requests
//! waiting per sequence slot, KV blocks held over the pool, and with `--adapt-ttft-s` the
//! workers' 90th-percentile time to first token since their last reports against that
//! target); the threshold in force goes back
//! to each worker in its next report's answer. Requests that named their own exit policy, or
//! asked for quality FULL, never follow it (the workers see to that).
//!
//! Plain state behind a mutex, driven by the publisher's tick: unit-tested with made-up loads.

use std::collections::HashMap;
use std::sync::Mutex;

use rrt_proto::exits::ExitTradeoff;
use rrt_proto::v1 as pb;

/// The controller's settings (`--exit-quality-floor` and the `--adapt-*` flags).
#[derive(Debug, Clone, Copy)]
pub struct AdaptConfig {
    /// Agreement with full depth to keep (0..1); `None`: thresholds are never moved.
    pub quality_floor: Option<f64>,
    /// Requests waiting per sequence slot (over the model's workers) at which the model counts
    /// as saturated.
    pub queue_high: f64,
    /// KV blocks held over the pool (mean over the model's workers) at which it counts as
    /// saturated.
    pub kv_high: f64,
    /// Time to first token (the workers' 90th percentile over the interval, seconds) at which
    /// it counts as saturated; `None`: not a signal.
    pub ttft_high: Option<f64>,
    /// Share of the way from the configured threshold to the floor taken per saturated interval.
    pub lower_step: f64,
    /// Share of the way back taken per interval once pressure is below half of saturation.
    pub restore_step: f64,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        Self {
            quality_floor: None,
            queue_high: 0.05,
            kv_high: 0.9,
            ttft_high: None,
            lower_step: 0.25,
            restore_step: 0.1,
        }
    }
}

/// One model's load over its workers, as the registry sums it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ModelLoad {
    pub waiting: u64,
    pub slots: u64,
    pub kv_used: u64,
    pub kv_total: u64,
    /// The workers' 90th-percentile time to first token over their last intervals, weighted
    /// by their first tokens (seconds), and how many first tokens that is (0: no signal).
    pub ttft_p90: f64,
    pub ttft_samples: u64,
}

impl ModelLoad {
    /// Adds one worker's 90th-percentile time to first token over `samples` first tokens.
    pub fn add_ttft(&mut self, p90: f64, samples: u32) {
        if samples == 0 || !p90.is_finite() {
            return;
        }
        let n = self.ttft_samples + samples as u64;
        self.ttft_p90 =
            (self.ttft_p90 * self.ttft_samples as f64 + p90 * samples as f64) / n as f64;
        self.ttft_samples = n;
    }

    /// Saturation: 1.0 where any signal reaches its high mark.
    pub fn pressure(&self, cfg: &AdaptConfig) -> f64 {
        let queue = self.waiting as f64 / self.slots.max(1) as f64 / cfg.queue_high.max(1e-9);
        let kv = self.kv_used as f64 / self.kv_total.max(1) as f64 / cfg.kv_high.max(1e-9);
        let ttft = match cfg.ttft_high {
            Some(high) if self.ttft_samples > 0 => self.ttft_p90 / high.max(1e-9),
            _ => 0.0,
        };
        queue.max(kv).max(ttft)
    }
}

/// What a model's workers told the coordinator about their default exit.
#[derive(Debug, Clone)]
struct ModelExits {
    /// The configured threshold (where the controller rests).
    nominal: f32,
    /// The lowest threshold the quality floor allows (== nominal: nothing to move).
    floor: f32,
    exits: ExitTradeoff,
    /// 0: the configured threshold; 1: the floor.
    level: f64,
    pressure: f64,
}

impl ModelExits {
    fn threshold(&self) -> f32 {
        self.nominal - (self.level as f32) * (self.nominal - self.floor)
    }
}

/// The state of one model's controller after a tick (for metrics and benchmarks).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelAdaptation {
    pub model: String,
    pub threshold: f32,
    pub nominal: f32,
    pub floor: f32,
    pub pressure: f64,
    /// Agreement with full depth at the threshold in force, from the curve.
    pub expected_agreement: Option<f64>,
}

#[derive(Debug, Default)]
pub struct Adaptive {
    cfg: AdaptConfig,
    models: Mutex<HashMap<String, ModelExits>>,
}

impl Adaptive {
    pub fn new(cfg: AdaptConfig) -> Self {
        Self {
            cfg,
            models: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ModelExits>> {
        self.models.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Learns a model's default exit and curves from a registration. Only learned exits have a
    /// measured curve; a model whose default policy is another one (or none), or that has no
    /// curve, or whose floor is not below its threshold, is left alone. `Some(reason)` says
    /// why a worker with a default exit policy is not adapted (for the log).
    pub fn learn(&self, req: &pb::RegisterRequest) -> Option<String> {
        let floor = self.cfg.quality_floor?;
        let exit = req.default_exit?;
        if exit.policy != pb::ExitPolicy::Learned as i32 {
            return (exit.policy != pb::ExitPolicy::None as i32).then(|| {
                "its default exit policy is not LEARNED (only learned exits have a measured curve)"
                    .to_string()
            });
        }
        let exits = ExitTradeoff::of(req);
        if let Err(e) = exits.check() {
            return Some(format!("its model's exit trade-off is malformed: {e}"));
        }
        let Some(floor_t) = exits.floor_threshold(floor) else {
            return Some(format!(
                "its model has no threshold curve that keeps {:.1}% agreement",
                100.0 * floor
            ));
        };
        let mut models = self.lock();
        let level = models.get(&req.model).map_or(0.0, |m| m.level);
        let nominal = exit.threshold;
        models.insert(
            req.model.clone(),
            ModelExits {
                nominal,
                floor: floor_t.min(nominal),
                exits,
                level,
                pressure: 0.0,
            },
        );
        None
    }

    /// One interval: each adapted model's pressure moves its level; returns every adapted
    /// model's state.
    pub fn tick(&self, loads: &HashMap<String, ModelLoad>) -> Vec<ModelAdaptation> {
        let mut out = Vec::new();
        let mut models = self.lock();
        for (name, m) in models.iter_mut() {
            let pressure = loads.get(name).map_or(0.0, |l| l.pressure(&self.cfg));
            if pressure >= 1.0 {
                m.level = (m.level + self.cfg.lower_step).min(1.0);
            } else if pressure < 0.5 {
                m.level = (m.level - self.cfg.restore_step).max(0.0);
            }
            m.pressure = pressure;
            let threshold = m.threshold();
            out.push(ModelAdaptation {
                model: name.clone(),
                threshold,
                nominal: m.nominal,
                floor: m.floor,
                pressure,
                expected_agreement: m.exits.expected_agreement(threshold),
            });
        }
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// The threshold to hand a worker of `model`: `None` while the model rests at its
    /// configured threshold (or is not adapted), so workers use their own.
    pub fn threshold_for(&self, model: &str) -> Option<f32> {
        self.lock()
            .get(model)
            .filter(|m| m.level > 0.0)
            .map(|m| m.threshold())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve() -> Vec<pb::ExitCurve> {
        let points = [(0.5, 0.75, 0.80), (0.7, 0.54, 0.89), (0.9, 0.25, 0.97)]
            .iter()
            .map(|&(threshold, exit_rate, agreement)| pb::ExitCurvePoint {
                threshold,
                exit_rate,
                agreement,
            })
            .collect();
        vec![pb::ExitCurve {
            after_loop: 1,
            points,
        }]
    }

    fn reg(model: &str, policy: pb::ExitPolicy, threshold: f32) -> pb::RegisterRequest {
        pb::RegisterRequest {
            worker_id: "w".into(),
            model: model.into(),
            loops: 2,
            default_exit: Some(pb::ExitParameters {
                policy: policy as i32,
                threshold,
            }),
            exit_curves: curve(),
            ..Default::default()
        }
    }

    fn load(waiting: u64, kv_used: u64) -> HashMap<String, ModelLoad> {
        HashMap::from([(
            "m".to_string(),
            ModelLoad {
                waiting,
                slots: 100,
                kv_used,
                kv_total: 1000,
                ..Default::default()
            },
        )])
    }

    #[test]
    fn time_to_first_token_is_a_signal_when_a_target_is_set() {
        let mut l = ModelLoad {
            slots: 100,
            kv_total: 1000,
            ..Default::default()
        };
        // Two workers: 10 first tokens at 0.5 s and 30 at 2.5 s weigh to 2.0 s.
        l.add_ttft(0.5, 10);
        l.add_ttft(2.5, 30);
        l.add_ttft(9.0, 0);
        assert!(
            (l.ttft_p90 - 2.0).abs() < 1e-9 && l.ttft_samples == 40,
            "{l:?}"
        );
        let off = AdaptConfig::default();
        assert_eq!(l.pressure(&off), 0.0, "no target: queue and KV only");
        let on = AdaptConfig {
            quality_floor: Some(0.88),
            ttft_high: Some(1.0),
            ..AdaptConfig::default()
        };
        assert!((l.pressure(&on) - 2.0).abs() < 1e-9);
        // An empty queue and KV, but first tokens at 2 s against a 1 s target: it lowers.
        let a = Adaptive::new(on);
        assert_eq!(a.learn(&reg("m", pb::ExitPolicy::Learned, 0.9)), None);
        let s = a.tick(&HashMap::from([("m".to_string(), l)]));
        assert!((s[0].threshold - 0.85).abs() < 1e-6, "{s:?}");
        // No first tokens in the interval: no TTFT signal (an idle model is not saturated).
        let idle = ModelLoad {
            slots: 100,
            kv_total: 1000,
            ..Default::default()
        };
        assert_eq!(idle.pressure(&on), 0.0);
    }

    #[test]
    fn saturation_lowers_the_threshold_to_the_floor_and_calm_restores_it() {
        let a = Adaptive::new(AdaptConfig {
            quality_floor: Some(0.88),
            ..AdaptConfig::default()
        });
        assert_eq!(a.learn(&reg("m", pb::ExitPolicy::Learned, 0.9)), None);
        // Calm: the configured threshold, and workers are told nothing.
        let s = a.tick(&load(0, 100));
        assert_eq!(s[0].threshold, 0.9);
        assert_eq!(a.threshold_for("m"), None);
        // Waiting requests at 0.3 per slot (above 0.05): a quarter of the way per interval.
        let s = a.tick(&load(30, 100));
        assert!((s[0].threshold - 0.85).abs() < 1e-6, "{s:?}");
        assert!(s[0].pressure > 1.0);
        assert_eq!(a.threshold_for("m"), Some(s[0].threshold));
        for _ in 0..10 {
            a.tick(&load(30, 100));
        }
        // Never below the floor: 88% agreement is kept down to 0.7.
        let s = a.tick(&load(0, 950));
        assert_eq!(s[0].threshold, 0.7, "KV pressure alone holds it there");
        assert_eq!(s[0].floor, 0.7);
        assert!((s[0].expected_agreement.unwrap() - 0.89).abs() < 1e-9);
        // Between half and full saturation it holds.
        let s = a.tick(&load(4, 100));
        assert_eq!(s[0].threshold, 0.7);
        // Below half it climbs back a tenth of the way per interval, then rests.
        let s = a.tick(&load(0, 100));
        assert!((s[0].threshold - 0.72).abs() < 1e-6, "{s:?}");
        for _ in 0..20 {
            a.tick(&load(0, 100));
        }
        assert_eq!(a.threshold_for("m"), None);
        assert_eq!(a.tick(&HashMap::new())[0].threshold, 0.9);
    }

    #[test]
    fn a_measured_cascade_sets_the_floor_of_a_model_with_several_exits() {
        let a = Adaptive::new(AdaptConfig {
            quality_floor: Some(0.85),
            ..AdaptConfig::default()
        });
        // Two exits with the same curve: combined, 0.89 x 0.89 = 0.79 at 0.7, so the floor
        // stops at 0.9 (0.97 x 0.97 = 0.94).
        let mut r = reg("m", pb::ExitPolicy::Learned, 0.9);
        r.loops = 3;
        r.exit_curves = [curve(), curve()].concat();
        r.exit_curves[1].after_loop = 2;
        assert_eq!(a.learn(&r), None);
        assert_eq!(a.tick(&HashMap::new())[0].floor, 0.9);
        // Measured together they keep 86% at 0.7 (a token sure at loop 1 is mostly right).
        r.exit_cascade = [(0.5, 0.78), (0.7, 0.86), (0.9, 0.95)]
            .iter()
            .map(|&(threshold, agreement)| pb::ExitCascadePoint {
                threshold,
                exit_share: vec![0.3, 0.2],
                agreement,
            })
            .collect();
        assert_eq!(a.learn(&r), None);
        let s = a.tick(&HashMap::new());
        assert_eq!(s[0].floor, 0.7);
        assert!((s[0].expected_agreement.unwrap() - 0.95).abs() < 1e-12);
        // A malformed one is not read: the model keeps what it had.
        r.exit_cascade[0].exit_share = vec![0.9, 0.9];
        assert!(a.learn(&r).unwrap().contains("malformed"));
        assert_eq!(a.tick(&HashMap::new())[0].floor, 0.7);
    }

    #[test]
    fn models_without_learned_exits_a_curve_or_a_floor_are_left_alone() {
        let off = Adaptive::new(AdaptConfig::default());
        assert_eq!(off.learn(&reg("m", pb::ExitPolicy::Learned, 0.9)), None);
        assert!(off.tick(&load(100, 1000)).is_empty());
        let a = Adaptive::new(AdaptConfig {
            quality_floor: Some(0.9),
            ..AdaptConfig::default()
        });
        assert!(a.learn(&reg("m", pb::ExitPolicy::MaxProb, 0.9)).is_some());
        assert_eq!(a.learn(&reg("m", pb::ExitPolicy::None, 0.9)), None);
        let mut no_curve = reg("m", pb::ExitPolicy::Learned, 0.9);
        no_curve.exit_curves.clear();
        assert!(a.learn(&no_curve).is_some());
        let strict = Adaptive::new(AdaptConfig {
            quality_floor: Some(0.99),
            ..AdaptConfig::default()
        });
        assert!(strict
            .learn(&reg("m", pb::ExitPolicy::Learned, 0.9))
            .is_some());
        assert!(a.tick(&load(100, 1000)).is_empty());
        assert_eq!(a.threshold_for("m"), None);
    }
}
