//! The demo payment service for `make run`: the sidecar delivers each order-placed
//! CloudEvent to `POST /payments` (HTTP binary mode, or structured); the service "charges"
//! the order and answers 200 with a CloudEvent of its own, `com.example.payment.processed`
//! or `com.example.payment.failed`, which the sidecar publishes as the delivery's reply.
//!
//! - About 10% of orders are declined, chosen by a hash of the order id (the event id when
//!   the order has none), so a redelivered order gets the same answer.
//! - Idempotent on `ce-id`: a repeated id gets the very same reply (same reply id), and a
//!   line saying so; delivery is at least once, so duplicates do happen.
//! - A request that is not a usable order event gets `400` with `application/problem+json`,
//!   which the sidecar dead-letters without retrying.
//!
//! One line per payment on stdout. Usage: `demo-payment [ADDR]` (default 127.0.0.1:8082).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use eventwire_contract::header_value;
use serde_json::{Map, Number, Value, json};

const DEFAULT_ADDR: &str = "127.0.0.1:8082";
const ORDER_PLACED: &str = "com.example.order.placed";
const PAYMENT_PROCESSED: &str = "com.example.payment.processed";
const PAYMENT_FAILED: &str = "com.example.payment.failed";
const REPLY_SOURCE: &str = "/demo/payment-service";
const STRUCTURED: &str = "application/cloudevents+json";
/// Declines per hundred orders.
const DECLINE_PERCENT: u64 = 10;
/// Answers remembered for duplicates; the oldest is forgotten beyond this.
const MAX_REMEMBERED: usize = 100_000;

/// The order an incoming event carries, as far as a payment needs it.
#[derive(Debug, Clone, PartialEq)]
struct Order {
    /// The event's `id`: what duplicates are recognised by.
    event_id: String,
    /// The body's `id`, else the event's `subject`; none if neither is there.
    order_id: Option<String>,
    /// The body's `total`, kept as the number it was written as.
    amount: Number,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Processed,
    Declined,
}

/// The answer to one order: a binary-mode CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    headers: Vec<(&'static str, String)>,
    body: String,
    /// For the log line.
    id: String,
    outcome: &'static str,
}

/// Why a request is not a usable order: the `detail` of the 400.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rejection(String);

fn reject<T>(detail: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection(detail.into()))
}

/// The part of a header value before any `;` parameter, lowercased.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn is_json(content_type: &str) -> bool {
    let e = essence(content_type);
    e == "application/json" || e == "text/json" || e.ends_with("+json")
}

/// A header's value by case-insensitive name.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Parses a delivered request (binary or structured mode) into the order it carries.
fn parse(headers: &[(String, String)], body: &[u8]) -> Result<Order, Rejection> {
    let content_type = header(headers, "content-type");
    let structured = content_type.is_some_and(|ct| essence(ct) == STRUCTURED);
    let (attrs, data) = if structured {
        let (attrs, data) = structured_event(body)?;
        (attrs, Some(data))
    } else {
        (binary_attributes(headers)?, None)
    };
    let attr = |name: &str| attrs.get(name).and_then(Value::as_str);
    match attr("specversion") {
        Some("1.0") => {}
        Some(other) => return reject(format!("specversion {other:?} is not 1.0")),
        None => return reject("not a CloudEvent: specversion is missing"),
    }
    let required = |name: &str| match attr(name) {
        Some(v) if !v.is_empty() => Ok(v.to_owned()),
        _ => reject(format!("not a CloudEvent: {name} is missing or empty")),
    };
    let event_id = required("id")?;
    required("source")?;
    let event_type = required("type")?;
    if event_type != ORDER_PLACED {
        return reject(format!("event type {event_type:?} is not {ORDER_PLACED:?}"));
    }
    let data = match data {
        Some(data) => data,
        None => binary_data(content_type, body)?,
    };
    let Value::Object(order) = data else {
        return reject("the event's data is not a JSON object (an order)");
    };
    let order_id = match order.get("id") {
        Some(Value::String(id)) if !id.is_empty() => Some(id.clone()),
        Some(Value::String(_)) | None => attr("subject").map(str::to_owned),
        Some(_) => return reject("the order's id is not a string"),
    };
    let amount = match order.get("total") {
        Some(Value::Number(n)) if n.as_f64().is_some_and(|t| t.is_finite() && t >= 0.0) => {
            n.clone()
        }
        Some(_) => return reject("the order's total is not a number >= 0"),
        None => return reject("the order has no total"),
    };
    Ok(Order {
        event_id,
        order_id,
        amount,
    })
}

/// Binary mode: attributes in `ce-*` headers (percent-encoded); the data is the body.
fn binary_attributes(headers: &[(String, String)]) -> Result<Map<String, Value>, Rejection> {
    let mut attrs = Map::new();
    for name in ["specversion", "id", "source", "type", "subject"] {
        if let Some(raw) = header(headers, &format!("ce-{name}")) {
            let value =
                header_value::decode(raw).or_else(|e| reject(format!("header ce-{name}: {e}")))?;
            attrs.insert(name.to_owned(), Value::String(value));
        }
    }
    Ok(attrs)
}

fn binary_data(content_type: Option<&str>, body: &[u8]) -> Result<Value, Rejection> {
    if let Some(ct) = content_type.filter(|ct| !is_json(ct)) {
        return reject(format!("content-type {ct:?} is not JSON"));
    }
    serde_json::from_slice(body).or_else(|e| reject(format!("the body is not JSON: {e}")))
}

/// Structured mode: the whole event is the JSON body, data in `data`.
fn structured_event(body: &[u8]) -> Result<(Map<String, Value>, Value), Rejection> {
    let Ok(Value::Object(mut event)) = serde_json::from_slice::<Value>(body) else {
        return reject("a structured CloudEvent must be a JSON object");
    };
    let data = match event.remove("data") {
        Some(data) => data,
        None if event.contains_key("data_base64") => {
            return reject("data_base64 is not an order (JSON data expected)");
        }
        None => Value::Null,
    };
    Ok((event, data))
}

/// FNV-1a, then a 64-bit finalizer so similar ids spread: stable across builds and runs,
/// unlike std's `DefaultHasher`.
fn stable_hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in text.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The payment's fate: the same order always gets the same one.
fn decide(order: &Order) -> Outcome {
    let key = order.order_id.as_deref().unwrap_or(&order.event_id);
    if stable_hash(key) % 100 < DECLINE_PERCENT {
        Outcome::Declined
    } else {
        Outcome::Processed
    }
}

/// The reply event; everything in it follows from the order, so it is the same on redelivery.
fn build_reply(order: &Order, outcome: Outcome) -> Reply {
    let id = format!("pay-{}", order.event_id);
    let (event_type, status) = match outcome {
        Outcome::Processed => (PAYMENT_PROCESSED, "processed"),
        Outcome::Declined => (PAYMENT_FAILED, "failed"),
    };
    let mut body = json!({
        "order_id": order.order_id,
        "amount": order.amount,
        "status": status,
    });
    if outcome == Outcome::Declined {
        body["reason"] = json!("card declined");
    }
    let encode = |v: &str| header_value::encode(v.as_bytes()).into_owned();
    let mut headers = vec![
        ("ce-specversion", "1.0".to_owned()),
        ("ce-id", encode(&id)),
        ("ce-source", REPLY_SOURCE.to_owned()),
        ("ce-type", event_type.to_owned()),
    ];
    if let Some(order_id) = &order.order_id {
        headers.push(("ce-subject", encode(order_id)));
    }
    headers.push(("content-type", "application/json".to_owned()));
    Reply {
        headers,
        body: body.to_string(),
        id,
        outcome: status,
    }
}

/// Answers already given, by event id, with the order they were given in (to forget the
/// oldest first).
#[derive(Default)]
struct Answers {
    by_id: HashMap<String, Reply>,
    order: VecDeque<String>,
}

impl Answers {
    /// The answer for `order`, and whether it had been given before.
    fn answer(&mut self, order: &Order) -> (Reply, bool) {
        if let Some(reply) = self.by_id.get(&order.event_id) {
            return (reply.clone(), true);
        }
        let reply = build_reply(order, decide(order));
        if self.order.len() >= MAX_REMEMBERED
            && let Some(oldest) = self.order.pop_front()
        {
            self.by_id.remove(&oldest);
        }
        self.order.push_back(order.event_id.clone());
        self.by_id.insert(order.event_id.clone(), reply.clone());
        (reply, false)
    }
}

type Shared = Arc<Mutex<Answers>>;

async fn payments(State(answers): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let headers: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_owned())))
        .collect();
    let order = match parse(&headers, &body) {
        Ok(order) => order,
        Err(Rejection(detail)) => {
            println!("demo-payment: rejected a request (400): {detail}");
            return problem(&detail);
        }
    };
    let (reply, duplicate) = answers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .answer(&order);
    if duplicate {
        println!(
            "demo-payment: duplicate delivery of {}, same answer",
            order.event_id
        );
    } else {
        println!(
            "demo-payment: order {} amount {} -> {} (event {}, reply {})",
            order.order_id.as_deref().unwrap_or("(no id)"),
            order.amount,
            reply.outcome,
            order.event_id,
            reply.id
        );
    }
    let mut response = reply.body.into_response();
    for (name, value) in reply.headers {
        // Encoded values are printable ASCII, so this never skips one.
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    response
}

fn problem(detail: &str) -> Response {
    let body = json!({
        "type": "urn:demo-payment:problem:unusable-order",
        "title": "Not a usable order-placed event",
        "status": 400,
        "detail": detail,
    });
    (
        StatusCode::BAD_REQUEST,
        [("content-type", "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_ADDR.to_string());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-payment: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let app = Router::new()
        .route("/payments", post(payments))
        .with_state(Shared::default());
    println!("demo-payment: listening on {addr} (POST /payments)");
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("demo-payment: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut h: Vec<(String, String)> = [
            ("ce-specversion", "1.0"),
            ("ce-id", "e-1"),
            ("ce-source", "/shop/orders"),
            ("ce-type", ORDER_PLACED),
            ("content-type", "application/json"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        for (n, v) in extra {
            h.retain(|(name, _)| name != n);
            if !v.is_empty() {
                h.push((n.to_string(), v.to_string()));
            }
        }
        h
    }

    const ORDER: &[u8] = br#"{"id":"ord-1001","customer":"c-42","total":99.5}"#;

    fn order(order_id: Option<&str>, event_id: &str) -> Order {
        Order {
            event_id: event_id.to_owned(),
            order_id: order_id.map(str::to_owned),
            amount: Number::from(10),
        }
    }

    fn reply_header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
        reply
            .headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn binary_order_is_parsed() {
        let o = parse(&binary(&[]), ORDER).unwrap();
        assert_eq!(o.event_id, "e-1");
        assert_eq!(o.order_id.as_deref(), Some("ord-1001"));
        assert_eq!(o.amount.to_string(), "99.5");
    }

    #[test]
    fn header_names_are_case_insensitive_and_values_percent_decoded() {
        let mut h = binary(&[("ce-id", ""), ("content-type", "")]);
        h.push(("CE-ID".into(), "e%201".into()));
        h.push((
            "Content-Type".into(),
            "application/json; charset=utf-8".into(),
        ));
        assert_eq!(parse(&h, ORDER).unwrap().event_id, "e 1");
    }

    #[test]
    fn structured_order_is_parsed() {
        let body = json!({"specversion":"1.0","id":"e-2","source":"/s","type":ORDER_PLACED,
                          "data":{"id":"ord-7","total":5}});
        let h = vec![(
            "content-type".to_string(),
            "application/cloudevents+json".to_string(),
        )];
        let o = parse(&h, body.to_string().as_bytes()).unwrap();
        assert_eq!(
            (o.event_id.as_str(), o.order_id.as_deref()),
            ("e-2", Some("ord-7"))
        );
    }

    #[test]
    fn order_without_id_falls_back_to_subject_then_none() {
        let body = br#"{"total":1}"#;
        let o = parse(&binary(&[("ce-subject", "ord-9")]), body).unwrap();
        assert_eq!(o.order_id.as_deref(), Some("ord-9"));
        assert_eq!(parse(&binary(&[]), body).unwrap().order_id, None);
    }

    #[test]
    fn unusable_requests_are_rejected_with_a_reason() {
        type Case = (Vec<(String, String)>, &'static [u8], &'static str);
        let cases: Vec<Case> = vec![
            (binary(&[("ce-specversion", "")]), ORDER, "specversion is missing"),
            (binary(&[("ce-specversion", "0.3")]), ORDER, "not 1.0"),
            (binary(&[("ce-id", "")]), ORDER, "id is missing"),
            (binary(&[("ce-source", "")]), ORDER, "source is missing"),
            (binary(&[("ce-type", "com.example.other")]), ORDER, "is not"),
            (binary(&[("ce-id", "bad%zz")]), ORDER, "header ce-id"),
            (binary(&[("content-type", "text/plain")]), ORDER, "not JSON"),
            (binary(&[]), b"not json", "body is not JSON"),
            (binary(&[]), b"[1,2]", "not a JSON object"),
            (binary(&[]), br#"{"id":"o"}"#, "no total"),
            (binary(&[]), br#"{"id":"o","total":"9"}"#, "total is not a number"),
            (binary(&[]), br#"{"id":"o","total":-1}"#, "total is not a number"),
            (binary(&[]), br#"{"id":7,"total":1}"#, "id is not a string"),
            (binary(&[("content-type", STRUCTURED)]), b"[]", "JSON object"),
            (
                binary(&[("content-type", STRUCTURED)]),
                br#"{"specversion":"1.0","id":"x","source":"/s","type":"com.example.order.placed","data_base64":"e30="}"#,
                "data_base64",
            ),
            (Vec::new(), b"", "specversion is missing"),
        ];
        for (headers, body, want) in cases {
            match parse(&headers, body) {
                Err(Rejection(detail)) => assert!(detail.contains(want), "{detail:?} vs {want:?}"),
                Ok(o) => panic!("accepted {o:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn decision_is_deterministic_and_declines_about_one_in_ten() {
        let a = order(Some("ord-1001"), "e-1");
        let redelivered = order(Some("ord-1001"), "e-other");
        assert_eq!(decide(&a), decide(&redelivered));
        let declined = (0..10_000)
            .filter(|i| decide(&order(Some(&format!("ord-{i}")), "e")) == Outcome::Declined)
            .count();
        assert!(
            (800..1200).contains(&declined),
            "{declined} of 10000 declined"
        );
    }

    #[test]
    fn decision_uses_the_event_id_without_an_order_id() {
        let outcomes: Vec<Outcome> = (0..200)
            .map(|i| decide(&order(None, &format!("e-{i}"))))
            .collect();
        assert!(outcomes.contains(&Outcome::Declined) && outcomes.contains(&Outcome::Processed));
        assert_eq!(decide(&order(None, "e-5")), outcomes[5]);
    }

    #[test]
    fn processed_reply_is_a_binary_cloudevent() {
        let o = parse(&binary(&[]), ORDER).unwrap();
        let r = build_reply(&o, Outcome::Processed);
        assert_eq!(reply_header(&r, "ce-specversion"), Some("1.0"));
        assert_eq!(reply_header(&r, "ce-id"), Some("pay-e-1"));
        assert_eq!(reply_header(&r, "ce-source"), Some(REPLY_SOURCE));
        assert_eq!(reply_header(&r, "ce-type"), Some(PAYMENT_PROCESSED));
        assert_eq!(reply_header(&r, "ce-subject"), Some("ord-1001"));
        assert_eq!(reply_header(&r, "content-type"), Some("application/json"));
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            body,
            json!({"order_id":"ord-1001","amount":99.5,"status":"processed"})
        );
    }

    #[test]
    fn failed_reply_says_why_and_encodes_its_headers() {
        let o = order(Some("ord 1"), "e\"1");
        let r = build_reply(&o, Outcome::Declined);
        assert_eq!(reply_header(&r, "ce-type"), Some(PAYMENT_FAILED));
        assert_eq!(reply_header(&r, "ce-id"), Some("pay-e%221"));
        assert_eq!(reply_header(&r, "ce-subject"), Some("ord%201"));
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["status"], "failed");
        assert_eq!(body["reason"], "card declined");
        let none = build_reply(&order(None, "e"), Outcome::Processed);
        assert_eq!(reply_header(&none, "ce-subject"), None);
        assert_eq!(
            serde_json::from_str::<Value>(&none.body).unwrap()["order_id"],
            Value::Null
        );
    }

    #[test]
    fn a_repeated_event_id_gets_the_same_answer() {
        let mut answers = Answers::default();
        let (first, dup) = answers.answer(&order(Some("ord-1"), "e-1"));
        assert!(!dup);
        // Even if the redelivered event's content differed, the first answer stands.
        let (again, dup) = answers.answer(&order(Some("ord-2"), "e-1"));
        assert!(dup);
        assert_eq!(first, again);
    }

    #[test]
    fn answers_forget_the_oldest_beyond_the_limit() {
        let mut answers = Answers::default();
        for i in 0..=MAX_REMEMBERED {
            answers.answer(&order(None, &format!("e-{i}")));
        }
        assert_eq!(answers.by_id.len(), MAX_REMEMBERED);
        assert!(!answers.by_id.contains_key("e-0"));
        assert!(answers.answer(&order(None, "e-1")).1);
    }
}
