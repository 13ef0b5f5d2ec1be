//! The hand-written gradients against PyTorch autograd: the committed fixture holds a tiny
//! recursive model (LoRA, per-loop norms, exit adapters and classifiers), a batch with a
//! teacher, and the float64 gradients `scripts/train_reference.py` computed for every trainable
//! tensor with all loss terms on (cross-entropy, top-k distillation at a temperature, the
//! early-exit loss with the last loop detached, the classifiers). `make train-fixtures`
//! regenerates it.

#![forbid(unsafe_code)]

mod common;

use std::path::PathBuf;

use candle_core::Device;
use rrt_train::{train_step, Batch, Grads, Groups, LossWeights, TeacherTopK, TrainModel};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytorch-gradients")
}

/// The fixture's model: the same structure `grad_fixture` built, every tensor from the file.
fn model() -> TrainModel {
    let mut model = TrainModel::from_llama(&common::tiny_recursive(4, 3)).unwrap();
    model.add_exit_heads(3, 1);
    let saved =
        candle_core::safetensors::load(fixture().join("params.safetensors"), &Device::Cpu).unwrap();
    for p in &mut model.params.list {
        let t = saved
            .get(&p.name)
            .unwrap_or_else(|| panic!("{} missing from the fixture", p.name));
        p.value = t.flatten_all().unwrap().to_vec1().unwrap();
    }
    model
        .set_trainable(Groups {
            shared: true,
            lora: true,
            norms: true,
            exits: true,
        })
        .unwrap();
    model
}

#[test]
fn every_gradient_equals_pytorch_autograd() {
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("spec.json")).unwrap())
            .unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap())
            .unwrap();
    let model = model();
    let b = &spec["batch"];
    let u32s = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let f32s = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let batch = Batch {
        tokens: u32s(&b["tokens"]),
        seqs: b["seqs"].as_u64().unwrap() as usize,
        t: b["t"].as_u64().unwrap() as usize,
        teacher: Some(TeacherTopK {
            k: b["k"].as_u64().unwrap() as usize,
            ids: u32s(&b["teacher_ids"]),
            logits: f32s(&b["teacher_logits"]),
            lse: f32s(&b["teacher_lse"]),
        }),
    };
    let weights: LossWeights = serde_json::from_value(spec["weights"].clone()).unwrap();
    let rows = batch.rows();
    let mut grads = Grads::zeros(&model.params);
    let sums = train_step(&model, &batch, weights, 1.0 / rows as f32, &mut grads);
    let want_objective = expected["objective_per_row"].as_f64().unwrap();
    let objective = sums.objective / rows as f64;
    assert!(
        (objective - want_objective).abs() < 1e-4 * want_objective.abs(),
        "objective {objective} vs PyTorch {want_objective}"
    );
    let reference =
        candle_core::safetensors::load(fixture().join("grads.safetensors"), &Device::Cpu).unwrap();
    let (mut checked, mut worst) = (0, (0.0f64, String::new()));
    for (p, g) in model.params.list.iter().zip(&grads.0) {
        if !p.trainable {
            continue;
        }
        let want: Vec<f32> = reference[&p.name].flatten_all().unwrap().to_vec1().unwrap();
        let diff: f64 = g
            .iter()
            .zip(&want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
        let rel = diff / norm.max(1e-12);
        assert!(
            rel < 1e-3,
            "{}: relative error {rel:.2e} (norm {norm:.3e})",
            p.name
        );
        if rel > worst.0 {
            worst = (rel, p.name.clone());
        }
        checked += 1;
    }
    eprintln!(
        "{checked} gradients match PyTorch; the largest relative error is {:.2e} ({})",
        worst.0, worst.1
    );
    assert_eq!(checked, spec["trainable"].as_array().unwrap().len());
}
