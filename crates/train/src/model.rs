//! One training batch through the whole model: embeddings, every unrolled layer (keeping what
//! the backward pass needs), the exit heads and losses after every loop, then the backward pass
//! from the last layer down, each loop's exit gradient joining where that loop ended.

use rayon::prelude::*;
use rrt_model::kernels::gemm::{gemm, MatMut, MatRef};

use crate::layer::{self, Ctx};
use crate::loss::{self, LossSums, LossWeights, TeacherTopK};
use crate::params::{Grads, TrainModel};

/// Packed training sequences: `seqs` rows of `t + 1` tokens (the inputs are the first `t`, the
/// targets the last `t`), and the teacher's view of each input position.
#[derive(Debug, Clone)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub seqs: usize,
    pub t: usize,
    pub teacher: Option<TeacherTopK>,
}

impl Batch {
    /// The input tokens, `[seqs * t]`.
    pub fn inputs(&self) -> Vec<u32> {
        self.tokens
            .chunks(self.t + 1)
            .flat_map(|s| s[..self.t].iter().copied())
            .collect()
    }

    /// The next token of each input position.
    pub fn targets(&self) -> Vec<u32> {
        self.tokens
            .chunks(self.t + 1)
            .flat_map(|s| s[1..].iter().copied())
            .collect()
    }

    pub fn rows(&self) -> usize {
        self.seqs * self.t
    }
}

fn embed(model: &TrainModel, tokens: &[u32]) -> Vec<f32> {
    let h = model.cfg.hidden_size;
    let e = model.params.get(model.embed);
    let mut x = vec![0f32; tokens.len() * h];
    x.par_chunks_mut(h)
        .zip(tokens.par_iter())
        .for_each(|(row, &t)| {
            row.copy_from_slice(&e[t as usize * h..(t as usize + 1) * h]);
        });
    x
}

/// The hidden state after every loop (the last is the model's output), keeping each layer's
/// saved activations when `keep` (training).
fn forward(model: &TrainModel, batch: &Batch, keep: bool) -> (Vec<Vec<f32>>, Vec<layer::Saved>) {
    let ctx = Ctx { model, t: batch.t };
    let block = model.block();
    let mut x = embed(model, &batch.inputs());
    let mut saved = Vec::with_capacity(if keep { model.unrolled.len() } else { 0 });
    let mut exits = Vec::with_capacity(model.loops());
    for l in 0..model.unrolled.len() {
        let (y, s) = layer::forward(&ctx, l, x);
        if keep {
            saved.push(s);
        }
        x = y;
        if (l + 1) % block == 0 {
            exits.push(x.clone());
        }
    }
    (exits, saved)
}

/// Seconds a training batch spent in each part.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartTimes {
    /// The layers' forward pass.
    pub forward: f64,
    /// Every loop's head: logits, losses and their gradients.
    pub heads: f64,
    /// The layers' backward pass.
    pub backward: f64,
}

impl PartTimes {
    pub fn add(&mut self, o: &PartTimes) {
        self.forward += o.forward;
        self.heads += o.heads;
        self.backward += o.backward;
    }
}

/// Forward and backward of one batch: adds the gradients of the objective (times `scale`) into
/// `grads` and returns the loss sums.
pub fn train_step(
    model: &TrainModel,
    batch: &Batch,
    w: LossWeights,
    scale: f32,
    grads: &mut Grads,
) -> LossSums {
    train_step_timed(model, batch, w, scale, grads).0
}

/// [`train_step`], with the time of each part.
pub fn train_step_timed(
    model: &TrainModel,
    batch: &Batch,
    w: LossWeights,
    scale: f32,
    grads: &mut Grads,
) -> (LossSums, PartTimes) {
    let mut times = PartTimes::default();
    let clock = std::time::Instant::now();
    let train_layers = model.layers_train();
    let (exits, mut saved) = forward(model, batch, train_layers);
    times.forward = clock.elapsed().as_secs_f64();
    let targets = batch.targets();
    let teacher = batch.teacher.as_ref();
    let (sums, mut dexits) = loss::heads(model, &exits, &targets, teacher, w, scale, grads);
    drop(exits);
    times.heads = clock.elapsed().as_secs_f64() - times.forward;
    if !train_layers {
        // Only the exit heads (or the final norm) train: nothing below them needs a gradient.
        return (sums, times);
    }
    let ctx = Ctx { model, t: batch.t };
    let block = model.block();
    let mut dx = dexits.pop().unwrap_or_default();
    for l in (0..model.unrolled.len()).rev() {
        let s = saved.pop().expect("one saved state per layer");
        dx = layer::backward(&ctx, l, &s, dx, grads);
        if l % block == 0 && l > 0 {
            // The input of layer l is where loop l / block - 1 ended (an exit).
            let exit = &dexits[l / block - 1];
            dx.par_iter_mut()
                .zip(exit.par_iter())
                .for_each(|(a, b)| *a += b);
        }
    }
    times.backward = clock.elapsed().as_secs_f64() - times.forward - times.heads;
    (sums, times)
}

/// The hidden state after every loop, without keeping anything for a backward pass.
pub fn exits(model: &TrainModel, batch: &Batch) -> Vec<Vec<f32>> {
    forward(model, batch, false).0
}

/// Every loop's exit logits (`[rows, vocab]` each): final norm and LM head on the hidden state
/// after the loop (tests and evaluation).
pub fn exit_logits(model: &TrainModel, batch: &Batch) -> Vec<Vec<f32>> {
    let (h, v) = (model.cfg.hidden_size, model.cfg.vocab_size);
    let rows = batch.rows();
    let (exits, _) = forward(model, batch, false);
    let gf = model.params.get(model.final_norm);
    let head = model.params.get(model.head());
    exits
        .iter()
        .map(|x| {
            let (n, _) = crate::norm::forward(x, gf, model.cfg.rms_norm_eps as f32);
            let mut z = vec![0f32; rows * v];
            gemm(
                MatMut::new(&mut z, rows, v),
                MatRef::new(&n, rows, h),
                MatRef::new(head, v, h).t(),
                false,
            );
            z
        })
        .collect()
}

/// The losses of one batch without gradients (evaluation).
pub fn eval_step(model: &TrainModel, batch: &Batch, w: LossWeights) -> LossSums {
    let (exits, _) = forward(model, batch, false);
    let mut none = Grads(vec![Vec::new(); model.params.list.len()]);
    loss::heads(
        model,
        &exits,
        &batch.targets(),
        batch.teacher.as_ref(),
        w,
        1.0,
        &mut none,
    )
    .0
}
