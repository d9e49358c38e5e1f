//! Path normalisation, the first thing the front end does to a request path and before any
//! matching: decode unreserved percent-escapes, merge `//`, resolve `.`/`..`, apply the
//! encoded-slash policy, and refuse NUL, CR and LF in any form.

use std::borrow::Cow;

use crate::config::EncodedSlash;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path holds an invalid percent-escape")]
    BadEscape,
    #[error("the path holds a NUL, CR or LF character")]
    ControlChar,
    #[error("the path climbs above the root with `..`")]
    AboveRoot,
    #[error("the path holds an encoded slash (%2F), which this gateway refuses")]
    EncodedSlash,
    #[error("the path does not start with `/`")]
    NotAbsolute,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalises `path` (the part of the request target before `?`). The result is what is matched
/// and what is forwarded, so the backend sees exactly what the router saw.
pub fn normalize(path: &str, slash: EncodedSlash) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    rewrite(path, slash).map(Cow::Owned)
}

/// The normal form of an absolute path that is not already normal.
fn rewrite(path: &str, slash: EncodedSlash) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    // Decode escapes of unreserved characters, upper-case the others; every other byte (UTF-8
    // included) is kept as written.
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            0 | b'\r' | b'\n' => return Err(PathError::ControlChar),
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let v = h * 16 + l;
                match v {
                    0 | b'\r' | b'\n' => return Err(PathError::ControlChar),
                    b'/' => match slash {
                        EncodedSlash::Reject => return Err(PathError::EncodedSlash),
                        EncodedSlash::Decode => decoded.push(b'/'),
                        EncodedSlash::Keep => decoded.extend_from_slice(b"%2F"),
                    },
                    v if unreserved(v) => decoded.push(v),
                    v => {
                        decoded.push(b'%');
                        decoded.push(b"0123456789ABCDEF"[(v >> 4) as usize]);
                        decoded.push(b"0123456789ABCDEF"[(v & 15) as usize]);
                    }
                }
                i += 3;
            }
            _ => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII was decoded from escapes, so the UTF-8 of `path` is intact.
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::BadEscape)?;
    // Merge `//`, resolve `.` and `..` (RFC 3986 §5.2.4); `..` above the root is refused.
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if result.is_empty() || (trailing && !out.is_empty()) {
        result.push('/');
    }
    Ok(result)
}

/// Whether an absolute path is its own normal form (most are): no escapes or control
/// characters, no empty segment but the last, no `.` or `..` segment.
fn is_normal(path: &str) -> bool {
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if (seg.is_empty() && !last) || seg == "." || seg == ".." {
            return false;
        }
    }
    !path.bytes().any(|b| matches!(b, b'%' | 0 | b'\r' | b'\n'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use EncodedSlash::*;

    #[test]
    fn table() {
        let cases: &[(&str, EncodedSlash, Result<&str, PathError>)] = &[
            ("/", Keep, Ok("/")),
            ("/a/b", Keep, Ok("/a/b")),
            ("//a///b", Keep, Ok("/a/b")),
            ("/a/./b", Keep, Ok("/a/b")),
            ("/a/../b", Keep, Ok("/b")),
            ("/a/b/..", Keep, Ok("/a/")),
            ("/a/", Keep, Ok("/a/")),
            ("/..", Keep, Err(PathError::AboveRoot)),
            ("/a/../../etc/passwd", Keep, Err(PathError::AboveRoot)),
            ("/%2e%2e/etc", Keep, Err(PathError::AboveRoot)),
            ("/a/%2E%2E/b", Keep, Ok("/b")),
            ("/%61%62c", Keep, Ok("/abc")),
            ("/caf\u{e9}//x", Keep, Ok("/caf\u{e9}/x")),
            ("/a%2fb", Keep, Ok("/a%2Fb")),
            ("/a%2Fb", Decode, Ok("/a/b")),
            ("/a%2F..%2F..%2Fb", Decode, Err(PathError::AboveRoot)),
            ("/a%2Fb", Reject, Err(PathError::EncodedSlash)),
            ("/a%20b", Keep, Ok("/a%20b")),
            ("/a%3cb", Keep, Ok("/a%3Cb")),
            ("/a%zz", Keep, Err(PathError::BadEscape)),
            ("/a%4", Keep, Err(PathError::BadEscape)),
            ("/a%00b", Keep, Err(PathError::ControlChar)),
            ("/a%0d%0ab", Keep, Err(PathError::ControlChar)),
            ("a", Keep, Err(PathError::NotAbsolute)),
        ];
        for (input, policy, want) in cases {
            assert_eq!(
                normalize(input, *policy).as_deref().map_err(Clone::clone),
                want.clone(),
                "{input} {policy:?}"
            );
        }
    }

    #[test]
    fn the_shortcut_for_normal_paths_agrees_with_the_rewrite() {
        let parts = [
            "a", "", ".", "..", "%41", "b.", "..c", "%2F", "café", "é%C3%A9",
        ];
        let mut paths = vec!["/".to_string()];
        for x in parts {
            for y in parts {
                for z in parts {
                    paths.push(format!("/{x}/{y}/{z}"));
                    paths.push(format!("/{x}/{y}"));
                }
            }
        }
        for p in paths {
            let full = rewrite(&p, Keep);
            let got = normalize(&p, Keep).map(|c| c.into_owned());
            assert_eq!(got, full, "{p}");
        }
    }
}
