//! Batching must not change results: one forward over several sequences of different lengths
//! and offsets equals each sequence run alone, through prefill and incremental decode.

#![forbid(unsafe_code)]

mod common;

use common::load_tiny;
use rrt_model::{BatchItem, KvPool, Llama, Logits, SeqCache};

fn rows(t: candle_core::Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn run_alone(
    model: &Llama,
    kv: &mut KvPool,
    cache: &mut SeqCache,
    tokens: &[u32],
    offset: usize,
    logits: Logits,
) -> Vec<Vec<f32>> {
    rows(
        model
            .forward(
                kv,
                &mut [BatchItem {
                    tokens,
                    offset,
                    cache,
                    logits,
                }],
            )
            .unwrap(),
    )
}

fn check(model_name: &str) {
    let model = load_tiny(model_name);
    let vocab = model.cfg.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = [3usize, 11, 7]
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((i * 31 + s * 17 + 5) as u32) % vocab)
                .collect()
        })
        .collect();
    let mut alone: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut batched: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
    // One pool for all: the batched sequences' blocks interleave with the lone ones'.
    let mut kv = model.new_kv_pool();

    // Step 1: prefill the three prompts in one batch (all logits), vs each alone.
    let want: Vec<Vec<f32>> = prompts
        .iter()
        .zip(alone.iter_mut())
        .flat_map(|(p, c)| run_alone(&model, &mut kv, c, p, 0, Logits::All))
        .collect();
    let mut items: Vec<BatchItem> = prompts
        .iter()
        .zip(batched.iter_mut())
        .map(|(p, c)| BatchItem {
            tokens: p,
            offset: 0,
            cache: c,
            logits: Logits::All,
        })
        .collect();
    let got = rows(model.forward(&mut kv, &mut items).unwrap());
    let d = max_diff(&got, &want);
    assert!(d < 1e-5, "{model_name}: batched prefill differs by {d}");

    // Steps 2..: decode with different token counts per item (1, 2 and 1 new tokens), offsets
    // at each sequence's own length.
    for step in 0..4u32 {
        let news: Vec<Vec<u32>> = (0..3u32)
            .map(|s| {
                (0..if s == 1 { 2 } else { 1 })
                    .map(|i| (step * 7 + s * 13 + i) % vocab)
                    .collect()
            })
            .collect();
        let offsets: Vec<usize> = alone.iter().map(SeqCache::len).collect();
        let want: Vec<Vec<f32>> = news
            .iter()
            .zip(alone.iter_mut())
            .zip(&offsets)
            .flat_map(|((n, c), &o)| run_alone(&model, &mut kv, c, n, o, Logits::Last))
            .collect();
        let mut items: Vec<BatchItem> = news
            .iter()
            .zip(batched.iter_mut())
            .zip(&offsets)
            .map(|((n, c), &o)| BatchItem {
                tokens: n,
                offset: o,
                cache: c,
                logits: Logits::Last,
            })
            .collect();
        let got = rows(model.forward(&mut kv, &mut items).unwrap());
        let d = max_diff(&got, &want);
        assert!(
            d < 1e-5,
            "{model_name}: batched decode step {step} differs by {d}"
        );
    }
}

#[test]
fn batched_forward_equals_each_sequence_alone() {
    check("tiny-gqa-tied");
    check("tiny-mha-untied");
}

#[test]
fn rolling_back_the_offset_recomputes_the_same_logits() {
    let model = load_tiny("tiny-gqa-tied");
    let mut cache = model.new_cache();
    let mut kv = model.new_kv_pool();
    let toks = [4u32, 9, 16, 25, 36];
    let first = run_alone(&model, &mut kv, &mut cache, &toks, 0, Logits::Last);
    let _ = run_alone(&model, &mut kv, &mut cache, &[7], 5, Logits::Last);
    // Re-run the last prompt token at its original offset: the cache is cut back to 4.
    let again = run_alone(&model, &mut kv, &mut cache, &toks[4..], 4, Logits::Last);
    assert!(max_diff(&first, &again) < 1e-5);
    assert_eq!(cache.len(), 5);
}

#[test]
fn offset_beyond_cache_is_an_error_not_a_panic() {
    let model = load_tiny("tiny-gqa-tied");
    let mut cache = model.new_cache();
    let mut kv = model.new_kv_pool();
    let err = model
        .forward(
            &mut kv,
            &mut [BatchItem {
                tokens: &[1],
                offset: 3,
                cache: &mut cache,
                logits: Logits::Last,
            }],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("position 3"), "{err}");
    let err = model
        .forward(
            &mut kv,
            &mut [BatchItem {
                tokens: &[1000],
                offset: 0,
                cache: &mut cache,
                logits: Logits::Last,
            }],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("token id 1000"), "{err}");
}
