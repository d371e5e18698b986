//! OTLP span export (issue 16): the sidecar, started with the standard `OTEL_*` variables,
//! sends its spans to a collector stand-in in this test (OTLP/HTTP JSON on `/v1/traces`).
//! An event's `ce-traceparent` becomes the parent of its `eventwire.ingest` span and the
//! link of its `eventwire.produce` and `eventwire.deliver` spans; an invalid one only means
//! a new root. Without those variables the sidecar exports nothing (every other suite).

use axum::extract::State;
use axum::routing;
use eventwire_e2e::push::{WsClient, subscribe_path};
use eventwire_e2e::*;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// Records every `POST /v1/traces` body; stops serving when dropped.
struct Collector {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/v1/traces", routing::post(receive))
            .with_state(bodies.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind the collector: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("collector address: {e}"))
            .port();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Collector {
            url: format!("http://127.0.0.1:{port}"),
            bodies,
            server,
        }
    }

    /// Every span received so far, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Value)> {
        let bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        let mut spans = Vec::new();
        for body in bodies.iter() {
            for rs in body["resourceSpans"].as_array().into_iter().flatten() {
                let service = attr(&rs["resource"], "service.name")
                    .and_then(|v| v["stringValue"].as_str())
                    .unwrap_or_default()
                    .to_string();
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        spans.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }

    /// Waits for the span named `name` whose `cloudevents.event_id` is `id`.
    async fn span(&self, name: &str, id: &str) -> Value {
        let found = || {
            self.spans().into_iter().map(|(_, s)| s).find(|s| {
                s["name"] == name
                    && attr(s, "cloudevents.event_id").map(|v| &v["stringValue"])
                        == Some(&id.into())
            })
        };
        wait_until(&format!("a `{name}` span for {id}"), WAIT, || async {
            found().is_some()
        })
        .await;
        found().unwrap_or_default()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(State(bodies): State<Arc<Mutex<Vec<Value>>>>, body: String) -> &'static str {
    let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    bodies.lock().unwrap_or_else(|e| e.into_inner()).push(value);
    "{}"
}

/// The value of attribute `key` of a span or resource (`{"stringValue": ..}` and the like).
fn attr<'a>(of: &'a Value, key: &str) -> Option<&'a Value> {
    of["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

fn links_to(span: &Value, trace: &str, parent: &str) -> bool {
    span["links"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|l| l["traceId"] == trace && l["spanId"] == parent)
}

async fn sidecar(broker: &Broker, collector: &Collector, schedule_delay_ms: &str) -> Sidecar {
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", schedule_delay_ms),
    ];
    let sidecar = Sidecar::start_with_env(&broker.bootstrap(), &[], &env).await;
    sidecar.wait_ready().await;
    sidecar
}

/// A binary-mode event straight to the sidecar; the answer's status.
async fn post(sidecar: &Sidecar, topic: &str, id: &str, traceparent: &str) -> u16 {
    reqwest::Client::new()
        .post(sidecar.url("/v1/events"))
        .header("eventwire-topic", topic)
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/tests/tracing")
        .header("ce-type", "com.example.traced")
        .header("ce-traceparent", traceparent)
        .header("content-type", "application/json")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /v1/events: {e}"))
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_traceparent_parents_its_ingest_span_and_links_its_produce_and_deliver_spans() {
    let collector = Collector::start().await;
    let broker = Broker::start().await;
    let topic = topic("traced");
    broker.create_topic(&topic, 1).await;
    let sidecar = sidecar(&broker, &collector, "200").await;
    let ws = format!(
        "ws://127.0.0.1:{}{}",
        sidecar.port,
        subscribe_path(&topic, &[("from", "latest")])
    );
    let mut subscriber = WsClient::connect(&ws).await;

    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    assert_eq!(post(&sidecar, &topic, "traced-1", &traceparent).await, 202);
    let frames = subscriber.take(1, WAIT).await;
    assert_eq!(frames.len(), 1, "the event reaches its subscriber");
    assert_eq!(frames[0]["event"]["traceparent"], traceparent.as_str());

    let ingest = collector.span("eventwire.ingest", "traced-1").await;
    assert_eq!(ingest["traceId"], TRACE, "{ingest}");
    assert_eq!(ingest["parentSpanId"], PARENT, "{ingest}");
    for (key, want) in [
        ("cloudevents.event_type", "com.example.traced"),
        ("cloudevents.event_source", "/tests/tracing"),
        ("messaging.destination.name", topic.as_str()),
        ("messaging.system", "kafka"),
    ] {
        assert_eq!(
            attr(&ingest, key).map(|v| &v["stringValue"]),
            Some(&want.into()),
            "{key}: {ingest}"
        );
    }
    let produce = collector.span("eventwire.produce", "traced-1").await;
    assert!(links_to(&produce, TRACE, PARENT), "{produce}");
    assert!(
        attr(&produce, "messaging.kafka.offset").is_some(),
        "{produce}"
    );
    let deliver = collector.span("eventwire.deliver", "traced-1").await;
    assert!(links_to(&deliver, TRACE, PARENT), "{deliver}");
    let services: Vec<String> = collector.spans().into_iter().map(|(s, _)| s).collect();
    assert!(
        services.iter().all(|s| s == "eventwire-sidecar"),
        "{services:?}"
    );

    // Invalid trace contexts: accepted all the same, each ingest span a root of its own.
    let invalid = [
        format!("00-{}-{PARENT}-01", "0".repeat(32)),
        format!("ff-{TRACE}-{PARENT}-01"),
        format!("00-{TRACE}-{PARENT}"),
    ];
    for (n, value) in invalid.iter().enumerate() {
        let id = format!("untraced-{n}");
        assert_eq!(post(&sidecar, &topic, &id, value).await, 202, "{value}");
        let root = collector.span("eventwire.ingest", &id).await;
        let parent = root["parentSpanId"].as_str().unwrap_or_default();
        assert!(parent.is_empty(), "{value}: {root}");
        let trace = root["traceId"].as_str().unwrap_or_default();
        assert!(
            trace.len() == 32 && trace != TRACE && trace != "0".repeat(32),
            "{root}"
        );
    }
    subscriber.close().await;
}

/// Through Envoy: the client's `traceparent` on a plain request is the parent of the event's
/// ingest span; without one, the ingest span's parent is the trace the filter started and
/// named in the 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_trace_through_envoy_parents_the_ingest_span() {
    let collector = Collector::start().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let orders = "order-placed-events";
    let s = Stack::start_with_env(&EnvoyConfig::shipped(), &[(orders, 1)], &[], &env).await;
    let order = |traceparent: Option<String>| {
        let mut req = s
            .http
            .post(s.envoy.url("/orders"))
            .header("content-type", "application/json")
            .body(r#"{"id":"ord-traced"}"#);
        if let Some(t) = traceparent {
            req = req.header("traceparent", t);
        }
        async move {
            let resp = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("POST /orders: {e}"));
            assert_eq!(resp.status().as_u16(), 202);
            let trace = resp
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok());
            let trace = trace.unwrap_or_default().to_owned();
            let ack: Value = resp.json().await.unwrap_or_default();
            (ack["id"].as_str().unwrap_or_default().to_owned(), trace)
        }
    };
    let (id, echoed) = order(Some(format!("00-{TRACE}-{PARENT}-01"))).await;
    assert_eq!(echoed, format!("00-{TRACE}-{PARENT}-01"));
    let ingest = collector.span("eventwire.ingest", &id).await;
    assert_eq!(ingest["traceId"], TRACE, "{ingest}");
    assert_eq!(ingest["parentSpanId"], PARENT, "{ingest}");

    let (id, started) = order(None).await;
    let fields: Vec<&str> = started.split('-').collect();
    assert_eq!(fields.len(), 4, "{started}");
    let ingest = collector.span("eventwire.ingest", &id).await;
    assert_eq!(ingest["traceId"], fields[1], "{ingest}");
    assert_eq!(ingest["parentSpanId"], fields[2], "{ingest}");
}

/// The last spans are sent when the sidecar stops, not lost with the batch processor's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_queued_are_sent_on_shutdown() {
    let collector = Collector::start().await;
    let broker = Broker::start().await;
    let topic = topic("traced-stop");
    broker.create_topic(&topic, 1).await;
    // Far longer than the test: only the shutdown can send them.
    let mut sidecar = sidecar(&broker, &collector, "600000").await;
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    assert_eq!(post(&sidecar, &topic, "last-1", &traceparent).await, 202);
    assert!(collector.spans().is_empty(), "nothing sent before the stop");
    let code = tokio::task::block_in_place(|| sidecar.proc.stop());
    assert_eq!(code, Some(0), "the sidecar stops cleanly");
    let ingest = collector.span("eventwire.ingest", "last-1").await;
    assert_eq!(ingest["traceId"], TRACE, "{ingest}");
    collector.span("eventwire.produce", "last-1").await;
}

/// A collector that is down costs spans, never events: ingest answers as before and the
/// failure is logged (once a minute at most).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_changes_nothing_for_events() {
    let gone = Collector::start().await;
    let url = gone.url.clone();
    drop(gone);
    let broker = Broker::start().await;
    let topic = topic("traced-down");
    broker.create_topic(&topic, 1).await;
    let env = [
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("{url}/v1/traces"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sidecar = Sidecar::start_with_env(&broker.bootstrap(), &[], &env).await;
    sidecar.wait_ready().await;
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    for n in 0..5 {
        let id = format!("down-{n}");
        assert_eq!(post(&sidecar, &topic, &id, &traceparent).await, 202);
    }
    assert_eq!(broker.records(&topic, 5, WAIT).len(), 5);
    wait_until("the export failure in the log", WAIT, || async {
        sidecar.proc.log_text().contains("OTLP export failed")
    })
    .await;
    let failures = sidecar
        .proc
        .log_text()
        .matches("OTLP export failed")
        .count();
    assert_eq!(failures, 1, "reported once, not per batch");
}
