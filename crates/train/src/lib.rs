//! Uptraining recursive models on the CPU. The forward and backward passes are written out by
//! hand over plain `f32` buffers (no autograd framework: candle's drops gradients through its
//! fused ops and is slow here), with every large product a call of the same `gemm` the model
//! crate uses, so a training step costs about its matrix products.
//!
//! Module map: [`params`] (the model as named tensors, trainable or frozen) · [`norm`],
//! [`attention`], [`layer`] (one unrolled layer, forward and backward) · [`loss`] (exit heads,
//! cross-entropy, distillation, the early-exit loss) · [`model`] (a batch through the model) ·
//! [`optim`] (AdamW, clipping, schedule) · [`data`] (text to packed windows) · [`teacher`] (the
//! cached teacher top-k) · [`checkpoint`] · [`trainer`] (the loop).

#![forbid(unsafe_code)]

pub mod attention;
pub mod checkpoint;
pub mod corpus;
pub mod data;
pub mod error;
pub mod exit_fit;
pub mod exit_head;
pub mod layer;
pub mod loss;
pub mod model;
pub mod norm;
pub mod optim;
pub mod params;
pub mod precision;
pub mod roofline;
pub mod teacher;
pub mod trainer;
pub mod uptrain;

pub use error::{Result, TrainError};
pub use loss::{LossSums, LossWeights, TeacherTopK};
pub use model::{eval_step, train_step, Batch};
pub use params::{Grads, Groups, Params, TrainModel};
pub use precision::Precision;
