//! `/v1/completions` and `/v1/chat/completions`: an OpenAI request becomes the same
//! `GenerateRequest` a gRPC caller would send and runs through the same path
//! ([`Inner::start_request`]: validation, admission, deadlines, balancing, failover, metrics);
//! its messages come back as one JSON reply or as server-sent events. Dropping the event
//! stream (the client went away) drops the relay's receiver, which cancels the request on its
//! worker exactly as a cancelled gRPC call does.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use rrt_proto::v1 as pb;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::error::ApiError;
use super::types::{ChatRequest, Common, CompletionRequest, Content, OneOrMany, Usage};
use crate::relay::Item;
use crate::service::Inner;

/// max_tokens when a chat request gives none (OpenAI: up to the context; here a bounded default).
const CHAT_DEFAULT_MAX_TOKENS: u32 = 256;
/// max_tokens when a completion request gives none (OpenAI's default).
const COMPLETION_DEFAULT_MAX_TOKENS: u32 = 16;

/// Which endpoint: decides the reply's shape.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// The parts of a request the reply needs.
struct Plan {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    /// The reply may be a tool call (parsed into `tool_calls`).
    tools: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn exit_parameters(common: &Common) -> Result<Option<pb::ExitParameters>, ApiError> {
    let Some(e) = &common.rrt_exit else {
        return Ok(None);
    };
    let policy = rrt_proto::exits::policy_by_name(&e.policy).map_err(|names| {
        ApiError::bad_request(
            format!(
                "rrt_exit.policy {}: {names}",
                rrt_service::validate::quote(&e.policy)
            ),
            Some("rrt_exit"),
        )
    })?;
    Ok(Some(pb::ExitParameters {
        policy: policy as i32,
        threshold: e.threshold,
    }))
}

/// rrt's `rrt_quality` extension as the gRPC tier.
fn quality_tier(common: &Common) -> Result<pb::QualityTier, ApiError> {
    match common.rrt_quality.as_deref() {
        None | Some("adaptive") => Ok(pb::QualityTier::Unspecified),
        Some("full") => Ok(pb::QualityTier::Full),
        Some(other) => Err(ApiError::bad_request(
            format!(
                "rrt_quality {}: one of adaptive, full",
                rrt_service::validate::quote(other)
            ),
            Some("rrt_quality"),
        )),
    }
}

/// The `GenerateRequest` of what both endpoints share.
fn base(common: &Common, default_max: u32) -> Result<pb::GenerateRequest, ApiError> {
    super::structured::refuse_unknown(&common.extra)?;
    let constraint = super::structured::constraint(common.response_format.as_ref())?;
    if let Some(n) = common.n {
        if n != 1 {
            return Err(ApiError::bad_request(
                format!("n = {n}: rrt returns one choice per request (n = 1)"),
                Some("n"),
            ));
        }
    }
    let max_tokens = common
        .max_completion_tokens
        .or(common.max_tokens)
        .unwrap_or(default_max);
    if max_tokens == 0 {
        let param = if common.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        return Err(ApiError::bad_request(
            format!("{param} must be at least 1"),
            Some(param),
        ));
    }
    let temperature = common.temperature.unwrap_or(1.0);
    Ok(pb::GenerateRequest {
        model: common.model.clone(),
        max_new_tokens: max_tokens,
        sampling: Some(pb::SamplingParameters {
            temperature,
            top_p: common.top_p.unwrap_or(1.0),
            top_k: common.top_k.unwrap_or(0),
            repetition_penalty: common.repetition_penalty.unwrap_or(1.0),
            seed: common.seed,
        }),
        stop: common
            .stop
            .clone()
            .map(OneOrMany::into_vec)
            .unwrap_or_default(),
        exit: exit_parameters(common)?,
        quality: quality_tier(common)? as i32,
        constraint,
        priority: common.priority.unwrap_or(0),
        ignore_eos: common.ignore_eos,
        ..Default::default()
    })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            rrt_service::validate::bounded(format!("invalid request body: {e}")),
            None,
        )
    })
}

fn plan(kind: Kind, common: &Common, model: String, logprobs: bool) -> Plan {
    let mut id = String::from(match kind {
        Kind::Completion => "cmpl-",
        Kind::Chat => "chatcmpl-",
    });
    let mut rng = rand::rng();
    for _ in 0..24 {
        id.push(char::from_digit(rng.random_range(0..36), 36).unwrap_or('0'));
    }
    Plan {
        kind,
        id,
        created: now(),
        model,
        stream: common.stream,
        include_usage: common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
        logprobs,
        tools: false,
    }
}

pub async fn completions(
    inner: Arc<Inner>,
    timeout: Option<Duration>,
    body: &[u8],
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let prompts = req.prompt.into_vec();
    let [prompt] = <[String; 1]>::try_from(prompts).map_err(|v| {
        ApiError::bad_request(
            format!("prompt: one prompt per request (got {})", v.len()),
            Some("prompt"),
        )
    })?;
    if req.echo {
        return Err(ApiError::bad_request("echo is not supported", Some("echo")));
    }
    let logprobs = match req.logprobs {
        None => false,
        Some(0) => true,
        Some(k) => {
            return Err(ApiError::bad_request(
                format!("logprobs = {k}: rrt returns the chosen token's log-probability only (logprobs = 0)"),
                Some("logprobs"),
            ))
        }
    };
    let mut g = base(&req.common, COMPLETION_DEFAULT_MAX_TOKENS)?;
    g.prompt = prompt;
    g.logprobs = logprobs;
    run(inner, timeout, g, Kind::Completion, &req.common, false).await
}

pub async fn chat(
    inner: Arc<Inner>,
    timeout: Option<Duration>,
    body: &[u8],
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    if let Some(k) = req.top_logprobs.filter(|&k| k > 0) {
        return Err(ApiError::bad_request(
            format!("top_logprobs = {k}: rrt returns the chosen token's log-probability only"),
            Some("top_logprobs"),
        ));
    }
    let mut g = base(&req.common, CHAT_DEFAULT_MAX_TOKENS)?;
    let tool_plan = super::tools::plan(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    if let Some(t) = &tool_plan {
        if g.constraint.is_some() {
            return Err(ApiError::bad_request(
                "response_format and tools cannot both shape one reply (use tool_choice \"none\", or no response_format)",
                Some("response_format"),
            ));
        }
        g.constraint = Some(pb::OutputConstraint {
            kind: Some(pb::output_constraint::Kind::LarkGrammar(t.grammar.clone())),
        });
    }
    for (i, m) in req.messages.into_iter().enumerate() {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad_request(
                                format!("messages[{i}].content: only text parts are supported"),
                                Some("messages"),
                            ))
                        }
                    }
                }
                text
            }
        };
        // Earlier calls as the model wrote them.
        let content = match &m.tool_calls {
            Some(calls) if !calls.is_empty() => content + &super::tools::render_calls(calls),
            _ if m.role == "tool" => super::tools::render_response(&content),
            _ => content,
        };
        g.messages.push(pb::ChatMessage {
            role: m.role,
            content,
        });
    }
    if let Some(t) = &tool_plan {
        match g.messages.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{}", first.content, t.system);
            }
            _ => g.messages.insert(
                0,
                pb::ChatMessage {
                    role: "system".into(),
                    content: t.system.clone(),
                },
            ),
        }
    }
    g.logprobs = req.logprobs;
    run(
        inner,
        timeout,
        g,
        Kind::Chat,
        &req.common,
        tool_plan.is_some(),
    )
    .await
}

fn finish_reason(reason: pb::FinishReason) -> &'static str {
    match reason {
        pb::FinishReason::Length => "length",
        _ => "stop",
    }
}

async fn run(
    inner: Arc<Inner>,
    timeout: Option<Duration>,
    g: pb::GenerateRequest,
    kind: Kind,
    common: &Common,
    tools: bool,
) -> Result<Response, ApiError> {
    // Resolve here so an unknown model is a 404 before anything is admitted.
    let model = inner
        .resolve_model(&g.model)
        .map_err(|e| ApiError::from(tonic::Status::from(e)))?;
    let mut plan = plan(kind, common, model, g.logprobs);
    plan.tools = tools;
    let (rx, worker) = inner.start_request(g, timeout).await?;
    if plan.stream {
        Ok(stream(plan, rx).into_response())
    } else {
        whole(plan, rx, worker).await
    }
}

/// A non-streamed reply: every message collected.
async fn whole(
    plan: Plan,
    mut rx: mpsc::Receiver<Item>,
    worker: String,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let (mut tokens, mut exits, mut pieces, mut lps) = (0u32, vec![], vec![], vec![]);
    let (finish, last) = loop {
        let Some(item) = rx.recv().await else {
            return Err(
                tonic::Status::unavailable("the request's relay ended without a finish").into(),
            );
        };
        let msg = item?;
        text.push_str(&msg.text);
        if let Some(t) = msg.token() {
            tokens += 1;
            exits.push(t.exit_loop);
            pieces.push(msg.text.clone());
            lps.extend(t.logprob);
        }
        if let Some(reason) = msg.finish() {
            break (reason, msg);
        }
    };
    let usage = Usage::new(&last, tokens);
    let logprobs = plan
        .logprobs
        .then(|| logprobs_json(plan.kind, &pieces, &lps));
    let calls = plan
        .tools
        .then(|| super::tools::parse_calls(&text))
        .flatten();
    let choice = match plan.kind {
        Kind::Completion => json!({
            "index": 0, "text": text, "finish_reason": finish_reason(finish), "logprobs": logprobs,
        }),
        Kind::Chat if calls.is_some() => {
            let tool_calls: Vec<Value> = calls
                .unwrap_or_default()
                .into_iter()
                .map(|(name, arguments)| {
                    json!({
                        "id": super::tools::call_id(), "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    })
                })
                .collect();
            json!({
                "index": 0,
                "message": {"role": "assistant", "content": null, "tool_calls": tool_calls},
                "finish_reason": "tool_calls",
                "logprobs": logprobs,
            })
        }
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason(finish),
            "logprobs": logprobs,
        }),
    };
    Ok(Json(json!({
        "id": plan.id,
        "object": match plan.kind { Kind::Completion => "text_completion", Kind::Chat => "chat.completion" },
        "created": plan.created,
        "model": plan.model,
        "choices": [choice],
        "usage": usage,
        "rrt": {"worker": worker, "exit_loops": exits},
    }))
    .into_response())
}

fn logprobs_json(kind: Kind, pieces: &[String], lps: &[f32]) -> Value {
    match kind {
        Kind::Completion => {
            let mut offset = 0;
            let offsets: Vec<usize> = pieces
                .iter()
                .map(|p| {
                    let o = offset;
                    offset += p.len();
                    o
                })
                .collect();
            json!({"tokens": pieces, "token_logprobs": lps, "top_logprobs": null, "text_offset": offsets})
        }
        Kind::Chat => json!({
            "content": pieces.iter().zip(lps).map(|(p, lp)| json!({
                "token": p, "logprob": lp, "bytes": p.as_bytes(), "top_logprobs": [],
            })).collect::<Vec<_>>(),
        }),
    }
}

/// One chunk of a streamed reply.
fn chunk(
    plan: &Plan,
    text: Option<&str>,
    first: bool,
    finish: Option<&str>,
    lp: Option<(String, f32)>,
) -> Value {
    let logprobs = lp.map(|(p, l)| match plan.kind {
        Kind::Completion => json!({"tokens": [p], "token_logprobs": [l], "top_logprobs": null, "text_offset": null}),
        Kind::Chat => json!({"content": [{"token": p, "logprob": l, "bytes": p.as_bytes(), "top_logprobs": []}]}),
    });
    let choice = match plan.kind {
        Kind::Completion => json!({
            "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": logprobs,
        }),
        Kind::Chat => {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), "assistant".into());
            }
            if let Some(t) = text {
                delta.insert("content".into(), t.into());
            }
            json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs})
        }
    };
    let mut c = json!({
        "id": plan.id,
        "object": match plan.kind { Kind::Completion => "text_completion", Kind::Chat => "chat.completion.chunk" },
        "created": plan.created,
        "model": plan.model,
        "choices": [choice],
    });
    if plan.include_usage {
        c["usage"] = Value::Null;
    }
    c
}

/// The chunk of one piece of a reply that may be a tool call.
fn piece_chunk(plan: &Plan, piece: super::tools::Piece) -> Value {
    use super::tools::Piece;
    let call = |tc: Value| {
        let mut c = chunk(plan, None, false, None, None);
        c["choices"][0]["delta"]["tool_calls"] = json!([tc]);
        c
    };
    match piece {
        Piece::Text(t) => chunk(plan, Some(&t), false, None, None),
        Piece::CallStart { index, id, name } => call(json!({
            "index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""},
        })),
        Piece::Arguments { index, text } => {
            call(json!({"index": index, "function": {"arguments": text}}))
        }
    }
}

/// A streamed reply: `data: {chunk}` events, an error event if the request fails mid-way,
/// then `data: [DONE]`.
fn stream(
    plan: Plan,
    mut rx: mpsc::Receiver<Item>,
) -> Sse<impl tokio_stream::Stream<Item = Result<Event, Infallible>>> {
    let (tx, events) = mpsc::channel::<Event>(32);
    tokio::spawn(async move {
        let data = |v: Value| Event::default().data(v.to_string());
        if plan.kind == Kind::Chat
            && tx
                .send(data(chunk(&plan, Some(""), true, None, None)))
                .await
                .is_err()
        {
            return;
        }
        let mut tokens = 0u32;
        let mut parser = plan.tools.then(super::tools::StreamParser::default);
        loop {
            let item = tokio::select! {
                item = rx.recv() => item,
                // The client went away: dropping `rx` cancels the request on its worker.
                _ = tx.closed() => return,
            };
            let msg = match item {
                Some(Ok(m)) => m,
                Some(Err(status)) => {
                    let body = ApiError::from(status).body();
                    let _ = tx
                        .send(data(serde_json::to_value(body).unwrap_or_default()))
                        .await;
                    break;
                }
                None => break,
            };
            let token = msg.token();
            tokens += token.is_some() as u32;
            let lp = plan
                .logprobs
                .then(|| token.and_then(|t| t.logprob).map(|l| (msg.text.clone(), l)))
                .flatten();
            let finish = msg.finish().map(finish_reason);
            if token.is_some() || !msg.text.is_empty() {
                let chunks = match parser.as_mut() {
                    None => vec![chunk(&plan, Some(&msg.text), false, None, lp)],
                    Some(p) => p
                        .push(&msg.text)
                        .into_iter()
                        .map(|piece| piece_chunk(&plan, piece))
                        .collect(),
                };
                for c in chunks {
                    if tx.send(data(c)).await.is_err() {
                        return;
                    }
                }
            }
            if let Some(mut f) = finish {
                if let Some(p) = parser.as_mut() {
                    for piece in p.finish() {
                        if tx.send(data(piece_chunk(&plan, piece))).await.is_err() {
                            return;
                        }
                    }
                    // Whole calls; a reply cut inside a call at the token limit stays
                    // "length", as the unstreamed reply (which then does not parse) does.
                    if p.is_call() && (f == "stop" || p.whole_calls()) {
                        f = "tool_calls";
                    }
                }
                let text = (plan.kind == Kind::Completion).then_some("");
                let last = chunk(&plan, text, false, Some(f), None);
                if tx.send(data(last)).await.is_err() {
                    return;
                }
                if plan.include_usage {
                    let mut u = chunk(&plan, None, false, None, None);
                    u["choices"] = json!([]);
                    u["usage"] = json!(Usage::new(&msg, tokens));
                    if tx.send(data(u)).await.is_err() {
                        return;
                    }
                }
                break;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
    });
    Sse::new(ReceiverStream::new(events).map(Ok))
}
