//! The bundled SmolLM2-135M GGUF, end to end: tokenizer and logits against what `transformers`
//! computes from the same file, greedy generation through the real `rrt` binary, and perplexity.

#![forbid(unsafe_code)]

use rrt_model::{BatchItem, Logits};
use rrt_tests::{kjv_heldout, rrt, smollm2_gguf, stderr, stdout};

#[test]
fn gguf_tokens_and_logits_match_transformers() {
    let loaded = rrt_model::load(&smollm2_gguf(), rrt_model::WeightDtype::F32).unwrap();
    let path = rrt_tests::root().join("crates/model/tests/fixtures/smollm2-gguf-reference.json");
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for rec in records.as_array().unwrap() {
        let prompt = rec["prompt"].as_str().unwrap();
        let want_ids: Vec<u32> = rec["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = loaded.tokenizer.encode(prompt).unwrap();
        assert_eq!(ids, want_ids, "token ids of {prompt:?}");
        let mut cache = loaded.model.new_cache();
        let mut kv = loaded.model.new_kv_pool();
        let logits = loaded
            .model
            .forward(
                &mut kv,
                &mut [BatchItem {
                    tokens: &ids,
                    offset: 0,
                    cache: &mut cache,
                    logits: Logits::Last,
                }],
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let top_ids: Vec<u32> = rec["top_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let top_logits: Vec<f32> = rec["top_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let first: Vec<f32> = rec["first_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let mut diff = 0f32;
        for (&id, &want) in top_ids.iter().zip(&top_logits) {
            diff = diff.max((logits[id as usize] - want).abs());
        }
        for (got, want) in logits.iter().zip(&first) {
            diff = diff.max((got - want).abs());
        }
        assert!(
            diff < 2e-3,
            "{prompt:?}: max abs logit diff {diff} vs transformers"
        );
        assert_eq!(
            rrt_model::sampling::argmax(&logits),
            top_ids[0],
            "{prompt:?}: greedy token"
        );
    }
}

#[test]
fn greedy_generate_knows_the_capital_of_france() {
    let out = rrt(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("The capital of France is"), "{text}");
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn chat_generation_uses_the_template_and_stops_at_end_of_turn() {
    let out = rrt(&[
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "40",
        "--stats",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Paris"), "{}", stdout(&out));
    assert!(!stdout(&out).contains("<|im_end|>"), "{}", stdout(&out));
    assert!(stderr(&out).contains("finish: Eos"), "{}", stderr(&out));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let args = [
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--seed",
        "7",
    ];
    let a = rrt(&args);
    let b = rrt(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
}

#[test]
fn eval_reports_perplexity_on_the_heldout_slice() {
    let data = kjv_heldout();
    let out = rrt(&[
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--max-tokens",
        "1024",
        "--window",
        "256",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let ppl: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("perplexity:"))
        .expect("a perplexity line")
        .trim()
        .parse()
        .unwrap();
    // A working 135M model on KJV English: far below uniform (49152) and above 1.
    assert!(ppl > 2.0 && ppl < 100.0, "perplexity {ppl}\n{text}");
}

#[test]
fn cli_reports_broken_model_files_without_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    let full = std::fs::read(smollm2_gguf()).unwrap();
    for (name, len, expect) in [
        ("tensors-cut.gguf", 3_000_000, "tensor `token_embd.weight`"),
        ("header-cut.gguf", 500_000, "truncated"),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, &full[..len]).unwrap();
        let out = rrt(&[
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "hi",
        ]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains(name) && err.contains("not a valid GGUF file") && err.contains(expect),
            "{err}"
        );
    }
    let out = rrt(&["generate", "--prompt", "hi", "--top-p", "1.5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("top_p must be in (0, 1]"),
        "{}",
        stderr(&out)
    );
}
