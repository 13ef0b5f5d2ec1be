//! `deploy/` checked offline: every Kubernetes manifest of the kustomize base validates
//! strictly against the Kubernetes 1.32 schemas (unknown fields are errors), and the kustomization
//! lists every manifest in the folder. (The dashboard's and the rules' metric names are checked
//! against a running cluster's exports in `cluster.rs`.)

#![forbid(unsafe_code)]

use std::process::Command;

use rrt_tests::{ensure, root};

fn validator() -> std::path::PathBuf {
    ensure(root().join(".cache/venv/.ready"), "venv");
    root().join(".cache/venv/bin/kubernetes-validate")
}

fn manifests() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    v.sort();
    v
}

#[test]
fn every_manifest_validates_strictly_against_kubernetes_1_32() {
    let files = manifests();
    assert!(files.len() >= 6, "{files:?}");
    for f in &files {
        let out = Command::new(validator())
            .args(["--strict", "-k", "1.32.0"])
            .arg(root().join("deploy/kubernetes").join(f))
            .output()
            .expect("run kubernetes-validate");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("ERROR"),
            "{f}:\n{text}"
        );
        assert!(text.contains("passed"), "{f} validated nothing:\n{text}");
    }
}

#[test]
fn a_typo_in_a_manifest_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("worker.yaml");
    let text = std::fs::read_to_string(root().join("deploy/kubernetes/worker.yaml")).unwrap();
    std::fs::write(
        &bad,
        text.replace(
            "terminationGracePeriodSeconds",
            "terminationGracePeriodSecond",
        ),
    )
    .unwrap();
    let out = Command::new(validator())
        .args(["--strict", "-k", "1.32.0"])
        .arg(&bad)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() || text.contains("ERROR"), "{text}");
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let k = std::fs::read_to_string(root().join("deploy/kubernetes/kustomization.yaml")).unwrap();
    for f in manifests() {
        assert!(
            k.contains(&format!("- {f}")),
            "{f} is not in kustomization.yaml"
        );
    }
}

/// The Prometheus Operator's ServiceMonitor (a CRD: no built-in schema to validate it against)
/// checked for what would make it scrape nothing: its kind and API version, a selector that
/// matches every rrt Service, and an endpoint port those Services name.
#[test]
fn the_service_monitor_selects_every_service_by_a_port_they_have() {
    let script = r#"
import sys, yaml
mon = yaml.safe_load(open(sys.argv[1]))
assert mon["apiVersion"] == "monitoring.coreos.com/v1" and mon["kind"] == "ServiceMonitor", mon
want = mon["spec"]["selector"]["matchLabels"]
ports = {e["port"] for e in mon["spec"]["endpoints"]}
assert mon["metadata"]["namespace"] in mon["spec"]["namespaceSelector"]["matchNames"]
services = []
for f in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(f)):
        if doc and doc["kind"] == "Service":
            services.append(doc["metadata"]["name"])
            labels = doc["metadata"].get("labels", {})
            assert all(labels.get(k) == v for k, v in want.items()), (doc["metadata"]["name"], labels)
            named = {p["name"] for p in doc["spec"]["ports"]}
            assert ports <= named, (doc["metadata"]["name"], named)
assert sorted(services) == ["rrt-coordinator", "rrt-router", "rrt-worker"], services
print("ok", services)
"#;
    let k = root().join("deploy/kubernetes");
    let out = rrt_tests::python()
        .args(["-c", script])
        .arg(root().join("deploy/prometheus/servicemonitor.yaml"))
        .args(["coordinator.yaml", "worker.yaml", "router.yaml"].map(|f| k.join(f)))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
