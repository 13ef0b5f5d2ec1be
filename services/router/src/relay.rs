//! Relaying one admitted request's worker stream to its client, for both RPCs: the stream
//! forwards each message as it comes ([`relay`]); the unary call runs the same relay and
//! collects its messages into one response ([`collect`]). The relay ends when the worker
//! finishes, fails, the deadline passes or the client goes away (dropping the worker stream
//! cancels the request downstream), and records the request's outcome, tokens and latencies.

use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, histogram};
use rrt_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

use crate::balance::{Key, Route};
use crate::error::{worker_lost, RouterError};
use crate::metrics as m;
use crate::pool::InFlight;
use crate::service::{Client, Inner};

/// What goes to the client: messages, or the status the request ended with.
pub type Item = Result<pb::GenerateStreamResponse, Status>;

/// An admitted request with its worker stream open; dropping it releases its admission permit
/// and its place on the worker.
pub struct Opened {
    pub stream: Streaming<pb::GenerateStreamResponse>,
    pub permit: rrt_service::Permit,
    pub in_flight: InFlight<Client>,
    /// The request's prefix key and how it was placed (replaced when it resumes elsewhere).
    pub key: Key,
    pub route: Route,
    /// The worker the request started on.
    pub worker: String,
    pub arrived: Instant,
    pub deadline: Instant,
    /// The request as sent to the worker, for resuming it on another.
    pub request: pb::GenerateRequest,
    /// The client's own `resume_token_ids` (the tokens sent since go after them).
    pub base_resume: Vec<u32>,
    /// The workers it was sent to.
    pub tried: Vec<String>,
}

/// The outcome label of a finished request.
fn outcome(reason: pb::FinishReason) -> &'static str {
    match reason {
        pb::FinishReason::Length => "length",
        pb::FinishReason::Eos => "eos",
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Unspecified => "error",
    }
}

/// Why a stream is being resumed: a bounded metric label.
fn resume_reason(failure: &Result<(), Status>) -> &'static str {
    match failure {
        Ok(()) => "stream_ended",
        Err(s) => match s.code() {
            Code::Unavailable => "unavailable",
            Code::Unknown => "stream_broken",
            Code::Cancelled => "cancelled",
            Code::Internal => "internal",
            _ => "other",
        },
    }
}

/// Relays `opened` into `tx` until the request ends. When its worker dies, stalls past the
/// keepalive or fails the stream, the request resumes on another worker from the prompt plus
/// the tokens already sent (`resume_token_ids`); the client sees one stream.
pub async fn relay(inner: Arc<Inner>, opened: Opened, tx: mpsc::Sender<Item>) {
    let Opened {
        mut stream,
        permit,
        mut in_flight,
        key,
        mut route,
        arrived,
        deadline,
        mut request,
        base_resume,
        mut tried,
        ..
    } = opened;
    let mut first = true;
    let mut sent: Vec<u32> = Vec::new();
    // Exit loops of the tokens from the current worker (for the class's depth).
    let mut loops = (0u64, 0u64);
    let outcome = loop {
        let next = tokio::select! {
            m = stream.message() => m,
            _ = tx.closed() => break "cancelled",
            _ = tokio::time::sleep_until(deadline.into()) => {
                let _ = tx.send(Err(Status::deadline_exceeded("the request ran past its deadline"))).await;
                break "deadline";
            }
        };
        // Ok(()): the stream ended without a finish; Err: the worker's failure.
        let failure = match next {
            Ok(Some(msg)) => {
                if first {
                    histogram!("rrt_router_time_to_first_token_seconds")
                        .record(arrived.elapsed().as_secs_f64());
                    first = false;
                }
                if let Some(t) = msg.token() {
                    sent.push(t.id);
                    loops = (loops.0 + t.exit_loop as u64, loops.1 + 1);
                }
                let finish = msg.finish();
                let (prompt, cached) = (msg.prompt_tokens, msg.cached_prompt_tokens);
                if tx.send(Ok(msg)).await.is_err() {
                    break "cancelled";
                }
                if let Some(reason) = finish {
                    let mean =
                        (loops.1 > 0 && loops.0 > 0).then(|| loops.0 as f64 / loops.1 as f64);
                    inner.balancer.finished(&route, mean, prompt, cached);
                    m::prompt_tokens(&route, prompt, cached);
                    break outcome(reason);
                }
                continue;
            }
            Ok(None) => Ok(()),
            Err(s) if worker_lost(&s) => Err(s),
            Err(s) => {
                let deadline_passed = s.code() == Code::DeadlineExceeded;
                let _ = tx.send(Err(s)).await;
                break if deadline_passed { "deadline" } else { "error" };
            }
        };
        let reason = resume_reason(&failure);
        let worker = in_flight.slot.id.clone();
        tracing::warn!(%worker, reason, tokens = sent.len(), "worker lost mid-stream; resuming elsewhere");
        drop(stream);
        drop(in_flight);
        if tried.len() >= inner.max_attempts {
            let last = match failure {
                Ok(()) => "the stream ended without a finish reason".to_string(),
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            };
            let lost = RouterError::Lost {
                attempts: tried.len(),
                tokens: sent.len(),
                last,
            };
            let _ = tx.send(Err(lost.into())).await;
            break "error";
        }
        request.resume_token_ids = [base_resume.as_slice(), sent.as_slice()].concat();
        match inner
            .connect(&request, &key, deadline, &mut tried, sent.len())
            .await
        {
            Ok((s, f, r)) => {
                route = r;
                loops = (0, 0);
                counter!("rrt_router_resumes_total", "reason" => reason).increment(1);
                counter!("rrt_router_resumed_tokens_total")
                    .increment(request.resume_token_ids.len() as u64);
                (stream, in_flight) = (s, f);
            }
            Err(e) => {
                let deadline_passed =
                    matches!(&e, RouterError::Worker(s) if s.code() == Code::DeadlineExceeded);
                let _ = tx.send(Err(e.into())).await;
                break if deadline_passed { "deadline" } else { "error" };
            }
        }
    };
    drop(permit);
    inner.in_flight_gauge();
    m::ended(outcome);
    counter!("rrt_router_generated_tokens_total").increment(sent.len() as u64);
    histogram!("rrt_router_e2e_request_latency_seconds").record(arrived.elapsed().as_secs_f64());
}

/// Collects a relayed request into the unary response (`worker`: who served it).
pub async fn collect(
    mut rx: mpsc::Receiver<Item>,
    worker: String,
) -> Result<pb::GenerateResponse, Status> {
    let mut out = pb::GenerateResponse {
        worker,
        ..Default::default()
    };
    while let Some(item) = rx.recv().await {
        let msg = item?;
        out.text.push_str(&msg.text);
        if let Some(t) = msg.token() {
            out.token_ids.push(t.id);
            out.exit_loops.push(t.exit_loop);
            out.logprobs.extend(t.logprob);
        }
        if msg.finish().is_some() {
            out.finish_reason = msg.finish_reason;
            out.prompt_tokens = msg.prompt_tokens;
            out.cached_prompt_tokens = msg.cached_prompt_tokens;
            return Ok(out);
        }
    }
    Err(Status::unavailable(
        "the request's relay ended without a finish reason",
    ))
}
