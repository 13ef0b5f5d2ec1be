//! `tokenizer.json` loading on any text, then a round of encoding and streaming decoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rrt_model::{TextStream, Tokenizer};

fuzz_target!(
    init: {
        // The loader catches the tokenizers library's own panics (it has `expect`s on bad
        // input): the default hook lets such a caught panic pass, where libFuzzer's aborts on
        // any. A panic that escapes the loader still aborts the run.
        let _ = std::panic::take_hook();
    },
    |data: &[u8]| {
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
    }
);
