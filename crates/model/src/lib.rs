//! rrt's model core: Llama-family decoders loaded from Hugging Face safetensors or GGUF, a batched
//! forward over independent sequences with one KV cache each, tokenizers, sampling, and the simple
//! one-sequence generation and perplexity loops that faster paths are checked against.
//!
//! Module map: [`config`] (hyper-parameters) · [`source`] (weight files) · [`load`] (detect and
//! open) · [`decoder`] (the network) · [`attention`], [`rope`], [`linear`], [`kernels`],
//! [`projection`] (its pieces) · [`kv`] (paged KV blocks, prefix cache) · [`tokenizer`], [`chat`] · [`sampling`] · [`generate`], [`perplexity`].

pub mod attention;
pub mod chat;
pub mod config;
pub mod decoder;
pub mod dtype;
pub mod error;
pub mod generate;
pub mod json;
pub mod kernels;
pub mod kv;
pub mod linear;
pub mod load;
pub mod perplexity;
pub mod projection;
pub mod recursive;
pub mod rope;
pub mod runtime;
pub mod sampling;
pub mod source;
pub mod tokenizer;
pub mod weights_file;

pub use config::ModelConfig;
pub use decoder::{BatchItem, FillRows, LayerWeights, Llama, Logits, RowGroup};
pub use dtype::WeightDtype;
pub use error::{ModelError, Result};
pub use kv::{KvDtype, KvLayout, KvPool, SeqCache};
pub use load::{load, load_shape, LoadedModel, ModelShape};
pub use projection::{Fused, Projection};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{TextStream, Tokenizer};
