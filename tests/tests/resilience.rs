//! The cluster when parts come and go: workers re-register with a restarted coordinator and
//! the router follows the new one; a worker process drains on SIGTERM (readiness NOT_SERVING,
//! new work refused, in-flight streams finish) and exits cleanly.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use rrt_proto::v1 as pb;
use rrt_proto::v1::worker_client::WorkerClient;
use rrt_tests::cluster::{self, greedy, metric_at, stream};
use rrt_tests::eventually;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_rejoin_a_restarted_coordinator_and_the_router_follows_it() {
    let c = cluster::coordinator(&[]).await;
    let addr = c.running.grpc_addr;
    let w = cluster::worker(Some(addr), &["--worker-id", "rejoin"]).await;
    let r = cluster::router(Some(addr), &[]).await;
    cluster::wait_for_workers(&r.running, 1).await;

    c.shutdown.trigger();
    c.running.task.await.unwrap().unwrap();
    // A new coordinator on the same address knows nobody until the worker registers again.
    let c2 = cluster::coordinator(&["--listen", &addr.to_string()]).await;
    let restarted = Instant::now();
    let wait = Duration::from_secs(30);
    eventually(wait, "the worker to register again", || async {
        c2.running.registry.get("rejoin").map(|_| ())
    })
    .await;
    // The router reconnects: a view from the new coordinator, listing the worker.
    let pool = &r.running.pool;
    eventually(wait, "a view from the new coordinator", || async {
        let fresh = pool.view_at().is_some_and(|t| t > restarted) && pool.is_fresh(Instant::now());
        (fresh && !pool.slots().is_empty()).then_some(())
    })
    .await;
    let decisions = "rrt_router_decisions_total";
    let (all, stale) = (["policy=\"combined\""], ["reason=\"stale_view\""]);
    let before = metric_at(r.running.metrics_addr, decisions, &all).await;
    let stale_before = metric_at(r.running.metrics_addr, decisions, &stale).await;
    let mut client = cluster::client(r.running.grpc_addr).await;
    let (ids, _, _, _) = stream(&mut client, greedy("Hello again", 4)).await.unwrap();
    assert_eq!(ids.len(), 4);
    let after = metric_at(r.running.metrics_addr, decisions, &all).await;
    let stale_after = metric_at(r.running.metrics_addr, decisions, &stale).await;
    assert_eq!(
        (after - before, stale_after - stale_before),
        (1.0, 0.0),
        "picked on the new coordinator's view"
    );
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_drains_on_sigterm() {
    let mut worker = cluster::WorkerProcess::start(&["--drain-s", "20"]);
    let url = worker.url.clone();
    let mut client = WorkerClient::connect(url.clone()).await.unwrap();
    let mut long = client
        .generate(greedy("In the beginning", 200))
        .await
        .unwrap()
        .into_inner();
    long.message().await.unwrap().expect("a first token");

    worker.signal("TERM");
    // Readiness goes NOT_SERVING and new work is refused while the stream goes on.
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    eventually(Duration::from_secs(30), "health NOT_SERVING", || {
        let mut health = health.clone();
        async move {
            let request = tonic_health::pb::HealthCheckRequest {
                service: "rrt.v1.Worker".into(),
            };
            let status = health.check(request).await.ok()?.into_inner().status;
            (status == not_serving).then_some(())
        }
    })
    .await;
    let refused = client
        .generate(greedy("Hello", 4))
        .await
        .expect_err("draining");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("draining"), "{refused:?}");
    let mut tokens = 1;
    let mut finish = 0;
    while let Some(m) = long.message().await.expect("the in-flight stream finishes") {
        tokens += m.token().is_some() as usize;
        finish = m.finish_reason;
    }
    assert_eq!((tokens, finish), (200, pb::FinishReason::Length as i32));
    let status = worker.child.wait().unwrap();
    assert!(status.success(), "the worker exited with {status}");
}
