//! The `switchyard` command: `validate` exit codes and messages on a set of broken files, the
//! repository's routes.yaml and every example validating, and `schema` (whose every key
//! docs/config.md must name).

use std::path::Path;
use std::process::Command;

fn switchyard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn broken_files_exit_64_with_file_line_column() {
    let dir = root().join("tests/fixtures/invalid");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let want = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("# expect: ")
            .expect("first line is `# expect: …`");
        let out = switchyard().arg("validate").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{}: {stderr}", path.display());
        let expected = if want.starts_with(|c: char| c.is_ascii_digit()) {
            format!("{}:{want}", path.display())
        } else {
            want.to_string()
        };
        assert!(
            stderr.contains(&expected),
            "{}:\n want: {expected}\n got: {stderr}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 10);
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.yaml");
    std::fs::write(
        &path,
        "backends:\n  up: { type: http, endpoints: [\"http://127.0.0.1:9\"] }\nroutes:\n  - id: a\n    match: { path: /a, method: get }\n    backend: nope\n  - id: a\n    match: { path: /b }\n    backend: up\n",
    )
    .unwrap();
    let out = switchyard().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("many.yaml:5:32: route `a`: method `get` must be written in capitals"),
        "{stderr}"
    );
    assert!(
        stderr.contains("many.yaml:6:14: route `a`: backend `nope` is not defined"),
        "{stderr}"
    );
    assert!(
        stderr.contains("many.yaml:7:9: route `a`: duplicate route id"),
        "{stderr}"
    );
    assert!(stderr.contains("3 problem(s) found"), "{stderr}");
}

#[test]
fn a_misspelt_key_names_the_one_meant() {
    let path = root().join("tests/fixtures/invalid/misspelt-key.yaml");
    let out = switchyard().arg("validate").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("; did you mean `timeout`?"), "{stderr}");
}

#[test]
fn every_build_problem_is_reported_at_once_at_its_setting() {
    // Problems found only by building (descriptors, methods, fields): every backend and every
    // route is built, and each problem is placed at the setting it is about.
    let path = root().join("tests/fixtures/invalid/build-problems.yaml");
    let out = switchyard().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let at = |rest: &str| format!("{}:{rest}", path.display());
    for want in [
        at("4:3: backend `gone`: "),
        at("10:21: route `one`: service `spec.v1.Messaging` has no method `NoSuchMethod`"),
        at("14:57: route `two`: `body: nofield`: spec.v1.GetMessageRequest has no field"),
    ] {
        assert!(stderr.contains(&want), "want {want}\n got: {stderr}");
    }
    assert!(stderr.contains("no-such.proto: not found"), "{stderr}");
    assert!(
        !stderr.contains("route `three`"),
        "a route of a broken backend only repeats its backend's problem: {stderr}"
    );
    assert!(stderr.contains("3 problem(s) found"), "{stderr}");
}

#[test]
fn repository_routes_and_examples_validate() {
    let mut files = vec![root().join("routes.yaml")];
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(p);
        }
    }
    assert!(files.len() >= 2, "examples/ holds route files");
    for f in files {
        let out = switchyard().arg("validate").arg(&f).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn schema_is_json_schema_of_the_config() {
    let out = switchyard().arg("schema").output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["$schema"].is_string());
    assert!(v["properties"]["routes"].is_object());
    assert!(v["properties"]["backends"].is_object());
}

#[test]
fn run_with_invalid_config_exits_64() {
    let path = root().join("tests/fixtures/invalid/undefined-backend.yaml");
    let out = switchyard()
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// Every key the JSON Schema knows, wherever it sits.
fn schema_keys(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == "properties"
                    && let Some(props) = x.as_object()
                {
                    out.extend(props.keys().cloned());
                }
                schema_keys(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| schema_keys(x, out)),
        _ => {}
    }
}

#[test]
fn docs_config_md_names_every_key_of_the_schema() {
    let out = switchyard().arg("schema").output().unwrap();
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    schema_keys(&schema, &mut keys);
    assert!(keys.len() > 100, "the schema lists {} keys", keys.len());
    let doc = std::fs::read_to_string(root().join("docs/config.md")).unwrap();
    // A key is documented when it appears as code: `key`, `parent.key` or `key.child`.
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            ["`", "."].iter().all(|before| {
                ["`", ".", ",", " ", "["]
                    .iter()
                    .all(|after| !doc.contains(&format!("{before}{k}{after}")))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "docs/config.md does not name these routes.yaml keys: {missing:?}"
    );
}

#[test]
fn a_file_over_the_size_limit_is_refused_and_the_limit_can_be_raised() {
    let routes = root().join("routes.yaml");
    let out = switchyard()
        .args(["--max-config-size", "1KiB", "validate"])
        .arg(&routes)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("larger than the 1024-byte limit"),
        "{stderr}"
    );
    let out = switchyard()
        .args(["validate", "--max-config-size", "1MiB"])
        .arg(&routes)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_missing_file_exits_66_and_a_taken_port_78() {
    for args in [
        &["validate", "nope/routes.yaml"][..],
        &["run", "--config", "nope/routes.yaml"],
    ] {
        let out = switchyard().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(66), "{args:?}: {stderr}");
        assert!(stderr.contains("nope/routes.yaml: not found"), "{stderr}");
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("routes.yaml");
    std::fs::write(
        &config,
        format!(
            "server: {{ listen: \"{}\", admin: \"127.0.0.1:0\" }}\nroutes: []\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let out = switchyard()
        .args(["run", "--no-watch", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn problems_serde_finds_and_problems_validation_finds_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.yaml");
    std::fs::write(
        &path,
        "\
backends:
  up: { type: http, endpoints: [\"http://127.0.0.1:9\"] }
  bad: { type: http, endpoints: \"not a list\" }
routes:
  - id: a
    match: { path: /a }
    backend: up
    colour: blue
  - id: b
    match: { path: /b }
    backend: nope
  - id: c
    match: { path: /c }
    backend: bad
  - id: d
    match: { path: /d }
    backend: up
    timeout: soon
extra: 1
",
    )
    .unwrap();
    let out = switchyard().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        "mixed.yaml:3:",
        "mixed.yaml:8:5: route `a`: `routes[0].colour`: unknown field `colour`",
        "mixed.yaml:11:14: route `b`: backend `nope` is not defined",
        "mixed.yaml:18:14: route `d`: `routes[3].timeout`",
        "mixed.yaml:19:1: `extra`: unknown field `extra`",
    ] {
        assert!(stderr.contains(want), "want {want}\n got: {stderr}");
    }
    // Route c uses the backend that could not be read: not reported a second time.
    assert!(!stderr.contains("route `c`"), "{stderr}");
    assert!(stderr.contains("5 problem(s) found"), "{stderr}");
}

#[test]
fn an_environment_value_cannot_add_keys_to_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(
        &path,
        "backends:\n  up: { type: http, endpoints: [\"http://127.0.0.1:9\"] }\nroutes:\n  - id: \"${SY_TEST_ID}\"\n    match: { path: /a }\n    backend: up\n",
    )
    .unwrap();
    // Interpolated on the raw text, this value would give the route a second backend key.
    let out = switchyard()
        .arg("validate")
        .arg(&path)
        .env("SY_TEST_ID", "a\", backend: evil, x: \"")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok (1 routes, 1 backends)"), "{stdout}");
}

#[test]
fn validate_names_a_broken_scripts_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("plugins")).unwrap();
    std::fs::write(
        dir.path().join("plugins/check.rhai"),
        "fn on_request(req) {\n    let = 1;\n}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("routes.yaml"),
        "backends:\n  up: { type: http, endpoints: [\"http://127.0.0.1:9\"] }\nroutes:\n  - id: checked\n    match: { path: /checked }\n    backend: up\n    plugins:\n      - script: { file: plugins/check.rhai }\n",
    )
    .unwrap();
    let out = switchyard()
        .arg("validate")
        .arg(dir.path().join("routes.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("route `checked`") && err.contains("plugins/check.rhai:2:9:"),
        "{err}"
    );
}
