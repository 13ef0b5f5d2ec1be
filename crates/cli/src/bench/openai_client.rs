//! The client side of the OpenAI API for benchmarks: one streamed request (`stream: true`,
//! usage included) read event by event, timing its first token and keeping what its usage
//! chunk reports, over a pooled HTTP/1.1 client.

use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub(super) type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub(super) fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// What one streamed request gave.
#[derive(Debug, Clone, Default)]
pub(super) struct Streamed {
    /// From sending the request to the first event with generated text.
    pub first_token: Option<Duration>,
    pub text: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
}

/// POSTs `body` (a streaming completions or chat request) to `url` and reads the stream to its
/// end. `fast`: parse only the usage chunk (the text and first-token time stay empty), for
/// throughput runs where parsing every event would be measured too.
pub(super) async fn stream(
    client: &HttpClient,
    url: &str,
    body: &Value,
    fast: bool,
) -> anyhow::Result<Streamed> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let sent = Instant::now();
    let mut res = client.request(req).await?;
    anyhow::ensure!(res.status().is_success(), "HTTP {}", res.status());
    let mut out = Streamed::default();
    let (mut pending, mut usage) = (Vec::new(), false);
    while let Some(frame) = res.body_mut().frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        // Complete events end with a blank line; the usage chunk is the one with a usage object.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let Some(json) = event.strip_prefix(b"data: ") else {
                continue;
            };
            const USAGE: &[u8] = b"\"usage\":{";
            let has_usage = json.windows(USAGE.len()).any(|w| w == USAGE);
            if !json.starts_with(b"{") || (fast && !has_usage) {
                continue;
            }
            let v: Value = serde_json::from_slice(json)?;
            if has_usage {
                let u = &v["usage"];
                out.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                out.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                out.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0);
                usage = true;
            }
            let choice = &v["choices"][0];
            let piece = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["text"].as_str())
                .unwrap_or("");
            if !piece.is_empty() {
                out.first_token.get_or_insert_with(|| sent.elapsed());
                out.text.push_str(piece);
            }
        }
    }
    anyhow::ensure!(usage, "the stream ended without a usage chunk");
    Ok(out)
}

/// `POST {base}/chat/completions` of `messages` (`[role, content]` pairs), greedy, streamed
/// with usage.
pub(super) fn chat_body(messages: &[(String, String)], max_tokens: u32, ignore_eos: bool) -> Value {
    let messages: Vec<Value> = messages
        .iter()
        .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
        .collect();
    serde_json::json!({
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": ignore_eos,
    })
}

/// Runs `bodies` against `url` with `concurrency` in flight; returns each result in order and
/// the wall time of the whole.
pub(super) async fn run_all(
    client: &HttpClient,
    url: &str,
    bodies: Vec<Value>,
    concurrency: usize,
    fast: bool,
) -> anyhow::Result<(Vec<Streamed>, Duration)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(bodies);
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (next, bodies, client, url) = (
                next.clone(),
                bodies.clone(),
                client.clone(),
                url.to_string(),
            );
            tokio::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let r = stream(&client, &url, body, fast)
                        .await
                        .with_context(|| format!("request {i}"))?;
                    done.push((i, r));
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut results = vec![Streamed::default(); bodies.len()];
    for t in tasks {
        for (i, r) in t.await?? {
            results[i] = r;
        }
    }
    Ok((results, started.elapsed()))
}
