//! `config.json` loading on any text: parsing and validation into a model config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrt_model::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.json");
    std::fs::write(&path, data).expect("write");
    let _ = ModelConfig::from_hf_file(&path);
});
