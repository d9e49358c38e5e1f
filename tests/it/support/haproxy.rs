//! HAProxy (Debian's package) as the load balancer in front of gateway replicas, for the tests
//! of replicas and rolling restarts: round robin, a health check on each replica's `/readyz`
//! every 100 ms, and retries on another replica when a connection fails.

use std::net::SocketAddr;
use std::time::Duration;

use super::*;

pub struct Haproxy {
    pub addr: SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `haproxy` binary; a test that needs it fails, saying how to install it, when it is not.
fn binary() -> std::path::PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = std::path::Path::new(dir).join("haproxy");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "HAProxy is not installed. Install it with `apt-get install -y haproxy` (or run `bash .ci/run`, which installs it), then run the tests again."
    );
}

impl Haproxy {
    /// HAProxy in front of `replicas` (each one's public and admin address); returns once a
    /// request through it is answered by a replica.
    pub async fn start(replicas: &[(SocketAddr, SocketAddr)]) -> Haproxy {
        let bin = binary();
        let dir = tempfile::tempdir().unwrap();
        let addr = stable_port().await;
        let mut servers = String::new();
        for (i, (listen, admin)) in replicas.iter().enumerate() {
            servers.push_str(&format!(
                "  server r{i} {listen} check port {}\n",
                admin.port()
            ));
        }
        let config = format!(
            r#"global
  maxconn 2000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  # A connection a replica refuses (it is restarting) is tried again on another one; a
  # request that reached a replica is never sent twice.
  retries 3
  option redispatch
  retry-on conn-failure
frontend gateways
  bind {addr}
  default_backend replicas
backend replicas
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  default-server inter 100ms fall 1 rise 1
{servers}"#
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = std::process::Command::new(bin)
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let h = Haproxy {
            addr,
            child,
            _dir: dir,
        };
        let url = format!("http://{addr}/readyz-through-haproxy");
        eventually_within(
            "HAProxy to pass requests",
            Duration::from_secs(10),
            || async {
                match client()
                    .request(Request::get(&url).body(body("")).unwrap())
                    .await
                {
                    Ok(r) if r.status() != 503 => Ok(()),
                    Ok(r) => Err(r.status().to_string()),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
        h
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}
