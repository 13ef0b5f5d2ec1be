//! Routing policies on real workers: three workers with prefix caches behind two routers on one
//! coordinator, one router cache-aware (the default, `combined`) and one round-robin. The same
//! chat workload (six users under each of two long system prompts, every conversation
//! new) goes through each, with its own system prompts so neither warms the other's caches. The
//! cached prompt tokens come from the workers' own replies (not the router's word): affinity
//! keeps each system prompt on one or two workers and hits far more often than taking turns.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use rrt_tests::cluster::{self, metric_at};

const USERS: [&str; 6] = [
    "What does a recursive transformer share between its loops?",
    "Explain early exits in one sentence.",
    "Name one benefit of continuous batching.",
    "Why would a router care about prefixes?",
    "How large is a KV block?",
    "Say hello.",
];

/// A long system prompt, different per `tag`.
fn system(tag: &str) -> String {
    format!(
        "You are assistant {tag}. You answer questions about machine learning systems briefly \
         and precisely. {}",
        "Keep every answer under one line; never invent figures; say when you do not know. "
            .repeat(8)
    )
}

/// Runs the workload through `router`: (cached / prompt tokens, workers per system prompt).
async fn run(router: std::net::SocketAddr, tags: &[&str]) -> (f64, Vec<usize>) {
    let mut client = cluster::client(router).await;
    let (mut prompt, mut cached) = (0u64, 0u64);
    let mut placed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for user in USERS {
        for tag in tags {
            let r = client
                .generate(cluster::chat(&system(tag), user, 2))
                .await
                .expect("generation")
                .into_inner();
            prompt += r.prompt_tokens as u64;
            cached += r.cached_prompt_tokens as u64;
            placed.entry(tag.to_string()).or_default().insert(r.worker);
        }
    }
    let spread = placed.values().map(BTreeSet::len).collect();
    (cached as f64 / prompt as f64, spread)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aware_routing_hits_the_prefix_cache_where_round_robin_misses() {
    let started = std::time::Instant::now();
    let c = cluster::coordinator(&[]).await;
    let addr = c.running.grpc_addr;
    let mut workers = Vec::new();
    for id in ["w1", "w2", "w3"] {
        workers.push(cluster::worker(Some(addr), &["--worker-id", id]).await);
    }
    let aware = cluster::router(Some(addr), &["--seed", "1"]).await;
    let turns = cluster::router(Some(addr), &["--seed", "1", "--balance", "round-robin"]).await;
    cluster::wait_for_workers(&aware.running, 3).await;
    cluster::wait_for_workers(&turns.running, 3).await;

    println!("routing: cluster up in {:.1?}", started.elapsed());
    let (rr_hits, rr_spread) = run(turns.running.grpc_addr, &["r1", "r2"]).await;
    println!("routing: round-robin run done at {:.1?}", started.elapsed());
    let (ca_hits, ca_spread) = run(aware.running.grpc_addr, &["c1", "c2"]).await;
    println!("routing: combined run done at {:.1?}", started.elapsed());
    println!(
        "routing: cached prompt share round-robin {:.1}% (workers per system prompt {rr_spread:?}), \
         combined {:.1}% ({ca_spread:?})",
        100.0 * rr_hits,
        100.0 * ca_hits
    );
    // Each system prompt stays on one worker, or two when a view taken while its holder was
    // busy spills one request (the coordinator's figures lag by a report interval); taking
    // turns puts it on all three.
    assert!(ca_spread.iter().all(|&n| n <= 2), "{ca_spread:?}");
    assert!(ca_spread.contains(&1), "{ca_spread:?}");
    assert!(rr_spread.iter().all(|&n| n == 3), "{rr_spread:?}");
    // Two system prompts taking turns on three workers: each meets every worker, and misses
    // there once (3 of its 6 requests); affinity misses once or twice. The system prompt is
    // most of each request, so the shares differ by at least 15 points.
    assert!(
        ca_hits > rr_hits + 0.15,
        "combined {ca_hits:.3} vs round-robin {rr_hits:.3}"
    );
    // The decisions are counted by policy and reason.
    let hits = metric_at(
        aware.running.metrics_addr,
        "rrt_router_decisions_total",
        &["policy=\"combined\"", "reason=\"prefix_hit\""],
    )
    .await;
    let turns_counted = metric_at(
        turns.running.metrics_addr,
        "rrt_router_decisions_total",
        &["policy=\"round_robin\"", "reason=\"turn\""],
    )
    .await;
    assert!(hits >= 8.0, "prefix hits counted: {hits}");
    assert!(turns_counted >= 12.0, "turns counted: {turns_counted}");
    drop(workers);
}
