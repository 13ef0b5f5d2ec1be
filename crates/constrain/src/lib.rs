//! Constrained decoding: what a request's output must follow (a JSON schema, any JSON object,
//! a regular expression or a Lark grammar), compiled by llguidance into a token-level matcher
//! the engine asks for a mask before each sampled token ([`rrt_engine::Constraint`]).
//!
//! - [`vocab`]: the model's vocabulary as llguidance's token trie (each token's bytes, from the
//!   tokenizer), and tokenization of bytes through the model's own tokenizer;
//! - [`spec`]: the kinds of constraint and their grammars, with bounded error messages;
//! - [`compiler`]: compiles a constraint once per distinct text (an LRU of compiled parsers),
//!   hands each request a fresh matcher, counts compile time and cache hits;
//! - [`matcher`]: one request's matcher as the engine's [`rrt_engine::Constraint`].

#![forbid(unsafe_code)]

pub mod compiler;
pub mod matcher;
pub mod spec;
pub mod vocab;

pub use compiler::{CompileStats, Compiler};
pub use spec::{ConstraintError, Spec};
