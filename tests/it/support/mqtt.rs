//! Mosquitto for the MQTT tests: the shared broker's address (from `MQTT_URL`), a subscriber
//! that records what it receives, and a private broker a test may stop and start again.

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

/// `host:port` of the shared broker; a test that needs it fails, saying how to start it.
pub async fn broker_addr() -> String {
    let url = std::env::var("MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
    let addr = url
        .trim_start_matches("mqtt://")
        .trim_end_matches('/')
        .to_string();
    if tokio::net::TcpStream::connect(&addr).await.is_err() {
        panic!(
            "Mosquitto is not reachable at {addr} (MQTT_URL={url}). Start it with `mosquitto -d -c /etc/mosquitto/mosquitto.conf` (or `bash .ci/run`, which starts it), then run the tests again."
        );
    }
    addr
}

/// A subscriber with a persistent session; every message it gets goes to `rx`.
pub struct Subscriber {
    pub rx: mpsc::UnboundedReceiver<Publish>,
    /// SUBACKs received: 1 after the start, more after a broker that lost the session.
    pub subscribed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
    _client: AsyncClient,
}

impl Subscriber {
    /// Subscribes to `filter` at QoS 2 on the broker at `addr` and returns once subscribed.
    /// A subscriber to everything under a topic prefix of its own (`sy-test/<uuid>`), and
    /// the prefix.
    pub async fn on_fresh_prefix(addr: &str) -> (String, Subscriber) {
        let prefix = format!("sy-test/{}", uuid::Uuid::now_v7().simple());
        let id = format!("sub-{}", uuid::Uuid::now_v7().simple());
        let sub = Subscriber::start(addr, &id, &format!("{prefix}/#")).await;
        (prefix, sub)
    }

    pub async fn start(addr: &str, id: &str, filter: &str) -> Subscriber {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let mut opts = MqttOptions::new(id, host, port.parse().unwrap());
        opts.set_clean_start(false)
            .set_session_expiry_interval(Some(600))
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(Some(1024 * 1024));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let mut f = Filter::new(filter, QoS::ExactlyOnce);
        f.preserve_retain = true;
        client.subscribe_many(vec![f.clone()]).await.unwrap();
        let (client2, f2) = (client.clone(), f);
        let subscribed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subs = subscribed.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            let subscribed = subs;
            let mut again: Option<(AsyncClient, Filter)> = None;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        subscribed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if let Some(t) = ready_tx.take() {
                            let _ = t.send(());
                        }
                        if again.is_none() {
                            again = Some((client2.clone(), f2.clone()));
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(a)))
                        if !a.session_present && again.is_some() =>
                    {
                        // The broker lost the session: subscribe again.
                        let (c, f) = again.as_ref().unwrap();
                        let _ = c.subscribe_many(vec![f.clone()]).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscribed within 10 s")
            .unwrap();
        Subscriber {
            rx,
            subscribed,
            _task: task,
            _client: client,
        }
    }

    pub async fn next(&mut self) -> Publish {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a message within 10 s")
            .expect("subscriber running")
    }
}

/// A Mosquitto of the test's own on a free port, with persistence in a temporary directory, so
/// that a test can restart it without touching the shared broker.
pub struct PrivateBroker {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PrivateBroker {
    pub async fn start() -> PrivateBroker {
        Self::start_with("").await
    }

    /// A broker that speaks only TLS, with this certificate and key (PEM).
    pub async fn start_tls(cert: &str, key: &str) -> PrivateBroker {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), key).unwrap();
        let extra = format!(
            "certfile {}\nkeyfile {}\n",
            dir.path().join("cert.pem").display(),
            dir.path().join("key.pem").display()
        );
        let b = Self::start_with(&extra).await;
        // Keep the files alive with the broker.
        std::mem::forget(dir);
        b
    }

    /// A broker that lets anonymous clients subscribe only to filters under `allowed` (its
    /// dynamic-security plugin, which answers other SUBSCRIBEs "not authorized"; Mosquitto's
    /// plain `acl_file` grants every subscription and filters deliveries instead).
    pub async fn start_with_subscribe_acl(allowed: &[&str]) -> PrivateBroker {
        let plugin = [
            "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
            "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
            "/usr/lib/mosquitto_dynamic_security.so",
            "/usr/local/lib/mosquitto_dynamic_security.so",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("Mosquitto's dynamic-security plugin is installed (Debian's mosquitto package ships it)");
        let acls: Vec<serde_json::Value> = allowed
            .iter()
            .map(|t| serde_json::json!({ "acltype": "subscribePattern", "topic": t, "priority": 0, "allow": true }))
            .collect();
        let config = serde_json::json!({
            "defaultACLAccess": { "publishClientSend": true, "publishClientReceive": true, "subscribe": false, "unsubscribe": true },
            "clients": [],
            "groups": [{ "groupname": "anonymous", "roles": [{ "rolename": "reader" }], "clients": [] }],
            "roles": [{ "rolename": "reader", "acls": acls }],
            "anonymousGroup": "anonymous"
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dynamic-security.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let b = Self::start_with(&format!(
            "plugin {plugin}\nplugin_opt_config_file {}\n",
            path.display()
        ))
        .await;
        // Keep the file alive with the broker.
        std::mem::forget(dir);
        b
    }

    /// A broker with `extra` lines in its configuration.
    pub async fn start_with(extra: &str) -> PrivateBroker {
        let port = crate::support::free_port().await.port();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\n{extra}allow_anonymous true\npersistence true\npersistence_location {}/\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let mut b = PrivateBroker {
            port,
            dir,
            child: None,
        };
        b.start_again().await;
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker the way an operator does (SIGTERM: it saves its sessions and exits).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    pub async fn start_again(&mut self) {
        // Debian installs it under /usr/sbin, which a non-root PATH may lack.
        let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the mosquitto binary is installed (apt-get install mosquitto)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.addr()).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "private mosquitto did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
