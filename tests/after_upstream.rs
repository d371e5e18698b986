//! `mode: "after_upstream"` (commit, then publish) through real Envoy + the built filter +
//! the sidecar + Tansu: the request goes to the upstream first; only an answer whose status
//! is in `publish_on` becomes an event (data = the request body, key and extension attributes
//! from the answer), and the client gets the upstream's answer unchanged once the sidecar
//! acknowledged it. The upstream is the harness's, scripted per path (`Upstream::answer`).
//!
//! The filter is on every route here and the rules pick their requests by method and path, so
//! any path can be scripted.

use eventwire_e2e::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);
const ORDER_CREATED: &str = r#"{"id":"ord-77","status":"created"}"#;

/// Envoy running the filter on every route with `rules` (the sidecar as shipped).
fn config(rules: Value) -> EnvoyConfig {
    let filter = json!({
        "sidecar": {
            "upstream": "eventwire_sidecar",
            "timeout_ms": 5000,
            "secret": {"env": SECRET_ENV}
        },
        "rules": rules
    });
    let text = serde_json::to_string_pretty(&filter).unwrap_or_else(|e| panic!("{e}"));
    EnvoyConfig::shipped()
        .on_every_route()
        .with_filter_config(&text)
}

/// The rule of the spec: `POST /orders` publishes `com.example.order.created` to `topic`,
/// keyed by the answer's `/id`, with the answer's status, `Location` and `/status` as
/// extension attributes. `extra` is merged in (`publish_on`, `on_failure`, ...).
fn created_rule(name: &str, path: &str, topic: &str, extra: Value) -> Value {
    let mut rule = json!({
        "name": name,
        "match": {"method": "POST", "path": path},
        "mode": "after_upstream",
        "topic": topic,
        "type": "com.example.order.created",
        "source": "/shop/orders",
        "response": {
            "key": {"json_pointer": "/id"},
            "status": "httpstatus",
            "headers": {"location": "location"},
            "body": {"/status": "orderstatus"}
        }
    });
    if let (Some(rule), Some(extra)) = (rule.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            rule.insert(k.clone(), v.clone());
        }
    }
    rule
}

/// The upstream's answer to a created order: 201, its `Location`, a JSON body.
fn created(location: &str, body: &str) -> Reply {
    Reply::new(201)
        .header("content-type", "application/json")
        .header("location", location)
        .header("x-shop-request", "r-1")
        .body(body)
}

/// Asserts the client got the scripted `reply` as the upstream sent it: status, every header
/// it set, the body byte for byte (and a `content-length` saying so).
fn assert_relayed(resp: &Answer, reply: &Reply) {
    let (status, hdrs, body) = resp;
    assert_eq!(
        *status,
        reply.status,
        "body: {}",
        String::from_utf8_lossy(&body[..body.len().min(2000)])
    );
    for (n, v) in &reply.headers {
        assert_eq!(header(hdrs, n), Some(v.as_str()), "header {n}: {hdrs:?}");
    }
    assert!(
        *body == reply.body,
        "the body is not the upstream's byte for byte: {} bytes, the upstream sent {}",
        body.len(),
        reply.body.len()
    );
    let length = reply.body.len().to_string();
    assert_eq!(header(hdrs, "content-length"), Some(length.as_str()));
}

/// A counter of one rule as Envoy's `/stats/prometheus` shows it (`metric{rule="..."}`).
/// The filter defines every counter of every rule at configure time: absent is a failure.
async fn rule_counter(s: &Stack, metric: &str, rule: &str) -> f64 {
    let page = prom::parse(&s.envoy.admin_text("/stats/prometheus").await);
    page.get(metric, &[("rule", rule)])
        .unwrap_or_else(|| panic!("no {metric}{{rule=\"{rule}\"}} in Envoy's /stats/prometheus"))
}

/// Events the sidecar has made durable for `topic` (its `/metrics`).
async fn sidecar_events(s: &Stack, topic: &str) -> f64 {
    s.sidecar
        .metrics()
        .await
        .get("eventwire_ingest_events_total", &[("topic", topic)])
        .unwrap_or(0.0)
}

/// Deterministic bytes of every value (no compression or text handling could keep them by
/// accident).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn upstream_201_publishes_with_the_response_key_and_location_and_the_client_gets_it_byte_exact()
 {
    let t = topic("order-created");
    // A rule `key` too (the request has a /customer): the answer's key wins over it.
    let rule = created_rule(
        "created",
        "/orders",
        &t,
        json!({
            "publish_on": [201],
            "on_failure": "reject",
            "key": {"json_pointer": "/customer"},
            "extensions": {"x-tenant-id": "tenant"}
        }),
    );
    let s = Stack::start(&config(json!([rule])), &[(&t, 1)], &[]).await;
    let reply = created("/orders/ord-77", ORDER_CREATED);
    s.upstream.answer("/orders", reply.clone());

    // Odd spacing, a line break and non-ASCII: the data must be these bytes, not a re-encoding.
    let order = "{ \"customer\" : \"c-42\",\n  \"items\": [{\"sku\":\"A1\",\"qty\":2}],\n  \"note\": \"caf\u{e9} \u{2603}\" }\n";
    let resp = s
        .post(
            "/orders",
            &[
                ("content-type", "application/json"),
                ("x-tenant-id", "acme"),
            ],
            order.as_bytes(),
        )
        .await;
    assert_relayed(&resp, &reply);
    // The answer came after the sidecar's acknowledgement: the event is already durable.
    assert_eq!(
        sidecar_events(&s, &t).await,
        1.0,
        "the client got the 201 before the sidecar had the event"
    );

    // The upstream got the exact request, once.
    let got = s.upstream.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].method.as_str(), got[0].path.as_str()),
        ("POST", "/orders")
    );
    assert_eq!(
        got[0].body,
        order.as_bytes(),
        "the request body byte for byte"
    );
    assert_eq!(
        header(&got[0].headers, "content-type"),
        Some("application/json")
    );
    assert_eq!(header(&got[0].headers, "x-tenant-id"), Some("acme"));

    let recs = s.broker.records_settled(&t, 1, WAIT);
    assert_eq!(recs.len(), 1, "one event, no more: {recs:?}");
    let r = &recs[0];
    assert_eq!(r.key_str(), Some("ord-77"), "keyed by the answer's /id");
    assert_eq!(
        r.value.as_deref(),
        Some(order.as_bytes()),
        "data = the request body"
    );
    assert_eq!(r.header("ce_specversion"), Some("1.0"));
    assert_eq!(r.header("ce_type"), Some("com.example.order.created"));
    assert_eq!(r.header("ce_source"), Some("/shop/orders"));
    assert!(
        r.header("ce_id").is_some_and(|id| !id.is_empty()),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("ce_httpstatus"), Some("201"));
    assert_eq!(r.header("ce_location"), Some("/orders/ord-77"));
    assert_eq!(r.header("ce_orderstatus"), Some("created"));
    assert_eq!(r.header("ce_tenant"), Some("acme"));
    assert_eq!(r.header("content-type"), Some("application/json"));

    assert_eq!(
        rule_counter(&s, "eventwire_events_accepted_total", "created").await,
        1.0
    );
    assert_eq!(
        rule_counter(&s, "eventwire_upstream_skipped_total", "created").await,
        0.0
    );
    assert_eq!(
        rule_counter(&s, "eventwire_passthrough_total", "created").await,
        0.0
    );
}

#[tokio::test]
async fn upstream_409_publishes_nothing_and_the_client_gets_the_409() {
    let t = topic("order-created");
    // publish_on left out: the default, any 2xx.
    let rule = created_rule("created", "/orders", &t, json!({}));
    let s = Stack::start(&config(json!([rule])), &[(&t, 1)], &[]).await;
    // A problem answer without /id: a skipped answer is not looked into.
    let conflict = Reply::new(409)
        .header("content-type", "application/problem+json")
        .header("x-shop-request", "r-2")
        .body(
            r#"{"type":"https://shop.example/problems/duplicate-order","title":"order exists","status":409,"detail":"order c-42/A1 was already placed"}"#,
        );
    s.upstream.answer("/orders", conflict.clone());
    let json_ct = [("content-type", "application/json")];
    let first = br#"{"customer":"c-42","items":[{"sku":"A1","qty":2}]}"#;
    let resp = s.post("/orders", &json_ct, first).await;
    assert_relayed(&resp, &conflict);
    let got = s.upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, first);
    assert!(
        s.broker.all_records(&t).is_empty(),
        "a 409 must not be published"
    );
    assert_eq!(
        rule_counter(&s, "eventwire_upstream_skipped_total", "created").await,
        1.0
    );
    assert_eq!(
        rule_counter(&s, "eventwire_events_accepted_total", "created").await,
        0.0
    );

    // The same rule with a 2xx publishes: the topic stayed empty because of the 409 alone.
    let reply = created("/orders/ord-77", ORDER_CREATED);
    s.upstream.answer("/orders", reply.clone());
    let second = br#"{"customer":"c-42","items":[{"sku":"B2","qty":1}]}"#;
    let resp = s.post("/orders", &json_ct, second).await;
    assert_relayed(&resp, &reply);
    let recs = s.broker.records_settled(&t, 1, WAIT);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].value.as_deref(), Some(&second[..]));
    assert_eq!(recs[0].key_str(), Some("ord-77"));
    assert_eq!(recs[0].header("ce_httpstatus"), Some("201"));
    assert_eq!(
        rule_counter(&s, "eventwire_upstream_skipped_total", "created").await,
        1.0
    );
    assert_eq!(
        rule_counter(&s, "eventwire_events_accepted_total", "created").await,
        1.0
    );
}

#[tokio::test]
async fn sidecar_down_rejects_with_503_or_passes_the_answer_through_as_configured() {
    let strict_topic = topic("order-created");
    let lenient_topic = topic("invoice-created");
    let rules = json!([
        created_rule(
            "strict",
            "/orders",
            &strict_topic,
            json!({"on_failure": "reject"})
        ),
        created_rule(
            "lenient",
            "/invoices",
            &lenient_topic,
            json!({"on_failure": "passthrough"})
        ),
    ]);
    let mut s = Stack::start(
        &config(rules),
        &[(&strict_topic, 1), (&lenient_topic, 1)],
        &[],
    )
    .await;
    let order_reply = created("/orders/ord-77", ORDER_CREATED);
    let invoice_reply = created("/invoices/inv-5", r#"{"id":"inv-5","status":"created"}"#);
    s.upstream.answer("/orders", order_reply.clone());
    s.upstream.answer("/invoices", invoice_reply.clone());
    assert_eq!(
        s.sidecar.proc.stop(),
        Some(0),
        "sidecar should exit cleanly on SIGTERM"
    );
    let json_ct = [("content-type", "application/json")];

    // reject: the upstream committed the order, but the client learns the event is missing.
    let order = br#"{"customer":"c-42","items":[{"sku":"A1","qty":2}]}"#;
    let resp = s.post("/orders", &json_ct, order).await;
    assert_problem(&resp, 503, "sidecar-unavailable");
    // README, problem table: every 503 sidecar-unavailable says when to try again.
    assert_eq!(header(&resp.1, "retry-after"), Some("1"));
    let got = s.upstream.received();
    assert_eq!(got.len(), 1, "the upstream did receive the order: {got:?}");
    assert_eq!(
        (got[0].path.as_str(), got[0].body.as_slice()),
        ("/orders", &order[..])
    );

    // passthrough: the upstream's 201 as it is, without the event.
    let invoice = br#"{"customer":"c-42","amount":99.5}"#;
    let resp = s.post("/invoices", &json_ct, invoice).await;
    assert_relayed(&resp, &invoice_reply);
    let got = s.upstream.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        (got[1].path.as_str(), got[1].body.as_slice()),
        ("/invoices", &invoice[..])
    );

    for (metric, rule, want) in [
        ("eventwire_passthrough_total", "lenient", 1.0),
        ("eventwire_passthrough_total", "strict", 0.0),
        ("eventwire_sidecar_unavailable_total", "strict", 1.0),
        ("eventwire_sidecar_unavailable_total", "lenient", 1.0),
        ("eventwire_events_accepted_total", "strict", 0.0),
        ("eventwire_events_accepted_total", "lenient", 0.0),
        ("eventwire_upstream_skipped_total", "strict", 0.0),
        ("eventwire_upstream_skipped_total", "lenient", 0.0),
    ] {
        assert_eq!(
            rule_counter(&s, metric, rule).await,
            want,
            "{metric} {rule}"
        );
    }
    assert!(s.broker.all_records(&strict_topic).is_empty());
    assert!(s.broker.all_records(&lenient_topic).is_empty());

    // The sidecar back: the rule publishes again, and only the new order (the refused one
    // was not kept and sent later).
    s.sidecar.restart().await;
    s.sidecar.wait_ready().await;
    let again = br#"{"customer":"c-42","items":[{"sku":"C3","qty":1}]}"#;
    let resp = s.post("/orders", &json_ct, again).await;
    assert_relayed(&resp, &order_reply);
    let recs = s.broker.records_settled(&strict_topic, 1, WAIT);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].value.as_deref(), Some(&again[..]));
    assert_eq!(recs[0].key_str(), Some("ord-77"));
    assert!(s.broker.all_records(&lenient_topic).is_empty());
}

/// An answer whose status is not in `publish_on` is not held by the filter: a body over
/// `response.max_body_bytes` (default 64 KiB) reaches the client whole, and so does one over
/// the listener's buffer limit (2 MiB in envoy.yaml), which Envoy could not have buffered.
#[tokio::test]
async fn a_publish_on_miss_streams_a_large_upstream_body_through_byte_exact() {
    let t = topic("order-created");
    let rule = created_rule("created", "/orders", &t, json!({"publish_on": [201]}));
    let s = Stack::start(&config(json!([rule])), &[(&t, 1)], &[]).await;
    let json_ct = [("content-type", "application/json")];
    let order = br#"{"customer":"c-42","items":[{"sku":"A1","qty":2}]}"#;
    for (n, len) in [(1u64, 200_000), (2, 3 * 1024 * 1024)] {
        // 200 is a 2xx, but this rule publishes on 201 only.
        let reply = Reply::new(200)
            .header("content-type", "application/octet-stream")
            .header("x-shop-request", &format!("r-{n}"))
            .body(noise(len, n));
        s.upstream.answer("/orders", reply.clone());
        let resp = s.post("/orders", &json_ct, order).await;
        assert_relayed(&resp, &reply);
    }
    let got = s.upstream.received();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|r| r.body == order), "{got:?}");
    assert!(s.broker.all_records(&t).is_empty());
    assert_eq!(
        rule_counter(&s, "eventwire_upstream_skipped_total", "created").await,
        2.0
    );
    assert_eq!(
        rule_counter(&s, "eventwire_events_accepted_total", "created").await,
        0.0
    );
}

/// Many answers held at once: while the rule's one callout is in flight the events wait and
/// go to the sidecar in batches, each from its own answer; every client still gets its own
/// answer byte-exact, and only after its event was taken.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_answers_publish_in_batches_each_with_its_own_values() {
    const REQUESTS: usize = 48;
    let t = topic("order-created-batched");
    let filter = json!({
        "sidecar": {
            "upstream": "eventwire_sidecar",
            "timeout_ms": 5000,
            "secret": {"env": SECRET_ENV},
            "batching": {"max_events": 16, "max_in_flight": 1}
        },
        "rules": [{
            "name": "created", "match": {"method": "POST", "path": "/orders"},
            "mode": "after_upstream", "topic": &t, "type": "com.example.order.created",
            "key": {"json_pointer": "/customer"},
            "response": {"status": "httpstatus", "headers": {"location": "location"}}
        }]
    });
    let text = serde_json::to_string_pretty(&filter).unwrap_or_else(|e| panic!("{e}"));
    let cfg = EnvoyConfig::shipped()
        .on_every_route()
        .with_filter_config(&text);
    let s = Stack::start(&cfg, &[(&t, 3)], &[]).await;
    let reply = created("/orders/ord-77", ORDER_CREATED);
    s.upstream.answer("/orders", reply.clone());

    let bodies: Vec<String> = (0..REQUESTS)
        .map(|i| format!(r#"{{"customer":"c-{i}","n":{i}}}"#))
        .collect();
    let answers = futures_util::future::join_all(bodies.iter().map(|body| {
        s.post(
            "/orders",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
    }))
    .await;
    for resp in &answers {
        assert_relayed(resp, &reply);
    }
    assert_eq!(sidecar_events(&s, &t).await, REQUESTS as f64);
    let batches = s.envoy.counter("eventwire_batches_total").await;
    assert!(batches > 0, "no batch: each event went alone");

    let recs = s.broker.records_settled(&t, REQUESTS, WAIT);
    assert_eq!(recs.len(), REQUESTS, "one event per request");
    let mut got: Vec<(String, String)> = recs
        .iter()
        .map(|r| {
            assert_eq!(r.header("ce_httpstatus"), Some("201"), "{:?}", r.headers);
            assert_eq!(r.header("ce_location"), Some("/orders/ord-77"));
            let key = r.key_str().unwrap_or_default().to_owned();
            let data = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default());
            (key, data.into_owned())
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, String)> = (0..REQUESTS)
        .map(|i| (format!("c-{i}"), bodies[i].clone()))
        .collect();
    want.sort();
    assert_eq!(got, want, "each event keyed and carrying its own request");
    println!("{REQUESTS} held answers published in {batches} batches (and single callouts)");
}
