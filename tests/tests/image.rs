//! The image `make image` builds, run with podman: it holds the four binaries, their libraries
//! and a user database and nothing else (no shell, no build tools); the manifests name it and
//! its binaries; and the manifests themselves run on it. The model Job's `convert` container
//! converts the bundled GGUF into a volume, then the coordinator, worker and router containers
//! start with the Deployments' command, args and environment (the ConfigMap, the downward-API
//! variables filled in as the kubelet would), pass their readiness probes, and serve the same
//! greedy text over gRPC and the OpenAI HTTP API as the native `rrt generate` on that model.
//!
//! Every container uses the host network (this machine has no container networking: the
//! manifests' fixed ports are bound on 0.0.0.0 and the Service name `rrt-coordinator` is an
//! `--add-host` entry) and runc with lowered rlimits: crun 1.8 refuses this machine's hybrid
//! cgroup layout, and the sandbox may not raise RLIMIT_NOFILE / RLIMIT_NPROC to podman's defaults.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rrt_tests::cluster::{client, greedy, http_get, stream};
use rrt_tests::{eventually, make, root, rrt_bin, smollm2_gguf};
use serde_json::Value;

const BINARIES: [&str; 4] = ["rrt", "rrt-worker", "rrt-router", "rrt-coordinator"];

/// The image tag the Makefile builds: the kustomization's `newName:newTag`.
fn image() -> String {
    let k = &manifests(&["kustomization.yaml"])[0];
    let i = &k["images"][0];
    assert_eq!(i["name"], "rrt", "the manifests' image name");
    let tag = i["newTag"].as_str().expect("newTag");
    assert_eq!(
        tag,
        env!("CARGO_PKG_VERSION"),
        "kustomization.yaml's newTag must be the workspace version `make image` tags"
    );
    format!("{}:{tag}", i["newName"].as_str().expect("newName"))
}

/// `make image`, once per process (a no-op when the binaries did not change).
fn built() -> String {
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            rrt_bin(); // the binaries of this build, so the image holds what the tests test
            make("image");
            image()
        })
        .clone()
}

/// Every document of `deploy/kubernetes/FILES` as JSON (PyYAML from the test venv).
fn manifests(files: &[&str]) -> Vec<Value> {
    let dir = root().join("deploy/kubernetes");
    let out = rrt_tests::python()
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for f in sys.argv[1:] \
             for d in yaml.safe_load_all(open(f)) if d]))",
        ])
        .args(files.iter().map(|f| dir.join(f)))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("json")
        .as_array()
        .expect("a list")
        .clone()
}

/// The pod spec of the manifest document named `name` (a Deployment or a Job).
fn pod_spec<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
        .pointer("/spec/template/spec")
        .expect("a pod template")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `podman run` with the flags this machine needs (module docs).
fn podman_run() -> Command {
    let mut c = Command::new("podman");
    c.args(["run", "--rm", "--runtime", "runc"]).args([
        "--ulimit",
        "nofile=4096:4096",
        "--ulimit",
        "nproc=4096:4096",
    ]);
    c
}

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman").args(args).output().expect("podman");
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_image_holds_the_binaries_their_libraries_and_nothing_else() {
    let image = built();
    let inspect: Value = serde_json::from_str(&podman(&["image", "inspect", &image])).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["User"], "10001:10001", "{config}");
    assert_eq!(
        config["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );

    // Every file of the image, by its path inside it.
    let mount = podman(&["image", "mount", &image]);
    let rootfs = PathBuf::from(mount.trim());
    let mut files = Vec::new();
    walk(&rootfs, &rootfs, &mut files);
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    podman(&["image", "unmount", &image]);
    assert!(passwd.contains("rrt:x:10001:10001:"), "{passwd}");
    for f in &files {
        let allowed = f.starts_with("/usr/local/bin/")
            || ["/etc/passwd", "/etc/group", "/etc/nsswitch.conf"].contains(&f.as_str())
            || ((f.starts_with("/lib") || f.starts_with("/usr/lib")) && f.contains(".so"));
        assert!(
            allowed,
            "unexpected file in the image: {f} (all: {files:?})"
        );
    }
    for b in BINARIES {
        assert!(files.contains(&format!("/usr/local/bin/{b}")), "{files:?}");
    }
    assert_eq!(
        files
            .iter()
            .filter(|f| f.starts_with("/usr/local/bin/"))
            .count(),
        BINARIES.len(),
        "{files:?}"
    );

    // Each binary runs inside the image as the non-root user.
    for b in BINARIES {
        let out = podman_run()
            .args([&image, b, "--version"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{b}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{b} {}", env!("CARGO_PKG_VERSION"))
        );
    }

    // Every container of the manifests that runs the image names one of its binaries and runs
    // as its user; the Dockerfile's final stage agrees.
    let docs = manifests(&[
        "coordinator.yaml",
        "worker.yaml",
        "router.yaml",
        "model-convert-job.yaml",
    ]);
    let mut checked = 0;
    for d in &docs {
        let Some(spec) = d.pointer("/spec/template/spec") else {
            continue;
        };
        for c in spec["containers"].as_array().unwrap() {
            if c["image"] != "rrt" {
                continue;
            }
            let command = strings(&c["command"]);
            assert!(
                BINARIES.contains(&command[0].as_str()),
                "{}: command {command:?} is not a binary of the image",
                d["metadata"]["name"]
            );
            assert_eq!(spec["securityContext"]["runAsUser"], 10001);
            checked += 1;
        }
    }
    assert_eq!(checked, 4, "coordinator, worker, router, model Job");
    let dockerfile = std::fs::read_to_string(root().join("deploy/docker/Dockerfile")).unwrap();
    assert!(dockerfile.contains("USER 10001:10001"), "Dockerfile user");
    for b in BINARIES {
        assert!(
            dockerfile.contains(&format!("target/release/{b}")),
            "the Dockerfile copies {b}"
        );
    }
}

/// Paths (inside the image) of every regular file and symlink under `dir`.
fn walk(rootfs: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            walk(rootfs, &e.path(), out);
        } else {
            let p = e.path();
            out.push(format!("/{}", p.strip_prefix(rootfs).unwrap().display()));
        }
    }
}

/// A container started from a manifest; removed when dropped.
struct Container {
    name: String,
    child: Child,
}

impl Container {
    /// Starts `spec`'s first container on the image with the manifest's command, args and
    /// environment (`env` overrides and fills in the downward API), the volume `models` at
    /// /models, and waits for the ports line the services print.
    fn start(image: &str, spec: &Value, env: &BTreeMap<String, String>, models: &Path) -> Self {
        let c = &spec["containers"][0];
        let name = format!(
            "rrt-test-{}-{}",
            std::process::id(),
            c["name"].as_str().unwrap()
        );
        let _ = Command::new("podman").args(["rm", "-f", &name]).output();
        let mut cmd = podman_run();
        cmd.args(["--name", &name, "--network", "host"])
            .args(["--add-host", "rrt-coordinator:127.0.0.1"])
            .arg("-v")
            .arg(format!("{}:/models", models.display()));
        for (k, v) in env {
            cmd.args(["--env", &format!("{k}={v}")]);
        }
        cmd.arg("--entrypoint")
            .arg(strings(&c["command"])[0].clone())
            .arg(image)
            .args(strings(&c["args"]))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("podman run");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("grpc="), "{name} did not start: {line:?}");
        Self { name, child }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "0", &self.name])
            .output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment the kubelet gives `spec`'s first container: the ConfigMap (envFrom), then
/// its `env` entries with `$(VAR)` expanded; optional Secrets are absent. `pod` fills the
/// downward-API fields.
fn environment(config: &Value, spec: &Value, pod: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = config["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    for e in spec["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_string();
            for (k, val) in env.iter() {
                v = v.replace(&format!("$({k})"), val);
            }
            Some(v)
        } else if let Some(path) = e.pointer("/valueFrom/fieldRef/fieldPath") {
            let path = path.as_str().unwrap();
            Some(
                pod.iter()
                    .find(|(p, _)| *p == path)
                    .unwrap_or_else(|| panic!("no value for {path}"))
                    .1
                    .to_string(),
            )
        } else {
            // An optional Secret the test cluster does not create.
            assert_eq!(
                e.pointer("/valueFrom/secretKeyRef/optional"),
                Some(&Value::Bool(true)),
                "{e}"
            );
            None
        };
        if let Some(v) = value {
            env.insert(name, v);
        }
    }
    env.insert("RUST_LOG".into(), "warn".into());
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn the_manifests_convert_and_serve_the_model_on_the_image() {
    let image = built();
    let docs = manifests(&[
        "configmap.yaml",
        "model-convert-job.yaml",
        "coordinator.yaml",
        "worker.yaml",
        "router.yaml",
    ]);
    let config = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();

    // The model volume, owned by the pods' user, with what the Job's fetch step downloads.
    let volume = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(volume.path(), Some(10001), Some(10001)).unwrap();
    let job = pod_spec(&docs, "Job", "rrt-model-convert");
    let fetch = &job["initContainers"][0];
    let gguf = "SmolLM2-135M-Instruct.Q4_1.gguf";
    assert!(
        fetch["args"][0].as_str().unwrap().contains(gguf),
        "the fetch step downloads the bundled model"
    );
    std::fs::copy(smollm2_gguf(), volume.path().join(gguf)).unwrap();

    // The Job's convert container, as the manifest runs it.
    let convert = &job["containers"][0];
    let out = podman_run()
        .arg("-v")
        .arg(format!("{}:/models", volume.path().display()))
        .arg("--entrypoint")
        .arg(strings(&convert["command"])[0].clone())
        .arg(&image)
        .args(strings(&convert["args"]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the model Job failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served = config["data"]["RRT_MODEL"].as_str().unwrap();
    let model = volume.path().join(served.strip_prefix("/models/").unwrap());
    assert!(
        model.join("config.json").exists(),
        "the Job wrote {served}, which the ConfigMap serves"
    );

    // The Deployments, started in dependency order, each ready by its readiness probe.
    let pod = [
        ("status.podIP", "127.0.0.1"),
        ("metadata.name", "rrt-worker-0"),
    ];
    let mut running = Vec::new();
    for (name, metrics) in [
        ("rrt-coordinator", 9100),
        ("rrt-worker", 9101),
        ("rrt-router", 9103),
    ] {
        let spec = pod_spec(&docs, "Deployment", name);
        let env = environment(config, spec, &pod);
        running.push(Container::start(&image, spec, &env, volume.path()));
        let probe = spec["containers"][0]
            .pointer("/readinessProbe/httpGet/path")
            .or_else(|| spec["containers"][0].pointer("/startupProbe/httpGet/path"))
            .and_then(Value::as_str)
            .unwrap_or("/ready")
            .to_string();
        let addr: SocketAddr = ([127, 0, 0, 1], metrics).into();
        eventually(Duration::from_secs(60), &format!("{name} ready"), || {
            let probe = probe.clone();
            async move { http_get(addr, &probe).await.contains(" 200 ").then_some(()) }
        })
        .await;
    }

    // The same greedy text over gRPC, the OpenAI HTTP API and natively.
    let prompt = "The capital of France is";
    let router: SocketAddr = ([127, 0, 0, 1], 50050).into();
    let grpc = client(router).await;
    let (ids, _, grpc_text, _) = eventually(
        Duration::from_secs(30),
        "a worker behind the router",
        || {
            let mut grpc = grpc.clone();
            async move { stream(&mut grpc, greedy(prompt, 12)).await.ok() }
        },
    )
    .await;
    assert_eq!(ids.len(), 12);

    let body = serde_json::json!({
        "model": config["data"]["RRT_WORKER_MODEL_NAME"],
        "prompt": prompt, "max_tokens": 12, "temperature": 0,
    })
    .to_string();
    let reply = http_post(([127, 0, 0, 1], 8080).into(), "/v1/completions", &body).await;
    let json: Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {reply}"));
    assert_eq!(json["choices"][0]["text"], grpc_text.as_str(), "{json}");
    assert_eq!(json["usage"]["completion_tokens"], 12, "{json}");

    let native = Command::new(rrt_bin())
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args(["--prompt", prompt, "--max-new-tokens", "12"])
        .output()
        .unwrap();
    assert!(native.status.success());
    let native = String::from_utf8_lossy(&native.stdout);
    assert!(
        native.trim_end().ends_with(grpc_text.trim_end()),
        "native {native:?} vs served {grpc_text:?}"
    );
    drop(running);
}

/// The response (headers and body) of an HTTP/1.0 `POST path` with a JSON body.
async fn http_post(addr: SocketAddr, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("HTTP port");
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.expect("read");
    reply
}
