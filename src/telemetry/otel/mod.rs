//! Traces: the front end opens a request's trace before routing (continuing the client's W3C
//! `traceparent`, or a new one), backends open a child span per try and put its context into
//! what they send (HTTP headers, gRPC metadata, AMQP headers, MQTT 5 user properties), and
//! background work (jobs, spooled messages, webhooks) starts spans linked to the request that
//! accepted it. With `telemetry.otlp` the spans are exported; without it only the context is
//! carried.

mod export;
pub mod spec;

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;

pub use export::Otel;
pub use opentelemetry::trace::SpanKind as Kind;
pub use opentelemetry_semantic_conventions::attribute as semconv;

pub use opentelemetry::KeyValue as Attr;

static PROPAGATOR: LazyLock<TraceContextPropagator> = LazyLock::new(TraceContextPropagator::new);

/// Where a request (or a background run) stands in its trace: the span the gateway has open
/// for it, and the exporter that sends that span when it is recorded. Cheap to clone; put in
/// the request's extensions by the front end.
#[derive(Clone, Debug)]
pub struct Trace {
    otel: Option<Arc<Otel>>,
    cx: Context,
}

/// A retry's number, put in a repeated request's extensions by the retry layer: backends
/// record it on their span (`http.request.resend_count`).
#[derive(Clone, Copy, Debug)]
pub struct Resend(pub u32);

impl Trace {
    /// The server span of a request carrying `headers`: a child of the client's span when it
    /// sends a valid `traceparent`, else the root of a new trace. `attrs` are asked for only
    /// when the span is exported.
    pub fn server(
        otel: Option<&Arc<Otel>>,
        headers: &HeaderMap,
        method: &http::Method,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Trace {
        let parent = PROPAGATOR.extract(&Headers(headers));
        match otel {
            Some(o) => {
                let span = o
                    .tracer
                    .span_builder(method.as_str().to_owned())
                    .with_kind(SpanKind::Server)
                    .with_attributes(attrs())
                    .start_with_context(&o.tracer, &parent);
                Trace {
                    otel: Some(o.clone()),
                    cx: parent.with_span(span),
                }
            }
            None => {
                // Not exported, but the context still goes on: the client's trace (its flags
                // and `tracestate`) with a span id of the gateway's own.
                Trace::unexported(Some(parent.span().span_context()))
            }
        }
    }

    /// A span that starts a new trace for work done later on behalf of requests (a job's run,
    /// a spooled message's forward, a webhook delivery), linked to the spans that accepted it.
    /// Without an exporter, a span id of its own in the (first) linked span's trace, which
    /// backends still receive.
    pub fn linked(
        otel: Option<&Arc<Otel>>,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        links: impl IntoIterator<Item = SpanContext>,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Trace {
        let links: Vec<SpanContext> = links.into_iter().filter(SpanContext::is_valid).collect();
        match otel {
            Some(o) => {
                let links = links.into_iter().map(Link::with_context).collect();
                let span = o
                    .tracer
                    .span_builder(name)
                    .with_kind(kind)
                    .with_links(links)
                    .with_attributes(attrs())
                    .start_with_context(&o.tracer, &Context::new());
                Trace {
                    otel: Some(o.clone()),
                    cx: Context::new().with_span(span),
                }
            }
            // Not exported: the work goes on in the request's trace, so that its log lines
            // and its messages share the request's trace id.
            None => Trace::unexported(links.first()),
        }
    }

    /// A context that is carried but not exported: in `parent`'s trace (its flags and
    /// `tracestate`) when it is a valid one, else in a new trace; a span id of its own.
    fn unexported(parent: Option<&SpanContext>) -> Trace {
        let own = match parent.filter(|p| p.is_valid()) {
            Some(p) => SpanContext::new(
                p.trace_id(),
                new_span_id(),
                p.trace_flags(),
                false,
                p.trace_state().clone(),
            ),
            None => SpanContext::new(
                TraceId::from(fastrand::u128(1..)),
                new_span_id(),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
        };
        Trace {
            otel: None,
            cx: Context::new().with_remote_span_context(own),
        }
    }

    /// The request's trace, from its extensions.
    pub fn of(extensions: &http::Extensions) -> Option<&Trace> {
        extensions.get::<Trace>()
    }

    /// A child span (a backend try, a publish), when this trace is exported and sampled
    /// (this span may have ended: a WebSocket session's frames outlive the upgrade's span);
    /// otherwise this trace itself, so that what is sent carries the request's context.
    pub fn child(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Trace {
        match &self.otel {
            Some(o) if self.cx.span().span_context().is_sampled() => {
                let span = o
                    .tracer
                    .span_builder(name)
                    .with_kind(kind)
                    .with_attributes(attrs())
                    .start_with_context(&o.tracer, &self.cx);
                Trace {
                    otel: Some(o.clone()),
                    cx: self.cx.with_span(span),
                }
            }
            _ => self.clone(),
        }
    }

    /// Whether this span is recorded (exported and sampled).
    pub fn recording(&self) -> bool {
        self.otel.is_some() && self.cx.span().is_recording()
    }

    pub fn span_context(&self) -> SpanContext {
        self.cx.span().span_context().clone()
    }

    /// This span's context as headers: `traceparent`, and `tracestate` when it has one.
    pub fn carried(&self) -> Carried {
        let mut out = Carried {
            traceparent: HeaderValue::from_static(""),
            tracestate: None,
        };
        self.inject_with(|k, v| {
            if let Ok(v) = HeaderValue::try_from(v) {
                match k {
                    "traceparent" => out.traceparent = v,
                    _ => out.tracestate = Some(v),
                }
            }
        });
        out
    }

    /// Puts this span's context into outgoing HTTP headers (or gRPC metadata), replacing the
    /// client's.
    pub fn inject(&self, headers: &mut HeaderMap) {
        self.carried().insert(headers);
    }

    /// [`Trace::inject`] for a backend's child span, when it is a recorded span of its own;
    /// otherwise the request's context, which the front end put in the headers, stands.
    pub fn inject_if_recorded(&self, headers: &mut HeaderMap) {
        if self.recording() {
            self.inject(headers);
        }
    }

    /// Puts this span's context into a message's properties (`traceparent`, and `tracestate`
    /// when there is one) through `set`.
    pub fn inject_with(&self, mut set: impl FnMut(&'static str, String)) {
        struct Set<'a>(&'a mut dyn FnMut(&'static str, String));
        impl Injector for Set<'_> {
            fn set(&mut self, key: &str, value: String) {
                match key {
                    "traceparent" => (self.0)("traceparent", value),
                    "tracestate" if !value.is_empty() => (self.0)("tracestate", value),
                    _ => {}
                }
            }
        }
        PROPAGATOR.inject_context(&self.cx, &mut Set(&mut set));
    }

    /// This span's `traceparent`, to keep with work done later ([`Trace::linked`]).
    pub fn traceparent(&self) -> String {
        let mut out = String::new();
        self.inject_with(|k, v| {
            if k == "traceparent" {
                out = v;
            }
        });
        out
    }

    /// Records an event (a retry, a refusal, a spool write) on a recorded span.
    pub fn event(&self, name: &'static str, attrs: impl FnOnce() -> Vec<KeyValue>) {
        if self.recording() {
            self.cx.span().add_event(name, attrs());
        }
    }

    /// Sets attributes on a recorded span.
    pub fn set(&self, attrs: impl FnOnce() -> Vec<KeyValue>) {
        if self.recording() {
            self.cx.span().set_attributes(attrs());
        }
    }

    /// Records an HTTP answer's status on a client span, failing it from `error_from` on.
    pub fn answered(&self, status: u16, error_from: u16) {
        self.set(|| {
            vec![KeyValue::new(
                semconv::HTTP_RESPONSE_STATUS_CODE,
                i64::from(status),
            )]
        });
        if status >= error_from {
            self.fail(&status.to_string(), "");
        }
    }

    /// Adds a link to another trace's span (a reply's sender).
    pub fn link(&self, to: SpanContext, attrs: Vec<KeyValue>) {
        if self.recording() && to.is_valid() {
            self.cx.span().add_link(to, attrs);
        }
    }

    /// Marks a recorded span failed, with `error.type` and a description.
    pub fn fail(&self, error_type: &str, description: impl Into<Cow<'static, str>>) {
        if self.recording() {
            let span = self.cx.span();
            span.set_attribute(KeyValue::new(semconv::ERROR_TYPE, error_type.to_string()));
            span.set_status(Status::error(description));
        }
    }

    pub fn rename(&self, name: impl Into<Cow<'static, str>>) {
        if self.recording() {
            self.cx.span().update_name(name);
        }
    }

    /// A publish to a broker (messaging semantic conventions), a child of this span; named
    /// and described further by [`Trace::published`] once the message is made.
    pub fn publish(&self, system: &'static str) -> Trace {
        self.child("publish", SpanKind::Producer, || {
            vec![
                KeyValue::new(semconv::MESSAGING_SYSTEM, system),
                KeyValue::new(semconv::MESSAGING_OPERATION_TYPE, "send"),
                KeyValue::new(semconv::MESSAGING_OPERATION_NAME, "publish"),
            ]
        })
    }

    /// Names a publish span after its `destination` and adds the message's facts.
    pub fn published(&self, destination: &str, attrs: impl FnOnce() -> Vec<KeyValue>) {
        if self.recording() {
            let span = self.cx.span();
            span.update_name(format!("publish {destination}"));
            let mut all = attrs();
            all.push(KeyValue::new(
                semconv::MESSAGING_DESTINATION_NAME,
                destination.to_owned(),
            ));
            span.set_attributes(all);
        }
    }

    /// The receipt of a reply on `source` for this request, linked to the span that sent
    /// the reply when it carried a context. Ended at once: the wait is the publish's sibling.
    pub fn reply_received(
        &self,
        system: &'static str,
        source: &str,
        sender: Option<SpanContext>,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) {
        if !self.recording() {
            return;
        }
        let span = self.child(format!("receive {source}"), SpanKind::Consumer, || {
            let mut all = attrs();
            all.extend([
                KeyValue::new(semconv::MESSAGING_SYSTEM, system),
                KeyValue::new(semconv::MESSAGING_OPERATION_TYPE, "receive"),
                KeyValue::new(semconv::MESSAGING_OPERATION_NAME, "receive"),
                KeyValue::new(semconv::MESSAGING_DESTINATION_NAME, source.to_owned()),
            ]);
            all
        });
        if let Some(sender) = sender {
            span.link(sender, vec![KeyValue::new("switchyard.link", "reply")]);
        }
        span.end();
    }

    /// Ends the span with the outcome of what it covered: an error fails it, with the
    /// problem's type as `error.type`.
    pub fn end_with<T>(&self, result: &Result<T, crate::BoxError>) {
        if let Err(e) = result
            && self.recording()
        {
            let kind = e
                .downcast_ref::<crate::error::Problem>()
                .map_or("error", |p| p.kind.slug());
            self.fail(kind, crate::server::dispatch::error_chain(e.as_ref()));
        }
        self.end();
    }

    /// Ends the span (a no-op when not recorded, or ended already).
    pub fn end(&self) {
        if self.recording() {
            self.cx.span().end();
        }
    }

    /// Ends a request's server span with what the answer was.
    pub fn finish_server(
        &self,
        method: &http::Method,
        status: u16,
        route: &str,
        template: Option<&str>,
    ) {
        if !self.recording() {
            return;
        }
        let span = self.cx.span();
        let mut attrs = vec![
            KeyValue::new(semconv::HTTP_RESPONSE_STATUS_CODE, i64::from(status)),
            KeyValue::new("switchyard.route", route.to_string()),
        ];
        if let Some(t) = template {
            attrs.push(KeyValue::new(semconv::HTTP_ROUTE, t.to_string()));
            span.update_name(format!("{method} {t}"));
        }
        if status >= 500 {
            attrs.push(KeyValue::new(semconv::ERROR_TYPE, status.to_string()));
            span.set_status(Status::error(""));
        }
        span.set_attributes(attrs);
        span.end();
    }
}

/// The trace of a WebSocket session's frames: each frame published is a producer span, a
/// child of the upgrade request's span when that is recorded; the message carries that span's
/// context, or else the request's.
#[derive(Clone, Debug, Default)]
pub struct Frames {
    parent: Option<Trace>,
    carried: Vec<(&'static str, String)>,
}

impl Frames {
    /// Of the upgrade request `parts`.
    pub fn of(parts: &http::request::Parts) -> Frames {
        let carried = [("traceparent", &TRACEPARENT), ("tracestate", &TRACESTATE)]
            .into_iter()
            .filter_map(|(k, n)| Some((k, parts.headers.get(n)?.to_str().ok()?.to_string())))
            .collect();
        Frames {
            parent: Trace::of(&parts.extensions).cloned(),
            carried,
        }
    }

    /// A frame's publish span (when recorded), and the context properties its message
    /// carries.
    pub fn publish(&self, system: &'static str) -> (Option<Trace>, Vec<(&'static str, String)>) {
        match self.parent.as_ref().map(|p| p.publish(system)) {
            Some(span) if span.recording() => {
                let mut carried = Vec::with_capacity(2);
                span.inject_with(|k, v| carried.push((k, v)));
                (Some(span), carried)
            }
            _ => (None, self.carried.clone()),
        }
    }
}

/// The exporter that work done in the background (spool forwards, job runs, webhooks) uses:
/// the serving table's, set each time a table starts serving.
#[derive(Default)]
pub struct Current(arc_swap::ArcSwapOption<Otel>);

impl Current {
    pub fn set(&self, otel: Option<Arc<Otel>>) {
        self.0.store(otel);
    }
    pub fn get(&self) -> Option<Arc<Otel>> {
        self.0.load_full()
    }
}

/// The span context a stored or received `traceparent` (and `tracestate`) names, when valid.
pub fn remote(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    struct Pair<'a>(&'a str, Option<&'a str>);
    impl Extractor for Pair<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                "traceparent" => Some(self.0),
                "tracestate" => self.1,
                _ => None,
            }
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent", "tracestate"]
        }
    }
    let cx = PROPAGATOR.extract(&Pair(traceparent, tracestate));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

fn new_span_id() -> SpanId {
    SpanId::from(fastrand::u64(1..))
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // The propagator asks for these two: looked up by their names made once.
        let v = match key {
            "traceparent" => self.0.get(&TRACEPARENT),
            "tracestate" => self.0.get(&TRACESTATE),
            other => self.0.get(other),
        };
        v.and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A span's context as HTTP header values ([`Trace::carried`]).
#[derive(Clone, Debug)]
pub struct Carried {
    pub traceparent: HeaderValue,
    pub tracestate: Option<HeaderValue>,
}

impl Carried {
    /// The trace id and the span id, as the `traceparent` writes them (hex).
    pub fn ids(&self) -> (&str, &str) {
        let s = self.traceparent.to_str().unwrap_or("");
        (s.get(3..35).unwrap_or(""), s.get(36..52).unwrap_or(""))
    }

    /// Into outgoing headers, replacing the client's; a `tracestate` the context does not
    /// carry is removed rather than passed on.
    pub fn insert(&self, headers: &mut HeaderMap) {
        headers.insert(&TRACEPARENT, self.traceparent.clone());
        match &self.tracestate {
            Some(v) => {
                headers.insert(&TRACESTATE, v.clone());
            }
            None => {
                headers.remove(&TRACESTATE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(headers: &HeaderMap) -> String {
        headers["traceparent"].to_str().unwrap().to_string()
    }

    #[test]
    fn continues_valid_traces_and_starts_new_ones() {
        let get = http::Method::GET;
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert("tracestate", HeaderValue::from_static("vendor=1"));
        let t = Trace::server(None, &h, &get, Vec::new);
        let mut out = h.clone();
        t.inject(&mut out);
        let s = tp(&out);
        assert!(s.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{s}");
        assert!(!s.contains("00f067aa0ba902b7") && s.ends_with("-01"), "{s}");
        assert_eq!(out["tracestate"], "vendor=1");
        assert!(remote(&s, None).is_some());

        // Garbage starts a new trace, and a stale `tracestate` is not passed on.
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        let mut out = h.clone();
        Trace::server(None, &h, &get, Vec::new).inject(&mut out);
        let s = tp(&out);
        assert_eq!(s.len(), 55);
        assert!(remote(&s, None).is_some(), "{s}");
        assert!(!out.contains_key("tracestate"));

        // The client's unsampled flag is kept; the span is new.
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        );
        let mut out = h.clone();
        Trace::server(None, &h, &get, Vec::new).inject(&mut out);
        assert!(tp(&out).ends_with("-00"));
        assert!(
            remote(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                None
            )
            .is_none()
        );
    }

    #[test]
    fn unexported_background_work_stays_in_the_requests_trace() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let later = Trace::linked(None, "job", SpanKind::Consumer, remote(tp, None), Vec::new);
        let out = later.traceparent();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(!out.contains("00f067aa0ba902b7"), "{out}");
        let fresh = Trace::linked(None, "job", SpanKind::Consumer, None, Vec::new).traceparent();
        assert!(
            remote(&fresh, None).is_some() && !fresh.contains("4bf92f35"),
            "{fresh}"
        );
    }
}
