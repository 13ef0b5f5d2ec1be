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
    pub worker: String,
    pub arrived: Instant,
    pub deadline: Instant,
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

/// Relays `opened` into `tx` until the request ends.
pub async fn relay(inner: Arc<Inner>, opened: Opened, tx: mpsc::Sender<Item>) {
    let Opened {
        mut stream,
        permit,
        in_flight,
        arrived,
        deadline,
        ..
    } = opened;
    let mut first = true;
    let mut tokens = 0u64;
    let outcome = loop {
        let next = tokio::select! {
            m = stream.message() => m,
            _ = tx.closed() => break "cancelled",
            _ = tokio::time::sleep_until(deadline.into()) => {
                let _ = tx.send(Err(Status::deadline_exceeded("the request ran past its deadline"))).await;
                break "deadline";
            }
        };
        match next {
            Ok(Some(msg)) => {
                if first {
                    histogram!("rrt_router_time_to_first_token_seconds")
                        .record(arrived.elapsed().as_secs_f64());
                    first = false;
                }
                tokens += msg.token().is_some() as u64;
                let finish = msg.finish();
                if tx.send(Ok(msg)).await.is_err() {
                    break "cancelled";
                }
                if let Some(reason) = finish {
                    break outcome(reason);
                }
            }
            Ok(None) => {
                let ended =
                    Status::unavailable("the worker ended the stream without a finish reason");
                let _ = tx.send(Err(ended)).await;
                break "error";
            }
            Err(s) => {
                let deadline_passed = s.code() == Code::DeadlineExceeded;
                let _ = tx.send(Err(s)).await;
                break if deadline_passed { "deadline" } else { "error" };
            }
        }
    };
    drop(stream);
    drop(in_flight);
    drop(permit);
    inner.in_flight_gauge();
    m::ended(outcome);
    counter!("rrt_router_generated_tokens_total").increment(tokens);
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
            return Ok(out);
        }
    }
    Err(Status::unavailable(
        "the request's relay ended without a finish reason",
    ))
}
