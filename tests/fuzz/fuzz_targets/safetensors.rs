//! The safetensors reader on any file: header, offsets, dtypes, the tensors a Llama loads.
#![no_main]

use candle_core::DType;
use libfuzzer_sys::fuzz_target;
use rrt_model::source::safetensors::SafetensorsSource;
use rrt_model::source::TensorSource;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("model.safetensors"), data).expect("write");
    if let Ok(mut source) = SafetensorsSource::open_dir(dir.path()) {
        for name in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ] {
            let _ = source.load(name, DType::F32);
        }
    }
});
