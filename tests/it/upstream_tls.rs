//! TLS to `https://` HTTP upstreams, against real TLS servers with certificates made here: a
//! private CA, `server_name`, ALPN (h2, and HTTP/1.1 when the server offers nothing else),
//! refused certificates (each reason named in the 502), mutual TLS, session resumption,
//! WebSocket pass-through over TLS, and certificate files re-read when they change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Gateway, get, json};

/// A certificate authority made for one test.
pub(crate) struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
    }

    pub(crate) fn pem(&self) -> String {
        self.0.pem()
    }

    /// A certificate for `names` (its common name the first), for a server or a client, and
    /// its key, both PEM. An expired one ended in 2021.
    pub(crate) fn issue(&self, names: &[&str], client: bool, expired: bool) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.0).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Files in a directory of the test's own, named by absolute path in the config.
pub(crate) struct Files(pub(crate) tempfile::TempDir);

impl Files {
    pub(crate) fn new() -> Files {
        Files(tempfile::tempdir().unwrap())
    }

    pub(crate) fn put(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    }
}

/// A TLS server: HTTP/1.1 and h2 (by what ALPN agreed) answering JSON about the request and
/// the connection, or a WebSocket echo. Counts handshakes, and those that resumed a session.
struct TlsServer {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    resumed: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Serve {
    Http,
    WebSocket,
}

impl TlsServer {
    async fn start(
        (cert, key): &(String, String),
        alpn: &[&str],
        client_ca: Option<&str>,
        serve: Serve,
    ) -> TlsServer {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
                    .unwrap();
                builder.with_client_cert_verifier(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider,
                    )
                    .build()
                    .unwrap(),
                )
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let resumed = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (h, r, n) = (handshakes.clone(), resumed.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, h, r, n) = (acceptor.clone(), h.clone(), r.clone(), n.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    let conn = tls.get_ref().1;
                    if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    let client_cn = conn.peer_certificates().map(|c| c.len());
                    if serve == Serve::WebSocket {
                        let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                            return;
                        };
                        while let Some(Ok(m)) = ws.next().await {
                            if m.is_text() && ws.send(m).await.is_err() {
                                return;
                            }
                        }
                        return;
                    }
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        n.fetch_add(1, Ordering::SeqCst);
                        let info = json!({
                            "version": format!("{:?}", req.version()),
                            "path": req.uri().path(),
                            "host": req.headers().get("host").and_then(|v| v.to_str().ok()),
                            "authority": req.uri().authority().map(|a| a.to_string()),
                            "client_certs": client_cn,
                        });
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                bytes::Bytes::from(info.to_string()),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsServer {
            addr,
            handshakes,
            resumed,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

/// A backend `b` of `url` with the `tls` block (YAML flow) and any other settings, and a route
/// `/b/...` to it.
fn config(url: &str, tls: &str, extra: &str) -> String {
    format!(
        r#"
backends:
  b: {{ type: http, endpoints: ["{url}"], tls: {tls} {extra} }}
routes:
  - id: b
    match: {{ path: "/b/{{*rest}}" }}
    backend: b
    http: {{ strip_prefix: /b }}
"#
    )
}

fn ca_only(ca: &std::path::Path) -> String {
    format!("{{ ca: \"{}\" }}", ca.display())
}

#[tokio::test]
async fn https_upstream_with_a_private_ca_speaks_h2_by_alpn_and_falls_back_to_http1() {
    let ca = Ca::new("upstream CA");
    let files = Files::new();
    let ca_file = files.put("ca.pem", &ca.pem());
    let pair = ca.issue(&["localhost"], false, false);
    let both = TlsServer::start(&pair, &["h2", "http/1.1"], None, Serve::Http).await;
    let http1 = TlsServer::start(&pair, &["http/1.1"], None, Serve::Http).await;

    let gw = Gateway::start(&config(&both.url(), &ca_only(&ca_file), "")).await;
    let (s, _, b) = get(&gw.url("/b/x/y")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let seen = json(&b);
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["path"], "/x/y");
    assert_eq!(seen["authority"], format!("localhost:{}", both.addr.port()));

    // A server that offers only HTTP/1.1 gets HTTP/1.1, with `Host` the endpoint's.
    let gw = Gateway::start(&config(&http1.url(), &ca_only(&ca_file), "")).await;
    let (s, _, b) = get(&gw.url("/b/one")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let seen = json(&b);
    assert_eq!(seen["version"], "HTTP/1.1", "{seen}");
    assert_eq!(seen["host"], format!("localhost:{}", http1.addr.port()));

    // `protocol: http1` asks for HTTP/1.1 of a server that would speak h2.
    let gw = Gateway::start(&config(
        &both.url(),
        &ca_only(&ca_file),
        ", protocol: http1",
    ))
    .await;
    let (s, _, b) = get(&gw.url("/b/one")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["version"], "HTTP/1.1");
}

#[tokio::test]
async fn server_name_checks_an_endpoint_given_by_ip_address() {
    let ca = Ca::new("upstream CA");
    let files = Files::new();
    let ca_file = files.put("ca.pem", &ca.pem());
    let server = TlsServer::start(
        &ca.issue(&["api.internal"], false, false),
        &["h2", "http/1.1"],
        None,
        Serve::Http,
    )
    .await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());
    let tls = format!(
        "{{ ca: \"{}\", server_name: api.internal }}",
        ca_file.display()
    );
    let gw = Gateway::start(&config(&url, &tls, "")).await;
    let (s, _, b) = get(&gw.url("/b/x")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
}

#[tokio::test]
async fn refused_certificates_are_502s_that_name_the_reason() {
    let ca = Ca::new("upstream CA");
    let files = Files::new();
    let ca_file = files.put("ca.pem", &ca.pem());
    let other_name = TlsServer::start(
        &ca.issue(&["elsewhere.internal"], false, false),
        &["h2"],
        None,
        Serve::Http,
    )
    .await;
    let expired = TlsServer::start(
        &ca.issue(&["localhost"], false, true),
        &["h2"],
        None,
        Serve::Http,
    )
    .await;
    let good = TlsServer::start(
        &ca.issue(&["localhost"], false, false),
        &["h2"],
        None,
        Serve::Http,
    )
    .await;
    let plain = crate::support::Upstream::start().await;
    let cases = [
        (other_name.url(), ca_only(&ca_file), "for another name"),
        (expired.url(), ca_only(&ca_file), "has expired"),
        // The system's roots do not know the private CA.
        (good.url(), "{}".to_string(), "unknown issuer"),
        // An `http://` server behind an `https://` endpoint.
        (
            format!("https://localhost:{}", plain.addr.port()),
            ca_only(&ca_file),
            "did not answer in TLS",
        ),
    ];
    for (url, tls, reason) in cases {
        let gw = Gateway::start(&config(&url, &tls, "")).await;
        for _ in 0..2 {
            let (s, h, b) = get(&gw.url("/b/x")).await;
            assert_eq!(s, 502, "{url}: {}", String::from_utf8_lossy(&b));
            assert_eq!(h["content-type"], "application/problem+json");
            let p = json(&b);
            assert_eq!(
                p["type"].as_str().unwrap().rsplit(':').next(),
                Some("bad-gateway")
            );
            let detail = p["detail"].as_str().unwrap();
            assert!(detail.contains("TLS to the upstream failed"), "{detail}");
            assert!(
                detail.contains(reason),
                "{url}: want `{reason}` in: {detail}"
            );
        }
    }
    // No request reached a server whose certificate was refused; never a cleartext fallback.
    for s in [&other_name, &expired, &good] {
        assert_eq!(s.requests.load(Ordering::SeqCst), 0);
    }
    assert_eq!(plain.hits(), 0);
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate() {
    let ca = Ca::new("upstream CA");
    let clients = Ca::new("client CA");
    let files = Files::new();
    let ca_file = files.put("ca.pem", &ca.pem());
    let (cert, key) = clients.issue(&["gateway.internal"], true, false);
    let cert_file = files.put("client.pem", &cert);
    let key_file = files.put("client.key", &key);
    let server = TlsServer::start(
        &ca.issue(&["localhost"], false, false),
        &["h2", "http/1.1"],
        Some(&clients.pem()),
        Serve::Http,
    )
    .await;

    // Without a client certificate the server refuses the handshake.
    let gw = Gateway::start(&config(&server.url(), &ca_only(&ca_file), "")).await;
    let (s, _, b) = get(&gw.url("/b/x")).await;
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    let detail = json(&b)["detail"].as_str().unwrap().to_string();
    // In TLS 1.3 the refusal comes after the client's side of the handshake: an alert, or a
    // close the gateway may read first; either answer names the client certificate.
    assert!(detail.contains("TLS to the upstream failed"), "{detail}");
    assert!(detail.contains("client certificate"), "{detail}");

    let tls = format!(
        "{{ ca: \"{}\", cert: \"{}\", key: \"{}\" }}",
        ca_file.display(),
        cert_file.display(),
        key_file.display()
    );
    let gw = Gateway::start(&config(&server.url(), &tls, "")).await;
    let (s, _, b) = get(&gw.url("/b/x")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["client_certs"], 1);
}

#[tokio::test]
async fn new_connections_resume_the_tls_session() {
    let ca = Ca::new("upstream CA");
    let files = Files::new();
    let ca_file = files.put("ca.pem", &ca.pem());
    let server = TlsServer::start(
        &ca.issue(&["localhost"], false, false),
        &["http/1.1"],
        None,
        Serve::Http,
    )
    .await;
    // No idle connection is kept, so each request makes a connection of its own.
    let gw = Gateway::start(&config(
        &server.url(),
        &ca_only(&ca_file),
        ", pool_max_idle_per_endpoint: 0",
    ))
    .await;
    for _ in 0..3 {
        let (s, _, b) = get(&gw.url("/b/x")).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    }
    assert_eq!(server.handshakes.load(Ordering::SeqCst), 3);
    assert!(
        server.resumed.load(Ordering::SeqCst) >= 2,
        "resumed {} of 3",
        server.resumed.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn websockets_pass_through_to_an_https_upstream() {
    let ca = Ca::new("upstream CA");
    let files = Files::new();
    let ca_file = files.put("ca.pem", &ca.pem());
    let server = TlsServer::start(
        &ca.issue(&["localhost"], false, false),
        &["http/1.1"],
        None,
        Serve::WebSocket,
    )
    .await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  b: {{ type: http, endpoints: ["{}"], tls: {} }}
routes:
  - id: ws
    match: {{ method: GET, path: "/ws" }}
    backend: b
    websocket: {{}}
"#,
        server.url(),
        ca_only(&ca_file)
    ))
    .await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.listen))
        .await
        .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over tls")).await.unwrap();
    let echoed = loop {
        match ws.next().await.expect("a frame").unwrap() {
            Message::Text(t) => break t.to_string(),
            _ => continue,
        }
    };
    assert_eq!(echoed, "over tls");
    assert_eq!(server.handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_changed_ca_file_rebuilds_the_backend() {
    let ca = Ca::new("upstream CA");
    let stranger = Ca::new("another CA");
    let server = TlsServer::start(
        &ca.issue(&["localhost"], false, false),
        &["h2"],
        None,
        Serve::Http,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), stranger.pem()).unwrap();
    let yaml = config(&server.url(), "{ ca: ca.pem }", "");
    std::fs::write(
        dir.path().join("routes.yaml"),
        crate::support::with_ephemeral_server(&yaml),
    )
    .unwrap();
    let config_path = dir.path().join("routes.yaml");
    let gw = Gateway::start_at(dir, config_path, true).await;
    let (s, _, b) = get(&gw.url("/b/x")).await;
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    let before = gw.version().await;

    // The right CA is written in place: the watcher reloads, the backend is rebuilt.
    std::fs::write(gw.dir.path().join("ca.pem"), ca.pem()).unwrap();
    gw.wait_version(before + 1).await;
    let (s, _, b) = get(&gw.url("/b/x")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
}

#[tokio::test]
async fn tls_settings_are_checked_when_the_config_loads() {
    let cases = [
        (
            r#"{ type: http, endpoints: ["http://127.0.0.1:1"], tls: { server_name: a } }"#,
            "applies to `https://` endpoints",
        ),
        (
            r#"{ type: http, endpoints: ["https://127.0.0.1:1"], tls: { server_name: "not a name!" } }"#,
            "not a DNS name or an IP address",
        ),
        (
            r#"{ type: http, endpoints: ["https://127.0.0.1:1"], tls: { cert: c.pem } }"#,
            "needs both `cert` and `key`",
        ),
        (
            r#"{ type: http, endpoints: ["https://127.0.0.1:1"], tls: { ca: missing.pem } }"#,
            "missing.pem",
        ),
        (
            r#"{ type: http, endpoints: ["ftp://127.0.0.1:1"] }"#,
            "is not a URL like",
        ),
    ];
    for (backend, want) in cases {
        let e =
            crate::support::start_error(&format!("backends:\n  b: {backend}\nroutes: []\n")).await;
        assert!(e.contains(want), "want `{want}` in: {e}");
    }
}

#[tokio::test]
async fn a_tls_failure_is_logged_once_per_endpoint_not_per_request() {
    let ca = Ca::new("upstream CA");
    let files = Files::new();
    let ca_file = files.put("ca.pem", &ca.pem());
    let expired = TlsServer::start(
        &ca.issue(&["localhost"], false, true),
        &["h2"],
        None,
        Serve::Http,
    )
    .await;
    let gw =
        crate::support::Binary::start(&config(&expired.url(), &ca_only(&ca_file), ""), &[], None)
            .await;
    let listen = gw.listen;
    let url = format!("http://{listen}/b/x");
    crate::support::eventually("the gateway answers", || async {
        match crate::support::client()
            .request(
                http::Request::get(&url)
                    .body(crate::support::body(""))
                    .unwrap(),
            )
            .await
        {
            Ok(r) if r.status() == 502 => Ok(()),
            other => Err(format!("{:?}", other.map(|r| r.status()))),
        }
    })
    .await;
    // Three more (five failures in a row would open the backend's breaker).
    for _ in 0..3 {
        let (s, _, b) = get(&url).await;
        assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    }
    let log = gw.stop();
    assert_eq!(
        log.matches("TLS to the upstream failed;").count(),
        1,
        "one WARN for four failed requests:\n{log}"
    );
    assert!(log.contains("has expired"), "{log}");
    assert!(!log.contains("Request failed."), "{log}");
}
