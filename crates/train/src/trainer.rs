//! The training loop: optimizer steps of `accum` micro-batches of packed windows in a seeded
//! order, the learning-rate schedule, gradient clipping, a held-out evaluation every so many
//! steps, checkpoints, and the matmul roofline the step's speed is measured against.

use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Position};
use crate::data::{Corpus, Split};
use crate::error::{Result, TrainError};
use crate::exit_fit::{self, ClassifierReport, FitReport};
use crate::loss::{LossSums, LossWeights};
use crate::model::{eval_step, train_step_timed, Batch, PartTimes};
use crate::optim::{clip, AdamW, AdamWConfig, Schedule};
use crate::params::{Grads, TrainModel};
use crate::teacher::TeacherCache;

/// A run's settings (all of them change the result; a resumed run must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub seq_len: usize,
    pub batch_seqs: usize,
    pub accum: usize,
    pub steps: u64,
    pub schedule: Schedule,
    pub clip: f64,
    pub adam: AdamWConfig,
    pub seed: u64,
    pub loss: LossWeights,
    pub top_k: usize,
    pub groups: String,
    /// The matrix products' precision (`--dtype`).
    #[serde(default)]
    pub precision: crate::Precision,
}

/// One optimizer step's figures.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub tokens: u64,
    pub lr: f32,
    /// The weighted objective per token.
    pub objective: f64,
    /// Cross-entropy and distillation per loop, per token.
    pub ce: Vec<f64>,
    pub kd: Vec<f64>,
    pub grad_norm: f64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Where the step's time went.
    pub parts: StepParts,
}

/// Seconds of one optimizer step by part.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepParts {
    /// The teacher's forward over windows its cache lacked.
    pub teacher: f64,
    /// Assembling micro-batches (tokens and the cached teacher top-k).
    pub data: f64,
    pub forward: f64,
    pub heads: f64,
    pub backward: f64,
    /// Clipping and the AdamW update.
    pub optimizer: f64,
}

/// A held-out evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRecord {
    pub step: u64,
    /// Perplexity after each loop (exp of the cross-entropy).
    pub perplexity: Vec<f64>,
    pub kd: Vec<f64>,
    /// Share of tokens whose argmax after the loop equals the last loop's.
    pub agreement: Vec<f64>,
    /// Per loop with an exit classifier: its trade-off at several thresholds.
    pub exit_curve: Vec<Vec<ExitPoint>>,
    /// With several exits, what they do together as the engine runs them (a token leaves at
    /// the first exit it passes), at the same thresholds.
    pub cascade: Vec<CascadePoint>,
}

/// The usual thresholds of the exit curves.
const THRESHOLDS: [f32; 13] = [
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99,
];

/// The cascade of the exits whose `points` (per loop: every row's probability and agreement,
/// the rows in the same order for every loop) are there; empty with fewer than two exits.
pub fn cascade_curve(points: &[Vec<(f32, bool)>]) -> Vec<CascadePoint> {
    let loops = points.len();
    let exits: Vec<usize> = (0..loops.saturating_sub(1))
        .filter(|&j| !points[j].is_empty())
        .collect();
    let Some(&first) = exits.first() else {
        return Vec::new();
    };
    let rows = points[first].len();
    if exits.len() < 2 || exits.iter().any(|&j| points[j].len() != rows) || rows == 0 {
        return Vec::new();
    }
    THRESHOLDS
        .iter()
        .map(|&threshold| {
            let mut exit_share = vec![0.0; loops];
            let (mut agree, mut depth) = (0usize, 0usize);
            // i indexes the rows of every exit's points alike.
            #[allow(clippy::needless_range_loop)]
            for i in 0..rows {
                match exits.iter().find(|&&j| points[j][i].0 >= threshold) {
                    Some(&j) => {
                        exit_share[j] += 1.0;
                        agree += usize::from(points[j][i].1);
                        depth += j + 1;
                    }
                    None => {
                        agree += 1;
                        depth += loops;
                    }
                }
            }
            let n = rows as f64;
            exit_share.iter_mut().for_each(|x| *x /= n);
            CascadePoint {
                threshold,
                exit_share,
                agreement: agree as f64 / n,
                mean_loops: depth as f64 / n,
            }
        })
        .collect()
}

pub use rrt_model::recursive::exit_heads::{CascadePoint, ExitPoint};

/// The exit trade-off of `(probability, agrees)` points at the usual thresholds.
pub fn exit_curve(points: &[(f32, bool)]) -> Vec<ExitPoint> {
    if points.is_empty() {
        return Vec::new();
    }
    let n = points.len() as f64;
    THRESHOLDS
        .iter()
        .map(|&threshold| {
            let exiting: Vec<bool> = points
                .iter()
                .filter(|p| p.0 >= threshold)
                .map(|p| p.1)
                .collect();
            let agree = exiting.iter().filter(|&&a| a).count() as f64;
            let exits = exiting.len() as f64;
            ExitPoint {
                threshold,
                exit_rate: exits / n,
                exit_agreement: if exiting.is_empty() {
                    1.0
                } else {
                    agree / exits
                },
                overall_agreement: 1.0 - (exits - agree) / n,
            }
        })
        .collect()
}

/// The data a run reads: the corpus, which windows train and which evaluate, and the
/// teacher's cached view of each (`None`: no distillation).
pub struct Data {
    pub train: Corpus,
    pub split: Split,
    pub train_teacher: Option<TeacherCache>,
    /// A separate held-out text (else `split.eval` windows of `train`).
    pub eval: Option<(Corpus, Option<TeacherCache>)>,
    pub eval_windows: usize,
    /// The teacher, when the training windows' top-k are computed as the run reaches them
    /// (into `train_teacher`, saved with each checkpoint).
    pub teacher: Option<TrainModel>,
}

pub struct Trainer {
    pub model: TrainModel,
    pub opt: AdamW,
    pub settings: Settings,
    pub data: Data,
    pub position: Position,
    grads: Grads,
    order: Vec<usize>,
    pub out: PathBuf,
    /// Training windows the teacher computed during this run (not found in its cache).
    pub teacher_computed: usize,
}

impl Trainer {
    pub fn new(
        mut model: TrainModel,
        settings: Settings,
        data: Data,
        out: PathBuf,
    ) -> Result<Self> {
        model.precision = settings.precision;
        if model.params.trainable_count() == 0 {
            return Err(TrainError::Input(
                "nothing to train: the chosen groups have no tensors".into(),
            ));
        }
        if settings.batch_seqs == 0 || settings.accum == 0 || settings.seq_len == 0 {
            return Err(TrainError::Input(
                "--batch-seqs, --accum and --seq-len must be at least 1".into(),
            ));
        }
        if data.split.train.len() < settings.batch_seqs {
            return Err(TrainError::Input(format!(
                "the training text has {} sequences of {} tokens, fewer than one batch of {}",
                data.split.train.len(),
                settings.seq_len,
                settings.batch_seqs
            )));
        }
        let opt = AdamW::new(settings.adam, &model.params);
        let grads = Grads::zeros(&model.params);
        let order = data.split.epoch_order(settings.seed, 0);
        Ok(Self {
            model,
            opt,
            settings,
            data,
            position: Position::default(),
            grads,
            order,
            out,
            teacher_computed: 0,
        })
    }

    fn settings_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).unwrap_or_default()
    }

    /// Continues from the checkpoint in the output directory.
    pub fn resume(&mut self) -> Result<()> {
        let s = self.settings_json();
        self.position = checkpoint::load(&self.out, &mut self.model.params, &mut self.opt, &s)?;
        self.model.packs.clear();
        self.order = self
            .data
            .split
            .epoch_order(self.settings.seed, self.position.epoch);
        Ok(())
    }

    pub fn checkpoint(&self) -> Result<()> {
        self.checkpoint_to(&checkpoint::Disk)
    }

    /// [`Trainer::checkpoint`] through other storage (tests: a disk that fills up).
    pub fn checkpoint_to(&self, storage: &dyn checkpoint::Storage) -> Result<()> {
        // The teacher's outputs first: a checkpoint never points past what the cache holds
        // (a resumed run would only recompute them).
        if let (Some(_), Some(cache)) = (&self.data.teacher, &self.data.train_teacher) {
            if self.teacher_computed > 0 {
                cache.save()?;
            }
        }
        checkpoint::save(
            storage,
            &self.out,
            &self.model.params,
            &self.opt,
            &self.position,
            &self.settings_json(),
        )
    }

    /// Fits the exit adapters in closed form ([`exit_fit`]) on the first `windows` windows of
    /// the run's first epoch, before any step.
    pub fn fit_exit_adapters(&mut self, windows: usize, ridge: f64) -> Result<Vec<FitReport>> {
        let batches = self.first_batches(windows);
        exit_fit::fit_adapters(&mut self.model, batches.into_iter(), ridge)
    }

    /// Fits the exit classifiers in closed form ([`exit_fit::fit_classifiers`]) on the first
    /// `windows` windows of the run's first epoch (after training: on the final adapters).
    pub fn fit_exit_classifiers(
        &mut self,
        windows: usize,
        ridge: f64,
    ) -> Result<Vec<ClassifierReport>> {
        let batches = self.first_batches(windows);
        exit_fit::fit_classifiers(&mut self.model, batches.into_iter(), ridge)
    }

    /// The first `windows` training windows of epoch 0, as micro-batches.
    fn first_batches(&self, windows: usize) -> Vec<Batch> {
        let order = self.data.split.epoch_order(self.settings.seed, 0);
        let t = self.settings.seq_len;
        order[..windows.min(order.len())]
            .chunks(self.settings.batch_seqs.max(1))
            .map(|c| Self::batch(&self.data.train, None, c, t))
            .collect()
    }

    /// The windows the held-out evaluation reads (of the evaluation text when there is one).
    pub fn eval_windows(&self) -> Vec<usize> {
        match &self.data.eval {
            Some((c, _)) => {
                (0..c.windows(self.settings.seq_len).min(self.data.eval_windows)).collect()
            }
            None => self.data.split.eval.clone(),
        }
    }

    /// The next micro-batch's windows (a new epoch's order when this one is used up).
    fn next_windows(&mut self) -> Vec<usize> {
        let b = self.settings.batch_seqs;
        if (self.position.offset + 1) * b > self.order.len() {
            self.position.epoch += 1;
            self.position.offset = 0;
            self.order = self
                .data
                .split
                .epoch_order(self.settings.seed, self.position.epoch);
        }
        let w = self.order[self.position.offset * b..(self.position.offset + 1) * b].to_vec();
        self.position.offset += 1;
        w
    }

    fn batch(
        corpus: &Corpus,
        teacher: Option<&TeacherCache>,
        windows: &[usize],
        t: usize,
    ) -> Batch {
        Batch {
            tokens: windows
                .iter()
                .flat_map(|&w| corpus.window(w, t).iter().copied())
                .collect(),
            seqs: windows.len(),
            t,
            teacher: teacher.map(|c| c.batch(windows)),
        }
    }

    /// One optimizer step. A non-finite loss stops the run before the update (the last
    /// checkpoint stays the last good state).
    pub fn step(&mut self) -> Result<StepRecord> {
        let started = Instant::now();
        let s = self.settings.clone();
        let rows = s.batch_seqs * s.seq_len;
        let scale = 1.0 / (rows * s.accum) as f32;
        self.grads.clear();
        let mut sums = LossSums::default();
        let (mut parts, mut times) = (StepParts::default(), PartTimes::default());
        for _ in 0..s.accum {
            let windows = self.next_windows();
            if let (Some(teacher), Some(cache)) = (&self.data.teacher, &mut self.data.train_teacher)
            {
                let t = Instant::now();
                self.teacher_computed += cache.compute(
                    teacher,
                    &self.data.train,
                    &windows,
                    s.batch_seqs,
                    &|_, _| {},
                );
                parts.teacher += t.elapsed().as_secs_f64();
            }
            let clock = Instant::now();
            let batch = Self::batch(
                &self.data.train,
                self.data.train_teacher.as_ref(),
                &windows,
                s.seq_len,
            );
            parts.data += clock.elapsed().as_secs_f64();
            let (batch_sums, batch_times) =
                train_step_timed(&self.model, &batch, s.loss, scale, &mut self.grads);
            sums.add(&batch_sums);
            times.add(&batch_times);
        }
        (parts.forward, parts.heads, parts.backward) = (times.forward, times.heads, times.backward);
        let clock = Instant::now();
        let n = sums.rows.max(1) as f64;
        let objective = sums.objective / n;
        if !objective.is_finite() {
            return Err(TrainError::Input(format!(
                "the loss is {objective} at step {}: stopping (the last checkpoint is kept; lower --lr?)",
                self.position.step + 1
            )));
        }
        let grad_norm = clip(&mut self.grads, s.clip);
        let lr = s.schedule.lr(self.position.step);
        self.opt.update(&mut self.model.params, &self.grads, lr);
        self.model.packs.clear();
        parts.optimizer = clock.elapsed().as_secs_f64();
        self.position.step += 1;
        self.position.tokens += (rows * s.accum) as u64;
        let seconds = started.elapsed().as_secs_f64();
        Ok(StepRecord {
            step: self.position.step,
            tokens: self.position.tokens,
            lr,
            objective,
            ce: sums.ce.iter().map(|x| x / n).collect(),
            kd: sums.kd.iter().map(|x| x / n).collect(),
            grad_norm,
            seconds,
            tokens_per_s: (rows * s.accum) as f64 / seconds,
            parts,
        })
    }

    /// Held-out losses: perplexity, distillation and agreement with the last loop, per loop.
    pub fn evaluate(&self) -> EvalRecord {
        let t = self.settings.seq_len;
        let windows = self.eval_windows();
        let (corpus, teacher): (&Corpus, Option<&TeacherCache>) = match &self.data.eval {
            Some((c, teacher)) => (c, teacher.as_ref()),
            None => (&self.data.train, self.data.train_teacher.as_ref()),
        };
        let mut sums = LossSums::default();
        for chunk in windows.chunks(self.settings.batch_seqs.max(1)) {
            let batch = Self::batch(corpus, teacher, chunk, t);
            sums.add(&eval_step(&self.model, &batch, self.settings.loss));
        }
        let n = sums.rows.max(1) as f64;
        EvalRecord {
            step: self.position.step,
            perplexity: sums.ce.iter().map(|x| (x / n).exp()).collect(),
            kd: sums.kd.iter().map(|x| x / n).collect(),
            agreement: sums.agree_with_last.iter().map(|&a| a as f64 / n).collect(),
            exit_curve: sums
                .classifier_points
                .iter()
                .map(|p| exit_curve(p))
                .collect(),
            cascade: cascade_curve(&sums.classifier_points),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cascade_takes_each_token_at_the_first_exit_it_passes() {
        // Three loops, exits after loops 1 and 2; four tokens.
        let points = vec![
            vec![(0.95, true), (0.3, false), (0.3, true), (0.1, false)],
            vec![(0.99, true), (0.92, false), (0.5, true), (0.2, true)],
            Vec::new(),
        ];
        let c = cascade_curve(&points);
        let at = |t: f32| c.iter().find(|p| p.threshold == t).unwrap();
        // At 0.9: token 0 leaves at exit 1 (agrees), token 1 at exit 2 (disagrees), tokens 2
        // and 3 run all three loops.
        let p = at(0.9);
        assert_eq!(p.exit_share, vec![0.25, 0.25, 0.0]);
        assert_eq!(p.agreement, 0.75);
        assert_eq!(p.mean_loops, (1.0 + 2.0 + 3.0 + 3.0) / 4.0);
        // At 0.2: tokens 0-2 leave at exit 1 (token 1 disagrees there), token 3 at exit 2.
        let p = at(0.2);
        assert_eq!(p.exit_share, vec![0.75, 0.25, 0.0]);
        assert_eq!(p.agreement, 0.75);
        // One exit alone: no cascade.
        assert!(cascade_curve(&[points[0].clone(), Vec::new()]).is_empty());
    }
}
