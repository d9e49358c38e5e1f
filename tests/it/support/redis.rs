//! Redis for the state-store tests: its URL (from `REDIS_URL`) and a key prefix no other test
//! uses.

use tokio::net::TcpStream;

/// The server's URL; a test that needs it fails, saying how to start it, when it is down.
pub async fn url() -> String {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_string());
    let host = url
        .split_once("://")
        .map_or(url.as_str(), |(_, r)| r)
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:6379");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h).to_string();
    let addr = if host.contains(':') {
        host
    } else {
        format!("{host}:6379")
    };
    if TcpStream::connect(&addr).await.is_err() {
        panic!(
            "Redis is not reachable at {addr} (REDIS_URL={url}). Start it with `redis-server --daemonize yes --port 6379` (or `bash .ci/run`, which starts it), then run the tests again."
        );
    }
    url
}

/// A key prefix of its own for one test.
pub fn prefix() -> String {
    format!("sy-test:{}:", uuid::Uuid::now_v7().simple())
}
