//! Helpers shared by the model crate's integration tests: the tiny fixture models recorded by
//! scripts/make_fixtures.py and small comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use rrt_model::source::safetensors::SafetensorsSource;
use rrt_model::{BatchItem, Llama, Logits, ModelConfig};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A tiny fixture model, loaded as a plain decoder.
pub fn load_tiny(name: &str) -> Llama {
    let dir = fixture(name);
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut src = SafetensorsSource::open_dir(&dir).unwrap();
    Llama::load(cfg, &mut src, rrt_model::WeightDtype::F32, None).unwrap()
}

/// Logits of every position of `ids`, run from an empty cache, flattened.
pub fn all_logits(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut kv = model.new_kv_pool();
    model
        .forward(
            &mut kv,
            &mut [BatchItem {
                tokens: ids,
                offset: 0,
                cache: &mut cache,
                logits: Logits::All,
            }],
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
