//! Broken model files give typed errors that name the file and the field or tensor, never a panic.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use rrt_model::ModelError;

fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gqa-tied");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    // A minimal tokenizer so `load` gets past the tokenizer and reaches the weights.
    std::fs::write(
        dir.join("tokenizer.json"),
        r#"{"version":"1.0","model":{"type":"WordLevel","vocab":{"a":0,"<unk>":1},"unk_token":"<unk>"}}"#,
    )
    .unwrap();
    (tmp, dir)
}

fn load_err(path: &Path) -> ModelError {
    match rrt_model::load(path, rrt_model::WeightDtype::F32) {
        Ok(_) => panic!("{} loaded although it is broken", path.display()),
        Err(e) => e,
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn the_untouched_copy_loads() {
    let (_tmp, dir) = fixture_copy();
    rrt_model::load(&dir, rrt_model::WeightDtype::F32).unwrap();
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (_tmp, dir) = fixture_copy();
    let file = dir.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len / 2).unwrap();
    let err = load_err(&dir);
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("not a valid safetensors file"),
        "{msg}"
    );
}

#[test]
fn gguf_with_wrong_magic_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.gguf");
    std::fs::write(
        &file,
        b"GGUX\x03\x00\x00\x00 and then nothing useful at all",
    )
    .unwrap();
    let err = load_err(&file);
    assert!(matches!(err, ModelError::Gguf { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("bad.gguf") && msg.to_lowercase().contains("magic"),
        "{msg}"
    );
}

#[test]
fn config_missing_a_field_names_the_field() {
    let (_tmp, dir) = fixture_copy();
    edit_config(&dir, |c| {
        c.remove("hidden_size");
    });
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("config.json") && msg.contains("hidden_size"),
        "{msg}"
    );
}

#[test]
fn config_with_bad_json_names_the_file() {
    let (_tmp, dir) = fixture_copy();
    std::fs::write(dir.join("config.json"), "{ \"hidden_size\": 64,").unwrap();
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("config.json") && msg.contains("invalid config"),
        "{msg}"
    );
}

#[test]
fn shape_mismatch_names_the_tensor_and_both_shapes() {
    let (_tmp, dir) = fixture_copy();
    edit_config(&dir, |c| {
        c.insert("intermediate_size".into(), 161.into());
    });
    let err = load_err(&dir);
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight")
            && msg.contains("[161, 64]")
            && msg.contains("[160, 64]"),
        "{msg}"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let (_tmp, dir) = fixture_copy();
    edit_config(&dir, |c| {
        c.insert("model_type".into(), "gpt_neox".into());
    });
    let msg = load_err(&dir).to_string();
    assert!(msg.contains("unsupported architecture `gpt_neox`"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = fixture_copy();
    edit_config(&dir, |c| {
        c.insert("num_hidden_layers".into(), 3.into());
    });
    let msg = load_err(&dir).to_string();
    assert!(
        msg.contains("model.layers.2.") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn a_file_that_is_neither_format_is_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("weights.bin");
    std::fs::write(&file, b"PK\x03\x04 zip or pickle").unwrap();
    let msg = load_err(&file).to_string();
    assert!(
        msg.contains("weights.bin") && msg.contains("neither a model directory"),
        "{msg}"
    );
}

/// Found by fuzzing (`make fuzz`, target `tokenizer`): a tokenizer.json whose decoder is
/// malformed made the tokenizers library panic (an `expect` in its Deserialize); it is an
/// error naming the file.
#[test]
fn a_malformed_tokenizer_json_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("tokenizer.json"),
        br#"{"version":"1.0","decoder":{"type":"ByteLevel","add_prefix_space":true,"use_regex":tru1}}"#,
    )
    .unwrap();
    let err = rrt_model::Tokenizer::from_hf_dir(tmp.path(), None, vec![])
        .err()
        .expect("a malformed file is refused");
    let msg = err.to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
}
