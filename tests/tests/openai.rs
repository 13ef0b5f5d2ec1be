//! The OpenAI-compatible HTTP API driven by the official `openai` Python package (from PyPI,
//! `make venv`) against a cluster on 127.0.0.1:0 with an API key: completions and chat,
//! streamed and not, usage on and off, seeded sampling, stop strings, 400 / 401 / 404 error
//! objects, and a stream the client closes mid-way (its worker cancels the request). The
//! greedy text equals the gRPC API's for the same request.

#![forbid(unsafe_code)]

use std::time::Duration;

use rrt_tests::cluster::{self, greedy, metric_at};
use serde_json::Value;

const KEY: &str = "openai-test-key-0123456789";
const PROMPT: &str = "The capital of France is";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_gets_what_the_grpc_api_gives() {
    let c = cluster::coordinator(&[]).await;
    let w = cluster::worker(Some(c.running.grpc_addr), &[]).await;
    let r = cluster::router(Some(c.running.grpc_addr), &["--api-key", KEY]).await;
    cluster::wait_for_workers(&r.running, 1).await;
    let http = r.running.http_addr.expect("the HTTP API is on");

    let base = format!("http://{http}/v1");
    let v = rrt_tests::python_json(
        "openai_client.py",
        vec![base, KEY.to_string(), PROMPT.to_string()],
    )
    .await;

    // The same greedy request through gRPC (with the key) gives the same text.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", r.running.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut req = tonic::Request::new(greedy(PROMPT, 8));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let grpc_text = rrt_proto::v1::generation_client::GenerationClient::new(channel)
        .generate(req)
        .await
        .unwrap()
        .into_inner()
        .text;

    let completion = &v["completion"];
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(
        completion["text"],
        grpc_text.as_str(),
        "HTTP and gRPC greedy text"
    );
    assert!(completion["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let completion_tokens = completion["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion_tokens));
    assert_eq!(
        completion["usage"]["total_tokens"].as_u64().unwrap(),
        completion["usage"]["prompt_tokens"].as_u64().unwrap() + completion_tokens
    );
    let s = &v["completion_stream"];
    assert_eq!(s["text"], completion["text"], "streamed = whole");
    assert_eq!(s["usage_chunks"], 0, "no usage without include_usage");
    let finishes: Vec<&Value> = s["finish_reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&completion["finish_reason"]]);
    let su = &v["completion_stream_usage"];
    assert_eq!(su["text"], completion["text"]);
    assert_eq!(su["last_choices"], 0);
    assert_eq!(su["usage_chunks"], 1);
    assert_eq!(su["usage"], completion["usage"]);

    let chat = &v["chat"];
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["role"], "assistant");
    assert!(!chat["content"].as_str().unwrap().is_empty());
    let cs = &v["chat_stream"];
    assert_eq!(cs["first_role"], "assistant");
    assert_eq!(cs["content"], chat["content"], "streamed chat = whole");
    assert_eq!(cs["finish_reason"], chat["finish_reason"]);
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(cs["usage"][field], chat["usage"][field], "{field}");
    }
    // The streamed chat repeats the chat before it: the worker's prefix cache holds every full
    // 16-token block of its prompt but the last token's, and usage says so as OpenAI does.
    let cached = |u: &Value| {
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let prompt_tokens = chat["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 16, "{prompt_tokens}");
    assert_eq!(cached(&chat["usage"]), 0, "the first time");
    assert_eq!(cached(&cs["usage"]), (prompt_tokens - 1) / 16 * 16);

    let seeded = v["seeded"].as_array().unwrap();
    assert_eq!(seeded[0], seeded[1], "the same seed gives the same text");

    let stop = &v["stop"];
    assert_eq!(stop["finish_reason"], "stop");
    assert!(!stop["text"]
        .as_str()
        .unwrap()
        .contains(stop["stop"].as_str().unwrap()));
    assert!(completion["text"]
        .as_str()
        .unwrap()
        .starts_with(stop["text"].as_str().unwrap()));

    for (case, status) in [
        ("bad_request", 400),
        ("bad_quality", 400),
        ("n2", 400),
        ("unknown_model", 404),
        ("bad_key", 401),
    ] {
        let e = &v[case];
        assert_eq!(e["status"], status, "{case}: {e}");
        assert!(
            !e["message"].as_str().unwrap_or("").is_empty(),
            "{case}: {e}"
        );
    }
    assert!(v["bad_request"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens must be at least 1"));
    assert!(v["bad_quality"]["message"]
        .as_str()
        .unwrap()
        .contains("rrt_quality"));
    // Quality FULL runs every loop: with no exits configured, the same greedy text.
    assert_eq!(v["full_quality_text"], completion["text"]);

    // An unknown route is an OpenAI error object too; every request is counted by route and
    // status.
    let reply = cluster::http_get(http, "/v1/nope").await;
    assert!(reply.starts_with("HTTP/1.0 404"), "{reply}");
    assert!(reply.contains("\"code\":\"unknown_url\""), "{reply}");
    let router_metrics = r.running.metrics_addr;
    let http_count = |endpoint: &'static str, status: &'static str| async move {
        let labels = [
            format!("endpoint=\"{endpoint}\""),
            format!("status=\"{status}\""),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        metric_at(router_metrics, "rrt_router_http_requests_total", &labels).await
    };
    assert!(http_count("/v1/completions", "200").await >= 4.0);
    assert!(http_count("/v1/chat/completions", "200").await >= 2.0);
    assert!(http_count("/v1/completions", "400").await >= 2.0);
    assert!(http_count("/v1/completions", "404").await >= 1.0);
    assert!(http_count("/v1/completions", "401").await >= 1.0);
    assert!(http_count("unmatched", "404").await >= 1.0);

    // The stream closed after 3 chunks: its worker cancels it and runs nothing.
    assert_eq!(v["closed_after"], 3);
    let metrics = w.running.metrics_addr;
    let start = std::time::Instant::now();
    loop {
        let running = metric_at(metrics, "rrt_worker_running_sequences", &[]).await;
        let cancelled = metric_at(
            metrics,
            "rrt_worker_requests_total",
            &["outcome=\"cancelled\""],
        )
        .await;
        if running == 0.0 && cancelled >= 1.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "running {running}, cancelled {cancelled}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
