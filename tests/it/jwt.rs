//! The `jwt` plugin against keys made here (RSA, EC P-256 and P-384, Ed25519) served by a real
//! JWKS server with an OpenID Connect discovery document: every algorithm accepted, each
//! refusal named, clock skew, a key rotated in while the gateway runs, the JWKS URL down
//! (cached keys still serve, a new `kid` is refused), claims forwarded as headers and read by
//! a topic template, and a token in the query string removed and never logged.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::Request;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::support::{Gateway, Upstream, body, eventually, json, now_secs, send};

/// A signing key and its public JWK.
struct SigningKey {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    /// The raw public key of an Ed25519 key (its JWK is written from it).
    ed_public: Option<Vec<u8>>,
}

impl SigningKey {
    fn rsa(alg: Algorithm, kid: &str) -> SigningKey {
        use rsa::pkcs8::EncodePrivateKey;
        let private = rsa::PrivateKey::new(&mut rand::rngs::SysRng, 2048).unwrap();
        let pem = private.to_pkcs8_pem(Default::default()).unwrap();
        SigningKey {
            alg,
            kid: kid.into(),
            key: EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            ed_public: None,
        }
    }

    fn ec(alg: Algorithm, kid: &str) -> SigningKey {
        let curve = match alg {
            Algorithm::ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Algorithm::ES384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            _ => &rcgen::PKCS_ED25519,
        };
        let pair = rcgen::KeyPair::generate_for(curve).unwrap();
        let pem = pair.serialize_pem();
        let key = if alg == Algorithm::EdDSA {
            EncodingKey::from_ed_pem(pem.as_bytes())
        } else {
            EncodingKey::from_ec_pem(pem.as_bytes())
        };
        SigningKey {
            alg,
            kid: kid.into(),
            key: key.unwrap(),
            ed_public: (alg == Algorithm::EdDSA).then(|| pair.public_key_raw().to_vec()),
        }
    }

    /// The same key under another algorithm of its family (RS256 → PS256).
    fn with(&self, alg: Algorithm, kid: &str) -> SigningKey {
        SigningKey {
            alg,
            kid: kid.into(),
            key: self.key.clone(),
            ed_public: self.ed_public.clone(),
        }
    }

    fn jwk(&self) -> Jwk {
        if let Some(x) = &self.ed_public {
            use base64::Engine;
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(x);
            return serde_json::from_value(
                json!({ "kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "alg": "EdDSA" }),
            )
            .unwrap();
        }
        let mut jwk = Jwk::from_encoding_key(&self.key, self.alg).unwrap();
        jwk.common.key_id = Some(self.kid.clone());
        jwk
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.key).unwrap()
    }
}

/// An identity provider: `/.well-known/openid-configuration` and `/jwks`, whose keys can be
/// changed, and which can be taken down (it then answers 503). Counts JWKS fetches.
struct Issuer {
    url: String,
    keys: Arc<Mutex<Vec<Jwk>>>,
    down: Arc<AtomicBool>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Issuer {
    async fn start(keys: &[&SigningKey]) -> Issuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let jwks: Arc<Mutex<Vec<Jwk>>> =
            Arc::new(Mutex::new(keys.iter().map(|k| k.jwk()).collect()));
        let down = Arc::new(AtomicBool::new(false));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (j, d, f, base) = (jwks.clone(), down.clone(), fetches.clone(), url.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (j, d, f, base) = (j.clone(), d.clone(), f.clone(), base.clone());
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (status, doc) = if d.load(Ordering::SeqCst) {
                        (503, json!({ "error": "down" }))
                    } else if req.uri().path() == "/.well-known/openid-configuration" {
                        (
                            200,
                            json!({ "issuer": base, "jwks_uri": format!("{base}/jwks") }),
                        )
                    } else if req.uri().path() == "/jwks" {
                        f.fetch_add(1, Ordering::SeqCst);
                        let set = JwkSet {
                            keys: j.lock().unwrap().clone(),
                        };
                        (200, serde_json::to_value(set).unwrap())
                    } else {
                        (404, json!({}))
                    };
                    async move {
                        let mut resp =
                            http::Response::new(Full::new(bytes::Bytes::from(doc.to_string())));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Issuer {
            url,
            keys: jwks,
            down,
            fetches,
            task,
        }
    }

    fn add(&self, key: &SigningKey) {
        self.keys.lock().unwrap().push(key.jwk());
    }
}

/// Claims valid for the issuer `iss` and the audience `orders`, for an hour.
fn claims(iss: &str) -> Value {
    json!({
        "iss": iss,
        "aud": "orders",
        "sub": "alice",
        "exp": now_secs() + 3600,
        "iat": now_secs(),
        "scope": "orders:read orders:write",
    })
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

fn routes(up: &str, jwt: &str) -> String {
    format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{up}"] }}
routes:
  - id: orders
    match: {{ path: "/orders/{{*rest}}" }}
    backend: up
    plugins:
      - jwt: {jwt}
"#
    )
}

async fn call(gw: &Gateway, path: &str, token: Option<&str>) -> (u16, http::HeaderMap, Value) {
    let mut r = Request::get(gw.url(path));
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    let (s, h, b) = send(r.body(body("")).unwrap()).await;
    let v = serde_json::from_slice(&b).unwrap_or(Value::Null);
    (s.as_u16(), h, v)
}

#[tokio::test]
async fn every_asymmetric_algorithm_is_accepted_by_discovery() {
    let rsa = SigningKey::rsa(Algorithm::RS256, "rs256");
    let keys = [
        rsa.with(Algorithm::RS256, "rs256"),
        rsa.with(Algorithm::RS384, "rs384"),
        rsa.with(Algorithm::RS512, "rs512"),
        rsa.with(Algorithm::PS256, "ps256"),
        SigningKey::ec(Algorithm::ES256, "es256"),
        SigningKey::ec(Algorithm::ES384, "es384"),
        SigningKey::ec(Algorithm::EdDSA, "ed25519"),
    ];
    let idp = Issuer::start(&keys.iter().collect::<Vec<_>>()).await;
    let up = Upstream::start().await;
    let gw = Gateway::start(&routes(
        &up.url(),
        &format!(
            "{{ issuer: \"{}\", audience: orders, discovery: true, forward: {{ sub: x-user, scope: x-scopes }} }}",
            idp.url
        ),
    ))
    .await;
    for k in &keys {
        let token = k.sign(&claims(&idp.url));
        let (s, _, seen) = call(&gw, "/orders/1", Some(&token)).await;
        assert_eq!(s, 200, "{:?}: {seen}", k.alg);
        assert_eq!(seen["headers"]["x-user"], "alice", "{seen}");
        assert_eq!(seen["headers"]["x-scopes"], "orders:read orders:write");
        // The token itself goes on to the upstream.
        assert_eq!(seen["headers"]["authorization"], format!("Bearer {token}"));
    }
    // A client cannot set a forwarded header itself.
    let token = keys[0].sign(&with(claims(&idp.url), "sub", Value::Null));
    let (s, _, b) = send(
        Request::get(gw.url("/orders/1"))
            .header("authorization", format!("Bearer {token}"))
            .header("x-user", "mallory")
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200);
    assert!(json(&b)["headers"].get("x-user").is_none(), "{}", json(&b));
    // The keys were fetched once, not per request.
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn refusals_say_why() {
    let key = SigningKey::ec(Algorithm::ES256, "k1");
    let impostor = SigningKey::ec(Algorithm::ES256, "k1");
    let idp = Issuer::start(&[&key]).await;
    let up = Upstream::start().await;
    let gw = Gateway::start(&routes(
        &up.url(),
        &format!(
            "{{ issuer: \"{}\", audience: [orders, billing], jwks_url: \"{}/jwks\", leeway: 30s, required_claims: [sub], scopes: [orders:read] }}",
            idp.url, idp.url
        ),
    ))
    .await;
    let iss = idp.url.as_str();
    let now = now_secs();

    // No token: a bare challenge (RFC 6750 §3.1).
    let (s, h, p) = call(&gw, "/orders/1", None).await;
    assert_eq!(s, 401, "{p}");
    assert_eq!(h["www-authenticate"], "Bearer");

    // Clock skew: an expiry 10 s ago is within the leeway; 2 minutes ago is not.
    let (s, _, p) = call(
        &gw,
        "/orders/1",
        Some(&key.sign(&with(claims(iss), "exp", json!(now - 10)))),
    )
    .await;
    assert_eq!(s, 200, "{p}");

    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(iss),
        &EncodingKey::from_secret(&[7u8; 32]).unwrap(),
    )
    .unwrap();
    let unsigned = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(claims(iss).to_string())
        )
    };
    let cases = [
        (
            key.sign(&with(claims(iss), "exp", json!(now - 120))),
            "expired",
        ),
        (
            key.sign(&with(claims(iss), "nbf", json!(now + 120))),
            "not valid yet",
        ),
        (
            key.sign(&with(claims(iss), "iss", json!("https://other.example"))),
            "issuer",
        ),
        (
            key.sign(&with(claims(iss), "aud", json!("shipping"))),
            "audience",
        ),
        (impostor.sign(&claims(iss)), "signature does not verify"),
        (key.sign(&with(claims(iss), "sub", Value::Null)), "`sub`"),
        (hs256, "not accepted"),
        (unsigned, "malformed"),
        ("not-a-token".to_string(), "malformed"),
    ];
    for (token, why) in cases {
        let (s, h, p) = call(&gw, "/orders/1", Some(&token)).await;
        assert_eq!(s, 401, "{why}: {p}");
        let challenge = h["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer error=\"invalid_token\""),
            "{challenge}"
        );
        assert!(challenge.contains(why), "want `{why}` in {challenge}");
        assert!(p["detail"].as_str().unwrap().contains(why), "{p}");
    }
    // A scope the token does not grant: 403 insufficient_scope.
    let (s, h, p) = call(
        &gw,
        "/orders/1",
        Some(&key.sign(&with(claims(iss), "scope", json!("profile")))),
    )
    .await;
    assert_eq!(s, 403, "{p}");
    assert_eq!(
        h["www-authenticate"],
        "Bearer error=\"insufficient_scope\", scope=\"orders:read\""
    );
    // `scp` as a list grants scopes too.
    let (s, _, _) = call(
        &gw,
        "/orders/1",
        Some(&key.sign(&with(
            with(claims(iss), "scope", Value::Null),
            "scp",
            json!(["orders:read"]),
        ))),
    )
    .await;
    assert_eq!(s, 200);
    // A scheme other than Bearer.
    let (s, _, _) = send(
        Request::get(gw.url("/orders/1"))
            .header("authorization", "Basic YTpi")
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);
    // Nothing refused reached the upstream.
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn keys_rotate_in_and_cached_keys_outlive_the_jwks_url() {
    let first = SigningKey::ec(Algorithm::ES256, "2026-a");
    let idp = Issuer::start(&[&first]).await;
    let up = Upstream::start().await;
    let gw = Gateway::start(&routes(
        &up.url(),
        &format!(
            "{{ issuer: \"{}\", jwks_url: \"{}/jwks\", min_refresh_interval: 1s }}",
            idp.url, idp.url
        ),
    ))
    .await;
    let iss = idp.url.clone();
    assert_eq!(
        call(&gw, "/orders/1", Some(&first.sign(&claims(&iss))))
            .await
            .0,
        200
    );

    // The issuer rotates a new key in; the first token signed with it makes the gateway look
    // again (at most once per `min_refresh_interval`).
    let second = SigningKey::rsa(Algorithm::RS256, "2026-b");
    idp.add(&second);
    let token = second.sign(&claims(&iss));
    eventually("the rotated key is accepted", || async {
        match call(&gw, "/orders/1", Some(&token)).await.0 {
            200 => Ok(()),
            s => Err(s),
        }
    })
    .await;

    // The JWKS URL goes down: the keys held keep serving; a key never seen is refused.
    idp.down.store(true, Ordering::SeqCst);
    let third = SigningKey::ec(Algorithm::ES256, "2026-c");
    idp.add(&third);
    assert_eq!(
        call(&gw, "/orders/1", Some(&first.sign(&claims(&iss))))
            .await
            .0,
        200
    );
    assert_eq!(call(&gw, "/orders/1", Some(&token)).await.0, 200);
    let (s, _, p) = call(&gw, "/orders/1", Some(&third.sign(&claims(&iss)))).await;
    assert_eq!(s, 401, "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("no key `2026-c`"),
        "{p}"
    );

    // Back up: the new key is taken once the gateway may look again.
    idp.down.store(false, Ordering::SeqCst);
    let token = third.sign(&claims(&iss));
    eventually("the key is found once the JWKS URL is back", || async {
        match call(&gw, "/orders/1", Some(&token)).await.0 {
            200 => Ok(()),
            s => Err(s),
        }
    })
    .await;
}

#[tokio::test]
async fn hmac_tokens_need_a_secret_and_a_file_jwks_works() {
    let secret = "s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t";
    let up = Upstream::start().await;
    let key = SigningKey::ec(Algorithm::ES384, "file-key");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::to_string(&JwkSet {
            keys: vec![key.jwk()],
        })
        .unwrap(),
    )
    .unwrap();
    let gw = Gateway::start(&format!(
        r#"
backends:
  up: {{ type: http, endpoints: ["{}"] }}
routes:
  - id: hmac
    match: {{ path: "/hmac" }}
    backend: up
    plugins: [ {{ jwt: {{ hmac_secret: "{secret}" }} }} ]
  - id: file
    match: {{ path: "/file" }}
    backend: up
    plugins: [ {{ jwt: {{ jwks_file: "{}" }} }} ]
"#,
        up.url(),
        jwks.display()
    ))
    .await;
    let hs = |alg| {
        jsonwebtoken::encode(
            &Header::new(alg),
            &json!({ "sub": "svc", "exp": now_secs() + 60 }),
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(call(&gw, "/hmac", Some(&hs(Algorithm::HS256))).await.0, 200);
    assert_eq!(call(&gw, "/hmac", Some(&hs(Algorithm::HS512))).await.0, 200);
    // An asymmetric token on an HMAC-only route, and an HMAC token on a JWKS route.
    let es = key.sign(&json!({ "sub": "svc", "exp": now_secs() + 60 }));
    assert_eq!(call(&gw, "/hmac", Some(&es)).await.0, 401);
    assert_eq!(call(&gw, "/file", Some(&es)).await.0, 200);
    assert_eq!(call(&gw, "/file", Some(&hs(Algorithm::HS256))).await.0, 401);
}

#[tokio::test]
async fn claims_fill_a_topic_with_the_topics_rules() {
    let addr = crate::support::mqtt::broker_addr().await;
    let (prefix, mut sub) = crate::support::mqtt::Subscriber::on_fresh_prefix(&addr).await;
    let key = SigningKey::ec(Algorithm::ES256, "k");
    let idp = Issuer::start(&[&key]).await;
    let gw = Gateway::start(&format!(
        r#"
backends:
  devices: {{ type: mqtt, url: "mqtt://{addr}", client_id: "gw-{id}" }}
routes:
  - id: mine
    match: {{ method: POST, path: "/me/events" }}
    backend: devices
    mqtt: {{ topic: "{prefix}/users/{{claims.sub}}/{{claims.org.id}}", qos: 1, headers: [x-user] }}
    plugins: [ {{ jwt: {{ jwks_url: "{url}/jwks", forward: {{ sub: x-user }} }} }} ]
"#,
        id = uuid::Uuid::now_v7().simple(),
        url = idp.url
    ))
    .await;
    gw.wait_backend("devices", true).await;
    let post = |sub: &str| {
        let token = key.sign(&json!({ "sub": sub, "org": { "id": 42 }, "exp": now_secs() + 60 }));
        Request::post(gw.url("/me/events"))
            .header("authorization", format!("Bearer {token}"))
            .body(body("hello"))
            .unwrap()
    };
    let (s, _, b) = send(post("alice")).await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    let m = sub.next().await;
    assert_eq!(&m.topic[..], format!("{prefix}/users/alice/42").as_bytes());
    let props = m.properties.expect("MQTT 5 properties");
    assert!(
        props
            .user_properties
            .contains(&("x-user".into(), "alice".into()))
    );
    // A claim is a request value like any other: a wildcard or a level separator is refused.
    for bad in ["al+ce", "a/b", "#"] {
        let (s, _, b) = send(post(bad)).await;
        assert_eq!(s, 400, "{bad}: {}", String::from_utf8_lossy(&b));
        assert_eq!(json(&b)["field"], "claims.sub");
    }
}

#[tokio::test]
async fn a_token_in_the_query_is_taken_out_and_never_logged() {
    let key = SigningKey::ec(Algorithm::ES256, "k");
    let idp = Issuer::start(&[&key]).await;
    let up = Upstream::start().await;
    let gw = crate::support::Binary::start(
        &routes(
            &up.url(),
            &format!("{{ jwks_url: \"{}/jwks\", query: access_token }}", idp.url),
        ),
        &[],
        Some("debug"),
    )
    .await;
    let listen = gw.listen;
    let token = key.sign(&json!({ "sub": "alice", "exp": now_secs() + 60 }));
    let url = format!("http://{listen}/orders/1?a=1&access_token={token}&b=2");
    let seen = eventually("the gateway answers", || async {
        match crate::support::client()
            .request(Request::get(&url).body(body("")).unwrap())
            .await
        {
            Ok(r) if r.status() == 200 => {
                use http_body_util::BodyExt;
                Ok(r.into_body().collect().await.unwrap().to_bytes())
            }
            other => Err(format!("{:?}", other.map(|r| r.status()))),
        }
    })
    .await;
    assert_eq!(json(&seen)["uri"], "/orders/1?a=1&b=2");
    // A refused one too.
    let bad = format!("http://{listen}/orders/1?access_token=eyJhbGciOi.not.valid");
    assert_eq!(crate::support::get(&bad).await.0, 401);
    // A token in the query and another in the header: one checked and the other passed on
    // would be a hole, so neither is taken.
    let (s, h, _) = send(
        Request::get(&url)
            .header("authorization", "Bearer something-else")
            .body(body(""))
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);
    assert!(
        h["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_request")
    );
    let log = gw.stop();
    assert!(
        log.contains("/orders/1"),
        "the access log has the path:\n{log}"
    );
    assert!(!log.contains(&token), "the token was logged:\n{log}");
    assert!(
        !log.contains("eyJhbGciOi.not.valid"),
        "the token was logged:\n{log}"
    );
}

#[tokio::test]
async fn claims_in_a_template_need_a_jwt_plugin() {
    let e = crate::support::start_error(
        r#"
backends:
  devices: { type: mqtt, url: "mqtt://127.0.0.1:1" }
routes:
  - id: mine
    match: { method: POST, path: "/me" }
    backend: devices
    mqtt: { topic: "users/{claims.sub}" }
"#,
    )
    .await;
    assert!(
        e.contains("only a `jwt` plugin on the route provides"),
        "{e}"
    );
}

#[tokio::test]
async fn a_changed_jwks_file_reloads_and_websockets_are_checked_before_the_upgrade() {
    let old = SigningKey::ec(Algorithm::ES256, "old");
    let new = SigningKey::ec(Algorithm::EdDSA, "new");
    let ws_up = crate::support::websocket_sink().await;
    let dir = tempfile::tempdir().unwrap();
    let write = |keys: Vec<Jwk>| {
        let tmp = dir.path().join("jwks.json.tmp");
        std::fs::write(&tmp, serde_json::to_string(&JwkSet { keys }).unwrap()).unwrap();
        std::fs::rename(&tmp, dir.path().join("jwks.json")).unwrap();
    };
    write(vec![old.jwk()]);
    std::fs::write(
        dir.path().join("routes.yaml"),
        crate::support::with_ephemeral_server(&format!(
            r#"
backends:
  live: {{ type: http, endpoints: ["http://{ws_up}"] }}
routes:
  - id: live
    match: {{ method: GET, path: "/live" }}
    backend: live
    websocket: {{}}
    plugins: [ {{ jwt: {{ jwks_file: jwks.json, query: access_token }} }} ]
"#
        )),
    )
    .unwrap();
    let config = dir.path().join("routes.yaml");
    let gw = Gateway::start_at(tempfile::tempdir().unwrap(), config, true).await;
    let open = |key: &SigningKey| {
        let token = key.sign(&json!({ "sub": "a", "exp": now_secs() + 60 }));
        tokio_tungstenite::connect_async(format!("ws://{}/live?access_token={token}", gw.listen))
    };
    let (_, resp) = open(&old).await.expect("the old key opens the socket");
    assert_eq!(resp.status(), 101);
    match open(&new).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("want a 401 before the upgrade, got {other:?}"),
    }
    // The JWKS file changes: the config reloads with the new keys.
    let before = gw.version().await;
    write(vec![new.jwk()]);
    gw.wait_version(before + 1).await;
    let (_, resp) = open(&new).await.expect("the new key opens the socket");
    assert_eq!(resp.status(), 101);
    assert!(open(&old).await.is_err());
}

#[tokio::test]
async fn verified_tokens_are_cached_only_while_they_and_their_key_hold() {
    let a = SigningKey::ec(Algorithm::ES256, "a");
    let b = SigningKey::ec(Algorithm::ES256, "b");
    let idp = Issuer::start(&[&a]).await;
    let up = Upstream::start().await;
    let gw = Gateway::start(&routes(
        &up.url(),
        &format!(
            "{{ jwks_url: \"{}/jwks\", leeway: 0s, min_refresh_interval: 1s }}",
            idp.url
        ),
    ))
    .await;
    // A token that expires in two seconds passes, then stops passing once it expires.
    let short = a.sign(&json!({ "sub": "s", "exp": now_secs() + 2 }));
    assert_eq!(call(&gw, "/orders/1", Some(&short)).await.0, 200);
    assert_eq!(call(&gw, "/orders/1", Some(&short)).await.0, 200);
    eventually("the cached token expires", || async {
        match call(&gw, "/orders/1", Some(&short)).await {
            (401, _, p) if p["detail"].as_str().unwrap_or("").contains("expired") => Ok(()),
            (s, _, p) => Err((s, p)),
        }
    })
    .await;

    // The issuer rotates key `a` out: once the gateway holds the new set, a token verified
    // with `a` before is checked again, and refused.
    let long_a = a.sign(&json!({ "sub": "s", "exp": now_secs() + 600 }));
    assert_eq!(call(&gw, "/orders/1", Some(&long_a)).await.0, 200);
    *idp.keys.lock().unwrap() = vec![b.jwk()];
    let long_b = b.sign(&json!({ "sub": "s", "exp": now_secs() + 600 }));
    eventually("the new set is held", || async {
        match call(&gw, "/orders/1", Some(&long_b)).await.0 {
            200 => Ok(()),
            s => Err(s),
        }
    })
    .await;
    let (s, _, p) = call(&gw, "/orders/1", Some(&long_a)).await;
    assert_eq!(s, 401, "{p}");
}
