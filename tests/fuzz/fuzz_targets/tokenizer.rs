//! `tokenizer.json` loading on any text, then a round of encoding and streaming decoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrt_model::{TextStream, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("tokenizer.json"), data).expect("write");
    let Ok(tok) = Tokenizer::from_hf_dir(dir.path(), None, vec![]) else {
        return;
    };
    if let Ok(ids) = tok.encode("Hello, world! é 漢字") {
        let mut stream = TextStream::new();
        for id in ids {
            let _ = stream.push(&tok, id);
        }
    }
});
