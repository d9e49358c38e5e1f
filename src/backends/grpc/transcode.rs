//! JSON ⇄ protobuf transcoding for the gRPC bridge: path variables, query parameters and the
//! JSON body become one request message (proto3 JSON mapping), and the reply becomes JSON.
//! Every mistake is reported with the path of the field it concerns.

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    SerializeOptions, Value,
};

/// A request that does not fit the message: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
    /// The field does not exist (a query parameter that may be ignored).
    pub unknown: bool,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
            unknown: false,
        }
    }
}

/// How JSON is read and written: a backend's `transcoding` with its route's over it, each
/// setting resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    pub emit_defaults: bool,
    pub enums_as_numbers: bool,
    pub proto_names: bool,
    pub case_insensitive_enums: bool,
    pub ignore_unknown_query_parameters: bool,
    pub allow_unknown_body_fields: bool,
    pub query_unescape_plus: bool,
}

impl Options {
    /// A route's settings: its `emit_defaults` and `proto_names` shorthands, over its own
    /// `transcoding`, over its backend's.
    pub fn for_route(
        emit_defaults: Option<bool>,
        proto_names: Option<bool>,
        route: crate::config::TranscodingSpec,
        backend: crate::config::TranscodingSpec,
    ) -> Options {
        Options::from_spec(
            crate::config::TranscodingSpec {
                emit_defaults,
                proto_names,
                ..Default::default()
            }
            .over(route)
            .over(backend),
        )
    }

    fn from_spec(t: crate::config::TranscodingSpec) -> Options {
        Options {
            emit_defaults: t.emit_defaults.unwrap_or(false),
            enums_as_numbers: t.enums_as_numbers.unwrap_or(false),
            proto_names: t.proto_names.unwrap_or(false),
            case_insensitive_enums: t.case_insensitive_enums.unwrap_or(false),
            ignore_unknown_query_parameters: t.ignore_unknown_query_parameters.unwrap_or(false),
            allow_unknown_body_fields: t.allow_unknown_body_fields.unwrap_or(false),
            query_unescape_plus: t.query_unescape_plus.unwrap_or(false),
        }
    }

    pub(super) fn print(&self) -> SerializeOptions {
        SerializeOptions::new()
            .skip_default_fields(!self.emit_defaults)
            .use_proto_field_name(self.proto_names)
            .use_enum_numbers(self.enums_as_numbers)
    }
}

/// A field by its proto name or its lowerCamel JSON name.
pub fn field_by_name(desc: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    desc.get_field_by_name(name)
        .or_else(|| desc.get_field_by_json_name(name))
}

/// The message a request body fills: for `google.api.HttpBody`, the bytes as they came and
/// their content type; for any other message, the body parsed as proto3 JSON.
pub fn message_from_body(
    desc: MessageDescriptor,
    body: &[u8],
    content_type: &str,
    opts: &Options,
) -> Result<DynamicMessage, FieldError> {
    if desc.full_name() != "google.api.HttpBody" {
        return message_from_json(desc, body, opts);
    }
    Ok(http_body(desc, body, content_type))
}

/// A `google.api.HttpBody` holding `body` as it is.
fn http_body(desc: MessageDescriptor, body: &[u8], content_type: &str) -> DynamicMessage {
    let mut msg = DynamicMessage::new(desc);
    msg.set_field_by_name(
        "content_type",
        prost_reflect::Value::String(content_type.to_string()),
    );
    msg.set_field_by_name(
        "data",
        prost_reflect::Value::Bytes(bytes::Bytes::copy_from_slice(body)),
    );
    msg
}

/// Parses JSON into a message of `desc`, refusing unknown fields unless `opts` allows them.
pub fn message_from_json(
    desc: MessageDescriptor,
    json: &[u8],
    opts: &Options,
) -> Result<DynamicMessage, FieldError> {
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(desc));
    }
    // Enum names in any case: each is rewritten as the enum spells it, then parsed as usual.
    let fixed;
    let json = if opts.case_insensitive_enums {
        let mut value: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| FieldError::new("", format!("the body is not JSON: {e}")))?;
        spell_enums(&desc, &mut value);
        fixed = serde_json::to_vec(&value).map_err(|e| FieldError::new("", e.to_string()))?;
        fixed.as_slice()
    } else {
        json
    };
    let mut de = serde_json::Deserializer::from_slice(json);
    let mut track = serde_path_to_error::Track::new();
    let options = DeserializeOptions::new().deny_unknown_fields(!opts.allow_unknown_body_fields);
    let msg = DynamicMessage::deserialize_with_options(
        desc,
        serde_path_to_error::Deserializer::new(&mut de, &mut track),
        &options,
    )
    .map_err(|e| {
        let path = track.path().to_string();
        let mut field = if path == "." { String::new() } else { path };
        let message = e.to_string();
        // An unknown key is not on the tracked path yet; name it.
        if let Some(name) = message
            .strip_prefix("unrecognized field name '")
            .and_then(|r| r.split_once('\''))
            .map(|(n, _)| n)
        {
            field = if field.is_empty() {
                name.to_string()
            } else {
                format!("{field}.{name}")
            };
        }
        FieldError::new(field, message)
    })?;
    de.end().map_err(|e| {
        FieldError::new("", format!("trailing characters after the JSON body: {e}"))
    })?;
    Ok(msg)
}

/// Parses a body that is the JSON value of one field (`body: "text"` naming a scalar, repeated
/// or map field) into a message of `desc` with that field set. The body is read as one JSON
/// value first, so that it can never set another field.
pub fn field_from_json(
    desc: MessageDescriptor,
    field: &FieldDescriptor,
    json: &[u8],
    opts: &Options,
) -> Result<DynamicMessage, FieldError> {
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(desc));
    }
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| {
        FieldError::new(field.name(), format!("the body is not one JSON value: {e}"))
    })?;
    let wrapped =
        serde_json::Value::Object([(field.name().to_string(), value)].into_iter().collect());
    let bytes =
        serde_json::to_vec(&wrapped).map_err(|e| FieldError::new(field.name(), e.to_string()))?;
    message_from_json(desc, &bytes, opts)
}

/// The JSON value of one field of `msg` (`response_body` naming a scalar, repeated or map
/// field), its default when unset.
pub fn field_to_json(
    msg: &DynamicMessage,
    field: &FieldDescriptor,
    opts: &Options,
) -> Result<Vec<u8>, String> {
    let options = opts.print().skip_default_fields(false);
    let whole = msg
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| e.to_string())?;
    let key = if opts.proto_names {
        field.name()
    } else {
        field.json_name()
    };
    serde_json::to_vec(&whole[key]).map_err(|e| e.to_string())
}

/// Rewrites, in a JSON body for `desc`, each enum name written in another case as the enum
/// spells it (`mail` → `MAIL`); what is no enum name is left for the parser to refuse.
fn spell_enums(desc: &MessageDescriptor, value: &mut serde_json::Value) {
    let serde_json::Value::Object(map) = value else {
        return;
    };
    for (key, v) in map.iter_mut() {
        let Some(field) = field_by_name(desc, key) else {
            continue;
        };
        let kind = if field.is_map() {
            match field.kind() {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                k => k,
            }
        } else {
            field.kind()
        };
        let fix = |v: &mut serde_json::Value| match (&kind, v) {
            (Kind::Enum(e), serde_json::Value::String(s)) => {
                if let Some(found) = e.values().find(|x| x.name().eq_ignore_ascii_case(s)) {
                    *s = found.name().to_string();
                }
            }
            (Kind::Message(m), v) => spell_enums(m, v),
            _ => {}
        };
        match v {
            serde_json::Value::Array(items) if field.is_list() => items.iter_mut().for_each(fix),
            serde_json::Value::Object(entries) if field.is_map() => {
                entries.values_mut().for_each(fix)
            }
            v => fix(v),
        }
    }
}

fn scalar(
    field: &FieldDescriptor,
    path: &str,
    raw: &str,
    opts: &Options,
) -> Result<Value, FieldError> {
    let bad = |what: &str| FieldError::new(path, format!("`{raw}` is not {what}"));
    Ok(match field.kind() {
        Kind::String => Value::String(raw.to_string()),
        Kind::Bool => match raw {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(bad("`true` or `false`")),
        },
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(raw.parse().map_err(|_| bad("a 32-bit integer"))?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(raw.parse().map_err(|_| bad("a 64-bit integer"))?)
        }
        Kind::Uint32 | Kind::Fixed32 => {
            Value::U32(raw.parse().map_err(|_| bad("an unsigned 32-bit integer"))?)
        }
        Kind::Uint64 | Kind::Fixed64 => {
            Value::U64(raw.parse().map_err(|_| bad("an unsigned 64-bit integer"))?)
        }
        Kind::Float => Value::F32(raw.parse().map_err(|_| bad("a number"))?),
        Kind::Double => Value::F64(raw.parse().map_err(|_| bad("a number"))?),
        Kind::Enum(e) => match e.get_value_by_name(raw).or_else(|| {
            opts.case_insensitive_enums
                .then(|| e.values().find(|v| v.name().eq_ignore_ascii_case(raw)))
                .flatten()
        }) {
            Some(v) => Value::EnumNumber(v.number()),
            None => match raw.parse::<i32>() {
                Ok(n) if e.get_value(n).is_some() => Value::EnumNumber(n),
                _ => {
                    let names: Vec<_> = e.values().map(|v| v.name().to_string()).collect();
                    return Err(FieldError::new(
                        path,
                        format!(
                            "`{raw}` is not a value of {}: one of {}",
                            e.full_name(),
                            names.join(", ")
                        ),
                    ));
                }
            },
        },
        Kind::Bytes => Value::Bytes(
            base64_any(raw)
                .ok_or_else(|| bad("base64 (standard or URL-safe)"))?
                .into(),
        ),
        Kind::Message(m) if one_value_types(m.full_name()) => {
            // A well-known type written as one value is its proto3 JSON form: a Timestamp's
            // RFC 3339 text, a Duration's `1.5s`, a FieldMask's `a,b.c`, a wrapper's value.
            let json = match (m.full_name(), raw) {
                ("google.protobuf.BoolValue", "true") => serde_json::Value::Bool(true),
                ("google.protobuf.BoolValue", "false") => serde_json::Value::Bool(false),
                _ => serde_json::Value::String(raw.to_string()),
            };
            let name = m.full_name().to_string();
            Value::Message(
                DynamicMessage::deserialize(m, json)
                    .map_err(|e| FieldError::new(path, format!("`{raw}` is not a {name}: {e}")))?,
            )
        }
        Kind::Message(m) => {
            return Err(FieldError::new(
                path,
                format!(
                    "a {} field can only be set from the JSON body",
                    m.full_name()
                ),
            ));
        }
    })
}

/// The well-known types whose proto3 JSON form is one value, so that a path variable or a query
/// parameter can set them.
fn one_value_types(name: &str) -> bool {
    matches!(
        name,
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
    )
}

/// Bytes from base64, standard or URL-safe, padded or not (proto3 JSON accepts both alphabets).
fn base64_any(raw: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(raw).ok())
}

/// Sets fields from strings: first the query parameters (`query` of them), then the path
/// variables, which win (as in google.api.HttpRule). Repeated fields collect every value given.
/// In the query, a field that is not repeated takes one value, and one member of a oneof
/// may be given: a second is refused, naming both, rather than the last one winning.
pub fn set_params(
    msg: &mut DynamicMessage,
    pairs: &[(String, String)],
    query: usize,
    opts: &Options,
) -> Result<(), FieldError> {
    // What the query set: each field once (by its proto path), each oneof once.
    let mut given: std::collections::HashMap<String, &str> = Default::default();
    for (n, (name, raw)) in pairs.iter().enumerate() {
        let mut canonical = String::new();
        let from_query = n < query;
        let field = match set_from_str(msg, name, raw, opts, from_query.then_some(&mut canonical)) {
            Ok(f) => f,
            Err(e) if e.unknown && from_query && opts.ignore_unknown_query_parameters => continue,
            Err(e) => return Err(e),
        };
        if !from_query || field.is_list() {
            continue;
        }
        let parent = canonical.rsplit_once('.').map_or("", |(p, _)| p);
        if let Some(earlier) = given.insert(canonical.clone(), name) {
            return Err(FieldError::new(
                name.as_str(),
                format!(
                    "is given twice (as `{earlier}` and `{name}`); a field that is not repeated takes one value"
                ),
            ));
        }
        if let Some(oneof) = field.containing_oneof().filter(|o| !o.is_synthetic()) {
            let key = format!("{parent}#{}", oneof.name());
            if let Some(earlier) = given.insert(key, name) {
                return Err(FieldError::new(
                    name.as_str(),
                    format!(
                        "`{earlier}` and `{name}` are members of one oneof (`{}`); give one of them",
                        oneof.name()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Sets the (possibly nested, dotted) field `path` from a string, as path variables and query
/// parameters do, and gives its descriptor; with `canonical`, writes its path in proto names
/// there. Repeated fields collect every value given.
fn set_from_str(
    msg: &mut DynamicMessage,
    path: &str,
    raw: &str,
    opts: &Options,
    mut canonical: Option<&mut String>,
) -> Result<FieldDescriptor, FieldError> {
    let mut cur = msg;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, name) in parts.iter().enumerate() {
        // The path so far, for messages (the whole path, without a copy, when it is one name).
        let here: std::borrow::Cow<'_, str> = if parts.len() == 1 {
            path.into()
        } else {
            parts[..=i].join(".").into()
        };
        let desc = cur.descriptor();
        let field = field_by_name(&desc, name).ok_or_else(|| FieldError {
            unknown: true,
            ..FieldError::new(
                &*here,
                format!("{} has no field `{name}`", desc.full_name()),
            )
        })?;
        if let Some(c) = canonical.as_deref_mut() {
            if i > 0 {
                c.push('.');
            }
            c.push_str(field.name());
        }
        if i + 1 < parts.len() {
            if !matches!(field.kind(), Kind::Message(_)) || field.is_list() || field.is_map() {
                return Err(FieldError::new(
                    &*here,
                    "is not a message field, so it has no sub-fields",
                ));
            }
            match cur.get_field_mut(&field) {
                Value::Message(m) => cur = m,
                _ => return Err(FieldError::new(&*here, "is not a message field")),
            }
            continue;
        }
        if field.is_map() {
            return Err(FieldError::new(
                &*here,
                "a map field can only be set from the JSON body",
            ));
        }
        let value = scalar(&field, &here, raw, opts)?;
        if field.is_list() {
            if let Value::List(items) = cur.get_field_mut(&field) {
                items.push(value);
            }
        } else {
            cur.set_field(&field, value);
        }
        return Ok(field);
    }
    Err(FieldError::new(path, "names no field"))
}

/// Decodes query pairs; `+` is a space when `plus_is_space` (HTML forms), a plus otherwise.
pub fn query_pairs(query: &str, plus_is_space: bool) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                let s = if plus_is_space {
                    std::borrow::Cow::Owned(s.replace('+', " "))
                } else {
                    std::borrow::Cow::Borrowed(s)
                };
                percent_encoding::percent_decode_str(&s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

/// Serialises a reply as proto3 JSON.
pub fn message_to_json(msg: &DynamicMessage, opts: &Options) -> Result<Vec<u8>, String> {
    let options = opts.print();
    let mut ser = serde_json::Serializer::new(Vec::with_capacity(128));
    msg.serialize_with_options(&mut ser, &options)
        .map_err(|e| e.to_string())?;
    Ok(ser.into_inner())
}
