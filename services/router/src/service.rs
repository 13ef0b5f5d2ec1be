//! The public `rrt.v1.Generation` service: validates each request, admits it under the
//! concurrency bound, picks a worker, forwards the call with the caller's remaining deadline,
//! and relays the token stream ([`crate::relay`]). A worker that cannot be reached is replaced
//! by another once.

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
use tonic::{Code, Response, Status};

use crate::error::{Counted, RouterError};
use crate::metrics as m;
use crate::pool::{InFlight, Pool};
use crate::relay::{collect, relay, Item, Opened};

pub type Client = WorkerClient<Channel>;

pub struct Inner {
    pub pool: Arc<Pool<Client>>,
    pub admission: Admission,
    pub max_new_tokens: u32,
    pub default_timeout: Duration,
    /// The power-of-two-choices draws (seeded with `--seed`, for reproducible tests).
    pub rng: Mutex<StdRng>,
}

#[derive(Clone)]
pub struct RouterService {
    pub inner: Arc<Inner>,
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
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, policy) = self
            .pool
            .pick(model, tokens, Instant::now(), exclude, &mut *rng)
            .ok_or_else(|| RouterError::NoWorker(model.to_string()))?;
        if tokens.is_some() {
            counter!("rrt_router_routed_total", "worker" => guard.slot.id.clone(), "policy" => policy.label())
                .increment(1);
        }
        Ok(guard)
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
        req.model = model.clone();
        let permit = self.admission.try_admit()?;
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
                        arrived,
                        deadline,
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

    /// Opens the request and starts its relay; the receiver gets its messages.
    async fn start(
        self: &Arc<Self>,
        request: tonic::Request<pb::GenerateRequest>,
    ) -> Result<(mpsc::Receiver<Item>, String), Status> {
        let arrived = Instant::now();
        let deadline =
            arrived + deadline::timeout(request.metadata()).unwrap_or(self.default_timeout);
        let opened = match self.open(request.into_inner(), arrived, deadline).await {
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
