//! `rrt corpus` through the real binary on the bundled SmolLM2: a seed writes the same text file
//! twice (whatever the concurrency), with its JSON report (settings, tokens/s, distinct n-gram
//! shares, a sample) beside it; the text is what `rrt uptrain` reads (chat-formatted documents);
//! bad flags get clear errors and leave no file.

#![forbid(unsafe_code)]

use rrt_tests::{rrt, smollm2_gguf, stderr};

fn corpus(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let model = smollm2_gguf();
    let mut args = vec![
        "corpus",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--tokens",
        "400",
        "--max-new-tokens",
        "48",
    ];
    args.extend_from_slice(extra);
    rrt(&args)
}

#[test]
fn a_seed_writes_the_same_corpus_and_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
    let o = corpus(&a, &["--seed", "3", "--in-flight", "8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = corpus(&b, &["--seed", "3", "--in-flight", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (ta, tb) = (
        std::fs::read_to_string(&a).unwrap(),
        std::fs::read_to_string(&b).unwrap(),
    );
    assert_eq!(ta, tb, "the same seed wrote different text");
    // Chat-formatted documents: the template's turns around each answer.
    assert!(ta.contains("<|im_start|>user\n") && ta.contains("<|im_start|>assistant\n"));
    assert!(!dir.path().join("a.partial").exists());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("a.json")).unwrap()).unwrap();
    assert!(report["answer_tokens"].as_u64().unwrap() >= 400, "{report}");
    assert!(report["generated_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(report["distinct_ngrams"].as_array().unwrap().len(), 4);
    assert!(report["sample"]["answer"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(
        report["options"]["temperature"].as_f64().unwrap() as f32,
        0.8
    );
    let log = stderr(&o);
    assert!(
        log.contains("generated tokens/s") && log.contains("distinct n-grams"),
        "{log}"
    );
    // Another seed, other text.
    let c = dir.path().join("c.txt");
    let o = corpus(&c, &["--seed", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read_to_string(&c).unwrap(), ta);
}

#[test]
fn bad_flags_are_refused_and_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.txt");
    for (extra, expect) in [
        (vec!["--top-p", "0"], "top_p"),
        (vec!["--temperature=-1"], "temperature"),
        (vec!["--in-flight", "0"], "--in-flight"),
        (vec!["--set", "everything"], "everything"),
    ] {
        let o = corpus(&out, &extra);
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(
            err.contains(expect) && !err.contains("panicked"),
            "{extra:?}: {err}"
        );
        assert!(!out.exists());
    }
}
