//! Starting and stopping a worker: load the model (or, `--simulate`, only its shape and
//! tokenizer for a simulated engine), start the engine thread, bind the gRPC and
//! metrics ports, register with the coordinator; on shutdown turn health to NOT_SERVING, refuse
//! new requests, let in-flight ones finish up to the drain deadline, then stop.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rrt_engine::Engine;
use rrt_proto::v1 as pb;
use rrt_service::tls::{self, Side};
use rrt_service::{grpc, metrics_http, Admission, Shutdown};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::actor::{EngineHandle, EngineHealth};
use crate::config::WorkerArgs;
use crate::service::{Shared, WorkerService};
use crate::sim::SimEngine;

/// What the worker serves: a loaded model, or a simulated engine on a model's shape.
enum Source {
    Model(Box<rrt_model::LoadedModel>),
    Simulated(
        Box<(
            rrt_model::ModelShape,
            Arc<rrt_model::Tokenizer>,
            crate::sim::SimConfig,
        )>,
    ),
}

const SERVICE: &str = "rrt.v1.Worker";

/// A started worker.
pub struct RunningWorker {
    pub id: String,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// Ends when the server has drained and stopped.
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Largest request the worker decodes.
pub const MAX_REQUEST_BYTES: usize = 2 << 20;

/// Loads the model and starts serving; returns once the ports are bound and health is SERVING.
pub async fn start(args: WorkerArgs, shutdown: Shutdown) -> anyhow::Result<RunningWorker> {
    let model_name = args.model_name.clone().unwrap_or_else(|| {
        args.model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let cfg = args.engine_config(&model_name)?;
    let exits = args.exit_tradeoff()?;
    let default_exit = crate::exits::to_pb(cfg.default_exit);
    let tls = args.tls.start(&shutdown)?;
    // The recorder first: descriptions given before it exists are lost.
    metrics_http::handle();
    crate::metrics::describe();
    rrt_model::runtime::tune_allocator();
    let (path, dtype) = (args.model.clone(), args.dtype);
    let source = if args.simulate.is_some() {
        let (shape, tokenizer) = tokio::task::spawn_blocking(move || crate::sim::shape_of(&path))
            .await?
            .map_err(|e| anyhow::anyhow!("reading the model's shape: {e}"))?;
        let sim = args.sim_config(shape.loops)?;
        tracing::info!(loops = shape.loops, "simulated engine (no weights loaded)");
        Source::Simulated(Box::new((shape, tokenizer, sim)))
    } else {
        let (kernel, note) = dtype.cpu_note();
        if let Some(note) = note {
            tracing::warn!("{note}");
        }
        let loaded = tokio::task::spawn_blocking(move || rrt_model::load(&path, dtype))
            .await?
            .map_err(|e| anyhow::anyhow!("loading the model: {e}"))?;
        tracing::info!(%dtype, kernel, weight_bytes = loaded.model.weight_bytes(), "model loaded");
        if cfg.default_exit.kind == rrt_engine::ExitKind::Learned
            && loaded.model.exit_heads.is_none()
        {
            anyhow::bail!(
                "--exit learned: {} has no exit heads (train them with `rrt uptrain --train exit`)",
                args.model.display()
            );
        }
        Source::Model(Box::new(loaded))
    };
    let listener = TcpListener::bind(args.listen).await?;
    let grpc_addr = listener.local_addr()?;
    let metrics_addr =
        metrics_http::spawn(args.metrics_listen, tls.as_ref(), shutdown.clone()).await?;
    let id = args
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("worker-{}", grpc_addr.port()));
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| grpc_addr.to_string());
    let capacity = args.max_sequences + args.max_waiting;
    let step_delay = Duration::from_millis(args.step_delay_ms);
    let (engine, tokenizer, model_info) = match source {
        Source::Model(loaded) => {
            let model = &loaded.model;
            let (worker, dtype_name, bytes) = (id.clone(), dtype.name(), model.weight_bytes());
            metrics_http::refresh_gauges(shutdown.clone(), move || {
                metrics::gauge!("rrt_worker_model_weight_bytes", "worker" => worker.clone(), "dtype" => dtype_name)
                    .set(bytes as f64);
            });
            let info = pb::ModelInfoResponse {
                model: model_name,
                context_length: model.cfg.max_position_embeddings as u32,
                max_new_tokens_limit: args.max_new_tokens,
                block_layers: model.block_layers() as u32,
                loops: model.loops() as u32,
                vocab_size: model.cfg.vocab_size as u32,
                workers: 1,
            };
            let engine =
                Engine::new(loaded.model, cfg).map_err(|e| anyhow::anyhow!("the engine: {e}"))?;
            let handle = EngineHandle::spawn(engine, capacity, step_delay, args.max_step_failures)?;
            (handle, Arc::new(loaded.tokenizer), info)
        }
        Source::Simulated(sim) => {
            let (shape, tokenizer, sim) = *sim;
            let info = pb::ModelInfoResponse {
                model: model_name,
                context_length: shape.cfg.max_position_embeddings as u32,
                max_new_tokens_limit: args.max_new_tokens,
                block_layers: shape.block_layers as u32,
                loops: shape.loops as u32,
                vocab_size: shape.cfg.vocab_size as u32,
                workers: 1,
            };
            let engine = SimEngine::new(crate::sim::SimConfig {
                vocab: shape.cfg.vocab_size as u32,
                ..sim
            });
            let handle = EngineHandle::spawn(engine, capacity, step_delay, args.max_step_failures)?;
            (handle, tokenizer, info)
        }
    };
    let (tokenizer_for_constraints, vocab_for_constraints) =
        (tokenizer.clone(), model_info.vocab_size as usize);
    let shared = Arc::new(Shared {
        id: id.clone(),
        engine,
        tokenizer,
        model: model_info,
        max_sequences: args.max_sequences,
        admission: Admission::new(capacity),
        next_id: AtomicU64::new(0),
        default_exit,
        exits,
        constraints: crate::constrain::Constraints::new(
            tokenizer_for_constraints,
            vocab_for_constraints,
            args.simulate.is_some(),
        ),
        ttft: Default::default(),
    });

    let health = grpc::health(&[SERVICE]).await;
    let (reflection_v1, reflection_v1alpha) = grpc::reflection()?;
    let reporter = tokio::spawn(crate::reporter::run(
        shared.clone(),
        args.coordinator.clone(),
        tls.clone(),
        advertise,
        Duration::from_millis(args.report_ms),
        shutdown.clone(),
    ));
    let engine_died = Arc::new(Mutex::new(None));
    tokio::spawn(follow_engine(
        shared.clone(),
        health.reporter.clone(),
        shutdown.clone(),
        engine_died.clone(),
    ));
    let drain = drain_signal(
        shared.clone(),
        health.reporter.clone(),
        shutdown,
        Duration::from_secs(args.drain_s),
    );
    let incoming = tls::incoming(listener, tls.as_ref(), Side::Internal)?;
    let server = tonic::transport::Server::builder()
        .layer(grpc::over_limit_layer())
        .add_service(health.service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::worker_server::WorkerServer::new(WorkerService {
                shared: shared.clone(),
            })
            // The router's 1 MiB request plus the resumed token ids of a failover.
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, drain);
    grpc::set_serving(&health.reporter, &[SERVICE], true).await;
    tracing::info!(worker = %id, grpc = %grpc_addr, metrics = %metrics_addr, "worker serving");
    let task = tokio::spawn(async move {
        let result = server.await;
        reporter.abort();
        tracing::info!("worker stopped");
        result?;
        let died = engine_died.lock().unwrap_or_else(|p| p.into_inner()).take();
        match died {
            Some(reason) => Err(anyhow::anyhow!("the engine died: {reason}")),
            None => Ok(()),
        }
    });
    Ok(RunningWorker {
        id,
        grpc_addr,
        metrics_addr,
        task,
    })
}

/// Resolves when the server should stop: after shutdown, once in-flight requests are done or
/// the drain deadline has passed. Readiness goes NOT_SERVING first so traffic moves away.
async fn drain_signal(
    shared: Arc<Shared>,
    health: grpc::HealthReporter,
    shutdown: Shutdown,
    deadline: Duration,
) {
    shutdown.wait().await;
    shared.admission.stop_admitting();
    grpc::set_serving(&health, &[SERVICE], false).await;
    if !shared.admission.drain(deadline).await {
        tracing::warn!("drain deadline passed with requests in flight");
    }
}

/// Mirrors the engine's health in the worker's: NOT_SERVING while a failed step has not been
/// followed by a good one; when the engine dies, records why (the worker's task then ends with
/// that error, so the process exits non-zero) and shuts the worker down.
async fn follow_engine(
    shared: Arc<Shared>,
    health: grpc::HealthReporter,
    shutdown: Shutdown,
    died: Arc<Mutex<Option<String>>>,
) {
    let mut engine = shared.engine.health();
    while engine.changed().await.is_ok() {
        let now = engine.borrow_and_update().clone();
        match now {
            EngineHealth::Serving if !shared.admission.is_draining() => {
                tracing::info!("the engine recovered");
                grpc::set_serving(&health, &[SERVICE], true).await;
            }
            EngineHealth::Serving => {}
            EngineHealth::Faulted(why) => {
                tracing::warn!("engine fault: {why}; NOT_SERVING until a step succeeds");
                grpc::set_serving(&health, &[SERVICE], false).await;
            }
            EngineHealth::Dead(why) => {
                tracing::error!("engine dead: {why}; stopping the worker");
                *died.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                shared.admission.stop_admitting();
                grpc::set_serving(&health, &[SERVICE], false).await;
                shutdown.trigger();
                return;
            }
        }
    }
}
