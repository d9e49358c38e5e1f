//! RabbitMQ for the AMQP tests: the broker's address (from `AMQP_URL`), a client to inspect
//! queues, unique names, and a TCP proxy in front of the broker that a test can cut or stop to
//! play a broker that goes away, without touching the broker the other tests use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::{Connection, ConnectionProperties};
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
        let task = tokio::spawn(Self::serve(
            listener,
            upstream.clone(),
            accepting.clone(),
            cut.clone(),
        ));
        BrokerProxy {
            addr,
            upstream,
            accepting,
            cut,
            task,
        }
    }

    async fn serve(
        listener: TcpListener,
        upstream: String,
        accepting: Arc<AtomicBool>,
        cut: Arc<Notify>,
    ) {
        while let Ok((mut client, _)) = listener.accept().await {
            if !accepting.load(Ordering::SeqCst) {
                continue; // dropped: connection refused, as near as TCP allows
            }
            let (upstream, cut) = (upstream.clone(), cut.clone());
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                    return;
                };
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
}
