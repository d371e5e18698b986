//! Bridge and tap through real Envoy + the built filter + the sidecar + Tansu.

use eventwire_e2e::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const ORDERS: &str = "order-placed-events";
const PAYMENTS: &str = "payment-requested-events";
const WAIT: Duration = Duration::from_secs(10);

async fn stack(cfg: EnvoyConfig, topics: &[(&str, i32)]) -> Stack {
    Stack::start(&cfg, topics, &[]).await
}

/// Posts a new order to `/orders` until its answer's status is `done` (the sidecar reads
/// its secret file again within a second); that answer.
async fn orders_until(
    s: &Stack,
    what: &str,
    done: impl Fn(u16) -> bool,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let last = std::sync::Mutex::new(None);
    let mut n = 0;
    wait_until(what, WAIT, || {
        n += 1;
        let body = format!(r#"{{"id":"ord-until-{n}"}}"#).into_bytes();
        let (last, done) = (&last, &done);
        async move {
            let resp = s
                .post("/orders", &[("content-type", "application/json")], &body)
                .await;
            let finished = done(resp.0);
            *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(resp);
            finished
        }
    })
    .await;
    last.into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_else(|| panic!("no answer from /orders"))
}

fn is_rfc3339_utc(t: &str) -> bool {
    let b = t.as_bytes();
    t.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && t.ends_with('Z')
}

#[tokio::test]
async fn reference_scenario_bridge_tap_and_untouched_routes() {
    let s = stack(EnvoyConfig::shipped(), &[(ORDERS, 3), (PAYMENTS, 1)]).await;
    let order =
        br#"{"id":"ord-1001","customer":"c-42","items":[{"sku":"A1","qty":2}],"total":99.5}"#;
    let resp = s
        .post(
            "/orders",
            &[
                ("content-type", "application/json"),
                ("x-tenant-id", "acme"),
            ],
            order,
        )
        .await;
    assert_eq!(resp.0, 202, "{}", String::from_utf8_lossy(&resp.2));
    assert_eq!(header(&resp.1, "content-type"), Some("application/json"));
    let ack = json_of(&resp.2);
    let id = ack["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {ack}"))
        .to_string();
    assert_eq!(id.len(), 36, "uuid expected: {id}");
    assert_eq!(ack["topic"], ORDERS);

    let recs = s.broker.records(ORDERS, 1, WAIT);
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.key_str(), Some("ord-1001"));
    assert_eq!(r.header("ce_specversion"), Some("1.0"));
    assert_eq!(r.header("ce_id"), Some(id.as_str()));
    assert_eq!(r.header("ce_type"), Some("com.example.order.placed"));
    assert_eq!(r.header("ce_source"), Some("/shop/orders"));
    assert_eq!(r.header("ce_tenant"), Some("acme"));
    assert!(
        r.header("ce_time").is_some_and(is_rfc3339_utc),
        "{:?}",
        r.header("ce_time")
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.value.as_deref(), Some(&order[..]));
    assert_eq!(ack["partition"], r.partition);
    assert_eq!(ack["offset"], r.offset);
    assert!(
        s.upstream.received().is_empty(),
        "bridge must not call the upstream"
    );

    // Tap: the upstream answers, byte-exact body, and the event is published too.
    let pay = br#"{"order_id":"ord-1001","amount":99.5}"#;
    let resp = s
        .post("/payments", &[("content-type", "application/json")], pay)
        .await;
    assert_eq!(resp.0, 200);
    assert_eq!(json_of(&resp.2)["upstream"], "demo");
    let got = s.upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].method.as_str(), got[0].path.as_str()),
        ("POST", "/payments")
    );
    assert_eq!(got[0].body, pay);
    let pays = s.broker.records(PAYMENTS, 1, WAIT);
    assert_eq!(pays.len(), 1);
    assert_eq!(pays[0].key_str(), Some("ord-1001"));
    assert_eq!(
        pays[0].header("ce_type"),
        Some("com.example.payment.requested")
    );
    assert_eq!(pays[0].value.as_deref(), Some(&pay[..]));

    // Untouched routes: upstream only, no event anywhere.
    let get = s.http.get(s.envoy.url("/products?page=2")).send().await;
    assert_eq!(get.map(|r| r.status().as_u16()).ok(), Some(200));
    let other = s
        .post(
            "/orders/ord-1001/notes",
            &[("content-type", "application/json")],
            b"{}",
        )
        .await;
    assert_eq!(other.0, 200);
    assert_eq!(s.upstream.received().len(), 3);
    assert_eq!(s.broker.all_records(ORDERS).len(), 1);
    assert_eq!(s.broker.all_records(PAYMENTS).len(), 1);
    assert_eq!(s.envoy.counter("eventwire_events_accepted_total").await, 2);
    assert_eq!(s.envoy.counter("eventwire_passthrough_total").await, 0);
    // Enabled per route: the two untouched requests never reached the filter.
    assert_eq!(s.envoy.counter("eventwire_requests_total").await, 2);
}

/// Orders that arrive together while the route's callouts are in flight wait and go to the
/// sidecar as one batch; each client still gets its own event's 202, and each record is the
/// one a lone event makes.
#[tokio::test]
async fn concurrent_orders_share_callouts_and_each_gets_its_own_event() {
    use futures_util::StreamExt as _;
    let s = stack(EnvoyConfig::shipped(), &[(ORDERS, 3), (PAYMENTS, 1)]).await;
    const N: usize = 240;
    let s = &s;
    type Answer = (u16, Vec<(String, String)>, Vec<u8>);
    let answers: Vec<(String, Answer)> = futures_util::stream::iter(0..N)
        .map(|i| async move {
            let order = format!(r#"{{"id":"ord-{i}","total":{i}.5}}"#);
            let headers = [
                ("content-type", "application/json"),
                ("x-tenant-id", "acme"),
            ];
            (
                order.clone(),
                s.post("/orders", &headers, order.as_bytes()).await,
            )
        })
        .buffer_unordered(N)
        .collect()
        .await;
    let mut by_id = std::collections::HashMap::new();
    for (order, (status, headers, body)) in &answers {
        assert_eq!(*status, 202, "{order}: {}", String::from_utf8_lossy(body));
        assert_eq!(header(headers, "content-type"), Some("application/json"));
        let ack = json_of(body);
        let id = ack["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{ack}"))
            .to_string();
        assert_eq!(ack["topic"], ORDERS);
        assert_eq!(ack["status"], "published", "{ack}");
        assert_eq!(
            header(headers, "location").map(str::to_string),
            Some(format!("/v1/events/{id}"))
        );
        assert!(
            by_id.insert(id, (order.clone(), ack)).is_none(),
            "one event per client"
        );
    }
    let recs = s.broker.records(ORDERS, N, WAIT);
    assert_eq!(recs.len(), N);
    for r in &recs {
        let id = r
            .header("ce_id")
            .unwrap_or_else(|| panic!("no ce_id: {r:?}"));
        let (order, ack) = by_id
            .get(id)
            .unwrap_or_else(|| panic!("record {id} answered to no one"));
        assert_eq!(
            r.value.as_deref(),
            Some(order.as_bytes()),
            "the data byte for byte"
        );
        let order_id = json_of(order.as_bytes())["id"].as_str().map(str::to_string);
        assert_eq!(r.key_str().map(str::to_string), order_id, "keyed by /id");
        assert_eq!(
            (ack["partition"].as_i64(), ack["offset"].as_i64()),
            (Some(r.partition.into()), Some(r.offset))
        );
        assert_eq!(r.header("ce_source"), Some("/shop/orders"));
        assert_eq!(r.header("ce_type"), Some("com.example.order.placed"));
        assert_eq!(r.header("ce_tenant"), Some("acme"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.header("ce_time").is_some_and(is_rfc3339_utc));
    }
    assert_eq!(
        s.envoy.counter("eventwire_events_accepted_total").await,
        N as u64
    );
    let batches = s.envoy.counter("eventwire_batches_total").await;
    let batched = s.envoy.counter("eventwire_batched_events_total").await;
    // At most 4 (`max_in_flight`) went alone before the first wait; most shared a callout.
    assert!(
        batched >= N as u64 / 2 && batched <= N as u64,
        "{batched} of {N} batched"
    );
    assert!(
        (1..batched / 2).contains(&batches),
        "{batched} events in {batches} batches: they should have shared callouts"
    );
    eprintln!("{N} concurrent events: {batched} in {batches} batches, the others alone");

    // Tap: requests that waited for a batch are resumed from the root context and reach
    // the upstream whole.
    const TAPS: usize = 60;
    let taps: Vec<(String, u16)> = futures_util::stream::iter(0..TAPS)
        .map(|i| async move {
            let pay = format!(r#"{{"order_id":"ord-{i}","amount":{i}}}"#);
            let headers = [("content-type", "application/json")];
            let (status, _, _) = s.post("/payments", &headers, pay.as_bytes()).await;
            (pay, status)
        })
        .buffer_unordered(TAPS)
        .collect()
        .await;
    assert!(taps.iter().all(|(_, status)| *status == 200), "{taps:?}");
    let mut got: Vec<Vec<u8>> = s.upstream.received().into_iter().map(|r| r.body).collect();
    let mut sent: Vec<Vec<u8>> = taps.into_iter().map(|(p, _)| p.into_bytes()).collect();
    got.sort();
    sent.sort();
    assert_eq!(
        got, sent,
        "every tapped request reached the upstream byte for byte"
    );
    assert_eq!(s.broker.records(PAYMENTS, TAPS, WAIT).len(), TAPS);
    let batched_taps = s.envoy.counter("eventwire_batched_events_total").await - batched;
    assert!(
        batched_taps >= TAPS as u64 / 2,
        "{batched_taps} of {TAPS} taps batched"
    );
    eprintln!("{TAPS} concurrent taps: {batched_taps} batched");
}

/// The sidecar takes events only with its secret; the filter sends it from Envoy's
/// environment. A second secret in the file is accepted at once (rotation), and a removed
/// one is refused within a second, without a restart.
#[tokio::test]
async fn ingest_needs_the_secret_and_rotates_without_a_restart() {
    let s = stack(EnvoyConfig::shipped(), &[(ORDERS, 1)]).await;
    let order = |id: &str| format!(r#"{{"id":"{id}"}}"#).into_bytes();
    let json = [("content-type", "application/json")];
    let resp = s.post("/orders", &json, &order("ord-1")).await;
    assert_eq!(resp.0, 202, "{}", String::from_utf8_lossy(&resp.2));

    let direct = |auth: Option<String>, id: &str| {
        let mut req = s
            .http
            .post(s.sidecar.url("/v1/events"))
            .header("eventwire-topic", ORDERS)
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-source", "/direct")
            .header("ce-type", "t")
            .body(format!(r#"{{"id":"{id}"}}"#));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        async move {
            let r = req.send().await.unwrap_or_else(|e| panic!("POST: {e}"));
            let status = r.status().as_u16();
            let challenge = r.headers().get("www-authenticate").cloned();
            let body = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            (status, challenge, body)
        }
    };
    for (auth, id) in [
        (None, "none"),
        (Some("Bearer not-the-secret-at-all".to_string()), "wrong"),
        (Some(INGEST_SECRET.to_string()), "no-scheme"),
    ] {
        let (status, challenge, body) = direct(auth, id).await;
        assert_eq!(status, 401, "{id}: {}", String::from_utf8_lossy(&body));
        assert_eq!(
            challenge.as_ref().and_then(|v| v.to_str().ok()),
            Some(r#"Bearer realm="eventwire-ingest""#)
        );
        assert_eq!(json_of(&body)["type"], "urn:eventwire:problem:unauthorized");
    }
    assert_eq!(direct(Some(bearer()), "right").await.0, 202);

    // Rotation: the new secret next to the old one, then the old one removed.
    let new = "eventwire-rotated-secret-0002";
    std::fs::write(s.sidecar.secret_file(), format!("{new}\n{INGEST_SECRET}\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut n = 0;
    wait_until("the sidecar to take the new secret", WAIT, || {
        n += 1;
        let id = format!("new-{n}");
        let call = direct(Some(format!("Bearer {new}")), &id);
        async move { call.await.0 == 202 }
    })
    .await;
    let resp = s.post("/orders", &json, &order("ord-2")).await;
    assert_eq!(resp.0, 202, "the proxies' old secret still works meanwhile");
    std::fs::write(s.sidecar.secret_file(), format!("{new}\n")).unwrap_or_else(|e| panic!("{e}"));
    let last = orders_until(&s, "the sidecar to drop the old secret", |status| {
        status != 202
    })
    .await;
    // The client did nothing wrong: the proxy's credentials are stale, a 503 like any
    // sidecar it cannot use.
    assert_problem(&last, 503, "sidecar-unavailable");
    let p = json_of(&last.2);
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("sidecar.secret")),
        "{p}"
    );
    let records = s.broker.records_settled(ORDERS, 1, Duration::from_secs(3));
    let ids: Vec<&str> = records.iter().filter_map(|r| r.header("ce_id")).collect();
    for refused in ["none", "wrong", "no-scheme"] {
        assert!(
            !ids.contains(&refused),
            "a refused event reached Kafka: {ids:?}"
        );
    }
    assert!(ids.contains(&"right"), "{ids:?}");
}

/// A secret limited to some topics: a rule publishing elsewhere gets the sidecar's 403,
/// relayed by the filter; the allowed topic works; nothing reaches the forbidden one.
#[tokio::test]
async fn a_secret_limited_to_topics_refuses_the_others() {
    let s = stack(EnvoyConfig::shipped(), &[(ORDERS, 1), (PAYMENTS, 1)]).await;
    std::fs::write(
        s.sidecar.secret_file(),
        format!("# the proxies may publish payments only\n{INGEST_SECRET} payment-*\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let json = [("content-type", "application/json")];
    let last = orders_until(&s, "the sidecar to read the topic list", |status| {
        status == 403
    })
    .await;
    let p = assert_problem(&last, 403, "forbidden-topic");
    assert_eq!(p["attribute"], "eventwire-topic");
    let pay = br#"{"order_id":"ord-1","amount":5}"#;
    let resp = s.post("/payments", &json, pay).await;
    assert_eq!(resp.0, 200, "{}", String::from_utf8_lossy(&resp.2));
    assert_eq!(s.broker.records(PAYMENTS, 1, WAIT).len(), 1);
    // Orders accepted before the file was read again are the only ones in the topic.
    let accepted_before = s.envoy.counter("eventwire_events_accepted_total").await - 1;
    let orders = s.broker.records_settled(ORDERS, 0, Duration::from_secs(2));
    assert_eq!(
        orders.len() as u64,
        accepted_before,
        "no refused order in Kafka"
    );
}

/// The other enablement style (filter on every route, rules by route name) publishes the same,
/// but every request pays for a filter context; the shipped per-route style creates none for
/// untouched routes (the counter above stays at the enabled routes' 2).
#[tokio::test]
async fn filter_on_every_route_picks_routes_by_name() {
    let s = stack(
        EnvoyConfig::shipped().on_every_route(),
        &[(ORDERS, 1), (PAYMENTS, 1)],
    )
    .await;
    let json = ("content-type", "application/json");
    assert_eq!(s.post("/orders", &[json], br#"{"id":"o-1"}"#).await.0, 202);
    assert_eq!(
        s.post("/payments", &[json], br#"{"order_id":"o-1"}"#)
            .await
            .0,
        200
    );
    for path in ["/products", "/orders/o-1/notes"] {
        assert_eq!(s.post(path, &[json], b"{}").await.0, 200, "{path}");
    }
    assert_eq!(s.broker.records_settled(ORDERS, 1, WAIT).len(), 1);
    assert_eq!(s.broker.records_settled(PAYMENTS, 1, WAIT).len(), 1);
    assert_eq!(s.upstream.received().len(), 3);
    assert_eq!(s.envoy.counter("eventwire_requests_total").await, 4);
    assert_eq!(s.envoy.counter("eventwire_events_accepted_total").await, 2);
}

#[tokio::test]
async fn idempotency_key_and_incoming_cloudevents() {
    let s = stack(EnvoyConfig::shipped(), &[(ORDERS, 1)]).await;
    let json_ct = ("content-type", "application/json");

    let resp = s
        .post(
            "/orders",
            &[json_ct, ("idempotency-key", "order-7-attempt")],
            br#"{"id":"ord-7"}"#,
        )
        .await;
    assert_eq!(resp.0, 202);
    assert_eq!(json_of(&resp.2)["id"], "order-7-attempt");

    // Binary mode: the event keeps its own attributes; the rule's key still applies to data.
    let bin = [
        json_ct,
        ("ce-specversion", "1.0"),
        ("ce-id", "evt-bin-1"),
        ("ce-source", "/pos/terminal-3"),
        ("ce-type", "com.example.pos.sale"),
        ("ce-subject", "store%2042"),
        ("ce-channel", "pos"),
    ];
    let resp = s.post("/orders", &bin, br#"{"id":"ord-8"}"#).await;
    assert_eq!(resp.0, 202, "{}", String::from_utf8_lossy(&resp.2));
    assert_eq!(json_of(&resp.2)["id"], "evt-bin-1");

    // Structured mode: data is carried byte-exact as the record value.
    let structured = br#"{"specversion":"1.0","id":"evt-str-1","source":"/web","type":"com.example.web.order","time":"2018-04-05T17:31:00Z","data":{"id":"ord-9", "note":"caf\u00e9"}}"#;
    let resp = s
        .post(
            "/orders",
            &[("content-type", "application/cloudevents+json")],
            structured,
        )
        .await;
    assert_eq!(resp.0, 202, "{}", String::from_utf8_lossy(&resp.2));
    assert_eq!(json_of(&resp.2)["id"], "evt-str-1");

    // A batch: one callout, one answer with each event's result, the records in batch order,
    // each keyed by its own data (the filter sets `partitionkey`) unless it has a key.
    let batch = br#"[{"specversion":"1.0","id":"evt-b-1","source":"/web","type":"t","data":{"id":"ord-10"}},
        {"specversion":"1.0","id":"evt-b-2","source":"/web","type":"t","partitionkey":"own-key","data":{"id":"ord-11"}},
        {"specversion":"1.0","id":"evt-b-3","source":"/web","type":"t","data":{"id":"ord-12"}}]"#;
    let batch_ct = [("content-type", "application/cloudevents-batch+json")];
    let resp = s.post("/orders", &batch_ct, batch).await;
    assert_eq!(resp.0, 202, "{}", String::from_utf8_lossy(&resp.2));
    let answer = json_of(&resp.2);
    let ids: Vec<&str> = answer["events"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["evt-b-1", "evt-b-2", "evt-b-3"]);
    assert_eq!(answer["events"][2]["status"], "published");
    // Sent again: the first answers, no second records.
    let again = s.post("/orders", &batch_ct, batch).await;
    assert_eq!(json_of(&again.2), answer);

    // Read on after the sixth, so that a seventh (a wrapped-again event, a repeat) would show.
    let recs = s.broker.records_settled(ORDERS, 6, WAIT);
    assert_eq!(recs.len(), 6);
    let batched: Vec<(Option<&str>, Option<&str>)> = recs[3..]
        .iter()
        .map(|r| (r.header("ce_id"), r.key_str()))
        .collect();
    assert_eq!(
        batched,
        [
            (Some("evt-b-1"), Some("ord-10")),
            (Some("evt-b-2"), Some("own-key")),
            (Some("evt-b-3"), Some("ord-12"))
        ]
    );
    assert_eq!(recs[0].header("ce_id"), Some("order-7-attempt"));
    assert_eq!(recs[0].key_str(), Some("ord-7"));
    let b = &recs[1];
    assert_eq!(b.header("ce_id"), Some("evt-bin-1"));
    assert_eq!(b.header("ce_type"), Some("com.example.pos.sale"));
    assert_eq!(b.header("ce_source"), Some("/pos/terminal-3"));
    assert_eq!(b.header("ce_subject"), Some("store 42"));
    assert_eq!(b.header("ce_channel"), Some("pos"));
    assert_eq!(b.key_str(), Some("ord-8"));
    let st = &recs[2];
    assert_eq!(st.header("ce_id"), Some("evt-str-1"));
    assert_eq!(st.header("ce_type"), Some("com.example.web.order"));
    assert_eq!(st.header("ce_time"), Some("2018-04-05T17:31:00Z"));
    assert_eq!(st.header("content-type"), Some("application/json"));
    assert_eq!(st.key_str(), Some("ord-9"));
    assert_eq!(
        st.value.as_deref(),
        Some(&br#"{"id":"ord-9", "note":"caf\u00e9"}"#[..])
    );
}

/// The CloudEvents conformance suite's valid events, sent structured through Envoy.
#[tokio::test]
async fn conformance_events_pass_through_envoy() {
    let cfg = EnvoyConfig::shipped().on_every_route().with_filter_config(
        r#"{"sidecar":{"secret":{"env":"EVENTWIRE_INGEST_SECRET"}},
            "rules":[{"name":"ingest","match":{"method":"POST","path":"/events"},
            "topic":"ingest-events","type":"com.example.unused"}]}"#,
    );
    let s = stack(cfg, &[("ingest-events", 1)]).await;
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/cloudevents/conformance/format-json/valid-events.json");
    let text = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let suite = json_of(text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&text));
    let tests = suite["tests"].as_array().cloned().unwrap_or_default();
    // The pinned fixture's size (tests/fixtures/cloudevents/README.md): a file that lost
    // events must fail here, not pass with fewer.
    assert_eq!(tests.len(), 10, "valid events in {}", file.display());
    // source + id identify an event: the suite reuses some pairs, which must become one
    // record each, with the first answer repeated.
    let mut first_answer: Vec<((String, String), Value)> = Vec::new();
    for t in &tests {
        let body = t["event"].to_string();
        let resp = s
            .post(
                "/events",
                &[("content-type", "application/cloudevents+json")],
                body.as_bytes(),
            )
            .await;
        assert_eq!(
            resp.0,
            202,
            "{}: {}",
            t["id"],
            String::from_utf8_lossy(&resp.2)
        );
        let answer = json_of(&resp.2);
        let key = (
            t["event"]["source"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            t["event"]["id"].as_str().unwrap_or_default().to_string(),
        );
        match first_answer.iter().find(|(k, _)| *k == key) {
            Some((_, first)) => assert_eq!(&answer, first, "{}: not the first answer", t["id"]),
            None => first_answer.push((key, answer)),
        }
    }
    // The suite repeats some source + id pairs: 10 events are 6 distinct ones.
    assert_eq!(first_answer.len(), 6, "distinct source + id pairs");
    let recs = s.broker.all_records("ingest-events");
    assert_eq!(recs.len(), first_answer.len());
    for (((_, id), _), r) in first_answer.iter().zip(&recs) {
        assert_eq!(r.header("ce_id"), Some(id.as_str()));
    }
}

#[tokio::test]
async fn sidecar_down_gives_503_and_tap_passes_through() {
    let mut s = stack(EnvoyConfig::shipped(), &[(ORDERS, 1), (PAYMENTS, 1)]).await;
    assert_eq!(
        s.sidecar.proc.stop(),
        Some(0),
        "sidecar should exit cleanly on SIGTERM"
    );

    let resp = s
        .post(
            "/orders",
            &[("content-type", "application/json")],
            br#"{"id":"ord-1"}"#,
        )
        .await;
    let p = assert_problem(&resp, 503, "sidecar-unavailable");
    assert_eq!(header(&resp.1, "retry-after"), Some("1"));
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("could not be reached")),
        "{p}"
    );

    // Tap defaults to passthrough: the API keeps working without the event.
    let resp = s
        .post(
            "/payments",
            &[("content-type", "application/json")],
            br#"{"order_id":"o"}"#,
        )
        .await;
    assert_eq!(resp.0, 200);
    let got = s.upstream.received();
    assert_eq!(got.len(), 1, "only the tap request reaches the upstream");
    assert_eq!(got[0].path, "/payments");
    assert!(s.broker.all_records(ORDERS).is_empty());
    assert!(s.broker.all_records(PAYMENTS).is_empty());
    // The tap request that went on without its event is counted.
    assert_eq!(
        s.envoy.counter("eventwire_sidecar_unavailable_total").await,
        2
    );
    assert_eq!(s.envoy.counter("eventwire_passthrough_total").await, 1);
    assert_eq!(s.envoy.counter("eventwire_events_accepted_total").await, 0);
}

#[tokio::test]
async fn bad_requests_get_precise_answers() {
    let cfg = EnvoyConfig::shipped().on_every_route().with_filter_config(
        r#"{"sidecar":{"upstream":"eventwire_sidecar","timeout_ms":3000,
                      "secret":{"env":"EVENTWIRE_INGEST_SECRET"}},
            "max_body_bytes": 65536,
            "rules":[
              {"name":"orders","match":{"route_name":"orders-placed"},"topic":"order-placed-events",
               "type":"com.example.order.placed","key":{"json_pointer":"/id"}},
              {"name":"payments","match":{"route_name":"payments-tap"},"mode":"tap",
               "topic":"payment-requested-events","type":"com.example.payment.requested",
               "key":{"json_pointer":"/order_id"}},
              {"name":"nowhere","match":{"method":"POST","path":"/ghost/{id}"},
               "topic":"no-such-topic","type":"com.example.ghost","key":{"path_param":"id"}}
            ]}"#,
    );
    let s = stack(cfg, &[(ORDERS, 1), (PAYMENTS, 1)]).await;
    let json_ct = ("content-type", "application/json");

    let big = vec![b'x'; 100_000];
    assert_problem(
        &s.post("/orders", &[json_ct], &big).await,
        413,
        "body-too-large",
    );
    // Without content-length (chunked), the limit holds while buffering.
    let chunk = format!("{:x}\r\n{}\r\n", 40_000, " ".repeat(40_000));
    let raw = format!(
        "POST /orders HTTP/1.1\r\nhost: shop\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let answer = raw_http(s.envoy.port, raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("urn:eventwire:problem:body-too-large"),
        "{answer}"
    );

    let p = assert_problem(
        &s.post("/orders", &[json_ct], b"{\"id\": ").await,
        400,
        "invalid-json",
    );
    assert!(
        p["detail"].as_str().is_some_and(|d| d.contains("EOF")),
        "{p}"
    );
    let p = assert_problem(
        &s.post("/orders", &[json_ct], br#"{"no_id":1}"#).await,
        400,
        "unresolved-value",
    );
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("JSON pointer /id")),
        "{p}"
    );
    let text = [("content-type", "text/plain")];
    let p = assert_problem(
        &s.post("/orders", &text, b"id=1").await,
        400,
        "unresolved-value",
    );
    assert!(
        p["detail"].as_str().is_some_and(|d| d.contains("not JSON")),
        "{p}"
    );

    // The sidecar's own refusals are relayed as they are.
    let p = assert_problem(
        &s.post("/ghost/g-1", &[json_ct], b"{}").await,
        404,
        "unknown-topic",
    );
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no-such-topic")),
        "{p}"
    );
    let bad_time = br#"{"specversion":"1.0","id":"e","source":"/s","type":"t","time":"lunchtime","data":{"id":"o"}}"#;
    let p = assert_problem(
        &s.post(
            "/orders",
            &[("content-type", "application/cloudevents+json")],
            bad_time,
        )
        .await,
        400,
        "invalid-cloudevent",
    );
    assert_eq!(p["attribute"], "time", "{p}");

    // Tap with a body that cannot become an event: the upstream still gets it.
    let resp = s.post("/payments", &[json_ct], b"{broken").await;
    assert_eq!(resp.0, 200);
    assert_eq!(s.upstream.received().len(), 1);
    assert_eq!(s.upstream.received()[0].body, b"{broken");

    assert!(s.broker.all_records(ORDERS).is_empty());
    assert!(s.broker.all_records(PAYMENTS).is_empty());
    // Who answered what: the filter itself the two 413s, the bad JSON, the two unresolved
    // keys and the tap's broken body (which then went upstream without an event); the
    // sidecar the unknown topic and the bad time, relayed.
    for (counter, want) in [
        ("eventwire_requests_rejected_total", 6),
        ("eventwire_sidecar_refused_total", 2),
        ("eventwire_passthrough_total", 1),
        ("eventwire_sidecar_unavailable_total", 0),
        ("eventwire_events_accepted_total", 0),
    ] {
        assert_eq!(s.envoy.counter(counter).await, want, "{counter}");
    }
}

/// Sends raw bytes and returns the whole answer (the request must say `connection: close`).
async fn raw_http(port: u16, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    // The proxy may answer and close before the whole body is written; that is fine.
    let _ = conn.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn invalid_filter_configs_are_refused_naming_the_field() {
    for (json, field) in [
        (
            r#"{"rules":[{"topic":"bad topic","type":"x"}]}"#,
            "rules[0].topic",
        ),
        (
            r#"{"rules":[{"topic":"t","type":"x","key":{"header":"authorization"}}]}"#,
            "rules[0].key.header",
        ),
        (r#"{"sidecar":{"timeout_ms":0}}"#, "sidecar.timeout_ms"),
    ] {
        let (ok, out) = Envoy::validate(&EnvoyConfig::shipped().with_filter_config(json));
        assert!(!ok, "envoy accepted {json}");
        assert!(
            out.contains(&format!("configuration refused: {field}")),
            "no log line naming {field}:\n{out}"
        );
    }
    let (ok, out) = Envoy::validate(&EnvoyConfig::shipped());
    assert!(ok, "the shipped envoy.yaml must validate:\n{out}");
}
