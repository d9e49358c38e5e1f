//! RabbitMQ for the AMQP tests: the broker's address (from `AMQP_URL`), a client to inspect
//! queues, unique names, and a TCP proxy in front of the broker that a test can cut or stop to
//! play a broker that goes away, without touching the broker the other tests use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// The broker's URL; a test that needs it fails, saying how to start it, when it is down.
pub async fn broker_url() -> String {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let addr = broker_addr(&url);
    if TcpStream::connect(&addr).await.is_err() {
        panic!(
            "RabbitMQ is not reachable at {addr} (AMQP_URL={url}). Start it with `rabbitmq-server -detached` (or `bash .ci/run`, which starts it), then run the tests again."
        );
    }
    url
}

fn broker_addr(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest);
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5672")
    }
}

/// A `backends:` block with `rabbit` at `url`: topic exchange `x`, queue `q` bound to `#`.
pub fn rabbit_backend(url: &str, x: &str, q: &str) -> String {
    format!(
        r##"
backends:
  rabbit:
    type: amqp
    url: "{url}"
    topology:
      exchanges: [{{ name: "{x}", type: topic, durable: false }}]
      queues: [{{ name: "{q}", durable: false }}]
      bindings: [{{ queue: "{q}", exchange: "{x}", routing_key: "#" }}]
"##
    )
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("sy-test-{prefix}-{}", uuid::Uuid::now_v7().simple())
}

pub async fn client() -> Connection {
    Connection::connect(&broker_url().await, ConnectionProperties::default())
        .await
        .expect("test client connects to RabbitMQ")
}

/// Messages now in `queue`.
pub async fn depth(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    q.message_count()
}

/// Deletes what a test declared.
pub async fn cleanup(conn: &Connection, exchanges: &[&str], queues: &[&str]) {
    let ch = conn.create_channel().await.unwrap();
    for q in queues {
        let _ = ch.queue_delete((*q).into(), Default::default()).await;
    }
    for x in exchanges {
        let _ = ch.exchange_delete((*x).into(), Default::default()).await;
    }
}

/// A TCP proxy to the broker: `cut` drops every open connection (the broker killed them);
/// `stop` also refuses new ones until `start` (the broker is down).
pub struct BrokerProxy {
    pub addr: SocketAddr,
    upstream: String,
    accepting: Arc<AtomicBool>,
    cut: Arc<Notify>,
    /// Connections that carried bytes (readiness probes only connect and close).
    sessions: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BrokerProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.notify_waiters();
    }
}

impl BrokerProxy {
    pub async fn start() -> BrokerProxy {
        Self::start_to(broker_addr(&broker_url().await)).await
    }

    /// A proxy to any broker at `upstream` (`host:port`).
    pub async fn start_to(upstream: String) -> BrokerProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(Notify::new());
        let sessions = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(Self::serve(
            listener,
            upstream.clone(),
            accepting.clone(),
            cut.clone(),
            sessions.clone(),
        ));
        BrokerProxy {
            addr,
            upstream,
            accepting,
            cut,
            sessions,
            task,
        }
    }

    async fn serve(
        listener: TcpListener,
        upstream: String,
        accepting: Arc<AtomicBool>,
        cut: Arc<Notify>,
        sessions: Arc<AtomicUsize>,
    ) {
        while let Ok((mut client, _)) = listener.accept().await {
            if !accepting.load(Ordering::SeqCst) {
                continue; // dropped: connection refused, as near as TCP allows
            }
            let (upstream, cut, sessions) = (upstream.clone(), cut.clone(), sessions.clone());
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let mut first = [0u8; 4096];
                let n = match client.read(&mut first).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                sessions.fetch_add(1, Ordering::SeqCst);
                if server.write_all(&first[..n]).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = cut.notified() => {}
                }
            });
        }
    }

    /// The broker URL through the proxy.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Drops every connection through the proxy.
    pub fn cut(&self) {
        self.cut.notify_waiters();
    }

    /// The broker is "down": connections are dropped and new ones refused.
    pub fn stop(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        self.cut();
    }

    /// The broker is back.
    pub fn start_again(&self) {
        self.accepting.store(true, Ordering::SeqCst);
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Connections through the proxy that carried bytes so far.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }
}

pub fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(name)
}

pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    match header(props, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// The span id of the [`responder`]'s replies, in the trace of the request they answer.
pub const REPLIER_SPAN: &str = "feedfacecafebeef";

/// Answers every request on `queue`: body `re: <body>`, status from the request's `x-want`
/// header; a request whose body is `ignore` gets no answer, `stray` gets a reply with another
/// correlation id first, and one with an `x-delay-ms` header is answered that much later.
/// A request with a `traceparent` is answered in its trace, as span [`REPLIER_SPAN`].
pub async fn responder(queue: String) -> tokio::task::JoinHandle<()> {
    let conn = client().await;
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::spawn(async move {
        let _conn = conn;
        while let Some(Ok(d)) = consumer.next().await {
            let p = &d.properties;
            let (Some(reply_to), Some(cid)) = (p.reply_to().clone(), p.correlation_id().clone())
            else {
                continue;
            };
            if d.data == b"ignore" {
                continue;
            }
            if let Some(ms) = header_str(p, "x-delay-ms").and_then(|v| v.parse().ok()) {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            let want = header_str(p, "x-want").unwrap_or_else(|| "200".into());
            let mut h = FieldTable::default();
            h.insert("x-status".into(), AMQPValue::LongString(want.into()));
            // An instrumented service continues the request's trace in its reply.
            if let Some(trace) =
                header_str(p, "traceparent").and_then(|tp| tp.split('-').nth(1).map(str::to_string))
            {
                let tp = format!("00-{trace}-{REPLIER_SPAN}-01");
                h.insert("traceparent".into(), AMQPValue::LongString(tp.into()));
            }
            let reply = |cid: lapin::types::ShortString| {
                BasicProperties::default()
                    .with_correlation_id(cid)
                    .with_content_type("text/plain".into())
                    .with_headers(h.clone())
            };
            if d.data == b"stray" {
                let _ = ch
                    .basic_publish(
                        "".into(),
                        reply_to.clone(),
                        BasicPublishOptions::default(),
                        b"stray",
                        reply("someone-else".into()),
                    )
                    .await;
            }
            let mut out = b"re: ".to_vec();
            out.extend(&d.data);
            let _ = ch
                .basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    &out,
                    reply(cid),
                )
                .await;
        }
    })
}

/// A TLS front for the broker (as a broker's `amqps` listener would be): it terminates TLS
/// with `cert`/`key` and, when `client_ca` is given, requires a client certificate signed by it.
/// Handshakes it refused are counted.
pub struct TlsBrokerFront {
    pub addr: SocketAddr,
    pub refused: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBrokerFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsBrokerFront {
    pub async fn start(cert_pem: &str, key_pem: &str, client_ca: Option<&str>) -> TlsBrokerFront {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let upstream = broker_addr(&broker_url().await);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let config = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        }
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = refused.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, upstream, r) = (acceptor.clone(), upstream.clone(), r.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        r.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        TlsBrokerFront {
            addr,
            refused,
            task,
        }
    }

    /// The `amqps://` URL of the front, by the name its certificate carries.
    pub fn url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.addr.port())
    }
}
