//! GGUF files (llama.cpp's format): metadata -> [`ModelConfig`], quantized tensors dequantized at
//! load (to f32 or f16), and the byte-level BPE tokenizer rebuilt from the metadata.
//!
//! llama.cpp stores Q and K projections with their rows permuted for its interleaved RoPE. The
//! decoder uses the Hugging Face (half-split) RoPE, so those rows are permuted back here: every
//! model in rrt, whatever its file format, has Hugging Face layout in memory.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::{Q8Blocks, TensorSource};
use crate::config::{ModelConfig, SUPPORTED_ARCHITECTURES};
use crate::error::{ModelError, Result};
use crate::projection::Projection;

/// An open GGUF file: parsed header and metadata, tensors read on demand.
pub struct GgufSource {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = match Content::read(&mut reader) {
            Ok(c) => c,
            Err(e) => {
                // A quantization candle cannot read: name the tensor and the type.
                let mut again =
                    BufReader::new(File::open(path).map_err(|e| ModelError::io(path, e))?);
                if let Some((name, t)) = super::gguf_types::first_unsupported(&mut again) {
                    return Err(ModelError::UnsupportedDtype {
                        path: path.into(),
                        name,
                        dtype: format!(
                            "{} (ggml type {t}); rrt reads {}",
                            super::gguf_types::ggml_type_name(t).unwrap_or("unknown"),
                            super::gguf_types::SUPPORTED
                        ),
                    });
                }
                return Err(ModelError::Gguf {
                    path: path.into(),
                    message: first_line(&e),
                });
            }
        };
        Ok(Self {
            path: path.into(),
            content,
            reader,
        })
    }

    fn meta(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.meta_error(key, "missing"))
    }

    fn meta_error(&self, key: &str, message: impl std::fmt::Display) -> ModelError {
        ModelError::GgufMetadata {
            path: self.path.clone(),
            key: key.into(),
            message: message.to_string(),
        }
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self.meta(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => {
                return Err(self.meta_error(key, format!("expected an integer, got {other:?}")))
            }
        };
        Ok(n as usize)
    }

    fn meta_opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.content.metadata.contains_key(key) {
            self.meta_usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(self.meta_error(key, format!("expected a float, got {other:?}"))),
        }
    }

    fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|_| self.meta_error(key, "expected a string"))
    }

    fn meta_strings(&self, key: &str) -> Result<Vec<&str>> {
        let values = self
            .meta(key)?
            .to_vec()
            .map_err(|_| self.meta_error(key, "expected an array"))?;
        values
            .iter()
            .map(|v| {
                v.to_string()
                    .map(String::as_str)
                    .map_err(|_| self.meta_error(key, "expected an array of strings"))
            })
            .collect()
    }

    /// The architecture's hyper-parameters from `{arch}.*` metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.meta_str("general.architecture")?.to_string();
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture {
                path: self.path.clone(),
                arch,
                supported: SUPPORTED_ARCHITECTURES,
            });
        }
        let hidden = self.meta_usize("llama.embedding_length")?;
        let heads = self.meta_usize("llama.attention.head_count")?;
        let head_dim = match self.meta_opt_usize("llama.attention.key_length")? {
            Some(d) => d,
            None => self
                .meta_opt_usize("llama.rope.dimension_count")?
                .unwrap_or(hidden / heads.max(1)),
        };
        let vocab_size = match self.meta_opt_usize("llama.vocab_size")? {
            Some(v) => v,
            None => self.meta_strings("tokenizer.ggml.tokens")?.len(),
        };
        let eos = self.meta_opt_usize("tokenizer.ggml.eos_token_id")?;
        let cfg = ModelConfig {
            hidden_size: hidden,
            intermediate_size: self.meta_usize("llama.feed_forward_length")?,
            num_layers: self.meta_usize("llama.block_count")?,
            num_heads: heads,
            num_kv_heads: self
                .meta_opt_usize("llama.attention.head_count_kv")?
                .unwrap_or(heads),
            head_dim,
            vocab_size,
            rms_norm_eps: self
                .meta_f64("llama.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5),
            rope_theta: self.meta_f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
            max_position_embeddings: self.meta_opt_usize("llama.context_length")?.unwrap_or(2048),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: self
                .meta_opt_usize("tokenizer.ggml.bos_token_id")?
                .map(|v| v as u32),
            eos_token_ids: eos.map(|v| vec![v as u32]).unwrap_or_default(),
        };
        if self
            .content
            .metadata
            .contains_key("llama.rope.scaling.type")
        {
            let kind = self.meta_str("llama.rope.scaling.type")?;
            if kind != "none" {
                return Err(self.meta_error(
                    "llama.rope.scaling.type",
                    format!("`{kind}` is not supported (only no scaling)"),
                ));
            }
        }
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// The tokenizer described by `tokenizer.ggml.*` metadata.
    pub fn tokenizer_parts(&self) -> Result<GgufTokenizer> {
        let model = self.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(self.meta_error(
                "tokenizer.ggml.model",
                format!(
                    "`{model}` is not supported from GGUF (only byte-level BPE `gpt2`); \
                     load the Hugging Face directory with its tokenizer.json instead"
                ),
            ));
        }
        let tokens: Vec<String> = self
            .meta_strings("tokenizer.ggml.tokens")?
            .into_iter()
            .map(String::from)
            .collect();
        let merges = self
            .meta_strings("tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        self.meta_error(
                            "tokenizer.ggml.merges",
                            format!("entry {i} `{m}` has no space"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let token_types = match self.content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|_| self.meta_error("tokenizer.ggml.token_type", "expected an array"))?
                .iter()
                .map(|t| t.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let pre = match self.content.metadata.get("tokenizer.ggml.pre") {
            Some(v) => v.to_string().cloned().unwrap_or_default(),
            None => "default".into(),
        };
        let chat_template = self
            .content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned());
        Ok(GgufTokenizer {
            tokens,
            merges,
            token_types,
            pre,
            bos: self
                .meta_opt_usize("tokenizer.ggml.bos_token_id")?
                .map(|v| v as u32),
            eos: self
                .meta_opt_usize("tokenizer.ggml.eos_token_id")?
                .map(|v| v as u32),
            add_bos: matches!(
                self.content.metadata.get("tokenizer.ggml.add_bos_token"),
                Some(Value::Bool(true))
            ),
            chat_template,
        })
    }

    /// The heads of `name`'s row permutation (llama.cpp stores Q and K rows interleaved per
    /// head), checked against `rows`; `None` for other tensors.
    fn permuted_heads(
        &self,
        name: &str,
        gname: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<usize>> {
        let heads = if name.ends_with("q_proj.weight") {
            self.meta_usize("llama.attention.head_count")?
        } else if name.ends_with("k_proj.weight") {
            self.meta_opt_usize("llama.attention.head_count_kv")?
                .map_or_else(|| self.meta_usize("llama.attention.head_count"), Ok)?
        } else {
            return Ok(None);
        };
        if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                name: gname.into(),
                expected: vec![heads * (rows / heads.max(1)), cols],
                actual: vec![rows, cols],
            });
        }
        Ok(Some(heads))
    }

    fn read_tensor(&mut self, gguf_name: &str) -> Result<Tensor> {
        let qtensor = self
            .content
            .tensor(&mut self.reader, gguf_name, &Device::Cpu)
            .map_err(|e| ModelError::Gguf {
                path: self.path.clone(),
                message: format!("tensor `{gguf_name}`: {}", first_line(&e)),
            })?;
        qtensor
            .dequantize(&Device::Cpu)
            .map_err(|e| ModelError::UnsupportedDtype {
                path: self.path.clone(),
                name: gguf_name.into(),
                dtype: format!("{:?} ({})", qtensor.dtype(), first_line(&e)),
            })
    }
}

/// Everything needed to rebuild a GGUF model's tokenizer.
pub struct GgufTokenizer {
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
    /// llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    /// llama.cpp's pre-tokenizer name (`smollm`, `gpt2`, `llama-bpe`, ...).
    pub pre: String,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

fn first_line(e: &candle_core::Error) -> String {
    let line = e.to_string().lines().next().unwrap_or_default().to_string();
    if line.contains("failed to fill whole buffer") {
        "the file is truncated (it ends inside the header or metadata)".into()
    } else {
        line
    }
}

/// Maps a Hugging Face tensor name to its GGUF name.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let part = suffix.strip_suffix(".weight")?;
    let part = match part {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => Projection::ALL
            .into_iter()
            .find(|p| p.path() == part)?
            .gguf_name(),
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

/// Undoes llama.cpp's Q/K row permutation: rows of each head go from interleaved pairs back to
/// the two-halves order that Hugging Face RoPE expects.
fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let head_dim = rows / heads;
    w.reshape((heads, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

impl TensorSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn load_q8_blocks(&mut self, name: &str) -> Result<Option<Q8Blocks>> {
        let Some(gname) = gguf_name(name) else {
            return Ok(None);
        };
        match self.content.tensor_infos.get(&gname) {
            Some(info) if info.ggml_dtype == GgmlDType::Q8_0 && info.shape.rank() == 2 => {}
            _ => return Ok(None),
        }
        let qtensor = self
            .content
            .tensor(&mut self.reader, &gname, &Device::Cpu)
            .map_err(|e| ModelError::Gguf {
                path: self.path.clone(),
                message: format!("tensor `{gname}`: {}", first_line(&e)),
            })?;
        let (n, k) = qtensor.shape().dims2()?;
        let bytes = qtensor.data()?;
        // A Q8_0 block: the scale as f16, then 32 int8 values.
        const BLOCK: usize = 2 + 32;
        let blocks = k / 32;
        if k % 32 != 0 || bytes.len() != n * blocks * BLOCK {
            return Err(ModelError::Gguf {
                path: self.path.clone(),
                message: format!(
                    "tensor `{gname}`: Q8_0 data of {} bytes for [{n}, {k}]",
                    bytes.len()
                ),
            });
        }
        let heads = self.permuted_heads(name, &gname, n, k)?;
        let mut out = Q8Blocks {
            n,
            k,
            scales: vec![0.0; n * blocks],
            q: vec![0; n * k],
        };
        for row in 0..n {
            // Hugging Face row `row` is stored at `src` (the inverse of `unpermute`).
            let src = match heads {
                Some(h) => {
                    let hd = n / h;
                    let (head, r) = (row / hd, row % hd);
                    let (t, i) = (r / (hd / 2), r % (hd / 2));
                    head * hd + i * 2 + t
                }
                None => row,
            };
            for b in 0..blocks {
                let block = &bytes[(src * blocks + b) * BLOCK..][..BLOCK];
                out.scales[row * blocks + b] =
                    half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                for (dst, &v) in out.q[(row * blocks + b) * 32..][..32]
                    .iter_mut()
                    .zip(&block[2..])
                {
                    *dst = v as i8;
                }
            }
        }
        Ok(Some(out))
    }

    fn load(&mut self, name: &str, dtype: DType) -> Result<Option<Tensor>> {
        let Some(gname) = gguf_name(name) else {
            return Ok(None);
        };
        if !self.content.tensor_infos.contains_key(&gname) {
            return Ok(None);
        }
        let mut tensor = self.read_tensor(&gname)?;
        let (rows, cols) = tensor.dims2().map_or((tensor.elem_count(), 1), |d| d);
        if let Some(heads) = self.permuted_heads(name, &gname, rows, cols)? {
            tensor = unpermute(&tensor, heads)?;
        }
        Ok(Some(tensor.to_dtype(dtype)?))
    }
}
