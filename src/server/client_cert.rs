//! A client's verified certificate (mutual TLS on the public listener), read once per
//! connection right after the handshake: its subject, common name, SANs and SHA-256 hash, and
//! the `X-Forwarded-Client-Cert` value (Envoy's format) every request of the connection
//! carries to its backend. The `client_cert` plugin and templates (`{client_cert.cn}`) read it
//! from the request's context.

use std::fmt::Write;

use http::HeaderValue;
use sha2::Digest;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// What a client's certificate says about it (kept with a spooled request or a job, for the
/// templates that read it when it is sent later).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClientCert {
    /// The subject, RFC 4514 style (`CN=svc-a,O=Acme`).
    pub subject: String,
    /// The subject's attributes, as (short name, value) pairs (`("CN", "svc-a")`).
    pub attributes: Vec<(String, String)>,
    pub dns: Vec<String>,
    pub uri: Vec<String>,
    pub email: Vec<String>,
    pub ip: Vec<String>,
    /// SHA-256 of the certificate's DER, lower-case hex.
    pub hash: String,
    /// `X-Forwarded-Client-Cert` (not kept: the request's headers carry it).
    #[serde(skip)]
    pub xfcc: Option<HeaderValue>,
}

impl ClientCert {
    /// Reads a certificate the TLS handshake verified. `None` when it cannot be parsed (then
    /// the connection is served as one without a certificate).
    pub fn parse(der: &[u8]) -> Option<ClientCert> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut attributes = Vec::new();
        for rdn in cert.subject().iter() {
            for a in rdn.iter() {
                let name = x509_parser::objects::oid2abbrev(
                    a.attr_type(),
                    x509_parser::objects::oid_registry(),
                )
                .map(str::to_string)
                .unwrap_or_else(|_| a.attr_type().to_id_string());
                let value = a.as_str().map(str::to_string).unwrap_or_default();
                attributes.push((name, value));
            }
        }
        let subject = attributes
            .iter()
            .rev()
            .map(|(k, v)| format!("{k}={}", escape_dn(v)))
            .collect::<Vec<_>>()
            .join(",");
        let (mut dns, mut uri, mut email, mut ip) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => dns.push(d.to_string()),
                    GeneralName::URI(u) => uri.push(u.to_string()),
                    GeneralName::RFC822Name(e) => email.push(e.to_string()),
                    GeneralName::IPAddress(b) => {
                        let addr = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            _ => None,
                        };
                        if let Some(a) = addr {
                            ip.push(a.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut hash = String::with_capacity(64);
        for b in sha2::Sha256::digest(der) {
            let _ = write!(hash, "{b:02x}");
        }
        let mut c = ClientCert {
            subject,
            attributes,
            dns,
            uri,
            email,
            ip,
            hash,
            xfcc: None,
        };
        c.xfcc = HeaderValue::from_str(&c.forwarded()).ok();
        Some(c)
    }

    /// The subject's common name, if it has one.
    pub fn cn(&self) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == "CN")
            .map(|(_, v)| v.as_str())
    }

    /// `X-Forwarded-Client-Cert` as Envoy writes it: `Hash=…;Subject="…";URI=…;DNS=…`.
    fn forwarded(&self) -> String {
        let mut out = format!("Hash={};Subject={}", self.hash, quote(&self.subject));
        for u in &self.uri {
            let _ = write!(out, ";URI={}", quoted(u));
        }
        for d in &self.dns {
            let _ = write!(out, ";DNS={}", quoted(d));
        }
        out
    }

    /// Every SAN, of every kind.
    pub fn sans(&self) -> impl Iterator<Item = &str> {
        self.dns
            .iter()
            .chain(&self.uri)
            .chain(&self.email)
            .chain(&self.ip)
            .map(String::as_str)
    }
}

/// An XFCC value, quoted when it holds a separator, a quote or a backslash.
fn quoted(v: &str) -> String {
    if v.contains([',', ';', '=', '"', '\\']) {
        quote(v)
    } else {
        v.to_string()
    }
}

/// `v` in double quotes, its backslashes and quotes escaped (each once), so that nothing in
/// it can end the quoted value.
fn quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// An attribute value as RFC 4514 writes it.
fn escape_dn(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_subject_sans_and_hash() {
        let mut p = rcgen::CertificateParams::new(vec!["svc-a.internal".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "svc-a");
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme, Inc");
        p.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://acme/ns/default/sa/svc-a".try_into().unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let c = ClientCert::parse(cert.der()).unwrap();
        assert_eq!(c.cn(), Some("svc-a"));
        assert!(c.subject.contains("CN=svc-a"), "{}", c.subject);
        assert!(c.subject.contains("O=Acme\\, Inc"), "{}", c.subject);
        assert_eq!(c.dns, ["svc-a.internal"]);
        assert_eq!(c.uri, ["spiffe://acme/ns/default/sa/svc-a"]);
        assert_eq!(c.hash.len(), 64);
        let xfcc = c.xfcc.unwrap();
        let xfcc = xfcc.to_str().unwrap();
        assert!(
            xfcc.starts_with(&format!("Hash={};Subject=\"", c.hash)),
            "{xfcc}"
        );
        assert!(
            xfcc.ends_with(";URI=spiffe://acme/ns/default/sa/svc-a;DNS=svc-a.internal"),
            "{xfcc}"
        );
        // The subject's own escape (`\,`) is escaped once more inside the quotes, and nothing
        // a certificate holds can end a quoted value.
        assert!(xfcc.contains(r#"O=Acme\\, Inc"#), "{xfcc}");
        assert_eq!(quote(r#"a\";URI=x"#), r#""a\\\";URI=x""#);
    }
}
