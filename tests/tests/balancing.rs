//! Load balancing on exit statistics: with one of two workers slowed down (a test knob: a sleep
//! after every engine step), the coordinator's drain-time score steers the router's default
//! policy (cache affinity with depth-aware loads; these prompts share no prefix, so it is the
//! cheaper of two random workers) to the faster worker. Then the coordinator goes away and the
//! router keeps serving on its own view (least outstanding).

#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rrt_tests::cluster::{self, greedy, metric_at, stream};
use rrt_tests::eventually;

/// Requests of the closed-loop phase: 8 clients x 8 requests.
const CLIENTS: usize = 8;
const PER_CLIENT: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_prefers_the_faster_worker_and_survives_the_coordinator() {
    let c = cluster::coordinator(&[]).await;
    let addr = c.running.grpc_addr;
    let fast = cluster::worker(Some(addr), &["--worker-id", "fast"]).await;
    // Each engine step of this worker takes 100 ms more: several times slower on any CPU.
    let slow = cluster::worker(
        Some(addr),
        &["--worker-id", "slow", "--step-delay-ms", "100"],
    )
    .await;
    // A seeded router: its random draws (ties between equal scores) repeat run to run.
    let r = cluster::router(Some(addr), &["--seed", "7"]).await;
    cluster::wait_for_workers(&r.running, 2).await;
    let client = cluster::client(r.running.grpc_addr).await;

    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                for j in 0..PER_CLIENT {
                    let prompt = format!("Request {i}.{j}: the LORD said unto Moses");
                    stream(&mut c, greedy(&prompt, 16)).await.expect("request");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let routed = |id: &str| {
        r.running
            .pool
            .slots()
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.routed.load(Ordering::Relaxed))
            .unwrap_or(0)
    };
    let (to_fast, to_slow) = (routed("fast"), routed("slow"));
    let n = (CLIENTS * PER_CLIENT) as u64;
    assert_eq!(to_fast + to_slow, n);
    // Without a preference the fast worker's count is Binomial(n, 1/2): mean n/2, standard
    // deviation sqrt(n)/2. Demand three standard deviations more.
    let bound = n as f64 / 2.0 + 3.0 * (n as f64).sqrt() / 2.0;
    println!(
        "balancing: {to_fast} of {n} requests to the fast worker, {to_slow} to the slow one \
         (bound {bound:.0})"
    );
    assert!(
        to_fast as f64 >= bound,
        "only {to_fast} of {n} went to the fast worker (bound {bound:.0})"
    );

    // The coordinator goes away: once its view is stale the router picks by its own counts.
    c.shutdown.trigger();
    c.running.task.await.unwrap().unwrap();
    let pool = &r.running.pool;
    eventually(Duration::from_secs(30), "the view to go stale", || async {
        (!pool.is_fresh(Instant::now())).then_some(())
    })
    .await;
    let (name, least) = ("rrt_router_decisions_total", ["reason=\"stale_view\""]);
    let before = metric_at(r.running.metrics_addr, name, &least).await;
    let mut client = client.clone();
    for i in 0..4 {
        let (ids, _, _, _) = stream(&mut client, greedy(&format!("After {i}"), 4))
            .await
            .expect("served without a coordinator");
        assert_eq!(ids.len(), 4);
    }
    let after = metric_at(r.running.metrics_addr, name, &least).await;
    assert_eq!(after - before, 4.0, "least outstanding picked all four");
    drop((fast, slow));
}
