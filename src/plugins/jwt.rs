//! The `jwt` plugin: admits a request that carries a valid JSON Web Token, in a route's plugin
//! chain before the middleware (a refusal never reaches the backend, its breaker or its rate
//! limit); on WebSocket routes before the upgrade.
//!
//! The token comes from `Authorization: Bearer`, or a cookie or a query parameter (browsers'
//! WebSockets cannot set headers; the parameter is removed before the request goes on, and the
//! gateway never logs query strings). Signatures are checked by the `jsonwebtoken` crate with
//! keys from a JWKS file (re-read when it changes, with the rest of the config), a JWKS URL, or
//! the issuer's OpenID Connect discovery document. Fetched keys are cached and refreshed in the
//! background: a request never waits for a fetch, except the first requests after start-up and
//! a token whose `kid` is unknown, which triggers one refresh at most once per
//! `min_refresh_interval`. When the URL is down the cached keys keep serving.
//!
//! A verified token's claims are put in the request's extensions ([`Claims`]), where
//! templates read them (`{claims.sub}`), and the claims named in `forward` become request
//! headers (any such header the client sent is removed first), which the bridges pass on as
//! gRPC metadata, AMQP headers or MQTT user properties where a route lists them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderName;
use http::header::{self, HeaderValue};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use sha2::Digest;

use super::Guard;
use crate::backends::{AbortOnDrop, BuildContext};
use crate::config::types::Dur;
use crate::error::Problem;
use crate::{Request, ResponseFuture, RouteService, fail};

pub struct JwtPlugin;

/// A verified token's claims, in the request's extensions.
#[derive(Clone, Debug)]
pub struct Claims(pub Arc<serde_json::Map<String, Value>>);

impl Claims {
    /// The claim at `path` (`["org", "id"]` for `{claims.org.id}`).
    pub fn get(&self, path: &[String]) -> Option<&Value> {
        let (first, rest) = path.split_first()?;
        let mut v = self.0.get(first)?;
        for key in rest {
            v = v.get(key)?;
        }
        Some(v)
    }
}

/// One string, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtConfig {
    /// The `iss` a token must carry.
    #[serde(default)]
    issuer: Option<String>,
    /// The `aud` values accepted (a token must carry one of them).
    #[serde(default)]
    audience: Option<OneOrMany>,
    #[serde(default)]
    jwks_file: Option<PathBuf>,
    #[serde(default)]
    jwks_url: Option<String>,
    /// Find the JWKS through `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    discovery: bool,
    /// A shared secret for HS256/384/512, which are refused without one.
    #[serde(default)]
    hmac_secret: Option<String>,
    /// The algorithms accepted (default: every asymmetric one, and HS* with a secret).
    #[serde(default)]
    algorithms: Option<Vec<String>>,
    #[serde(default = "default_leeway")]
    leeway: Dur,
    #[serde(default = "default_refresh")]
    refresh_interval: Dur,
    #[serde(default = "default_min_refresh")]
    min_refresh_interval: Dur,
    #[serde(default = "default_fetch_timeout")]
    fetch_timeout: Dur,
    /// A cookie that may carry the token.
    #[serde(default)]
    cookie: Option<String>,
    /// A query parameter that may carry the token.
    #[serde(default)]
    query: Option<String>,
    /// Claims a token must carry.
    #[serde(default)]
    required_claims: Vec<String>,
    /// Scopes a token must grant (`scope`, space-separated, or `scp`, a list).
    #[serde(default)]
    scopes: Vec<String>,
    /// Claims passed on as request headers: claim name → header name.
    #[serde(default)]
    forward: BTreeMap<String, String>,
    /// Verified tokens kept (by SHA-256) until they expire, so that a client's next request
    /// with the same token skips the signature check; 0 turns the cache off.
    #[serde(default = "default_cache_size")]
    cache_size: usize,
}

fn default_cache_size() -> usize {
    10_000
}

fn default_leeway() -> Dur {
    Dur::secs(30)
}
fn default_refresh() -> Dur {
    Dur::secs(600)
}
fn default_min_refresh() -> Dur {
    Dur::secs(30)
}
fn default_fetch_timeout() -> Dur {
    Dur::secs(5)
}

const USAGE: &str = "write `jwt: { issuer: https://auth.example.com, audience: my-api, discovery: true }`, or name the keys with `jwks_url:` or `jwks_file:` (or `hmac_secret:` for HS256)";

const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Source {
    File(PathBuf),
    Url(String),
    /// The issuer, whose discovery document names the JWKS.
    Discovery(String),
}

/// What the settings say, checked without I/O.
pub struct Compiled {
    source: Option<Source>,
    hmac: Option<DecodingKey>,
    /// One validation per accepted algorithm, made once.
    validations: HashMap<Algorithm, Validation>,
    cookie: Option<String>,
    query: Option<String>,
    required: Vec<String>,
    scopes: Vec<String>,
    forward: Vec<(String, HeaderName)>,
    refresh: Duration,
    min_refresh: Duration,
    fetch_timeout: Duration,
    /// The keys, once built (`None` after `compile`, which reads nothing).
    keys: Option<Arc<Jwks>>,
    leeway: u64,
    cache: Option<Verified>,
}

/// Tokens verified, by SHA-256 of the token: their claims, valid until `exp` (with leeway)
/// and while the key set they were checked with is the one held.
struct Verified {
    capacity: usize,
    entries: Mutex<HashMap<[u8; 32], VerifiedToken>>,
}

struct VerifiedToken {
    claims: Arc<serde_json::Map<String, Value>>,
    /// `exp` plus the leeway, in Unix seconds.
    until: u64,
    /// `nbf` minus the leeway, when the token has one.
    from: Option<u64>,
    /// The key set's generation it was verified with.
    generation: u64,
}

impl Verified {
    fn get(&self, key: &[u8; 32], generation: u64) -> Option<Arc<serde_json::Map<String, Value>>> {
        let now = jsonwebtoken::get_current_timestamp();
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let v = entries.get(key)?;
        (v.generation == generation && now <= v.until && v.from.is_none_or(|f| f <= now))
            .then(|| v.claims.clone())
    }

    fn put(&self, key: [u8; 32], v: VerifiedToken) {
        let now = jsonwebtoken::get_current_timestamp();
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= self.capacity {
            entries.retain(|_, e| e.until >= now);
        }
        if entries.len() >= self.capacity {
            // Full of live tokens: make room by dropping a quarter of them, whichever.
            let drop: Vec<[u8; 32]> = entries
                .keys()
                .take(self.capacity / 4 + 1)
                .copied()
                .collect();
            for k in drop {
                entries.remove(&k);
            }
        }
        entries.insert(key, v);
    }
}

fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
    let cfg: JwtConfig =
        serde_json::from_value(config.clone()).map_err(|e| format!("{e}; {USAGE}"))?;
    let sources = [
        cfg.jwks_file.clone().map(Source::File),
        cfg.jwks_url.clone().map(Source::Url),
        cfg.discovery
            .then(|| cfg.issuer.clone().map(Source::Discovery))
            .flatten(),
    ];
    if cfg.discovery && cfg.issuer.is_none() {
        return Err("`discovery: true` finds the keys from `issuer`, which is not set".into());
    }
    let mut sources = sources.into_iter().flatten();
    let source = sources.next();
    if sources.next().is_some() {
        return Err("name the keys one way: `jwks_file`, `jwks_url` or `discovery: true`".into());
    }
    if let Some(Source::Url(u) | Source::Discovery(u)) = &source {
        let uri = u
            .parse::<http::Uri>()
            .ok()
            .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        match uri {
            None => {
                return Err(format!(
                    "`{u}` is not a URL like `https://auth.example.com`"
                ));
            }
            Some(u) if u.authority().is_some_and(|a| a.as_str().contains('@')) => {
                return Err(format!(
                    "`{u}`: a URL with user info; put credentials elsewhere"
                ));
            }
            Some(_) => {}
        }
    }
    let hmac = match &cfg.hmac_secret {
        Some(s) if s.len() < 32 => {
            return Err(
                "`hmac_secret` is shorter than 32 bytes (HS256 needs 256 bits); use a long random secret from the environment (`${JWT_SECRET}`)"
                    .into(),
            );
        }
        Some(s) => Some(DecodingKey::from_secret(s.as_bytes()).map_err(|e| e.to_string())?),
        None => None,
    };
    if source.is_none() && hmac.is_none() {
        return Err(format!("no keys to check signatures with; {USAGE}"));
    }
    let algorithms = match &cfg.algorithms {
        Some(names) => names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let a: Algorithm = n.parse().map_err(|_| {
                    format!("algorithms[{i}]: `{n}` is not an algorithm (RS256, PS256, ES256, EdDSA, …; `none` is never accepted)")
                })?;
                if a.family() == AlgorithmFamily::Hmac && hmac.is_none() {
                    return Err(format!(
                        "algorithms[{i}]: `{n}` needs `hmac_secret`"
                    ));
                }
                if a.family() != AlgorithmFamily::Hmac && source.is_none() {
                    return Err(format!(
                        "algorithms[{i}]: `{n}` needs keys (`jwks_file`, `jwks_url` or `discovery`)"
                    ));
                }
                Ok(a)
            })
            .collect::<Result<Vec<_>, String>>()?,
        None => {
            let mut v = Vec::new();
            if source.is_some() {
                v.extend(ASYMMETRIC);
            }
            if hmac.is_some() {
                v.extend([Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]);
            }
            v
        }
    };
    if algorithms.is_empty() {
        return Err("`algorithms` lists none".into());
    }
    if cfg.min_refresh_interval.0 < Duration::from_secs(1) {
        return Err(
            "`min_refresh_interval` is below 1s: every token with an unknown `kid` would fetch the keys again"
                .into(),
        );
    }
    if cfg.refresh_interval.0 < cfg.min_refresh_interval.0 {
        return Err("`refresh_interval` is below `min_refresh_interval`".into());
    }
    if cfg.fetch_timeout.0.is_zero() {
        return Err("`fetch_timeout` must be above zero".into());
    }
    let audience = cfg.audience.map(OneOrMany::into_vec).unwrap_or_default();
    let validations = algorithms
        .iter()
        .map(|&a| {
            let mut v = Validation::new(a);
            v.leeway = cfg.leeway.0.as_secs();
            v.validate_nbf = true;
            v.validate_exp = true;
            v.set_required_spec_claims(&["exp"]);
            if let Some(iss) = &cfg.issuer {
                v.set_issuer(&[iss]);
                v.required_spec_claims.insert("iss".into());
            }
            if audience.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&audience);
                v.required_spec_claims.insert("aud".into());
            }
            (a, v)
        })
        .collect();
    for (key, name) in [("cookie", &cfg.cookie), ("query", &cfg.query)] {
        if name.as_deref().is_some_and(str::is_empty) {
            return Err(format!("`{key}` is empty; name it, or leave `{key}` out"));
        }
    }
    let forward = cfg
        .forward
        .iter()
        .map(|(claim, h)| {
            let name = HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("forward.{claim}: `{h}` is not a header name"))?;
            if matches!(
                name.as_str(),
                "host" | "authorization" | "cookie" | "connection" | "content-length"
                    | "transfer-encoding" | "te" | "upgrade"
            ) {
                return Err(format!(
                    "forward.{claim}: `{h}` is a header the gateway or the protocol owns; choose another, such as `x-user-{claim}`"
                ));
            }
            Ok((claim.clone(), name))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Compiled {
        source,
        hmac,
        validations,
        cookie: cfg.cookie,
        query: cfg.query,
        required: cfg.required_claims,
        scopes: cfg.scopes,
        forward,
        refresh: cfg.refresh_interval.0,
        min_refresh: cfg.min_refresh_interval.0,
        fetch_timeout: cfg.fetch_timeout.0,
        keys: None,
        leeway: cfg.leeway.0.as_secs(),
        cache: (cfg.cache_size > 0).then(|| Verified {
            capacity: cfg.cache_size,
            entries: Mutex::new(HashMap::new()),
        }),
    })
}

/// One key of a key set.
struct Key {
    alg: Option<Algorithm>,
    key: DecodingKey,
}

/// A JWKS, by `kid`; keys without one are tried in turn.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    unnamed: Vec<Arc<Key>>,
}

impl KeySet {
    /// Reads a JWKS document. Keys meant for encryption, of a type the gateway cannot use, or
    /// malformed are skipped; a document with no usable key is refused.
    fn parse(doc: &[u8]) -> Result<KeySet, String> {
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        let doc: Doc = serde_json::from_slice(doc)
            .map_err(|e| format!("not a JWKS document (`{{\"keys\": [...]}}`): {e}"))?;
        let mut set = KeySet::default();
        for v in doc.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(v) else {
                continue;
            };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            let key = Arc::new(Key { alg, key });
            match jwk.common.key_id {
                Some(kid) => {
                    set.by_kid.insert(kid, key);
                }
                None => set.unnamed.push(key),
            }
        }
        if set.by_kid.is_empty() && set.unnamed.is_empty() {
            return Err("the JWKS holds no signing key the gateway can use".into());
        }
        Ok(set)
    }

    /// The keys to try for a token with `kid` and `alg`.
    fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<Arc<Key>> {
        let fits = |k: &Arc<Key>| k.key.family() == alg.family() && k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .filter(|k| fits(k))
                .cloned()
                .into_iter()
                .collect(),
            None => self
                .unnamed
                .iter()
                .chain(self.by_kid.values())
                .filter(|k| fits(k))
                .cloned()
                .collect(),
        }
    }
}

/// A source's keys, shared by every route (and every reload) that names the same source.
pub struct Jwks {
    source: Source,
    set: ArcSwap<KeySet>,
    /// Bumped each time the set changes: tokens verified before are checked again.
    generation: std::sync::atomic::AtomicU64,
    /// SHA-256 of the JWKS document last loaded, to tell a change from a fetch of the same.
    digest: Mutex<[u8; 32]>,
    /// Whether keys were ever loaded; waited on by the first requests after start-up.
    loaded: tokio::sync::watch::Sender<bool>,
    client: Option<Client<crate::backends::tls::HttpsConnector, Empty<Bytes>>>,
    /// The JWKS URL that discovery found.
    jwks_uri: Mutex<Option<String>>,
    /// When a refresh was last started; an unknown `kid` starts one at most once per
    /// `min_refresh`.
    last_attempt: Mutex<Option<Instant>>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
    min_refresh: Duration,
    fetch_timeout: Duration,
    _task: Mutex<Option<AbortOnDrop>>,
}

/// Fetched key sets, by source, shared across reloads so that a reload neither refetches nor
/// starts a second refresher.
static SHARED: Mutex<Vec<(Source, Duration, Weak<Jwks>)>> = Mutex::new(Vec::new());

/// The largest JWKS or discovery document read.
const MAX_DOC: usize = 1 << 20;

impl Jwks {
    /// The keys of a file, read now.
    fn from_file(path: PathBuf) -> Result<Arc<Jwks>, String> {
        let doc = std::fs::read(&path).map_err(|e| format!("jwks_file {}: {e}", path.display()))?;
        let set = KeySet::parse(&doc).map_err(|e| format!("jwks_file {}: {e}", path.display()))?;
        Ok(Arc::new(Jwks {
            source: Source::File(path),
            set: ArcSwap::from_pointee(set),
            generation: Default::default(),
            digest: Mutex::new([0; 32]),
            loaded: tokio::sync::watch::Sender::new(true),
            client: None,
            jwks_uri: Mutex::new(None),
            last_attempt: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            min_refresh: Duration::MAX,
            fetch_timeout: Duration::ZERO,
            _task: Mutex::new(None),
        }))
    }

    /// The keys of a URL or a discovery document: the set already fetched for the same source
    /// when there is one, else a new one whose background refresher starts when `cx`'s gate
    /// opens.
    fn fetched(source: Source, c: &Compiled, cx: &BuildContext<'_>) -> Result<Arc<Jwks>, String> {
        let mut shared = SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shared.retain(|(_, _, w)| w.strong_count() > 0);
        if let Some(j) = shared
            .iter()
            .find(|(s, r, _)| *s == source && *r == c.refresh)
            .and_then(|(_, _, w)| w.upgrade())
        {
            return Ok(j);
        }
        let config = crate::backends::tls::rustls_client(None, cx.base)?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(c.fetch_timeout));
        let connector = crate::backends::tls::https_connector(
            http,
            config,
            None,
            crate::backends::tls::Alpn::Http1,
        )?;
        let jwks = Arc::new(Jwks {
            source: source.clone(),
            set: ArcSwap::from_pointee(KeySet::default()),
            generation: Default::default(),
            digest: Mutex::new([0; 32]),
            loaded: tokio::sync::watch::Sender::new(false),
            client: Some(Client::builder(TokioExecutor::new()).build(connector)),
            jwks_uri: Mutex::new(None),
            last_attempt: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            min_refresh: c.min_refresh,
            fetch_timeout: c.fetch_timeout,
            _task: Mutex::new(None),
        });
        let weak = Arc::downgrade(&jwks);
        let (every, retry) = (c.refresh, c.min_refresh.min(c.refresh));
        let task = cx.gate.spawn(async move {
            loop {
                let Some(j) = weak.upgrade() else { return };
                let ok = j.refresh(false).await;
                drop(j);
                tokio::time::sleep(if ok { every } else { retry }).await;
            }
        });
        *jwks
            ._task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = task;
        shared.push((source, c.refresh, Arc::downgrade(&jwks)));
        Ok(jwks)
    }

    fn describe(&self) -> String {
        match &self.source {
            Source::File(p) => p.display().to_string(),
            Source::Url(u) => u.clone(),
            Source::Discovery(iss) => format!("{iss} (discovery)"),
        }
    }

    /// GET `url`, at most [`MAX_DOC`] bytes, within the fetch timeout.
    async fn get(&self, url: &str) -> Result<Bytes, String> {
        let client = self
            .client
            .as_ref()
            .ok_or("keys from a file are not fetched")?;
        let req = http::Request::get(url)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "switchyard")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let fetch = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| crate::server::dispatch::error_chain(&e))?;
            if !resp.status().is_success() {
                return Err(format!("{url} answered {}", resp.status()));
            }
            http_body_util::Limited::new(resp.into_body(), MAX_DOC)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("{url}: {e}"))
        };
        tokio::time::timeout(self.fetch_timeout, fetch)
            .await
            .map_err(|_| {
                format!(
                    "{url} did not answer within {}",
                    humantime::format_duration(self.fetch_timeout)
                )
            })?
    }

    /// The JWKS URL: the configured one, or the discovery document's `jwks_uri`.
    async fn jwks_url(&self) -> Result<String, String> {
        match &self.source {
            Source::Url(u) => Ok(u.clone()),
            Source::File(_) => Err("keys from a file are not fetched".into()),
            Source::Discovery(issuer) => {
                if let Some(u) = self
                    .jwks_uri
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
                {
                    return Ok(u);
                }
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                );
                let doc = self.get(&url).await?;
                #[derive(Deserialize)]
                struct Discovery {
                    issuer: String,
                    jwks_uri: String,
                }
                let d: Discovery = serde_json::from_slice(&doc)
                    .map_err(|e| format!("{url}: no `jwks_uri` in the discovery document: {e}"))?;
                // OpenID Connect Discovery §4.3: the document speaks for the issuer asked.
                if d.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
                    return Err(format!(
                        "{url}: the discovery document is for the issuer `{}`, not `{issuer}`",
                        d.issuer
                    ));
                }
                if issuer.starts_with("https:") && !d.jwks_uri.starts_with("https:") {
                    return Err(format!(
                        "{url}: `jwks_uri` {} is not https, and the issuer is",
                        d.jwks_uri
                    ));
                }
                *self
                    .jwks_uri
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(d.jwks_uri.clone());
                Ok(d.jwks_uri)
            }
        }
    }

    /// Fetches the keys again (one refresh at a time; a caller that waited for another's gets
    /// its result). On failure the keys held keep serving. Whether keys are held now.
    /// `unknown_kid`: asked for by a token whose key is not held, which may start a fetch at
    /// most once per `min_refresh` (decided under the same lock, so requests arriving
    /// together start one).
    async fn refresh(&self, unknown_kid: bool) -> bool {
        let asked = Instant::now();
        let _one = self.refreshing.lock().await;
        let last = self.last_started();
        // A refresh that started after this one was asked for has just ended: its result
        // stands.
        if last.is_some_and(|t| t >= asked)
            || (unknown_kid && last.is_some_and(|t| t.elapsed() < self.min_refresh))
        {
            return *self.loaded.borrow();
        }
        *self
            .last_attempt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        let fetched = async {
            let url = self.jwks_url().await?;
            let doc = self.get(&url).await?;
            let digest: [u8; 32] = sha2::Sha256::digest(&doc).into();
            KeySet::parse(&doc)
                .map(|set| (set, digest))
                .map_err(|e| format!("{url}: {e}"))
        }
        .await;
        match fetched {
            Ok((set, digest)) => {
                let n = set.by_kid.len() + set.unnamed.len();
                let mut last = self
                    .digest
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if *last != digest {
                    *last = digest;
                    self.set.store(Arc::new(set));
                    self.generation
                        .fetch_add(1, std::sync::atomic::Ordering::Release);
                }
                drop(last);
                if !self.loaded.send_replace(true) {
                    tracing::info!(jwks = %self.describe(), keys = n, "JWT keys loaded.");
                }
                true
            }
            Err(e) => {
                let held = *self.loaded.borrow();
                tracing::warn!(jwks = %self.describe(), error = %e, stale_keys_serving = held, "JWT keys could not be fetched.");
                held
            }
        }
    }

    fn last_started(&self) -> Option<Instant> {
        *self
            .last_attempt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether an unknown `kid` may start a refresh now.
    fn may_refresh(&self) -> bool {
        self.client.is_some()
            && self
                .last_started()
                .is_none_or(|t| t.elapsed() >= self.min_refresh)
    }

    /// Waits (up to the fetch timeout) for the first keys, when none were ever loaded.
    async fn first_load(&self) {
        let mut rx = self.loaded.subscribe();
        let _ = tokio::time::timeout(self.fetch_timeout, rx.wait_for(|l| *l)).await;
    }
}

/// Why a token is refused.
enum Refusal {
    /// 401 `invalid_token`.
    Invalid(String),
    /// 503: no keys could be had.
    NoKeys,
}

impl Compiled {
    /// The token the request carries, and the request without a query parameter that held it.
    fn take_token(&self, req: &mut Request) -> Result<Option<String>, Problem> {
        let invalid_request = |why: &str| {
            Problem::unauthorized(
                format!("The request's bearer token cannot be read: {why}."),
                &format!("Bearer error=\"invalid_request\", error_description=\"{why}\""),
            )
        };
        // Every place the route reads a token from, so that a request that carries more than
        // one (RFC 6750 §2: one method only) is refused rather than one checked and another
        // passed on.
        let mut found: Vec<String> = Vec::new();
        if let Some(name) = &self.query {
            match super::take_query_param(req, name) {
                Ok(Some(v)) => found.push(
                    String::from_utf8(v).map_err(|_| invalid_request("the token is not text"))?,
                ),
                Ok(None) => {}
                Err(()) => return Err(Problem::bad_request("the request target is not valid")),
            }
        }
        let mut authorization = req.headers().get_all(header::AUTHORIZATION).iter();
        if let Some(v) = authorization.next() {
            if authorization.next().is_some() {
                return Err(invalid_request("more than one Authorization header"));
            }
            match v.to_str().unwrap_or("").split_once(' ') {
                Some((scheme, t))
                    if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() =>
                {
                    found.push(t.trim().to_string());
                }
                _ => {
                    return Err(invalid_request(
                        "the Authorization header is not a bearer token",
                    ));
                }
            }
        }
        if let Some(name) = &self.cookie {
            for v in req.headers().get_all(header::COOKIE) {
                for pair in v.to_str().unwrap_or("").split(';') {
                    if let Some((k, t)) = pair.trim().split_once('=')
                        && k == name
                        && !t.is_empty()
                    {
                        found.push(t.to_string());
                    }
                }
            }
        }
        if found.len() > 1 {
            return Err(invalid_request(
                "the token comes more than once (header, query or cookie); send it one way",
            ));
        }
        Ok(found.pop())
    }

    /// [`Compiled::check`], through the cache of verified tokens.
    async fn verify(&self, token: &str) -> Result<Arc<serde_json::Map<String, Value>>, Refusal> {
        let Some(cache) = &self.cache else {
            return self.check(token).await.map(Arc::new);
        };
        let generation = self.keys.as_ref().map_or(0, |k| {
            k.generation.load(std::sync::atomic::Ordering::Acquire)
        });
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if let Some(claims) = cache.get(&key, generation) {
            return Ok(claims);
        }
        let claims = Arc::new(self.check(token).await?);
        let secs = |name: &str| claims.get(name).and_then(Value::as_u64);
        if let Some(exp) = secs("exp") {
            cache.put(
                key,
                VerifiedToken {
                    claims: claims.clone(),
                    until: exp.saturating_add(self.leeway),
                    from: secs("nbf").map(|n| n.saturating_sub(self.leeway)),
                    generation,
                },
            );
        }
        Ok(claims)
    }

    /// Verifies the signature and the registered claims.
    async fn check(&self, token: &str) -> Result<serde_json::Map<String, Value>, Refusal> {
        let invalid = |s: &str| Refusal::Invalid(s.to_string());
        let head =
            jsonwebtoken::decode_header(token).map_err(|_| invalid("the token is malformed"))?;
        let Some(validation) = self.validations.get(&head.alg) else {
            return Err(Refusal::Invalid(format!(
                "the algorithm {:?} is not accepted",
                head.alg
            )));
        };
        if head.alg.family() == AlgorithmFamily::Hmac {
            let key = self
                .hmac
                .as_ref()
                .ok_or_else(|| invalid("HMAC tokens are not accepted"))?;
            return decode(token, key, validation);
        }
        let keys = self.keys.as_ref().ok_or(Refusal::NoKeys)?;
        if !*keys.loaded.borrow() {
            keys.first_load().await;
            if !*keys.loaded.borrow() {
                return Err(Refusal::NoKeys);
            }
        }
        let mut candidates = keys.set.load().candidates(head.kid.as_deref(), head.alg);
        if candidates.is_empty() && keys.may_refresh() {
            // A key the gateway has not seen: the issuer may have rotated its keys.
            keys.refresh(true).await;
            candidates = keys.set.load().candidates(head.kid.as_deref(), head.alg);
        }
        if candidates.is_empty() {
            return Err(match &head.kid {
                Some(kid) => Refusal::Invalid(format!("no key `{kid}` signs tokens here")),
                None => invalid("no key fits the token"),
            });
        }
        let mut last = invalid("the signature does not verify");
        for k in candidates {
            match decode(token, &k.key, validation) {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The claims a route requires, and its scopes.
    fn authorize(&self, claims: &serde_json::Map<String, Value>) -> Result<(), Problem> {
        if let Some(c) = self
            .required
            .iter()
            .find(|c| claims.get(c.as_str()).is_none_or(Value::is_null))
        {
            return Err(invalid_token(&format!("the token has no `{c}` claim")));
        }
        let granted: Vec<&str> = match (claims.get("scope"), claims.get("scp")) {
            (Some(Value::String(s)), _) => s.split(' ').collect(),
            (_, Some(Value::Array(a))) => a.iter().filter_map(Value::as_str).collect(),
            (_, Some(Value::String(s))) => s.split(' ').collect(),
            _ => Vec::new(),
        };
        if let Some(missing) = self.scopes.iter().find(|s| !granted.contains(&s.as_str())) {
            let scope = self.scopes.join(" ");
            let p = Problem::forbidden(format!(
                "The token does not grant the scope `{missing}`, which this route needs."
            ));
            return Err(
                match HeaderValue::from_str(&format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{scope}\""
                )) {
                    Ok(v) => p.with_header(header::WWW_AUTHENTICATE, v),
                    Err(_) => p,
                },
            );
        }
        Ok(())
    }

    /// The forwarded claims as request headers; a client's own copies are removed first.
    fn forward(
        &self,
        claims: &serde_json::Map<String, Value>,
        headers: &mut http::HeaderMap,
    ) -> Result<(), Problem> {
        for (claim, name) in &self.forward {
            while headers.remove(name).is_some() {}
            let text = match claims.get(claim) {
                None | Some(Value::Null) => continue,
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
                Some(v) => v.to_string(),
            };
            let v = HeaderValue::from_str(&text).map_err(|_| {
                Problem::bad_request(format!(
                    "The token's `{claim}` claim cannot be passed on as a header (it holds control characters)."
                ))
            })?;
            headers.insert(name.clone(), v);
        }
        Ok(())
    }
}

/// `jsonwebtoken::decode`, its refusals in words.
fn decode(
    token: &str,
    key: &DecodingKey,
    v: &Validation,
) -> Result<serde_json::Map<String, Value>, Refusal> {
    jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, v)
        .map(|d| d.claims)
        .map_err(|e| {
            Refusal::Invalid(match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired".into(),
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
                ErrorKind::InvalidIssuer => "the token's issuer is not accepted".into(),
                ErrorKind::InvalidAudience => "the token's audience is not accepted".into(),
                ErrorKind::InvalidSignature => "the signature does not verify".into(),
                ErrorKind::InvalidAlgorithm => "the algorithm does not fit the key".into(),
                ErrorKind::MissingRequiredClaim(c) => format!("the token has no `{c}` claim"),
                _ => "the token is malformed".into(),
            })
        })
}

/// 401 `invalid_token`, saying why (RFC 6750 §3).
fn invalid_token(why: &str) -> Problem {
    Problem::unauthorized(
        format!("The bearer token is not accepted: {why}."),
        &format!("Bearer error=\"invalid_token\", error_description=\"{why}\""),
    )
}

impl Guard for JwtPlugin {
    const NAME: &'static str = "jwt";
    type Settings = Compiled;

    fn compile(config: &serde_json::Value) -> Result<Compiled, String> {
        compile(config)
    }

    /// Reads a JWKS file (recorded, so that a change reloads the config), or shares the
    /// fetched keys of a URL or discovery source.
    fn build(config: &serde_json::Value, cx: &BuildContext<'_>) -> Result<Compiled, String> {
        let mut c = compile(config)?;
        c.keys = match c.source.clone() {
            None => None,
            Some(Source::File(p)) => {
                let path = if p.is_absolute() { p } else { cx.base.join(p) };
                cx.read_files().push(path.clone());
                Some(Jwks::from_file(path)?)
            }
            Some(s) => Some(Jwks::fetched(s, &c, cx)?),
        };
        Ok(c)
    }

    fn call(c: &Arc<Compiled>, inner: &RouteService, mut req: Request) -> ResponseFuture {
        use tower::ServiceExt;
        let token = match c.take_token(&mut req) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return fail(Problem::unauthorized(
                    "This route needs a bearer token (`Authorization: Bearer <token>`).",
                    "Bearer",
                ));
            }
            Err(p) => return fail(p),
        };
        let (c, inner) = (c.clone(), inner.clone());
        Box::pin(async move {
            let claims = match c.verify(&token).await {
                Ok(claims) => claims,
                Err(Refusal::Invalid(why)) => return Err(invalid_token(&why).into()),
                Err(Refusal::NoKeys) => {
                    return Err(Problem::new(
                        crate::error::Kind::BACKEND_UNAVAILABLE,
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        crate::error::Fault::Gateway,
                        "The keys that check tokens could not be loaded yet; try again shortly.",
                    )
                    .with_retry_after(1)
                    .into());
                }
            };
            c.authorize(&claims)?;
            c.forward(&claims, req.headers_mut())?;
            req.extensions_mut().insert(Claims(claims));
            inner.oneshot(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        for (bad, why) in [
            (serde_json::json!({}), "no keys"),
            (serde_json::json!({ "discovery": true }), "issuer"),
            (
                serde_json::json!({ "jwks_url": "https://a/jwks", "jwks_file": "k.json" }),
                "one way",
            ),
            (
                serde_json::json!({ "jwks_url": "ftp://a/jwks" }),
                "not a URL",
            ),
            (serde_json::json!({ "hmac_secret": "short" }), "32 bytes"),
            (
                serde_json::json!({ "jwks_url": "https://a/j", "algorithms": ["HS256"] }),
                "needs `hmac_secret`",
            ),
            (
                serde_json::json!({ "jwks_url": "https://a/j", "algorithms": ["none"] }),
                "never accepted",
            ),
            (
                serde_json::json!({ "jwks_url": "https://a/j", "forward": { "sub": "authorization" } }),
                "owns",
            ),
        ] {
            match compile(&bad) {
                Ok(_) => panic!("{bad} must be refused"),
                Err(e) => assert!(e.contains(why), "{bad}: want `{why}` in {e}"),
            }
        }
    }

    #[test]
    fn hmac_is_accepted_only_with_a_secret() {
        let c = compile(&serde_json::json!({ "jwks_url": "https://a/j" })).unwrap();
        assert!(!c.validations.contains_key(&Algorithm::HS256));
        assert!(c.validations.contains_key(&Algorithm::ES256));
        let c = compile(&serde_json::json!({ "hmac_secret": "x".repeat(32) })).unwrap();
        let mut algs: Vec<_> = c.validations.keys().map(|a| format!("{a:?}")).collect();
        algs.sort();
        assert_eq!(algs, ["HS256", "HS384", "HS512"]);
    }
}
