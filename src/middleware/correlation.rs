//! Correlation IDs and W3C trace context, assigned by the front end before routing so that every
//! answer (including 404s and errors from the edge) carries them, and forwarded to backends.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

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

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The trace id and flags of a valid `traceparent` (version `00`–`fe`, ids not all zeros).
fn parse_traceparent(tp: &str) -> Option<(&str, &str)> {
    let mut it = tp.trim().split('-');
    let (version, trace, parent, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let zeros = |s: &str| s.bytes().all(|b| b == b'0');
    (is_hex(version, 2)
        && version != "ff"
        && is_hex(trace, 32)
        && !zeros(trace)
        && is_hex(parent, 16)
        && !zeros(parent)
        && is_hex(flags, 2))
    .then_some((trace, flags))
}

/// Continues the client's trace with a new span ID, or starts a new trace. Returns the
/// `traceparent` to forward. Written digit by digit (every request makes one).
pub fn next_traceparent(headers: &HeaderMap) -> HeaderValue {
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let incoming = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    match incoming {
        Some((trace, flags)) => {
            buf[3..35].copy_from_slice(trace.as_bytes());
            buf[53..55].copy_from_slice(flags.as_bytes());
        }
        None => hex_into(&mut buf[3..35], fastrand::u128(1..)),
    }
    hex_into(&mut buf[36..52], u128::from(fastrand::u64(1..)));
    HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
}

/// The trace id and the span id of a `traceparent` [`next_traceparent`] made.
pub fn trace_ids(traceparent: &HeaderValue) -> (&str, &str) {
    let s = traceparent.to_str().unwrap_or("");
    (s.get(3..35).unwrap_or(""), s.get(36..52).unwrap_or(""))
}

/// Writes the low `out.len()` hex digits of `v` into `out`, lower case.
fn hex_into(out: &mut [u8], mut v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_valid_traces_and_starts_new_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let tp = next_traceparent(&h);
        let s = tp.to_str().unwrap();
        assert!(s.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!s.contains("00f067aa0ba902b7"));
        h.insert(&TRACEPARENT, HeaderValue::from_static("garbage"));
        let s = next_traceparent(&h).to_str().unwrap().to_string();
        assert_eq!(s.len(), 55);
        assert!(parse_traceparent(&s).is_some(), "{s}");
        // The client's flags are kept; the span is new, hex, and not all zeros.
        h.insert(
            &TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        let s = next_traceparent(&h).to_str().unwrap().to_string();
        assert!(s.ends_with("-00") && parse_traceparent(&s).is_some(), "{s}");
    }

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
