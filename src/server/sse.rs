//! Server-Sent Events, written one way for every stream the front end answers with: an MQTT
//! subscription, a gRPC server-streaming reply (`Accept: text/event-stream`) and the
//! `shutdown` event that ends them when the gateway drains.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};

/// One event. Fields are written in the order `id`, `event`, `data`, `retry`.
#[derive(Debug, Default)]
pub struct Event<'a> {
    pub id: Option<u64>,
    pub name: Option<&'a str>,
    pub data: &'a [u8],
    /// How long a client waits before it reconnects, in milliseconds.
    pub retry_ms: Option<u64>,
}

impl Event<'_> {
    /// The event on the wire. Data with line breaks becomes one `data:` line per line, as the
    /// format requires; a name with one is cut at it, so it cannot start another field.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.data.len() + 32);
        if let Some(id) = self.id {
            out.extend_from_slice(format!("id: {id}\n").as_bytes());
        }
        if let Some(name) = self.name {
            let name = name.split(['\r', '\n']).next().unwrap_or_default();
            out.extend_from_slice(format!("event: {name}\n").as_bytes());
        }
        for line in self.data.split(|b| *b == b'\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
            out.push(b'\n');
        }
        if let Some(ms) = self.retry_ms {
            out.extend_from_slice(format!("retry: {ms}\n").as_bytes());
        }
        out.push(b'\n');
        Bytes::from(out)
    }
}

/// A comment line that keeps idle proxies from closing the stream.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// The headers of an event stream: its type, no caching, and no buffering by proxies that
/// honour `X-Accel-Buffering`.
pub fn set_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_in_order_and_lines_split() {
        let e = Event {
            id: Some(3),
            name: Some("message"),
            data: b"{\"a\":1}",
            retry_ms: None,
        };
        assert_eq!(
            &e.to_bytes()[..],
            b"id: 3\nevent: message\ndata: {\"a\":1}\n\n"
        );
        let e = Event {
            name: Some("shutdown\nid: 9"),
            data: b"one\r\ntwo",
            retry_ms: Some(1000),
            ..Default::default()
        };
        assert_eq!(
            &e.to_bytes()[..],
            b"event: shutdown\ndata: one\ndata: two\nretry: 1000\n\n"
        );
    }
}
