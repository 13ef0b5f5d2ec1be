//! The worker's Prometheus metrics. Every series carries the `worker` label (bounded: one per
//! worker) so several workers in one process (tests, `rrt serve`) stay apart. Gauges follow the
//! engine snapshot; latency histograms are recorded by the request streams.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};

use rrt_proto::exits::mean_exit_loop;

use crate::actor::Snapshot;

pub fn describe() {
    describe_counter!(
        "rrt_worker_requests_total",
        "Requests that ended, by outcome (length, eos, stop, cancelled, deadline, failed)."
    );
    describe_counter!(
        "rrt_worker_requests_rejected_total",
        "Requests refused before running, by reason (bad input, overload, draining)."
    );
    describe_counter!(
        "rrt_worker_prompt_tokens_total",
        Unit::Count,
        "Prompt tokens of admitted requests."
    );
    describe_counter!(
        "rrt_worker_generated_tokens_total",
        Unit::Count,
        "Generated tokens."
    );
    describe_counter!(
        "rrt_worker_token_exits_total",
        Unit::Count,
        "Generated tokens by the loop of the shared block they exited after."
    );
    describe_counter!(
        "rrt_worker_loop_steps_total",
        Unit::Count,
        "Rows run through the shared block (one row through one loop = 1)."
    );
    describe_counter!(
        "rrt_worker_engine_steps_total",
        Unit::Count,
        "Engine steps (one shared-block pass over a mixed-depth batch each)."
    );
    describe_gauge!(
        "rrt_worker_model_weight_bytes",
        Unit::Bytes,
        "Bytes of model weights held in memory, by weight dtype (f32, bf16, q8, f16)."
    );
    describe_gauge!(
        "rrt_worker_queue_length",
        "Requests waiting for admission (like vllm:num_requests_waiting)."
    );
    describe_gauge!(
        "rrt_worker_running_sequences",
        "Sequences being decoded (like vllm:num_requests_running)."
    );
    describe_gauge!(
        "rrt_worker_kv_cache_bytes_used",
        Unit::Bytes,
        "KV cache bytes reserved by running sequences."
    );
    describe_gauge!(
        "rrt_worker_kv_cache_usage_ratio",
        "KV cache reserved over the KV budget, 0..1 (like vllm:kv_cache_usage_perc)."
    );
    describe_gauge!(
        "rrt_worker_loop_steps_per_second",
        "Shared-block rows per second of busy engine time over the last report interval."
    );
    describe_gauge!(
        "rrt_worker_mean_loops_per_token",
        "Mean loops per generated token since start (lower = more early exits)."
    );
    describe_gauge!(
        "rrt_worker_rows_per_depth",
        "Rows at each loop depth in the engine's latest step."
    );
    describe_histogram!(
        "rrt_worker_queue_time_seconds",
        Unit::Seconds,
        "Time from request arrival at the worker to its admission into the engine (prefill starts)."
    );
    describe_histogram!(
        "rrt_worker_time_to_first_token_seconds",
        Unit::Seconds,
        "Time from request arrival at the worker to its first token."
    );
    describe_histogram!(
        "rrt_worker_inter_token_latency_seconds",
        Unit::Seconds,
        "Time between consecutive tokens of a request."
    );
    describe_histogram!(
        "rrt_worker_e2e_request_latency_seconds",
        Unit::Seconds,
        "Time from request arrival at the worker to its last message."
    );
}

pub fn rejected(worker: &str, reason: &'static str) {
    counter!("rrt_worker_requests_rejected_total", "worker" => worker.to_string(), "reason" => reason)
        .increment(1);
}

pub fn ended(worker: &str, outcome: &'static str) {
    counter!("rrt_worker_requests_total", "worker" => worker.to_string(), "outcome" => outcome)
        .increment(1);
}

/// Sets the gauges and counters that mirror the engine snapshot.
pub fn engine(worker: &str, s: &Snapshot, loop_steps_per_second: f64) {
    let w = || worker.to_string();
    gauge!("rrt_worker_queue_length", "worker" => w()).set(s.queue_length as f64);
    gauge!("rrt_worker_running_sequences", "worker" => w()).set(s.running as f64);
    gauge!("rrt_worker_kv_cache_bytes_used", "worker" => w()).set(s.kv_bytes_used as f64);
    gauge!("rrt_worker_kv_cache_usage_ratio", "worker" => w())
        .set(s.kv_bytes_used as f64 / s.kv_bytes_budget.max(1) as f64);
    gauge!("rrt_worker_loop_steps_per_second", "worker" => w()).set(loop_steps_per_second);
    gauge!("rrt_worker_mean_loops_per_token", "worker" => w())
        .set(mean_exit_loop(&s.stats.exit_histogram).unwrap_or(0.0));
    counter!("rrt_worker_loop_steps_total", "worker" => w()).absolute(s.stats.loop_rows);
    counter!("rrt_worker_engine_steps_total", "worker" => w()).absolute(s.stats.steps);
    counter!("rrt_worker_generated_tokens_total", "worker" => w()).absolute(s.stats.tokens);
    for (i, n) in s.stats.exit_histogram.iter().enumerate() {
        counter!("rrt_worker_token_exits_total", "worker" => w(), "loop" => (i + 1).to_string())
            .absolute(*n);
    }
    for (i, n) in s.stats.last_rows_per_depth.iter().enumerate() {
        gauge!("rrt_worker_rows_per_depth", "worker" => w(), "loop" => (i + 1).to_string())
            .set(*n as f64);
    }
}
