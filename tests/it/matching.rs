//! Route matching through a real listener: precedence (static > parameter > catch-all),
//! host and header conditions, and path normalisation, table-driven.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

fn route(id: &str, m: &str) -> String {
    format!(
        "  - id: {id}\n    match: {m}\n    backend: up\n    plugins: [ {{ headers: {{ request: {{ set: {{ x-route: {id} }} }} }} }} ]\n"
    )
}

/// Sends a raw HTTP/1.1 request; returns the status and the body.
pub async fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str("host: gw.test\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn precedence_conditions_and_normalisation() {
    let up = Upstream::start().await;
    let mut yaml = format!(
        "backends:\n  up: {{ type: http, endpoints: [\"{}\"] }}\nroutes:\n",
        up.url()
    );
    for (id, m) in [
        ("catchall", r#"{ path: "/users/{*rest}" }"#),
        ("param", r#"{ path: "/users/{id}" }"#),
        ("static", r#"{ path: "/users/me" }"#),
        ("host-a", r#"{ path: "/h", host: a.test }"#),
        ("host-any", r#"{ path: "/h" }"#),
        ("v2", r#"{ path: "/v", headers: { x-version: "2" } }"#),
        ("v1", r#"{ path: "/v" }"#),
        ("files", r#"{ path: "/files/{name}" }"#),
        ("get-only", r#"{ path: "/m", method: [GET, HEAD] }"#),
    ] {
        yaml.push_str(&route(id, m));
    }
    let gw = Gateway::start(&yaml).await;

    // (method, path, headers, expected route or status, expected upstream path)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        &'a str,
        Option<&'a str>,
    );
    let cases: &[Case] = &[
        ("GET", "/users/me", &[], "static", Some("/users/me")),
        ("GET", "/users/42", &[], "param", Some("/users/42")),
        (
            "GET",
            "/users/42/posts/9",
            &[],
            "catchall",
            Some("/users/42/posts/9"),
        ),
        ("GET", "//users//me", &[], "static", Some("/users/me")),
        ("GET", "/users/./me", &[], "static", Some("/users/me")),
        ("GET", "/users/x/../me", &[], "static", Some("/users/me")),
        ("GET", "/users/%6De", &[], "static", Some("/users/me")),
        ("GET", "/users/%2e/me", &[], "static", Some("/users/me")),
        ("GET", "/h", &[("host", "a.test")], "host-a", None),
        ("GET", "/h", &[("host", "A.TEST:8080")], "host-a", None),
        ("GET", "/h", &[("host", "b.test")], "host-any", None),
        ("GET", "/v", &[("x-version", "2")], "v2", None),
        ("GET", "/v", &[("x-version", "3")], "v1", None),
        ("GET", "/v", &[], "v1", None),
        ("GET", "/files/a%2Fb", &[], "files", Some("/files/a%2Fb")),
        ("GET", "/files/a%2fb", &[], "files", Some("/files/a%2Fb")),
        ("GET", "/m", &[], "get-only", None),
        ("POST", "/m", &[], "405", None),
        ("GET", "/nothing", &[], "404", None),
        ("GET", "/users/../../etc", &[], "400", None),
        ("GET", "/users/%2e%2e/%2e%2e/etc", &[], "400", None),
        ("GET", "/users/a%zz", &[], "400", None),
    ];
    for (method, path, headers, want, want_path) in cases {
        let (status, body) = raw(gw.listen, method, path, headers).await;
        if let Ok(code) = want.parse::<u16>() {
            assert_eq!(status, code, "{method} {path}: {body}");
            continue;
        }
        assert_eq!(status, 200, "{method} {path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["headers"]["x-route"], *want, "{method} {path}");
        if let Some(p) = want_path {
            assert_eq!(v["path"], *p, "{method} {path}");
        }
    }
}

#[tokio::test]
async fn encoded_slash_policies() {
    let up = Upstream::start().await;
    for (policy, want_status, want_route) in [
        ("reject", 400, ""),
        ("decode", 200, "nested"),
        ("keep", 200, "one"),
    ] {
        let yaml = format!(
            "server: {{ listen: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", encoded_slash: {policy} }}\nbackends:\n  up: {{ type: http, endpoints: [\"{}\"] }}\nroutes:\n{}{}",
            up.url(),
            route("one", r#"{ path: "/f/{name}" }"#),
            route("nested", r#"{ path: "/f/{a}/{b}" }"#),
        );
        let gw = Gateway::start(&yaml).await;
        let (status, body) = raw(gw.listen, "GET", "/f/a%2Fb", &[]).await;
        assert_eq!(status, want_status, "{policy}: {body}");
        if want_status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["headers"]["x-route"], want_route, "{policy}");
        }
    }
}
