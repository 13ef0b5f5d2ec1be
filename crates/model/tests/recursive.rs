//! Recursive conversion on the tiny fixture models: full-rank relaxation with per-loop norms
//! reproduces the source, rank 0 is exactly the pure recursive model (the shared block looped),
//! converted models survive a save/load round trip, and batching still does not change results.

#![forbid(unsafe_code)]

mod common;

use common::{all_logits, fixture, load_tiny, max_diff};
use rrt_model::recursive::convert::{convert, ConvertOptions, Converter};
use rrt_model::recursive::mapping::Init;
use rrt_model::{BatchItem, Llama, Logits};

const IDS: [u32; 9] = [1, 17, 93, 4, 55, 23, 88, 8, 61];

fn opts(k: usize, init: Init, rank: usize, per_loop_norms: bool) -> ConvertOptions {
    ConvertOptions {
        block_layers: k,
        init,
        seed: 3,
        rank_attn: rank,
        rank_mlp: rank,
        per_loop_norms,
        source: "fixture".into(),
    }
}

#[test]
fn full_rank_with_per_loop_norms_reproduces_the_source() {
    for name in ["tiny-gqa-tied", "tiny-mha-untied"] {
        let src = load_tiny(name);
        let want = all_logits(&src, &IDS);
        for init in [Init::Average, Init::Stepwise, Init::Random] {
            let rec = convert(&src, &opts(1, init, 10_000, true), &|| {}).unwrap();
            assert_eq!(rec.layers.len(), 1);
            assert_eq!(rec.loops(), src.layers.len());
            let d = max_diff(&all_logits(&rec, &IDS), &want);
            assert!(
                d < 1e-3,
                "{name} {init}: full-rank recursive differs by {d}"
            );
        }
    }
}

#[test]
fn without_lora_the_model_differs_from_the_source() {
    // The exactness test above must not pass trivially.
    let src = load_tiny("tiny-mha-untied");
    let rec = convert(&src, &opts(1, Init::Average, 0, false), &|| {}).unwrap();
    assert!(max_diff(&all_logits(&rec, &IDS), &all_logits(&src, &IDS)) > 0.1);
}

#[test]
fn rank_zero_is_the_shared_block_looped() {
    let src = load_tiny("tiny-mha-untied");
    let c = Converter::new(&src, 1, Init::Stepwise, 0).unwrap();
    let rec = c.build(0, 0, false, "fixture").unwrap();
    // The pure recursive model built by hand: a plain model whose every layer is the shared one.
    let shared = rec.layers[0].clone();
    let looped = Llama::from_parts(
        src.cfg.clone(),
        src.embed.clone(),
        vec![shared.clone(), shared.clone(), shared],
        src.norm.clone(),
        src.lm_head.clone(),
        None,
    );
    let d = max_diff(&all_logits(&rec, &IDS), &all_logits(&looped, &IDS));
    assert!(d < 1e-6, "rank-0 recursive vs looped plain model: {d}");
}

#[test]
fn lora_rank_moves_the_model_toward_the_source() {
    let src = load_tiny("tiny-gqa-tied");
    let want = all_logits(&src, &IDS);
    let mut c = Converter::new(&src, 1, Init::Average, 0).unwrap();
    c.decompose(&|| {}).unwrap();
    let errs: Vec<f32> = [0, 2, 8, 64]
        .iter()
        .map(|&r| max_diff(&all_logits(&c.build(r, r, true, "f").unwrap(), &IDS), &want))
        .collect();
    assert!(errs.windows(2).all(|w| w[1] <= w[0] + 1e-4), "{errs:?}");
    assert!(errs[3] < 1e-3 && errs[0] > 0.1, "{errs:?}");
}

#[test]
fn every_loop_exit_reads_the_hidden_state_after_each_loop() {
    let src = load_tiny("tiny-mha-untied");
    let rec = convert(&src, &opts(1, Init::Average, 4, false), &|| {}).unwrap();
    let mut cache = rec.new_cache();
    let mut kv = rec.new_kv_pool();
    let per_loop = rec
        .forward_loops(
            &mut kv,
            &mut [BatchItem {
                tokens: &IDS,
                offset: 0,
                cache: &mut cache,
                logits: Logits::Last,
            }],
            true,
        )
        .unwrap();
    assert_eq!(per_loop.len(), 3);
    let last = per_loop[2].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let full = all_logits(&rec, &IDS);
    assert!(max_diff(&last, &full[full.len() - last.len()..]) < 1e-6);
    let first = per_loop[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        max_diff(&first, &last) > 1e-3,
        "exit after loop 1 should differ from the final loop"
    );
}

#[test]
fn converted_models_round_trip_through_save_and_load() {
    let dir = fixture("tiny-gqa-tied");
    let tmp = tempfile::tempdir().unwrap();
    // `rrt_model::load` needs a tokenizer next to the weights.
    std::fs::write(
        tmp.path().join("tokenizer.json"),
        r#"{"version":"1.0","model":{"type":"WordLevel","vocab":{"a":0,"<unk>":1},"unk_token":"<unk>"}}"#,
    )
    .unwrap();
    let tokenizer = rrt_model::Tokenizer::from_hf_dir(tmp.path(), Some(1), vec![2]).unwrap();
    let src = load_tiny("tiny-gqa-tied");
    let rec = convert(&src, &opts(1, Init::Average, 3, true), &|| {}).unwrap();
    let out = tmp.path().join("converted");
    rrt_model::recursive::save::save(&rec, &tokenizer, &out).unwrap();
    let back = rrt_model::load(&out, rrt_model::WeightDtype::F32)
        .unwrap()
        .model;
    assert_eq!(
        back.recursion.as_ref().unwrap().meta,
        rec.recursion.as_ref().unwrap().meta
    );
    assert_eq!(back.non_embedding_params(), rec.non_embedding_params());
    let d = max_diff(&all_logits(&back, &IDS), &all_logits(&rec, &IDS));
    assert!(d < 1e-6, "round trip changed logits by {d}");
    let _ = dir;
}

#[test]
fn bad_conversion_requests_are_clear_errors() {
    let src = load_tiny("tiny-mha-untied");
    let err = Converter::new(&src, 2, Init::Average, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not divide"), "{err}");
    let rec = convert(&src, &opts(1, Init::Average, 0, false), &|| {}).unwrap();
    let err = Converter::new(&rec, 1, Init::Average, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already a recursive model"), "{err}");
}
