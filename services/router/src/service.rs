//! The public `rrt.v1.Generation` service: validates each request, admits it under the
//! concurrency bound, picks a worker, forwards the call with the caller's remaining deadline,
//! and relays the token stream. A client that goes away cancels the worker call (and so frees
//! the engine slot); a worker that cannot be reached is replaced by another once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use rrt_proto::v1 as pb;
use rrt_proto::v1::worker_client::WorkerClient;
use rrt_service::{deadline, validate};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Response, Status, Streaming};

use crate::error::RouterError;
use crate::metrics as m;
use crate::pool::{InFlight, Pool};

pub type Client = WorkerClient<Channel>;

pub struct Inner {
    pub pool: Arc<Pool<Client>>,
    pub admission: Arc<Semaphore>,
    pub max_concurrent: usize,
    pub max_new_tokens: u32,
    pub default_timeout: Duration,
    pub draining: AtomicBool,
}

#[derive(Clone)]
pub struct RouterService {
    pub inner: Arc<Inner>,
}

/// An admitted request with its worker stream open.
struct Opened {
    stream: Streaming<pb::GenerateStreamResponse>,
    permit: OwnedSemaphorePermit,
    in_flight: InFlight<Client>,
    worker: String,
}

impl Inner {
    /// The model a request names, or the only/first served one when it names none.
    fn resolve_model(&self, name: &str) -> Result<String, RouterError> {
        let models = self.pool.models();
        if models.is_empty() {
            // Starting up or every worker gone: a retryable condition, not a bad request.
            return Err(RouterError::NoWorker(name.to_string()));
        }
        if name.is_empty() {
            return models
                .into_iter()
                .next()
                .ok_or_else(|| RouterError::NoWorker(String::new()));
        }
        if models.iter().any(|m| m == name) {
            return Ok(name.to_string());
        }
        Err(validate::Rejection::new(
            "unknown_model",
            format!("unknown model {name:?}; served: {models:?}"),
        )
        .into())
    }

    fn pick(
        &self,
        model: &str,
        tokens: Option<u32>,
        exclude: Option<&str>,
    ) -> Result<InFlight<Client>, RouterError> {
        let (guard, policy) = self
            .pool
            .pick(model, tokens, Instant::now(), exclude, &mut rand::rng())
            .ok_or_else(|| RouterError::NoWorker(model.to_string()))?;
        if tokens.is_some() {
            counter!("rrt_router_routed_total", "worker" => guard.slot.id.clone(), "policy" => policy.label())
                .increment(1);
        }
        Ok(guard)
    }

    async fn open(
        &self,
        mut req: pb::GenerateRequest,
        deadline: Instant,
    ) -> Result<Opened, RouterError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(RouterError::Draining);
        }
        validate::generate_request(&req, self.max_new_tokens)?;
        let model = self.resolve_model(&req.model)?;
        req.model = model.clone();
        let permit = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| RouterError::Overloaded(self.max_concurrent))?;
        let mut exclude: Option<String> = None;
        loop {
            let in_flight = self.pick(&model, Some(req.max_new_tokens), exclude.as_deref())?;
            let mut call = tonic::Request::new(req.clone());
            call.set_timeout(deadline.saturating_duration_since(Instant::now()));
            let mut client = in_flight.slot.client.clone();
            match client.generate(call).await {
                Ok(resp) => {
                    return Ok(Opened {
                        stream: resp.into_inner(),
                        permit,
                        worker: in_flight.slot.id.clone(),
                        in_flight,
                    })
                }
                Err(s) if s.code() == Code::Unavailable && exclude.is_none() => {
                    tracing::warn!(worker = %in_flight.slot.id, "worker unavailable ({}); trying another", s.message());
                    counter!("rrt_router_retries_total").increment(1);
                    exclude = Some(in_flight.slot.id.clone());
                }
                Err(s) => return Err(RouterError::Worker(s)),
            }
        }
    }

    fn count_failure(&self, e: &RouterError) {
        match e {
            RouterError::Rejected(r) => m::rejected(r.reason),
            RouterError::Overloaded(_) => m::rejected("overloaded"),
            RouterError::NoWorker(_) => m::rejected("no_worker"),
            RouterError::Draining => m::rejected("draining"),
            RouterError::Worker(s) if s.code() == Code::InvalidArgument => {
                m::rejected(validate::reason_of(s))
            }
            RouterError::Worker(s) if s.code() == Code::ResourceExhausted => {
                m::rejected("worker_overloaded")
            }
            RouterError::Worker(_) => m::ended("error"),
        }
    }

    fn in_flight_gauge(&self) {
        gauge!("rrt_router_in_flight")
            .set((self.max_concurrent - self.admission.available_permits()) as f64);
    }
}

fn outcome(finish: i32) -> &'static str {
    match pb::FinishReason::try_from(finish) {
        Ok(pb::FinishReason::Length) => "length",
        Ok(pb::FinishReason::Eos) => "eos",
        Ok(pb::FinishReason::Stop) => "stop",
        _ => "error",
    }
}

type GenStream = ReceiverStream<Result<pb::GenerateStreamResponse, Status>>;

#[tonic::async_trait]
impl pb::generation_server::Generation for RouterService {
    async fn generate(
        &self,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let arrived = Instant::now();
        let deadline =
            arrived + deadline::timeout(request.metadata()).unwrap_or(self.inner.default_timeout);
        let req = request.into_inner();
        let inner = &self.inner;
        let mut opened = match inner.open(req, deadline).await {
            Ok(o) => o,
            Err(e) => {
                inner.count_failure(&e);
                return Err(e.into());
            }
        };
        inner.in_flight_gauge();
        let mut out = pb::GenerateResponse {
            worker: opened.worker.clone(),
            ..Default::default()
        };
        let result = tokio::time::timeout_at(deadline.into(), async {
            while let Some(msg) = opened.stream.message().await? {
                out.text.push_str(&msg.text);
                // Every token exited after some loop (>= 1); a final message may carry none.
                if msg.exit_loop != 0 {
                    out.token_ids.push(msg.token_id);
                    out.exit_loops.push(msg.exit_loop);
                    out.logprobs.extend(msg.logprob);
                }
                if msg.finish_reason != 0 {
                    out.finish_reason = msg.finish_reason;
                    return Ok(());
                }
            }
            Err(Status::unavailable(
                "the worker ended the stream without a finish reason",
            ))
        })
        .await;
        drop(opened.permit);
        drop(opened.in_flight);
        inner.in_flight_gauge();
        histogram!("rrt_router_e2e_request_latency_seconds")
            .record(arrived.elapsed().as_secs_f64());
        match result {
            Ok(Ok(())) => {
                m::ended(outcome(out.finish_reason));
                counter!("rrt_router_generated_tokens_total").increment(out.token_ids.len() as u64);
                Ok(Response::new(out))
            }
            Ok(Err(s)) => {
                m::ended(if s.code() == Code::DeadlineExceeded {
                    "deadline"
                } else {
                    "error"
                });
                Err(s)
            }
            Err(_) => {
                m::ended("deadline");
                Err(Status::deadline_exceeded(
                    "the request ran past its deadline",
                ))
            }
        }
    }

    type GenerateStreamStream = GenStream;

    async fn generate_stream(
        &self,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<Response<GenStream>, Status> {
        let arrived = Instant::now();
        let deadline =
            arrived + deadline::timeout(request.metadata()).unwrap_or(self.inner.default_timeout);
        let req = request.into_inner();
        let inner = self.inner.clone();
        let opened = match inner.open(req, deadline).await {
            Ok(o) => o,
            Err(e) => {
                inner.count_failure(&e);
                return Err(e.into());
            }
        };
        inner.in_flight_gauge();
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(relay(inner, opened, tx, arrived, deadline));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn tokenize(
        &self,
        request: tonic::Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let mut req = request.into_inner();
        let model = self.inner.resolve_model(&req.model)?;
        req.model = model.clone();
        let in_flight = self.inner.pick(&model, None, None)?;
        let mut client = in_flight.slot.client.clone();
        client.tokenize(req).await
    }

    async fn model_info(
        &self,
        request: tonic::Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let req = request.into_inner();
        let model = self.inner.resolve_model(&req.model)?;
        let in_flight = self.inner.pick(&model, None, None)?;
        let mut client = in_flight.slot.client.clone();
        let info = client.info(pb::WorkerInfoRequest {}).await?.into_inner();
        let mut m = info
            .model
            .ok_or_else(|| Status::internal("the worker sent no model info"))?;
        m.workers = self
            .inner
            .pool
            .slots()
            .iter()
            .filter(|s| s.model == model)
            .count() as u32;
        m.max_new_tokens_limit = m.max_new_tokens_limit.min(self.inner.max_new_tokens);
        Ok(Response::new(m))
    }
}

/// Relays one request's worker stream to its client until it finishes, fails, passes its
/// deadline, or the client goes away (dropping the worker stream cancels it downstream).
async fn relay(
    inner: Arc<Inner>,
    opened: Opened,
    tx: mpsc::Sender<Result<pb::GenerateStreamResponse, Status>>,
    arrived: Instant,
    deadline: Instant,
) {
    let Opened {
        mut stream,
        permit,
        in_flight,
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
                let finish = msg.finish_reason;
                if msg.exit_loop != 0 {
                    tokens += 1;
                }
                if tx.send(Ok(msg)).await.is_err() {
                    break "cancelled";
                }
                if finish != 0 {
                    break outcome(finish);
                }
            }
            Ok(None) => {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "the worker ended the stream without a finish reason",
                    )))
                    .await;
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
