//! The decoder against an independent implementation: logits recorded by Hugging Face
//! `transformers` (scripts/make_fixtures.py) for two tiny random Llama models.

#![forbid(unsafe_code)]

mod common;

use common::{fixture, load_tiny, max_diff};
use rrt_model::{BatchItem, Logits};

struct Expected {
    ids: Vec<u32>,
    vocab: usize,
    logits: Vec<f32>,
}

fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    Expected {
        ids: v["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect(),
        vocab: v["vocab"].as_u64().unwrap() as usize,
        logits: v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect(),
    }
}

fn check_full_sequence(name: &str) {
    let model = load_tiny(name);
    let exp = expected(name);
    let mut cache = model.new_cache();
    let mut kv = model.new_kv_pool();
    let logits = model
        .forward(
            &mut kv,
            &mut [BatchItem {
                tokens: &exp.ids,
                offset: 0,
                cache: &mut cache,
                logits: Logits::All,
            }],
        )
        .unwrap();
    assert_eq!(logits.dims(), &[exp.ids.len(), exp.vocab]);
    let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = exp.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        scale > 0.5,
        "fixture logits are too small to test anything ({scale})"
    );
    let diff = max_diff(&got, &exp.logits);
    assert!(diff < 1e-4, "{name}: max abs diff {diff} vs transformers");
}

/// Prefill part of the input, then decode the rest one token at a time: every step's logits
/// must match the reference's row for that position.
fn check_incremental(name: &str) {
    let model = load_tiny(name);
    let exp = expected(name);
    let mut cache = model.new_cache();
    let mut kv = model.new_kv_pool();
    let split = 5;
    let mut rows = model
        .forward(
            &mut kv,
            &mut [BatchItem {
                tokens: &exp.ids[..split],
                offset: 0,
                cache: &mut cache,
                logits: Logits::All,
            }],
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for pos in split..exp.ids.len() {
        let step = model
            .forward(
                &mut kv,
                &mut [BatchItem {
                    tokens: &exp.ids[pos..pos + 1],
                    offset: pos,
                    cache: &mut cache,
                    logits: Logits::Last,
                }],
            )
            .unwrap();
        rows.extend(step.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let diff = max_diff(&rows, &exp.logits);
    assert!(
        diff < 1e-4,
        "{name}: incremental decode max abs diff {diff}"
    );
}

#[test]
fn gqa_tied_matches_transformers_logits() {
    check_full_sequence("tiny-gqa-tied");
}

#[test]
fn mha_untied_matches_transformers_logits() {
    check_full_sequence("tiny-mha-untied");
}

#[test]
fn incremental_decode_matches_transformers_logits() {
    check_incremental("tiny-gqa-tied");
    check_incremental("tiny-mha-untied");
}
