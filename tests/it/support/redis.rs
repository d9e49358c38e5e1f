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

/// `state.redis` for one server at `url`.
pub fn spec(
    url: &str,
    prefix: &str,
    timeout: std::time::Duration,
) -> switchyard::config::RedisStoreSpec {
    switchyard::config::RedisStoreSpec {
        url: url.to_string(),
        prefix: prefix.to_string(),
        timeout: switchyard::config::types::Dur(timeout),
        ..Default::default()
    }
}

/// A `redis-server` of the test's own, stopped when dropped.
struct Server {
    port: u16,
    child: std::process::Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// `redis-server` on a port of its own, with `args`, in `dir`; returns once it answers.
    async fn start(dir: &std::path::Path, args: &[String]) -> Server {
        let mut all: Vec<String> = ["--save", "", "--appendonly", "no"]
            .map(String::from)
            .to_vec();
        all.extend_from_slice(args);
        Self::spawn(None, dir, &all).await
    }

    /// A sentinel with the config file `conf` (which it rewrites as it learns).
    async fn sentinel(dir: &std::path::Path, conf: &std::path::Path) -> Server {
        Self::spawn(Some(conf), dir, &["--sentinel".to_string()]).await
    }

    async fn spawn(
        conf: Option<&std::path::Path>,
        dir: &std::path::Path,
        args: &[String],
    ) -> Server {
        let port = super::stable_port().await.port();
        let mut cmd = std::process::Command::new("redis-server");
        // A config file comes first of all.
        if let Some(c) = conf {
            cmd.arg(c);
        }
        let child = cmd
            .args(args)
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--dir"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server could not start ({e}); install it with `apt-get install -y redis-server`"));
        let s = Server { port, child };
        super::eventually("the private redis-server to answer", || async {
            cli(port, &["PING"]).filter(|o| o == "PONG").ok_or(())
        })
        .await;
        s
    }
}

/// `redis-cli -p port args…`'s output, trimmed; `None` when it failed.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A Redis Cluster of three masters of the test's own.
pub struct Cluster {
    nodes: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let bus = super::stable_port().await.port();
            let args = [
                "--cluster-enabled".to_string(),
                "yes".into(),
                "--cluster-config-file".into(),
                format!("nodes-{i}.conf"),
                "--cluster-port".into(),
                bus.to_string(),
                "--cluster-node-timeout".into(),
                "2000".into(),
            ];
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            nodes.push(Server::start(&node_dir, &args).await);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        assert!(
            cli(nodes[0].port, &args).is_some(),
            "redis-cli --cluster create failed"
        );
        let port = nodes[0].port;
        super::eventually("the cluster to be ok", || async {
            cli(port, &["CLUSTER", "INFO"])
                .filter(|i| i.contains("cluster_state:ok"))
                .ok_or(())
        })
        .await;
        Cluster { nodes, _dir: dir }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }
}

/// A master, its replica and one sentinel watching them, of the test's own.
pub struct SentinelSet {
    master: Server,
    replica: Server,
    sentinel: Server,
    pub master_name: String,
    _dir: tempfile::TempDir,
}

impl SentinelSet {
    pub async fn start() -> SentinelSet {
        let dir = tempfile::tempdir().unwrap();
        let sub = |name: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let master = Server::start(&sub("master"), &[]).await;
        let replica = Server::start(
            &sub("replica"),
            &[
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port.to_string(),
            ],
        )
        .await;
        let master_name = format!("sy{}", uuid::Uuid::now_v7().simple());
        let conf = sub("sentinel").join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {master_name} 127.0.0.1 {} 1\nsentinel down-after-milliseconds {master_name} 1000\nsentinel failover-timeout {master_name} 5000\n",
                master.port
            ),
        )
        .unwrap();
        let sentinel = Server::sentinel(&sub("sentinel"), &conf).await;
        let name = master_name.clone();
        let port = sentinel.port;
        super::eventually("the sentinel to know the replica", || async {
            cli(port, &["SENTINEL", "REPLICAS", &name])
                .filter(|r| r.contains("slave") || r.contains("replica"))
                .ok_or(())
        })
        .await;
        SentinelSet {
            master,
            replica,
            sentinel,
            master_name,
            _dir: dir,
        }
    }

    pub fn sentinel_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.sentinel.port)
    }

    /// Makes the replica the master, and waits until the sentinel says so.
    pub async fn failover(&self) {
        assert!(
            cli(
                self.sentinel.port,
                &["SENTINEL", "FAILOVER", &self.master_name]
            )
            .is_some(),
            "SENTINEL FAILOVER"
        );
        let (port, name, want) = (
            self.sentinel.port,
            self.master_name.clone(),
            self.replica.port.to_string(),
        );
        super::eventually("the sentinel to name the new master", || async {
            cli(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &name])
                .filter(|a| a.lines().nth(1) == Some(want.as_str()))
                .ok_or(())
        })
        .await;
        let _ = &self.master;
    }

    /// `Ok` when a key ending in `suffix` is on the server that started as the replica (the
    /// master after [`SentinelSet::failover`]).
    pub async fn on_replica(&self, suffix: &str) -> Result<(), String> {
        let keys = cli(self.replica.port, &["KEYS", &format!("*{suffix}")]).unwrap_or_default();
        if keys.is_empty() {
            Err(format!("no key *{suffix} on the new master"))
        } else {
            Ok(())
        }
    }
}
