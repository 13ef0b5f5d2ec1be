//! The GGUF reader on any file: header, metadata, the model config and tokenizer derived from it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrt_model::source::gguf::GgufSource;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, data).expect("write");
    if let Ok(source) = GgufSource::open(&path) {
        let _ = source.config();
        let _ = source.tokenizer_parts();
    }
});
