//! The dashboard in a real browser: headless Chromium, driven over the DevTools protocol, opens
//! `/ui/` of a gateway with traffic on several routes, a backend that is down, a spool that
//! holds messages and a dead letter; the page must show them, and its Replay button must send
//! the dead letter on. Runs when `SWITCHYARD_UI_CHECK=1` (`.ci/run` sets it and installs
//! Chromium); `SWITCHYARD_UI_SCREENSHOT=<file.png>` keeps a screenshot (`bench/ui-check.sh`
//! writes docs/dashboard.png).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::Method;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

use crate::jobs::Receiver;
use crate::support::amqp::{self as mq, BrokerProxy};
use crate::support::*;

/// The browser, when the check is asked for: `None` (and a note) when it is not.
fn chromium() -> Option<String> {
    if std::env::var("SWITCHYARD_UI_CHECK").as_deref() != Ok("1") {
        eprintln!("ui: the browser check runs with SWITCHYARD_UI_CHECK=1 (`bash .ci/run` sets it)");
        return None;
    }
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    Some(found.map(str::to_string).unwrap_or_else(|| {
        panic!(
            "SWITCHYARD_UI_CHECK=1 but no Chromium is installed: `apt-get install -y chromium` (or `bash .ci/run`, which installs it)"
        )
    }))
}

/// A page of a headless Chromium, driven over the DevTools protocol.
struct Page {
    _browser: tokio::process::Child,
    _profile: tempfile::TempDir,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    session: String,
    next: u64,
}

impl Page {
    async fn open(browser: &str, url: &str) -> Page {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(browser)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1440,1200",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let ws_url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(u) = line.strip_prefix("DevTools listening on ") {
                    return u.trim().to_string();
                }
            }
            panic!("Chromium ended without a DevTools address");
        })
        .await
        .expect("Chromium started within 30 s");
        // Its later output is not read; keep the pipe drained so it never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
        let mut page = Page {
            _browser: child,
            _profile: profile,
            ws,
            session: String::new(),
            next: 0,
        };
        let target = page
            .call("Target.createTarget", json!({ "url": url }))
            .await;
        let attached = page
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        page.session = attached["sessionId"].as_str().unwrap().to_string();
        page
    }

    /// Sends a command (to the page's session once attached) and returns its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = self.session.clone().into();
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .expect("an answer from Chromium")
                .unwrap()
                .unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page.
    async fn wait_for(&mut self, what: &str, expression: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self.eval(expression).await == Value::Bool(true) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let text = self.eval("document.body.innerText").await;
                panic!("the dashboard never showed {what}; it shows:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn the_dashboard_shows_the_gateway_and_replays_a_dead_letter_in_chromium() {
    let Some(browser) = chromium() else { return };
    let up = Upstream::start().await;
    let hook = Receiver::start(vec![500, 200]).await;
    let proxy = BrokerProxy::start().await;
    proxy.stop();
    let (x, q) = (mq::unique("x"), mq::unique("q"));
    let gw = Gateway::start(&format!(
        r##"
state: {{ spool: {{ retry: {{ min: 50ms, max: 300ms }} }} }}
backends:
  users: {{ type: http, endpoints: ["{up}"] }}
  rabbit:
    type: amqp
    url: "{rabbit}"
    connect_timeout: 300ms
    reconnect: {{ min: 100ms, max: 300ms }}
    breaker: {{ open_for: 1s }}
    topology:
      exchanges: [{{ name: "{x}", type: topic, durable: false }}]
      queues: [{{ name: "{q}", durable: false }}]
      bindings: [{{ queue: "{q}", exchange: "{x}", routing_key: "#" }}]
routes:
  - id: users
    match: {{ method: GET, path: "/users/{{id}}" }}
    backend: users
  - id: flaky
    match: {{ method: GET, path: "/status/{{code}}" }}
    backend: users
  - id: orders
    match: {{ method: POST, path: "/orders/{{n}}" }}
    backend: rabbit
    spool: true
    amqp: {{ exchange: "{x}", routing_key: "order.{{n}}" }}
  - id: reports
    match: {{ method: POST, path: "/reports" }}
    backend: users
    mode: async
    async:
      webhook: {{ url: "{hook}", secret: "a-test-secret-of-32-characters!!", attempts: 1 }}
"##,
        up = up.url(),
        rabbit = proxy.url(),
        hook = hook.url("/hook"),
    ))
    .await;
    // Traffic on several routes while the page watches, errors included.
    let traffic = {
        let base = gw.url("");
        tokio::spawn(async move {
            for i in 0u32.. {
                let _ = get(&format!("{base}/users/{i}")).await;
                if i % 5 == 0 {
                    let _ = get(&format!("{base}/status/503")).await;
                }
                // A rate that rises and falls, as traffic does.
                tokio::time::sleep(Duration::from_millis(8 + 8 * u64::from(i / 60 % 4))).await;
            }
        })
    };
    for i in 0..3 {
        let (s, _, b) = send(
            request(Method::POST, &gw.url(&format!("/orders/{i}")))
                .body(body("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    }
    // A job whose webhook is refused once: a dead letter.
    let (s, _, _) = send(
        request(Method::POST, &gw.url("/reports"))
            .body(body("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 202);
    gw.first_dead_letter().await;
    // Some history for the page to draw when it opens (the gateway samples every second).
    tokio::time::sleep(Duration::from_secs(12)).await;

    let mut page = Page::open(&browser, &gw.admin_url("/ui/")).await;
    page.wait_for(
        "the traffic of the last seconds",
        "document.querySelectorAll('#chart path').length >= 2",
    )
    .await;
    page.wait_for(
        "three updates",
        "Number(document.body.dataset.updates || 0) >= 3",
    )
    .await;
    page.wait_for(
        "the routes",
        "['users','flaky','orders','reports'].every(r => document.querySelector(`[data-route=\"${r}\"]`))",
    )
    .await;
    page.wait_for(
        "a request rate",
        "document.querySelector('[data-route=\"users\"] td:nth-child(2)').textContent !== '–'",
    )
    .await;
    page.wait_for(
        "the flaky route's errors",
        "document.querySelector('[data-route=\"flaky\"] td:nth-child(4)').classList.contains('bad')",
    )
    .await;
    page.wait_for(
        "both backends, one down",
        "!!document.querySelector('[data-backend=\"users\"] .dot:not(.down)') && !!document.querySelector('[data-backend=\"rabbit\"] .dot.down')",
    )
    .await;
    page.wait_for(
        "the spooled messages",
        "document.querySelector('[data-spool=\"orders\"]')?.textContent.includes('3 msg')",
    )
    .await;
    page.wait_for(
        "the dead letter",
        "!!document.querySelector('[data-replay]')",
    )
    .await;
    // A screenshot with everything on it, before the replay empties the dead letters.
    if let Ok(path) = std::env::var("SWITCHYARD_UI_SCREENSHOT") {
        let shot = page
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let png = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            shot["data"].as_str().unwrap(),
        )
        .unwrap();
        std::fs::write(&path, png).unwrap();
    }
    // Inspect shows the stored delivery; Replay sends it again, and the receiver takes it.
    page.eval("document.querySelector('[data-inspect]').click(); true")
        .await;
    page.wait_for(
        "the dead letter's content",
        "document.getElementById('inspect-body').textContent.includes('\"source\": \"webhook\"')",
    )
    .await;
    page.eval("document.querySelector('[data-replay]').click(); true")
        .await;
    page.wait_for(
        "the replay's notice",
        "document.getElementById('notice').textContent.startsWith('Replayed')",
    )
    .await;
    hook.wait_for(2).await;
    page.wait_for(
        "no dead letter left",
        "!document.getElementById('dead-empty').hidden",
    )
    .await;
    traffic.abort();
}
