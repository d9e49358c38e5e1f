//! Credential redaction for everything the gateway prints: config errors, reload answers,
//! `/config`, `/readyz` problems and logs. Observes the request path without changing it.

use std::borrow::Cow;

/// `text` with the password (or the lone token) of every URL's user info replaced by `***`:
/// `amqp://guest:secret@h/` → `amqp://guest:***@h/`, `https://token@h` → `https://***@h`.
pub fn secrets(text: &str) -> Cow<'_, str> {
    if !text.contains("://") || !text.contains('@') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first `/`, `?`, `#`, quote, or whitespace.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '`' | '"' | '\'') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str("***"),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::secrets;

    #[test]
    fn passwords_and_tokens_are_redacted() {
        assert_eq!(
            secrets("cannot connect to amqp://guest:s3cret@10.0.0.1:5672/%2f: refused"),
            "cannot connect to amqp://guest:***@10.0.0.1:5672/%2f: refused"
        );
        assert_eq!(
            secrets("endpoint `http://tok@h:1` and redis://:pw@r/0"),
            "endpoint `http://***@h:1` and redis://:***@r/0"
        );
        assert_eq!(secrets("no url here, a@b"), "no url here, a@b");
        assert_eq!(secrets("http://h/p@x"), "http://h/p@x");
    }
}
