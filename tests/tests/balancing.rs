//! Load balancing on exit statistics: with one of two workers slowed down (a test knob: a sleep
//! after every engine step), the coordinator's drain-time score steers the router's power of two
//! choices to the faster worker. Then the coordinator goes away and the router keeps serving on
//! its own view (least outstanding).

#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rrt_tests::cluster::{self, greedy, metric, scrape, stream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_prefers_the_faster_worker_and_survives_the_coordinator() {
    let c = cluster::coordinator(&[]).await;
    let addr = c.running.grpc_addr;
    let fast = cluster::worker(Some(addr), &["--worker-id", "fast"]).await;
    let slow = cluster::worker(
        Some(addr),
        &["--worker-id", "slow", "--step-delay-ms", "40"],
    )
    .await;
    let r = cluster::router(Some(addr), &[]).await;
    cluster::wait_for_workers(&r.running, 2).await;
    let client = cluster::client(r.running.grpc_addr).await;

    // 8 clients in closed loops, 64 requests of 16 tokens.
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                for j in 0..8 {
                    let prompt = format!("Request {i}.{j}: the LORD said unto Moses");
                    stream(&mut c, greedy(&prompt, 16)).await.expect("request");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
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
    let share = to_fast as f64 / (to_fast + to_slow) as f64;
    println!(
        "balancing: {to_fast} requests to the fast worker, {to_slow} to the slow one \
         ({:.0}% fast) in {secs:.1} s",
        100.0 * share
    );
    assert_eq!(to_fast + to_slow, 64);
    assert!(
        share >= 0.65,
        "only {:.0}% went to the fast worker",
        100.0 * share
    );

    // The coordinator goes away: the router keeps serving from its last view.
    c.shutdown.trigger();
    c.running.task.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut client = client.clone();
    for i in 0..4 {
        let (ids, _, _, _) = stream(&mut client, greedy(&format!("After {i}"), 4))
            .await
            .expect("served without a coordinator");
        assert_eq!(ids.len(), 4);
    }
    let m = scrape(r.running.metrics_addr).await;
    assert!(
        metric(
            &m,
            "rrt_router_routed_total",
            &["policy=\"least_outstanding\""]
        ) >= 4.0,
        "{m}"
    );
    drop((fast, slow));
}
