//! `rrt bench`: speed measurements that print ratios measured side by side in one run.

mod adaptive;
mod balance;
pub mod chaos;
mod coordinator;
mod cpu_time;
mod decode;
mod engine;
mod engine_dtypes;
mod engine_runs;
mod local_cluster;
mod matmul;
mod openai_client;
mod overload;
pub(crate) mod plot;
mod prefix;
pub mod router;
mod scale;
mod scale_plot;
mod sim;
mod structured;
mod uptrain;

use clap::Subcommand;

/// Every router policy (`--balance` values), the benches' default list.
const POLICIES: &str =
    "round-robin,least-outstanding,power-of-two,depth-aware,cache-aware,combined";

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Decode tokens/s at several batch sizes, against this machine's measured matmul roofline.
    Decode(decode::DecodeArgs),
    /// The few-row matmul kernel against candle's gemm, per row count.
    Matmul(matmul::MatmulArgs),
    /// Serving throughput: vanilla vs recursive, static vs CSB vs CDB, with early exits.
    Engine(Box<engine::EngineBenchArgs>),
    /// Throughput through the router against straight to a worker, in one run.
    Router(router::RouterBenchArgs),
    /// Requests lost or changed when workers are killed mid-stream (`make chaos`).
    Chaos(chaos::ChaosArgs),
    /// Bursts of 10x capacity at the router and at a worker: refusal latency, completions, RSS.
    Overload(overload::OverloadArgs),
    /// KV reuse as a client sees it: shared system prompts, multi-turn chat, capacity.
    Prefix(prefix::PrefixBenchArgs),
    /// The simulated worker's cost model fitted to the real engine's steps, judged on another
    /// workload, and the simulation beside the real engine (`rrt-worker --simulate`).
    Sim(sim::SimBenchArgs),
    /// Routing policies on 50-200 simulated workers behind the real router and coordinator:
    /// time to first token, latency, goodput, prefix-cache hits (`make scale-bench`).
    Scale(scale::ScaleBenchArgs),
    /// Routing decisions a second one router core makes, per policy and cluster size (the
    /// choice alone, without the request's relay).
    Balance(balance::BalanceBenchArgs),
    /// Where one coordinator saturates: reports a second it takes from many workers with
    /// routers watching, its CPU per report, latency.
    Coordinator(coordinator::CoordinatorBenchArgs),
    /// Load-adaptive exits at 2x overload on simulated workers: fixed vs adaptive threshold,
    /// time to first token, the quality it costs, FULL requests at full depth.
    Adaptive(adaptive::AdaptiveBenchArgs),
    /// Constrained decoding's cost: decode tokens/s under a regex, a JSON schema and a JSON
    /// object against free generation at batch 1 and 32, mask time per token, compile times.
    Structured(structured::StructuredBenchArgs),
    /// The trainer at f32 and bf16 on the same model, data and steps: tokens/s, time by part,
    /// how far the bf16 objective strays.
    Uptrain(uptrain::UptrainBenchArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Decode(args) => decode::run(args),
        BenchCommand::Matmul(args) => matmul::run(args),
        BenchCommand::Engine(args) => engine::run_bench(*args),
        BenchCommand::Router(args) => router::run(args),
        BenchCommand::Chaos(args) => chaos::run(args),
        BenchCommand::Overload(args) => overload::run(args),
        BenchCommand::Prefix(args) => prefix::run(args),
        BenchCommand::Uptrain(args) => uptrain::run(args),
        BenchCommand::Sim(args) => sim::run(args),
        BenchCommand::Scale(args) => scale::run(args),
        BenchCommand::Coordinator(args) => coordinator::run(args),
        BenchCommand::Balance(args) => balance::run(args),
        BenchCommand::Adaptive(args) => adaptive::run(args),
        BenchCommand::Structured(args) => structured::run_bench(args),
    }
}
