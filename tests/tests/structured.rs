//! Structured outputs through gRPC on the demo model (SmolLM2 15 x 2 with the committed learned
//! exit heads), exits on: every reply under a JSON schema parses and is valid (checked here,
//! not taken from the server), regular expressions and Lark grammars hold for the whole output,
//! tokens still leave after loop 1, and a constraint that does not compile is
//! INVALID_ARGUMENT with the compiler's message, bounded.

#![forbid(unsafe_code)]

use rrt_proto::v1 as pb;
use rrt_proto::v1::output_constraint::Kind;
use rrt_tests::cluster;
use serde_json::Value;

const PERSON: &str = r#"{
  "type": "object",
  "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}
  },
  "required": ["name", "age", "color"],
  "additionalProperties": false
}"#;

/// The person schema's rules, checked on a parsed reply.
fn valid_person(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    for k in o.keys() {
        if !["name", "age", "color", "tags"].contains(&k.as_str()) {
            return Err(format!("unexpected property {k}"));
        }
    }
    let name = o["name"].as_str().ok_or("name is not a string")?;
    if name.chars().count() > 24 {
        return Err("name too long".into());
    }
    let age = o
        .get("age")
        .and_then(Value::as_i64)
        .ok_or("age is not an integer")?;
    if !(0..=120).contains(&age) {
        return Err(format!("age {age} out of range"));
    }
    let color = o.get("color").and_then(Value::as_str).ok_or("no color")?;
    if !["red", "green", "blue"].contains(&color) {
        return Err(format!("color {color}"));
    }
    if let Some(tags) = o.get("tags") {
        let tags = tags.as_array().ok_or("tags is not an array")?;
        if tags.len() > 3
            || tags
                .iter()
                .any(|t| t.as_str().is_none_or(|s| s.chars().count() > 12))
        {
            return Err("bad tags".into());
        }
    }
    Ok(())
}

fn constrained(system: &str, user: &str, kind: Kind, max: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        constraint: Some(pb::OutputConstraint { kind: Some(kind) }),
        ..cluster::chat(system, user, max)
    }
}

/// A worker on the demo model with learned exits at 0.5 (20 sequences) behind a router.
async fn demo_cluster() -> (
    cluster::Service<rrt_worker::RunningWorker>,
    cluster::Service<rrt_router::RunningRouter>,
) {
    let w = cluster::worker_of(
        &cluster::demo_model(),
        None,
        &[
            "--exit",
            "learned",
            "--exit-threshold",
            "0.5",
            "--max-sequences",
            "20",
        ],
    )
    .await;
    let r = cluster::router(
        None,
        &["--worker", &format!("http://{}", w.running.grpc_addr)],
    )
    .await;
    cluster::wait_for_workers(&r.running, 1).await;
    (w, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_outputs_parse_and_validate_with_exits_on() {
    let (w, r) = demo_cluster().await;
    let client = cluster::client(r.running.grpc_addr).await;

    let subjects = [
        "a retired sailor",
        "a young painter",
        "a chess champion",
        "a baker from Lyon",
        "an astronaut",
        "a shy librarian",
        "a marathon runner",
        "a jazz pianist",
        "a beekeeper",
        "a mountain guide",
        "a toddler",
        "a famous chef",
        "a night nurse",
        "a street magician",
        "a lighthouse keeper",
        "a physics teacher",
        "a surfer",
        "a cartographer",
        "a violin maker",
        "a gardener",
    ];
    let tasks: Vec<_> = subjects
        .iter()
        .map(|s| {
            let mut client = client.clone();
            let req = constrained(
                "You describe people as JSON.",
                &format!("Describe {s}."),
                Kind::JsonSchema(PERSON.into()),
                96,
            );
            tokio::spawn(async move { client.generate(req).await.map(|r| r.into_inner()) })
        })
        .collect();
    let (mut early, mut tokens) = (0, 0);
    for (t, subject) in tasks.into_iter().zip(subjects) {
        let reply = t.await.unwrap().expect("served");
        let v: Value = serde_json::from_str(&reply.text)
            .unwrap_or_else(|e| panic!("{subject}: {:?} does not parse: {e}", reply.text));
        valid_person(&v).unwrap_or_else(|e| panic!("{subject}: {:?}: {e}", reply.text));
        // The grammar completed: a natural end, not the token limit.
        assert_ne!(
            reply.finish_reason,
            pb::FinishReason::Length as i32,
            "{subject}: {:?}",
            reply.text
        );
        early += reply.exit_loops.iter().filter(|&&l| l == 1).count();
        tokens += reply.exit_loops.len();
    }
    println!("JSON schema: {early} of {tokens} tokens exited after loop 1");
    assert!(
        early > 0,
        "with exits on, some constrained tokens still leave after loop 1"
    );

    let mut client = client.clone();
    // Any JSON object.
    let reply = client
        .generate(constrained(
            "Answer in JSON.",
            "Give a cat's name and age as a JSON object with the keys name and age.",
            Kind::JsonObject(true),
            96,
        ))
        .await
        .unwrap()
        .into_inner();
    let v: Value = serde_json::from_str(&reply.text)
        .unwrap_or_else(|e| panic!("{:?} does not parse: {e}", reply.text));
    assert!(v.is_object(), "{v}");

    // A regular expression over the whole output.
    for user in ["Name a city and a number.", "Pick a word and three digits."] {
        let reply = client
            .generate(constrained(
                "",
                user,
                Kind::Regex("[A-Z][a-z]{2,9} [0-9]{3}".into()),
                24,
            ))
            .await
            .unwrap()
            .into_inner();
        let (word, digits) = reply.text.split_once(' ').expect("a space");
        let mut chars = word.chars();
        assert!(
            chars.next().is_some_and(|c| c.is_ascii_uppercase()),
            "{:?}",
            reply.text
        );
        assert!(chars.all(|c| c.is_ascii_lowercase()) && (3..=10).contains(&word.len()));
        assert!(
            digits.len() == 3 && digits.chars().all(|c| c.is_ascii_digit()),
            "{:?}",
            reply.text
        );
    }

    // A Lark grammar.
    let reply = client
        .generate(constrained(
            "",
            "Is the sky blue? Answer yes or no.",
            Kind::LarkGrammar("start: answer\nanswer: \"yes\" | \"no\"".into()),
            8,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        ["yes", "no"].contains(&reply.text.as_str()),
        "{:?}",
        reply.text
    );

    // Constraints that do not compile: INVALID_ARGUMENT naming the kind, bounded.
    for kind in [
        Kind::JsonSchema("{\"type\": ".into()),
        Kind::JsonSchema(r#"{"type": "no-such-type"}"#.into()),
        Kind::Regex("(unclosed".into()),
        Kind::LarkGrammar("start: ???".into()),
    ] {
        let what = format!("{kind:?}");
        let e = client
            .generate(constrained("", "hi", kind, 8))
            .await
            .expect_err(&what);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
        assert!(
            e.message().len() <= 600,
            "{what}: {} bytes",
            e.message().len()
        );
        assert!(
            ["json_schema", "regex", "grammar"]
                .iter()
                .any(|k| e.message().contains(k)),
            "{what}: {}",
            e.message()
        );
    }
    drop(w);
}

/// The same through the official `openai` package: `response_format` json_schema (strict) on
/// 20 prompts, every reply validated with the `jsonschema` package, streamed and not; json_object;
/// and each field rrt does not honour refused with a 400 that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_gets_schema_valid_json_and_named_refusals() {
    let (w, r) = demo_cluster().await;
    let http = r.running.http_addr.expect("the HTTP API is on");
    let v = rrt_tests::python_json("structured_client.py", vec![format!("http://{http}/v1")]).await;
    assert_eq!(v["schema_replies"].as_array().unwrap().len(), 20);
    assert_eq!(
        v["invalid"],
        serde_json::json!([]),
        "replies that do not validate"
    );
    for f in v["finish_reasons"].as_array().unwrap() {
        assert_eq!(f, "stop", "the grammar completed: {v}");
    }
    assert!(
        v["json_object"]["parsed"].is_object(),
        "{}",
        v["json_object"]
    );
    for (case, param) in [
        ("bad_schema", "response_format"),
        ("bad_format", "response_format"),
        ("tool_choice_unknown", "tool_choice"),
        ("tool_choice_without_tools", "tool_choice"),
        ("functions", "functions"),
        ("completion_tools", "tools"),
        ("logit_bias", "logit_bias"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
        ("unknown", "frobnicate"),
    ] {
        let e = &v["errors"][case];
        assert_eq!(e["status"], 400, "{case}: {e}");
        assert_eq!(e["param"], param, "{case}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(
            !message.is_empty() && message.len() <= 600,
            "{case}: {message}"
        );
    }
    assert!(v["errors"]["bad_schema"]["message"]
        .as_str()
        .unwrap()
        .contains("json_schema"));
    assert_eq!(
        v["neutral_ok"], true,
        "neutral values of unsupported fields pass"
    );

    // Tool calls: a call of a listed function whose arguments validate against its schema,
    // finish_reason tool_calls, streamed (name first, then argument pieces) and not.
    let calls = &v["tool_calls"];
    for case in ["required", "required_stream", "named", "named_stream"] {
        let c = &calls[case];
        assert_eq!(c["valid"], true, "{case}: {c}");
        assert_eq!(c["finish_reason"], "tool_calls", "{case}: {c}");
        assert!(
            ["get_weather", "add"].contains(&c["name"].as_str().unwrap_or("")),
            "{case}: {c}"
        );
    }
    assert_eq!(calls["named"]["name"], "add");
    assert_eq!(calls["named_stream"]["name"], "add");
    assert_eq!(
        calls["required"]["arguments"],
        calls["required_stream"]["arguments"]
    );
    assert!(
        calls["required_stream"]["pieces"].as_u64().unwrap() >= 2,
        "{}",
        calls["required_stream"]
    );
    // Parallel calls: `parallel_tool_calls: true` allows 1-8 (each valid, the reply ending with
    // whole calls; the stream, put together by index, equals the whole reply); `false` one.
    for case in ["parallel", "single"] {
        let c = &calls[case];
        let whole = c["whole"].as_array().expect("whole calls");
        assert!(!whole.is_empty(), "{case}: no call: {c}");
        for call in whole {
            assert_eq!(call["valid"], true, "{case}: {call}");
            assert_eq!(call["finish_reason"], "tool_calls", "{case}: {call}");
        }
        assert_eq!(c["whole"], c["streamed"], "{case}: streamed != whole");
        let n = whole.len();
        let indexes: Vec<u64> = (0..n as u64).collect();
        assert_eq!(c["indexes"], serde_json::json!(indexes), "{case}");
        let ids = c["ids"].as_array().expect("ids");
        assert!(
            ids.iter()
                .all(|i| i.as_str().is_some_and(|i| i.starts_with("call_"))),
            "{case}: {c}"
        );
        if case == "single" {
            assert_eq!(n, 1, "parallel_tool_calls false: {c}");
        }
        assert!(n <= 8, "{case}: {n} calls");
        eprintln!("{case}: {n} call(s): {}", c["whole"]);
    }

    assert!(
        calls["auto"]["finish_reason"] == "tool_calls" || calls["auto"]["content"].is_string(),
        "{}",
        calls["auto"]
    );
    assert!(
        calls["after_tool"]["content"].is_string(),
        "{}",
        calls["after_tool"]
    );
    drop(w);
}
