//! TLS towards upstreams, under the bridges' connections: the rustls client settings of a
//! backend's `tls` block, the HTTPS connector of HTTP and gRPC backends (ALPN, `server_name`),
//! and what a failed handshake means to an operator (the reason a 502 names), logged once per
//! endpoint rather than once per request.

use std::error::Error as StdError;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper_util::client::legacy::connect::HttpConnector;
use rustls_pki_types::ServerName;

use super::must_exist;

/// The connector of backends with `https://` endpoints; `http://` ones go through it in clear.
pub type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The rustls client settings of a backend's `tls` block (`mqtts://`, `https://`): the CA
/// bundle of `tls.ca` or the system's roots, and a client certificate when given. Reads the
/// files (a build step); `server_name` is applied by the caller, per connection.
pub fn rustls_client(
    tls: Option<&crate::config::ClientTlsSpec>,
    base: &std::path::Path,
) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let tls = tls.cloned().unwrap_or_default();
    let path = |p: &std::path::Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            let ca = path(ca);
            must_exist("tls.ca", &ca)?;
            for c in CertificateDer::pem_file_iter(&ca)
                .map_err(|e| format!("tls.ca {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("tls.ca {}: {e}", ca.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("tls.ca {}: {e}", ca.display()))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("tls: {e}"))?
    .with_root_certificates(roots);
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (path(cert), path(key));
            must_exist("tls.cert", &cert)?;
            must_exist("tls.key", &key)?;
            let chain = CertificateDer::pem_file_iter(&cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .map_err(|e| format!("tls.key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("tls: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// `tls.server_name` as rustls takes it: a DNS name or an IP address.
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string())
        .map_err(|_| format!("tls.server_name `{name}`: not a DNS name or an IP address"))
}

/// What an HTTPS connection offers by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `h2` only (gRPC, `protocol: http2`).
    H2,
    /// Nothing: the server speaks HTTP/1.1 (`protocol: http1`).
    Http1,
    /// `h2`, then `http/1.1`: HTTP/2 when the server offers it (`protocol: auto`).
    Both,
}

/// An HTTPS-or-HTTP connector over `http`: `https://` destinations get TLS with `config`, the
/// ALPN list of `alpn`, and `server_name` as the name sent (SNI) and verified, the
/// destination's host by default. The session cache of `config` is shared by every connection
/// the connector makes, so reconnects resume their TLS sessions.
pub fn https_connector(
    mut http: HttpConnector,
    config: rustls::ClientConfig,
    server_name: Option<&str>,
    alpn: Alpn,
) -> Result<HttpsConnector, String> {
    http.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    let builder = match server_name {
        Some(name) => builder.with_server_name_resolver(
            hyper_rustls::FixedServerNameResolver::new(self::server_name(name)?),
        ),
        None => builder,
    };
    Ok(match alpn {
        Alpn::H2 => builder.enable_http2().wrap_connector(http),
        Alpn::Http1 => builder.enable_http1().wrap_connector(http),
        Alpn::Both => builder.enable_all_versions().wrap_connector(http),
    })
}

/// The connector of a backend whose `endpoints` may be `https://`: [`https_connector`] with
/// the backend's `tls` settings when one is (reading its files), else one that never uses TLS
/// (an empty trust store, never read).
pub fn connector_for(
    endpoints: &[String],
    tls: Option<&crate::config::ClientTlsSpec>,
    base: &std::path::Path,
    http: HttpConnector,
    alpn: Alpn,
) -> Result<HttpsConnector, String> {
    let config = if endpoints.iter().any(|e| e.starts_with("https:")) {
        rustls_client(tls, base)?
    } else {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    };
    https_connector(
        http,
        config,
        tls.and_then(|t| t.server_name.as_deref()),
        alpn,
    )
}

/// The rustls error somewhere in `err`'s chain. `std::io::Error` hides the error it wraps from
/// `source()`, so each one met is opened as well.
fn rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            cur = Some(inner as &(dyn StdError + 'static));
            continue;
        }
        cur = e.source();
    }
    None
}

/// Why a TLS handshake with an upstream failed, in words an operator can act on, when `err`
/// (a failed connect) is a handshake failure; rustls's own words follow in brackets.
pub fn failure(err: &(dyn StdError + 'static)) -> Option<String> {
    use rustls::CertificateError as C;
    use rustls::Error as E;
    let e = rustls_error(err)?;
    let what = match e {
        E::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "the upstream's certificate has expired",
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the upstream's certificate is not valid yet"
            }
            C::UnknownIssuer => {
                "the upstream's certificate has an unknown issuer (not in `tls.ca`, or the system's roots when `tls.ca` is not set)"
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the upstream's certificate is for another name (`tls.server_name` sets the name to check)"
            }
            C::Revoked => "the upstream's certificate is revoked",
            _ => "the upstream's certificate was refused",
        },
        E::AlertReceived(_) => {
            "the upstream refused the handshake (one that needs a client certificate refuses a gateway without `tls.cert`)"
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "the upstream did not answer in TLS (is the endpoint `http://`?)"
        }
        E::NoApplicationProtocol => "the upstream speaks none of the protocols offered by ALPN",
        E::PeerIncompatible(_) => {
            "the upstream offers no TLS version or cipher the gateway accepts"
        }
        _ => "the TLS handshake failed",
    };
    Some(format!("{what} ({e})"))
}

/// Per endpoint, the TLS failure last logged: each new reason is logged once (a WARN), and the
/// first success after failures once (an INFO), however many requests meet them.
pub struct Failures {
    backend: String,
    /// Per endpoint: `scheme://authority`, whether it is failing, the reason last logged.
    endpoints: Vec<(String, AtomicBool, Mutex<Option<String>>)>,
}

impl Failures {
    pub fn new(backend: &str, endpoints: impl IntoIterator<Item = String>) -> Self {
        Failures {
            backend: backend.to_string(),
            endpoints: endpoints
                .into_iter()
                .map(|e| (e, AtomicBool::new(false), Mutex::new(None)))
                .collect(),
        }
    }

    /// The endpoint a connection to `dst` is for.
    fn index(&self, dst: &http::Uri) -> Option<usize> {
        let (scheme, authority) = (dst.scheme_str()?, dst.authority()?.as_str());
        self.endpoints.iter().position(|(e, _, _)| {
            e.strip_prefix(scheme)
                .and_then(|r| r.strip_prefix("://"))
                .is_some_and(|a| a.eq_ignore_ascii_case(authority))
        })
    }

    /// Why endpoint `i` is failing TLS, when it is: what a connection closed without a word
    /// (HTTP/2 does not pass its connection's error to the requests on it) failed of.
    pub fn current(&self, i: usize) -> Option<String> {
        let (_, failing, last) = self.endpoints.get(i)?;
        if !failing.load(Ordering::Relaxed) {
            return None;
        }
        last.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Endpoint `i` failed a handshake for `reason`.
    pub fn failed(&self, i: usize, reason: &str) {
        let Some((endpoint, failing, last)) = self.endpoints.get(i) else {
            return;
        };
        // The flag and the reason change together, under the lock, so that a success and a
        // failure racing cannot leave a reason behind that hides the next warning.
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        failing.store(true, Ordering::Relaxed);
        if last.as_deref() != Some(reason) {
            tracing::warn!(backend = %self.backend, endpoint = %endpoint, %reason, "TLS to the upstream failed; its requests answer 502 until it is fixed (logged once per reason).");
            *last = Some(reason.to_string());
        }
    }

    /// Endpoint `i` answered; the first time after failures is logged. One relaxed load when
    /// nothing failed.
    pub fn ok(&self, i: usize) {
        let Some((endpoint, failing, last)) = self.endpoints.get(i) else {
            return;
        };
        if !failing.load(Ordering::Relaxed) {
            return;
        }
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if failing.swap(false, Ordering::Relaxed) {
            last.take();
            tracing::info!(backend = %self.backend, endpoint = %endpoint, "TLS to the upstream works again.");
        }
    }
}

/// A TLS client for one connection that is not made through [`HttpsConnector`] (a WebSocket
/// to an `https://` endpoint): the settings and the name to check.
pub struct Client {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: Option<ServerName<'static>>,
}

impl Client {
    /// Runs the handshake over `tcp`, checking the certificate against `server_name` or else
    /// `host`.
    pub async fn connect(
        &self,
        host: &str,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
                .to_owned(),
        };
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
    }
}

/// [`HttpsConnector`] with each connection watched: a TLS failure the server reports after the
/// handshake (in TLS 1.3 a refused client certificate arrives with the first read) is recorded
/// against its endpoint in [`Failures`] when the connection reads it, so that the requests
/// the closed connection fails can say why.
#[derive(Clone)]
pub struct WatchedConnector {
    inner: HttpsConnector,
    failures: Arc<Failures>,
}

impl WatchedConnector {
    pub fn new(inner: HttpsConnector, failures: Arc<Failures>) -> Self {
        WatchedConnector { inner, failures }
    }
}

type Tcp = hyper_util::rt::TokioIo<tokio::net::TcpStream>;

impl tower::Service<http::Uri> for WatchedConnector {
    type Response = Watched;
    type Error = crate::BoxError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Watched, crate::BoxError>> + Send + 'static>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let endpoint = self.failures.index(&dst);
        let failures = self.failures.clone();
        let connect = self.inner.call(dst);
        Box::pin(async move {
            Ok(match connect.await? {
                hyper_rustls::MaybeHttpsStream::Http(tcp) => Watched::Plain(tcp),
                hyper_rustls::MaybeHttpsStream::Https(tls) => {
                    Watched::Tls(Box::new(hyper_util::rt::TokioIo::new(Seen {
                        io: tls.into_inner(),
                        failures,
                        endpoint,
                        read_any: false,
                    })))
                }
            })
        })
    }
}

pin_project_lite::pin_project! {
    /// A TLS connection that records how it failed when the server ends it before sending
    /// anything: a TLS alert by its reason; a close (in TLS 1.3 a server that refuses the
    /// client's certificate may close without a word the client reads) as what that means.
    pub struct Seen {
        #[pin]
        io: tokio_rustls::client::TlsStream<hyper_util::rt::TokioIo<Tcp>>,
        failures: Arc<Failures>,
        endpoint: Option<usize>,
        read_any: bool,
    }
}

/// What a TLS connection that the server closed before answering anything most likely means.
const CLOSED_AFTER_HANDSHAKE: &str = "the upstream closed the connection right after the TLS handshake, before answering (a server that requires a client certificate does so when it refuses the gateway's, or gets none: see `tls.cert`)";

impl tokio::io::AsyncRead for Seen {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let read = this.io.poll_read(cx, buf);
        if let std::task::Poll::Ready(r) = &read
            && !*this.read_any
            && let Some(i) = *this.endpoint
        {
            match r {
                Ok(()) if buf.filled().len() > before => *this.read_any = true,
                Ok(()) => this.failures.failed(i, CLOSED_AFTER_HANDSHAKE),
                Err(e) => {
                    this.failures
                        .failed(i, failure(e).as_deref().unwrap_or(CLOSED_AFTER_HANDSHAKE));
                }
            }
        }
        read
    }
}

impl tokio::io::AsyncWrite for Seen {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.project();
        let w = this.io.poll_write(cx, buf);
        note_write(&w, *this.read_any, *this.endpoint, this.failures);
        w
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.project();
        let w = this.io.poll_write_vectored(cx, bufs);
        note_write(&w, *this.read_any, *this.endpoint, this.failures);
        w
    }
}

/// A write that failed before the server sent anything: the server ended the connection
/// (writes see the reset before any read sees the close).
fn note_write<T>(
    w: &std::task::Poll<std::io::Result<T>>,
    read_any: bool,
    endpoint: Option<usize>,
    failures: &Failures,
) {
    if let std::task::Poll::Ready(Err(e)) = w
        && !read_any
        && let Some(i) = endpoint
    {
        failures.failed(i, failure(e).as_deref().unwrap_or(CLOSED_AFTER_HANDSHAKE));
    }
}

/// A connection of [`WatchedConnector`]: in clear to an `http://` endpoint, or TLS.
pub enum Watched {
    Plain(Tcp),
    Tls(Box<hyper_util::rt::TokioIo<Seen>>),
}

macro_rules! each {
    ($self:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            Watched::Plain($io) => {
                let $io = std::pin::Pin::new($io);
                $e
            }
            Watched::Tls($io) => {
                let $io = std::pin::Pin::new(&mut **$io);
                $e
            }
        }
    };
}

impl hyper::rt::Read for Watched {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each!(self, io => io.poll_read(cx, buf))
    }
}

impl hyper::rt::Write for Watched {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        each!(self, io => io.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each!(self, io => io.poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Watched::Plain(io) => io.is_write_vectored(),
            Watched::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        each!(self, io => io.poll_write_vectored(cx, bufs))
    }
}

impl hyper_util::client::legacy::connect::Connection for Watched {
    /// The TCP connection's facts, and HTTP/2 when ALPN agreed on `h2` (as hyper-rustls says).
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        match self {
            Watched::Plain(tcp) => tcp.connected(),
            Watched::Tls(tls) => {
                let (tcp, session) = tls.inner().io.get_ref();
                if session.alpn_protocol() == Some(b"h2") {
                    tcp.inner().connected().negotiated_h2()
                } else {
                    tcp.inner().connected()
                }
            }
        }
    }
}
