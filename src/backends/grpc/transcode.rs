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
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
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
) -> Result<DynamicMessage, FieldError> {
    if desc.full_name() != "google.api.HttpBody" {
        return message_from_json(desc, body);
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

/// Parses JSON into a message of `desc`, refusing unknown fields.
pub fn message_from_json(
    desc: MessageDescriptor,
    json: &[u8],
) -> Result<DynamicMessage, FieldError> {
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(desc));
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let mut track = serde_path_to_error::Track::new();
    let options = DeserializeOptions::new().deny_unknown_fields(true);
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

fn scalar(field: &FieldDescriptor, path: &str, raw: &str) -> Result<Value, FieldError> {
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
        Kind::Enum(e) => match e.get_value_by_name(raw) {
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
        Kind::Bytes => {
            return Err(FieldError::new(
                path,
                "a bytes field can only be set from the JSON body",
            ));
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

/// Sets the (possibly nested, dotted) field `path` from a string, as path variables and query
/// parameters do. Repeated fields collect every value given.
pub fn set_from_str(msg: &mut DynamicMessage, path: &str, raw: &str) -> Result<(), FieldError> {
    let mut cur = msg;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, name) in parts.iter().enumerate() {
        let here = parts[..=i].join(".");
        let desc = cur.descriptor();
        let field = field_by_name(&desc, name).ok_or_else(|| {
            FieldError::new(&here, format!("{} has no field `{name}`", desc.full_name()))
        })?;
        if i + 1 < parts.len() {
            if !matches!(field.kind(), Kind::Message(_)) || field.is_list() || field.is_map() {
                return Err(FieldError::new(
                    &here,
                    "is not a message field, so it has no sub-fields",
                ));
            }
            match cur.get_field_mut(&field) {
                Value::Message(m) => cur = m,
                _ => return Err(FieldError::new(&here, "is not a message field")),
            }
            continue;
        }
        if field.is_map() {
            return Err(FieldError::new(
                &here,
                "a map field can only be set from the JSON body",
            ));
        }
        let value = scalar(&field, &here, raw)?;
        if field.is_list() {
            if let Value::List(items) = cur.get_field_mut(&field) {
                items.push(value);
            }
        } else {
            cur.set_field(&field, value);
        }
    }
    Ok(())
}

/// Decodes `application/x-www-form-urlencoded`-style query pairs (`+` is a space).
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

/// Serialises a reply as proto3 JSON.
pub fn message_to_json(
    msg: &DynamicMessage,
    emit_defaults: bool,
    proto_names: bool,
) -> Result<Vec<u8>, String> {
    let options = SerializeOptions::new()
        .skip_default_fields(!emit_defaults)
        .use_proto_field_name(proto_names);
    let mut ser = serde_json::Serializer::new(Vec::with_capacity(128));
    msg.serialize_with_options(&mut ser, &options)
        .map_err(|e| e.to_string())?;
    Ok(ser.into_inner())
}
