//! The deployment files of `deploy/`: the replicas' routes validate (and the Kubernetes
//! ConfigMap holds the same file), the Compose file is a valid Compose file, HAProxy accepts
//! its config, and the Kubernetes manifests pass `kubernetes-validate` against the API's
//! schemas, with a grace period that covers the drain.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn yaml(path: &Path) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `switchyard validate` on `file`, with the admin token the files read from the environment.
fn validate(file: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("validate")
        .arg(file)
        .env(
            "SWITCHYARD_ADMIN_TOKEN",
            "a-token-of-at-least-16-characters",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The routes.yaml of the ConfigMap.
fn configmap_routes() -> String {
    let cm = yaml(&deploy().join("kubernetes/configmap.yaml"));
    cm["data"]["routes.yaml"].as_str().unwrap().to_string()
}

#[test]
fn the_replicas_routes_validate_and_the_configmap_holds_the_same_file() {
    validate(&deploy().join("routes.yaml"));
    let dir = tempfile::tempdir().unwrap();
    let in_configmap = dir.path().join("routes.yaml");
    std::fs::write(&in_configmap, configmap_routes()).unwrap();
    validate(&in_configmap);
    assert_eq!(
        yaml(&in_configmap),
        yaml(&deploy().join("routes.yaml")),
        "deploy/routes.yaml and the ConfigMap's routes.yaml differ"
    );
}

#[test]
fn the_compose_file_is_a_valid_compose_file_with_health_checks() {
    let text = std::fs::read_to_string(deploy().join("compose.yaml")).unwrap();
    let compose = compose_spec::Compose::options()
        .apply_merge(true)
        .from_yaml_str(&text)
        .unwrap_or_else(|e| panic!("deploy/compose.yaml: {e}"));
    compose.validate_all().unwrap();
    let names: Vec<String> = compose.services.keys().map(|k| k.to_string()).collect();
    for want in [
        "gateway-a",
        "gateway-b",
        "haproxy",
        "rabbitmq",
        "mosquitto",
        "redis",
    ] {
        let service = compose
            .services
            .iter()
            .find(|(k, _)| k.as_str() == want)
            .unwrap_or_else(|| panic!("no service {want} in {names:?}"))
            .1;
        assert!(service.healthcheck.is_some(), "{want} has no health check");
    }
}

#[test]
fn haproxy_accepts_its_config() {
    let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("HAProxy is not installed: `apt-get install -y haproxy` (or `bash .ci/run`)");
    let out = Command::new(bin)
        .args(["-c", "-f"])
        .arg(deploy().join("haproxy.cfg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_kubernetes_manifests_pass_kubernetes_validate() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy().join("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--no-warn"])
        .args(&files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "kubernetes-validate could not run ({e}); install it with `pip install kubernetes-validate` (or run `bash .ci/run`, which does)"
            )
        });
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The pod's grace period covers the drain and the in-flight requests' grace.
    let routes: serde_yaml::Value = serde_yaml::from_str(&configmap_routes()).unwrap();
    let secs = |v: &serde_yaml::Value| {
        humantime::parse_duration(v.as_str().unwrap())
            .unwrap()
            .as_secs()
    };
    let drain = secs(&routes["server"]["drain_delay"]) + secs(&routes["server"]["shutdown_grace"]);
    let set = yaml(&deploy().join("kubernetes/statefulset.yaml"));
    let grace = set["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} ≤ drain_delay + shutdown_grace {drain}"
    );
    let probe = &set["spec"]["template"]["spec"]["containers"][0]["readinessProbe"];
    let out_of_rotation =
        probe["periodSeconds"].as_u64().unwrap() * probe["failureThreshold"].as_u64().unwrap();
    assert!(
        out_of_rotation < secs(&routes["server"]["drain_delay"]),
        "the readiness probe takes the pod out of rotation ({out_of_rotation}s) before the drain delay ends"
    );
}
