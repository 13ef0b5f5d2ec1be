//! Weight dtypes on the bundled model: bf16 and int8 (`q8`) keep the held-out perplexity of f32
//! (within 0.5% and 1.5%) for the vanilla model and a recursive one, bf16 keeps the README's
//! greedy outputs, the weights take half (bf16) and under a third (q8) of the f32 bytes, and a
//! GGUF whose tensors are Q8_0 loads them as they are (the int8 blocks and scales of the file,
//! not a re-quantization of their dequantized values).

#![forbid(unsafe_code)]

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use rrt_model::perplexity::perplexity;
use rrt_model::{LoadedModel, WeightDtype};
use rrt_tests::cluster::recursive_model;
use rrt_tests::{kjv_heldout, smollm2_gguf};

/// Held-out tokens scored per model (windows of 256).
const TOKENS: usize = 1024;

fn load(path: &std::path::Path, dtype: WeightDtype) -> LoadedModel {
    rrt_model::load(path, dtype).unwrap_or_else(|e| panic!("{dtype}: {e}"))
}

fn heldout_ppl(m: &LoadedModel) -> f64 {
    let text = std::fs::read_to_string(kjv_heldout()).unwrap();
    let mut ids = m.tokenizer.encode(&text).unwrap();
    ids.truncate(TOKENS);
    perplexity(&m.model, &ids, 256).unwrap().perplexity()
}

/// Bytes of the projections and the LM head (what `--dtype` converts; per-loop LoRA stays f32).
fn converted_bytes(m: &LoadedModel) -> usize {
    m.model
        .layers
        .iter()
        .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
        .map(|x| x.bytes())
        .sum::<usize>()
        + m.model.lm_head.bytes()
}

/// Perplexity per dtype, and the converted weights' bytes.
fn check_dtypes(path: &std::path::Path, what: &str) {
    let f32m = load(path, WeightDtype::F32);
    let (base, base_bytes) = (heldout_ppl(&f32m), converted_bytes(&f32m));
    drop(f32m);
    for (dtype, tolerance, max_bytes) in [
        (WeightDtype::Bf16, 0.005, 0.51),
        (WeightDtype::Q8, 0.015, 0.29),
    ] {
        let m = load(path, dtype);
        let ppl = heldout_ppl(&m);
        let bytes = converted_bytes(&m) as f64 / base_bytes as f64;
        eprintln!(
            "{what} {dtype}: perplexity {ppl:.4} vs f32 {base:.4} ({:+.3}%), weights {bytes:.3}x",
            100.0 * (ppl / base - 1.0)
        );
        assert!(
            (ppl / base - 1.0).abs() <= tolerance,
            "{what} {dtype}: perplexity {ppl} vs f32 {base}"
        );
        assert!(
            bytes <= max_bytes,
            "{what} {dtype}: {bytes:.3}x the f32 weight bytes"
        );
    }
}

#[test]
fn bf16_and_q8_keep_the_perplexity_of_the_vanilla_model() {
    check_dtypes(&smollm2_gguf(), "vanilla");
}

/// The demo's recursive model (full-rank LoRA: it scores like the source model; the pure
/// recursive r0 model scores ~550,000, too flat for a perplexity tolerance to mean anything).
fn demo_model() -> std::path::PathBuf {
    rrt_tests::cluster::demo_model()
}

#[test]
fn bf16_and_q8_keep_the_perplexity_of_a_recursive_model() {
    check_dtypes(&demo_model(), "recursive 15 x 2 (full-rank LoRA)");
}

#[test]
fn recursive_shared_weights_take_about_half_of_the_vanilla_ones() {
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Q8] {
        let layer_bytes = |m: &LoadedModel| -> usize {
            m.model
                .layers
                .iter()
                .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
                .map(|x| x.bytes())
                .sum()
        };
        let vanilla = layer_bytes(&load(&smollm2_gguf(), dtype));
        let recursive = layer_bytes(&load(&recursive_model(), dtype));
        let ratio = recursive as f64 / vanilla as f64;
        assert!(
            (ratio - 0.5).abs() < 0.01,
            "{dtype}: shared / vanilla = {ratio}"
        );
    }
}

#[test]
fn bf16_keeps_the_greedy_outputs_of_the_readme_prompts() {
    let f32m = load(&smollm2_gguf(), WeightDtype::F32);
    let bf16 = load(&smollm2_gguf(), WeightDtype::Bf16);
    for (prompt, chat) in [
        ("The capital of France is", false),
        ("What is the capital of France?", true),
        ("Tell me a joke", true),
    ] {
        let ids = |m: &LoadedModel| {
            let text = if chat {
                m.tokenizer.chat_prompt(prompt).unwrap()
            } else {
                prompt.to_string()
            };
            let ids = m.tokenizer.encode(&text).unwrap();
            rrt_model::generate::greedy(&m.model, &ids, 32).unwrap()
        };
        let (a, b) = (ids(&f32m), ids(&bf16));
        assert_eq!(
            f32m.tokenizer.decode(&a).unwrap(),
            bf16.tokenizer.decode(&b).unwrap(),
            "{prompt:?}"
        );
    }
}

/// bf16 KV (`--kv-dtype bf16`) halves the bytes a token costs and keeps the held-out
/// perplexity within 0.1% of f32 KV; int8 KV (`--kv-dtype int8`, a scale per position and KV
/// head) takes a byte an element plus the scales and keeps it within 0.5%; on the vanilla
/// model and the recursive one (every loop's K and V stored so).
#[test]
fn bf16_and_int8_kv_cut_the_bytes_a_token_and_keep_the_perplexity() {
    use rrt_model::perplexity::perplexity_per_loop;
    use rrt_model::KvDtype;
    for (path, what) in [
        (smollm2_gguf(), "vanilla"),
        (demo_model(), "recursive 15 x 2"),
    ] {
        let m = load(&path, WeightDtype::F32);
        let text = std::fs::read_to_string(kjv_heldout()).unwrap();
        let mut ids = m.tokenizer.encode(&text).unwrap();
        ids.truncate(TOKENS);
        let ppl = |kv| perplexity_per_loop(&m.model, &ids, 256, false, kv).unwrap()[0].perplexity();
        let f32_kv = ppl(KvDtype::F32);
        let bytes = |kv| m.model.kv_layout(16, kv).unwrap().bytes_per_token();
        for (kv, bound) in [(KvDtype::Bf16, 0.001), (KvDtype::Int8, 0.005)] {
            let got = ppl(kv);
            eprintln!(
                "{what}: perplexity with {kv} KV {got:.4} vs f32 KV {f32_kv:.4} ({:+.4}%), {} vs {} bytes a token",
                100.0 * (got / f32_kv - 1.0),
                bytes(kv),
                bytes(KvDtype::F32)
            );
            assert!(
                (got / f32_kv - 1.0).abs() <= bound,
                "{what}: {kv} KV {got} vs {f32_kv}"
            );
        }
        assert_eq!(2 * bytes(KvDtype::Bf16), bytes(KvDtype::F32));
        // A byte an element and an f32 scale per KV head, for K and V of every layer.
        let c = &m.model.cfg;
        assert_eq!(
            bytes(KvDtype::Int8),
            c.num_layers * 2 * (c.kv_dim() + 4 * c.num_kv_heads)
        );
        assert_eq!(bytes(KvDtype::F32), m.model.cfg.kv_bytes_per_token());
    }
}

/// The bundled model re-written with every 2-D weight as Q8_0 (norms stay f32), as llama.cpp
/// would write a Q8_0 model.
fn q8_0_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let src = smollm2_gguf();
    let mut reader = std::io::BufReader::new(std::fs::File::open(&src).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let t = content
            .tensor(&mut reader, name, &candle_core::Device::Cpu)
            .unwrap();
        let f = t.dequantize(&candle_core::Device::Cpu).unwrap();
        let q = if f.rank() == 2 {
            QTensor::quantize(&f, GgmlDType::Q8_0).unwrap()
        } else {
            QTensor::quantize(&f, GgmlDType::F32).unwrap()
        };
        tensors.push((name.clone(), q));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let path = dir.join("smollm2-q8_0.gguf");
    let mut out = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut out, &metadata, &refs).unwrap();
    path
}

#[test]
fn a_q8_0_gguf_loads_its_int8_blocks_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let path = q8_0_copy(dir.path());
    let q8 = load(&path, WeightDtype::Q8);
    // The file's values, dequantized by candle, are exactly what the packed weights hold: no
    // second rounding. (f32 loading dequantizes the same file.)
    let f32m = load(&path, WeightDtype::F32);
    for (a, b) in q8.model.layers.iter().zip(&f32m.model.layers) {
        for (x, y) in [
            (&a.qkv, &b.qkv),
            (&a.o, &b.o),
            (&a.gate_up, &b.gate_up),
            (&a.down, &b.down),
        ] {
            assert_eq!(x.dtype(), WeightDtype::Q8);
            let (x, y) = (x.weight().unwrap(), y.weight().unwrap());
            let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
    }
    let (x, y) = (
        q8.model.lm_head.weight().unwrap(),
        f32m.model.lm_head.weight().unwrap(),
    );
    let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "the LM head");
    // And the model still scores like the original.
    let base = heldout_ppl(&load(&smollm2_gguf(), WeightDtype::F32));
    let ppl = heldout_ppl(&q8);
    assert!(
        (ppl / base - 1.0).abs() <= 0.015,
        "Q8_0 file at q8: {ppl} vs {base}"
    );
}
