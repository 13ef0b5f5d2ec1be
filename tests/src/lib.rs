//! Helpers shared by the end-to-end tests: where the workspace, the bundled model and the
//! held-out text live (fetched through the Makefile when missing, never silently skipped), and
//! how to run the real `rrt` binary; [`cluster`] starts the services in-process.

#![forbid(unsafe_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod cluster;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

static MAKE_LOCK: Mutex<()> = Mutex::new(());

/// Runs `make TARGET` in the workspace root unless `path` already exists; panics with make's
/// output if it fails, so a missing download fails the test loudly.
pub fn ensure(path: PathBuf, target: &str) -> PathBuf {
    let _guard = MAKE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !path.exists() {
        run_make(target);
        assert!(
            path.exists(),
            "`make {target}` did not produce {}",
            path.display()
        );
    }
    path
}

/// Runs `make TARGET` in the workspace root (for targets that are no-ops when up to date);
/// panics with make's output if it fails.
pub fn make(target: &str) {
    let _guard = MAKE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    run_make(target);
}

/// `make -C <root> TARGET`; panics with its output when it fails. Callers hold `MAKE_LOCK`.
fn run_make(target: &str) {
    let out = Command::new("make")
        .arg("-C")
        .arg(root())
        .arg(target)
        .output()
        .expect("running make");
    assert!(
        out.status.success(),
        "`make {target}` failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bundled SmolLM2-135M-Instruct GGUF (`make model`).
pub fn smollm2_gguf() -> PathBuf {
    ensure(
        root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "model",
    )
}

/// The held-out KJV slice (Revelation) used for perplexity (`make data`).
pub fn kjv_heldout() -> PathBuf {
    ensure(root().join(".cache/data/kjv-heldout.txt"), "data")
}

/// The `rrt` binary of the same build profile as the running test, built (or brought up to
/// date, a no-op when it is) once per test process so a test never runs a stale binary.
pub fn rrt_bin() -> PathBuf {
    binaries().join("rrt")
}

/// The `rrt-worker` binary, built like [`rrt_bin`].
pub fn worker_bin() -> PathBuf {
    binaries().join("rrt-worker")
}

/// Builds every binary once per test process, with the same package set as `make build`: a
/// different set would unify features differently and rebuild candle and friends.
fn binaries() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("current exe");
            // target/<profile>/deps/<test> -> target/<profile>/
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_path_buf();
            let profile = profile_dir
                .file_name()
                .and_then(|p| p.to_str())
                .unwrap_or("debug");
            let profile = if profile == "debug" { "dev" } else { profile };
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "--quiet", "--profile", profile]);
            for p in ["rrt-cli", "rrt-worker", "rrt-coordinator", "rrt-router"] {
                cmd.args(["-p", p]);
            }
            let status = cmd.current_dir(root()).status().expect("cargo build");
            assert!(status.success(), "building the binaries failed");
            profile_dir
        })
        .clone()
}

/// The test venv's Python (`make venv` makes it when missing).
pub fn python() -> Command {
    ensure(root().join(".cache/venv/.ready"), "venv");
    Command::new(root().join(".cache/venv/bin/python"))
}

/// Runs `tests/python/SCRIPT ARGS` with the venv's Python off the async runtime and returns the
/// one JSON object it prints (printed for the log); panics with its output if it fails.
pub async fn python_json(script: &str, args: Vec<String>) -> serde_json::Value {
    let script = root().join("tests/python").join(script);
    let out = tokio::task::spawn_blocking(move || {
        python()
            .arg(script)
            .args(args)
            .output()
            .expect("run python")
    })
    .await
    .expect("the python task");
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    println!("{v:#}");
    v
}

/// Runs `rrt ARGS` from the workspace root.
pub fn rrt(args: &[&str]) -> Output {
    Command::new(rrt_bin())
        .args(args)
        .current_dir(root())
        .env_remove("RRT_MODEL")
        .output()
        .expect("running rrt")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits for a condition instead of a fixed time: polls `check` until it gives `Some(value)`
/// and returns the value, or panics naming `what` once `timeout` has passed (a bound on a hang,
/// not a speed requirement: tests pass on a loaded machine).
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "waited {timeout:?} for {what}, in vain"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
