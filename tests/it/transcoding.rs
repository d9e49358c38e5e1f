//! gRPC transcoding conformance: a table of HTTP requests and the request message
//! `google/api/http.proto` (or, where it is silent, Envoy's transcoder) says the method
//! receives, grouped by class, against a server that answers with what arrived
//! (`tests/fixtures/protos/conformance.proto`). docs/grpc.md records the counts per class.

use http::{Method, StatusCode};

use crate::support::grpc::EchoServer;
use crate::support::*;

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/protos")
}

/// What a case expects: the message the method received, or an error status whose
/// problem+json names a field (or says a phrase).
enum Want {
    Message(serde_json::Value),
    Refused(u16, &'static str),
}

struct Case {
    class: &'static str,
    method: Method,
    path: &'static str,
    body: &'static str,
    want: Want,
}

fn ok(class: &'static str, method: Method, path: &'static str, want: serde_json::Value) -> Case {
    Case {
        class,
        method,
        path,
        body: "",
        want: Want::Message(want),
    }
}

fn refused(
    class: &'static str,
    method: Method,
    path: &'static str,
    status: u16,
    says: &'static str,
) -> Case {
    Case {
        class,
        method,
        path,
        body: "",
        want: Want::Refused(status, says),
    }
}

impl Case {
    fn with_body(mut self, body: &'static str) -> Case {
        self.body = body;
        self
    }
}

fn cases() -> Vec<Case> {
    use serde_json::json;
    let get = Method::GET;
    let post = Method::POST;
    vec![
        // (`DELETE /**` below takes every path: a path no GET or POST template matches is
        // answered 405, naming DELETE.)
        // 1. Wildcards without a variable bind nothing.
        ok("1 wildcards", get.clone(), "/w/v1/x/books", json!({})),
        ok("1 wildcards", get.clone(), "/w/a/b/c", json!({})),
        ok("1 wildcards", get.clone(), "/w/c/x/d/e/f", json!({})),
        ok("1 wildcards", post.clone(), "/x:frob", json!({})),
        refused(
            "1 wildcards",
            get.clone(),
            "/w/v1/x/y/books",
            405,
            "only: DELETE",
        ),
        // 2. `**` matches zero or more segments.
        ok("2 zero segments", Method::DELETE, "/", json!({})),
        ok("2 zero segments", Method::DELETE, "/any/thing", json!({})),
        // Shadowed by the more specific `/m/a/**/b`, which does not match: `/**` still does.
        ok("2 zero segments", Method::DELETE, "/m/a/x/y/c", json!({})),
        ok("2 zero segments", get.clone(), "/w/a", json!({})),
        ok(
            "2 zero segments",
            get.clone(),
            "/z/v1/o",
            json!({ "name": "o" }),
        ),
        ok(
            "2 zero segments",
            get.clone(),
            "/z/v1/o/p/q",
            json!({ "name": "o/p/q" }),
        ),
        refused(
            "2 zero segments",
            get.clone(),
            "/z/v1/op",
            405,
            "only: DELETE",
        ),
        // 3. `**` before more segments or a verb.
        ok("3 inner **", get.clone(), "/m/a/b", json!({})),
        ok("3 inner **", get.clone(), "/m/a/x/y/b", json!({})),
        refused("3 inner **", get.clone(), "/m/a/x/y/c", 405, "only: DELETE"),
        ok(
            "3 inner **",
            get.clone(),
            "/m/p/q/c:frob",
            json!({ "name": "p/q" }),
        ),
        ok(
            "3 inner **",
            get.clone(),
            "/m/v1/shelves/s1/books/b2/x/chapters",
            json!({ "book": { "name": "shelves/s1/books/b2/x" } }),
        ),
        ok(
            "3 inner **",
            get.clone(),
            "/m/v1/shelves/s1/books/chapters",
            json!({ "book": { "name": "shelves/s1/books" } }),
        ),
        // 4. Percent-decoding.
        ok(
            "4 decoding",
            get.clone(),
            "/p/v1/items/a%2Fb%20c",
            json!({ "id": "a/b c" }),
        ),
        ok(
            "4 decoding",
            get.clone(),
            "/p/v1/items/caf%C3%A9",
            json!({ "id": "café" }),
        ),
        ok(
            "4 decoding",
            get.clone(),
            "/p/v1/files/a%2Fb/c%20d",
            json!({ "name": "files/a%2Fb/c d" }),
        ),
        ok(
            "4 decoding",
            get.clone(),
            "/p/v1/shelves/s%2F1%3F/books",
            json!({ "name": "shelves/s%2F1?" }),
        ),
        refused("4 decoding", get.clone(), "/p/v1/items/a%00b", 400, "NUL"),
        refused("4 decoding", get.clone(), "/p/v1/items/a%0Ab", 400, "LF"),
        // 5. Verbs.
        ok(
            "5 verbs",
            post.clone(),
            "/v/foo/1:verb:subverb",
            json!({ "id": "1" }),
        ),
        refused(
            "5 verbs",
            post.clone(),
            "/v/foo/1:verb",
            405,
            "only: DELETE",
        ),
        ok(
            "5 verbs",
            get.clone(),
            "/v/things/x:watch",
            json!({ "id": "x" }),
        ),
        ok(
            "5 verbs",
            get.clone(),
            "/v/things/a/b:watch",
            json!({ "id": "a/b" }),
        ),
        ok(
            "5 verbs",
            get.clone(),
            "/v/things/x:other",
            json!({ "name": "x:other" }),
        ),
        ok(
            "5 verbs",
            get.clone(),
            "/v/things/x",
            json!({ "name": "x" }),
        ),
        ok("5 verbs", get.clone(), "/v/things:batchGet", json!({})),
        // 6. Query parameters.
        ok(
            "6 query",
            get.clone(),
            "/q/1?data=aGk%3D",
            json!({ "id": "1", "data": "aGk=" }),
        ),
        ok(
            "6 query",
            get.clone(),
            "/q/1?data=aGk",
            json!({ "id": "1", "data": "aGk=" }),
        ),
        ok(
            "6 query",
            get.clone(),
            "/q/1?data=-_8",
            json!({ "id": "1", "data": "+/8=" }),
        ),
        ok(
            "6 query",
            get.clone(),
            "/q/1?ts=2016-01-01T00:00:00Z&d=1.5s&mask=a,b.c&w=3",
            json!({ "id": "1", "ts": "2016-01-01T00:00:00Z", "d": "1.500s", "mask": "a,b.c", "w": 3 }),
        ),
        ok(
            "6 query",
            get.clone(),
            "/q/1?nums=1&nums=2",
            json!({ "id": "1", "nums": [1, 2] }),
        ),
        ok(
            "6 query",
            get.clone(),
            "/q/1?b=2",
            json!({ "id": "1", "b": 2 }),
        ),
        refused(
            "6 query",
            get.clone(),
            "/q/1?name=a&name=b",
            400,
            "is given twice",
        ),
        refused(
            "6 query",
            get.clone(),
            "/q/1?text=a&text=b",
            400,
            "\"field\":\"text\"",
        ),
        refused(
            "6 query",
            get.clone(),
            "/q/1?a=x&b=2",
            400,
            "members of one oneof",
        ),
        refused(
            "6 query",
            get.clone(),
            "/q/1?ts=yesterday",
            400,
            "\"field\":\"ts\"",
        ),
        refused(
            "6 query",
            get.clone(),
            "/q/1?data=%%%",
            400,
            "\"field\":\"data\"",
        ),
        // 7. Bodies naming a scalar field; a scalar response_body.
        ok(
            "7 bodies",
            post.clone(),
            "/b/text/1",
            json!({ "id": "1", "text": "hello" }),
        )
        .with_body(r#""hello""#),
        ok(
            "7 bodies",
            post.clone(),
            "/b/data/1",
            json!({ "id": "1", "data": "aGk=" }),
        )
        .with_body(r#""aGk=""#),
        ok(
            "7 bodies",
            post.clone(),
            "/b/count/1",
            json!({ "id": "1", "count": "42" }),
        )
        .with_body("42"),
        refused(
            "7 bodies",
            post.clone(),
            "/b/text/1",
            400,
            "not one JSON value",
        )
        .with_body(r#""a", "name": "injected""#),
        refused(
            "7 bodies",
            post.clone(),
            "/b/count/1",
            400,
            "\"field\":\"count\"",
        )
        .with_body(r#""many""#),
        ok("7 bodies", get.clone(), "/b/reply/1?text=hi", json!("hi")),
        ok("7 bodies", get.clone(), "/b/reply/1", json!("")),
        // Options at their defaults: `+` is a plus (as in Envoy), unknown query parameters and
        // body fields are refused, enum names are written as declared.
        ok(
            "options",
            get.clone(),
            "/q/1?text=a+b%20c",
            json!({ "id": "1", "text": "a+b c" }),
        ),
        refused(
            "options",
            get.clone(),
            "/q/1?nope=1",
            400,
            "\"field\":\"nope\"",
        ),
        refused(
            "options",
            get.clone(),
            "/q/1?kind=mail",
            400,
            "\"field\":\"kind\"",
        ),
        refused(
            "options",
            post.clone(),
            "/b/all/1",
            400,
            "\"field\":\"bogus\"",
        )
        .with_body(r#"{ "text": "x", "bogus": 1 }"#),
    ]
}

async fn gateway(server: &EchoServer) -> Gateway {
    gateway_with(server, "", "[]").await
}

/// The conformance backend with `transcoding` settings and explicit routes.
async fn gateway_with(server: &EchoServer, transcoding: &str, routes: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
backends:
  conf:
    type: grpc
    endpoints: ["{}"]
    protos: ["{}"]
    import_paths: ["{}"]
    annotated_routes: true
    {transcoding}
routes: {routes}
"#,
        server.url(),
        fixtures().join("conformance.proto").display(),
        fixtures().display()
    ))
    .await
}

async fn echo_server() -> EchoServer {
    let spec: switchyard::config::GrpcBackendSpec = serde_json::from_value(serde_json::json!({
        "endpoints": ["http://127.0.0.1:1"],
        "protos": ["conformance.proto"],
    }))
    .unwrap();
    EchoServer::start(switchyard::backends::grpc::load_descriptors(&spec, &fixtures()).unwrap())
        .await
}

#[tokio::test]
async fn transcoding_options_per_backend_and_per_route() {
    let server = echo_server().await;
    let gw = gateway_with(
        &server,
        "transcoding: { enums_as_numbers: true, case_insensitive_enums: true, ignore_unknown_query_parameters: true, allow_unknown_body_fields: true, query_unescape_plus: true }",
        r#"
  - id: opt
    match: { method: GET, path: "/opt/{id}" }
    backend: conf
    grpc: { method: conf.v1.Conformance/Query, transcoding: { enums_as_numbers: false, emit_defaults: true, proto_names: true } }
"#,
    )
    .await;
    // The backend's settings, on its annotated routes.
    let (s, _, b) = get(&gw.url("/q/1?kind=mail&nope=1&text=a+b")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        json(&b),
        serde_json::json!({ "id": "1", "kind": 1, "text": "a b" })
    );
    let req = request(Method::POST, &gw.url("/b/all/1"))
        .header("content-type", "application/json")
        .body(body(
            r#"{ "text": "x", "bogus": 1, "kind": "note", "nums": [1] }"#,
        ))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        json(&b),
        serde_json::json!({ "id": "1", "text": "x", "kind": 2, "nums": [1] })
    );
    // A route's own settings over the backend's.
    let (s, _, b) = get(&gw.url("/opt/1?kind=Note")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["kind"], "NOTE", "{v}");
    assert_eq!(
        v["display_name"], "",
        "defaults are written, with proto names: {v}"
    );
    assert_eq!(v["flag"], false, "{v}");
    assert!(v.get("displayName").is_none(), "{v}");
}

#[tokio::test]
async fn transcoding_conforms_case_by_case() {
    let server = echo_server().await;
    let gw = gateway(&server).await;
    let mut failures = Vec::new();
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for case in cases() {
        *counts.entry(case.class).or_default() += 1;
        let req = request(case.method.clone(), &gw.url(case.path))
            .header("content-type", "application/json")
            .body(body(case.body))
            .unwrap();
        let (s, _, b) = send(req).await;
        let text = String::from_utf8_lossy(&b);
        let fine = match &case.want {
            Want::Message(want) => {
                s == StatusCode::OK
                    && serde_json::from_slice::<serde_json::Value>(&b)
                        .ok()
                        .as_ref()
                        == Some(want)
            }
            Want::Refused(status, says) => s.as_u16() == *status && text.contains(says),
        };
        if !fine {
            failures.push(format!(
                "[{}] {} {} {}: got {s} {text}",
                case.class, case.method, case.path, case.body
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("conformance cases per class: {counts:?}");
}

#[tokio::test]
async fn routes_show_templates_as_written() {
    let server = echo_server().await;
    let gw = gateway(&server).await;
    let (s, routes) = gw.admin_json("/routes").await;
    assert_eq!(s, 200);
    let paths: Vec<&str> = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["path"].as_str())
        .collect();
    for written in [
        "/v/foo/{id=*}:verb:subverb",
        "/m/v1/{book.name=shelves/*/books/**}/chapters",
        "/w/v1/*/books",
        "/v/things:batchGet",
    ] {
        assert!(paths.contains(&written), "{written} not in {paths:?}");
    }
    assert_eq!(routes["unserved"], serde_json::json!([]), "{routes}");
}
