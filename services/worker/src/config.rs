//! The worker's command line (every flag also reads an `RRT_WORKER_*` environment variable),
//! checked into typed engine settings before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use rrt_engine::{EngineConfig, ExitPolicy, KvFill, Scheduler};
use rrt_proto::exits::ExitTradeoff;

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// gRPC address of the Worker service.
    #[arg(long, env = "RRT_WORKER_LISTEN", default_value = "0.0.0.0:50061")]
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(
        long,
        env = "RRT_WORKER_METRICS_LISTEN",
        default_value = "0.0.0.0:9101"
    )]
    pub metrics_listen: SocketAddr,
    /// `host:port` routers use to reach this worker (default: the bound gRPC address; set it to
    /// the pod IP or service name in a cluster).
    #[arg(long, env = "RRT_WORKER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Coordinator URL (`http://host:port`); without it the worker runs standalone.
    #[arg(long, env = "RRT_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Worker name in metrics and the cluster view (default: `worker-<port>`).
    #[arg(long, env = "RRT_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Model: a Hugging Face directory (e.g. from `rrt convert`) or a GGUF file.
    #[arg(long, env = "RRT_MODEL")]
    pub model: PathBuf,
    /// Model name clients ask for (default: the file or directory name).
    #[arg(long, env = "RRT_WORKER_MODEL_NAME")]
    pub model_name: Option<String>,
    /// How the projection and LM-head weights are held: f32, bf16 (half the bytes), q8 (int8
    /// blocks of 32, 1.125 bytes a weight) or f16 (candle's matmul, slow).
    #[arg(long, env = "RRT_DTYPE", default_value_t = rrt_model::WeightDtype::F32)]
    pub dtype: rrt_model::WeightDtype,
    #[arg(long, env = "RRT_WORKER_SCHEDULER", value_enum, default_value_t = SchedulerArg::Cdb)]
    pub scheduler: SchedulerArg,
    /// Sequences decoded at once.
    #[arg(long, env = "RRT_WORKER_MAX_SEQUENCES", default_value_t = 32)]
    pub max_sequences: usize,
    /// Rows one engine step runs (decode rows first, prefill chunks fill the rest).
    #[arg(long, env = "RRT_WORKER_MAX_BATCH_ROWS", default_value_t = 256)]
    pub max_batch_rows: usize,
    /// KV cache pool, MiB: blocks of every running sequence (each takes blocks as it grows,
    /// not its worst case) and the prefix cache's unused blocks.
    #[arg(long, env = "RRT_WORKER_KV_BUDGET_MIB", default_value_t = 2048)]
    pub kv_budget_mib: usize,
    /// Positions per KV block: a multiple of 16 (the attention kernels' K tile).
    #[arg(long, env = "RRT_WORKER_KV_BLOCK_TOKENS", default_value_t = rrt_model::kv::DEFAULT_BLOCK_TOKENS)]
    pub kv_block_tokens: usize,
    /// How K and V are held: f32; bf16 (half the bytes a token; attention widens as it reads);
    /// or int8 (a byte an element and an f32 scale per position and KV head: 0.27x f32's
    /// bytes, 0.53x bf16's; attention applies the scales to scores and weights).
    #[arg(long, env = "RRT_WORKER_KV_DTYPE", default_value_t = rrt_model::KvDtype::F32)]
    pub kv_dtype: rrt_model::KvDtype,
    /// Reuse the KV of full blocks of earlier requests with the same token prefix (a shared
    /// system prompt, the history of a conversation): on or off.
    #[arg(long, env = "RRT_WORKER_PREFIX_CACHE", value_enum, default_value_t = OnOff::On)]
    pub prefix_cache: OnOff,
    /// Requests accepted beyond the running ones; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "RRT_WORKER_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, env = "RRT_WORKER_MAX_NEW_TOKENS", default_value_t = 1024)]
    pub max_new_tokens: u32,
    /// Exit policy of requests that name none.
    /// `none`, `max-prob`, `margin`, `cosine` or `learned` (the model's exit classifier: needs
    /// exit heads).
    #[arg(long, env = "RRT_WORKER_EXIT", default_value = "none", value_parser = rrt_proto::exits::policy_by_name)]
    pub exit: rrt_proto::v1::ExitPolicy,
    /// Threshold of that policy (the coordinator's load-adaptive exits move it between this and
    /// its quality floor).
    #[arg(long, env = "RRT_WORKER_EXIT_THRESHOLD", default_value_t = 0.9)]
    pub exit_threshold: f32,
    /// The model's measured threshold curves (an `exit-heads.json` with `curves` and, with
    /// several exits, their `cascade`; or a directory holding one), sent to the coordinator for
    /// load-adaptive exits (default: the model directory's own exit heads).
    #[arg(long, env = "RRT_WORKER_EXIT_CURVE")]
    pub exit_curve: Option<PathBuf>,
    /// How the K/V of loops an early exit skipped are filled.
    #[arg(long, env = "RRT_WORKER_KV_FILL", value_enum, default_value_t = KvFillArg::Propagate)]
    pub kv_fill: KvFillArg,
    /// Milliseconds between reports to the coordinator.
    #[arg(long, env = "RRT_WORKER_REPORT_MS", default_value_t = 500)]
    pub report_ms: u64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "RRT_WORKER_DRAIN_S", default_value_t = 30)]
    pub drain_s: u64,
    /// Test knob: sleep this long after every engine step (makes a worker slower).
    #[arg(long, env = "RRT_WORKER_STEP_DELAY_MS", default_value_t = 0)]
    pub step_delay_ms: u64,
    /// Failed engine steps in a row after which the worker stops and exits non-zero (its
    /// health goes NOT_SERVING at the first; a good step recovers).
    #[arg(long, env = "RRT_WORKER_MAX_STEP_FAILURES", default_value_t = 3)]
    pub max_step_failures: u64,
    /// Test knob: `error@N` fails the engine's N-th step, `panic@N` panics in it.
    #[arg(long, env = "RRT_WORKER_INJECT_FAULT")]
    pub inject_fault: Option<rrt_engine::InjectedFault>,
    /// Serve a simulated engine instead of the model (load tests of the cluster: hundreds of
    /// workers in one process): the model directory's tokenizer and shape, no weights; step
    /// times from a cost model (`default`, or a JSON file of `rrt_worker::sim::CostModel`).
    #[arg(long, env = "RRT_WORKER_SIMULATE")]
    pub simulate: Option<String>,
    /// Simulated KV blocks (of --kv-block-tokens positions).
    #[arg(long, env = "RRT_WORKER_SIM_KV_BLOCKS", default_value_t = 4096)]
    pub sim_kv_blocks: usize,
    /// Simulated exits: the probability a token exits after loop 1, 2, ... (comma-separated;
    /// the rest exit after the last loop).
    #[arg(
        long,
        env = "RRT_WORKER_SIM_EXIT_PROBS",
        value_delimiter = ',',
        default_value = "0.5"
    )]
    pub sim_exit_probs: Vec<f64>,
    /// Share of request classes (first prompt block) whose tokens go one loop deeper.
    #[arg(long, env = "RRT_WORKER_SIM_HARD_SHARE", default_value_t = 0.0)]
    pub sim_hard_share: f64,
    /// Simulated speed relative to the cost model (2: steps take half the time).
    #[arg(long, env = "RRT_WORKER_SIM_SPEED", default_value_t = 1.0)]
    pub sim_speed: f64,
    /// Seed of the simulated exits and tokens.
    #[arg(long, env = "RRT_WORKER_SIM_SEED", default_value_t = 0)]
    pub sim_seed: u64,
    #[command(flatten)]
    pub tls: rrt_service::tls::TlsArgs,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

impl std::fmt::Display for OnOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnOff::On => "on",
            OnOff::Off => "off",
        })
    }
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum SchedulerArg {
    Static,
    Csb,
    Cdb,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum KvFillArg {
    Propagate,
    Copy,
}

impl WorkerArgs {
    /// The engine form of `--exit` at `--exit-threshold` (one mapping: [`crate::exits`]).
    pub fn default_exit(&self) -> ExitPolicy {
        let flag = rrt_proto::v1::ExitParameters {
            policy: self.exit as i32,
            threshold: self.exit_threshold,
        };
        crate::exits::requested(Some(&flag), 0).unwrap_or(ExitPolicy::NONE)
    }

    /// The engine settings for serving `model_id`, or what is wrong with the flags.
    /// The simulated engine's settings (`--simulate`), for a model of `loops` loops.
    pub fn sim_config(&self, loops: usize) -> anyhow::Result<crate::sim::SimConfig> {
        let Some(cost) = &self.simulate else {
            anyhow::bail!("--simulate is not set");
        };
        let cost = if cost == "default" {
            crate::sim::CostModel::default()
        } else {
            let text = std::fs::read_to_string(cost)
                .map_err(|e| anyhow::anyhow!("--simulate {cost}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--simulate {cost}: {e}"))?
        };
        anyhow::ensure!(
            self.sim_exit_probs.iter().all(|p| (0.0..=1.0).contains(p))
                && self.sim_exit_probs.iter().sum::<f64>() <= 1.0 + 1e-9,
            "--sim-exit-probs: probabilities in [0, 1] summing to at most 1, got {:?}",
            self.sim_exit_probs
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.sim_hard_share),
            "--sim-hard-share must be in [0, 1]"
        );
        anyhow::ensure!(self.sim_speed > 0.0, "--sim-speed must be above 0");
        anyhow::ensure!(self.sim_kv_blocks > 0, "--sim-kv-blocks must be at least 1");
        Ok(crate::sim::SimConfig {
            cost,
            loops,
            block_tokens: self.kv_block_tokens,
            kv_blocks: self.sim_kv_blocks,
            max_sequences: self.max_sequences,
            prefill_chunk: self.max_batch_rows,
            exit_probs: self.sim_exit_probs.clone(),
            exits: self.exit_tradeoff()?,
            default_exit: self.default_exit(),
            hard_share: self.sim_hard_share,
            speed: self.sim_speed,
            seed: self.sim_seed,
            clock: crate::sim::Clock::Real,
            ..Default::default()
        })
    }

    /// The model's measured exit trade-off, from `--exit-curve` or the model directory's exit
    /// heads (none for a GGUF file or a model without heads).
    pub fn exit_tradeoff(&self) -> anyhow::Result<ExitTradeoff> {
        use rrt_model::recursive::exit_heads::{read_meta, ExitHeadsMeta, META_FILE};
        let meta: Option<ExitHeadsMeta> = match &self.exit_curve {
            Some(p) if p.is_dir() => Some(
                read_meta(p)
                    .map_err(|e| anyhow::anyhow!("--exit-curve {}: {e}", p.display()))?
                    .ok_or_else(|| {
                        anyhow::anyhow!("--exit-curve {}: no {META_FILE} in it", p.display())
                    })?,
            ),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("--exit-curve {}: {e}", p.display()))?;
                Some(serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("--exit-curve {}: not exit-heads metadata: {e}", p.display())
                })?)
            }
            None if self.model.is_dir() => read_meta(&self.model)
                .map_err(|e| anyhow::anyhow!("--model {}: {e}", self.model.display()))?,
            None => None,
        };
        let Some(meta) = meta else {
            return Ok(ExitTradeoff::default());
        };
        if let (Some(p), true) = (&self.exit_curve, meta.curves.is_empty()) {
            anyhow::bail!("--exit-curve {}: it has no `curves`", p.display());
        }
        let t = tradeoff_to_proto(&meta);
        t.check().map_err(|e| {
            let file = match &self.exit_curve {
                Some(p) => format!("--exit-curve {}", p.display()),
                None => format!("--model {}", self.model.join(META_FILE).display()),
            };
            anyhow::anyhow!("{file}: {e}")
        })?;
        Ok(t)
    }

    pub fn engine_config(&self, model_id: &str) -> anyhow::Result<EngineConfig> {
        anyhow::ensure!(self.max_sequences > 0, "--max-sequences must be at least 1");
        anyhow::ensure!(
            self.max_batch_rows > 0,
            "--max-batch-rows must be at least 1"
        );
        anyhow::ensure!(self.kv_budget_mib > 0, "--kv-budget-mib must be at least 1");
        anyhow::ensure!(
            self.max_new_tokens > 0,
            "--max-new-tokens must be at least 1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.exit_threshold),
            "--exit-threshold must be in [0, 1], got {}",
            self.exit_threshold
        );
        anyhow::ensure!(self.report_ms > 0, "--report-ms must be at least 1");
        // The block size rule lives with the KV layout; checked here before any port is bound.
        rrt_model::kv::KvLayout::new(1, 1, self.kv_block_tokens, self.kv_dtype)
            .map_err(|e| anyhow::anyhow!("--kv-block-tokens: {e}"))?;
        let scheduler = match self.scheduler {
            SchedulerArg::Static => Scheduler::Static,
            SchedulerArg::Csb => Scheduler::Csb,
            SchedulerArg::Cdb => Scheduler::Cdb,
        };
        rrt_engine::check_exit(scheduler, self.default_exit().kind)
            .map_err(|e| anyhow::anyhow!("--exit {:?}: {e}", self.exit))?;
        Ok(EngineConfig {
            scheduler,
            max_batch_rows: self.max_batch_rows,
            max_sequences: self.max_sequences,
            kv_budget_bytes: self.kv_budget_mib << 20,
            kv_block_tokens: self.kv_block_tokens,
            kv_dtype: self.kv_dtype,
            prefix_cache: self.prefix_cache == OnOff::On,
            model_id: format!("{model_id} ({})", self.model.display()),
            default_exit: self.default_exit(),
            fault: self.inject_fault,
            kv_fill: match self.kv_fill {
                KvFillArg::Propagate => KvFill::Propagate,
                KvFillArg::Copy => KvFill::Copy,
            },
        })
    }
}

/// A model's measured exit trade-off as workers register it (agreement: the overall one,
/// tokens that do not exit counting as agreeing).
pub fn tradeoff_to_proto(meta: &rrt_model::recursive::exit_heads::ExitHeadsMeta) -> ExitTradeoff {
    let curves = meta
        .curves
        .iter()
        .map(|c| rrt_proto::v1::ExitCurve {
            after_loop: c.after_loop as u32,
            points: c
                .points
                .iter()
                .map(|p| rrt_proto::v1::ExitCurvePoint {
                    threshold: p.threshold,
                    exit_rate: p.exit_rate,
                    agreement: p.overall_agreement,
                })
                .collect(),
        })
        .collect();
    let cascade = meta
        .cascade
        .iter()
        .map(|p| rrt_proto::v1::ExitCascadePoint {
            threshold: p.threshold,
            exit_share: p.exit_share.clone(),
            agreement: p.agreement,
        })
        .collect();
    ExitTradeoff { curves, cascade }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WorkerArgs,
    }

    fn engine_config(flags: &[&str]) -> anyhow::Result<EngineConfig> {
        let argv = ["rrt-worker", "--model", "m.gguf"].iter().chain(flags);
        Cli::try_parse_from(argv)?.args.engine_config("m")
    }

    #[test]
    fn kv_flags_become_engine_settings() {
        let cfg = engine_config(&[
            "--kv-budget-mib=64",
            "--kv-block-tokens=32",
            "--kv-dtype=bf16",
            "--prefix-cache=off",
        ])
        .unwrap();
        assert_eq!(cfg.kv_budget_bytes, 64 << 20);
        assert_eq!(cfg.kv_block_tokens, 32);
        assert_eq!(cfg.kv_dtype, rrt_model::KvDtype::Bf16);
        assert!(!cfg.prefix_cache);
        assert!(cfg.model_id.contains("m.gguf"), "{}", cfg.model_id);
        let default = engine_config(&[]).unwrap();
        assert!(default.prefix_cache, "on by default");
        assert_eq!(default.kv_dtype, rrt_model::KvDtype::F32);
    }

    #[test]
    fn an_exit_curve_file_gives_the_curves_and_the_cascade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit-heads.json");
        let point = r#"{"threshold": 0.9, "exit_rate": 0.3, "exit_agreement": 0.9, "overall_agreement": 0.97}"#;
        std::fs::write(
            &path,
            format!(
                r#"{{"adapter_rank": 8, "loops": 3, "curves": [
                    {{"after_loop": 1, "points": [{point}]}}, {{"after_loop": 2, "points": [{point}]}}],
                  "cascade": [{{"threshold": 0.9, "exit_share": [0.3, 0.2, 0.0], "agreement": 0.95, "mean_loops": 2.2}}]}}"#
            ),
        )
        .unwrap();
        let flag = format!("--exit-curve={}", path.display());
        let argv = ["rrt-worker", "--model", "m.gguf", &flag];
        let t = Cli::try_parse_from(argv)
            .unwrap()
            .args
            .exit_tradeoff()
            .unwrap();
        assert_eq!(t.curves.len(), 2);
        assert_eq!(t.curves[1].after_loop, 2);
        assert_eq!(
            t.curves[0].points[0].agreement, 0.97,
            "the overall agreement"
        );
        assert_eq!(t.cascade.len(), 1);
        assert_eq!(t.cascade[0].exit_share, vec![0.3, 0.2, 0.0]);
        assert_eq!(
            t.expected_agreement(0.9),
            Some(0.95),
            "read from the cascade"
        );
        // Shares that add up to more than everyone are refused, naming the file and field.
        let over = std::fs::read_to_string(&path)
            .unwrap()
            .replace("[0.3, 0.2, 0.0]", "[0.7, 0.4, 0.0]");
        std::fs::write(&path, over).unwrap();
        let err = Cli::try_parse_from(argv)
            .unwrap()
            .args
            .exit_tradeoff()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("exit-heads.json: cascade (threshold 0.9)"),
            "{err}"
        );
        // Without one: nothing measured; a file without curves is refused.
        let none = Cli::try_parse_from(["rrt-worker", "--model", "m.gguf"]).unwrap();
        assert!(none.args.exit_tradeoff().unwrap().is_empty());
        std::fs::write(&path, r#"{"adapter_rank": 8, "loops": 3}"#).unwrap();
        let err = Cli::try_parse_from(argv)
            .unwrap()
            .args
            .exit_tradeoff()
            .unwrap_err();
        assert!(err.to_string().contains("no `curves`"), "{err}");
    }

    #[test]
    fn bad_kv_flags_and_exits_a_scheduler_ignores_are_refused() {
        for (flags, says) in [
            (&["--kv-block-tokens=24"][..], "multiple of 16"),
            (&["--kv-block-tokens=0"], "multiple of 16"),
            (&["--kv-budget-mib=0"], "at least 1"),
            (&["--kv-dtype=int4"], "unknown KV dtype"),
            (&["--prefix-cache=maybe"], "maybe"),
            (
                &["--scheduler=csb", "--exit=max-prob"],
                "needs depth-wise batching",
            ),
        ] {
            let err = engine_config(flags).unwrap_err().to_string();
            assert!(err.contains(says), "{flags:?}: {err}");
        }
    }
}
