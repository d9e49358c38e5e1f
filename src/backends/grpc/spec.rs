//! The `grpc` backend's section of routes.yaml, a route's `grpc:` settings and a WebSocket route's
//! `websocket.grpc` (read at load time, before the request path exists).

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::model::{BreakerSpec, ClientTlsSpec, RetryBudgetSpec, default_connect_timeout};
use crate::config::types::Dur;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcBackendSpec {
    /// Server URLs (`http://host:port`, HTTP/2 cleartext), balanced.
    pub endpoints: Vec<String>,
    /// `.proto` files compiled when the config loads (relative to routes.yaml's directory).
    /// `google/protobuf/*` well-known types are always available.
    #[serde(default)]
    pub protos: Vec<PathBuf>,
    /// Directories searched for imports (relative to routes.yaml's directory); the directory of
    /// routes.yaml when empty.
    #[serde(default)]
    pub import_paths: Vec<PathBuf>,
    /// A binary `FileDescriptorSet` (`protoc --include_imports -o`), instead of or beside `protos`.
    #[serde(default)]
    pub descriptor_set: Option<PathBuf>,
    /// Ask the server for its descriptors by gRPC server reflection (v1, else v1alpha) at load
    /// and on every reload, instead of or beside `protos`.
    #[serde(default)]
    pub reflection: bool,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Interval of HTTP/2 keep-alive pings on idle channels.
    #[serde(default = "default_keepalive")]
    pub keepalive: Dur,
    /// TLS settings for `https://` endpoints (the system's roots when absent).
    #[serde(default)]
    pub tls: Option<ClientTlsSpec>,
    /// Make a route of every method that carries a `google.api.http` annotation (ids
    /// `<backend>.<Method>`, `#n` for additional bindings).
    #[serde(default)]
    pub annotated_routes: bool,
    /// Make a `POST /<package.Service>/<Method>` route of every method, so gRPC and gRPC-Web
    /// clients reach the service through the gateway (ids `<backend>/<package.Service>/<Method>`).
    /// JSON requests to those paths are transcoded with the whole body as the request message.
    #[serde(default)]
    pub native_routes: bool,
    /// How this backend's routes read and write JSON; a route's `grpc.transcoding` overrides
    /// each setting it gives.
    #[serde(default)]
    pub transcoding: TranscodingSpec,
    #[serde(default)]
    pub breaker: BreakerSpec,
    #[serde(default)]
    pub retry_budget: RetryBudgetSpec,
    #[serde(default)]
    pub concurrency_limit: Option<usize>,
}

fn default_keepalive() -> Dur {
    Dur::secs(30)
}

/// How a route maps HTTP/JSON to one gRPC method.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcRouteSpec {
    /// The method, `package.Service/Method`.
    pub method: String,
    /// Where the JSON body goes: `"*"` (the whole request message), a top-level field name, or
    /// `""` for no body. Default: `"*"` for POST, PUT and PATCH, no body otherwise.
    #[serde(default)]
    pub body: Option<String>,
    /// Answer with this response field instead of the whole message.
    #[serde(default)]
    pub response_body: Option<String>,
    /// Include fields that hold their default value in JSON answers (the same as
    /// `transcoding.emit_defaults`).
    #[serde(default)]
    pub emit_defaults: Option<bool>,
    /// Use the proto field names (`order_id`) instead of lowerCamelCase (`orderId`) in answers
    /// (the same as `transcoding.proto_names`).
    #[serde(default)]
    pub proto_names: Option<bool>,
    /// How this route reads and writes JSON, over the backend's `transcoding`.
    #[serde(default)]
    pub transcoding: TranscodingSpec,
    /// Request headers forwarded as gRPC metadata (besides `x-request-id` and `traceparent`,
    /// which always are).
    #[serde(default)]
    pub metadata_headers: Vec<String>,
    /// Set only on native routes (`native_routes`): bidirectional methods are allowed, for
    /// gRPC and gRPC-Web clients only.
    #[serde(skip)]
    pub native: bool,
}

/// A WebSocket bridged to one gRPC method: one JSON frame per protobuf message each way.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WsGrpcSpec {
    /// `package.Service/Method`: unary, server-, client- or bidirectional-streaming.
    pub method: String,
    /// Write fields that hold their default value in response frames (the backend's
    /// `transcoding.emit_defaults` when absent).
    #[serde(default)]
    pub emit_defaults: Option<bool>,
    /// Name fields as in the .proto file instead of lowerCamelCase in response frames (the
    /// backend's `transcoding.proto_names` when absent).
    #[serde(default)]
    pub proto_names: Option<bool>,
}

/// How HTTP/JSON is turned into request messages and replies into JSON: the options of Envoy's
/// gRPC-JSON transcoder, each off unless set. At a route, each setting given overrides the
/// backend's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TranscodingSpec {
    /// Write fields that hold their default value (Envoy: `print_options.always_print_primitive_fields`).
    #[serde(default)]
    pub emit_defaults: Option<bool>,
    /// Write enums as numbers instead of names (Envoy: `print_options.always_print_enums_as_ints`).
    #[serde(default)]
    pub enums_as_numbers: Option<bool>,
    /// Write the proto field names (`order_id`) instead of lowerCamelCase (Envoy:
    /// `print_options.preserve_proto_field_names`).
    #[serde(default)]
    pub proto_names: Option<bool>,
    /// Accept enum names in any case (`mail` for `MAIL`), in the body, the path and the query
    /// (Envoy: `case_insensitive_enum_parsing`).
    #[serde(default)]
    pub case_insensitive_enums: Option<bool>,
    /// Ignore query parameters that name no field, instead of a 400 (Envoy:
    /// `ignore_unknown_query_parameters`).
    #[serde(default)]
    pub ignore_unknown_query_parameters: Option<bool>,
    /// Ignore body fields the message does not have, instead of a 400 (proto3 JSON parsers'
    /// `ignore_unknown_fields`).
    #[serde(default)]
    pub allow_unknown_body_fields: Option<bool>,
    /// Read `+` in query values as a space, as HTML forms write it (Envoy:
    /// `query_param_unescape_plus`); otherwise `+` is a plus and a space is `%20`.
    #[serde(default)]
    pub query_unescape_plus: Option<bool>,
}

impl TranscodingSpec {
    /// These settings, each taken from `base` where not given here.
    pub fn over(self, base: TranscodingSpec) -> TranscodingSpec {
        TranscodingSpec {
            emit_defaults: self.emit_defaults.or(base.emit_defaults),
            enums_as_numbers: self.enums_as_numbers.or(base.enums_as_numbers),
            proto_names: self.proto_names.or(base.proto_names),
            case_insensitive_enums: self.case_insensitive_enums.or(base.case_insensitive_enums),
            ignore_unknown_query_parameters: self
                .ignore_unknown_query_parameters
                .or(base.ignore_unknown_query_parameters),
            allow_unknown_body_fields: self
                .allow_unknown_body_fields
                .or(base.allow_unknown_body_fields),
            query_unescape_plus: self.query_unescape_plus.or(base.query_unescape_plus),
        }
    }
}
