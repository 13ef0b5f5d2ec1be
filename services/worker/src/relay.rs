//! One request's engine events turned into stream messages: text pieces from the streaming
//! detokenizer, held back while they may start a stop sequence, token ids with their exit loop
//! and log-probability, the finish reason; latency histograms (queue time, first token, between
//! tokens, end to end) on the way. [`TextRelay`] is the plain state (one event in, at most one
//! message out); [`relay`] drives it until the request
//! ends, the client goes away (dropping the engine's channel cancels the request there) or the
//! deadline passes.

use std::sync::Arc;
use std::time::Instant;

use metrics::histogram;
use rrt_engine::{Event, FinishReason};
use rrt_model::TextStream;
use rrt_proto::stream::Token;
use rrt_proto::v1 as pb;
use rrt_service::validate::Rejection;
use rrt_service::Permit;
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::WorkerError;
use crate::metrics as m;
use crate::service::Shared;
use crate::stop::{Step, StopMatcher};

/// What goes to the router: messages, or the status the request ended with.
pub type Item = Result<pb::GenerateStreamResponse, Status>;

/// What an event turns into: a message to send (none for admission), and the outcome label if
/// the request ends.
pub struct Reply {
    pub item: Option<Item>,
    pub end: Option<&'static str>,
}

/// The per-request state between engine events and stream messages.
pub(crate) struct TextRelay {
    shared: Arc<Shared>,
    text: TextStream,
    stop: StopMatcher,
    /// Tokens sent so far (the index of the next one).
    index: u32,
    arrived: Instant,
    last_token: Instant,
    /// Reported on the last message.
    prompt_tokens: usize,
    /// Of those, found in the prefix cache (from the engine's admission).
    cached_tokens: usize,
}

impl TextRelay {
    pub(crate) fn new(
        shared: Arc<Shared>,
        stops: Vec<String>,
        arrived: Instant,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            prompt_tokens,
            cached_tokens: 0,
            shared,
            text: TextStream::new(),
            stop: StopMatcher::new(stops),
            index: 0,
            arrived,
            last_token: arrived,
        }
    }

    /// Replays the tokens an earlier attempt of the request already streamed
    /// (`resume_token_ids`) without sending them: the detokenizer, the stop matcher and the
    /// message index end where that attempt's were, so the next token's text continues its text.
    pub(crate) fn resume(&mut self, tokens: &[u32]) -> Result<(), WorkerError> {
        for &id in tokens {
            let piece = self
                .text
                .push(&self.shared.tokenizer, id)
                .map_err(|e| WorkerError::Tokenizer(e.to_string()))?
                .unwrap_or_default();
            if let Step::Stop(_) = self.stop.push(&piece) {
                return Err(Rejection::new(
                    "bad_resume",
                    "the resumed tokens already end in a stop sequence",
                )
                .into());
            }
            self.index += 1;
        }
        Ok(())
    }

    /// The reply to an engine event (`None`: the engine dropped the request's channel).
    pub fn reply(&mut self, event: Option<Event>) -> Reply {
        let failed = |e: WorkerError| Reply {
            item: Some(Err(e.into())),
            end: Some("failed"),
        };
        match event {
            None => failed(WorkerError::EngineGone),
            Some(Event::Admitted { cached_tokens }) => {
                // Tokens resumed after a failover count as prompt for the engine, not for
                // the client.
                self.cached_tokens = cached_tokens.min(self.prompt_tokens);
                histogram!("rrt_worker_queue_time_seconds", "worker" => self.shared.id.clone())
                    .record(self.arrived.elapsed().as_secs_f64());
                Reply {
                    item: None,
                    end: None,
                }
            }
            Some(Event::Failed(e)) => failed(WorkerError::Engine(e)),
            Some(Event::Finished { reason, .. }) => self.finished(reason),
            Some(Event::Token {
                token,
                exit_loop,
                logprob,
                ..
            }) => {
                let token = Token {
                    id: token,
                    exit_loop: exit_loop as u32,
                    logprob,
                };
                self.token(token).unwrap_or_else(failed)
            }
        }
    }

    fn finished(&mut self, reason: FinishReason) -> Reply {
        let (finish, end) = match reason {
            FinishReason::Length => (pb::FinishReason::Length, "length"),
            FinishReason::Stop => (pb::FinishReason::Eos, "eos"),
        };
        let mut last =
            pb::GenerateStreamResponse::finish_message(self.stop.flush(), finish, self.index);
        last.prompt_tokens = self.prompt_tokens as u32;
        last.cached_prompt_tokens = self.cached_tokens as u32;
        Reply {
            item: Some(Ok(last)),
            end: Some(end),
        }
    }

    fn token(&mut self, token: Token) -> Result<Reply, WorkerError> {
        self.record_latency();
        let piece = self
            .text
            .push(&self.shared.tokenizer, token.id)
            .map_err(|e| WorkerError::Tokenizer(e.to_string()))?
            .unwrap_or_default();
        let msg = match self.stop.push(&piece) {
            Step::Emit(t) => pb::GenerateStreamResponse::token_message(t, token, self.index),
            Step::Stop(t) => {
                let mut last = pb::GenerateStreamResponse::token_message(t, token, self.index)
                    .finishing(pb::FinishReason::Stop);
                last.prompt_tokens = self.prompt_tokens as u32;
                last.cached_prompt_tokens = self.cached_tokens as u32;
                last
            }
        };
        self.index += 1;
        let end = msg.finish().map(|_| "stop");
        Ok(Reply {
            item: Some(Ok(msg)),
            end,
        })
    }

    fn record_latency(&mut self) {
        let now = Instant::now();
        let worker = self.shared.id.clone();
        if self.index == 0 {
            let ttft = now.duration_since(self.arrived).as_secs_f64();
            histogram!("rrt_worker_time_to_first_token_seconds", "worker" => worker).record(ttft);
            self.shared.ttft.record(ttft);
        } else {
            histogram!("rrt_worker_inter_token_latency_seconds", "worker" => worker)
                .record(now.duration_since(self.last_token).as_secs_f64());
        }
        self.last_token = now;
    }
}

/// Relays `events` into `tx` until the request ends; holds its admission permit meanwhile.
pub(crate) async fn relay(
    mut state: TextRelay,
    mut events: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::Sender<Item>,
    _permit: Permit,
    deadline: Option<Instant>,
) {
    let deadline_sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline_sleep);
    let outcome = loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = tx.closed() => break "cancelled",
            _ = &mut deadline_sleep => {
                let _ = tx.send(Err(WorkerError::Deadline.into())).await;
                break "deadline";
            }
        };
        let reply = state.reply(event);
        let sent = match reply.item {
            Some(item) => tx.send(item).await.is_ok(),
            None => true,
        };
        match reply.end {
            Some(end) => break end,
            None if !sent => break "cancelled",
            None => {}
        }
    };
    let worker = state.shared.id.clone();
    m::ended(&worker, outcome);
    histogram!("rrt_worker_e2e_request_latency_seconds", "worker" => worker)
        .record(state.arrived.elapsed().as_secs_f64());
}
