//! The pure checks of the `http` bridge's config: its backend section, a route's settings and a
//! WebSocket route's, each problem placed at its line and column. Run at load time, before
//! anything is built; no I/O.

use http::Uri;

use crate::config::model::*;
use crate::config::template::{PathTemplate, Template};
use crate::config::validate::{Checks, USERINFO_HTTP, has_userinfo};

pub(crate) fn validate_http_route(
    cx: &mut Checks,
    base: &str,
    id: Option<&str>,
    h: &HttpRouteSpec,
    template: Option<&PathTemplate>,
) {
    if h.strip_prefix.is_some() && h.rewrite.is_some() {
        cx.err(
            &format!("{base}.http.rewrite"),
            id,
            "use either `strip_prefix` or `rewrite`, not both",
        );
    }
    if let Some(p) = &h.strip_prefix
        && !p.starts_with('/')
    {
        cx.err(
            &format!("{base}.http.strip_prefix"),
            id,
            "a prefix starts with `/`",
        );
    }
    if let Some(rw) = &h.rewrite {
        let path = format!("{base}.http.rewrite");
        match Template::parse(rw) {
            Err(e) => cx.err(&path, id, e),
            Ok(t) => {
                if !rw.starts_with('/') {
                    cx.err(&path, id, "a rewrite template starts with `/`");
                }
                let captured = template.map(|t| t.captures()).unwrap_or_default();
                for v in t.vars() {
                    if template.is_some() && !captured.contains(&v) {
                        cx.err(
                            &path,
                            id,
                            format!(
                                "`{{{v}}}` is not captured by the path `{}`; captured: {}",
                                template.map(|t| t.raw.as_str()).unwrap_or(""),
                                if captured.is_empty() {
                                    "none".to_string()
                                } else {
                                    captured.join(", ")
                                }
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// The checks of an `http` backend's section, at `base` (`backends.<name>`).
pub(crate) fn validate_http_backend(cx: &mut Checks, base: &str, h: &HttpBackendSpec) {
    if h.endpoints.is_empty() {
        cx.err(
            base,
            None,
            "an http backend needs at least one entry in `endpoints`",
        );
    }
    for (i, ep) in h.endpoints.iter().enumerate() {
        let path = format!("{base}.endpoints[{i}]");
        match ep.parse::<Uri>() {
            Ok(u) if has_userinfo(&u) => cx.err(&path, None, USERINFO_HTTP),
            Ok(u)
                if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() =>
            {
                if u.query().is_some() {
                    cx.err(&path, None, format!("endpoint `{ep}`: an endpoint has no query string"));
                }
            }
            _ => cx.err(
                &path,
                None,
                format!(
                    "endpoint `{ep}` is not a URL like `http://127.0.0.1:9000` or `https://api.internal`"
                ),
            ),
        }
    }
    if let Some(tls) = &h.tls {
        let https = h.endpoints.iter().any(|e| e.starts_with("https://"));
        validate_client_tls(cx, &format!("{base}.tls"), tls, https);
    }
    if h.connect_timeout.0.is_zero() {
        cx.err(
            &format!("{base}.connect_timeout"),
            None,
            "must be above zero",
        );
    }
    if h.probe_interval.0.is_zero() {
        cx.err(
            &format!("{base}.probe_interval"),
            None,
            "must be above zero",
        );
    }
}

/// The checks of a client `tls` block at `path`, for a destination that is `https` or not.
pub(crate) fn validate_client_tls(cx: &mut Checks, path: &str, tls: &ClientTlsSpec, https: bool) {
    if !https {
        cx.err(
            path,
            None,
            "`tls` applies to `https://` endpoints, and this backend has none",
        );
    }
    if tls.cert.is_some() != tls.key.is_some() {
        cx.err(
            path,
            None,
            "a client certificate needs both `cert` and `key`",
        );
    }
    if let Some(name) = &tls.server_name
        && let Err(e) = crate::backends::tls::server_name(name)
    {
        cx.err(&format!("{path}.server_name"), None, e);
    }
}
