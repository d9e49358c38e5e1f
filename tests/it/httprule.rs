//! HTTP → gRPC request mapping, table-driven from the examples of googleapis
//! `google/api/http.proto`: each row is an HTTP request and the request message the spec says
//! the method receives, checked against an echo server that answers with what arrived.

use http::Method;

use crate::support::grpc::EchoServer;
use crate::support::*;

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/protos")
}

async fn gateway(server: &EchoServer) -> Gateway {
    Gateway::start(&format!(
        r#"
backends:
  spec:
    type: grpc
    endpoints: ["{}"]
    protos: ["{}"]
    import_paths: ["{}"]
    annotated_routes: true
routes: []
"#,
        server.url(),
        fixtures().join("messaging.proto").display(),
        fixtures().display()
    ))
    .await
}

#[tokio::test]
async fn requests_map_to_messages_as_the_http_rule_spec_says() {
    let spec: switchyard::config::GrpcBackendSpec = serde_json::from_value(serde_json::json!({
        "endpoints": ["http://127.0.0.1:1"],
        "protos": ["messaging.proto"],
    }))
    .unwrap();
    let pool = switchyard::backends::grpc::load_descriptors(&spec, &fixtures()).unwrap();
    let server = EchoServer::start(pool).await;
    let gw = gateway(&server).await;
    let rows: &[(Method, &str, &str, serde_json::Value)] = &[
        // get: "/v1/{name=topics/*/messages/*}"
        (
            Method::GET,
            "/v1/topics/t1/messages/123456",
            "",
            serde_json::json!({ "name": "topics/t1/messages/123456" }),
        ),
        // get: "/v1/messages/{message_id}", query for the rest, nested by dotted name.
        (
            Method::GET,
            "/v1/messages/123456?revision=2&sub.subfield=foo",
            "",
            serde_json::json!({ "messageId": "123456", "revision": "2", "sub": { "subfield": "foo" } }),
        ),
        // Repeated fields as a repeated query parameter: ?param=A&param=B.
        (
            Method::GET,
            "/v1/messages/1?param=A&param=B",
            "",
            serde_json::json!({ "messageId": "1", "param": ["A", "B"] }),
        ),
        // Enums by name or number, booleans, and the lowerCamel name of a field.
        (
            Method::GET,
            "/v1/messages/1?kind=MAIL&urgent=true",
            "",
            serde_json::json!({ "messageId": "1", "kind": "MAIL", "urgent": true }),
        ),
        (
            Method::GET,
            "/v1/messages/1?kind=1&messageId=ignored",
            "",
            serde_json::json!({ "messageId": "1", "kind": "NOTE" }),
        ),
        // additional_bindings: get: "/v1/users/{user_id}/messages/{message_id}"
        (
            Method::GET,
            "/v1/users/me/messages/123456",
            "",
            serde_json::json!({ "userId": "me", "messageId": "123456" }),
        ),
        // patch: "/v1/messages/{message_id}" body: "message"
        (
            Method::PATCH,
            "/v1/messages/123456",
            r#"{ "text": "Hi!" }"#,
            serde_json::json!({ "messageId": "123456", "message": { "text": "Hi!" } }),
        ),
        // patch: "/v2/messages/{message_id}" body: "*"
        (
            Method::PATCH,
            "/v2/messages/123456",
            r#"{ "text": "Hi!" }"#,
            serde_json::json!({ "messageId": "123456", "text": "Hi!" }),
        ),
        // A nested field bound by a `**` variable: several segments, slashes kept.
        (
            Method::GET,
            "/v1/shelves/s1/books/b2/chapters/3",
            "",
            serde_json::json!({ "book": { "name": "shelves/s1/books/b2/chapters/3" } }),
        ),
        // A custom verb.
        (
            Method::POST,
            "/v1/messages/9:undelete",
            "",
            serde_json::json!({ "name": "messages/9" }),
        ),
        // A custom HTTP method.
        (
            Method::from_bytes(b"PURGE").unwrap(),
            "/v1/messages/9/cache",
            "",
            serde_json::json!({ "name": "messages/9" }),
        ),
        // Percent-encoded path values are decoded into the field.
        (
            Method::GET,
            "/v1/topics/t/messages/hello%20world",
            "",
            serde_json::json!({ "name": "topics/t/messages/hello world" }),
        ),
    ];
    for (method, path, payload, want) in rows {
        let req = request(method.clone(), &gw.url(path))
            .body(body(payload.to_string()))
            .unwrap();
        let (s, _, b) = send(req).await;
        assert_eq!(s, 200, "{method} {path}: {}", String::from_utf8_lossy(&b));
        assert_eq!(&json(&b), want, "{method} {path}");
    }

    // response_body: the reply is the named field only.
    let (s, _, b) = get(&gw.url("/v1/texts/5?message.text=hi")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b), serde_json::json!({ "text": "hi" }));

    // What the spec rules out is a 400 naming the field, or not a route at all.
    for (path, field) in [
        ("/v1/messages/1?revision=two", "revision"),
        ("/v1/messages/1?kind=LETTER", "kind"),
        ("/v1/messages/1?nope=1", "nope"),
        ("/v1/messages/1?sub.missing=1", "sub.missing"),
    ] {
        let (s, _, b) = get(&gw.url(path)).await;
        assert_eq!(s, 400, "{path}: {}", String::from_utf8_lossy(&b));
        assert_eq!(json(&b)["field"], field, "{path}");
    }
    assert_eq!(get(&gw.url("/v1/messages")).await.0, 404);
}

#[tokio::test]
async fn an_annotation_that_cannot_be_served_is_said_and_the_others_serve() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("clash.proto"),
        r#"syntax = "proto3";
package clash.v1;
import "google/api/annotations.proto";
message Req { string name = 1; string id = 2; }
service Clash {
  rpc ByName(Req) returns (Req) { option (google.api.http) = { get: "/v1/{name=messages/*}" }; }
  rpc ById(Req) returns (Req) { option (google.api.http) = { get: "/v1/messages/{id}" }; }
  rpc Twice(Req) returns (Req) { option (google.api.http) = { get: "/v1/{name=**}/x/{id=**}" }; }
}
"#,
    )
    .unwrap();
    let spec: switchyard::config::GrpcBackendSpec = serde_json::from_value(serde_json::json!({
        "endpoints": ["http://127.0.0.1:1"],
        "protos": ["clash.proto"],
    }))
    .unwrap();
    let pool = switchyard::backends::grpc::load_descriptors(&spec, dir.path()).unwrap();
    let server = EchoServer::start(pool).await;
    let yaml = format!(
        "backends:\n  c:\n    type: grpc\n    endpoints: [\"{}\"]\n    protos: [\"{}\"]\n    import_paths: [\"{}\"]\n    annotated_routes: true\nroutes: []\n",
        server.url(),
        dir.path().join("clash.proto").display(),
        dir.path().display()
    );
    let gw = Gateway::start(&yaml).await;
    let (s, routes) = gw.admin_json("/routes").await;
    assert_eq!(s, 200);
    let unserved = routes["unserved"].as_array().unwrap();
    let reasons: Vec<(&str, &str)> = unserved
        .iter()
        .map(|u| (u["id"].as_str().unwrap(), u["reason"].as_str().unwrap()))
        .collect();
    assert!(
        reasons.iter().any(|(id, r)| *id == "c.ById"
            && r.contains("can never be told apart from route `c.ByName`")),
        "{routes}"
    );
    assert!(
        reasons
            .iter()
            .any(|(id, r)| *id == "c.Twice" && r.contains("`**` appears more than once")),
        "{routes}"
    );
    // The method that can be served is.
    let (s, _, b) = get(&gw.url("/v1/messages/7")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b), serde_json::json!({ "name": "messages/7" }));
    // `validate` says the same as warnings, and passes.
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: ")
            && stderr.contains("route `c.Twice`")
            && stderr.contains("is not served"),
        "{stderr}"
    );
}
