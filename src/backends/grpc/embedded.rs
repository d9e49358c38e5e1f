//! Proto files every gRPC backend can use without supplying them: `google.api.http`
//! annotations, `google.rpc.Status` and the standard error details (decoded to JSON when a
//! server sends them). Written
//! for Switchyard with the field names and numbers of the published googleapis definitions
//! (the wire format is the interface). A file of the same name on an import path wins.

use protox::Error;
use protox::file::{File, FileResolver};

pub const STATUS: &str = "google/rpc/status.proto";
pub const ERROR_DETAILS: &str = "google/rpc/error_details.proto";
pub const HTTP: &str = "google/api/http.proto";
pub const ANNOTATIONS: &str = "google/api/annotations.proto";
pub const HTTPBODY: &str = "google/api/httpbody.proto";

const HTTPBODY_SRC: &str = r#"
syntax = "proto3";
package google.api;
import "google/protobuf/any.proto";

// An arbitrary HTTP body: a method returning it answers with `data` as the body and
// `content_type` as its Content-Type.
message HttpBody {
  string content_type = 1;
  bytes data = 2;
  repeated google.protobuf.Any extensions = 3;
}
"#;

const HTTP_SRC: &str = r#"
syntax = "proto3";
package google.api;

// How a method is exposed over HTTP/JSON (`option (google.api.http) = { ... }`).
message Http {
  repeated HttpRule rules = 1;
  bool fully_decode_reserved_expansion = 2;
}

message HttpRule {
  string selector = 1;
  oneof pattern {
    string get = 2;
    string put = 3;
    string post = 4;
    string delete = 5;
    string patch = 6;
    CustomHttpPattern custom = 8;
  }
  string body = 7;
  string response_body = 12;
  repeated HttpRule additional_bindings = 11;
}

message CustomHttpPattern {
  string kind = 1;
  string path = 2;
}
"#;

const ANNOTATIONS_SRC: &str = r#"
syntax = "proto3";
package google.api;
import "google/api/http.proto";
import "google/protobuf/descriptor.proto";

extend google.protobuf.MethodOptions {
  HttpRule http = 72295728;
}
"#;

const STATUS_SRC: &str = r#"
syntax = "proto3";
package google.rpc;
import "google/protobuf/any.proto";

// The error model of gRPC: `grpc-status-details-bin` holds one of these.
message Status {
  int32 code = 1;
  string message = 2;
  repeated google.protobuf.Any details = 3;
}
"#;

const ERROR_DETAILS_SRC: &str = r#"
syntax = "proto3";
package google.rpc;
import "google/protobuf/duration.proto";

message ErrorInfo {
  string reason = 1;
  string domain = 2;
  map<string, string> metadata = 3;
}

message RetryInfo {
  google.protobuf.Duration retry_delay = 1;
}

message QuotaFailure {
  message Violation {
    string subject = 1;
    string description = 2;
  }
  repeated Violation violations = 1;
}

message PreconditionFailure {
  message Violation {
    string type = 1;
    string subject = 2;
    string description = 3;
  }
  repeated Violation violations = 1;
}

message BadRequest {
  message FieldViolation {
    string field = 1;
    string description = 2;
  }
  repeated FieldViolation field_violations = 1;
}

message RequestInfo {
  string request_id = 1;
  string serving_data = 2;
}

message ResourceInfo {
  string resource_type = 1;
  string resource_name = 2;
  string owner = 3;
  string description = 4;
}

message Help {
  message Link {
    string description = 1;
    string url = 2;
  }
  repeated Link links = 1;
}

message LocalizedMessage {
  string locale = 1;
  string message = 2;
}
"#;

/// Serves the embedded files by name.
pub struct EmbeddedFiles;

impl FileResolver for EmbeddedFiles {
    fn open_file(&self, name: &str) -> Result<File, Error> {
        match name {
            STATUS => File::from_source(name, STATUS_SRC),
            ERROR_DETAILS => File::from_source(name, ERROR_DETAILS_SRC),
            HTTP => File::from_source(name, HTTP_SRC),
            ANNOTATIONS => File::from_source(name, ANNOTATIONS_SRC),
            HTTPBODY => File::from_source(name, HTTPBODY_SRC),
            _ => Err(Error::file_not_found(name)),
        }
    }
}
