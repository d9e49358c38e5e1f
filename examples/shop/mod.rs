//! The example order service, `shop.v1.Orders` over h2c: a real gRPC server built on tonic's
//! server machinery with dynamic messages from `examples/protos/shop.proto` (no generated code).
//! `cargo run --example shop_server` runs it; the integration tests start it in-process.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, Value};
use switchyard::backends::grpc::codec::DynamicCodec;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

pub fn proto_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/protos")
}

pub fn pool() -> DescriptorPool {
    // The gateway's own loader, so the embedded google/api and google/rpc files resolve.
    let spec: switchyard::config::GrpcBackendSpec = serde_json::from_value(serde_json::json!({
        "endpoints": ["http://127.0.0.1:1"],
        "protos": ["shop.proto"],
    }))
    .unwrap();
    switchyard::backends::grpc::load_descriptors(&spec, &proto_dir()).unwrap()
}

pub struct GrpcServer {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    /// Messages received on client streams so far.
    pub streamed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcServer {
    /// Serves on an ephemeral loopback port.
    pub async fn start() -> GrpcServer {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> GrpcServer {
        Self::serve(addr, None, Reflection::Off).await
    }

    /// Serves with gRPC server reflection (one version of it) beside the order service.
    pub async fn start_with_reflection(which: Reflection) -> GrpcServer {
        Self::serve("127.0.0.1:0".parse().unwrap(), None, which).await
    }

    /// Serves over TLS (the acceptor must offer ALPN `h2`) on an ephemeral loopback port.
    pub async fn start_tls(acceptor: tokio_rustls::TlsAcceptor) -> GrpcServer {
        Self::serve(
            "127.0.0.1:0".parse().unwrap(),
            Some(acceptor),
            Reflection::Off,
        )
        .await
    }

    async fn serve(
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        reflection: Reflection,
    ) -> GrpcServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = pool();
        let reflector = reflector(&pool, reflection);
        let calls = Arc::new(AtomicUsize::new(0));
        let streamed = Arc::new(AtomicUsize::new(0));
        let c = (calls.clone(), streamed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (pool, c, tls, reflector) =
                    (pool.clone(), c.clone(), tls.clone(), reflector.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (pool, c, reflector) = (pool.clone(), c.clone(), reflector.clone());
                            async move {
                                if let Some((prefix, r)) = reflector
                                    && req.uri().path().starts_with(prefix)
                                {
                                    use tower::ServiceExt;
                                    return r.oneshot(req).await;
                                }
                                Ok::<_, Infallible>(dispatch(pool, c, req).await)
                            }
                        },
                    );
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .http2_only();
                    let _ = match tls {
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(s) => builder.serve_connection(TokioIo::new(s), svc).await,
                            Err(_) => return,
                        },
                        None => builder.serve_connection(TokioIo::new(stream), svc).await,
                    };
                });
            }
        });
        GrpcServer {
            addr,
            calls,
            streamed,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Which gRPC server reflection the server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reflection {
    Off,
    V1,
    V1Alpha,
}

type Reflector = tower::util::BoxCloneService<
    http::Request<hyper::body::Incoming>,
    http::Response<tonic::body::Body>,
    Infallible,
>;

/// The reflection service over the server's own descriptors, and the path prefix it answers.
fn reflector(pool: &DescriptorPool, which: Reflection) -> Option<(&'static str, Reflector)> {
    if which == Reflection::Off {
        return None;
    }
    // The builder borrows the encoded set for as long as the service lives: one per server.
    let encoded: &'static [u8] = Box::leak(pool.encode_to_vec().into_boxed_slice());
    let builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(encoded);
    Some(match which {
        Reflection::V1 => (
            "/grpc.reflection.v1.",
            Reflector::new(builder.build_v1().unwrap()),
        ),
        _ => (
            "/grpc.reflection.v1alpha.",
            Reflector::new(builder.build_v1alpha().unwrap()),
        ),
    })
}

async fn dispatch(
    pool: DescriptorPool,
    (calls, streamed): (Arc<AtomicUsize>, Arc<AtomicUsize>),
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<tonic::body::Body> {
    calls.fetch_add(1, Ordering::SeqCst);
    let name = req.uri().path().trim_start_matches('/').replace('/', ".");
    let (svc, method) = name.rsplit_once('.').unwrap_or(("", ""));
    let method = pool
        .get_service_by_name(svc)
        .and_then(|s| s.methods().find(|m| m.name() == method));
    let Some(method) = method else {
        return Status::unimplemented("no such method").into_http();
    };
    let output = method.output();
    let mut grpc = tonic::server::Grpc::new(DynamicCodec::new(method.input()));
    let name = method.name().to_string();
    if method.is_client_streaming() && method.is_server_streaming() {
        let handler = tower::service_fn(move |r: Request<tonic::Streaming<DynamicMessage>>| {
            let output = output.clone();
            async move { track(output, r) }
        });
        return grpc.streaming(handler, req).await;
    }
    if method.is_client_streaming() {
        let handler = tower::service_fn(move |r: Request<tonic::Streaming<DynamicMessage>>| {
            let (output, streamed) = (output.clone(), streamed.clone());
            async move { import(output, streamed, r).await }
        });
        return grpc.client_streaming(handler, req).await;
    }
    if name == "Sleep" {
        let handler = tower::service_fn(move |r: Request<DynamicMessage>| {
            let output = output.clone();
            async move { sleep(output, r).await }
        });
        return grpc.unary(handler, req).await;
    }
    if method.is_server_streaming() {
        let handler = tower::service_fn(move |r: Request<DynamicMessage>| {
            let output = output.clone();
            async move { watch(output, r) }
        });
        return grpc.server_streaming(handler, req).await;
    }
    let handler = tower::service_fn(move |r: Request<DynamicMessage>| {
        let (output, name) = (output.clone(), name.clone());
        async move { handle(&name, output, r) }
    });
    grpc.unary(handler, req).await
}

type OrderStream = futures_util::stream::Iter<std::vec::IntoIter<Result<DynamicMessage, Status>>>;

/// WatchOrders: three updates of the order; two and then an error for id `fail`; an error as
/// the first item of an accepted stream (after the response headers) for id `late`.
fn watch(
    output: MessageDescriptor,
    r: Request<DynamicMessage>,
) -> Result<Response<OrderStream>, Status> {
    let id = r
        .into_inner()
        .get_field_by_name("id")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    if id == "none" {
        return Err(Status::not_found("no such order to watch"));
    }
    let mut items: Vec<Result<DynamicMessage, Status>> = (1..=3)
        .map(|n| {
            let mut o = order(&output, &id, "eu", n);
            o.set_field_by_name("note", Value::String(format!("update {n}")));
            Ok(o)
        })
        .collect();
    if id == "fail" {
        items.truncate(2);
        items.push(Err(Status::aborted("stream broke")));
    }
    if id == "late" {
        items = vec![Err(Status::failed_precondition(
            "the order is not ready to watch",
        ))];
    }
    Ok(Response::new(futures_util::stream::iter(items)))
}

/// ImportOrders: counts the orders and sums their quantities; an order with id `reject` fails
/// the whole import.
async fn import(
    output: MessageDescriptor,
    streamed: Arc<AtomicUsize>,
    r: Request<tonic::Streaming<DynamicMessage>>,
) -> Result<Response<DynamicMessage>, Status> {
    let mut orders = r.into_inner();
    let (mut count, mut total, mut ids) = (0, 0, Vec::new());
    while let Some(o) = orders.message().await? {
        streamed.fetch_add(1, Ordering::SeqCst);
        let id = o
            .get_field_by_name("id")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        if id == "reject" {
            return Err(Status::failed_precondition(
                "order reject cannot be imported",
            ));
        }
        count += 1;
        total += o
            .get_field_by_name("quantity")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        ids.push(Value::String(id));
    }
    let mut s = DynamicMessage::new(output);
    s.set_field_by_name("count", Value::I32(count));
    s.set_field_by_name("total_quantity", Value::I64(total));
    s.set_field_by_name("ids", Value::List(ids));
    Ok(Response::new(s))
}

type TrackStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<DynamicMessage, Status>> + Send + 'static>,
>;

/// TrackOrders: answers each requested id with its order, as the requests arrive.
fn track(
    output: MessageDescriptor,
    r: Request<tonic::Streaming<DynamicMessage>>,
) -> Result<Response<TrackStream>, Status> {
    use futures_util::StreamExt;
    let replies = r.into_inner().map(move |m| {
        let id = m?
            .get_field_by_name("id")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut o = order(&output, &id, "eu", 1);
        o.set_field_by_name("note", Value::String(format!("tracking {id}")));
        Ok(o)
    });
    Ok(Response::new(Box::pin(replies)))
}

/// Sleep: waits for the requested duration (a google.protobuf.Duration), answers Empty.
async fn sleep(
    output: MessageDescriptor,
    r: Request<DynamicMessage>,
) -> Result<Response<DynamicMessage>, Status> {
    let d = r.into_inner();
    let secs = d
        .get_field_by_name("seconds")
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    let nanos = d
        .get_field_by_name("nanos")
        .and_then(|v| v.as_i32())
        .unwrap_or(0);
    let wait = std::time::Duration::new(secs.max(0) as u64, nanos.max(0) as u32);
    tokio::time::sleep(wait).await;
    Ok(Response::new(DynamicMessage::new(output)))
}

fn order(output: &MessageDescriptor, id: &str, region: &str, quantity: i64) -> DynamicMessage {
    let mut o = DynamicMessage::new(output.clone());
    o.set_field_by_name("id", Value::String(id.into()));
    o.set_field_by_name("region", Value::String(region.into()));
    o.set_field_by_name("quantity", Value::I64(quantity));
    o
}

fn handle(
    name: &str,
    output: MessageDescriptor,
    r: Request<DynamicMessage>,
) -> Result<Response<DynamicMessage>, Status> {
    let rid = r
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let has_timeout = r.metadata().get("grpc-timeout").is_some();
    let traceparent = r.metadata().get("traceparent").cloned();
    let tenant = r
        .metadata()
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let msg = r.into_inner();
    match name {
        "GetOrder" => {
            let id = msg
                .get_field_by_name("id")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            // `code-N` answers with gRPC status N, for the status-mapping tests.
            if let Some(n) = id.strip_prefix("code-").and_then(|n| n.parse::<i32>().ok()) {
                return Err(Status::new(
                    tonic::Code::from(n),
                    format!("asked for status {n}"),
                ));
            }
            match id.as_str() {
                "missing" => return Err(Status::not_found("order missing does not exist")),
                "down" => return Err(Status::unavailable("maintenance")),
                "bad" => {
                    let details = RpcStatus {
                        code: 3,
                        message: "id must be numeric".into(),
                        details: vec![AnyMsg {
                            type_url: "type.googleapis.com/google.rpc.BadRequest".into(),
                            value: BadRequestMsg {
                                field_violations: vec![FieldViolation {
                                    field: "id".into(),
                                    description: "digits only".into(),
                                }],
                            }
                            .encode_to_vec(),
                        }],
                    };
                    return Err(Status::with_details(
                        tonic::Code::InvalidArgument,
                        "id must be numeric",
                        details.encode_to_vec().into(),
                    ));
                }
                _ => {}
            }
            let region = msg
                .get_field_by_name("region")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let mut o = order(
                &output,
                &id,
                if region.is_empty() { "eu" } else { &region },
                42,
            );
            o.set_field_by_name(
                "tags",
                Value::List(vec![Value::String("a".into()), Value::String("b".into())]),
            );
            o.set_field_by_name("status", Value::EnumNumber(2));
            let verbose = msg
                .get_field_by_name("verbose")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let status = msg
                .get_field_by_name("status")
                .and_then(|v| v.as_enum_number())
                .unwrap_or(0);
            o.set_field_by_name(
                "note",
                Value::String(format!(
                    "rid={rid};timeout={has_timeout};verbose={verbose};status={status}"
                )),
            );
            let mut resp = Response::new(o);
            resp.metadata_mut()
                .insert("x-order-version", "3".parse().unwrap());
            // The trace context the call came with, echoed for the tests.
            if let Some(tp) = traceparent {
                resp.metadata_mut().insert("x-traceparent-seen", tp);
            }
            Ok(resp)
        }
        "CreateOrder" => {
            // Echo the given order back under a new id: what went in comes out.
            let mut o = msg
                .get_field_by_name("order")
                .and_then(|v| v.as_message().cloned())
                .unwrap_or_else(|| DynamicMessage::new(output.clone()));
            o.set_field_by_name("id", Value::String("new-1".into()));
            let note = msg
                .get_field_by_name("request_note")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            if !note.is_empty() {
                o.set_field_by_name("note", Value::String(note));
            }
            Ok(Response::new(o))
        }
        "GetLabel" => {
            let id = msg
                .get_field_by_name("id")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let mut body = DynamicMessage::new(output.clone());
            body.set_field_by_name(
                "content_type",
                Value::String("text/plain; charset=utf-8".into()),
            );
            body.set_field_by_name("data", Value::Bytes(format!("SHIP ORDER {id}\n").into()));
            Ok(Response::new(body))
        }
        "PutLabel" => {
            let id = msg
                .get_field_by_name("id")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let label = msg
                .get_field_by_name("label")
                .and_then(|v| v.as_message().cloned());
            let (content_type, data) = label
                .map(|l| {
                    (
                        l.get_field_by_name("content_type")
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                        l.get_field_by_name("data")
                            .and_then(|v| v.as_bytes().cloned())
                            .unwrap_or_default(),
                    )
                })
                .unwrap_or_default();
            let mut o = order(&output, &id, "eu", 0);
            o.set_field_by_name(
                "note",
                Value::String(format!(
                    "label {content_type}, {} bytes: {}",
                    data.len(),
                    String::from_utf8_lossy(&data)
                )),
            );
            Ok(Response::new(o))
        }
        "CancelOrder" => {
            let id = msg
                .get_field_by_name("id")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let mut o = order(&output, &id, "eu", 0);
            let note = match &tenant {
                Some(t) => format!("cancelled for {t}"),
                None => "cancelled".to_string(),
            };
            o.set_field_by_name("note", Value::String(note));
            Ok(Response::new(o))
        }
        _ => Err(Status::unimplemented("not in this test server")),
    }
}

// google.rpc.Status and BadRequest, declared with prost for the test server only.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<AnyMsg>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AnyMsg {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BadRequestMsg {
    #[prost(message, repeated, tag = "1")]
    field_violations: Vec<FieldViolation>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FieldViolation {
    #[prost(string, tag = "1")]
    field: String,
    #[prost(string, tag = "2")]
    description: String,
}
