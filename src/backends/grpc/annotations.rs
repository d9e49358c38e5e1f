//! Routes from `google.api.http` annotations: each annotated method (and each of its
//! `additional_bindings`) becomes a route, following the HttpRule rules of googleapis
//! `google/api/http.proto` — verbs, `{field.path=segments/*/**}` variables, custom verbs
//! (`:cancel`), `body` and `response_body`. Read when the backend's descriptors load; the
//! template itself is a [`RuleTemplate`], which the router matches.

use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor, Value};

use crate::config::template::RuleTemplate;

/// One HTTP binding of a method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBinding {
    pub method: String,
    /// The path template, as written.
    pub rule: RuleTemplate,
    pub body: String,
    pub response_body: String,
}

fn str_field(m: &DynamicMessage, name: &str) -> String {
    m.get_field_by_name(name)
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The bindings of `method` (none when it carries no `google.api.http` option), each read on
/// its own: one that cannot be served is its reason, and does not take the others with it.
pub fn bindings(
    pool: &DescriptorPool,
    method: &MethodDescriptor,
) -> Vec<Result<HttpBinding, String>> {
    let Some(ext) = pool.get_extension_by_name("google.api.http") else {
        return vec![];
    };
    let options = method.options();
    if !options.has_extension(&ext) {
        return vec![];
    }
    let Value::Message(rule) = options.get_extension(&ext).into_owned() else {
        return vec![];
    };
    let mut out = vec![binding(&rule)];
    if let Some(list) = rule.get_field_by_name("additional_bindings")
        && let Some(items) = list.as_list()
    {
        out.extend(items.iter().filter_map(|i| i.as_message()).map(binding));
    }
    out
}

fn binding(rule_msg: &DynamicMessage) -> Result<HttpBinding, String> {
    let mut found = None;
    for verb in ["get", "put", "post", "delete", "patch"] {
        let p = str_field(rule_msg, verb);
        if !p.is_empty() {
            found = Some((verb.to_ascii_uppercase(), p));
        }
    }
    if found.is_none()
        && let Some(custom) = rule_msg
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
    let rule =
        RuleTemplate::parse(&template).map_err(|e| format!("HTTP template `{template}`: {e}"))?;
    Ok(HttpBinding {
        method,
        rule,
        body: str_field(rule_msg, "body"),
        response_body: str_field(rule_msg, "response_body"),
    })
}
