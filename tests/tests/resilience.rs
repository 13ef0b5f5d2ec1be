//! The cluster when parts come and go: workers re-register with a restarted coordinator and
//! the router follows the new one; a worker process drains on SIGTERM (readiness NOT_SERVING,
//! new work refused, in-flight streams finish) and exits cleanly.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rrt_proto::v1 as pb;
use rrt_proto::v1::worker_client::WorkerClient;
use rrt_tests::cluster::{self, greedy, metric, scrape, stream};
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
    let started = Instant::now();
    while c2.running.registry.get("rejoin").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the worker never re-registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The router reconnects and picks by score again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut client = cluster::client(r.running.grpc_addr).await;
    let (ids, _, _, _) = stream(&mut client, greedy("Hello again", 4)).await.unwrap();
    assert_eq!(ids.len(), 4);
    let m = scrape(r.running.metrics_addr).await;
    assert!(
        metric(&m, "rrt_router_routed_total", &["policy=\"p2c_score\""]) >= 1.0,
        "{m}"
    );
    drop(w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_drains_on_sigterm() {
    let model = cluster::recursive_model();
    let mut child = Command::new(rrt_tests::worker_bin())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--drain-s",
            "20",
        ])
        .arg("--model")
        .arg(&model)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start rrt-worker");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the worker prints its ports");
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap_or_else(|| panic!("no grpc= in {line:?}"))
        .to_string();
    let url = format!("http://{grpc}");
    let mut client = WorkerClient::connect(url.clone()).await.unwrap();
    let mut long = client
        .generate(greedy("In the beginning", 200))
        .await
        .unwrap()
        .into_inner();
    long.message().await.unwrap().expect("a first token");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Readiness goes NOT_SERVING and new work is refused while the stream goes on.
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let started = Instant::now();
    loop {
        let s = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "rrt.v1.Worker".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if s == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "health stayed SERVING"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let status = child.wait().unwrap();
    assert!(status.success(), "the worker exited with {status}");
}
