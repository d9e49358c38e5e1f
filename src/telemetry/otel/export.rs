//! The OTLP exporter of `telemetry.otlp`: built at load time, kept across reloads that do not
//! change it, fed finished spans by the request path through the SDK's batch processor (a
//! thread of its own, never a request's), and watched so that an unreachable collector is
//! logged once, not per batch.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};

use super::spec::{OtlpProtocol, OtlpSpec};
use crate::backends::tls::{self, Alpn, HttpsConnector};

/// The largest answer read from an OTLP/HTTP collector (its partial-success message).
const MAX_ANSWER: usize = 4 << 20;

/// A running exporter: the tracer spans are started with, and the provider that batches and
/// sends them. Shut down (flushing what is queued) when the last holder lets go.
pub struct Otel {
    pub(super) tracer: SdkTracer,
    provider: SdkTracerProvider,
    spec: OtlpSpec,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otel")
            .field("endpoint", &self.spec.endpoint)
            .finish_non_exhaustive()
    }
}

impl Drop for Otel {
    fn drop(&mut self) {
        // Flushing waits on the collector: never on a runtime thread.
        let provider = self.provider.clone();
        let timeout = self.spec.timeout.0;
        let _ = std::thread::Builder::new()
            .name("otlp-shutdown".into())
            .spawn(move || {
                let _ = provider.shutdown_with_timeout(timeout);
            });
    }
}

impl Otel {
    /// The exporter of `spec`: `previous` itself when it was built from the same settings
    /// (and reads no files that may have changed), else a new one. Must run inside the Tokio
    /// runtime the exports are to use (the gRPC channel's task is spawned on it).
    pub fn reuse_or_build(
        previous: Option<&Arc<Otel>>,
        spec: Option<&OtlpSpec>,
        base: &Path,
    ) -> Result<Option<Arc<Otel>>, String> {
        let Some(spec) = spec else {
            return Ok(None);
        };
        if let Some(p) = previous
            && p.spec == *spec
            && spec.tls.is_none()
        {
            return Ok(Some(p.clone()));
        }
        Self::build(spec, base).map(|o| Some(Arc::new(o)))
    }

    fn build(spec: &OtlpSpec, base: &Path) -> Result<Otel, String> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(spec.timeout.0));
        let fail = |e: &dyn std::fmt::Display| format!("telemetry.otlp: {e}");
        let exporter = match spec.protocol {
            OtlpProtocol::Grpc => {
                let connector = connector(spec, base, http, Alpn::H2)?;
                let channel = tonic::transport::Endpoint::from_shared(spec.endpoint.clone())
                    .map_err(|e| fail(&e))?
                    .connect_timeout(spec.timeout.0)
                    .timeout(spec.timeout.0)
                    .connect_with_connector_lazy(connector);
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &spec.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                        .map_err(|e| fail(&e))?;
                    metadata.insert(key, v.parse().map_err(|e| fail(&e))?);
                }
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_channel(channel)
                    .with_metadata(metadata)
                    .with_timeout(spec.timeout.0)
                    .build()
                    .map_err(|e| fail(&e))?
            }
            OtlpProtocol::HttpProtobuf => {
                let connector = connector(spec, base, http, Alpn::Both)?;
                let client = HttpExport {
                    client: Client::builder(TokioExecutor::new()).build(connector),
                    runtime: tokio::runtime::Handle::try_current()
                        .map_err(|_| fail(&"no runtime to export on"))?,
                    timeout: spec.timeout.0,
                };
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(client)
                    .with_endpoint(http_endpoint(&spec.endpoint))
                    .with_headers(spec.headers.clone().into_iter().collect())
                    .with_timeout(spec.timeout.0)
                    .build()
                    .map_err(|e| fail(&e))?
            }
        };
        let exporter = Watched {
            inner: exporter,
            endpoint: spec.endpoint.clone(),
            state: Mutex::new(Watch::default()),
        };
        let batches = BatchConfigBuilder::default()
            .with_scheduled_delay(spec.flush_interval.0)
            .with_max_queue_size(spec.max_queue)
            .with_max_export_batch_size(spec.max_queue.min(512))
            .build();
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(spec.service_name.clone())
            .with_attributes(
                spec.resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batches)
                    .build(),
            )
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                spec.sampling,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer_with_scope(
            opentelemetry::InstrumentationScope::builder("switchyard")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Ok(Otel {
            tracer,
            provider,
            spec: spec.clone(),
        })
    }
}

/// The connector to the collector: TLS with `tls`'s settings to an `https://` endpoint.
fn connector(
    spec: &OtlpSpec,
    base: &Path,
    http: HttpConnector,
    alpn: Alpn,
) -> Result<HttpsConnector, String> {
    tls::connector_for(
        std::slice::from_ref(&spec.endpoint),
        spec.tls.as_ref(),
        base,
        http,
        alpn,
    )
    .map_err(|e| format!("telemetry.otlp: {e}"))
}

/// The OTLP/HTTP URL of traces: `endpoint` itself when it has a path, else its `/v1/traces`.
fn http_endpoint(endpoint: &str) -> String {
    match endpoint.parse::<http::Uri>() {
        Ok(u) if u.path() == "/" => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.to_string(),
    }
}

/// OTLP/HTTP over the gateway's own HTTPS client. The SDK's batch thread is not a runtime
/// thread, so each export runs on the runtime the exporter was built on.
#[derive(Debug)]
struct HttpExport {
    client: Client<HttpsConnector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for HttpExport {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (client, timeout) = (self.client.clone(), self.timeout);
        let request = request.map(Full::new);
        let exchange = async move {
            let resp = client.request(request).await?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_ANSWER)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        };
        self.runtime
            .spawn(async move {
                tokio::time::timeout(timeout, exchange)
                    .await
                    .map_err(|_| "the collector did not answer in time")?
            })
            .await?
    }
}

/// An exporter whose failures are logged the way backends' are: one WARN when exports start
/// failing (with the cause), one INFO when they work again, repeats only for a new cause and
/// at most once a minute.
#[derive(Debug)]
struct Watched<E> {
    inner: E,
    endpoint: String,
    state: Mutex<Watch>,
}

#[derive(Debug, Default)]
struct Watch {
    failing_since: Option<Instant>,
    cause: String,
    warned: Option<Instant>,
    lost: u64,
}

impl<E> Watched<E> {
    fn outcome(&self, result: &OTelSdkResult, spans: usize) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                if let Some(since) = s.failing_since.take() {
                    tracing::info!(endpoint = %self.endpoint, down_ms = since.elapsed().as_millis() as u64, spans_lost = s.lost, "Trace export works again.");
                }
                *s = Watch::default();
            }
            Err(e) => {
                let cause = match e {
                    OTelSdkError::Timeout(t) => format!("no answer within {t:?}"),
                    other => crate::telemetry::redact::secrets(&other.to_string()).into_owned(),
                };
                let now = Instant::now();
                s.lost += spans as u64;
                let first = s.failing_since.is_none();
                let repeat = !first
                    && s.cause != cause
                    && s.warned
                        .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60));
                if first || repeat {
                    tracing::warn!(endpoint = %self.endpoint, %cause, spans_lost = s.lost, "Trace export failing; spans are dropped until the collector answers.");
                    s.failing_since.get_or_insert(now);
                    s.cause = cause;
                    s.warned = Some(now);
                } else {
                    tracing::debug!(endpoint = %self.endpoint, %cause, "Trace export still failing.");
                }
            }
        }
    }
}

impl<E: SpanExporter> SpanExporter for Watched<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.outcome(&result, n);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_endpoints_get_the_traces_path_only_without_one() {
        assert_eq!(http_endpoint("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_endpoint("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            http_endpoint("https://c/otlp/v1/traces"),
            "https://c/otlp/v1/traces"
        );
    }
}
