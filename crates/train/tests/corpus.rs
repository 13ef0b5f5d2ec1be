//! `rrt corpus` on the tiny fixture model with a word-level tokenizer of its 128 ids: a seed
//! writes the same documents whatever the concurrency, another seed or the held-out prompt set
//! writes others, the token target is met by the shortest prefix of documents, and bad settings
//! are refused.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use rrt_model::source::safetensors::SafetensorsSource;
use rrt_model::{Llama, ModelConfig, Tokenizer};
use rrt_train::corpus::{self, Document, Options, PromptSet, Report};

fn model() -> Llama {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-gqa-tied");
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut src = SafetensorsSource::open_dir(&dir).unwrap();
    Llama::load(cfg, &mut src, rrt_model::WeightDtype::F32, None).unwrap()
}

/// Words `w0`..`w127` (unknown words are `w0`), split on whitespace, EOS `w2`.
fn tokenizer(dir: &std::path::Path) -> Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..128)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    Tokenizer::from_hf_dir(dir, Some(1), vec![2]).unwrap()
}

fn options(seed: u64, in_flight: usize) -> Options {
    Options {
        set: PromptSet::Train,
        tokens: 400,
        max_new_tokens: 48,
        temperature: 1.0,
        top_p: 0.95,
        seed,
        in_flight,
        max_batch_rows: 64,
        kv_dtype: rrt_model::KvDtype::Bf16,
    }
}

fn run(opts: &Options) -> (Vec<Document>, Report) {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let mut docs = Vec::new();
    let report = corpus::generate(
        model(),
        &tok,
        opts,
        &mut |d| {
            docs.push(d.clone());
            Ok(())
        },
        &mut |_| {},
    )
    .unwrap();
    (docs, report)
}

fn texts(docs: &[Document]) -> Vec<(u64, String)> {
    docs.iter().map(|d| (d.index, d.text.clone())).collect()
}

#[test]
fn a_seed_writes_the_same_corpus_at_any_concurrency() {
    let (one, report) = run(&options(5, 1));
    let (many, _) = run(&options(5, 6));
    assert_eq!(texts(&one), texts(&many));
    // The shortest prefix reaching the target: all but the last document fall short of it.
    let tokens: usize = one.iter().map(|d| d.answer_tokens).sum();
    let last = one.last().unwrap().answer_tokens;
    assert!(tokens >= 400 && tokens - last < 400, "{tokens} tokens");
    assert_eq!(report.answer_tokens, tokens);
    assert_eq!(report.documents, one.len());
    assert!(report.generated_tokens >= tokens);
    // Kept documents are in index order, each with its rendered prompt before its answer.
    assert!(one.windows(2).all(|w| w[0].index < w[1].index));
    for d in &one {
        assert!(d.text.starts_with(&format!("{}\n\n", d.prompt)));
        assert!(d.answer_tokens >= corpus::filter::MIN_ANSWER_TOKENS);
    }
    let kinds: std::collections::HashSet<_> = one.iter().map(|d| d.kind).collect();
    assert!(kinds.len() >= 2, "{kinds:?}");
    let distinct = report
        .distinct_ngrams
        .iter()
        .find(|(n, _)| *n == 1)
        .unwrap()
        .1;
    assert!(distinct > 0.0 && distinct <= 1.0);
}

#[test]
fn other_seeds_and_the_heldout_set_write_other_text() {
    let (a, _) = run(&options(5, 4));
    let (b, _) = run(&options(6, 4));
    assert_ne!(texts(&a), texts(&b));
    let mut held = options(5, 4);
    held.set = PromptSet::Heldout;
    let (h, _) = run(&held);
    let prompts: std::collections::HashSet<_> = a.iter().map(|d| d.prompt.clone()).collect();
    assert!(h.iter().all(|d| !prompts.contains(&d.prompt)));
}

#[test]
fn bad_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    for (change, message) in [
        (
            Box::new(|o: &mut Options| o.tokens = 0) as Box<dyn Fn(&mut Options)>,
            "--tokens",
        ),
        (
            Box::new(|o: &mut Options| o.max_new_tokens = 3),
            "--max-new-tokens",
        ),
        (Box::new(|o: &mut Options| o.in_flight = 0), "--in-flight"),
        (Box::new(|o: &mut Options| o.top_p = 0.0), "top_p"),
        (
            Box::new(|o: &mut Options| o.temperature = -1.0),
            "temperature",
        ),
    ] {
        let mut o = options(1, 2);
        change(&mut o);
        let err = corpus::generate(model(), &tok, &o, &mut |_| Ok(()), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(message), "{message}: {err}");
    }
}
