//! OTLP span export, off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set. Spans are `tracing` spans of target
//! [`TARGET`]: the log output never sees them, and the OpenTelemetry layer sees nothing else.
//! Export runs on the batch processor's own thread; a slow or broken collector only drops
//! spans (the processor's queue is bounded and never waited on).

use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use thiserror::Error;
use tracing::Span;
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

use crate::cloudevent::{CloudEvent, ExtValue};
use crate::sink::{Delivered, EventRecord, OutRecord, PublishError};
use crate::trace_context::{TRACEPARENT, TRACESTATE_HEADER, TraceParent};

/// The target of every exported span; the log filter turns it off (`app::init_tracing`).
pub const TARGET: &str = "eventwire::otel";
const DEFAULT_SERVICE_NAME: &str = "eventwire-sidecar";
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];
const PROTOCOL_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
];
/// The spans still queued at shutdown get this long to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// A collector that stays down would otherwise log a warning per batch.
const FAILURE_REPORT_INTERVAL: Duration = Duration::from_secs(60);

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("{0} is {1:?}; the OTLP exporter here speaks http/protobuf or http/json")]
    Protocol(&'static str, String),
}

/// Whether spans are exported. Every span constructor checks this first, so with export off
/// an event costs one load and no attribute is formatted.
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// The OpenTelemetry layer when the environment asks for export, else `None`.
pub fn layer<S>() -> Result<Option<impl Layer<S>>, TelemetryError>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if !ENDPOINT_VARS.iter().any(|v| env(v).is_some()) {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol()?)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Reported::new(exporter))
        .with_resource(resource())
        .build();
    let tracer = provider.tracer(DEFAULT_SERVICE_NAME);
    let _ = PROVIDER.set(provider);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_level(false);
    Ok(Some(layer.with_filter(
        Targets::new().with_target(TARGET, LevelFilter::TRACE),
    )))
}

/// Sends what is queued and stops the exporter; blocking, so off the async workers.
pub async fn shutdown() {
    let Some(provider) = PROVIDER.get().cloned() else {
        return;
    };
    let done =
        tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
    match done.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "OTLP export: shutdown incomplete"),
        Err(e) => tracing::warn!(error = %e, "OTLP export: shutdown task failed"),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The signal's own variable first, as the OTLP exporter spec orders them; http/protobuf
/// by default (the crate would pick JSON when both encodings are built in).
fn protocol() -> Result<Protocol, TelemetryError> {
    let Some((var, value)) = PROTOCOL_VARS.iter().find_map(|v| Some((*v, env(v)?))) else {
        return Ok(Protocol::HttpBinary);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "http/protobuf" => Ok(Protocol::HttpBinary),
        "http/json" => Ok(Protocol::HttpJson),
        _ => Err(TelemetryError::Protocol(var, value)),
    }
}

/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` as the SDK reads them, our name
/// instead of `unknown_service` when neither names the service.
fn resource() -> Resource {
    let builder = Resource::builder();
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if named {
        builder.build()
    } else {
        builder.with_service_name(DEFAULT_SERVICE_NAME).build()
    }
}

/// The span context an event's `traceparent` names, as a remote parent or link.
pub fn remote_context(tp: &TraceParent, tracestate: Option<&str>) -> SpanContext {
    let state = tracestate
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    SpanContext::new(
        TraceId::from_bytes(tp.trace_id.0),
        SpanId::from_bytes(tp.parent_id.0),
        TraceFlags::new(tp.flags),
        true,
        state,
    )
}

fn ext_str<'a>(event: &'a CloudEvent, name: &str) -> Option<&'a str> {
    match event.extensions.get(name)? {
        ExtValue::String(s) => Some(s),
        _ => None,
    }
}

/// The event's trace context, when its `traceparent` is valid (else it has none).
pub fn event_trace(event: &CloudEvent) -> Option<TraceParent> {
    ext_str(event, TRACEPARENT).and_then(|v| TraceParent::parse(v).ok())
}

/// `eventwire.ingest`: accepting one event, a child of its `traceparent` (a new root when
/// it has none or an invalid one). Read from the record, which holds every attribute.
pub fn ingest_span(event: &EventRecord) -> Span {
    if !enabled() {
        return Span::none();
    }
    let record = &event.record;
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "eventwire.ingest",
        otel.kind = "server",
        cloudevents.event_id = event.id.as_str(),
        cloudevents.event_type = header(record, "ce_type"),
        cloudevents.event_source = event.source.as_str(),
        messaging.system = "kafka",
        messaging.destination.name = record.topic.as_str(),
    );
    if let Some(parent) = record_context(record) {
        let _ = span.set_parent(Context::new().with_remote_span_context(parent));
    }
    span
}

/// The trace context a record's `ce_traceparent` (and `ce_tracestate`) name.
fn record_context(record: &OutRecord) -> Option<SpanContext> {
    let pairs = record.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let tp = TraceParent::from_headers(pairs)?;
    Some(remote_context(&tp, header(record, TRACESTATE_HEADER)))
}

/// Marks a span failed; a no-op on a disabled span.
pub fn failed(span: &Span, error: &dyn std::fmt::Display) {
    if !span.is_disabled() {
        span.set_status(Status::error(error.to_string()));
    }
}

fn header<'a>(record: &'a OutRecord, name: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .find_map(|(k, v)| (k == name).then_some(v.as_str()))
}

/// `eventwire.produce`: one send of an event's record to Kafka, in a trace of its own
/// linked to the event's trace context (the send may come long after the ingest, from the
/// spool, after a restart).
pub fn produce_span(record: &OutRecord) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "eventwire.produce",
        otel.kind = "producer",
        cloudevents.event_id = header(record, "ce_id"),
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = record.topic.as_str(),
    );
    if let Some(linked) = record_context(record) {
        span.add_link(linked);
    }
    span
}

/// Records where the broker put the record, or why it did not.
pub fn produced(span: &Span, result: &Result<Delivered, PublishError>) {
    if span.is_disabled() {
        return;
    }
    match result {
        Ok(d) => {
            span.set_attribute(
                "messaging.destination.partition.id",
                d.partition.to_string(),
            );
            span.set_attribute("messaging.kafka.offset", d.offset);
        }
        Err(e) => failed(span, e),
    }
}

/// What the fan-out knows of a consumed record, for its `eventwire.deliver` span.
pub struct Consumed<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub event_id: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
    pub subscribers: usize,
}

/// `eventwire.deliver`: one consumed record broadcast to a topic's subscribers, linked to
/// the trace context its `ce_traceparent` header names.
pub fn deliver_span(c: &Consumed<'_>) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        parent: None,
        "eventwire.deliver",
        otel.kind = "consumer",
        cloudevents.event_id = c.event_id,
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = c.topic,
        messaging.destination.partition.id = %c.partition,
        messaging.kafka.offset = c.offset,
        eventwire.subscribers = c.subscribers as i64,
    );
    if let Some(tp) = c.traceparent.and_then(|v| TraceParent::parse(v).ok()) {
        span.add_link(remote_context(&tp, c.tracestate));
    }
    span
}

/// The OTLP exporter, reporting failed exports at most once a minute (at warn: spans are
/// being lost) instead of not at all.
#[derive(Debug)]
struct Reported<E> {
    inner: E,
    last_report: Mutex<Option<Instant>>,
}

impl<E> Reported<E> {
    fn new(inner: E) -> Self {
        Reported {
            inner,
            last_report: Mutex::new(None),
        }
    }

    fn report(&self, spans: usize, error: &dyn std::fmt::Display) {
        let mut last = self
            .last_report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < FAILURE_REPORT_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        tracing::warn!(spans, error = %error, "OTLP export failed; those spans are dropped (reported at most once a minute)");
    }
}

impl<E: SpanExporter> SpanExporter for Reported<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        if let Err(e) = &result {
            self.report(spans, e);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_context_carries_the_traceparent() {
        let tp =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let cx = remote_context(&tp, Some("congo=t61rcWkgMzE"));
        assert!(cx.is_valid() && cx.is_remote() && cx.is_sampled());
        assert_eq!(
            cx.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(cx.trace_state().get("congo"), Some("t61rcWkgMzE"));
        let parent = Context::new().with_remote_span_context(cx);
        assert_eq!(
            parent.span().span_context().trace_id(),
            TraceId::from_bytes(tp.trace_id.0)
        );
        // An invalid tracestate is dropped, the parent kept.
        let cx = remote_context(&tp, Some("not a tracestate"));
        assert!(cx.is_valid() && cx.trace_state().header().is_empty());
    }

    #[test]
    fn spans_are_disabled_without_export() {
        assert!(!enabled());
        let event = crate::cloudevent::parse_structured(
            br#"{"specversion":"1.0","id":"e1","source":"/s","type":"t","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#,
        )
        .unwrap();
        let trace = event_trace(&event);
        assert_eq!(
            trace.map(|t| t.trace_id.to_string()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let record = EventRecord {
            id: event.id.clone(),
            source: event.source.clone(),
            record: OutRecord {
                topic: "t".into(),
                key: None,
                headers: event.to_kafka(None).headers,
                value: None,
            },
        };
        assert!(ingest_span(&record).is_disabled());
        assert!(produce_span(&record.record).is_disabled());
        assert!(record_context(&record.record).is_some_and(|c| c.is_remote()));
    }
}
