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
        "rrt_worker_constrained_requests_total",
        Unit::Count,
        "Requests with an output constraint, by kind (json_schema, json_object, regex, grammar) and whether it was compiled or found in the compiler's cache."
    );
    describe_histogram!(
        "rrt_worker_constraint_compile_seconds",
        Unit::Seconds,
        "Time to compile an output constraint (cache misses only), by kind."
    );
    describe_counter!(
        "rrt_worker_constraint_masks_total",
        Unit::Count,
        "Token masks computed for constrained requests (one per sampled token)."
    );
    describe_gauge!(
        "rrt_worker_constraint_mask_seconds_per_token",
        Unit::Seconds,
        "Mean time the mask thread spent computing one token's mask since start (overlapped with the block pass)."
    );
    describe_gauge!(
        "rrt_worker_constraint_wait_seconds_per_token",
        Unit::Seconds,
        "Mean time sampling waited for a token's mask since start (what masks cost the batch)."
    );
    describe_counter!(
        "rrt_worker_constraint_forced_tokens_total",
        Unit::Count,
        "Tokens the constraint allowed as the only way on, appended without sampling and run as one chunk (fast-forward)."
    );
    describe_counter!(
        "rrt_worker_constraint_exits_denied_total",
        Unit::Count,
        "Early exits turned into another loop because the exit's pick was not allowed by the request's constraint."
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
        "rrt_worker_exit_threshold",
        "Threshold of the default exit policy (label: policy) in force: the configured one, or the coordinator's while it lowers it under load (load-adaptive exits)."
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
        "Bytes of the KV blocks running sequences hold."
    );
    describe_gauge!(
        "rrt_worker_kv_cache_usage_ratio",
        "KV blocks held by running sequences over the pool, 0..1 (like vllm:kv_cache_usage_perc; cached blocks nobody holds are free to take and do not count)."
    );
    describe_gauge!(
        "rrt_worker_kv_blocks",
        "KV blocks of the pool by state: total, used (held by running sequences), cached (in the prefix cache, held or not), evictable (cached, held by nobody)."
    );
    describe_counter!(
        "rrt_worker_prefix_cache_queried_tokens_total",
        Unit::Count,
        "Prompt tokens looked up in the prefix cache at admission (recomputes after preemption included; like vllm:prefix_cache_queries)."
    );
    describe_counter!(
        "rrt_worker_prefix_cache_hit_tokens_total",
        Unit::Count,
        "Prompt tokens found in the prefix cache, whose KV was not computed again (like vllm:prefix_cache_hits)."
    );
    describe_counter!(
        "rrt_worker_prefill_tokens_total",
        Unit::Count,
        "Prompt tokens computed (admitted prompt tokens not found in the prefix cache)."
    );
    describe_counter!(
        "rrt_worker_preemptions_total",
        Unit::Count,
        "Running sequences that gave their KV blocks back when the pool ran out, to be recomputed (like vllm:num_preemptions)."
    );
    describe_counter!(
        "rrt_worker_kv_evictions_total",
        Unit::Count,
        "Cached KV blocks evicted (least recently used first) to make room."
    );
    describe_gauge!(
        "rrt_worker_prefix_cache_horizon_seconds",
        Unit::Seconds,
        "How long ago the most recently evicted KV block had last been used: a prefix used since is still cached (absent until the first eviction)."
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

/// The default exit policy's threshold in force (moved by load-adaptive exits).
pub fn exit_threshold(worker: &str, policy: &'static str, threshold: f32) {
    gauge!("rrt_worker_exit_threshold", "worker" => worker.to_string(), "policy" => policy)
        .set(threshold as f64);
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
    let blocks = &s.kv_blocks;
    gauge!("rrt_worker_kv_cache_usage_ratio", "worker" => w())
        .set(blocks.used as f64 / blocks.total.max(1) as f64);
    for (state, n) in [
        ("total", blocks.total),
        ("used", blocks.used),
        ("cached", blocks.cached),
        ("evictable", blocks.evictable),
    ] {
        gauge!("rrt_worker_kv_blocks", "worker" => w(), "state" => state).set(n as f64);
    }
    let kv = &s.kv_counters;
    counter!("rrt_worker_prefix_cache_queried_tokens_total", "worker" => w())
        .absolute(kv.queried_tokens);
    counter!("rrt_worker_prefix_cache_hit_tokens_total", "worker" => w()).absolute(kv.hit_tokens);
    counter!("rrt_worker_prefill_tokens_total", "worker" => w()).absolute(kv.prefill_tokens);
    counter!("rrt_worker_preemptions_total", "worker" => w()).absolute(kv.preemptions);
    counter!("rrt_worker_kv_evictions_total", "worker" => w()).absolute(blocks.evictions);
    if let Some(h) = blocks.horizon {
        gauge!("rrt_worker_prefix_cache_horizon_seconds", "worker" => w()).set(h.as_secs_f64());
    }
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
    let m = &s.masks;
    counter!("rrt_worker_constraint_masks_total", "worker" => w()).absolute(m.masks);
    let per_mask = |ns: u64| ns as f64 / 1e9 / m.masks.max(1) as f64;
    gauge!("rrt_worker_constraint_mask_seconds_per_token", "worker" => w())
        .set(per_mask(m.mask_ns));
    gauge!("rrt_worker_constraint_wait_seconds_per_token", "worker" => w())
        .set(per_mask(m.wait_ns));
    counter!("rrt_worker_constraint_exits_denied_total", "worker" => w()).absolute(m.exits_denied);
    counter!("rrt_worker_constraint_forced_tokens_total", "worker" => w()).absolute(m.forced);
    for (i, n) in s.stats.last_rows_per_depth.iter().enumerate() {
        gauge!("rrt_worker_rows_per_depth", "worker" => w(), "loop" => (i + 1).to_string())
            .set(*n as f64);
    }
}
