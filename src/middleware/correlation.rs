//! Correlation IDs, assigned by the front end before routing so that every answer (including
//! 404s and errors from the edge) carries one, and forwarded to backends. The W3C trace
//! context is `telemetry::otel`'s.

use std::sync::Arc;

use http::{HeaderMap, HeaderName};

/// Accepts the client's correlation ID when it is sane (1–128 visible ASCII characters),
/// otherwise mints a UUIDv7.
pub fn correlation_id(headers: &HeaderMap, header: &HeaderName) -> Arc<str> {
    if let Some(v) = headers.get(header).and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 128
        && v.bytes().all(|b| b.is_ascii_graphic())
    {
        return Arc::from(v);
    }
    let mut buf = uuid::Uuid::encode_buffer();
    Arc::from(&*uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn rejects_unsafe_client_ids() {
        let name = HeaderName::from_static("x-request-id");
        let mut h = HeaderMap::new();
        h.insert(&name, HeaderValue::from_static("abc-123"));
        assert_eq!(&*correlation_id(&h, &name), "abc-123");
        h.insert(&name, HeaderValue::from_static("has space"));
        assert_ne!(&*correlation_id(&h, &name), "has space");
    }
}
