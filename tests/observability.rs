//! Observability against real processes (issue 16). Metrics: `GET /metrics` of a real
//! sidecar after a known mix of accepted events, duplicates and refusals sent straight to it,
//! with one SSE subscriber (every counter holds exactly what was sent, the durable path is
//! empty again, the push side reports its subscriber, frames and consumer lag); and Envoy's
//! `/stats/prometheus` with the sidecar's `/metrics` after requests through the proxy. Scrapes
//! are parsed as exposition format (`harness::prom`), never searched as text. Traces: one
//! trace context from the HTTP request through Kafka to a WebSocket subscriber.

use eventwire_e2e::prom::{self, Samples};
use eventwire_e2e::push::{SseClient, WsClient, subscribe_path};
use eventwire_e2e::*;
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
/// Small, so one request is refused as too large without sending much.
const MAX_BODY: usize = 4096;

struct Client {
    http: reqwest::Client,
    sidecar: Sidecar,
}

impl Client {
    /// `POST /v1/events` with the stack's secret unless `auth` is false; the status.
    async fn post(&self, topic: &str, headers: &[(&str, &str)], body: &str, auth: bool) -> u16 {
        let mut req = self
            .http
            .post(self.sidecar.url("/v1/events"))
            .header("eventwire-topic", topic)
            .body(body.to_owned());
        if auth {
            req = req.header("authorization", bearer());
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /v1/events: {e}"));
        resp.status().as_u16()
    }

    /// One binary-mode event whose Kafka record value is `data`.
    async fn binary(&self, topic: &str, id: &str, data: &str) -> u16 {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", id),
            ("ce-source", "/observability"),
            ("ce-type", "test.metrics"),
            ("content-type", "text/plain"),
        ];
        self.post(topic, &headers, data, true).await
    }

    async fn scrape(&self) -> Samples {
        let resp = self
            .http
            .get(self.sidecar.url("/metrics"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert_eq!(resp.status().as_u16(), 200, "/metrics needs no credentials");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
        prom::parse(&resp.text().await.unwrap_or_default())
    }
}

fn structured(id: &str, data: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"/observability","type":"test.metrics","data":{data}}}"#
    )
}

#[tokio::test]
async fn metrics_count_exactly_what_was_sent() {
    let broker = Broker::start().await;
    let (orders, audit) = (topic("metrics-orders"), topic("metrics-audit"));
    broker.create_topic(&orders, 1).await;
    broker.create_topic(&audit, 2).await;
    let max_body = MAX_BODY.to_string();
    // Pings every second, so a subscriber that left is noticed quickly.
    let args = ["--max-body-bytes", &max_body, "--ping-interval-s", "1"];
    let sidecar = Sidecar::start_secured(&broker.bootstrap(), &args).await;
    sidecar.wait_ready().await;
    let c = Client {
        http: reqwest::Client::new(),
        sidecar,
    };

    // A subscriber first, so the orders topic has a live hub (consumer lag) and frames.
    let mut sse = SseClient::connect(&c.sidecar.url(&subscribe_path(&orders, &[])), None).await;

    // Accepted: three single events, a batch of two, and a repeat of the first (202, counted
    // as an accepted request but not as a new event).
    let data = ["alpha", "bravo-2", "charlie-33"];
    for (i, d) in data.iter().enumerate() {
        assert_eq!(c.binary(&orders, &format!("o-{i}"), d).await, 202);
    }
    let batch = format!(
        "[{},{}]",
        structured("a-0", r#"{"n":1}"#),
        structured("a-1", r#"{"n":22}"#)
    );
    let batch_ct = [("content-type", "application/cloudevents-batch+json")];
    assert_eq!(c.post(&audit, &batch_ct, &batch, true).await, 202);
    assert_eq!(c.binary(&orders, "o-0", data[0]).await, 202);

    // Refused, before parsing and after.
    let structured_ct = [("content-type", "application/cloudevents+json")];
    let no_source = r#"{"specversion":"1.0","id":"x","type":"t"}"#;
    assert_eq!(c.post(&orders, &structured_ct, no_source, true).await, 400);
    assert_eq!(
        c.post(&orders, &structured_ct, "{not json", true).await,
        400
    );
    let plain = [("content-type", "text/plain")];
    assert_eq!(c.post(&orders, &plain, "hello", true).await, 415);
    let big = structured("big", &format!("\"{}\"", "x".repeat(MAX_BODY)));
    assert_eq!(c.post(&orders, &structured_ct, &big, true).await, 413);
    assert_eq!(
        c.post(&orders, &structured_ct, &structured("u", "1"), false)
            .await,
        401
    );
    assert_eq!(c.post(&orders, &plain, "hello", false).await, 401);
    assert_eq!(c.binary("no-such-topic-metrics", "n-0", "x").await, 404);

    let frames = sse.take(data.len(), WAIT).await;
    assert_eq!(
        frames.len(),
        data.len(),
        "the subscriber got every orders event"
    );

    // The durable path drains (direct publishes are acknowledged before the 202 unless
    // spooled; a spooled one is forwarded shortly) and the hub reports its lag.
    let lag_of = |s: &Samples| {
        s.get(
            "eventwire_push_consumer_lag",
            &[("topic", orders.as_str()), ("partition", "0")],
        )
    };
    wait_until(
        "an empty durable path and the hub's consumer lag",
        WAIT,
        || async {
            let s = c.scrape().await;
            s.get("eventwire_events_in_flight", &[]) == Some(0.0) && lag_of(&s).is_some()
        },
    )
    .await;
    let s = c.scrape().await;

    let requests = "eventwire_ingest_requests_total";
    let outcomes = [
        ("accepted", 5.0),
        ("invalid-cloudevent", 1.0),
        ("invalid-json", 1.0),
        ("not-a-cloudevent", 1.0),
        ("body-too-large", 1.0),
        ("unauthorized", 2.0),
        ("unknown-topic", 1.0),
    ];
    for (outcome, n) in outcomes {
        assert_eq!(
            s.get(requests, &[("outcome", outcome)]),
            Some(n),
            "{outcome}"
        );
    }
    assert_eq!(s.type_of(requests), Some("counter"));
    assert_eq!(s.sum(requests), 12.0, "no other outcome was counted");

    let events = "eventwire_ingest_events_total";
    assert_eq!(s.get(events, &[("topic", orders.as_str())]), Some(3.0));
    assert_eq!(s.get(events, &[("topic", audit.as_str())]), Some(2.0));
    assert_eq!(s.series(events).count(), 2, "a refused topic has no series");
    let bytes = "eventwire_ingest_bytes_total";
    let data_bytes: usize = data.iter().map(|d| d.len()).sum();
    assert_eq!(
        s.get(bytes, &[("topic", orders.as_str())]),
        Some(data_bytes as f64)
    );
    let batch_bytes = r#"{"n":1}"#.len() + r#"{"n":22}"#.len();
    assert_eq!(
        s.get(bytes, &[("topic", audit.as_str())]),
        Some(batch_bytes as f64)
    );

    let produced = "eventwire_produce_duration_seconds";
    assert_eq!(s.type_of(produced), Some("histogram"));
    let count = s.get(&format!("{produced}_count"), &[]);
    assert_eq!(
        count,
        Some(5.0),
        "one acknowledgement per event made durable"
    );
    let inf = s.get(&format!("{produced}_bucket"), &[("le", "+Inf")]);
    assert_eq!(inf, count);
    assert!(
        s.get(&format!("{produced}_sum"), &[])
            .is_some_and(|v| v > 0.0)
    );
    assert_eq!(s.get("eventwire_produce_errors_total", &[]), Some(0.0));

    assert_eq!(s.get("eventwire_events_in_flight", &[]), Some(0.0));
    assert_eq!(s.get("eventwire_spool_records", &[]), Some(0.0));
    assert_eq!(s.get("eventwire_spool_bytes", &[]), Some(0.0));
    assert_eq!(s.get("eventwire_broker_up", &[]), Some(1.0));
    assert_eq!(s.get("eventwire_idempotency_entries", &[]), Some(5.0));
    let states = "eventwire_forwarder_state";
    assert_eq!(s.series(states).count(), 4);
    assert_eq!(s.sum(states), 1.0, "one-hot");
    assert_eq!(s.get(states, &[("state", "idle")]), Some(1.0));

    let sse_labels = [("topic", orders.as_str()), ("transport", "sse")];
    assert_eq!(s.get("eventwire_subscribers", &sse_labels), Some(1.0));
    let frames_sent = "eventwire_push_frames_sent_total";
    assert_eq!(s.get(frames_sent, &[("topic", orders.as_str())]), Some(3.0));
    let slow = "eventwire_push_slow_clients_closed_total";
    assert_eq!(s.get(slow, &[("topic", orders.as_str())]), Some(0.0));
    assert_eq!(s.get("eventwire_push_replays_running", &[]), Some(0.0));
    assert_eq!(lag_of(&s), Some(0.0), "the hub has read everything");

    // The subscriber leaves: its gauge goes back to 0.
    drop(sse);
    wait_until("the subscriber gauge to drop", WAIT, || async {
        c.scrape().await.get("eventwire_subscribers", &sse_labels) == Some(0.0)
    })
    .await;
}

const ORDERS: &str = "order-placed-events";
const PAYMENTS: &str = "payment-requested-events";
const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// `POST path` through Envoy: status, the answer's `traceparent`, the body as JSON.
async fn post_through(
    s: &Stack,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Option<String>, Value) {
    let (status, answer_headers, bytes) = s.post(path, headers, body.as_bytes()).await;
    let trace = answer_headers.into_iter().find(|(n, _)| n == "traceparent");
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, trace.map(|(_, v)| v), json)
}

/// A valid W3C traceparent: version 00, lower-case hex ids that are not all zero.
fn is_traceparent(t: &str) -> bool {
    let parts: Vec<&str> = t.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

#[tokio::test]
async fn one_trace_from_the_request_through_kafka_to_the_subscriber() {
    let s = Stack::start(&EnvoyConfig::shipped(), &[(ORDERS, 1), (PAYMENTS, 1)], &[]).await;
    let mut ws = WsClient::connect(&format!(
        "ws://127.0.0.1:{}{}",
        s.envoy.port,
        subscribe_path(ORDERS, &[])
    ))
    .await;
    let json = ("content-type", "application/json");

    // The client's trace: the event joins it, and the 202 says so.
    let headers = [
        json,
        ("traceparent", INCOMING),
        ("tracestate", "rojo=00f067aa0ba902b7"),
    ];
    let (status, echoed, ack) = post_through(&s, "/orders", &headers, r#"{"id":"ord-t1"}"#).await;
    assert_eq!(status, 202, "{ack}");
    assert_eq!(echoed.as_deref(), Some(INCOMING));
    // None: the filter starts one, valid and echoed.
    let (status, started, ack2) = post_through(&s, "/orders", &[json], r#"{"id":"ord-t2"}"#).await;
    assert_eq!(status, 202, "{ack2}");
    let started = started.unwrap_or_default();
    assert!(is_traceparent(&started), "{started:?}");
    assert_ne!(started, INCOMING);

    let records = s.broker.records(ORDERS, 2, WAIT);
    assert_eq!(records.len(), 2);
    let record = |id: &Value| {
        records
            .iter()
            .find(|r| Some(r.header("ce_id")) == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no record for {id}"))
    };
    let (r1, r2) = (record(&ack["id"]), record(&ack2["id"]));
    assert_eq!(r1.header("ce_traceparent"), Some(INCOMING));
    assert_eq!(r1.header("ce_tracestate"), Some("rojo=00f067aa0ba902b7"));
    assert_eq!(r2.header("ce_traceparent"), Some(started.as_str()));
    assert_eq!(r2.header("ce_tracestate"), None);

    let frames = ws.take(2, WAIT).await;
    assert_eq!(frames.len(), 2);
    let frame = |id: &Value| {
        frames
            .iter()
            .find(|f| f["event"]["id"] == *id)
            .unwrap_or_else(|| panic!("no frame for {id}"))
    };
    assert_eq!(frame(&ack["id"])["event"]["traceparent"], INCOMING);
    assert_eq!(
        frame(&ack["id"])["event"]["tracestate"],
        "rojo=00f067aa0ba902b7"
    );
    assert_eq!(frame(&ack2["id"])["event"]["traceparent"], started.as_str());

    // A tap's event joins the request's trace too; the upstream still gets the request.
    let pay = [json, ("traceparent", INCOMING)];
    let (status, _, _) = post_through(&s, "/payments", &pay, r#"{"order_id":"ord-t1"}"#).await;
    assert_eq!(status, 200);
    let pays = s.broker.records(PAYMENTS, 1, WAIT);
    assert_eq!(
        pays.first().and_then(|r| r.header("ce_traceparent")),
        Some(INCOMING)
    );

    // A client's batch: an event with its own trace keeps it, one without joins the request's.
    let own = "00-11111111111111111111111111111111-2222222222222222-01";
    let batch = format!(
        r#"[{{"specversion":"1.0","id":"b-own","source":"/c","type":"t","traceparent":"{own}","data":{{"id":"ord-b1"}}}},
            {{"specversion":"1.0","id":"b-none","source":"/c","type":"t","data":{{"id":"ord-b2"}}}}]"#
    );
    let headers = [
        ("content-type", "application/cloudevents-batch+json"),
        ("traceparent", INCOMING),
    ];
    let (status, echoed, answer) = post_through(&s, "/orders", &headers, &batch).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        echoed.as_deref(),
        Some(INCOMING),
        "a batch's 202: the request's"
    );
    let records = s.broker.records(ORDERS, 4, WAIT);
    let trace_of = |id: &str| {
        let r = records.iter().find(|r| r.header("ce_id") == Some(id));
        r.and_then(|r| r.header("ce_traceparent"))
    };
    assert_eq!(trace_of("b-own"), Some(own));
    assert_eq!(trace_of("b-none"), Some(INCOMING));
    ws.close().await;
}

/// Exactly what happened, counted per rule in Envoy's Prometheus page and by outcome in the
/// sidecar's `/metrics`: N orders accepted, each kind of refusal M times, then the sidecar gone.
#[tokio::test]
async fn envoy_and_sidecar_metrics_count_exactly_what_happened() {
    let mut s = Stack::start(&EnvoyConfig::shipped(), &[(ORDERS, 1), (PAYMENTS, 1)], &[]).await;
    let json = ("content-type", "application/json");
    const N: usize = 5;
    const M: usize = 2;
    let mut published = 0;
    for i in 0..N {
        let body = format!(r#"{{"id":"ord-m{i}"}}"#);
        published += body.len();
        assert_eq!(post_through(&s, "/orders", &[json], &body).await.0, 202);
    }
    for _ in 0..M {
        // The filter's own 400 (not JSON) and 413 (over max_body_bytes by Content-Length).
        assert_eq!(
            post_through(&s, "/orders", &[json], "{not json").await.0,
            400
        );
        let big = "x".repeat(2 * 1024 * 1024);
        assert_eq!(
            post_through(&s, "/orders", &[("content-type", "text/plain")], &big)
                .await
                .0,
            413
        );
        // The sidecar's 400: a CloudEvent the filter passes on and the sidecar refuses.
        let bad = r#"{"specversion":"1.0","id":"e","source":"/s","type":"t","time":"lunchtime","data":{"id":"ord-bad"},"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#;
        published += bad.len();
        let ce = ("content-type", "application/cloudevents+json");
        let r = post_through(&s, "/orders", &[ce], bad).await;
        assert_eq!(r.0, 400, "{}", r.2);
    }
    let scrape = reqwest_text(&s.sidecar.url("/metrics")).await;
    let sidecar = prom::parse(&scrape);
    let outcome = |o: &str| sidecar.get("eventwire_ingest_requests_total", &[("outcome", o)]);
    assert_eq!(outcome("accepted"), Some(N as f64));
    assert_eq!(outcome("invalid-cloudevent"), Some(M as f64));
    let events = sidecar.get("eventwire_ingest_events_total", &[("topic", ORDERS)]);
    assert_eq!(events, Some(N as f64));

    // The sidecar gone: the bridge answers 503, the tap passes on without its event.
    s.sidecar.proc.stop();
    assert_eq!(
        post_through(&s, "/orders", &[json], r#"{"id":"ord-x"}"#)
            .await
            .0,
        503
    );
    assert_eq!(
        post_through(&s, "/payments", &[json], r#"{"order_id":"ord-x"}"#)
            .await
            .0,
        200
    );

    // Envoy merges histograms into its stats on its flush interval (5 s by default).
    let round_trips = N + M + 1;
    let admin = &s.envoy;
    wait_until("Envoy's histogram merge", WAIT, || async {
        let page = prom::parse(&admin.admin_text("/stats/prometheus").await);
        let count = page.get("eventwire_callout_duration_ms_count", &[("rule", "orders")]);
        count == Some(round_trips as f64)
    })
    .await;
    let envoy = prom::parse(&s.envoy.admin_text("/stats/prometheus").await);
    let rule = |metric: &str, rule: &str| envoy.get(metric, &[("rule", rule)]);
    let orders = |metric: &str| rule(metric, "orders");
    assert_eq!(
        envoy.get("eventwire_requests_total", &[]),
        Some((N + 3 * M + 2) as f64)
    );
    assert_eq!(orders("eventwire_events_accepted_total"), Some(N as f64));
    assert_eq!(
        orders("eventwire_requests_rejected_total"),
        Some((2 * M) as f64)
    );
    assert_eq!(orders("eventwire_sidecar_refused_total"), Some(M as f64));
    assert_eq!(orders("eventwire_sidecar_unavailable_total"), Some(1.0));
    assert_eq!(orders("eventwire_passthrough_total"), Some(0.0));
    assert_eq!(
        orders("eventwire_published_bytes_total"),
        Some((published + 14) as f64)
    );
    let le = [("rule", "orders"), ("le", "+Inf")];
    assert_eq!(
        envoy.get("eventwire_callout_duration_ms_bucket", &le),
        Some(round_trips as f64)
    );
    assert_eq!(rule("eventwire_passthrough_total", "payments"), Some(1.0));
    assert_eq!(
        rule("eventwire_sidecar_unavailable_total", "payments"),
        Some(1.0)
    );
    assert_eq!(
        rule("eventwire_events_accepted_total", "payments"),
        Some(0.0)
    );
}

async fn reqwest_text(url: &str) -> String {
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => panic!("GET {url}: {e}"),
    }
}
