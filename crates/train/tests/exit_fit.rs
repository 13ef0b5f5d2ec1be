//! The closed-form fits of the exit heads on the tiny recursive model: the fitted adapter maps
//! the first loop's hidden state closer to the last loop's than the identity does, and the
//! exit's distillation loss from the last loop falls with it; the fitted classifier predicts
//! agreement with the last loop better than the untrained one, on held-out rows too.

#![forbid(unsafe_code)]

mod common;

use rrt_train::exit_fit::{fit_adapters, fit_classifiers};
use rrt_train::{eval_step, Batch, Groups, LossWeights, TrainModel};

fn batch(seed: u32) -> Batch {
    let (seqs, t) = (4, 24);
    let tokens = (0..seqs * (t + 1))
        .map(|i| (i as u32 * 37 + seed * 11 + (i as u32 * i as u32) % 13) % 128)
        .collect();
    Batch {
        tokens,
        seqs,
        t,
        teacher: None,
    }
}

fn exit_distillation(model: &TrainModel, b: &Batch) -> f64 {
    let only_self_kd = LossWeights {
        self_kd: 1.0,
        ..LossWeights::NONE
    };
    let sums = eval_step(model, b, only_self_kd);
    sums.self_kd[0] / sums.rows as f64
}

#[test]
fn the_fitted_adapter_brings_the_exit_closer_to_the_last_loop() {
    let mut model = TrainModel::from_llama(&common::tiny_recursive(4, 4)).unwrap();
    model.add_exit_heads(16, 0);
    model
        .set_trainable(Groups {
            exits: true,
            ..Groups::default()
        })
        .unwrap();
    let held_out = batch(99);
    let before = exit_distillation(&model, &held_out);
    let reports = fit_adapters(&mut model, (0..6).map(batch), 1e-3).unwrap();
    let after = exit_distillation(&model, &held_out);
    let r = &reports[0];
    assert_eq!(r.rows, 6 * 4 * 24);
    assert!(
        r.error_after < 0.95 * r.error_before,
        "fit error {:.3} -> {:.3}",
        r.error_before,
        r.error_after
    );
    assert!(r.energy_kept > 0.5 && r.energy_kept <= 1.0 + 1e-9, "{r:?}");
    assert!(
        r.kept && r.distillation_after < r.distillation_before,
        "{r:?}"
    );
    assert!(
        after < before,
        "held-out exit distillation {before:.4} -> {after:.4}"
    );
}

fn classifier_bce(model: &TrainModel, b: &Batch) -> f64 {
    let only_classifier = LossWeights {
        classifier: 1.0,
        ..LossWeights::NONE
    };
    let sums = eval_step(model, b, only_classifier);
    sums.classifier_bce[0] / sums.rows as f64
}

#[test]
fn the_fitted_classifier_predicts_agreement_better_than_chance() {
    let mut model = TrainModel::from_llama(&common::tiny_recursive(4, 4)).unwrap();
    model.add_exit_heads(16, 0);
    fit_adapters(&mut model, (0..6).map(batch), 1e-3).unwrap();
    let held_out = batch(99);
    let untrained = classifier_bce(&model, &held_out);
    let reports = fit_classifiers(&mut model, (0..12).map(batch), 1e-2).unwrap();
    let r = &reports[0];
    assert_eq!(r.rows, 12 * 4 * 24);
    assert!(r.agreement > 0.0 && r.agreement < 1.0, "{r:?}");
    // Untrained, the classifier says 0.5 everywhere: ln 2.
    assert!(
        (r.bce_before - std::f64::consts::LN_2).abs() < 1e-6,
        "{r:?}"
    );
    assert!(r.bce_after < 0.9 * r.bce_before, "{r:?}");
    let fitted = classifier_bce(&model, &held_out);
    assert!(
        fitted < untrained,
        "held-out classifier cross-entropy {untrained:.4} -> {fitted:.4}"
    );
}
