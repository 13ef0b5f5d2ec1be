//! The engine on SmolLM2-135M converted to 15 shared layers x 2 loops: 16 concurrent greedy
//! requests through continuous depth-wise batching (and sequence-wise) equal one-at-a-time
//! generation token for token.

#![forbid(unsafe_code)]

use rrt_engine::{Engine, EngineConfig, GenParams, Received, Request, Scheduler};
use rrt_model::generate::greedy;
use rrt_model::recursive::convert::{convert, ConvertOptions};
use rrt_model::recursive::mapping::Init;
use rrt_tests::smollm2_gguf;

#[test]
fn cdb_and_csb_on_smollm2_15x2_match_sequential_generation() {
    let loaded = rrt_model::load(&smollm2_gguf(), rrt_model::WeightDtype::F32).unwrap();
    let opts = ConvertOptions {
        block_layers: 15,
        init: Init::Stepwise,
        seed: 0,
        rank_attn: 8,
        rank_mlp: 8,
        per_loop_norms: false,
        source: "smollm2".into(),
    };
    let model = convert(&loaded.model, &opts, &|| {}).unwrap();
    let texts = [
        "The capital of France is",
        "In the beginning",
        "Once upon a time there was",
        "1 2 3 4",
        "The LORD is my shepherd",
        "Rust is a programming language",
        "Hello",
        "And God said, Let there be light: and there was light. And God saw the light",
    ];
    let cases: Vec<(Vec<u32>, usize)> = (0..16)
        .map(|i| {
            (
                loaded.tokenizer.encode(texts[i % texts.len()]).unwrap(),
                4 + i % 5,
            )
        })
        .collect();
    let want: Vec<Vec<u32>> = cases
        .iter()
        .map(|(p, n)| greedy(&model, p, *n).unwrap())
        .collect();
    for scheduler in [Scheduler::Cdb, Scheduler::Csb] {
        let mut engine = Engine::new(
            model.clone(),
            EngineConfig {
                scheduler,
                max_batch_rows: 64,
                max_sequences: 16,
                kv_budget_bytes: 1 << 30,
                ..EngineConfig::default()
            },
        )
        .unwrap();
        let rxs: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (p, n))| {
                let params = GenParams {
                    max_new_tokens: *n,
                    ..GenParams::default()
                };
                let (req, rx) = Request::with_channel(i as u64, p.clone(), params, None);
                engine.submit(req);
                rx
            })
            .collect();
        engine.run_until_idle();
        for (i, rx) in rxs.iter().enumerate() {
            let got = Received::drain(rx).unwrap_or_else(|e| panic!("{e}")).tokens;
            assert_eq!(got, want[i], "{scheduler:?}: request {i}");
        }
    }
}

/// `rrt bench engine` end to end on a small workload: every run of the comparison finishes,
/// the table has a row per run, and the threshold plot is a PNG.
#[test]
fn engine_bench_prints_the_comparison_and_writes_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("thresholds.png");
    let out = rrt_tests::rrt(&[
        "bench",
        "engine",
        "--prompts",
        "4",
        "--min-prompt",
        "8",
        "--max-prompt",
        "16",
        "--min-output",
        "4",
        "--max-output",
        "6",
        "--lora-ranks",
        "0",
        "--thresholds",
        "0.9,0.5,0.3",
        "--synthetic",
        "1.0",
        "--repeats",
        "2",
        "--score-windows",
        "3",
        "--score-context",
        "4",
        "--score-tokens",
        "8",
        "--plot",
        png.to_str().unwrap(),
    ]);
    let text = rrt_tests::stdout(&out);
    assert!(out.status.success(), "{}", rrt_tests::stderr(&out));
    for row in [
        "| vanilla 30 layers, static |",
        "| vanilla 30 layers, CSB |",
        "LoRA r0: CSB |",
        "LoRA r0: CDB, no exit |",
        "LoRA r0: CDB, oracle exits (replay) |",
        "LoRA r0: CDB, oracle exits (replay), KV copy |",
        "LoRA r0: CDB, max-prob >= 0.3 |",
        "where the time goes",
    ] {
        assert!(text.contains(row), "missing {row:?} in\n{text}");
    }
    // Two rounds per row; a perplexity per row; every generated token of the synthetic 100%
    // trace exits after loop 1 (only each request's first token, from the prompt, runs both).
    let synthetic = text
        .lines()
        .find(|l| l.contains("synthetic: 100% exit after loop 1 |"))
        .unwrap_or_else(|| panic!("no synthetic row in\n{text}"));
    let cells: Vec<&str> = synthetic.split('|').map(str::trim).collect();
    assert_eq!(cells[3].split(" / ").count(), 2, "two rounds: {synthetic}");
    let depth: f64 = cells[4].trim_end_matches(" loops").parse().unwrap();
    assert!(depth < 1.3, "{synthetic}");
    // Perplexity is the last column.
    let perplexity: f64 = cells[cells.len() - 2].parse().unwrap();
    assert!(perplexity.is_finite() && perplexity > 1.0, "{synthetic}");
    let vanilla = text
        .lines()
        .find(|l| l.starts_with("| vanilla 30 layers, CSB |"))
        .unwrap();
    let vanilla_ppl: f64 = vanilla
        .split('|')
        .rev()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        vanilla_ppl < perplexity,
        "the source model scores the text better than exits after loop 1 of an un-uptrained conversion: {vanilla} vs {synthetic}"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
}

/// `rrt bench engine --dtypes`: the main rows at each weight dtype side by side, with the weight
/// bytes, ratios to the first dtype and greedy agreement with it; the dtypes are repacked from
/// f32, so another `--dtype` is refused.
#[test]
fn engine_bench_compares_weight_dtypes_side_by_side() {
    let small = [
        "bench",
        "engine",
        "--prompts",
        "3",
        "--min-prompt",
        "8",
        "--max-prompt",
        "12",
        "--min-output",
        "4",
        "--max-output",
        "6",
        "--lora-ranks",
        "0",
        "--synthetic",
        "0.5",
        "--score-windows",
        "1",
        "--score-context",
        "4",
        "--score-tokens",
        "4",
        "--dtypes",
        "f32,bf16,q8",
    ];
    let out = rrt_tests::rrt(&small);
    let text = rrt_tests::stdout(&out);
    assert!(out.status.success(), "{}", rrt_tests::stderr(&out));
    let row = |name: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row {name:?} in\n{text}"));
        line.split('|').map(|c| c.trim().to_string()).collect()
    };
    for name in [
        "vanilla 30 layers, static",
        "vanilla 30 layers, CSB",
        "recursive: CSB",
        "recursive: CDB, no exit",
        "recursive: CDB, synthetic: 50% exit after loop 1",
    ] {
        let cells = row(name);
        // "", name, f32, bf16, q8, ""
        assert_eq!(cells.len(), 6, "{cells:?}");
        assert!(cells[2].ends_with("tok/s (1.00x)"), "{cells:?}");
        for cell in &cells[3..5] {
            assert!(
                cell.contains("tok/s (") && cell.ends_with("% agree)"),
                "{cells:?}"
            );
        }
    }
    let weights = row("weights: vanilla");
    assert!(weights[3].ends_with("(0.50x)"), "{weights:?}");
    assert!(weights[4].ends_with("(0.32x)"), "{weights:?}");
    let mut refused = small.to_vec();
    refused.extend(["--dtype", "bf16"]);
    let out = rrt_tests::rrt(&refused);
    assert!(!out.status.success());
    assert!(
        rrt_tests::stderr(&out).contains("leave --dtype at f32"),
        "{}",
        rrt_tests::stderr(&out)
    );
}
