//! The `rrt.v1.Worker` gRPC service: turns a GenerateRequest into an engine request (chat
//! template, tokenization, limits), streams the engine's tokens back as text, and enforces the
//! caller's deadline, stop sequences and cancellation (a dropped stream frees the request's slot
//! and KV at the engine's next step).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use metrics::counter;
use rrt_engine::{Event, EventSink, ExitPolicy, GenParams, Request};
use rrt_model::{SamplingParams, Tokenizer};
use rrt_proto::v1 as pb;
use rrt_service::{deadline, validate, Admission};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status};

use crate::actor::EngineHandle;
use crate::error::WorkerError;
use crate::metrics as m;
use crate::relay::{relay, Item, TextRelay};

pub struct WorkerService {
    pub(crate) shared: Arc<Shared>,
}

/// What every request of the worker reads.
pub(crate) struct Shared {
    pub id: String,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub model: pb::ModelInfoResponse,
    pub max_sequences: usize,
    /// Requests in flight (running or waiting) at most: more get RESOURCE_EXHAUSTED.
    pub admission: Admission,
    pub next_id: AtomicU64,
    /// The policy of requests that name none, as configured (load-adaptive exits move its
    /// threshold on the engine, never this), and the model's measured exit trade-off.
    pub default_exit: Option<pb::ExitParameters>,
    pub exits: rrt_proto::exits::ExitTradeoff,
    pub constraints: crate::constrain::Constraints,
    /// First-token times since the last report (for the coordinator).
    pub ttft: crate::ttft::TtftWindow,
}

impl Shared {
    /// Validates and tokenizes a request into the engine's form.
    fn prepare(
        &self,
        req: &pb::GenerateRequest,
    ) -> Result<(Vec<u32>, GenParams, Option<ExitPolicy>), WorkerError> {
        let model = &self.model;
        validate::generate_request(req, model.max_new_tokens_limit)?;
        if !req.model.is_empty() && req.model != model.model {
            return Err(validate::Rejection::new(
                "unknown_model",
                format!(
                    "unknown model {}; this worker serves {:?}",
                    validate::quote(&req.model),
                    model.model
                ),
            )
            .into());
        }
        let text = if !req.messages.is_empty() {
            let messages: Vec<(&str, &str)> = req
                .messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str()))
                .collect();
            self.tokenizer
                .chat_conversation(&messages)
                .map_err(|e| validate::Rejection::new("chat_template", e.to_string()))?
        } else if req.chat {
            self.tokenizer
                .chat_prompt(&req.prompt)
                .map_err(|e| validate::Rejection::new("chat_template", e.to_string()))?
        } else {
            req.prompt.clone()
        };
        let mut ids = self
            .tokenizer
            .encode(&text)
            .map_err(|e| WorkerError::Tokenizer(e.to_string()))?;
        rrt_engine::check_context(
            ids.len(),
            req.max_new_tokens as usize,
            model.context_length as usize,
        )?;
        let s = req.sampling.unwrap_or_default();
        let sampling = SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k as usize,
            top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
            repetition_penalty: if s.repetition_penalty == 0.0 {
                1.0
            } else {
                s.repetition_penalty
            },
            seed: s.seed.unwrap_or(0),
        };
        let exit = crate::exits::requested(req.exit.as_ref(), req.quality);
        let vocab = model.vocab_size;
        if let Some(bad) = req.resume_token_ids.iter().find(|&&t| t >= vocab) {
            return Err(validate::Rejection::new(
                "bad_resume",
                format!("resumed token id {bad} is outside the vocabulary of {vocab}"),
            )
            .into());
        }
        // A resumed request runs as prompt + the tokens already sent, for what is left.
        ids.extend_from_slice(&req.resume_token_ids);
        let params = GenParams {
            max_new_tokens: (req.max_new_tokens as usize)
                .saturating_sub(req.resume_token_ids.len()),
            sampling,
            stop_tokens: if req.ignore_eos {
                Vec::new()
            } else {
                self.tokenizer.eos.clone()
            },
            logprobs: req.logprobs,
            ..GenParams::default()
        };
        Ok((ids, params, exit))
    }
}

/// The engine's events for one request go into a tokio channel.
struct TokioSink(mpsc::UnboundedSender<Event>);

impl EventSink for TokioSink {
    fn send(&self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

type GenStream = ReceiverStream<Item>;

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type GenerateStream = GenStream;

    async fn generate(
        &self,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<Response<GenStream>, Status> {
        let arrived = Instant::now();
        let deadline = deadline::timeout(request.metadata()).map(|t| arrived + t);
        let shared = &self.shared;
        match self.start(request.into_inner(), arrived, deadline).await {
            Ok(stream) => Ok(Response::new(stream)),
            Err(e) => {
                m::rejected(&shared.id, e.reason());
                Err(e.into())
            }
        }
    }

    async fn tokenize(
        &self,
        request: tonic::Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let model = &self.shared.model;
        if !req.model.is_empty() && req.model != model.model {
            return Err(validate::Rejection::new(
                "unknown_model",
                format!("unknown model {}", validate::quote(&req.model)),
            )
            .into());
        }
        let token_ids = self
            .shared
            .tokenizer
            .encode(&req.text)
            .map_err(|e| Status::from(WorkerError::Tokenizer(e.to_string())))?;
        Ok(Response::new(pb::TokenizeResponse { token_ids }))
    }

    async fn info(
        &self,
        _request: tonic::Request<pb::WorkerInfoRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        Ok(Response::new(pb::WorkerInfo {
            worker_id: self.shared.id.clone(),
            model: Some(self.shared.model.clone()),
            max_sequences: self.shared.max_sequences as u32,
        }))
    }
}

impl WorkerService {
    async fn start(
        &self,
        req: pb::GenerateRequest,
        arrived: Instant,
        deadline: Option<Instant>,
    ) -> Result<GenStream, WorkerError> {
        let shared = self.shared.clone();
        if shared.admission.is_draining() {
            return Err(WorkerError::Draining);
        }
        let (prompt, params, exit) = shared.prepare(&req)?;
        let constraint = match req.constraint.clone() {
            Some(c) => {
                let (s, resumed) = (shared.clone(), req.resume_token_ids.clone());
                let built =
                    tokio::task::spawn_blocking(move || s.constraints.matcher(&s.id, &c, &resumed))
                        .await
                        .map_err(|_| WorkerError::EngineGone)??;
                Some(built)
            }
            None => None,
        };
        let prompt_tokens = prompt.len() - req.resume_token_ids.len();
        let mut text = TextRelay::new(shared.clone(), req.stop, arrived, prompt_tokens);
        text.resume(&req.resume_token_ids)?;
        let permit = shared.admission.try_admit()?;
        counter!("rrt_worker_prompt_tokens_total", "worker" => shared.id.clone())
            .increment(prompt.len() as u64);
        let (etx, erx) = mpsc::unbounded_channel();
        if params.max_new_tokens == 0 {
            // Resumed after its last token: only the finish message is left to send.
            let _ = etx.send(Event::Finished {
                reason: rrt_engine::FinishReason::Length,
                generated: 0,
            });
        } else {
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            shared
                .engine
                .submit(Request {
                    id,
                    prompt,
                    params,
                    // None: the engine's default policy (the worker's --exit).
                    exit,
                    priority: req.priority,
                    constraint,
                    events: Box::new(TokioSink(etx)),
                })
                .await
                .map_err(|_| WorkerError::EngineGone)?;
        }
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(relay(text, erx, tx, permit, deadline));
        Ok(ReceiverStream::new(rx))
    }
}
