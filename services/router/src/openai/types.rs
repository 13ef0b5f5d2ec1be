//! The OpenAI wire format the HTTP API reads and writes (the subset rrt serves). Request fields
//! rrt does not read are collected and refused with a 400 that names them when they would change
//! the output (`structured::refuse_unknown`); inert ones (`user`, `metadata`) pass.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// rrt's extension: the early-exit policy of the request (`none`, `max-prob`, `margin`,
/// `cosine`, `learned`) and its threshold.
#[derive(Debug, Deserialize)]
pub struct ExitExtension {
    pub policy: String,
    #[serde(default)]
    pub threshold: f32,
}

/// What `/v1/completions` and `/v1/chat/completions` share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub model: String,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's sampling extensions, as the gRPC API has them.
    pub top_k: Option<u32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub rrt_exit: Option<ExitExtension>,
    /// rrt's extension: `adaptive` (the default: the cluster's default exit policy, whose
    /// threshold is lowered under load down to a quality floor) or `full` (every loop).
    pub rrt_quality: Option<String>,
    /// Scheduling priority on the worker (vLLM's extension): lower is admitted first and
    /// preempted last; 0 by default.
    pub priority: Option<i32>,
    /// Generate up to the token limit even past the end-of-sequence token (vLLM's extension,
    /// for benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Structured output: `text`, `json_object` or `json_schema`.
    pub response_format: Option<super::structured::ResponseFormat>,
    /// Every other field of the request (refused when it would change the output).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    /// Legacy completions: the number of top log-probabilities (rrt: 0 only, the chosen
    /// token's log-probability).
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub common: Common,
}

/// A message's content: text, or a list of parts of which rrt reads the text ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant message's earlier calls (OpenAI's form). (A tool message's
    /// `tool_call_id` is not read: one call per reply, so the answer follows its call.)
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Vec<super::tools::Tool>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt tokens.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV the worker's prefix cache held (not computed again).
    pub cached_tokens: u32,
}

impl Usage {
    /// The usage of a request from its final stream message and its completion tokens.
    pub fn new(last: &rrt_proto::v1::GenerateStreamResponse, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens: last.prompt_tokens,
            completion_tokens,
            total_tokens: last.prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: last.cached_prompt_tokens,
            },
        }
    }
}

/// The OpenAI error body.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<std::borrow::Cow<'static, str>>,
    pub code: Option<String>,
}
