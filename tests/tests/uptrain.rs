//! `rrt uptrain` on the bundled SmolLM2 turned recursive (15 x 2, LoRA r8, per-loop norms),
//! through the real binary: a few distillation steps write a model directory every command
//! loads, with curves, a checkpoint and a cached teacher; exit heads train on the frozen model
//! and serve learned exits; bad input gets clear errors.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use rrt_tests::{root, rrt, smollm2_gguf, stderr};

/// A short slice of the KJV training text (enough for a few windows).
fn small_text(dir: &Path) -> PathBuf {
    let kjv = rrt_tests::ensure(root().join(".cache/data/kjv-train.txt"), "data");
    let text = std::fs::read_to_string(kjv).unwrap();
    let path = dir.join("small.txt");
    std::fs::write(&path, &text[..12_000]).unwrap();
    path
}

/// SmolLM2 as 15 x 2 with LoRA rank 8 and per-loop norms, converted once per test process.
fn student(dir: &Path) -> PathBuf {
    converted(dir, "student", "15")
}

/// SmolLM2 converted with `block` shared layers (30 / `block` loops), Average init, LoRA r8.
fn converted(dir: &Path, name: &str, block: &str) -> PathBuf {
    let out = dir.join(name);
    let o = rrt(&[
        "convert",
        "--model",
        smollm2_gguf().to_str().unwrap(),
        "--block-layers",
        block,
        "--init",
        "average",
        "--lora-rank",
        "8",
        "--norms",
        "per-loop",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "convert: {}", stderr(&o));
    out
}

fn uptrain(args: &[&str]) -> std::process::Output {
    let mut all = vec!["uptrain", "--quiet"];
    all.extend_from_slice(args);
    rrt(&all)
}

#[test]
fn distillation_steps_write_a_model_every_command_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (text, model) = (small_text(dir.path()), student(dir.path()));
    let out = dir.path().join("trained");
    let cache = dir.path().join("teacher");
    let common = [
        "--model",
        model.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--teacher-cache",
        cache.to_str().unwrap(),
        "--seq-len",
        "64",
        "--batch-seqs",
        "2",
        "--accum",
        "1",
        "--eval-windows",
        "2",
        "--top-k",
        "8",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
    ];
    let mut args = common.to_vec();
    args.extend(["--steps", "3", "--out", out.to_str().unwrap()]);
    let o = uptrain(&args);
    assert!(o.status.success(), "uptrain: {}", stderr(&o));
    let log = stderr(&o);
    assert!(log.contains("computed"), "{log}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train.csv",
        "eval.csv",
        "curves.png",
        "checkpoint/state.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing:\n{log}");
    }
    let curve = std::fs::read_to_string(out.join("train.csv")).unwrap();
    assert_eq!(
        curve.lines().count(),
        4,
        "a header and one row per step:\n{curve}"
    );
    // The trained directory loads and evaluates (per-loop perplexity).
    let e = rrt(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--max-tokens",
        "256",
        "--window",
        "128",
    ]);
    assert!(e.status.success(), "eval: {}", stderr(&e));
    // A second run with the same data finds every teacher output in the cache.
    let again = dir.path().join("again");
    let mut args = common.to_vec();
    args.extend(["--steps", "1", "--out", again.to_str().unwrap()]);
    let o = uptrain(&args);
    assert!(
        o.status.success() && stderr(&o).contains(" 0 sequences computed"),
        "{}",
        stderr(&o)
    );

    // Exit heads on a frozen model of three loops: learned exits serve, and what the two
    // exits do together is saved beside their curves.
    let three = converted(dir.path(), "three", "10");
    let exits = dir.path().join("exits");
    let mut args = common.to_vec();
    args[1] = three.to_str().unwrap();
    args.extend([
        "--steps",
        "2",
        "--train",
        "exit",
        "--adapter-rank",
        "8",
        "--out",
        exits.to_str().unwrap(),
    ]);
    let o = uptrain(&args);
    assert!(o.status.success(), "uptrain exit: {}", stderr(&o));
    assert!(
        exits.join("exit-heads.safetensors").exists() && exits.join("exit-heads.json").exists()
    );
    // Adapters start from the closed-form fit; classifiers end with the logistic fit.
    for line in [
        "exit adapter after loop 1: fitted",
        "exit classifier after loop 1: fitted",
        "learned exit after loop 1",
        "learned exit after loop 2",
        "the exits together",
    ] {
        assert!(stderr(&o).contains(line), "{line}: {}", stderr(&o));
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exits.join("exit-heads.json")).unwrap())
            .unwrap();
    assert_eq!(meta["curves"].as_array().map(Vec::len), Some(2), "{meta}");
    let cascade = meta["cascade"].as_array().expect("a cascade");
    assert!(!cascade.is_empty());
    for p in cascade {
        let shares: Vec<f64> = p["exit_share"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(shares.len(), 3, "{p}");
        assert!(shares.iter().sum::<f64>() <= 1.0 + 1e-9, "{p}");
    }
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let (text, model) = (small_text(dir.path()), student(dir.path()));
    let out = dir.path().join("out");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "In the beginning").unwrap();
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    let gguf = smollm2_gguf();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", m, "--data", "/nonexistent.txt", "--out", o],
            "/nonexistent.txt",
        ),
        (
            vec!["--model", m, "--data", empty.to_str().unwrap(), "--out", o],
            "empty",
        ),
        (
            vec!["--model", m, "--data", short.to_str().unwrap(), "--out", o],
            "shorter than one sequence",
        ),
        (
            vec![
                "--model",
                gguf.to_str().unwrap(),
                "--data",
                text.to_str().unwrap(),
                "--out",
                o,
                "--train",
                "lora",
            ],
            "not a recursive model",
        ),
        (
            vec![
                "--model",
                m,
                "--data",
                text.to_str().unwrap(),
                "--out",
                o,
                "--train",
                "weights",
            ],
            "unknown group",
        ),
    ];
    for (args, expect) in cases {
        let r = uptrain(&args);
        assert!(!r.status.success(), "{args:?} succeeded");
        let err = stderr(&r);
        assert!(
            err.contains(expect) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // A teacher with another vocabulary.
    let other = dir.path().join("other-teacher");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), other.join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer.json")).unwrap())
            .unwrap();
    tok["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
        "id": 49152, "content": "<|extra|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true
    }));
    std::fs::write(other.join("tokenizer.json"), tok.to_string()).unwrap();
    let r = uptrain(&[
        "--model",
        m,
        "--data",
        text.to_str().unwrap(),
        "--out",
        o,
        "--teacher",
        other.to_str().unwrap(),
        "--seq-len",
        "64",
        "--eval-windows",
        "2",
    ]);
    assert!(
        !r.status.success() && stderr(&r).contains("tokenizer differs"),
        "{}",
        stderr(&r)
    );
    // A learning rate that blows the loss up stops the run and keeps the last good checkpoint.
    let blow = dir.path().join("blow");
    let r = uptrain(&[
        "--model",
        m,
        "--data",
        text.to_str().unwrap(),
        "--out",
        blow.to_str().unwrap(),
        "--kd-weight",
        "0",
        "--ce-weight",
        "1",
        "--seq-len",
        "64",
        "--batch-seqs",
        "2",
        "--accum",
        "1",
        "--eval-windows",
        "2",
        "--lr",
        "1e12",
        "--warmup",
        "1",
        "--clip",
        "0",
        "--steps",
        "6",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "100",
        "--train",
        "all",
    ]);
    let err = stderr(&r);
    assert!(!r.status.success() && err.contains("the loss is"), "{err}");
    let state =
        std::fs::read_to_string(blow.join("checkpoint/state.json")).expect("a checkpoint kept");
    assert!(state.contains("\"step\""), "{state}");
}
