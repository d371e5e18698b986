//! `GET /metrics` of a real sidecar against a real broker (issue 16): after a known mix of
//! accepted events, duplicates and refusals sent straight to the sidecar, and one SSE
//! subscriber, every counter holds exactly what was sent, the durable path is empty again
//! and the push side reports its subscriber, frames and consumer lag. The scrape is parsed
//! as exposition format (`harness::prom`), never searched as text.

use eventwire_e2e::prom::{self, Samples};
use eventwire_e2e::push::{SseClient, subscribe_path};
use eventwire_e2e::*;
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
    assert!(s.get("eventwire_produce_errors_total", &[]).is_some());

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
