//! What the engine's integration tests share: the tiny relaxed recursive model and request
//! settings.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::mpsc::Receiver;

use rrt_engine::{Event, GenParams, Received};
use rrt_model::recursive::convert::{convert, ConvertOptions};
use rrt_model::recursive::mapping::Init;
use rrt_model::source::safetensors::SafetensorsSource;
use rrt_model::{Llama, ModelConfig, SamplingParams};

/// The tiny fixture converted to 1 shared layer x 3 loops with rank-4 LoRA and per-loop norms
/// (so each loop's rows really differ).
pub fn tiny_recursive() -> Llama {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-mha-untied");
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut src = SafetensorsSource::open_dir(&dir).unwrap();
    let plain = Llama::load(cfg, &mut src, rrt_model::WeightDtype::F32, None).unwrap();
    let opts = ConvertOptions {
        block_layers: 1,
        init: Init::Average,
        seed: 0,
        rank_attn: 4,
        rank_mlp: 4,
        per_loop_norms: true,
        source: "fixture".into(),
    };
    convert(&plain, &opts, &|| {}).unwrap()
}

/// Bytes of one KV block of 16 positions at f32.
pub fn kv_block_bytes(model: &Llama) -> usize {
    model
        .kv_layout(16, rrt_model::KvDtype::F32)
        .unwrap()
        .block_bytes()
}

/// Greedy, `max_new` tokens, no stop token.
pub fn params(max_new: usize) -> GenParams {
    GenParams {
        max_new_tokens: max_new,
        sampling: SamplingParams::default(),
        stop_tokens: vec![],
        ..GenParams::default()
    }
}

/// Everything a request received; panics when it failed.
pub fn collect(rx: &Receiver<Event>) -> Received {
    Received::drain(rx).unwrap_or_else(|e| panic!("request failed: {e}"))
}
