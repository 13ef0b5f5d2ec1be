//! The engine actor: the synchronous engine on its own OS thread, driven by commands from a
//! bounded channel. Async code talks to it only through [`EngineHandle`] (a cloneable sender)
//! and reads its load from the published [`Snapshot`]; it never blocks on compute.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rrt_engine::{Engine, EngineStats, Request};
use tokio::sync::mpsc;

/// What the engine thread is asked to do.
pub enum Command {
    Submit(Request),
}

/// The engine's load after its latest step, for reports and metrics.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub queue_length: usize,
    pub running: usize,
    pub kv_bytes_used: usize,
    pub kv_bytes_budget: usize,
    pub pending_new_tokens: usize,
    pub pending_prompt_tokens: usize,
    pub stats: EngineStats,
    /// Seconds the engine spent stepping (not idle), for loop-steps per second.
    pub busy_seconds: f64,
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    snapshot: Arc<Mutex<Snapshot>>,
}

impl EngineHandle {
    /// Starts the engine thread. `step_delay` is a test knob that slows every step down.
    pub fn spawn(engine: Engine, capacity: usize, step_delay: Duration) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        let published = snapshot.clone();
        std::thread::Builder::new()
            .name("rrt-engine".into())
            .spawn(move || run(engine, rx, published, step_delay))?;
        Ok(Self { tx, snapshot })
    }

    /// Hands a request to the engine; `Err` gives it back when the engine thread is gone.
    pub async fn submit(&self, req: Request) -> Result<(), Request> {
        self.tx
            .send(Command::Submit(req))
            .await
            .map_err(|mpsc::error::SendError(Command::Submit(r))| r)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// The engine thread: take every queued command, run one step, publish, repeat; sleep on the
/// channel when there is no work. Ends when every handle is dropped and the work is done.
fn run(
    mut engine: Engine,
    mut rx: mpsc::Receiver<Command>,
    snapshot: Arc<Mutex<Snapshot>>,
    step_delay: Duration,
) {
    let mut busy = 0.0f64;
    loop {
        if engine.pending() == 0 {
            publish(&engine, &snapshot, busy);
            match rx.blocking_recv() {
                Some(cmd) => apply(&mut engine, cmd),
                None => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            apply(&mut engine, cmd);
        }
        let started = Instant::now();
        // On a rayon worker the step's parallel sections start without a cross-thread wake-up
        // (the waiting above stays off the pool, so several engines never starve it).
        rrt_model::runtime::on_compute_pool(|| engine.step());
        if !step_delay.is_zero() {
            std::thread::sleep(step_delay);
        }
        busy += started.elapsed().as_secs_f64();
        publish(&engine, &snapshot, busy);
    }
}

fn apply(engine: &mut Engine, cmd: Command) {
    match cmd {
        Command::Submit(req) => engine.submit(req),
    }
}

fn publish(engine: &Engine, snapshot: &Mutex<Snapshot>, busy: f64) {
    let (pending_new_tokens, pending_prompt_tokens) = engine.pending_work();
    let snap = Snapshot {
        queue_length: engine.queue_len(),
        running: engine.running_len(),
        kv_bytes_used: engine.kv_reserved_bytes(),
        kv_bytes_budget: engine.config().kv_budget_bytes,
        pending_new_tokens,
        pending_prompt_tokens,
        stats: engine.stats().clone(),
        busy_seconds: busy,
    };
    *snapshot.lock().unwrap_or_else(|p| p.into_inner()) = snap;
}
