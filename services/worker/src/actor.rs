//! The engine actor: the synchronous engine on its own OS thread, driven by commands from a
//! bounded channel. Async code talks to it only through [`EngineHandle`] (a cloneable sender)
//! and reads its load from the published [`Snapshot`] and its [`EngineHealth`]; it never blocks
//! on compute. A step that fails fails its requests over; a step that panics, or too many
//! failed steps in a row, end the thread, and the worker exits non-zero.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rrt_engine::{EngineStats, GenParams, KvCounters, Request};
use rrt_model::kv::PoolStats;
use tokio::sync::{mpsc, watch};

use crate::backend::Backend;

/// What the engine thread is asked to do.
pub enum Command {
    Submit(Request),
    /// Load-adaptive exits: the default exit policy's threshold from now on.
    SetDefaultThreshold(f32),
}

/// The engine's load after its latest step, for reports and metrics.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub queue_length: usize,
    pub running: usize,
    pub kv_bytes_used: usize,
    pub kv_bytes_budget: usize,
    /// The KV pool's blocks (total, held, cached, evictable).
    pub kv_blocks: PoolStats,
    /// Prefix-cache lookups and hits, prompt tokens computed, preemptions.
    pub kv_counters: KvCounters,
    pub pending_new_tokens: usize,
    pub pending_prompt_tokens: usize,
    pub stats: EngineStats,
    /// Constrained decoding: masks computed, their time, waits for them, exits denied.
    pub masks: rrt_engine::MaskCounts,
    /// Seconds the engine spent stepping (not idle), for loop-steps per second.
    pub busy_seconds: f64,
}

/// Whether the engine thread can serve, as the worker's health shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineHealth {
    Serving,
    /// The last step failed (its requests failed over); the next good step recovers.
    Faulted(String),
    /// The thread is gone (a panic, or `max_step_failures` failed steps in a row): the worker
    /// must stop and exit non-zero.
    Dead(String),
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    snapshot: Arc<Mutex<Snapshot>>,
    health: watch::Receiver<EngineHealth>,
}

impl EngineHandle {
    /// Starts the engine thread. `step_delay` is a test knob that slows every step down;
    /// `max_step_failures` failed steps in a row end the thread.
    pub fn spawn(
        engine: impl Backend,
        capacity: usize,
        step_delay: Duration,
        max_step_failures: u64,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        let (health_tx, health) = watch::channel(EngineHealth::Serving);
        let thread = Thread {
            snapshot: snapshot.clone(),
            health: health_tx,
            step_delay,
            max_step_failures: max_step_failures.max(1),
        };
        std::thread::Builder::new()
            .name("rrt-engine".into())
            .spawn(move || thread.run(engine, rx))?;
        Ok(Self {
            tx,
            snapshot,
            health,
        })
    }

    /// The engine's health, changing as steps fail and recover.
    pub fn health(&self) -> watch::Receiver<EngineHealth> {
        self.health.clone()
    }

    /// Hands a request to the engine; `Err` gives it back when the engine thread is gone.
    pub async fn submit(&self, req: Request) -> Result<(), Request> {
        self.tx
            .send(Command::Submit(req))
            .await
            .map_err(|mpsc::error::SendError(cmd)| match cmd {
                Command::Submit(r) => r,
                Command::SetDefaultThreshold(_) => unreachable!("only a Submit was sent"),
            })
    }

    /// Moves the default exit policy's threshold (requests that follow the default, running
    /// and new); `false` when the engine thread is gone.
    pub async fn set_default_threshold(&self, threshold: f32) -> bool {
        self.tx
            .send(Command::SetDefaultThreshold(threshold))
            .await
            .is_ok()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// The engine thread's settings and outputs.
struct Thread {
    snapshot: Arc<Mutex<Snapshot>>,
    health: watch::Sender<EngineHealth>,
    step_delay: Duration,
    max_step_failures: u64,
}

impl Thread {
    /// Runs the engine until every handle is dropped and the work is done, or it dies; a dead
    /// engine is dropped at once, which ends every request's event channel (the worker answers
    /// them UNAVAILABLE and the router resumes them elsewhere).
    fn run(self, engine: impl Backend, rx: mpsc::Receiver<Command>) {
        if let Err(reason) = self.serve(engine, rx) {
            tracing::error!("the engine thread stops: {reason}");
            self.health.send_replace(EngineHealth::Dead(reason));
        }
    }

    /// Take every queued command, run one step, publish, repeat; sleep on the channel when
    /// there is no work. `Err`: why the engine died.
    fn serve(
        &self,
        mut engine: impl Backend,
        mut rx: mpsc::Receiver<Command>,
    ) -> Result<(), String> {
        let mut busy = 0.0f64;
        let mut failures_in_a_row = 0;
        // After a failed step with nothing left to run, a one-token request checks the engine
        // (its receiver is held here: a dropped one would cancel it).
        let mut _probe = None;
        loop {
            if failures_in_a_row > 0 && engine.pending() == 0 {
                let (req, rx) = Request::with_channel(
                    u64::MAX,
                    vec![0],
                    GenParams {
                        max_new_tokens: 1,
                        ..GenParams::default()
                    },
                    None,
                );
                engine.submit(req);
                _probe = Some(rx);
            }
            if engine.pending() == 0 {
                self.publish(&engine, busy);
                match rx.blocking_recv() {
                    Some(cmd) => apply(&mut engine, cmd),
                    None => return Ok(()),
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                apply(&mut engine, cmd);
            }
            let started = Instant::now();
            let failed_before = engine.failed_steps();
            // A panic leaves the engine's state unknown: it is not stepped again.
            let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| engine.step()));
            if let Err(panic) = stepped {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                return Err(format!("a step panicked: {what}"));
            }
            if engine.failed_steps() > failed_before {
                failures_in_a_row += 1;
                if failures_in_a_row >= self.max_step_failures {
                    return Err(format!("{failures_in_a_row} steps in a row failed"));
                }
                self.health
                    .send_replace(EngineHealth::Faulted("a step failed".into()));
            } else if failures_in_a_row > 0 {
                failures_in_a_row = 0;
                _probe = None;
                self.health.send_replace(EngineHealth::Serving);
            }
            if !self.step_delay.is_zero() {
                std::thread::sleep(self.step_delay);
            }
            busy += started.elapsed().as_secs_f64();
            self.publish(&engine, busy);
        }
    }
}

fn apply(engine: &mut impl Backend, cmd: Command) {
    match cmd {
        Command::Submit(req) => engine.submit(req),
        Command::SetDefaultThreshold(t) => engine.set_default_threshold(t),
    }
}

impl Thread {
    fn publish(&self, engine: &impl Backend, busy: f64) {
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = engine.snapshot(busy);
    }
}
