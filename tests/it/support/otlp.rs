//! An OpenTelemetry collector for the trace tests: OTLP/gRPC (the trace service of
//! opentelemetry-proto on tonic) and OTLP/HTTP with protobuf bodies on one port, keeping every
//! span it receives.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A span as received, its ids in hex.
#[derive(Debug, Clone)]
pub struct Got {
    pub name: String,
    /// `SPAN_KIND_SERVER` and so on, without the prefix, lower case.
    pub kind: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent: String,
    pub attrs: BTreeMap<String, String>,
    pub events: Vec<(String, BTreeMap<String, String>)>,
    /// Linked spans: (trace id, span id).
    pub links: Vec<(String, String)>,
    /// 2 is an error.
    pub status: i32,
    /// The resource's attributes.
    pub resource: BTreeMap<String, String>,
}

impl Got {
    pub fn attr(&self, k: &str) -> &str {
        self.attrs
            .get(k)
            .unwrap_or_else(|| panic!("{} has no {k}: {:?}", self.name, self.attrs))
    }
}

/// An export's transport (`grpc`, `http`) and its `authorization` header.
pub type Seen = (String, Option<String>);

#[derive(Clone, Default)]
pub struct Collector {
    pub addr: Option<SocketAddr>,
    spans: Arc<Mutex<Vec<Got>>>,
    /// Requests seen on each path (`grpc`, `http`), and their headers' `authorization`.
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        self.seen.lock().unwrap().push(("grpc".into(), auth));
        self.keep(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

impl Collector {
    pub async fn start() -> Collector {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Collector {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let me = Collector {
            addr: Some(listener.local_addr().unwrap()),
            ..Collector::default()
        };
        let this = me.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let this = this.clone();
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let this = this.clone();
                        async move {
                            if req.uri().path() == "/v1/traces" {
                                let auth = req
                                    .headers()
                                    .get("authorization")
                                    .and_then(|v| v.to_str().ok())
                                    .map(String::from);
                                this.seen.lock().unwrap().push(("http".into(), auth));
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let export = ExportTraceServiceRequest::decode(body).unwrap();
                                this.keep(export);
                                let out = ExportTraceServiceResponse::default().encode_to_vec();
                                let resp = http::Response::builder()
                                    .header("content-type", "application/x-protobuf")
                                    .body(
                                        Full::new(Bytes::from(out))
                                            .map_err(BoxError::from)
                                            .boxed_unsync(),
                                    )
                                    .unwrap();
                                return Ok::<_, std::convert::Infallible>(resp);
                            }
                            use tower::ServiceExt;
                            let resp = TraceServiceServer::new(this).oneshot(req).await.unwrap();
                            Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        me
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.addr.unwrap())
    }

    fn keep(&self, export: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for rs in export.resource_spans {
            let resource = rs
                .resource
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let kind =
                        opentelemetry_proto::tonic::trace::v1::span::SpanKind::try_from(s.kind)
                            .map(|k| {
                                k.as_str_name()
                                    .trim_start_matches("SPAN_KIND_")
                                    .to_lowercase()
                            })
                            .unwrap_or_default();
                    spans.push(Got {
                        name: s.name,
                        kind,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: attrs(&s.attributes),
                        events: s
                            .events
                            .iter()
                            .map(|e| (e.name.clone(), attrs(&e.attributes)))
                            .collect(),
                        links: s
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                        status: s.status.map_or(0, |st| st.code),
                        resource: resource.clone(),
                    });
                }
            }
        }
    }

    pub fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans of trace `trace_id` once `want` of them have arrived (within 20 s).
    pub async fn trace(&self, trace_id: &str, want: usize) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got: Vec<Got> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if got.len() >= want {
                return got;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "trace {trace_id}: {} of {want} spans arrived: {got:#?}\nall: {:#?}",
                    got.len(),
                    self.spans()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first span received that `f` accepts (within 20 s).
    pub async fn find(&self, what: &str, f: impl Fn(&Got) -> bool) -> Got {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.spans().into_iter().find(|s| f(s)) {
                return s;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("no span {what} arrived: {:#?}", self.spans());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The span named `name` among `spans`.
pub fn named<'a>(spans: &'a [Got], name: &str) -> &'a Got {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name} in {spans:#?}"))
}

/// The trace id of a `traceparent`.
pub fn trace_of(traceparent: &str) -> String {
    traceparent.split('-').nth(1).unwrap().to_string()
}
