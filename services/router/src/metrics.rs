//! The router's Prometheus metrics: request outcomes, rejections by reason, routing decisions
//! per worker, policy and reason, the prefix index and the cache hits it bought, and
//! client-side latencies.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, Unit};

pub fn describe() {
    describe_counter!(
        "rrt_router_requests_total",
        "Requests that ended, by outcome (length, eos, stop, cancelled, deadline, error)."
    );
    describe_counter!(
        "rrt_router_requests_rejected_total",
        "Requests refused, by reason (validation failures, overloaded, no_worker, draining)."
    );
    describe_counter!(
        "rrt_router_routed_total",
        "Requests sent to each worker, by the policy that chose it."
    );
    describe_counter!(
        "rrt_router_decisions_total",
        "Routing decisions by policy and reason (prefix_hit, spill_load, spill_kv, no_prefix, load, fewest, turn, stale_view)."
    );
    describe_gauge!(
        "rrt_router_prefix_index_blocks",
        "Prompt-prefix blocks the router remembers having sent to workers (bounded by --prefix-index-blocks)."
    );
    describe_counter!(
        "rrt_router_placements_shared_total",
        "Prefix blocks this router placed and sent to the coordinator for its replicas, by outcome (sent, lost)."
    );
    describe_counter!(
        "rrt_router_placements_learned_total",
        "Prefix blocks other router replicas placed, learned from the coordinator's deltas."
    );
    describe_counter!(
        "rrt_router_prompt_tokens_total",
        Unit::Count,
        "Prompt tokens of finished requests, as their workers counted them, by the policy and reason that placed them."
    );
    describe_counter!(
        "rrt_router_cached_prompt_tokens_total",
        Unit::Count,
        "Of those, the tokens found in the workers' prefix caches: the hit rate this router's placement achieved, by policy and reason."
    );
    describe_counter!(
        "rrt_router_predicted_cached_prompt_tokens_total",
        Unit::Count,
        "Of those prompt tokens, the ones the router predicted cached where it sent them (its prefix index's match, trust-weighted), by policy and reason: against the cached ones, the index's accuracy."
    );
    describe_counter!(
        "rrt_router_retries_total",
        "Requests resent to another worker after the first could not be reached."
    );
    describe_counter!(
        "rrt_router_resumes_total",
        "Streams resumed on another worker after theirs failed mid-stream, by reason (unavailable, stream_broken, stream_ended, cancelled, internal)."
    );
    describe_counter!(
        "rrt_router_resumed_tokens_total",
        Unit::Count,
        "Generated tokens sent again to a worker as part of a resumed request's prompt (re-prefilled)."
    );
    describe_counter!(
        "rrt_router_generated_tokens_total",
        Unit::Count,
        "Tokens streamed to clients."
    );
    describe_counter!(
        "rrt_router_http_requests_total",
        "Requests to the OpenAI-compatible HTTP API, by route (`unmatched` for unknown paths) and HTTP status."
    );
    describe_gauge!(
        "rrt_router_in_flight",
        "Requests in flight through the router."
    );
    describe_gauge!(
        "rrt_router_workers",
        "Workers the router knows, and whether its coordinator view is fresh."
    );
    describe_histogram!(
        "rrt_router_time_to_first_token_seconds",
        Unit::Seconds,
        "Time from request arrival at the router to the first token sent."
    );
    describe_histogram!(
        "rrt_router_e2e_request_latency_seconds",
        Unit::Seconds,
        "Time from request arrival at the router to its last message."
    );
}

pub fn rejected(reason: impl Into<String>) {
    counter!("rrt_router_requests_rejected_total", "reason" => reason.into()).increment(1);
}

/// A generation routed to `worker` as `route` says.
pub fn routed(worker: &str, route: &crate::balance::Route) {
    let policy = route.policy.label();
    counter!("rrt_router_routed_total", "worker" => worker.to_string(), "policy" => policy)
        .increment(1);
    counter!("rrt_router_decisions_total", "policy" => policy, "reason" => route.reason.label())
        .increment(1);
}

/// A finished request's prompt tokens, the ones its worker had cached and the ones the router
/// predicted cached there, by how it was placed.
pub fn prompt_tokens(route: &crate::balance::Route, prompt: u32, cached: u32) {
    let labels = [
        ("policy", route.policy.label()),
        ("reason", route.reason.label()),
    ];
    counter!("rrt_router_prompt_tokens_total", &labels).increment(prompt as u64);
    counter!("rrt_router_cached_prompt_tokens_total", &labels).increment(cached as u64);
    let predicted = (route.predicted_hit * prompt as f64).round() as u64;
    counter!("rrt_router_predicted_cached_prompt_tokens_total", &labels).increment(predicted);
}

pub fn ended(outcome: &'static str) {
    counter!("rrt_router_requests_total", "outcome" => outcome).increment(1);
}
