//! Observability through real Envoy, the sidecar and Tansu: one trace from the HTTP request
//! through Kafka to a WebSocket subscriber, and the filter's counts in Envoy's Prometheus page.

use eventwire_e2e::push::*;
use eventwire_e2e::*;
use serde_json::Value;
use std::time::Duration;

const ORDERS: &str = "order-placed-events";
const PAYMENTS: &str = "payment-requested-events";
const WAIT: Duration = Duration::from_secs(15);
const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// `POST path` through Envoy: status, the answer's `traceparent`, the body as JSON.
async fn post(
    s: &Stack,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Option<String>, Value) {
    let mut req = s.http.post(s.envoy.url(path)).body(body.to_owned());
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = resp.status().as_u16();
    let trace = resp
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        trace,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
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
    let (status, echoed, ack) = post(&s, "/orders", &headers, r#"{"id":"ord-t1"}"#).await;
    assert_eq!(status, 202, "{ack}");
    assert_eq!(echoed.as_deref(), Some(INCOMING));
    // None: the filter starts one, valid and echoed.
    let (status, started, ack2) = post(&s, "/orders", &[json], r#"{"id":"ord-t2"}"#).await;
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
    let (status, _, _) = post(&s, "/payments", &pay, r#"{"order_id":"ord-t1"}"#).await;
    assert_eq!(status, 200);
    let pays = s.broker.records(PAYMENTS, 1, WAIT);
    assert_eq!(
        pays.first().and_then(|r| r.header("ce_traceparent")),
        Some(INCOMING)
    );
    ws.close().await;
}
