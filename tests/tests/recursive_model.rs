//! Recursive conversion of the bundled SmolLM2-135M, through the real `rrt` binary and the
//! library: full-rank relaxation with per-loop norms reproduces the source's logits, converted
//! directories load everywhere, and bad requests are clear errors.

#![forbid(unsafe_code)]

use rrt_model::recursive::convert::{convert, ConvertOptions};
use rrt_model::recursive::mapping::Init;
use rrt_model::{BatchItem, Llama, Logits};
use rrt_tests::{kjv_heldout, rrt, smollm2_gguf, stderr, stdout};

fn last_logits(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    let mut kv = model.new_kv_pool();
    model
        .forward(
            &mut kv,
            &mut [BatchItem {
                tokens: ids,
                offset: 0,
                cache: &mut cache,
                logits: Logits::All,
            }],
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn full_rank_relaxation_of_smollm2_reproduces_its_logits() {
    let loaded = rrt_model::load(&smollm2_gguf(), rrt_model::WeightDtype::F32).unwrap();
    let ids = loaded
        .tokenizer
        .encode("In the beginning God created the heaven and the earth.")
        .unwrap();
    let want = last_logits(&loaded.model, &ids);
    let opts = ConvertOptions {
        block_layers: 15,
        init: Init::Average,
        seed: 0,
        rank_attn: usize::MAX,
        rank_mlp: usize::MAX,
        per_loop_norms: true,
        source: "smollm2".into(),
    };
    let rec = convert(&loaded.model, &opts, &|| {}).unwrap();
    assert_eq!((rec.layers.len(), rec.loops()), (15, 2));
    let got = last_logits(&rec, &ids);
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-3,
        "full-rank 15x2 SmolLM2 differs from the source by {diff}"
    );
}

#[test]
fn convert_then_eval_and_generate_from_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rec");
    let o = rrt(&[
        "convert",
        "--loops",
        "2",
        "--init",
        "stepwise",
        "--lora-rank",
        "8",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("15 shared layers x 2 loops"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains(
            "[[0], [2], [4], [6], [8], [10], [12], [15], [17], [19], [21], [23], [25], [27], [29]]"
        ),
        "{}",
        stdout(&o)
    );
    let data = kjv_heldout();
    let o = rrt(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--max-tokens",
        "300",
        "--window",
        "150",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("exit after loop 1/2") && text.contains("exit after loop 2/2"),
        "{text}"
    );
    let o = rrt(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("The capital of France is"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn bad_convert_requests_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let out = out.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["--block-layers", "7"],
            "does not divide the source's 30 layers",
        ),
        (vec!["--loops", "4"], "--loops 4 does not divide"),
        (
            vec!["--loops", "2", "--init", "middle"],
            "unknown init `middle`",
        ),
        (
            vec!["--loops", "2", "--lora-rank", "-3"],
            "a LoRA rank must be >= 0, got -3",
        ),
    ] {
        let mut all = vec!["convert", "--out", out];
        all.extend(args);
        let o = rrt(&all);
        assert!(!o.status.success(), "{all:?} succeeded");
        assert!(stderr(&o).contains(expect), "{all:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
}
