//! TLS for the public listener (rustls): ALPN `h2` and `http/1.1`, and a certificate resolver
//! whose key pair is reloaded when the files change, so renewals need no restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsError {
    pub path: String,
    pub message: String,
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let err = |p: &Path, m: String| TlsError {
        path: p.display().to_string(),
        message: m,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(cert, format!("cannot read the certificate: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(cert, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(err(cert, "holds no certificate".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| err(key, format!("cannot read the private key: {e}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| err(key, format!("unsupported private key: {e}")))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| err(key, format!("the key does not match the certificate: {e}")))?;
    Ok(ck)
}

#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Loads the key pair, builds the acceptor and starts watching the files (polled every second,
/// which follows symlink swaps as well as rewrites).
///
/// With `client_auth` (the CA bundle, and whether a certificate is required), clients present
/// certificates the CAs signed; the bundle is read once, at start.
pub fn acceptor(
    cert: PathBuf,
    key: PathBuf,
    client_auth: Option<(PathBuf, bool)>,
    shutdown: CancellationToken,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let resolver = Arc::new(CertResolver {
        current: ArcSwap::from_pointee(load(&cert, &key)?),
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError {
            path: cert.display().to_string(),
            message: e.to_string(),
        })?;
    let builder = match client_auth {
        None => builder.with_no_client_auth(),
        Some((ca, required)) => {
            let err = |m: String| TlsError {
                path: ca.display().to_string(),
                message: m,
            };
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(&ca)
                .map_err(|e| err(format!("cannot read the client CA bundle: {e}")))?
            {
                let c = c.map_err(|e| err(format!("not a PEM certificate: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| err(format!("not a CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(err("holds no certificate".into()));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| err(format!("client verification: {e}")))?,
            )
        }
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio::spawn(async move {
        let mut seen = (stamp(&cert), stamp(&key));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => break,
            }
            let now = (stamp(&cert), stamp(&key));
            if now == seen {
                continue;
            }
            seen = now;
            match load(&cert, &key) {
                Ok(ck) => {
                    resolver.current.store(Arc::new(ck));
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded.");
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate reload failed; the previous certificate stays in use.")
                }
            }
        }
    });
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
