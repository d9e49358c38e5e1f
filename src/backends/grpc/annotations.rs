//! Routes from `google.api.http` annotations: each annotated method (and each of its
//! `additional_bindings`) becomes a route, following the HttpRule rules of googleapis
//! `google/api/http.proto` — verbs, `{field.path=segments/*/**}` variables, custom verbs
//! (`:cancel`), `body` and `response_body`. Built when the backend's descriptors load.

use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, Value};

/// One HTTP binding of a method, in the router's own template syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBinding {
    pub method: String,
    /// Router template: `/v1/shelves/{v0_0}/books/{v1}`.
    pub path: String,
    /// A custom verb after the last variable (`cancel` in `/v1/{name}:cancel`).
    pub verb: Option<String>,
    /// Request fields and how their values are assembled from the template's variables:
    /// (`name`, `shelves/{v0_0}`).
    pub fields: Vec<(String, String)>,
    pub body: String,
    pub response_body: String,
}

fn str_field(m: &DynamicMessage, name: &str) -> String {
    m.get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The bindings of `method`, or none when it carries no `google.api.http` option.
pub fn bindings(
    pool: &DescriptorPool,
    method: &MethodDescriptor,
) -> Result<Vec<HttpBinding>, String> {
    let Some(ext) = pool.get_extension_by_name("google.api.http") else {
        return Ok(vec![]);
    };
    let options = method.options();
    if !options.has_extension(&ext) {
        return Ok(vec![]);
    }
    let Value::Message(rule) = options.get_extension(&ext).into_owned() else {
        return Ok(vec![]);
    };
    let mut out = vec![binding(&rule)?];
    if let Some(list) = rule.get_field_by_name("additional_bindings")
        && let Some(items) = list.as_list()
    {
        for item in items {
            if let Some(m) = item.as_message() {
                out.push(binding(m)?);
            }
        }
    }
    Ok(out)
}

fn binding(rule: &DynamicMessage) -> Result<HttpBinding, String> {
    let mut found = None;
    for verb in ["get", "put", "post", "delete", "patch"] {
        let p = str_field(rule, verb);
        if !p.is_empty() {
            found = Some((verb.to_ascii_uppercase(), p));
        }
    }
    if found.is_none()
        && let Some(custom) = rule
            .get_field_by_name("custom")
            .and_then(|v| v.as_message().cloned())
    {
        let kind = str_field(&custom, "kind");
        if !kind.is_empty() {
            found = Some((kind.to_ascii_uppercase(), str_field(&custom, "path")));
        }
    }
    let (method, template) =
        found.ok_or("an HttpRule without a pattern (get, put, post, delete, patch or custom)")?;
    let Converted { path, verb, fields } = convert(&template)?;
    Ok(HttpBinding {
        method,
        path,
        verb,
        fields,
        body: str_field(rule, "body"),
        response_body: str_field(rule, "response_body"),
    })
}

/// An HttpRule template in the router's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    pub path: String,
    pub verb: Option<String>,
    pub fields: Vec<(String, String)>,
}

/// Converts an HttpRule path template into the router's syntax.
pub fn convert(template: &str) -> Result<Converted, String> {
    let bad = |why: &str| format!("HTTP template `{template}`: {why}");
    let rest = template
        .strip_prefix('/')
        .ok_or_else(|| bad("it must start with `/`"))?;
    // A verb is a `:literal` after the last segment, outside any variable.
    let (body, verb) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains(['/', '}']) => (&rest[..i], Some(rest[i + 1..].to_string())),
        _ => (rest, None),
    };
    let mut segments: Vec<String> = Vec::new();
    let mut fields = Vec::new();
    let mut anon = 0;
    let mut chars = body;
    let mut var_index = 0;
    while !chars.is_empty() {
        if let Some(after) = chars.strip_prefix('{') {
            let end = after.find('}').ok_or_else(|| bad("unclosed `{`"))?;
            let inner = &after[..end];
            chars = after[end + 1..]
                .strip_prefix('/')
                .unwrap_or(&after[end + 1..]);
            let (field, pattern) = inner.split_once('=').unwrap_or((inner, "*"));
            if field.is_empty()
                || !field
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            {
                return Err(bad("a variable names a field path like `{book.name}`"));
            }
            let mut assembled = Vec::new();
            for (j, seg) in pattern.split('/').enumerate() {
                let name = format!("v{var_index}_{j}");
                match seg {
                    "*" => {
                        segments.push(format!("{{{name}}}"));
                        assembled.push(format!("{{{name}}}"));
                    }
                    "**" => {
                        segments.push(format!("{{*{name}}}"));
                        assembled.push(format!("{{{name}}}"));
                    }
                    lit if !lit.is_empty() && !lit.contains(['{', '}', '*']) => {
                        segments.push(lit.to_string());
                        assembled.push(lit.to_string());
                    }
                    _ => {
                        return Err(bad(
                            "a variable's pattern is made of literals, `*` and `**`",
                        ));
                    }
                }
            }
            fields.push((field.to_string(), assembled.join("/")));
            var_index += 1;
        } else {
            let end = chars.find('/').unwrap_or(chars.len());
            let seg = &chars[..end];
            chars = chars[end..].strip_prefix('/').unwrap_or(&chars[end..]);
            match seg {
                "*" => {
                    segments.push(format!("{{_a{anon}}}"));
                    anon += 1;
                }
                "**" => {
                    segments.push(format!("{{*_a{anon}}}"));
                    anon += 1;
                }
                s if s.is_empty() || s.contains(['{', '}', '*']) => {
                    return Err(bad("empty or malformed segment"));
                }
                s => segments.push(s.to_string()),
            }
        }
    }
    let mut path = format!("/{}", segments.join("/"));
    // A verb after a literal last segment is part of that literal.
    let verb = match verb {
        Some(v) if !segments.last().is_some_and(|s| s.starts_with('{')) => {
            path.push(':');
            path.push_str(&v);
            None
        }
        v => v,
    };
    Ok(Converted { path, verb, fields })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(path: &str, verb: Option<&str>, fields: &[(&str, &str)]) -> Converted {
        Converted {
            path: path.into(),
            verb: verb.map(Into::into),
            fields: fields
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn converts_http_rule_templates() {
        assert_eq!(
            convert("/v1/{name=shelves/*/books/*}").unwrap(),
            c(
                "/v1/shelves/{v0_1}/books/{v0_3}",
                None,
                &[("name", "shelves/{v0_1}/books/{v0_3}")]
            )
        );
        assert_eq!(
            convert("/v1/orders/{id}:cancel").unwrap(),
            c("/v1/orders/{v0_0}", Some("cancel"), &[("id", "{v0_0}")])
        );
        assert_eq!(
            convert("/v1/orders:search").unwrap(),
            c("/v1/orders:search", None, &[])
        );
        assert_eq!(
            convert("/v1/{book.name=**}").unwrap(),
            c("/v1/{*v0_0}", None, &[("book.name", "{v0_0}")])
        );
        assert_eq!(convert("/v1/*/x").unwrap(), c("/v1/{_a0}/x", None, &[]));
        assert!(convert("v1/x").is_err());
        assert!(convert("/v1/{x=a{b}").is_err());
    }
}
