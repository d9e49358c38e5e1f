//! The last step of a transcoded gRPC call, on the way back to the client: the reply's protobuf
//! bytes written as proto3 JSON straight from the wire, driven by the descriptors, without
//! decoding a `DynamicMessage` first.
//!
//! The output is the JSON prost-reflect's serializer writes for the same message with the same
//! options. That holds for the encodings every protobuf library writes: fields in number order,
//! each singular field once, each repeated field in one run. Any other encoding (a field out of
//! order or repeated, two members of one oneof, a map key twice, an extension, a group, nesting
//! deeper than protobuf's recursion limit, a wire type that does not fit the field, bytes that
//! do not parse) is answered [`NotCanonical`], and the caller decodes the message in full, as
//! protobuf's merge rules say. Well-known types are decoded and written by prost-reflect.

use base64::Engine;
use prost::encoding::{WireType, decode_varint};
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, SerializeOptions};

use super::transcode::Options;

/// The bytes need protobuf's full decoding (see the module's comment).
#[derive(Debug, PartialEq, Eq)]
pub struct NotCanonical;

type Result<T> = std::result::Result<T, NotCanonical>;

/// prost's recursion limit for nested messages.
const DEPTH: u32 = 100;

/// Writes `buf`, a message of type `desc`, as proto3 JSON at the end of `out`. On
/// [`NotCanonical`], `out` holds a partial write: the caller starts again from its length.
pub fn write(
    desc: &MessageDescriptor,
    buf: &[u8],
    opts: &Options,
    out: &mut Vec<u8>,
) -> Result<()> {
    let mut w = Writer {
        out,
        opts,
        serde: opts.print(),
    };
    w.message(desc, buf, 0)
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    opts: &'a Options,
    serde: SerializeOptions,
}

/// One scalar or message as it sits on the wire.
#[derive(Clone, Copy)]
enum Scalar<'b> {
    Bool(bool),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
    Str(&'b str),
    Bytes(&'b [u8]),
    Enum(i32),
    Message(&'b [u8]),
}

impl Scalar<'_> {
    /// The zero value of its kind, which a field without presence does not write.
    fn is_default(&self) -> bool {
        match *self {
            Scalar::Bool(v) => !v,
            Scalar::I32(v) | Scalar::Enum(v) => v == 0,
            Scalar::U32(v) => v == 0,
            Scalar::I64(v) => v == 0,
            Scalar::U64(v) => v == 0,
            Scalar::F32(v) => v == 0.0,
            Scalar::F64(v) => v == 0.0,
            Scalar::Str(v) => v.is_empty(),
            Scalar::Bytes(v) => v.is_empty(),
            Scalar::Message(_) => false,
        }
    }

    /// The zero value of `kind`, which an absent field or map key or value stands for.
    fn zero(kind: &Kind) -> Scalar<'static> {
        match kind {
            Kind::Double => Scalar::F64(0.0),
            Kind::Float => Scalar::F32(0.0),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Scalar::I32(0),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Scalar::I64(0),
            Kind::Uint32 | Kind::Fixed32 => Scalar::U32(0),
            Kind::Uint64 | Kind::Fixed64 => Scalar::U64(0),
            Kind::Bool => Scalar::Bool(false),
            Kind::String => Scalar::Str(""),
            Kind::Bytes => Scalar::Bytes(&[]),
            Kind::Enum(e) => Scalar::Enum(e.default_value().number()),
            Kind::Message(_) => Scalar::Message(&[]),
        }
    }
}

/// A protobuf encoding read front to back.
struct Wire<'b> {
    buf: &'b [u8],
}

impl<'b> Wire<'b> {
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn varint(&mut self) -> Result<u64> {
        decode_varint(&mut self.buf).map_err(|_| NotCanonical)
    }

    /// The next field's number and wire type, `None` at the end.
    fn key(&mut self) -> Result<Option<(u32, WireType)>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let wire = WireType::try_from(key & 7).map_err(|_| NotCanonical)?;
        let number = u32::try_from(key >> 3).map_err(|_| NotCanonical)?;
        if number == 0 {
            return Err(NotCanonical);
        }
        Ok(Some((number, wire)))
    }

    fn take(&mut self, n: usize) -> Result<&'b [u8]> {
        if n > self.buf.len() {
            return Err(NotCanonical);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn delimited(&mut self) -> Result<&'b [u8]> {
        let len = usize::try_from(self.varint()?).map_err(|_| NotCanonical)?;
        self.take(len)
    }

    fn fixed32(&mut self) -> Result<[u8; 4]> {
        Ok(self.take(4)?.try_into().expect("four bytes taken"))
    }

    fn fixed64(&mut self) -> Result<[u8; 8]> {
        Ok(self.take(8)?.try_into().expect("eight bytes taken"))
    }

    /// Passes over a field of an unknown number. Groups are not passed over: the full decoder
    /// handles them.
    fn skip(&mut self, wire: WireType) -> Result<()> {
        match wire {
            WireType::Varint => self.varint().map(drop),
            WireType::SixtyFourBit => self.take(8).map(drop),
            WireType::LengthDelimited => self.delimited().map(drop),
            WireType::ThirtyTwoBit => self.take(4).map(drop),
            WireType::StartGroup | WireType::EndGroup => Err(NotCanonical),
        }
    }

    /// One value of `kind` written with `wire`, the wire type its kind has when not packed.
    fn scalar(&mut self, kind: &Kind, wire: WireType) -> Result<Scalar<'b>> {
        let expected = match kind {
            Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => WireType::SixtyFourBit,
            Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => WireType::ThirtyTwoBit,
            Kind::String | Kind::Bytes | Kind::Message(_) => WireType::LengthDelimited,
            _ => WireType::Varint,
        };
        if wire != expected {
            return Err(NotCanonical);
        }
        Ok(match kind {
            Kind::Double => Scalar::F64(f64::from_le_bytes(self.fixed64()?)),
            Kind::Float => Scalar::F32(f32::from_le_bytes(self.fixed32()?)),
            Kind::Fixed64 => Scalar::U64(u64::from_le_bytes(self.fixed64()?)),
            Kind::Sfixed64 => Scalar::I64(i64::from_le_bytes(self.fixed64()?)),
            Kind::Fixed32 => Scalar::U32(u32::from_le_bytes(self.fixed32()?)),
            Kind::Sfixed32 => Scalar::I32(i32::from_le_bytes(self.fixed32()?)),
            // The truncations are protobuf's: a 32-bit field takes the low bits of the varint.
            Kind::Int32 => Scalar::I32(self.varint()? as i32),
            Kind::Int64 => Scalar::I64(self.varint()? as i64),
            Kind::Uint32 => Scalar::U32(self.varint()? as u32),
            Kind::Uint64 => Scalar::U64(self.varint()?),
            Kind::Sint32 => {
                let n = self.varint()? as u32;
                Scalar::I32(((n >> 1) as i32) ^ -((n & 1) as i32))
            }
            Kind::Sint64 => {
                let n = self.varint()?;
                Scalar::I64(((n >> 1) as i64) ^ -((n & 1) as i64))
            }
            Kind::Bool => Scalar::Bool(self.varint()? != 0),
            Kind::Enum(_) => Scalar::Enum(self.varint()? as i32),
            Kind::String => {
                Scalar::Str(std::str::from_utf8(self.delimited()?).map_err(|_| NotCanonical)?)
            }
            Kind::Bytes => Scalar::Bytes(self.delimited()?),
            Kind::Message(_) => Scalar::Message(self.delimited()?),
        })
    }
}

/// Kinds a repeated field may pack into one length-delimited run.
fn packable(kind: &Kind) -> bool {
    !matches!(kind, Kind::String | Kind::Bytes | Kind::Message(_))
}

/// The types prost-reflect writes in their own JSON forms.
fn well_known(desc: &MessageDescriptor) -> bool {
    matches!(
        desc.full_name(),
        "google.protobuf.Any"
            | "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.Struct"
            | "google.protobuf.FloatValue"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.Int32Value"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
            | "google.protobuf.FieldMask"
            | "google.protobuf.ListValue"
            | "google.protobuf.Value"
            | "google.protobuf.Empty"
    )
}

impl Writer<'_> {
    fn message(&mut self, desc: &MessageDescriptor, buf: &[u8], depth: u32) -> Result<()> {
        if depth >= DEPTH {
            return Err(NotCanonical);
        }
        if well_known(desc) {
            return self.decoded(desc, buf);
        }
        self.out.push(b'{');
        let mut first = true;
        let mut wire = Wire { buf };
        let mut next = wire.key()?;
        // The oneofs one of whose members has been written.
        let mut oneofs: Vec<u32> = Vec::new();
        for field in desc.fields() {
            let number = field.number();
            // Numbers below this field's belong to no field: unknown fields, which the JSON
            // does not show, unless they are a field of this message met out of order.
            while let Some((n, w)) = next
                && n < number
            {
                if desc.get_field(n).is_some() || desc.get_extension(n).is_some() {
                    return Err(NotCanonical);
                }
                wire.skip(w)?;
                next = wire.key()?;
            }
            let present = matches!(next, Some((n, _)) if n == number);
            if !present {
                if self.opts.emit_defaults && !field.supports_presence() {
                    self.name(&field, &mut first);
                    if field.is_map() {
                        self.out.extend_from_slice(b"{}");
                    } else if field.is_list() {
                        self.out.extend_from_slice(b"[]");
                    } else {
                        let kind = field.kind();
                        self.value(&kind, Scalar::zero(&kind), depth)?;
                    }
                }
                continue;
            }
            if let Some(oneof) = field.containing_oneof() {
                // A oneof is known by the number of its first member.
                let id = oneof.fields().next().map_or(0, |f| f.number());
                if oneofs.contains(&id) {
                    return Err(NotCanonical);
                }
                oneofs.push(id);
            }
            next = if field.is_map() {
                self.map(&field, &mut wire, next, &mut first, depth)?
            } else if field.is_list() {
                self.list(&field, &mut wire, next, &mut first, depth)?
            } else {
                let kind = field.kind();
                let (_, w) = next.expect("present");
                let value = wire.scalar(&kind, w)?;
                let after = wire.key()?;
                if matches!(after, Some((n, _)) if n == number) {
                    return Err(NotCanonical);
                }
                if field.supports_presence() || !value.is_default() {
                    self.name(&field, &mut first);
                    self.value(&kind, value, depth)?;
                }
                after
            };
        }
        // Past the last field: unknown fields, or a field met out of order.
        while let Some((n, w)) = next {
            if desc.get_field(n).is_some() || desc.get_extension(n).is_some() {
                return Err(NotCanonical);
            }
            wire.skip(w)?;
            next = wire.key()?;
        }
        self.out.push(b'}');
        Ok(())
    }

    /// A well-known type: decoded, then written by prost-reflect, whose JSON forms these are.
    fn decoded(&mut self, desc: &MessageDescriptor, buf: &[u8]) -> Result<()> {
        let msg = DynamicMessage::decode(desc.clone(), buf).map_err(|_| NotCanonical)?;
        let mut ser = serde_json::Serializer::new(&mut *self.out);
        msg.serialize_with_options(&mut ser, &self.serde)
            .map_err(|_| NotCanonical)
    }

    /// `"name":`, after a comma unless it is the object's first.
    fn name(&mut self, field: &FieldDescriptor, first: &mut bool) {
        if !std::mem::take(first) {
            self.out.push(b',');
        }
        let name = if self.opts.proto_names {
            field.name()
        } else {
            field.json_name()
        };
        self.string(name);
        self.out.push(b':');
    }

    fn string(&mut self, s: &str) {
        serde_json::to_writer(&mut *self.out, s).expect("writing to a Vec cannot fail");
    }

    /// The run of a repeated field's values, packed or not; an empty run (a packed field of
    /// no bytes) writes nothing, as the decoded message would have no values.
    fn list<'b>(
        &mut self,
        field: &FieldDescriptor,
        wire: &mut Wire<'b>,
        mut next: Option<(u32, WireType)>,
        first: &mut bool,
        depth: u32,
    ) -> Result<Option<(u32, WireType)>> {
        let (mark, was_first) = (self.out.len(), *first);
        self.name(field, first);
        self.out.push(b'[');
        let kind = field.kind();
        let mut count = 0usize;
        while let Some((n, w)) = next
            && n == field.number()
        {
            if w == WireType::LengthDelimited && packable(&kind) {
                let mut packed = Wire {
                    buf: wire.delimited()?,
                };
                let unpacked = match kind {
                    Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => WireType::SixtyFourBit,
                    Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => WireType::ThirtyTwoBit,
                    _ => WireType::Varint,
                };
                while !packed.is_empty() {
                    let value = packed.scalar(&kind, unpacked)?;
                    self.element(&kind, value, &mut count, depth)?;
                }
            } else {
                let value = wire.scalar(&kind, w)?;
                self.element(&kind, value, &mut count, depth)?;
            }
            next = wire.key()?;
        }
        if count == 0 && !self.opts.emit_defaults {
            self.out.truncate(mark);
            *first = was_first;
        } else {
            self.out.push(b']');
        }
        Ok(next)
    }

    fn element(
        &mut self,
        kind: &Kind,
        value: Scalar<'_>,
        count: &mut usize,
        depth: u32,
    ) -> Result<()> {
        if *count > 0 {
            self.out.push(b',');
        }
        *count += 1;
        self.value(kind, value, depth)
    }

    /// The run of a map field's entries, each written as `"key":value`. A key met twice is
    /// [`NotCanonical`]: the decoded map keeps the last, which a writer cannot take back.
    fn map<'b>(
        &mut self,
        field: &FieldDescriptor,
        wire: &mut Wire<'b>,
        mut next: Option<(u32, WireType)>,
        first: &mut bool,
        depth: u32,
    ) -> Result<Option<(u32, WireType)>> {
        let Kind::Message(entry) = field.kind() else {
            return Err(NotCanonical);
        };
        let (key_kind, value_kind) = (
            entry.map_entry_key_field().kind(),
            entry.map_entry_value_field().kind(),
        );
        self.name(field, first);
        self.out.push(b'{');
        // Where each key was written, to find a key met twice.
        let mut keys: Vec<std::ops::Range<usize>> = Vec::new();
        while let Some((n, w)) = next
            && n == field.number()
        {
            if w != WireType::LengthDelimited {
                return Err(NotCanonical);
            }
            let mut e = Wire {
                buf: wire.delimited()?,
            };
            let (mut key, mut value) = (Scalar::zero(&key_kind), Scalar::zero(&value_kind));
            // The key, then the value, each once: anything else is merged by the decoder.
            let mut seen = 0u32;
            while let Some((n, w)) = e.key()? {
                match n {
                    1 if seen == 0 => key = e.scalar(&key_kind, w)?,
                    2 if seen < 2 => value = e.scalar(&value_kind, w)?,
                    1 | 2 => return Err(NotCanonical),
                    _ => {
                        e.skip(w)?;
                        continue;
                    }
                }
                seen = n;
            }
            if !keys.is_empty() {
                self.out.push(b',');
            }
            let start = self.out.len();
            self.key(key);
            keys.push(start..self.out.len());
            self.out.push(b':');
            self.value(&value_kind, value, depth)?;
            next = wire.key()?;
        }
        if keys.len() > 1 {
            let out = &*self.out;
            keys.sort_unstable_by(|a, b| out[a.clone()].cmp(&out[b.clone()]));
            if keys
                .windows(2)
                .any(|p| out[p[0].clone()] == out[p[1].clone()])
            {
                return Err(NotCanonical);
            }
        }
        self.out.push(b'}');
        Ok(next)
    }

    /// A map key: always a JSON string.
    fn key(&mut self, key: Scalar<'_>) {
        match key {
            Scalar::Str(s) => self.string(s),
            Scalar::Bool(b) => {
                self.out
                    .extend_from_slice(if b { b"\"true\"" } else { b"\"false\"" })
            }
            k => {
                self.out.push(b'"');
                self.integer(k);
                self.out.push(b'"');
            }
        }
    }

    fn integer(&mut self, value: Scalar<'_>) {
        let mut b = itoa::Buffer::new();
        let s = match value {
            Scalar::I32(v) | Scalar::Enum(v) => b.format(v),
            Scalar::U32(v) => b.format(v),
            Scalar::I64(v) => b.format(v),
            Scalar::U64(v) => b.format(v),
            _ => unreachable!("only integers are written by integer()"),
        };
        self.out.extend_from_slice(s.as_bytes());
    }

    fn value(&mut self, kind: &Kind, value: Scalar<'_>, depth: u32) -> Result<()> {
        match value {
            Scalar::Bool(b) => self
                .out
                .extend_from_slice(if b { b"true" } else { b"false" }),
            Scalar::I32(_) | Scalar::U32(_) => self.integer(value),
            // 64-bit integers are strings in proto3 JSON.
            Scalar::I64(_) | Scalar::U64(_) => {
                self.out.push(b'"');
                self.integer(value);
                self.out.push(b'"');
            }
            Scalar::F32(v) if v.is_finite() => {
                serde_json::to_writer(&mut *self.out, &v).expect("a finite float")
            }
            Scalar::F64(v) if v.is_finite() => {
                serde_json::to_writer(&mut *self.out, &v).expect("a finite float")
            }
            Scalar::F32(v) => self.non_finite(f64::from(v)),
            Scalar::F64(v) => self.non_finite(v),
            Scalar::Str(s) => self.string(s),
            Scalar::Bytes(b) => {
                let engine = &base64::engine::general_purpose::STANDARD;
                self.out.push(b'"');
                let start = self.out.len();
                self.out.resize(
                    start + base64::encoded_len(b.len(), true).ok_or(NotCanonical)?,
                    0,
                );
                let n = engine
                    .encode_slice(b, &mut self.out[start..])
                    .map_err(|_| NotCanonical)?;
                self.out.truncate(start + n);
                self.out.push(b'"');
            }
            Scalar::Enum(n) => {
                let Kind::Enum(e) = kind else {
                    return Err(NotCanonical);
                };
                if e.full_name() == "google.protobuf.NullValue" {
                    self.out.extend_from_slice(b"null");
                } else if self.opts.enums_as_numbers {
                    self.integer(value);
                } else {
                    match e.get_value(n) {
                        Some(v) => self.string(v.name()),
                        None => self.integer(value),
                    }
                }
            }
            Scalar::Message(buf) => {
                let Kind::Message(m) = kind else {
                    return Err(NotCanonical);
                };
                self.message(m, buf, depth + 1)?;
            }
        }
        Ok(())
    }

    fn non_finite(&mut self, v: f64) {
        let s: &[u8] = if v.is_nan() {
            b"\"NaN\""
        } else if v > 0.0 {
            b"\"Infinity\""
        } else {
            b"\"-Infinity\""
        };
        self.out.extend_from_slice(s);
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_reflect::{DescriptorPool, MapKey, Value};

    use super::*;
    use crate::backends::grpc::transcode;

    fn pool() -> DescriptorPool {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/protos");
        let set = protox::compile([dir.join("kinds.proto")], [dir]).expect("kinds.proto compiles");
        DescriptorPool::from_file_descriptor_set(set).expect("a valid descriptor set")
    }

    fn all(pool: &DescriptorPool) -> MessageDescriptor {
        pool.get_message_by_name("kinds.v1.All")
            .expect("kinds.v1.All")
    }

    /// Every combination of the options that change the JSON.
    fn option_sets() -> Vec<Options> {
        let mut sets = Vec::new();
        for bits in 0..8u8 {
            sets.push(Options {
                emit_defaults: bits & 1 != 0,
                proto_names: bits & 2 != 0,
                enums_as_numbers: bits & 4 != 0,
                ..Options::default()
            });
        }
        sets
    }

    /// A well-known type's value, written in its JSON form.
    fn well_known_json(name: &str, rng: &mut fastrand::Rng, maps: bool) -> serde_json::Value {
        use serde_json::json;
        let pick =
            |rng: &mut fastrand::Rng, v: Vec<serde_json::Value>| v[rng.usize(..v.len())].clone();
        match name {
            "google.protobuf.Timestamp" => pick(
                rng,
                vec![
                    json!("1970-01-01T00:00:00Z"),
                    json!("2026-12-05T01:02:03.500Z"),
                    json!("1999-01-01T23:59:59.000000001Z"),
                ],
            ),
            "google.protobuf.Duration" => {
                pick(rng, vec![json!("0s"), json!("1.500s"), json!("-3s")])
            }
            "google.protobuf.FieldMask" => pick(rng, vec![json!(""), json!("fooBar,baz.qux")]),
            "google.protobuf.Struct" => pick(
                rng,
                if maps {
                    vec![
                        json!({}),
                        json!({"a": 1, "b": [true, null, "x"], "c": {"d": -2.5}}),
                    ]
                } else {
                    vec![json!({}), json!({"b": [true, null, {"d": -2.5}]})]
                },
            ),
            "google.protobuf.Value" => pick(
                rng,
                vec![
                    json!(null),
                    json!(1.25),
                    json!("s"),
                    json!(false),
                    json!([1, {"k": "v"}]),
                    json!({"n": null}),
                ],
            ),
            "google.protobuf.ListValue" => {
                pick(rng, vec![json!([]), json!([1, "a", null, [true]])])
            }
            "google.protobuf.Int32Value" => pick(rng, vec![json!(0), json!(-7)]),
            "google.protobuf.StringValue" => pick(rng, vec![json!(""), json!("w\u{e9}\"")]),
            "google.protobuf.BytesValue" => pick(rng, vec![json!(""), json!("AAEC/w==")]),
            "google.protobuf.UInt64Value" => {
                pick(rng, vec![json!("0"), json!("18446744073709551615")])
            }
            "google.protobuf.Empty" => json!({}),
            "google.protobuf.Any" => pick(
                rng,
                vec![
                    json!({"@type": "type.googleapis.com/kinds.v1.Leaf", "name": "in any", "weight": 3}),
                    json!({"@type": "type.googleapis.com/google.protobuf.Duration", "value": "2s"}),
                ],
            ),
            other => panic!("no sample for {other}"),
        }
    }

    fn random_value(kind: &Kind, rng: &mut fastrand::Rng, depth: u32, maps: bool) -> Value {
        let pick = |rng: &mut fastrand::Rng, n: usize| rng.usize(..n);
        match kind {
            Kind::Double => Value::F64(
                [
                    0.0,
                    -0.0,
                    1.5,
                    1e300,
                    -2.25e-300,
                    f64::NAN,
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                    rng.f64(),
                ][pick(rng, 9)],
            ),
            Kind::Float => Value::F32(
                [
                    0.0,
                    -0.0,
                    0.1,
                    3.4e38,
                    f32::NAN,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    rng.f32(),
                ][pick(rng, 8)],
            ),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
                Value::I32([0, 1, -1, i32::MIN, i32::MAX, rng.i32(..)][pick(rng, 6)])
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                Value::I64([0, 1, -1, i64::MIN, i64::MAX, rng.i64(..)][pick(rng, 6)])
            }
            Kind::Uint32 | Kind::Fixed32 => Value::U32([0, 1, u32::MAX, rng.u32(..)][pick(rng, 4)]),
            Kind::Uint64 | Kind::Fixed64 => Value::U64([0, 1, u64::MAX, rng.u64(..)][pick(rng, 4)]),
            Kind::Bool => Value::Bool(rng.bool()),
            Kind::String => Value::String(
                [
                    "",
                    "plain",
                    "quote \" slash \\ newline \n ctrl \u{1} \u{e9} \u{1F600} </script>",
                ][pick(rng, 3)]
                .to_string(),
            ),
            Kind::Bytes => Value::Bytes(
                (0..rng.usize(..9))
                    .map(|_| rng.u8(..))
                    .collect::<Vec<u8>>()
                    .into(),
            ),
            Kind::Enum(_) => Value::EnumNumber([0, 1, 2, 7, -3][pick(rng, 5)]),
            Kind::Message(m) => Value::Message(random_message(m, rng, depth + 1, maps)),
        }
    }

    fn random_key(kind: &Kind, rng: &mut fastrand::Rng) -> MapKey {
        match random_value(kind, rng, 0, false) {
            Value::Bool(v) => MapKey::Bool(v),
            Value::I32(v) => MapKey::I32(v),
            Value::I64(v) => MapKey::I64(v),
            Value::U32(v) => MapKey::U32(v),
            Value::U64(v) => MapKey::U64(v),
            Value::String(v) => MapKey::String(v),
            other => panic!("no map key of {other:?}"),
        }
    }

    /// A message with about half its fields set, at random, nested three deep at most.
    /// Without `maps`, no map at any depth and no `Struct` of more than one key: their decoded
    /// order is a hash map's, so only then can two writes be compared byte for byte.
    fn random_message(
        desc: &MessageDescriptor,
        rng: &mut fastrand::Rng,
        depth: u32,
        maps: bool,
    ) -> DynamicMessage {
        if well_known(desc) {
            let json = well_known_json(desc.full_name(), rng, maps);
            return DynamicMessage::deserialize(desc.clone(), json)
                .expect("a valid well-known value");
        }
        let mut msg = DynamicMessage::new(desc.clone());
        if depth > 2 {
            return msg;
        }
        for field in desc.fields() {
            if rng.bool() {
                continue;
            }
            let kind = field.kind();
            if field.is_map() && !maps {
                continue;
            }
            let value = if field.is_map() {
                let Kind::Message(entry) = &kind else {
                    unreachable!()
                };
                let (k, v) = (
                    entry.map_entry_key_field().kind(),
                    entry.map_entry_value_field().kind(),
                );
                Value::Map(
                    (0..rng.usize(..4))
                        .map(|_| (random_key(&k, rng), random_value(&v, rng, depth, maps)))
                        .collect(),
                )
            } else if field.is_list() {
                Value::List(
                    (0..rng.usize(..4))
                        .map(|_| random_value(&kind, rng, depth, maps))
                        .collect(),
                )
            } else {
                random_value(&kind, rng, depth, maps)
            };
            msg.set_field(&field, value);
        }
        msg
    }

    /// What the full decoder and prost-reflect's serializer write for the same bytes.
    fn decoded_json(desc: &MessageDescriptor, bytes: &[u8], opts: &Options) -> Vec<u8> {
        let msg = DynamicMessage::decode(desc.clone(), bytes).expect("bytes that decode");
        transcode::message_to_json(&msg, opts).expect("JSON")
    }

    fn fast_json(desc: &MessageDescriptor, bytes: &[u8], opts: &Options) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        write(desc, bytes, opts, &mut out).map(|()| out)
    }

    fn parsed(json: &[u8]) -> serde_json::Value {
        serde_json::from_slice(json)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(json)))
    }

    #[test]
    fn random_messages_are_written_as_the_decoder_and_serializer_write_them() {
        let pool = pool();
        let desc = all(&pool);
        let mut rng = fastrand::Rng::with_seed(20261205);
        for i in 0..400 {
            // Without maps the bytes must match exactly.
            let exact = i % 2 == 0;
            let msg = random_message(&desc, &mut rng, 0, !exact);
            let bytes = msg.encode_to_vec();
            for opts in option_sets() {
                let fast = fast_json(&desc, &bytes, &opts).unwrap_or_else(|_| {
                    panic!("message {i}: prost's encoding is canonical: {msg:?}")
                });
                let want = decoded_json(&desc, &bytes, &opts);
                if exact {
                    assert_eq!(
                        String::from_utf8_lossy(&fast),
                        String::from_utf8_lossy(&want),
                        "message {i}, {opts:?}"
                    );
                } else {
                    assert_eq!(parsed(&fast), parsed(&want), "message {i}, {opts:?}");
                }
            }
        }
    }

    #[test]
    fn an_empty_reply_is_an_empty_object_or_every_default() {
        let pool = pool();
        let desc = all(&pool);
        for opts in option_sets() {
            let fast = fast_json(&desc, &[], &opts).expect("canonical");
            assert_eq!(fast, decoded_json(&desc, &[], &opts), "{opts:?}");
        }
        let plain = fast_json(&desc, &[], &Options::default()).unwrap();
        assert_eq!(plain, b"{}");
    }

    /// Encodings protobuf allows but a front-to-back writer cannot follow are refused, and the
    /// decoder's answer for them is what a client gets (`GrpcRoute::reply`).
    #[test]
    fn encodings_that_need_merging_are_left_to_the_decoder() {
        let pool = pool();
        let leaf = pool.get_message_by_name("kinds.v1.Leaf").unwrap();
        let desc = all(&pool);
        let opts = Options::default();
        let cases: &[(&MessageDescriptor, &[u8], &str)] = &[
            // weight (2) before name (1)
            (
                &leaf,
                &[0x10, 0x02, 0x0a, 0x01, b'a'],
                r#"{"name":"a","weight":2}"#,
            ),
            // an unknown field (9) before name: encoders put them last
            (&leaf, &[0x48, 0x07, 0x0a, 0x01, b'a'], r#"{"name":"a"}"#),
            // weight twice: the last wins
            (&leaf, &[0x10, 0x01, 0x10, 0x05], r#"{"weight":5}"#),
            // two members of the oneof `choice`: c_string (60), then c_int64 (62)
            (
                &desc,
                &[0xe2, 0x03, 0x01, b'x', 0xf0, 0x03, 0x09],
                r#"{"cInt64":"9"}"#,
            ),
            // the map m_string_string (50) with the key "k" twice
            (
                &desc,
                &[
                    0x92, 0x03, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'a', 0x92, 0x03, 0x06, 0x0a,
                    0x01, b'k', 0x12, 0x01, b'b',
                ],
                r#"{"mStringString":{"k":"b"}}"#,
            ),
            // f_leaf (17) twice: the two are merged
            (
                &desc,
                &[
                    0x8a, 0x01, 0x03, 0x0a, 0x01, b'a', 0x8a, 0x01, 0x02, 0x10, 0x04,
                ],
                r#"{"fLeaf":{"name":"a","weight":4}}"#,
            ),
            // r_int32 (33) packed, f_string (14), then r_int32 again
            (
                &desc,
                &[0x8a, 0x02, 0x01, 0x01, 0x72, 0x01, b's', 0x88, 0x02, 0x02],
                r#"{"fString":"s","rInt32":[1,2]}"#,
            ),
        ];
        for (i, (d, bytes, want)) in cases.iter().enumerate() {
            assert_eq!(fast_json(d, bytes, &opts), Err(NotCanonical), "case {i}");
            assert_eq!(
                String::from_utf8_lossy(&decoded_json(d, bytes, &opts)),
                *want,
                "case {i}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_passed_over_and_bad_bytes_refused() {
        let pool = pool();
        let leaf = pool.get_message_by_name("kinds.v1.Leaf").unwrap();
        let opts = Options::default();
        // name, weight, then field 9 (varint), field 12 (length-delimited), field 99 (fixed64)
        // and field 100 (fixed32), as encoders write the unknown fields they keep
        let unknown = [
            0x0a, 0x01, b'a', 0x10, 0x03, 0x48, 0x07, 0x62, 0x02, 0x01, 0x02, 0x99, 0x06, 1, 2, 3,
            4, 5, 6, 7, 8, 0xa5, 0x06, 1, 2, 3, 4,
        ];
        let fast = fast_json(&leaf, &unknown, &opts).expect("unknown fields are skipped");
        assert_eq!(fast, decoded_json(&leaf, &unknown, &opts));
        assert_eq!(fast, br#"{"name":"a","weight":3}"#);
        // in All, field 19 (unknown) between f_child (18) and o_int32 (20)
        let desc = all(&pool);
        let between = [0x92, 0x01, 0x00, 0x98, 0x01, 0x05, 0xa0, 0x01, 0x00];
        let fast = fast_json(&desc, &between, &opts).expect("an unknown field between two");
        assert_eq!(fast, br#"{"fChild":{},"oInt32":0}"#);
        assert_eq!(fast, decoded_json(&desc, &between, &opts));
        for bad in [
            &[0x10][..],         // a key with no value
            &[0x0a, 0x05, b'a'], // a string longer than what is left
            &[0x0a, 0x01, 0xff], // a string that is not UTF-8
            &[0x12, 0x01, 0x00], // weight (int32) as length-delimited
            &[0x0b, 0x0c],       // a group
            &[0x00, 0x01],       // field number 0
        ] {
            assert_eq!(fast_json(&leaf, bad, &opts), Err(NotCanonical), "{bad:?}");
        }
    }

    #[test]
    fn nesting_deeper_than_protobufs_limit_is_left_to_the_decoder() {
        let pool = pool();
        let desc = all(&pool);
        let mut bytes: Vec<u8> = Vec::new();
        for _ in 0..120 {
            // f_child (18) holding the message so far
            let mut outer = vec![0x92, 0x01];
            prost::encoding::encode_varint(bytes.len() as u64, &mut outer);
            outer.extend_from_slice(&bytes);
            bytes = outer;
        }
        assert_eq!(
            fast_json(&desc, &bytes, &Options::default()),
            Err(NotCanonical)
        );
        assert!(
            DynamicMessage::decode(desc, bytes.as_slice()).is_err(),
            "the decoder refuses it too"
        );
    }
}
