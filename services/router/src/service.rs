//! The public `rrt.v1.Generation` service: validates each request, admits it under the
//! concurrency bound, picks a worker, forwards the call with the caller's remaining deadline,
//! and relays the token stream ([`crate::relay`]). A worker that cannot be reached is replaced
//! by another, and a stream whose worker dies resumes on another ([`Inner::connect`]), up to
//! `--max-attempts` workers per request.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use rand::rngs::StdRng;
use rrt_proto::v1 as pb;
use rrt_proto::v1::worker_client::WorkerClient;
use rrt_service::{deadline, validate, Admission};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Response, Status, Streaming};

use crate::balance::{Ask, Balancer, Key, Route};
use crate::error::{worker_lost, Counted, RouterError};
use crate::metrics as m;
use crate::pool::{InFlight, Pool};
use crate::relay::{collect, relay, Item, Opened};
pub use crate::server::MAX_REQUEST_BYTES;

pub type Client = WorkerClient<Channel>;

pub struct Inner {
    pub pool: Arc<Pool<Client>>,
    /// The routing policy and what it learns (prefixes sent, depths seen).
    pub balancer: Arc<Balancer>,
    pub admission: Admission,
    pub max_new_tokens: u32,
    pub default_timeout: Duration,
    /// The policies' random draws (seeded with `--seed`, for reproducible tests).
    pub rng: Mutex<StdRng>,
    /// Workers one request may run on (`--max-attempts`).
    pub max_attempts: usize,
}

/// How long a worker may take to answer a Generate call with its stream's headers.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct RouterService {
    pub inner: Arc<Inner>,
}

impl Inner {
    /// The model a request names, or the only/first served one when it names none.
    pub(crate) fn resolve_model(&self, name: &str) -> Result<String, RouterError> {
        let models = self.pool.models();
        if models.is_empty() {
            // Starting up or every worker gone: a retryable condition, not a bad request.
            return Err(RouterError::NoWorker(validate::quote(name)));
        }
        if name.is_empty() {
            return models
                .first()
                .cloned()
                .ok_or_else(|| RouterError::NoWorker(validate::quote("")));
        }
        if models.iter().any(|m| m == name) {
            return Ok(name.to_string());
        }
        Err(validate::Rejection::new(
            "unknown_model",
            format!(
                "unknown model {}; served: {models:?}",
                validate::quote(name)
            ),
        )
        .into())
    }

    /// Picks a worker for a request of `model` (`tokens`: its max_new_tokens; `None` for a
    /// metadata call, not counted as routed) by the `--balance` policy.
    fn pick(
        &self,
        model: &str,
        key: &Key,
        tokens: Option<u32>,
        exclude: &[String],
    ) -> Result<(InFlight<Client>, Route), RouterError> {
        let ask = Ask {
            model,
            max_new_tokens: tokens,
            key,
        };
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, route) = self
            .balancer
            .choose(&self.pool, &ask, Instant::now(), exclude, &mut *rng)
            .ok_or_else(|| RouterError::NoWorker(validate::quote(model)))?;
        drop(rng);
        if tokens.is_some() {
            m::routed(&guard.slot.id, &route);
            gauge!("rrt_router_prefix_index_blocks").set(self.balancer.index.len() as f64);
        }
        Ok((guard, route))
    }

    /// Validates, admits and opens the worker stream of a generation request.
    async fn open(
        &self,
        mut req: pb::GenerateRequest,
        arrived: Instant,
        deadline: Instant,
    ) -> Result<Opened, RouterError> {
        if self.admission.is_draining() {
            return Err(RouterError::Draining);
        }
        validate::generate_request(&req, self.max_new_tokens)?;
        let model = self.resolve_model(&req.model)?;
        req.model = model;
        let permit = self.admission.try_admit()?;
        let key = Key::of_request(&req);
        let mut tried = Vec::new();
        let (stream, in_flight, route) = self.connect(&req, &key, deadline, &mut tried, 0).await?;
        Ok(Opened {
            stream,
            permit,
            key,
            route,
            worker: in_flight.slot.id.clone(),
            in_flight,
            arrived,
            deadline,
            base_resume: req.resume_token_ids.clone(),
            request: req,
            tried,
        })
    }

    /// Opens `req`'s stream on a worker it has not tried (`tried`, which grows), moving on while
    /// workers cannot be reached, up to `max_attempts` workers in all. `sent`: tokens the
    /// client already has (for the error message).
    pub(crate) async fn connect(
        &self,
        req: &pb::GenerateRequest,
        key: &Key,
        deadline: Instant,
        tried: &mut Vec<String>,
        sent: usize,
    ) -> Result<
        (
            Streaming<pb::GenerateStreamResponse>,
            InFlight<Client>,
            Route,
        ),
        RouterError,
    > {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RouterError::Worker(Status::deadline_exceeded(
                    "the request ran past its deadline",
                )));
            }
            let (in_flight, route) =
                match self.pick(&req.model, key, Some(req.max_new_tokens), tried) {
                    Ok(f) => f,
                    Err(e) if tried.is_empty() => return Err(e),
                    Err(_) => {
                        return Err(RouterError::Lost {
                            attempts: tried.len(),
                            tokens: sent,
                            last: "no other worker serves the model".into(),
                        })
                    }
                };
            tried.push(in_flight.slot.id.clone());
            let mut call = tonic::Request::new(req.clone());
            call.set_timeout(left);
            let mut client = in_flight.slot.client.clone();
            // A worker answers a Generate at once (its stream starts before the first token):
            // one that does not within this bound is frozen or cut off.
            let opened = tokio::time::timeout(OPEN_TIMEOUT.min(left), client.generate(call)).await;
            let failure = match opened {
                Ok(Ok(resp)) => return Ok((resp.into_inner(), in_flight, route)),
                Ok(Err(s)) if !worker_lost(&s) => return Err(RouterError::Worker(s)),
                Ok(Err(s)) => format!("{:?}: {}", s.code(), s.message()),
                Err(_) => format!("no answer within {OPEN_TIMEOUT:?}"),
            };
            tracing::warn!(worker = %in_flight.slot.id, "worker failed to open the stream ({failure}); trying another");
            if tried.len() >= self.max_attempts {
                return Err(RouterError::Lost {
                    attempts: tried.len(),
                    tokens: sent,
                    last: failure,
                });
            }
            counter!("rrt_router_retries_total").increment(1);
        }
    }

    /// Opens a gRPC request and starts its relay; the receiver gets its messages.
    async fn start(
        self: &Arc<Self>,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<(mpsc::Receiver<Item>, String), Status> {
        let timeout = deadline::timeout(request.metadata());
        self.start_request(request.into_inner(), timeout).await
    }

    /// Opens `req` (with the caller's `timeout`, else the default) and starts its relay; the
    /// receiver gets its messages and the worker's id comes back. Every API goes through here.
    pub(crate) async fn start_request(
        self: &Arc<Self>,
        req: pb::GenerateRequest,
        timeout: Option<Duration>,
    ) -> Result<(mpsc::Receiver<Item>, String), Status> {
        let arrived = Instant::now();
        let deadline = arrived + timeout.unwrap_or(self.default_timeout);
        let opened = match self.open(req, arrived, deadline).await {
            Ok(o) => o,
            Err(e) => {
                match e.counted() {
                    Counted::Rejected(reason) => m::rejected(reason),
                    Counted::Failed => m::ended("error"),
                }
                return Err(e.into());
            }
        };
        self.in_flight_gauge();
        let worker = opened.worker.clone();
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(relay(self.clone(), opened, tx));
        Ok((rx, worker))
    }

    pub(crate) fn in_flight_gauge(&self) {
        gauge!("rrt_router_in_flight").set(self.admission.in_flight() as f64);
    }
}

type GenStream = ReceiverStream<Item>;

#[tonic::async_trait]
impl pb::generation_server::Generation for RouterService {
    async fn generate(
        &self,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let (rx, worker) = self.inner.start(request).await?;
        // Dropping `rx` (the client went away) cancels the relay as a closed stream does.
        collect(rx, worker).await.map(Response::new)
    }

    type GenerateStreamStream = GenStream;

    async fn generate_stream(
        &self,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<Response<GenStream>, Status> {
        let (rx, _) = self.inner.start(request).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn tokenize(
        &self,
        request: tonic::Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let mut req = request.into_inner();
        let model = self.inner.resolve_model(&req.model)?;
        req.model = model.clone();
        let (in_flight, _) = self.inner.pick(&model, &Key::default(), None, &[])?;
        let mut client = in_flight.slot.client.clone();
        client.tokenize(req).await
    }

    async fn model_info(
        &self,
        request: tonic::Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let req = request.into_inner();
        let model = self.inner.resolve_model(&req.model)?;
        let (in_flight, _) = self.inner.pick(&model, &Key::default(), None, &[])?;
        let mut client = in_flight.slot.client.clone();
        let info = client.info(pb::WorkerInfoRequest {}).await?.into_inner();
        let mut m = info
            .model
            .ok_or_else(|| Status::internal("the worker sent no model info"))?;
        m.workers = self.inner.pool.serving(&model).len() as u32;
        m.max_new_tokens_limit = m.max_new_tokens_limit.min(self.inner.max_new_tokens);
        Ok(Response::new(m))
    }
}
