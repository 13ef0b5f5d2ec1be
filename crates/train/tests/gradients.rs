//! The hand-written backward pass against the forward pass it differentiates: on a tiny
//! recursive model (2 loops, LoRA, per-loop norms, grouped-query attention, tied head), every
//! trainable tensor's gradient matches central finite differences of the objective along a
//! random direction, with cross-entropy, distillation (a temperature, the top-k bucket) and the
//! early-exit terms all on. And the training forward computes the same logits after every loop
//! as the inference model does.

#![forbid(unsafe_code)]

mod common;

use candle_core::{DType, Tensor};
use rrt_model::{BatchItem, Logits};
use rrt_train::{
    eval_step, train_step, Batch, Grads, Groups, LossWeights, TeacherTopK, TrainModel,
};

/// A deterministic pseudo-random stream in [-0.5, 0.5).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Two sequences of 9 tokens and a teacher whose top-5 comes from random logits.
fn batch(vocab: usize, temperature: f32) -> Batch {
    let (seqs, t, k) = (2, 8, 5);
    let tokens: Vec<u32> = noise(seqs * (t + 1), 7)
        .iter()
        .map(|x| ((x + 0.5) * vocab as f32) as u32)
        .collect();
    let rows = seqs * t;
    let mut teacher = TeacherTopK {
        k,
        ..Default::default()
    };
    for r in 0..rows {
        let logits: Vec<f32> = noise(vocab, 100 + r as u64)
            .iter()
            .map(|x| 8.0 * x)
            .collect();
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let max = logits[order[0]] / temperature;
        let lse = max
            + logits
                .iter()
                .map(|&l| (l / temperature - max).exp())
                .sum::<f32>()
                .ln();
        teacher.ids.extend(order[..k].iter().map(|&i| i as u32));
        teacher.logits.extend(order[..k].iter().map(|&i| logits[i]));
        teacher.lse.push(lse);
    }
    Batch {
        tokens,
        seqs,
        t,
        teacher: Some(teacher),
    }
}

fn weights() -> LossWeights {
    // The early-exit self-distillation holds the last loop fixed, which finite differences of
    // the objective cannot (its gradient is tested on the logits in the loss module).
    LossWeights {
        ce: 0.3,
        kd: 0.7,
        temperature: 2.0,
        exit_weight: 0.4,
        self_kd: 0.0,
        classifier: 0.5,
    }
}

#[test]
fn every_gradient_matches_finite_differences() {
    let mut model = TrainModel::from_llama(&common::tiny_recursive(4, 3)).unwrap();
    model.add_exit_heads(3, 1);
    // A non-identity adapter, so both of its factors have gradients.
    let up = model.exits[0].up;
    let n = model.params.list[up.0].value.len();
    model.params.list[up.0].value = noise(n, 99).iter().map(|x| 0.3 * x).collect();
    let all = Groups {
        shared: true,
        lora: true,
        norms: true,
        exits: true,
    };
    model.set_trainable(all).unwrap();
    let b = batch(model.cfg.vocab_size, 2.0);
    let rows = b.rows() as f32;
    let mut grads = Grads::zeros(&model.params);
    let sums = train_step(&model, &b, weights(), 1.0 / rows, &mut grads);
    let objective = |m: &TrainModel| eval_step(m, &b, weights()).objective / rows as f64;
    assert!((sums.objective / rows as f64 - objective(&model)).abs() < 1e-6);
    let (mut checked, mut bad) = (0, Vec::new());
    for (i, p) in model.params.list.iter().enumerate() {
        if !p.trainable {
            continue;
        }
        let dir = noise(p.value.len(), 1000 + i as u64);
        let analytic: f64 = grads.0[i]
            .iter()
            .zip(&dir)
            .map(|(g, d)| *g as f64 * *d as f64)
            .sum();
        let eps = 1e-3f32;
        let shifted = |sign: f32| {
            let mut m = model.clone();
            for (x, d) in m.params.list[i].value.iter_mut().zip(&dir) {
                *x += sign * eps * d;
            }
            objective(&m)
        };
        let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps as f64);
        let err = (analytic - numeric).abs() / numeric.abs().max(1e-3);
        if err >= 2e-2 {
            bad.push(format!(
                "{}: analytic {analytic:.6} vs numeric {numeric:.6}",
                p.name
            ));
        }
        checked += 1;
    }
    assert!(
        bad.is_empty(),
        "{} of {checked} tensors differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(checked > 20, "{checked} tensors checked");
    // The exit classifier trained too (its gradient is of its own loss, checked above).
    assert!(sums.classifier_bce[0] > 0.0);
}

#[test]
fn the_training_forward_equals_the_inference_model_after_every_loop() {
    let llama = common::tiny_recursive(4, 3);
    let model = TrainModel::from_llama(&llama).unwrap();
    let b = batch(model.cfg.vocab_size, 1.0);
    let exits = rrt_train::model::exit_logits(&model, &b);
    for s in 0..b.seqs {
        let tokens = &b.inputs()[s * b.t..(s + 1) * b.t];
        let mut cache = llama.new_cache();
        let mut kv = llama.new_kv_pool();
        let want = llama
            .forward_loops(
                &mut kv,
                &mut [BatchItem {
                    tokens,
                    offset: 0,
                    cache: &mut cache,
                    logits: Logits::All,
                }],
                true,
            )
            .unwrap();
        for (j, w) in want.iter().enumerate() {
            let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let v = model.cfg.vocab_size;
            let got = &exits[j][s * b.t * v..(s + 1) * b.t * v];
            let err = got
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err < 1e-3,
                "loop {j}, sequence {s}: max logit difference {err}"
            );
        }
    }
    let _ = Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu);
}
