//! Writes the input of the PyTorch gradient reference (`scripts/train_reference.py`): a tiny
//! recursive model with LoRA, per-loop norms and exit heads (every tensor by name), a batch with
//! a teacher, and the loss weights. `make train-fixtures` runs this, then the script, and the
//! outputs are committed; `tests/pytorch.rs` compares the Rust gradients with them.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rrt_model::recursive::convert::{convert, ConvertOptions};
use rrt_model::recursive::mapping::Init;
use rrt_model::source::safetensors::SafetensorsSource;
use rrt_model::{Llama, ModelConfig};
use rrt_train::{Groups, LossWeights, TrainModel};

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("../model/tests/fixtures/tiny-gqa-tied");
    let out = root.join("tests/fixtures/pytorch-gradients");
    std::fs::create_dir_all(&out)?;
    let cfg = ModelConfig::from_hf_file(&src.join("config.json"))?;
    let mut st = SafetensorsSource::open_dir(&src)?;
    let plain = Llama::load(cfg, &mut st, rrt_model::WeightDtype::F32, None)?;
    let opts = ConvertOptions {
        block_layers: 1,
        init: Init::Average,
        seed: 0,
        rank_attn: 4,
        rank_mlp: 3,
        per_loop_norms: true,
        source: "tiny-gqa-tied".into(),
    };
    let mut model = TrainModel::from_llama(&convert(&plain, &opts, &|| {})?)?;
    model.add_exit_heads(3, 1);
    let up = model.exits[0].up;
    let n = model.params.list[up.0].value.len();
    model.params.list[up.0].value = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.3)
        .collect();
    model.set_trainable(Groups {
        shared: true,
        lora: true,
        norms: true,
        exits: true,
    })?;
    let mut tensors = HashMap::new();
    for p in &model.params.list {
        tensors.insert(
            p.name.clone(),
            Tensor::from_slice(&p.value, p.shape.as_slice(), &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&tensors, out.join("params.safetensors"))?;
    let (seqs, t, k, vocab) = (2usize, 8usize, 5usize, model.cfg.vocab_size);
    let tokens: Vec<u32> = (0..seqs * (t + 1))
        .map(|i| ((i * 53 + 11) % vocab) as u32)
        .collect();
    let weights = LossWeights {
        ce: 0.3,
        kd: 0.7,
        temperature: 2.0,
        exit_weight: 0.4,
        self_kd: 0.25,
        classifier: 0.5,
    };
    let mut ids = Vec::new();
    let mut logits = Vec::new();
    let mut lse = Vec::new();
    for r in 0..seqs * t {
        let row: Vec<f32> = (0..vocab)
            .map(|v| (((v * 29 + r * 17) % 97) as f32 / 97.0 - 0.5) * 9.0)
            .collect();
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let tau = weights.temperature;
        let max = row[order[0]] / tau;
        lse.push(max + row.iter().map(|&l| (l / tau - max).exp()).sum::<f32>().ln());
        ids.extend(order[..k].iter().map(|&i| i as u32));
        logits.extend(order[..k].iter().map(|&i| row[i]));
    }
    let trainable: Vec<&str> = model
        .params
        .list
        .iter()
        .filter(|p| p.trainable)
        .map(|p| p.name.as_str())
        .collect();
    let lora: Vec<Vec<Option<usize>>> = model
        .unrolled
        .iter()
        .map(|u| u.lora.iter().map(|l| l.map(|l| l.rank)).collect())
        .collect();
    let spec = serde_json::json!({
        "config": model.cfg,
        "block": model.block(),
        "loops": model.loops(),
        "lora_ranks": lora,
        "exit_rank": 3,
        "batch": { "tokens": tokens, "seqs": seqs, "t": t, "k": k, "teacher_ids": ids, "teacher_logits": logits, "teacher_lse": lse },
        "weights": weights,
        "trainable": trainable,
    });
    std::fs::write(out.join("spec.json"), serde_json::to_string_pretty(&spec)?)?;
    println!("wrote {}", out.display());
    Ok(())
}
