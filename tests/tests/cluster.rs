//! The cluster end to end: a coordinator, two workers and a router on 127.0.0.1:0 serving
//! SmolLM2-135M as 15 x 2 loops, driven by the Rust client, grpcurl and a Python grpcio client.
//! One cluster is shared by the tests of this file (its own runtime); tests that need other
//! settings start their own router on it.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use rrt_proto::v1 as pb;
use rrt_tests::cluster::{self, greedy, metric, metric_at, scrape, stream, wait_for_metric};
use tonic::Code;

struct Shared {
    router: SocketAddr,
    router_metrics: SocketAddr,
    coordinator: SocketAddr,
    coordinator_metrics: SocketAddr,
    workers: Vec<(SocketAddr, SocketAddr)>,
    runtime: &'static tokio::runtime::Runtime,
}

fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let runtime: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime"),
        ));
        // Started from a plain thread: async tests may be the first to ask, and a runtime
        // cannot block inside another.
        std::thread::spawn(move || {
            runtime.block_on(async {
                let c = cluster::coordinator(&[]).await;
                let addr = c.running.grpc_addr;
                let w1 = cluster::worker(Some(addr), &["--worker-id", "w1"]).await;
                let w2 = cluster::worker(Some(addr), &["--worker-id", "w2"]).await;
                let r = cluster::router(Some(addr), &[]).await;
                cluster::wait_for_workers(&r.running, 2).await;
                let s = Shared {
                    router: r.running.grpc_addr,
                    router_metrics: r.running.metrics_addr,
                    coordinator: addr,
                    coordinator_metrics: c.running.metrics_addr,
                    workers: vec![
                        (w1.running.grpc_addr, w1.running.metrics_addr),
                        (w2.running.grpc_addr, w2.running.metrics_addr),
                    ],
                    runtime,
                };
                // The services live as long as the test process.
                std::mem::forget((c, w1, w2, r));
                s
            })
        })
        .join()
        .expect("the cluster starts")
    })
}

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "In the beginning God created",
    "Once upon a time there was",
    "1, 2, 3, 4,",
    "The LORD is my shepherd",
    "Rust is a programming language",
    "Hello",
    "And God said, Let there be light: and there was light.",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_streams_equal_single_requests() {
    let s = shared();
    let mut client = cluster::client(s.router).await;
    let mut single = Vec::new();
    for p in PROMPTS {
        single.push(
            stream(&mut client, greedy(p, 12))
                .await
                .expect("single request"),
        );
    }
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move { stream(&mut c, greedy(PROMPTS[i % 8], 12)).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let (ids, loops, text, finish) = t.await.unwrap().expect("concurrent request");
        let (want_ids, _, want_text, _) = &single[i % 8];
        assert_eq!(&ids, want_ids, "request {i} ({:?})", PROMPTS[i % 8]);
        assert_eq!(&text, want_text);
        assert_eq!(finish, pb::FinishReason::Length as i32);
        assert!(loops.iter().all(|&l| l == 2), "no exit policy: full depth");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_with_a_message_and_are_counted() {
    let s = shared();
    let mut client = cluster::client(s.router).await;
    let sampling = |t: f32, p: f32| {
        Some(pb::SamplingParameters {
            temperature: t,
            top_p: p,
            ..Default::default()
        })
    };
    let long_prompt = "word ".repeat(9000);
    let cases = [
        ("empty_prompt", greedy("", 8)),
        ("prompt_too_long", greedy(&long_prompt, 8)),
        ("max_new_tokens_zero", greedy("hi", 0)),
        ("max_new_tokens_over_limit", greedy("hi", 100_000)),
        (
            "bad_temperature",
            pb::GenerateRequest {
                sampling: sampling(f32::NAN, 1.0),
                ..greedy("hi", 8)
            },
        ),
        (
            "bad_temperature",
            pb::GenerateRequest {
                sampling: sampling(-1.0, 1.0),
                ..greedy("hi", 8)
            },
        ),
        (
            "bad_top_p",
            pb::GenerateRequest {
                sampling: sampling(0.0, 1.5),
                ..greedy("hi", 8)
            },
        ),
        (
            "bad_top_p",
            pb::GenerateRequest {
                sampling: sampling(0.0, -0.5),
                ..greedy("hi", 8)
            },
        ),
        (
            "unknown_model",
            pb::GenerateRequest {
                model: "gpt-9".into(),
                ..greedy("hi", 8)
            },
        ),
    ];
    let rejected = "rrt_router_requests_rejected_total";
    let before = scrape(s.router_metrics).await;
    for (reason, req) in cases.clone() {
        let err = client.generate(req.clone()).await.expect_err(reason);
        assert_eq!(err.code(), Code::InvalidArgument, "{reason}: {err:?}");
        assert!(!err.message().is_empty(), "{reason}: no message");
        let err = stream(&mut client, req).await.expect_err(reason);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{reason} (stream): {err:?}"
        );
    }
    // Each case was refused twice (unary and stream), counted by reason.
    let after = scrape(s.router_metrics).await;
    for (reason, _) in &cases {
        let label = [format!("reason=\"{reason}\"")];
        let label: Vec<&str> = label.iter().map(String::as_str).collect();
        let sent = 2 * cases.iter().filter(|(r, _)| r == reason).count();
        let counted = metric(&after, rejected, &label) - metric(&before, rejected, &label);
        assert!(
            counted >= sent as f64,
            "{reason}: {counted} counted of {sent}:\n{after}"
        );
    }
    // A message over the router's decoding limit (2 MiB against 1 MiB): RESOURCE_EXHAUSTED, the
    // gRPC convention for an over-limit message, unary and streamed.
    let huge = greedy(&"x".repeat(2 << 20), 8);
    let err = client
        .generate(huge.clone())
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let err = stream(&mut client, huge).await.expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The service still serves.
    let (ids, _, _, _) = stream(&mut client, greedy("Hello", 4)).await.unwrap();
    assert_eq!(ids.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_resource_exhausted_and_a_dropped_stream_cancels_on_the_worker() {
    let s = shared();
    // A second router on the same cluster that admits one request at a time.
    let small = s
        .runtime
        .spawn(async move {
            let r = cluster::router(Some(shared().coordinator), &["--max-concurrent", "1"]).await;
            cluster::wait_for_workers(&r.running, 2).await;
            let addr = r.running.grpc_addr;
            std::mem::forget(r);
            addr
        })
        .await
        .unwrap();
    let cancelled = ["outcome=\"cancelled\""];
    let cancelled_before = metric_at(s.workers[0].1, "rrt_worker_requests_total", &cancelled).await;
    let mut client = cluster::client(small).await;
    let mut long = client
        .generate_stream(greedy("Once upon a time", 1000))
        .await
        .expect("first request admitted")
        .into_inner();
    long.message()
        .await
        .expect("a first token")
        .expect("a message");
    let err = client
        .generate(greedy("Hello", 4))
        .await
        .expect_err("over capacity");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    drop(long);
    let (metrics, name) = (s.workers[0].1, "rrt_worker_requests_total");
    wait_for_metric(metrics, name, &cancelled, cancelled_before, 1.0).await;
    // The slot is free again.
    let (ids, _, _, _) = stream(&mut client, greedy("Hello", 4)).await.unwrap();
    assert_eq!(ids.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_ends_a_long_generation_with_deadline_exceeded() {
    let s = shared();
    let mut client = cluster::client(s.router).await;
    let mut req = tonic::Request::new(greedy("In the beginning", 1000));
    req.set_timeout(Duration::from_millis(400));
    let mut tokens = 0;
    let result = async {
        let mut st = client.generate_stream(req).await?.into_inner();
        while let Some(m) = st.message().await? {
            tokens += m.token().is_some() as usize;
        }
        Ok::<_, tonic::Status>(())
    }
    .await;
    let err = result.expect_err("the deadline ends the stream");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        tokens < 1000,
        "the deadline cut the generation short ({tokens} tokens)"
    );
}

fn venv_bin(name: &str) -> std::path::PathBuf {
    rrt_tests::ensure(rrt_tests::root().join(".cache/venv/.ready"), "venv");
    rrt_tests::root().join(".cache/venv/bin").join(name)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a client");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn grpcurl_lists_services_checks_health_and_streams_a_generation() {
    let s = shared();
    let grpcurl = venv_bin("grpcurl");
    let addr = s.router.to_string();
    let list = run(Command::new(&grpcurl).args(["-plaintext", &addr, "list"]));
    for svc in ["rrt.v1.Generation", "grpc.health.v1.Health"] {
        assert!(list.contains(svc), "{svc} missing from:\n{list}");
    }
    let describe = run(Command::new(&grpcurl).args([
        "-plaintext",
        &addr,
        "describe",
        "rrt.v1.GenerateRequest",
    ]));
    assert!(describe.contains("max_new_tokens"), "{describe}");
    let health = run(Command::new(&grpcurl).args([
        "-plaintext",
        "-d",
        r#"{"service":"rrt.v1.Generation"}"#,
        &addr,
        "grpc.health.v1.Health/Check",
    ]));
    assert!(health.contains("\"SERVING\""), "{health}");
    let gen = run(Command::new(&grpcurl).args([
        "-plaintext",
        "-d",
        r#"{"prompt":"The capital of France is","maxNewTokens":6}"#,
        &addr,
        "rrt.v1.Generation/GenerateStream",
    ]));
    assert_eq!(gen.matches("\"tokenId\"").count(), 6, "{gen}");
    assert!(gen.contains("FINISH_REASON_LENGTH"), "{gen}");
    assert!(gen.contains("\"exitLoop\": 2"), "{gen}");
    // Workers and the coordinator answer reflection and health too.
    for a in [s.coordinator, s.workers[0].0] {
        let list = run(Command::new(&grpcurl).args(["-plaintext", &a.to_string(), "list"]));
        assert!(list.contains("grpc.health.v1.Health"), "{list}");
    }
}

#[test]
fn a_python_grpcio_client_built_from_the_proto_gets_a_completion() {
    let s = shared();
    let python = venv_bin("python");
    let out = run(Command::new(python).args([
        rrt_tests::root()
            .join("tests/python/generate_client.py")
            .to_str()
            .unwrap(),
        rrt_tests::root().join("proto").to_str().unwrap(),
        &s.router.to_string(),
        "The capital of France is",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    assert_eq!(v["health"], "SERVING", "{v}");
    assert_eq!(v["model"], "smollm2-15x2", "{v}");
    assert_eq!(v["loops"], 2, "{v}");
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 8, "{v}");
    assert_eq!(v["finish_reason"], "FINISH_REASON_LENGTH", "{v}");
    assert_eq!(v["empty_prompt"], "INVALID_ARGUMENT", "{v}");
    assert!(v["worker"].as_str().unwrap().starts_with('w'), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exports_prometheus_metrics_with_help_text() {
    let s = shared();
    let mut client = cluster::client(s.router).await;
    // One endpoint's values before and after (the registry is process-wide: every endpoint of
    // this process exports both workers' series).
    let (exits, at_loop_2) = ("rrt_worker_token_exits_total", ["loop=\"2\""]);
    let exits_before = metric_at(s.workers[0].1, exits, &at_loop_2).await;
    let (routed, p2c) = ("rrt_router_decisions_total", ["policy=\"combined\""]);
    let routed_before = metric_at(s.router_metrics, routed, &p2c).await;
    stream(&mut client, greedy("Hello", 4)).await.unwrap();
    // Workers mirror the engine into metrics every report interval.
    wait_for_metric(s.workers[0].1, exits, &at_loop_2, exits_before, 4.0).await;
    wait_for_metric(s.router_metrics, routed, &p2c, routed_before, 1.0).await;
    let worker = scrape(s.workers[0].1).await;
    for name in [
        "rrt_worker_token_exits_total",
        "rrt_worker_generated_tokens_total",
        "rrt_worker_loop_steps_per_second",
        "rrt_worker_kv_cache_usage_ratio",
        "rrt_worker_time_to_first_token_seconds",
    ] {
        assert!(
            worker.contains(&format!("# HELP {name}")),
            "{name} has no HELP"
        );
    }
    for w in ["w1", "w2"] {
        let label = format!("worker=\"{w}\"");
        assert!(
            worker.contains(&format!("rrt_worker_queue_length{{{label}}}")),
            "{w}'s series are exported"
        );
    }
    let coordinator = scrape(s.coordinator_metrics).await;
    assert!(
        metric(&coordinator, "rrt_coordinator_workers", &[]) == 2.0,
        "{coordinator}"
    );
    assert!(
        metric(
            &coordinator,
            "rrt_coordinator_model_expected_loops",
            &["model=\"smollm2-15x2\""]
        ) > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_end_the_text_before_them_and_tokenize_matches_the_model() {
    let s = shared();
    let mut client = cluster::client(s.router).await;
    let (_, _, text, _) = stream(&mut client, greedy("The capital of France is", 16))
        .await
        .unwrap();
    // A stop sequence taken from the middle of the greedy text (on a char boundary).
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "{text:?}");
    let stop: String = chars[4..7].iter().collect();
    let before = &text[..text.find(&stop).unwrap()];
    let req = pb::GenerateRequest {
        stop: vec![stop.clone()],
        ..greedy("The capital of France is", 16)
    };
    let (_, _, cut, finish) = stream(&mut client, req.clone()).await.unwrap();
    assert_eq!(
        (cut.as_str(), finish),
        (before, pb::FinishReason::Stop as i32),
        "stop {stop:?}"
    );
    let unary = client.generate(req).await.unwrap().into_inner();
    assert_eq!(unary.text, before);

    let ids = client
        .tokenize(pb::TokenizeRequest {
            model: String::new(),
            text: "Hello world".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    assert!(!ids.is_empty() && ids.len() <= 4, "{ids:?}");
    let info = client
        .model_info(pb::ModelInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.block_layers, info.loops, info.workers), (15, 2, 2));
    let served =
        rrt_model::ModelConfig::from_hf_file(&cluster::recursive_model().join("config.json"))
            .expect("the served model's config");
    assert_eq!(info.context_length as usize, served.max_position_embeddings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_come_back_when_asked_and_equal_the_models_log_softmax() {
    use rrt_model::{BatchItem, Logits};

    let s = shared();
    let mut client = cluster::client(s.router).await;
    let prompt = "The LORD is my shepherd";
    let req = pb::GenerateRequest {
        logprobs: true,
        ..greedy(prompt, 6)
    };
    let unary = client.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(unary.token_ids.len(), 6);
    assert_eq!(unary.logprobs.len(), 6, "one logprob per token");
    let mut st = client.generate_stream(req).await.unwrap().into_inner();
    let mut streamed = Vec::new();
    while let Some(m) = st.message().await.unwrap() {
        if let Some(t) = m.token() {
            streamed.push(t.logprob.expect("a logprob on every token message"));
        }
    }
    assert_eq!(streamed, unary.logprobs, "stream and unary agree");
    let plain = client
        .generate(greedy(prompt, 6))
        .await
        .unwrap()
        .into_inner();
    assert!(plain.logprobs.is_empty(), "not asked, not sent");
    assert_eq!(plain.token_ids, unary.token_ids);

    // The reference: the served model scoring prompt + generated tokens in one forward.
    let prompt_ids = client
        .tokenize(pb::TokenizeRequest {
            model: String::new(),
            text: prompt.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    let loaded = rrt_model::load(&cluster::recursive_model(), rrt_model::WeightDtype::F32).unwrap();
    let mut text = prompt_ids.clone();
    text.extend(&unary.token_ids[..5]);
    let mut cache = loaded.model.new_cache();
    let mut kv = loaded.model.new_kv_pool();
    let logits = loaded
        .model
        .forward(
            &mut kv,
            &mut [BatchItem {
                tokens: &text,
                offset: 0,
                cache: &mut cache,
                logits: Logits::All,
            }],
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, (&token, &got)) in unary.token_ids.iter().zip(&unary.logprobs).enumerate() {
        let row = &logits[prompt_ids.len() - 1 + i];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let want = (row[token as usize] - max) as f64 - z.ln();
        assert!(got <= 0.0, "token {i}: {got}");
        assert!(
            (got as f64 - want).abs() < 2e-3,
            "token {i}: served {got}, model {want}"
        );
    }
}

/// Metric names (`rrt_...`) a PromQL text mentions, without histogram suffixes.
fn queried_metrics(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("rrt_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alert_rules_query_only_exported_metrics() {
    let s = shared();
    let mut client = cluster::client(s.router).await;
    let (tokens, every) = ("rrt_worker_generated_tokens_total", [] as [&str; 0]);
    let before = metric_at(s.workers[0].1, tokens, &every).await;
    stream(&mut client, greedy("Hello", 2)).await.unwrap();
    let _ = client.generate(greedy("", 2)).await;
    // Every series the dashboard reads exists once the reports have mirrored this request.
    wait_for_metric(s.workers[0].1, tokens, &every, before, 2.0).await;
    let mut exported = String::new();
    for a in [s.router_metrics, s.coordinator_metrics, s.workers[0].1] {
        exported += &scrape(a).await;
    }
    let helped: std::collections::BTreeSet<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(rrt_tests::root().join("deploy/grafana/rrt-dashboard.json"))
            .unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            exprs += t["expr"].as_str().unwrap();
            exprs.push('\n');
        }
    }
    let rules =
        std::fs::read_to_string(rrt_tests::root().join("deploy/prometheus/rules.yml")).unwrap();
    let queried = queried_metrics(&(exprs + &rules));
    assert!(queried.len() >= 15, "{queried:?}");
    let missing: Vec<&String> = queried
        .iter()
        .filter(|n| !helped.contains(n.as_str()))
        .collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");

    // docs/metrics.md lists every series the services export.
    let doc = std::fs::read_to_string(rrt_tests::root().join("docs/metrics.md")).unwrap();
    let typed: std::collections::BTreeSet<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(typed.len() >= 20, "{typed:?}");
    let undocumented: Vec<&&str> = typed
        .iter()
        .filter(|n| !doc.contains(&format!("| `{n}` |")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/metrics.md: {undocumented:?}"
    );
}

#[test]
fn promtool_accepts_the_shipped_config_and_rules() {
    for (what, file) in [("config", "prometheus.yml"), ("rules", "rules.yml")] {
        run(Command::new("promtool")
            .args(["check", what])
            .arg(rrt_tests::root().join("deploy/prometheus").join(file)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_every_service_and_answers_queries() {
    let s = shared();
    let mut client = cluster::client(s.router).await;
    let (tokens, every) = ("rrt_worker_generated_tokens_total", [] as [&str; 0]);
    let before = metric_at(s.workers[0].1, tokens, &every).await;
    stream(&mut client, greedy("Hello", 4)).await.unwrap();
    wait_for_metric(s.workers[0].1, tokens, &every, before, 4.0).await;
    // promtool's own lint of the exposition format (HELP text, names, types).
    let exposition = scrape(s.workers[0].1).await;
    let body = exposition
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (make deps installs prometheus)");
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = [
        s.coordinator_metrics,
        s.router_metrics,
        s.workers[0].1,
        s.workers[1].1,
    ]
    .iter()
    .map(|a| format!("\"{a}\""))
    .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: rrt\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus (make deps installs it)");
    // The tokens as Prometheus scraped them from the first worker's endpoint (the registry is
    // process-wide: one endpoint holds both workers' series), once all four targets are up.
    let query = format!(
        "/api/v1/query?query=sum(rrt_worker_generated_tokens_total%7Binstance%3D%22{}%22%7D)%20and%20count(up%3D%3D1)%3D%3D4",
        s.workers[0].1
    );
    let scraped = rrt_tests::eventually(
        Duration::from_secs(60),
        "Prometheus to scrape all four services after this test's tokens",
        || async {
            let up = tokio::net::TcpStream::connect(web).await.is_ok();
            let answer = if up {
                cluster::http_get(web, &query).await
            } else {
                String::new()
            };
            let value: f64 = answer
                .rsplit("\"value\":[")
                .next()
                .and_then(|v| v.split('"').nth(1))
                .and_then(|v| v.parse().ok())?;
            (value >= before + 4.0).then_some(value)
        },
    )
    .await;
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(scraped >= before + 4.0, "{scraped} vs {before} before");
}
