//! The tiny fixture model every rrt-train test starts from: rrt-model's `tiny-gqa-tied`
//! (grouped-query attention, tied head) turned recursive with one shared layer, per-loop norms
//! and LoRA of the given ranks.

use std::path::PathBuf;

use rrt_model::recursive::convert::{convert, ConvertOptions};
use rrt_model::recursive::mapping::Init;
use rrt_model::source::safetensors::SafetensorsSource;
use rrt_model::{Llama, ModelConfig};

pub fn tiny_recursive(rank_attn: usize, rank_mlp: usize) -> Llama {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-gqa-tied");
    let cfg = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let mut src = SafetensorsSource::open_dir(&dir).unwrap();
    let plain = Llama::load(cfg, &mut src, rrt_model::WeightDtype::F32, None).unwrap();
    let opts = ConvertOptions {
        block_layers: 1,
        init: Init::Average,
        seed: 0,
        rank_attn,
        rank_mlp,
        per_loop_norms: true,
        source: "tiny-gqa-tied".into(),
    };
    convert(&plain, &opts, &|| {}).unwrap()
}
