//! A whole cluster in the test process: a coordinator, workers and a router on 127.0.0.1:0, each
//! with its own shutdown, serving the converted recursive model (`make models`). Services are the
//! real libraries the binaries run; only the process is shared.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rrt_coordinator::{CoordinatorArgs, RunningCoordinator};
use rrt_proto::v1 as pb;
use rrt_proto::v1::generation_client::GenerationClient;
use rrt_router::{RouterArgs, RunningRouter};
use rrt_service::Shutdown;
use rrt_worker::{RunningWorker, WorkerArgs};
use tonic::transport::Channel;

use crate::{ensure, root};

/// SmolLM2-135M as 15 shared layers x 2 loops, no LoRA (`make models`).
pub fn recursive_model() -> PathBuf {
    crate::smollm2_gguf();
    ensure(
        root().join(".cache/models/smollm2-15x2-r0/config.json"),
        "models",
    )
    .parent()
    .expect("config.json sits in the model directory")
    .to_path_buf()
}

/// The demo's recursive model: 15 shared layers x 2 loops with full-rank per-loop LoRA and
/// per-loop norms (the source model's outputs) and the committed learned exit heads
/// (`make demo`'s conversion).
pub fn demo_model() -> PathBuf {
    crate::smollm2_gguf();
    ensure(
        root().join(".cache/models/smollm2-15x2-full/config.json"),
        ".cache/models/smollm2-15x2-full/config.json",
    )
    .parent()
    .expect("config.json sits in the model directory")
    .to_path_buf()
}

#[derive(Parser)]
struct W {
    #[command(flatten)]
    args: WorkerArgs,
}

#[derive(Parser)]
struct C {
    #[command(flatten)]
    args: CoordinatorArgs,
}

#[derive(Parser)]
struct R {
    #[command(flatten)]
    args: RouterArgs,
}

fn with_loopback(extra: &[&str], flags: &[&str]) -> Vec<String> {
    let mut v = vec!["test".to_string()];
    v.extend(flags.iter().map(|s| s.to_string()));
    if !extra.contains(&"--listen") {
        v.extend(["--listen", "127.0.0.1:0"].map(String::from));
    }
    v.extend(["--metrics-listen", "127.0.0.1:0"].map(String::from));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub struct Service<T> {
    pub running: T,
    pub shutdown: Shutdown,
}

pub async fn coordinator(extra: &[&str]) -> Service<RunningCoordinator> {
    let shutdown = Shutdown::new();
    let args = C::parse_from(with_loopback(
        extra,
        &["--report-ms", "200", "--evict-ms", "1500"],
    ))
    .args;
    let running = rrt_coordinator::start(args, shutdown.clone())
        .await
        .expect("coordinator starts");
    Service { running, shutdown }
}

/// A worker serving the test model, reporting to `coordinator` if given.
pub async fn worker(coordinator: Option<SocketAddr>, extra: &[&str]) -> Service<RunningWorker> {
    worker_of(&recursive_model(), coordinator, extra).await
}

/// A worker serving `model` (named `smollm2-15x2`), reporting to `coordinator` if given.
pub async fn worker_of(
    model: &std::path::Path,
    coordinator: Option<SocketAddr>,
    extra: &[&str],
) -> Service<RunningWorker> {
    let shutdown = Shutdown::new();
    let mut flags = vec![
        "--model".to_string(),
        model.display().to_string(),
        "--model-name".into(),
        "smollm2-15x2".into(),
        "--report-ms".into(),
        "200".into(),
        "--drain-s".into(),
        "5".into(),
    ];
    if let Some(c) = coordinator {
        flags.extend(["--coordinator".to_string(), format!("http://{c}")]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let args = W::parse_from(with_loopback(extra, &flags)).args;
    let running = rrt_worker::start(args, shutdown.clone())
        .await
        .expect("worker starts");
    Service { running, shutdown }
}

pub async fn router(coordinator: Option<SocketAddr>, extra: &[&str]) -> Service<RunningRouter> {
    let shutdown = Shutdown::new();
    let mut flags = vec![
        "--http-listen".to_string(),
        "127.0.0.1:0".into(),
        "--stale-ms".into(),
        "1000".into(),
        "--drain-s".into(),
        "5".into(),
    ];
    if let Some(c) = coordinator {
        flags.extend(["--coordinator".to_string(), format!("http://{c}")]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let args = R::parse_from(with_loopback(extra, &flags)).args;
    let running = rrt_router::start(args, shutdown.clone())
        .await
        .expect("router starts");
    Service { running, shutdown }
}

/// Waits until the router knows `n` workers (from the coordinator's view or `--worker`).
pub async fn wait_for_workers(router: &RunningRouter, n: usize) {
    let what = format!("the router to know {n} workers");
    crate::eventually(Duration::from_secs(60), &what, || async {
        (router.pool.slots().len() >= n).then_some(())
    })
    .await
}

pub async fn client(addr: SocketAddr) -> GenerationClient<Channel> {
    GenerationClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the router")
}

/// A chat request: a `system` prompt and one `user` message, `max_new_tokens` new tokens.
pub fn chat(system: &str, user: &str, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        chat: true,
        messages: vec![
            pb::ChatMessage {
                role: "system".into(),
                content: system.into(),
            },
            pb::ChatMessage {
                role: "user".into(),
                content: user.into(),
            },
        ],
        max_new_tokens,
        ..Default::default()
    }
}

/// A greedy request for `max_new_tokens` tokens.
pub fn greedy(prompt: &str, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        max_new_tokens,
        ..Default::default()
    }
}

/// Streams a request to the end: `(token ids, exit loops, text, finish reason)`.
pub async fn stream(
    client: &mut GenerationClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<(Vec<u32>, Vec<u32>, String, i32), tonic::Status> {
    let mut s = client.generate_stream(req).await?.into_inner();
    let (mut ids, mut loops, mut text, mut finish) = (vec![], vec![], String::new(), 0);
    while let Some(m) = s.message().await? {
        text.push_str(&m.text);
        if let Some(t) = m.token() {
            ids.push(t.id);
            loops.push(t.exit_loop);
        }
        if m.finish().is_some() {
            finish = m.finish_reason;
        }
    }
    Ok((ids, loops, text, finish))
}

/// The text of `GET http://addr/metrics`.
pub async fn scrape(addr: SocketAddr) -> String {
    http_get(addr, "/metrics").await
}

/// The response (headers and body) of an HTTP/1.0 `GET path` to `addr`.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("HTTP port");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    body
}

/// The sum of the series `name{labels}` on the metrics endpoint `addr`. Every service of a test
/// process exports the same process-wide registry, so compare values of one endpoint before
/// and after, never sums over endpoints.
pub async fn metric_at(addr: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    metric(&scrape(addr).await, name, labels)
}

/// Waits until `name{labels}` on `addr` has grown by at least `by` over `before`; returns it.
pub async fn wait_for_metric(
    addr: SocketAddr,
    name: &str,
    labels: &[&str],
    before: f64,
    by: f64,
) -> f64 {
    let what = format!("{name}{labels:?} to grow by {by} from {before}");
    crate::eventually(Duration::from_secs(30), &what, || async {
        let now = metric_at(addr, name, labels).await;
        (now - before >= by).then_some(now)
    })
    .await
}

/// The value of the series `name{labels}` in a scrape (labels as Prometheus prints them, e.g.
/// `reason="empty_prompt"`), or 0.
pub fn metric(scrape: &str, name: &str, labels: &[&str]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A worker as its own `rrt-worker` process serving the test model (so a test can `kill -9` or
/// SIGSTOP it), and its gRPC URL once it prints its ports. The process is killed when dropped.
pub struct WorkerProcess {
    pub child: std::process::Child,
    pub url: String,
}

impl WorkerProcess {
    pub fn start(extra: &[&str]) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(crate::worker_bin())
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--model")
            .arg(recursive_model())
            .args(["--model-name", "smollm2-15x2"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start rrt-worker");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("the worker prints its ports");
        let grpc = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .unwrap_or_else(|| panic!("no grpc= in {line:?}"))
            .to_string();
        Self {
            child,
            url: format!("http://{grpc}"),
        }
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`, `TERM`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // A stopped process must be continued to die of SIGTERM; SIGKILL needs no care.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
