//! The gRPC bridge against a real gRPC server: JSON in, protobuf over h2c, JSON out; path,
//! query and body mapping; status mapping to problem+json; bad input named by field.

use bytes::Bytes;
use futures_util::StreamExt;
use http::Method;
use http_body_util::BodyExt;

use crate::support::grpc::{GrpcServer, proto_dir};
use crate::support::*;

/// The `backends:` block with the shop service; `more` adds backend keys.
pub(crate) fn shop_backend(server: &str, more: &str) -> String {
    let dir = proto_dir();
    format!(
        r#"
backends:
  shop:
    type: grpc
    endpoints: ["{server}"]
    protos: ["{proto}"]
    import_paths: ["{dir}"]
    {more}
"#,
        proto = dir.join("shop.proto").display(),
        dir = dir.display()
    )
}

pub(crate) fn config(server: &str) -> String {
    config_with(server, "")
}

/// [`config`], with more keys on the backend.
fn config_with(server: &str, backend_keys: &str) -> String {
    format!(
        r#"{}
routes:
  - id: get-order
    match: {{ method: GET, path: "/v1/orders/{{id}}" }}
    backend: shop
    grpc: {{ method: shop.v1.Orders/GetOrder }}
  - id: create-order
    match: {{ method: POST, path: /v1/orders }}
    backend: shop
    grpc: {{ method: shop.v1.Orders/CreateOrder, body: order }}
  - id: cancel-order
    match: {{ method: POST, path: "/v1/orders/{{id}}/cancel" }}
    backend: shop
    grpc: {{ method: shop.v1.Orders/CancelOrder, body: "", metadata_headers: [X-Tenant] }}
  - id: watch-order
    match: {{ method: GET, path: "/v1/orders/{{id}}/watch" }}
    backend: shop
    grpc: {{ method: shop.v1.Orders/WatchOrders }}
  - id: create-order-raw
    match: {{ method: POST, path: /v1/orders/raw }}
    backend: shop
    grpc: {{ method: shop.v1.Orders/CreateOrder, body: "*", proto_names: true, emit_defaults: true }}
"#,
        shop_backend(server, backend_keys)
    )
}

#[tokio::test]
async fn get_maps_path_and_query_and_answers_proto3_json() {
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&config(&server.url())).await;
    let req = request(
        Method::GET,
        &gw.url("/v1/orders/7?verbose=true&status=OPEN"),
    )
    .header("x-request-id", "grpc-rid-1")
    .header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .body(body(""))
    .unwrap();
    let (s, h, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["content-type"], "application/json");
    // The server saw the client's trace continued with the gateway's own span.
    let seen = h["grpc-metadata-x-traceparent-seen"].to_str().unwrap();
    assert!(
        seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && seen.ends_with("-01"),
        "{seen}"
    );
    assert!(!seen.contains("00f067aa0ba902b7"), "{seen}");
    assert_eq!(
        h["grpc-metadata-x-order-version"], "3",
        "response metadata becomes headers"
    );
    let v = json(&b);
    assert_eq!(v["id"], "7");
    assert_eq!(v["region"], "eu");
    assert_eq!(
        v["quantity"], "42",
        "64-bit integers are strings in proto3 JSON"
    );
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(v["status"], "SHIPPED");
    assert_eq!(
        v["note"], "rid=grpc-rid-1;timeout=true;verbose=true;status=1",
        "correlation ID and deadline travel as metadata; query parameters and enums by name map"
    );
    // Enum by number works too.
    let (s, _, b) = get(&gw.url("/v1/orders/8?status=2")).await;
    assert_eq!(s, 200);
    assert!(json(&b)["note"].as_str().unwrap().ends_with("status=2"));
}

#[tokio::test]
async fn post_maps_the_body_to_a_field_or_the_whole_message() {
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&config(&server.url())).await;
    let req = request(Method::POST, &gw.url("/v1/orders"))
        .header("content-type", "application/json")
        .body(body(r#"{"region":"us","quantity":"5"}"#))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(
        (
            v["id"].as_str(),
            v["region"].as_str(),
            v["quantity"].as_str()
        ),
        (Some("new-1"), Some("us"), Some("5"))
    );

    // body: "*" with original field names accepted, proto names and defaults in the answer.
    let req = request(Method::POST, &gw.url("/v1/orders/raw"))
        .body(body(
            r#"{"order":{"region":"ap","quantity":2},"request_note":"gift"}"#,
        ))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["note"], "gift");
    assert_eq!(v["region"], "ap");
    assert_eq!(v["tags"], serde_json::json!([]), "defaults are emitted");
    assert!(v.get("created").is_some() || v.get("status").is_some());

    // Allow-listed headers travel as metadata.
    let req = request(Method::POST, &gw.url("/v1/orders/5/cancel"))
        .header("x-tenant", "acme")
        .body(body(""))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["note"], "cancelled for acme");
    // `body: ""` refuses a body.
    let req = request(Method::POST, &gw.url("/v1/orders/5/cancel"))
        .body(body("{}"))
        .unwrap();
    assert_eq!(send(req).await.0, 400);
}

#[tokio::test]
async fn grpc_status_becomes_problem_json_with_the_code() {
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&config(&server.url())).await;
    for (id, http, code, name) in [
        ("missing", 404, 5, "NOT_FOUND"),
        ("bad", 400, 3, "INVALID_ARGUMENT"),
        ("down", 503, 14, "UNAVAILABLE"),
    ] {
        let (s, h, b) = get(&gw.url(&format!("/v1/orders/{id}"))).await;
        assert_eq!(s, http, "{id}: {}", String::from_utf8_lossy(&b));
        assert_eq!(h["content-type"], "application/problem+json");
        let v = json(&b);
        assert_eq!(v["grpc_code"], code);
        assert_eq!(v["grpc_status"], name);
        assert_eq!(v["type"], "urn:switchyard:problem:grpc-status");
    }
    let (_, _, b) = get(&gw.url("/v1/orders/missing")).await;
    assert!(
        json(&b)["detail"]
            .as_str()
            .unwrap()
            .contains("order missing does not exist")
    );
    // The google.rpc.Status details the server sent, decoded to JSON.
    let (_, _, b) = get(&gw.url("/v1/orders/bad")).await;
    let details = &json(&b)["details"];
    assert_eq!(
        details[0]["@type"], "type.googleapis.com/google.rpc.BadRequest",
        "{details}"
    );
    assert_eq!(details[0]["fieldViolations"][0]["field"], "id", "{details}");
    assert_eq!(
        details[0]["fieldViolations"][0]["description"], "digits only",
        "{details}"
    );
    // Server errors in a row open the backend's breaker: then calls are refused at once.
    let mut opened = None;
    for i in 0..20 {
        let (s, _, b) = get(&gw.url("/v1/orders/code-13")).await;
        if json(&b)["type"] == "urn:switchyard:problem:circuit-open" {
            assert_eq!(s, 503);
            opened = Some(i);
            break;
        }
        assert_eq!(s, 500, "{}", String::from_utf8_lossy(&b));
    }
    assert!(opened.is_some_and(|i| i >= 1), "{opened:?}");
    // Every code the server can send, mapped as google/rpc/code.proto says (with the breaker
    // off: a run of 5xx answers would open it, which is its job).
    let gw = Gateway::start(&config_with(&server.url(), "breaker: { enabled: false }")).await;
    for (code, http, name) in [
        (1, 499, "CANCELLED"),
        (2, 500, "UNKNOWN"),
        (3, 400, "INVALID_ARGUMENT"),
        (4, 504, "DEADLINE_EXCEEDED"),
        (5, 404, "NOT_FOUND"),
        (6, 409, "ALREADY_EXISTS"),
        (7, 403, "PERMISSION_DENIED"),
        (8, 429, "RESOURCE_EXHAUSTED"),
        (9, 400, "FAILED_PRECONDITION"),
        (10, 409, "ABORTED"),
        (11, 400, "OUT_OF_RANGE"),
        (12, 501, "UNIMPLEMENTED"),
        (13, 500, "INTERNAL"),
        (14, 503, "UNAVAILABLE"),
        (15, 500, "DATA_LOSS"),
        (16, 401, "UNAUTHENTICATED"),
    ] {
        let (s, _, b) = get(&gw.url(&format!("/v1/orders/code-{code}"))).await;
        assert_eq!(s, http, "code {code}: {}", String::from_utf8_lossy(&b));
        let v = json(&b);
        assert_eq!(
            (v["grpc_code"].as_i64(), v["grpc_status"].as_str()),
            (Some(code), Some(name)),
            "{v}"
        );
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("asked for status {code}")),
            "{v}"
        );
    }
}

#[tokio::test]
async fn bad_input_is_a_400_naming_the_field() {
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&config(&server.url())).await;
    let cases = [
        ("/v1/orders", r#"{"regoin":"us"}"#, "regoin"),
        ("/v1/orders", r#"{"quantity":"lots"}"#, "quantity"),
        (
            "/v1/orders/raw",
            r#"{"order":{"tags":"not-a-list"}}"#,
            "order.tags",
        ),
        ("/v1/orders/raw", r#"{"order": "#, ""),
    ];
    for (path, payload, field) in cases {
        let req = request(Method::POST, &gw.url(path))
            .body(body(payload))
            .unwrap();
        let (s, h, b) = send(req).await;
        assert_eq!(s, 400, "{payload}: {}", String::from_utf8_lossy(&b));
        assert_eq!(h["content-type"], "application/problem+json");
        let v = json(&b);
        if !field.is_empty() {
            assert!(
                v["field"].as_str().unwrap_or("").contains(field),
                "{payload}: {v}"
            );
        }
    }
    for (query, field) in [
        ("bogus=1", "bogus"),
        ("verbose=maybe", "verbose"),
        ("status=LOST", "status"),
    ] {
        let (s, _, b) = get(&gw.url(&format!("/v1/orders/7?{query}"))).await;
        assert_eq!(s, 400, "{query}");
        assert_eq!(json(&b)["field"], field, "{query}");
    }
    assert_eq!(server.calls(), 0, "nothing malformed reached the server");
}

#[tokio::test]
async fn a_server_that_is_down_gets_503_and_unknown_methods_are_rejected_at_load() {
    let dead = free_port().await;
    let gw = Gateway::start(&config(&format!("http://{dead}"))).await;
    let (s, h, b) = get(&gw.url("/v1/orders/7")).await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        json(&b)["type"],
        "urn:switchyard:problem:backend-unavailable"
    );
    assert!(h.contains_key("retry-after"));

    // A method that is not in the descriptors, and a streaming method: the reload is rejected
    // with the reason and the old routes keep serving.
    for (bad, why) in [
        ("shop.v1.Orders/GetOrderz", "has no method `GetOrderz`"),
        ("shop.v1.Orders/Unknown", "has no method `Unknown`"),
    ] {
        let text = config(&format!("http://{dead}"))
            .replace("shop.v1.Orders/GetOrder }", &format!("{bad} }}"));
        std::fs::write(gw.config_path(), text).unwrap();
        let (s, b) = gw.reload().await;
        assert_eq!(s, 422);
        assert!(
            String::from_utf8_lossy(&b).contains(why),
            "{}",
            String::from_utf8_lossy(&b)
        );
    }
}

/// A reload that leaves the backend alone keeps its HTTP/2 connection; one that changes the
/// backend opens a new one.
#[tokio::test]
async fn the_connection_outlives_reloads_that_keep_the_backend() {
    let server = GrpcServer::start().await;
    let proxy = crate::support::amqp::BrokerProxy::start_to(server.addr.to_string()).await;
    // On the shared runtime the backend has one connection per endpoint; per core, one per
    // worker (tests/it/runtimes.rs).
    let text = format!(
        "server: {{ listen: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", runtime: shared }}\n{}",
        config(&format!("http://{}", proxy.addr))
    );
    let gw = Gateway::start(&text).await;
    let call = || async {
        let (s, _, b) = get(&gw.url("/v1/orders/5")).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    };
    call().await;
    call().await;
    assert_eq!(proxy.sessions(), 1);
    // A new route, the same backend.
    let more = format!(
        "{text}  - id: another\n    match: {{ method: GET, path: \"/v9/orders/{{id}}\" }}\n    backend: shop\n    grpc: {{ method: shop.v1.Orders/GetOrder }}\n"
    );
    std::fs::write(gw.config_path(), &more).unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    call().await;
    let (s, _, _) = get(&gw.url("/v9/orders/6")).await;
    assert_eq!(s, 200);
    assert_eq!(proxy.sessions(), 1, "the reload kept the connection");
    // The backend's settings change: a new backend, a new connection.
    let changed = more.replace("import_paths:", "connect_timeout: 3s\n    import_paths:");
    std::fs::write(gw.config_path(), &changed).unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    call().await;
    assert_eq!(proxy.sessions(), 2);
}

/// A connection that dies while a call is under way is a 502 (the server may have acted), not
/// the 503 of a backend that could not be reached, which retries treat as never sent.
#[tokio::test]
async fn a_connection_lost_mid_call_is_a_502() {
    let server = GrpcServer::start().await;
    let proxy = crate::support::amqp::BrokerProxy::start_to(server.addr.to_string()).await;
    let text = format!(
        "{}\nroutes: []\n",
        shop_backend(&format!("http://{}", proxy.addr), "annotated_routes: true")
    );
    let gw = Gateway::start(&text).await;
    let call = tokio::spawn({
        let url = gw.url("/v2/sleep");
        async move { send(request(Method::POST, &url).body(body("\"3s\"")).unwrap()).await }
    });
    // The call is under way once the server has it (it sleeps 3 s): then the connection dies.
    eventually("the call never reached the server", || async {
        if server.calls() >= 1 {
            Ok(())
        } else {
            Err(proxy.sessions())
        }
    })
    .await;
    proxy.cut();
    let (s, _, b) = call.await.unwrap();
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["type"], "urn:switchyard:problem:bad-gateway");
    // The next call connects again.
    let (s, _, b) = get(&gw.url("/v2/orders/3")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
}

/// Calls are spread over a backend's endpoints; one that refuses connections is skipped after
/// its first refusal, and that call is retried on another endpoint.
#[tokio::test]
async fn calls_are_balanced_over_endpoints_and_a_dead_one_is_skipped() {
    let (a, b) = (GrpcServer::start().await, GrpcServer::start().await);
    let dead = free_port().await;
    let endpoints = format!(
        "http://{}\", \"http://{dead}\", \"http://{}",
        a.addr, b.addr
    );
    let text = config(&endpoints).replace(
        "grpc: { method: shop.v1.Orders/GetOrder }",
        "grpc: { method: shop.v1.Orders/GetOrder }\n    retry: { attempts: 3, backoff: 1ms, on: [connect-failure] }",
    );
    let gw = Gateway::start(&text).await;
    for i in 0..30 {
        let (s, _, body) = get(&gw.url(&format!("/v1/orders/{i}"))).await;
        assert_eq!(s, 200, "call {i}: {}", String::from_utf8_lossy(&body));
    }
    let (ca, cb) = (
        a.calls.load(std::sync::atomic::Ordering::SeqCst),
        b.calls.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert_eq!(ca + cb, 30);
    assert!(ca >= 10 && cb >= 10, "calls {ca} and {cb}");
    // The dead endpoint cost one retry: after its refusal it was ejected.
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&m);
    let retries: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("switchyard_retries_total") && l.contains("get-order"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(retries, 1.0, "{metrics}");
}

#[tokio::test]
async fn annotated_methods_become_routes() {
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&annotated(&server, "")).await;
    let (s, _, b) = get(&gw.url("/v2/orders/11")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["id"], "11");
    // additional_bindings with a `{field=pattern}` variable.
    let (s, _, b) = get(&gw.url("/v2/regions/us/orders/12")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        (json(&b)["id"].as_str(), json(&b)["region"].as_str()),
        (Some("12"), Some("regions/us"))
    );
    // body: "order"
    let req = request(Method::POST, &gw.url("/v2/orders"))
        .body(body(r#"{"region":"sa","quantity":1}"#))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["region"], "sa");
    // A custom verb.
    let req = request(Method::POST, &gw.url("/v2/orders/13:cancel"))
        .body(body(""))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        (json(&b)["id"].as_str(), json(&b)["note"].as_str()),
        (Some("13"), Some("cancelled"))
    );
    // google.api.HttpBody: a reply passes through with its content type, and a request body
    // fills the `label` field as it is (PUT, `body: "label"`).
    let (s, h, b) = get(&gw.url("/v2/orders/14/label")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["content-type"], "text/plain; charset=utf-8");
    assert_eq!(&b[..], b"SHIP ORDER 14\n");
    let req = request(Method::PUT, &gw.url("/v2/orders/15/label"))
        .header("content-type", "application/zpl")
        .body(body("^XA^FDhello^XZ"))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        (json(&b)["id"].as_str(), json(&b)["note"].as_str()),
        (
            Some("15"),
            Some("label application/zpl, 14 bytes: ^XA^FDhello^XZ")
        )
    );
    // Wrong method on an annotated path.
    let (s, h, _) = send(
        request(Method::DELETE, &gw.url("/v2/orders/13"))
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 405);
    assert_eq!(h["allow"], "GET, HEAD");
    // The generated routes are listed by the admin API.
    let (_, v) = gw.admin_json("/routes").await;
    let ids: Vec<&str> = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    for id in [
        "shop.GetOrder",
        "shop.GetOrder#1",
        "shop.CreateOrder",
        "shop.CancelOrder",
        "shop.PutLabel",
    ] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }
}

#[tokio::test]
async fn server_streaming_as_ndjson_sse_and_a_json_array() {
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&config(&server.url())).await;
    let watch = |id: &str, accept: &str| {
        request(Method::GET, &gw.url(&format!("/v1/orders/{id}/watch")))
            .header("accept", accept)
            .body(body(""))
            .unwrap()
    };

    let (s, h, b) = send(watch("w", "application/x-ndjson")).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "application/x-ndjson");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&b)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["note"], "update 3");

    let (s, h, b) = send(watch("w", "text/event-stream")).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "text/event-stream");
    let text = String::from_utf8_lossy(&b).to_string();
    assert_eq!(text.matches("data: ").count(), 3, "{text}");
    assert!(text.ends_with("\n\n"));

    let (s, h, b) = send(watch("w", "application/json")).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "application/json");
    let arr = json(&b);
    assert_eq!(arr.as_array().unwrap().len(), 3);
    assert_eq!(arr[0]["quantity"], "1");

    // A status mid-stream ends it with an error item; the JSON stays valid.
    let (_, _, b) = send(watch("fail", "application/json")).await;
    let arr = json(&b);
    assert_eq!(arr.as_array().unwrap().len(), 3);
    assert_eq!(arr[2]["error"]["grpc_status"], "ABORTED");
    let (_, _, b) = send(watch("fail", "text/event-stream")).await;
    assert!(String::from_utf8_lossy(&b).contains("event: error\ndata: "));

    // A status before any message is an ordinary problem answer.
    let (s, h, _) = send(watch("none", "application/x-ndjson")).await;
    assert_eq!(s, 404);
    assert_eq!(h["content-type"], "application/problem+json");
    // So is one that comes after the server's response headers but before the first message.
    for accept in [
        "application/json",
        "text/event-stream",
        "application/x-ndjson",
    ] {
        let (s, h, b) = send(watch("late", accept)).await;
        assert_eq!(s, 400, "{accept}: {}", String::from_utf8_lossy(&b));
        assert_eq!(h["content-type"], "application/problem+json");
        assert!(String::from_utf8_lossy(&b).contains("not ready to watch"));
    }
}

#[tokio::test]
async fn descriptors_from_a_binary_descriptor_set() {
    let server = GrpcServer::start().await;
    // What `protoc --include_imports -o shop.pb` would write.
    let dir = tempfile::tempdir().unwrap();
    let spec: switchyard::config::GrpcBackendSpec = serde_json::from_value(serde_json::json!({
        "endpoints": ["http://127.0.0.1:1"],
        "protos": ["shop.proto"],
    }))
    .unwrap();
    let pool = switchyard::backends::grpc::load_descriptors(&spec, &proto_dir()).unwrap();
    std::fs::write(dir.path().join("shop.pb"), pool.encode_to_vec()).unwrap();
    let gw = Gateway::start(&format!(
        r#"
backends:
  shop: {{ type: grpc, endpoints: ["{}"], descriptor_set: "{}" }}
routes:
  - {{ id: get, match: {{ method: GET, path: "/o/{{id}}" }}, backend: shop, grpc: {{ method: shop.v1.Orders/GetOrder }} }}
"#,
        server.url(),
        dir.path().join("shop.pb").display()
    ))
    .await;
    let (s, _, b) = get(&gw.url("/o/3")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["id"], "3");
}

#[tokio::test]
async fn proto_changes_apply_on_reload_and_a_broken_proto_keeps_the_old_routes() {
    let server = GrpcServer::start().await;
    let protos = tempfile::tempdir().unwrap();
    let proto = protos.path().join("shop.proto");
    std::fs::copy(proto_dir().join("shop.proto"), &proto).unwrap();
    let gw = Gateway::start_with(
        &format!(
            r#"
backends:
  shop: {{ type: grpc, endpoints: ["{}"], protos: ["{}"], import_paths: ["{}"] }}
routes:
  - {{ id: get, match: {{ method: GET, path: "/o/{{id}}" }}, backend: shop, grpc: {{ method: shop.v1.Orders/GetOrder }} }}
"#,
            server.url(),
            proto.display(),
            protos.path().display()
        ),
        false,
    )
    .await;
    assert_eq!(get(&gw.url("/o/1")).await.0, 200);
    let text = std::fs::read_to_string(&proto)
        .unwrap()
        .replace("string region = 4;", "string region = 4");
    std::fs::write(&proto, text).unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 422);
    let errors = String::from_utf8_lossy(&b).to_string();
    assert!(errors.contains("shop.proto:"), "{errors}");
    assert_eq!(
        get(&gw.url("/o/2")).await.0,
        200,
        "the old routes keep serving"
    );

    // A valid change takes effect on the next reload: a new request field becomes settable.
    assert_eq!(get(&gw.url("/o/3?channel=web")).await.0, 400);
    let text = std::fs::read_to_string(&proto).unwrap().replace(
        "string region = 4\n",
        "string region = 4;\n  string channel = 5;\n",
    );
    std::fs::write(&proto, text).unwrap();
    let (s, b) = gw.reload().await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(get(&gw.url("/o/3?channel=web")).await.0, 200);
}

#[tokio::test]
async fn well_known_types_maps_oneofs_and_bytes_round_trip_as_proto3_json() {
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&config(&server.url())).await;
    let order = serde_json::json!({
        "region": "eu",
        "quantity": "9007199254740993",
        "created": "2026-11-28T12:00:00Z",
        "holdFor": "90s",
        "coupon": "WINTER",
        "attributes": { "gift": true, "level": 3.5, "tags": ["x"], "none": null },
        "updateMask": "region,holdFor",
        "labels": { "team": "blue" },
        "address": { "street": "1 Main St", "city": "Lyon" },
        "signature": "c2lnbmVk",
        "weightKg": 1.5,
        "status": "OPEN"
    });
    let req = request(Method::POST, &gw.url("/v1/orders"))
        .body(body(order.to_string()))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let mut v = json(&b);
    assert_eq!(v["id"], "new-1");
    v.as_object_mut().unwrap().remove("id");
    assert_eq!(v, order, "every value comes back in its proto3 JSON form");

    // Original (proto) field names are accepted too, and the oneof's other case.
    let req = request(Method::POST, &gw.url("/v1/orders"))
        .body(body(
            r#"{"hold_for":"1.5s","pickup_store":"LYS-2","weight_kg":2}"#,
        ))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(
        (
            v["holdFor"].as_str(),
            v["pickupStore"].as_str(),
            v["weightKg"].as_f64()
        ),
        (Some("1.500s"), Some("LYS-2"), Some(2.0))
    );

    // Values that do not fit are named.
    for (payload, field) in [
        (r#"{"created":"yesterday"}"#, "created"),
        (r#"{"quantity":"99999999999999999999"}"#, "quantity"),
        (r#"{"signature":"***"}"#, "signature"),
        (r#"{"status":"LOST"}"#, "status"),
        // Two cases of one oneof: the message holding the oneof is named.
        (r#"{"pickupStore":"a","address":{"city":"b"}}"#, "order"),
    ] {
        let req = request(Method::POST, &gw.url("/v1/orders"))
            .body(body(payload))
            .unwrap();
        let (s, _, b) = send(req).await;
        assert_eq!(s, 400, "{payload}: {}", String::from_utf8_lossy(&b));
        let f = json(&b)["field"].as_str().unwrap_or("").to_string();
        assert!(f.contains(field), "{payload}: field {f:?}");
    }
}

fn annotated(server: &GrpcServer, extra: &str) -> String {
    format!(
        "{}\nroutes: {}\n",
        shop_backend(&server.url(), "annotated_routes: true"),
        if extra.is_empty() { "[]" } else { extra }
    )
}

#[tokio::test]
async fn client_streaming_from_an_ndjson_body_sent_line_by_line() {
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&annotated(&server, "")).await;
    let import = |b: TestBody| {
        request(Method::POST, &gw.url("/v2/orders:import"))
            .header("content-type", "application/x-ndjson")
            .body(b)
            .unwrap()
    };
    let lines =
        "{\"id\":\"a\",\"quantity\":\"2\"}\n\n{\"id\":\"b\",\"quantity\":3}\n{\"id\":\"c\"}";
    let (s, _, b) = send(import(body(lines))).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["count"], 3);
    assert_eq!(v["totalQuantity"], "5");
    assert_eq!(v["ids"], serde_json::json!(["a", "b", "c"]));

    // Messages go out as their lines arrive: the server holds the first before the body ends.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = http_body_util::StreamBody::new(
        tokio_stream_from(rx).map(|b| Ok::<_, std::convert::Infallible>(http_body::Frame::data(b))),
    );
    let call = tokio::spawn(send(import(BodyExt::boxed(stream))));
    tx.send(Bytes::from_static(b"{\"id\":\"x\",\"quantity\":\"1\"}\n"))
        .await
        .unwrap();
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while server.streamed.load(std::sync::atomic::Ordering::SeqCst) < 4 {
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "the first line reached the server before the body ended"
    );
    tx.send(Bytes::from_static(b"{\"id\":\"y\"}\n"))
        .await
        .unwrap();
    drop(tx);
    let (s, _, b) = call.await.unwrap();
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["ids"], serde_json::json!(["x", "y"]));

    // A bad line is a 400 naming the line and the field; the call is cancelled, not completed.
    let (s, _, b) = send(import(body("{\"id\":\"a\"}\n{\"quantity\":\"lots\"}\n"))).await;
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    let v = json(&b);
    assert_eq!(v["field"], "quantity");
    assert!(v["detail"].as_str().unwrap().starts_with("Line 2:"), "{v}");
    let (s, _, b) = send(import(body("not json\n"))).await;
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));

    // A status from the server maps like any other.
    let (s, _, b) = send(import(body("{\"id\":\"reject\"}\n"))).await;
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["grpc_status"], "FAILED_PRECONDITION");
}

/// A stream of the receiver's items (tokio-stream is not a dependency).
fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Bytes> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
}

#[tokio::test]
async fn empty_any_and_a_deadline_shorter_than_a_slow_method() {
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&annotated(
        &server,
        r#"
  - id: sleep-briefly
    match: { method: POST, path: /short-sleep }
    backend: shop
    timeout: 300ms
    grpc: { method: shop.v1.Orders/Sleep, body: "*" }"#,
    ))
    .await;
    // A Duration as the whole body; google.protobuf.Empty back as `{}`.
    let req = request(Method::POST, &gw.url("/v2/sleep"))
        .body(body("\"0.010s\""))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b), serde_json::json!({}));

    // The route's deadline travels as grpc-timeout and ends the call with a 504.
    let started = std::time::Instant::now();
    let req = request(Method::POST, &gw.url("/short-sleep"))
        .body(body("\"5s\""))
        .unwrap();
    let (s, h, b) = send(req).await;
    assert_eq!(s, 504, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["content-type"], "application/problem+json");
    assert!(started.elapsed() < std::time::Duration::from_secs(4));

    // Any with a type from the loaded descriptors round-trips with its @type.
    let order = serde_json::json!({
        "extra": { "@type": "type.googleapis.com/shop.v1.Address", "street": "2 Quay", "city": "Nantes" }
    });
    let req = request(Method::POST, &gw.url("/v2/orders"))
        .body(body(order.to_string()))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["extra"], order["extra"]);
    // An Any of a type nobody loaded is named.
    let req = request(Method::POST, &gw.url("/v2/orders"))
        .body(body(
            r#"{"extra":{"@type":"type.googleapis.com/no.Such","x":1}}"#,
        ))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    assert!(
        json(&b)["field"].as_str().unwrap_or("").contains("extra"),
        "{}",
        String::from_utf8_lossy(&b)
    );
}

/// A message of `shop.v1.<name>` with string fields set.
pub(crate) fn shop_msg(name: &str, fields: &[(&str, &str)]) -> prost_reflect::DynamicMessage {
    let desc = crate::support::grpc::pool()
        .get_message_by_name(&format!("shop.v1.{name}"))
        .unwrap();
    let mut m = prost_reflect::DynamicMessage::new(desc);
    for (k, v) in fields {
        m.set_field_by_name(k, prost_reflect::Value::String(v.to_string()));
    }
    m
}

fn str_field(m: &prost_reflect::DynamicMessage, name: &str) -> String {
    m.get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test]
async fn native_grpc_clients_pass_through_every_kind_of_method() {
    use prost_reflect::ReflectMessage;
    use switchyard::backends::grpc::codec::DynamicCodec;
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&format!(
        "{}\nroutes: []\n",
        shop_backend(&server.url(), "native_routes: true")
    ))
    .await;
    let channel = tonic::transport::Endpoint::from_shared(gw.url(""))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let order_desc = shop_msg("Order", &[]).descriptor();
    let path =
        |m: &str| -> http::uri::PathAndQuery { format!("/shop.v1.Orders/{m}").parse().unwrap() };
    grpc.ready().await.unwrap();

    // Unary: the reply, its metadata, and the gateway's correlation ID and deadline on the way.
    let resp = grpc
        .unary(
            tonic::Request::new(shop_msg("GetOrderRequest", &[("id", "77")])),
            path("GetOrder"),
            DynamicCodec::new(order_desc.clone()),
        )
        .await
        .unwrap();
    assert_eq!(resp.metadata().get("x-order-version").unwrap(), "3");
    let o = resp.into_inner();
    assert_eq!(str_field(&o, "id"), "77");
    let note = str_field(&o, "note");
    assert!(
        note.contains("timeout=true") && !note.contains("rid=;"),
        "{note}"
    );

    // A status travels as the server sent it.
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(shop_msg("GetOrderRequest", &[("id", "missing")])),
            path("GetOrder"),
            DynamicCodec::new(order_desc.clone()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.message(), "order missing does not exist");

    // Server streaming.
    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(shop_msg("GetOrderRequest", &[("id", "w")])),
            path("WatchOrders"),
            DynamicCodec::new(order_desc.clone()),
        )
        .await
        .unwrap()
        .into_inner();
    let mut notes = vec![];
    while let Some(m) = stream.message().await.unwrap() {
        notes.push(str_field(&m, "note"));
    }
    assert_eq!(notes, ["update 1", "update 2", "update 3"]);

    // Bidirectional: each request answered as it goes.
    grpc.ready().await.unwrap();
    let requests =
        futures_util::stream::iter(["p", "q"].map(|id| shop_msg("GetOrderRequest", &[("id", id)])));
    let mut replies = grpc
        .streaming(
            tonic::Request::new(requests),
            path("TrackOrders"),
            DynamicCodec::new(order_desc.clone()),
        )
        .await
        .unwrap()
        .into_inner();
    let mut seen = vec![];
    while let Some(m) = replies.message().await.unwrap() {
        seen.push(str_field(&m, "note"));
    }
    assert_eq!(seen, ["tracking p", "tracking q"]);

    // The gateway's own refusals are gRPC statuses too: no route for an unknown method.
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(shop_msg("GetOrderRequest", &[])),
            "/shop.v1.Orders/Nope".parse().unwrap(),
            DynamicCodec::new(order_desc.clone()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    assert!(err.message().contains("correlation id"), "{err:?}");

    // JSON to a native path is transcoded; a bidirectional method turns JSON clients away.
    let req = request(Method::POST, &gw.url("/shop.v1.Orders/GetOrder"))
        .body(body(r#"{"id":"5"}"#))
        .unwrap();
    let (s, _, b) = send(req).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["id"], "5");
    let req = request(Method::POST, &gw.url("/shop.v1.Orders/TrackOrders"))
        .body(body(r#"{"id":"5"}"#))
        .unwrap();
    assert_eq!(send(req).await.0, 400);
    // Native routes are listed like any other.
    let (_, routes) = gw.admin_json("/routes").await;
    assert!(
        routes
            .to_string()
            .contains("shop/shop.v1.Orders/TrackOrders"),
        "{routes}"
    );
}

/// gRPC-Web length-prefixed frames: (flags, payload).
fn grpc_web_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = vec![];
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        out.push((b[0], b[5..5 + len].to_vec()));
        b = &b[5 + len..];
    }
    out
}

#[tokio::test]
async fn grpc_web_browser_clients_over_http1_binary_and_text() {
    use base64::Engine;
    use prost::Message;
    use prost_reflect::ReflectMessage;
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&format!(
        "{}\nroutes: []\n",
        shop_backend(&server.url(), "native_routes: true")
    ))
    .await;
    let frame = |id: &str| {
        let payload = shop_msg("GetOrderRequest", &[("id", id)]).encode_to_vec();
        let mut f = vec![0u8];
        f.extend((payload.len() as u32).to_be_bytes());
        f.extend(payload);
        f
    };
    let order = |bytes: &[u8]| {
        prost_reflect::DynamicMessage::decode(shop_msg("Order", &[]).descriptor(), bytes).unwrap()
    };

    // Binary, over HTTP/1.1 (the test client's default).
    let req = request(Method::POST, &gw.url("/shop.v1.Orders/GetOrder"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(body(frame("31")))
        .unwrap();
    let (s, h, b) = send(req).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "application/grpc-web+proto");
    let frames = grpc_web_frames(&b);
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(str_field(&order(&frames[0].1), "id"), "31");
    assert_eq!(frames[1].0, 0x80, "the last frame holds the trailers");
    let trailers = String::from_utf8_lossy(&frames[1].1).to_lowercase();
    assert!(trailers.contains("grpc-status:0"), "{trailers}");

    // Text (base64) both ways.
    let b64 = base64::engine::general_purpose::STANDARD;
    let req = request(Method::POST, &gw.url("/shop.v1.Orders/GetOrder"))
        .header("content-type", "application/grpc-web-text")
        .header("accept", "application/grpc-web-text")
        .body(body(b64.encode(frame("32"))))
        .unwrap();
    let (s, h, b) = send(req).await;
    assert_eq!(s, 200);
    assert_eq!(
        h["content-type"], "application/grpc-web-text+proto",
        "{h:?}"
    );
    // Each frame is encoded on its own, padding included.
    let text = String::from_utf8_lossy(&b).to_string();
    let (mut raw, mut segment) = (vec![], String::new());
    for group in text.as_bytes().chunks(4) {
        segment.push_str(std::str::from_utf8(group).unwrap());
        if group.contains(&b'=') {
            raw.extend(b64.decode(&segment).unwrap());
            segment.clear();
        }
    }
    raw.extend(b64.decode(&segment).unwrap());
    let frames = grpc_web_frames(&raw);
    assert_eq!(str_field(&order(&frames[0].1), "id"), "32", "{frames:?}");

    // An error status reaches the browser as grpc-status, in headers or the trailer frame.
    let req = request(Method::POST, &gw.url("/shop.v1.Orders/GetOrder"))
        .header("content-type", "application/grpc-web+proto")
        .body(body(frame("missing")))
        .unwrap();
    let (s, h, b) = send(req).await;
    assert_eq!(s, 200);
    let trailers = grpc_web_frames(&b)
        .last()
        .map(|f| String::from_utf8_lossy(&f.1).to_lowercase())
        .unwrap_or_default();
    let in_headers = h
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        trailers.contains("grpc-status:5") || in_headers.as_deref() == Some("5"),
        "{h:?} {trailers}"
    );
}

#[tokio::test]
async fn tls_to_the_backend_with_a_private_ca() {
    let ck = rcgen::generate_simple_self_signed(vec!["shop.internal".to_string()]).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let server =
        GrpcServer::start_tls(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg))).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ck.cert.pem()).unwrap();
    let url = format!("https://{}", server.addr);
    let tls = |name: &str| {
        format!(
            "tls: {{ ca: \"{}\", server_name: {name} }}",
            dir.path().join("ca.pem").display()
        )
    };
    let gw = Gateway::start(&format!(
        "{}\nroutes: []\n",
        shop_backend(
            &url,
            &format!("annotated_routes: true\n    {}", tls("shop.internal"))
        )
    ))
    .await;
    let (s, _, b) = get(&gw.url("/v2/orders/9")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["id"], "9");

    // A certificate for another name is refused: a 502 that says so, never a cleartext
    // fallback.
    let gw = Gateway::start(&format!(
        "{}\nroutes: []\n",
        shop_backend(
            &url,
            &format!("annotated_routes: true\n    {}", tls("other.internal"))
        )
    ))
    .await;
    let (s, _, b) = get(&gw.url("/v2/orders/9")).await;
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    let detail = json(&b)["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("for another name"), "{detail}");
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn descriptors_from_server_reflection_v1_and_v1alpha() {
    use crate::support::grpc::Reflection;
    for which in [Reflection::V1, Reflection::V1Alpha] {
        let server = GrpcServer::start_with_reflection(which).await;
        let gw = Gateway::start(&format!(
            r#"
backends:
  shop:
    type: grpc
    endpoints: ["{}"]
    reflection: true
    annotated_routes: true
routes:
  - id: explicit
    match: {{ method: GET, path: "/r/{{id}}" }}
    backend: shop
    grpc: {{ method: shop.v1.Orders/GetOrder }}
"#,
            server.url()
        ))
        .await;
        // Routes from the server's own annotations, and an explicit route, with no proto here.
        let (s, _, b) = get(&gw.url("/v2/orders/21")).await;
        assert_eq!(s, 200, "{which:?}: {}", String::from_utf8_lossy(&b));
        assert_eq!(json(&b)["id"], "21");
        let (s, _, b) = get(&gw.url("/r/22?status=SHIPPED")).await;
        assert_eq!(s, 200, "{which:?}: {}", String::from_utf8_lossy(&b));
        assert!(json(&b)["note"].as_str().unwrap().contains("status=2"));
        // Well-known types resolved locally: a Timestamp in and out.
        let req = request(Method::POST, &gw.url("/v2/orders"))
            .body(body(r#"{"created":"2026-11-28T12:00:00Z","holdFor":"2s"}"#))
            .unwrap();
        let (s, _, b) = send(req).await;
        assert_eq!(s, 200, "{which:?}: {}", String::from_utf8_lossy(&b));
        assert_eq!(json(&b)["created"], "2026-11-28T12:00:00Z");
    }
}

#[tokio::test]
async fn reflection_failures_are_named_and_a_reload_keeps_what_the_server_said() {
    use crate::support::grpc::Reflection;
    // A server without reflection: the load fails, saying so.
    let plain = GrpcServer::start().await;
    let yaml = |url: &str| {
        format!(
            r#"
backends:
  shop:
    type: grpc
    endpoints: ["{url}"]
    reflection: true
    connect_timeout: 500ms
    annotated_routes: true
routes: []
"#
        )
    };
    let err = start_error(&yaml(&plain.url())).await;
    assert!(err.contains("does not offer gRPC reflection"), "{err}");

    // A kept backend whose server went away: the reload applies, the old descriptors stay.
    let server = GrpcServer::start_with_reflection(Reflection::V1).await;
    let addr = server.addr;
    let gw = Gateway::start(&yaml(&server.url())).await;
    assert_eq!(get(&gw.url("/v2/orders/1")).await.0, 200);
    drop(server);
    let (s, b) = gw.reload().await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let back = GrpcServer::start_on(addr).await;
    let (s, _, b) = get(&gw.url("/v2/orders/2")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    drop(back);
}

#[tokio::test]
async fn a_broken_request_body_is_the_clients_fault_on_transcoded_calls() {
    let server = GrpcServer::start().await;
    let gw = Gateway::start(&format!(
        "{}\nroutes: []\n",
        shop_backend(
            &server.url(),
            "annotated_routes: true\n    breaker: { consecutive_failures: 3, open_for: 60s }"
        )
    ))
    .await;
    for path in ["/v2/orders", "/v2/orders:import"] {
        for _ in 0..4 {
            let malformed = format!(
                "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{{\"id\"\r\nzz\r\n"
            );
            let status = crate::hardening::raw_status(&gw, malformed.as_bytes(), false).await;
            assert_eq!(status, Some(400), "{path}");
        }
    }
    let (_, _, m) = get(&gw.admin_url("/metrics")).await;
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains(r#"switchyard_breaker_state{backend="shop"} 0"#),
        "{m}"
    );
    assert!(!m.contains("switchyard_backend_errors_total{"), "{m}");
    let (s, _, _) = get(&gw.url("/v2/orders/7")).await;
    assert_eq!(s, 200);
}
