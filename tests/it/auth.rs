//! Access plugins on real sockets: `cors` (preflights answered from the route's settings,
//! before authentication; headers on actual answers; WebSocket handshakes from other origins
//! refused) and `ip` (allow and deny lists, `X-Forwarded-For` believed only from trusted
//! proxies).

use http::{Method, Request};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{Gateway, Upstream, body, json, send};

fn cors_routes(up: &str) -> String {
    format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{up}"] }}
routes:
  - id: orders
    match: {{ method: [GET, POST, DELETE], path: "/orders" }}
    backend: up
    plugins:
      - api_key: {{ keys: ["0123456789abcdef"] }}
      - cors:
          origins: ["https://app.example.com", "https://*.example.org"]
          methods: [GET, POST]
          headers: [content-type, x-api-key]
          expose_headers: [x-request-id]
          credentials: true
          max_age: 10m
  - id: plain
    match: {{ method: GET, path: "/plain" }}
    backend: up
"#
    )
}

fn preflight(
    gw: &Gateway,
    path: &str,
    origin: &str,
    method: &str,
    headers: &str,
) -> Request<crate::support::TestBody> {
    let mut r = Request::builder()
        .method(Method::OPTIONS)
        .uri(gw.url(path))
        .header("origin", origin)
        .header("access-control-request-method", method);
    if !headers.is_empty() {
        r = r.header("access-control-request-headers", headers);
    }
    r.body(body("")).unwrap()
}

#[tokio::test]
async fn cors_preflights_are_answered_before_authentication() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&cors_routes(&up.url())).await;

    let (s, h, b) = send(preflight(
        &gw,
        "/orders",
        "https://app.example.com",
        "POST",
        "Content-Type, X-API-Key",
    ))
    .await;
    assert_eq!(s, 204, "{}", String::from_utf8_lossy(&b));
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert_eq!(h["access-control-allow-headers"], "content-type, x-api-key");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    let vary: Vec<_> = h
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(vary.contains(&"Origin"), "{vary:?}");

    // Every subdomain of a `*.` entry.
    let (s, h, _) = send(preflight(
        &gw,
        "/orders",
        "https://a.b.example.org",
        "GET",
        "",
    ))
    .await;
    assert_eq!(s, 204);
    assert_eq!(h["access-control-allow-origin"], "https://a.b.example.org");

    // Refusals name what was refused.
    for (origin, method, headers, field) in [
        ("https://evil.example.net", "GET", "", "header.origin"),
        (
            "https://app.example.com",
            "DELETE",
            "",
            "header.access-control-request-method",
        ),
        (
            "https://app.example.com",
            "GET",
            "x-secret",
            "header.access-control-request-headers",
        ),
    ] {
        let (s, h, b) = send(preflight(&gw, "/orders", origin, method, headers)).await;
        assert_eq!(s, 403, "{origin} {method} {headers}");
        assert_eq!(h["content-type"], "application/problem+json");
        assert_eq!(json(&b)["field"], field);
        assert!(!h.contains_key("access-control-allow-origin"));
    }
    // A route without `cors` still says 405 to OPTIONS.
    let (s, h, _) = send(preflight(
        &gw,
        "/plain",
        "https://app.example.com",
        "GET",
        "",
    ))
    .await;
    assert_eq!(s, 405);
    assert!(!h.contains_key("access-control-allow-origin"));
    // No preflight reached the upstream.
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn cors_headers_on_actual_answers_only_for_allowed_origins() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&cors_routes(&up.url())).await;
    let get = |origin: &'static str| {
        Request::get(gw.url("/orders"))
            .header("origin", origin)
            .header("x-api-key", "0123456789abcdef")
            .body(body(""))
            .unwrap()
    };
    let (s, h, _) = send(get("https://app.example.com")).await;
    assert_eq!(s, 200);
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-expose-headers"], "x-request-id");
    assert!(h.get_all("vary").iter().any(|v| v == "Origin"));

    // Another origin is served without CORS headers: the browser keeps the answer from the page.
    let (s, h, _) = send(get("https://evil.example.net")).await;
    assert_eq!(s, 200);
    assert!(!h.contains_key("access-control-allow-origin"));
    assert!(h.get_all("vary").iter().any(|v| v == "Origin"));
    // Authentication still applies to actual requests, and its refusal carries the CORS
    // headers, so that the page can read it.
    let (s, h, _) = send(
        Request::get(gw.url("/orders"))
            .header("origin", "https://app.example.com")
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
}

#[tokio::test]
async fn cors_refuses_websocket_handshakes_from_other_origins() {
    let addr = crate::support::websocket_sink().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["http://{addr}"] }}
routes:
  - id: live
    match: {{ method: GET, path: "/live" }}
    backend: up
    websocket: {{}}
    plugins:
      - cors: {{ origins: ["https://*.example.com"] }}
"#
    ))
    .await;
    let open = |origin: &'static str| {
        let mut req = format!("ws://{}/live", gw.listen)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    let (_, resp) = open("https://app.example.com")
        .await
        .expect("allowed origin");
    assert_eq!(resp.status(), 101);
    match open("https://example.com.evil.net").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            let b = resp.body().clone().unwrap_or_default();
            assert_eq!(json(&b.into())["field"], "header.origin");
        }
        other => panic!("want a 403, got {other:?}"),
    }
}

#[tokio::test]
async fn ip_rules_admit_by_the_clients_address() {
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - id: open
    match: {{ path: "/open" }}
    backend: up
    plugins: [ {{ ip: {{ allow: ["127.0.0.0/8"] }} }} ]
  - id: closed
    match: {{ path: "/closed" }}
    backend: up
    plugins: [ {{ ip: {{ allow: ["127.0.0.0/8"], deny: ["127.0.0.1"] }} }} ]
  - id: behind
    match: {{ path: "/behind" }}
    backend: up
    plugins:
      - ip: {{ allow: ["203.0.113.0/24"], trusted_proxies: ["127.0.0.1", "10.0.0.0/8"] }}
"#,
        up.url()
    ))
    .await;
    let get = |path: &str, xff: Option<&str>| {
        let mut r = Request::get(gw.url(path));
        if let Some(x) = xff {
            r = r.header("x-forwarded-for", x);
        }
        r.body(body("")).unwrap()
    };
    assert_eq!(send(get("/open", None)).await.0, 200);
    let (s, h, b) = send(get("/closed", None)).await;
    assert_eq!(s, 403);
    assert_eq!(h["content-type"], "application/problem+json");
    assert!(
        json(&b)["detail"].as_str().unwrap().contains("127.0.0.1"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    // The gateway's peer (127.0.0.1) is a trusted proxy: the right-most untrusted hop is the
    // client, and what the client wrote further left is not believed.
    for (xff, want) in [
        ("203.0.113.9", 200),
        ("203.0.113.9, 10.1.2.3", 200),
        ("198.51.100.1", 403),
        ("203.0.113.9, 198.51.100.1", 403),
        ("198.51.100.1, 203.0.113.9", 200),
        // A hop that is not an address: nobody can be judged.
        ("203.0.113.9, junk", 403),
    ] {
        assert_eq!(send(get("/behind", Some(xff))).await.0, want, "{xff}");
    }
    // Without the header, the proxy itself is the client, and it is not allowed.
    assert_eq!(send(get("/behind", None)).await.0, 403);
}

/// An authorization service: `Bearer good` passes (with `x-user-id: u1`), `Bearer redirect`
/// is sent to a login page, anything else is refused with its own 401; paths under `/slow`
/// answer after 2 s. Records what it was asked.
struct AuthService {
    url: String,
    asked: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AuthService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AuthService {
    async fn start() -> AuthService {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let log = log.clone();
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        };
                        log.lock().unwrap().push(serde_json::json!({
                            "method": req.method().as_str(),
                            "uri": req.uri().to_string(),
                            "authorization": h("authorization"),
                            "cookie": h("cookie"),
                            "x-forwarded-method": h("x-forwarded-method"),
                            "x-forwarded-uri": h("x-forwarded-uri"),
                            "x-forwarded-for": h("x-forwarded-for"),
                        }));
                        let slow = req.uri().path().contains("/slow");
                        let auth = h("authorization").unwrap_or_default();
                        async move {
                            if slow {
                                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                            }
                            let b = http::Response::builder();
                            let r = match auth.as_str() {
                                "Bearer good" => b
                                    .status(200)
                                    .header("x-user-id", "u1")
                                    .header("x-other", "not forwarded")
                                    .body(http_body_util::Full::new(bytes::Bytes::new())),
                                "Bearer redirect" => b
                                    .status(302)
                                    .header("location", "https://login.example.com/")
                                    .body(http_body_util::Full::new(bytes::Bytes::new())),
                                _ => b
                                    .status(401)
                                    .header("www-authenticate", "Bearer realm=\"shop\"")
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                        br#"{"error":"who are you?"}"#,
                                    ))),
                            };
                            Ok::<_, std::convert::Infallible>(r.unwrap())
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        AuthService { url, asked, task }
    }

    fn count(&self) -> usize {
        self.asked.lock().unwrap().len()
    }
}

#[tokio::test]
async fn forward_auth_decides_and_its_answers_reach_the_client() {
    let auth = AuthService::start().await;
    let up = Upstream::start().await;
    let gone = crate::support::free_port().await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{up}"] }}
routes:
  - id: api
    match: {{ path: "/api/{{*rest}}" }}
    backend: up
    plugins:
      - forward_auth:
          url: "{auth}/check"
          request_headers: [authorization]
          response_headers: [x-user-id]
          timeout: 300ms
          cache: {{ ttl: 30s }}
  - id: closed
    match: {{ path: "/closed" }}
    backend: up
    plugins: [ {{ forward_auth: {{ url: "http://{gone}/check" }} }} ]
  - id: open
    match: {{ path: "/open" }}
    backend: up
    plugins: [ {{ forward_auth: {{ url: "http://{gone}/check", on_error: allow }} }} ]
"#,
        up = up.url(),
        auth = auth.url,
    ))
    .await;
    let req = |method: &str, path: &str, token: &str| {
        Request::builder()
            .method(method)
            .uri(gw.url(path))
            .header("authorization", format!("Bearer {token}"))
            .header("x-user-id", "spoofed")
            .header("cookie", "secret=1")
            .body(body("payload"))
            .unwrap()
    };

    // Allowed: the service's named header goes on, the client's own copy does not.
    let (s, _, b) = send(req("POST", "/api/orders?q=1", "good")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let seen = json(&b);
    assert_eq!(seen["headers"]["x-user-id"], "u1", "{seen}");
    assert!(seen["headers"].get("x-other").is_none());
    assert_eq!(seen["body_len"], 7);
    // What the service was asked: the method, the path under its own, the named headers only.
    let asked = auth.asked.lock().unwrap()[0].clone();
    assert_eq!(asked["method"], "POST");
    assert_eq!(asked["uri"], "/check/api/orders?q=1");
    assert_eq!(asked["authorization"], "Bearer good");
    assert_eq!(asked["cookie"], serde_json::Value::Null);
    assert_eq!(asked["x-forwarded-method"], "POST");
    assert_eq!(asked["x-forwarded-uri"], "/api/orders?q=1");
    assert_eq!(asked["x-forwarded-for"], "127.0.0.1");

    // The decision is cached per method, path and key header.
    assert_eq!(send(req("POST", "/api/orders?q=1", "good")).await.0, 200);
    assert_eq!(auth.count(), 1);
    assert_eq!(send(req("POST", "/api/orders?q=2", "good")).await.0, 200);
    assert_eq!(auth.count(), 2);

    // Refused: the service's answer is the client's, as it made it.
    let (s, h, b) = send(req("GET", "/api/orders", "bad")).await;
    assert_eq!(s, 401);
    assert_eq!(h["www-authenticate"], "Bearer realm=\"shop\"");
    assert_eq!(json(&b)["error"], "who are you?");
    let (s, h, _) = send(req("GET", "/api/orders", "redirect")).await;
    assert_eq!(s, 302);
    assert_eq!(h["location"], "https://login.example.com/");
    assert_eq!(up.hits(), 3);

    // A service that does not answer in time, or cannot be reached, fails closed…
    let (s, _, b) = send(req("GET", "/api/slow", "good")).await;
    assert_eq!(s, 503, "{}", String::from_utf8_lossy(&b));
    assert!(
        json(&b)["detail"]
            .as_str()
            .unwrap()
            .contains("within 300ms")
    );
    let (s, h, _) = send(req("GET", "/closed", "good")).await;
    assert_eq!(s, 503);
    assert!(h.contains_key("retry-after"));
    // …unless the route says otherwise.
    assert_eq!(send(req("GET", "/open", "good")).await.0, 200);
    assert_eq!(up.hits(), 4);
}

/// A client of the gateway's TLS listener, presenting `identity` (a PEM certificate and key)
/// when given; HTTP/1.1 over one connection.
async fn mtls_get(
    addr: std::net::SocketAddr,
    server_ca: &str,
    identity: Option<&(String, String)>,
    path: &str,
    xfcc: Option<&str>,
) -> Result<(u16, serde_json::Value), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(server_ca.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "localhost");
    if let Some(x) = xfcc {
        req = req.header("x-forwarded-client-cert", x);
    }
    let resp = send
        .send_request(req.body(body("")).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    use http_body_util::BodyExt;
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, serde_json::from_slice(&b).unwrap_or_default()))
}

#[tokio::test]
async fn client_certificates_identify_clients_to_routes_and_upstreams() {
    use crate::upstream_tls::{Ca, Files};
    let server_ca = Ca::new("gateway CA");
    let clients = Ca::new("client CA");
    let stranger = Ca::new("another CA");
    let files = Files::new();
    let (cert, key) = server_ca.issue(&["localhost"], false, false);
    let svc_a = clients.issue(&["svc-a"], true, false);
    let svc_b = clients.issue(&["svc-b.internal"], true, false);
    let outsider = stranger.issue(&["svc-a"], true, false);
    let up = Upstream::start().await;
    let gw = Gateway::start(&format!(
        r#"
server:
  listen: "127.0.0.1:0"
  admin: "127.0.0.1:0"
  tls:
    cert: "{}"
    key: "{}"
    client_auth: {{ ca: "{}", mode: optional }}
backends:
  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - id: any
    match: {{ path: "/any" }}
    backend: up
  - id: svc-a
    match: {{ path: "/a" }}
    backend: up
    plugins: [ {{ client_cert: {{ subjects: ["CN=svc-a"] }} }} ]
  - id: svc-b
    match: {{ path: "/b" }}
    backend: up
    plugins: [ {{ client_cert: {{ sans: ["svc-b.internal"] }} }} ]
"#,
        files.put("cert.pem", &cert).display(),
        files.put("key.pem", &key).display(),
        files.put("clients.pem", &clients.pem()).display(),
        up.url()
    ))
    .await;
    let addr = gw.listen;
    let ca = server_ca.pem();

    // The upstream learns who the client is, and only from the gateway.
    let (s, seen) = mtls_get(addr, &ca, Some(&svc_a), "/any", Some("Hash=forged"))
        .await
        .unwrap();
    assert_eq!(s, 200);
    let xfcc = seen["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(xfcc.starts_with("Hash="), "{xfcc}");
    assert!(xfcc.contains(";Subject=\"CN=svc-a\""), "{xfcc}");
    assert!(xfcc.contains(";DNS=svc-a"), "{xfcc}");
    assert!(!xfcc.contains("forged"));
    let (s, seen) = mtls_get(addr, &ca, None, "/any", Some("Hash=forged"))
        .await
        .unwrap();
    assert_eq!(s, 200, "optional: a client without a certificate connects");
    assert!(
        seen["headers"].get("x-forwarded-client-cert").is_none(),
        "{seen}"
    );

    // Routes choose among the verified clients.
    assert_eq!(
        mtls_get(addr, &ca, Some(&svc_a), "/a", None)
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        mtls_get(addr, &ca, Some(&svc_b), "/a", None)
            .await
            .unwrap()
            .0,
        403
    );
    assert_eq!(
        mtls_get(addr, &ca, Some(&svc_b), "/b", None)
            .await
            .unwrap()
            .0,
        200
    );
    let (s, p) = mtls_get(addr, &ca, None, "/a", None).await.unwrap();
    assert_eq!(s, 403);
    assert_eq!(p["field"], "tls.client_certificate");

    // A certificate another CA signed does not complete the handshake.
    assert!(
        mtls_get(addr, &ca, Some(&outsider), "/any", None)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_required_client_certificate_names_the_topic() {
    use crate::upstream_tls::{Ca, Files};
    let addr = crate::support::mqtt::broker_addr().await;
    let (prefix, mut sub) = crate::support::mqtt::Subscriber::on_fresh_prefix(&addr).await;
    let server_ca = Ca::new("gateway CA");
    let clients = Ca::new("client CA");
    let files = Files::new();
    let (cert, key) = server_ca.issue(&["localhost"], false, false);
    let device = clients.issue(&["device-7"], true, false);
    let gw = Gateway::start(&format!(
        r#"
server:
  listen: "127.0.0.1:0"
  admin: "127.0.0.1:0"
  tls: {{ cert: "{}", key: "{}", client_auth: {{ ca: "{}" }} }}
backends:
  devices: {{ type: mqtt, url: "mqtt://{addr}", client_id: "gw-{id}" }}
routes:
  - id: telemetry
    match: {{ method: GET, path: "/telemetry" }}
    backend: devices
    mqtt: {{ topic: "{prefix}/{{client_cert.cn}}", qos: 1 }}
"#,
        files.put("cert.pem", &cert).display(),
        files.put("key.pem", &key).display(),
        files.put("clients.pem", &clients.pem()).display(),
        id = uuid::Uuid::now_v7().simple(),
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let ca = server_ca.pem();
    // Required: no certificate, no connection.
    assert!(
        mtls_get(gw.listen, &ca, None, "/telemetry", None)
            .await
            .is_err()
    );
    let (s, p) = mtls_get(gw.listen, &ca, Some(&device), "/telemetry", None)
        .await
        .unwrap();
    assert_eq!(s, 202, "{p}");
    let m = sub.next().await;
    assert_eq!(&m.topic[..], format!("{prefix}/device-7").as_bytes());
}

#[tokio::test]
async fn the_admin_api_can_require_a_bearer_token() {
    let gw = Gateway::start(
        r#"
server: { listen: "127.0.0.1:0", admin: "127.0.0.1:0", admin_token: "admin-token-0123456789" }
backends: {}
routes: []
"#,
    )
    .await;
    let admin = |path: &str, token: Option<&str>| {
        let mut r = Request::get(gw.admin_url(path));
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        send(r.body(body("")).unwrap())
    };
    // Health checks stay open (container and load-balancer probes carry no token).
    assert_eq!(admin("/healthz", None).await.0, 200);
    assert_eq!(admin("/readyz", None).await.0, 200);
    // So does the dashboard's page (it holds no data, and asks for the token).
    for path in ["/ui/", "/ui/app.js", "/ui/style.css"] {
        assert_eq!(admin(path, None).await.0, 200, "{path}");
    }
    for path in [
        "/config",
        "/routes",
        "/metrics",
        "/dead-letters",
        "/stats",
        "/events",
    ] {
        let (s, h, b) = admin(path, None).await;
        assert_eq!(s, 401, "{path}");
        assert_eq!(h["www-authenticate"], "Bearer realm=\"switchyard-admin\"");
        assert_eq!(
            h["content-type"],
            "application/problem+json",
            "{}",
            String::from_utf8_lossy(&b)
        );
        assert_eq!(
            admin(path, Some("admin-token-012345678X")).await.0,
            401,
            "{path}"
        );
    }
    assert_eq!(
        admin("/config", Some("admin-token-0123456789")).await.0,
        200
    );
    assert_eq!(
        admin("/metrics", Some("admin-token-0123456789")).await.0,
        200
    );
}
