//! The push side through real Envoy, the sidecar and Tansu: `/v1/subscribe` over WebSocket
//! and SSE, filters, replay and resume, slow clients, two sidecars, and the viewer in a
//! real headless browser.

use eventwire_e2e::push::*;
use eventwire_e2e::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

const ORDERS: &str = "order-placed-events";
const WAIT: Duration = Duration::from_secs(15);
/// How long to go on listening after the events a test waited for, to prove that nothing
/// more comes (a stray, a duplicate). The only fixed wait here: it is the check itself, never
/// a wait for something to happen. Long enough for a stray event to show up, short enough to
/// keep the suite quick.
const QUIET: Duration = Duration::from_millis(1500);

async fn stack(topics: &[(&str, i32)], sidecar_args: &[&str]) -> Stack {
    Stack::start(&EnvoyConfig::shipped(), topics, sidecar_args).await
}

/// What this suite does through Envoy.
trait Client {
    fn ws_url(&self, path: &str) -> String;
    async fn order(&self, body: Value) -> Value;
}

impl Client for Stack {
    fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.envoy.port)
    }

    /// `POST /orders` through Envoy (bridged to `order-placed-events`); the 202's JSON.
    async fn order(&self, body: Value) -> Value {
        let resp = self
            .http
            .post(self.envoy.url("/orders"))
            .header("content-type", "application/json")
            .header("x-tenant-id", "acme")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /orders: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, 202, "{text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

/// Asserts what every frame carries: position, key, the CloudEvent and a cursor that names
/// every partition with this record's partition just past it.
fn assert_envelope(frame: &Value, topic: &str, partitions: usize) {
    assert_eq!(frame["topic"], topic, "{frame}");
    assert_eq!(frame["event"]["specversion"], "1.0", "{frame}");
    let cursor = frame["cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("no cursor: {frame}"));
    let positions = parse_cursor(cursor);
    assert_eq!(positions.len(), partitions, "{cursor}");
    let p = frame["partition"].as_i64().unwrap_or(-1) as i32;
    let o = frame["offset"].as_i64().unwrap_or(-1);
    assert_eq!(positions.get(&p), Some(&(o + 1)), "{cursor} after {p}:{o}");
}

fn parse_cursor(cursor: &str) -> BTreeMap<i32, i64> {
    cursor
        .split(',')
        .map(|pair| {
            let (p, o) = pair
                .split_once(':')
                .unwrap_or_else(|| panic!("bad cursor {cursor}"));
            (
                p.parse().unwrap_or_else(|_| panic!("bad cursor {cursor}")),
                o.parse().unwrap_or_else(|_| panic!("bad cursor {cursor}")),
            )
        })
        .collect()
}

fn ids(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["event"]["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn websocket_and_sse_through_envoy_receive_bridged_orders_in_order_per_key() {
    let s = stack(&[(ORDERS, 3)], &[]).await;
    let path = subscribe_path(ORDERS, &[]);
    let mut ws = WsClient::connect(&s.ws_url(&path)).await;
    let mut sse = SseClient::connect(&s.envoy.url(&path), None).await;

    // Three keys, five orders each, interleaved; `seq` gives the order within a key.
    let mut acks = Vec::new();
    for seq in 0..5 {
        for key in ["ord-a", "ord-b", "ord-c"] {
            let ack = s.order(json!({"id": key, "seq": seq})).await;
            acks.push((key, seq, ack));
        }
    }
    let frames = ws.take(acks.len(), WAIT).await;
    let events = sse.take(acks.len(), WAIT).await;
    assert_eq!(frames.len(), 15, "websocket got {}", frames.len());
    assert_eq!(events.len(), 15, "sse got {}", events.len());

    let by_id: BTreeMap<&str, &Value> = frames
        .iter()
        .map(|f| (f["event"]["id"].as_str().unwrap_or_default(), f))
        .collect();
    for (key, seq, ack) in &acks {
        let id = ack["id"].as_str().unwrap_or_default();
        let f = by_id.get(id).unwrap_or_else(|| panic!("no frame for {id}"));
        assert_envelope(f, ORDERS, 3);
        assert_eq!(f["key"], *key);
        assert_eq!(
            (&f["partition"], &f["offset"]),
            (&ack["partition"], &ack["offset"])
        );
        assert_eq!(f["event"]["type"], "com.example.order.placed");
        assert_eq!(f["event"]["tenant"], "acme");
        assert_eq!(f["event"]["data"], json!({"id": key, "seq": seq}));
    }
    for key in ["ord-a", "ord-b", "ord-c"] {
        let seqs: Vec<i64> = frames
            .iter()
            .filter(|f| f["key"] == key)
            .map(|f| f["event"]["data"]["seq"].as_i64().unwrap_or(-1))
            .collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4], "websocket order for {key}");
    }

    // SSE: the same events, in the same order, each `id` the frame's cursor.
    assert!(
        events
            .iter()
            .all(|e| e.event.as_deref() == Some("cloudevent"))
    );
    let sse_frames: Vec<Value> = events.iter().map(SseEvent::json).collect();
    for (e, f) in events.iter().zip(&sse_frames) {
        assert_eq!(e.id.as_deref(), f["cursor"].as_str());
        assert_envelope(f, ORDERS, 3);
    }
    let per_key = |frames: &[Value], key: &str| -> Vec<String> {
        ids(&frames
            .iter()
            .filter(|f| f["key"] == key)
            .cloned()
            .collect::<Vec<_>>())
    };
    for key in ["ord-a", "ord-b", "ord-c"] {
        assert_eq!(
            per_key(&sse_frames, key),
            per_key(&frames, key),
            "sse order for {key}"
        );
    }
    let (ws_more, sse_more) = tokio::join!(ws.drain(QUIET), sse.take(usize::MAX, QUIET));
    assert!(ws_more.is_empty(), "websocket: nothing beyond the 15");
    assert!(sse_more.is_empty(), "sse: nothing beyond the 15");
}

/// Event ids as owned strings, for the `(key, id, type, subject)` tuples `produce_events` takes.
fn numbered(prefix: &str, range: std::ops::Range<usize>, keys: usize) -> Vec<(String, String)> {
    range
        .map(|i| (format!("k{}", i % keys), format!("{prefix}-{i}")))
        .collect()
}

async fn produce_numbered(bootstrap: &str, topic: &str, events: &[(String, String)], pad: usize) {
    let tuples: Vec<(&str, &str, &str, &str)> = events
        .iter()
        .map(|(k, id)| (k.as_str(), id.as_str(), "com.example.test", "s"))
        .collect();
    produce_padded(bootstrap, topic, &tuples, pad).await;
}

fn id_list(events: &[(String, String)]) -> Vec<String> {
    events.iter().map(|(_, id)| id.clone()).collect()
}

/// Like `assert_eq!` on long id lists, reporting lengths and the first difference only.
fn assert_same(got: &[String], want: &[String], what: &str) {
    let first_diff = got.iter().zip(want).position(|(g, w)| g != w);
    assert!(
        got.len() == want.len() && first_diff.is_none(),
        "{what}: got {} ids, want {}; first difference at {first_diff:?}; got ends {:?}",
        got.len(),
        want.len(),
        got.last()
    );
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Offsets per partition must rise by one: nothing skipped, nothing repeated.
fn assert_contiguous(frames: &[Value]) {
    let mut last: BTreeMap<i64, i64> = BTreeMap::new();
    for f in frames {
        let (p, o) = (
            f["partition"].as_i64().unwrap_or(-1),
            f["offset"].as_i64().unwrap_or(-1),
        );
        if let Some(prev) = last.insert(p, o) {
            assert_eq!(o, prev + 1, "partition {p}: {prev} then {o}");
        }
    }
}

#[tokio::test]
async fn filters_select_events_per_dialect_and_malformed_ones_are_refused() {
    let s = stack(&[(ORDERS, 3)], &[]).await;
    let events = [
        ("k1", "e1", "com.example.order.placed", "customer-42"),
        ("k2", "e2", "com.example.order.cancelled", "customer-42"),
        ("k3", "e3", "com.example.payment.requested", "customer-7"),
        ("k1", "e4", "com.example.order.placed", "customer-7"),
        ("k2", "e5", "org.other.thing", "customer-42"),
    ];
    produce_events(&s.broker.bootstrap(), ORDERS, &events).await;
    // e6: bridged by Envoy, so it has the `tenant` extension and no subject.
    let e6 = s.order(json!({"id": "ord-9"})).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "exact",
            json!({"exact": {"subject": "customer-42"}}),
            vec!["e1", "e2", "e5", "e7"],
        ),
        (
            "prefix",
            json!({"prefix": {"type": "com.example.order."}}),
            vec!["e1", "e2", "e4", "e6", "e7"],
        ),
        (
            "suffix",
            json!({"suffix": {"type": ".placed"}}),
            vec!["e1", "e4", "e6", "e7"],
        ),
        (
            "extension",
            json!({"exact": {"tenant": "acme"}}),
            vec!["e6"],
        ),
        (
            "two attributes",
            json!({"exact": {"subject": "customer-7", "type": "com.example.order.placed"}}),
            vec!["e4"],
        ),
        (
            "all",
            json!({"all": [{"prefix": {"type": "com.example.order."}}, {"exact": {"subject": "customer-42"}}]}),
            vec!["e1", "e2", "e7"],
        ),
        (
            "any",
            json!({"any": [{"suffix": {"type": ".requested"}}, {"exact": {"id": "e5"}}]}),
            vec!["e3", "e5"],
        ),
        (
            "not",
            json!({"not": {"prefix": {"type": "com.example."}}}),
            vec!["e5"],
        ),
        (
            "implicit all",
            json!([{"prefix": {"type": "com.example."}}, {"not": {"exact": {"subject": "customer-42"}}}]),
            vec!["e3", "e4", "e6"],
        ),
        (
            "missing attribute",
            json!({"prefix": {"nosuchext": ""}}),
            vec![],
        ),
    ];
    // From `earliest`: e1..e6 come by replay, e7 (sent once all are connected) live.
    let mut clients = Vec::new();
    for (name, filter, _) in &cases {
        let path = subscribe_path(
            ORDERS,
            &[("from", "earliest"), ("filter", &filter.to_string())],
        );
        clients.push((name, WsClient::connect(&s.ws_url(&path)).await));
    }
    produce_events(
        &s.broker.bootstrap(),
        ORDERS,
        &[("k1", "e7", "com.example.order.placed", "customer-42")],
    )
    .await;
    let wants: Vec<Vec<String>> = cases
        .iter()
        .map(|(_, _, want)| {
            want.iter()
                .map(|id| {
                    if *id == "e6" {
                        e6.clone()
                    } else {
                        id.to_string()
                    }
                })
                .collect()
        })
        .collect();
    let results = futures_util::future::join_all(
        clients
            .iter_mut()
            .zip(&wants)
            .map(|((_, c), want)| c.take_settled(want.len(), WAIT, QUIET)),
    )
    .await;
    for (((name, _, _), want), got) in cases.iter().zip(wants).zip(results) {
        assert_eq!(sorted(ids(&got)), sorted(want), "filter {name}");
        got.iter().for_each(|f| assert_envelope(f, ORDERS, 3));
    }

    // Malformed: refused with problem+json before the upgrade, naming the part.
    let bad = subscribe_path(
        ORDERS,
        &[(
            "filter",
            r#"[{"exact":{"type":"x"}},{"prefix":{"type":1}}]"#,
        )],
    );
    match tokio_tungstenite::connect_async(s.ws_url(&bad)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 400);
            assert_eq!(resp.headers()["content-type"], "application/problem+json");
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                .unwrap_or_else(|e| panic!("problem body: {e}"));
            assert_eq!(body["type"], "urn:eventwire:problem:invalid-filter");
            assert_eq!(body["parameter"], "filter[1].prefix");
            assert_eq!(
                body["detail"],
                r#"filter[1].prefix: value of "type" must be a string"#
            );
        }
        other => panic!(
            "malformed filter was not refused: {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
    let problems = [
        (
            subscribe_path(ORDERS, &[("filter", r#"{"sql":"type = 'x'"}"#)]),
            400,
            "invalid-filter",
            Some("filter.sql"),
        ),
        (
            subscribe_path(ORDERS, &[("from", "yesterday")]),
            400,
            "invalid-from",
            Some("from"),
        ),
        (
            subscribe_path(ORDERS, &[("from", "7:0")]),
            400,
            "invalid-from",
            Some("from"),
        ),
        (
            subscribe_path("no-such-topic", &[]),
            404,
            "unknown-topic",
            None,
        ),
        (
            "/v1/subscribe".to_string(),
            400,
            "missing-topic",
            Some("topic"),
        ),
    ];
    for (path, status, slug, parameter) in problems {
        let resp = s
            .http
            .get(s.envoy.url(&path))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(resp.status().as_u16(), status, "{path}");
        let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            body["type"],
            format!("urn:eventwire:problem:{slug}"),
            "{path}: {body}"
        );
        assert_eq!(body["parameter"].as_str(), parameter, "{path}: {body}");
    }
}

#[tokio::test]
async fn replay_from_earliest_a_cursor_a_time_and_sse_last_event_id() {
    let s = stack(&[(ORDERS, 3)], &[]).await;
    let boot = s.broker.bootstrap();
    let first = numbered("a", 0..10, 4);
    produce_numbered(&boot, ORDERS, &first, 0).await;

    // Earliest: all ten, once each, offsets contiguous per partition.
    let mut ws =
        WsClient::connect(&s.ws_url(&subscribe_path(ORDERS, &[("from", "earliest")]))).await;
    let got = ws.take(4, WAIT).await;
    assert_eq!(got.len(), 4);
    let saved = got[3]["cursor"].as_str().unwrap_or_default().to_string();
    let mut rest = ws.take_settled(first.len() - got.len(), WAIT, QUIET).await;
    ws.close().await;
    let mut all = got.clone();
    all.append(&mut rest);
    assert_eq!(sorted(ids(&all)), sorted(id_list(&first)));
    assert_contiguous(&all);

    // A time mark just after the first batch's record timestamps (CreateTime, set by the
    // producer); the second batch is produced once the clock has passed it, so it lies at or
    // after the mark and the first batch before it. Both are checked on the stored records.
    // Timestamps of `batch`'s records, once the topic holds `total` records.
    let stamps = |batch: &[(String, String)], total: usize| -> Vec<i64> {
        let wanted: HashSet<String> = id_list(batch).into_iter().collect();
        s.broker
            .records(ORDERS, total, WAIT)
            .iter()
            .filter(|r| r.header("ce_id").is_some_and(|id| wanted.contains(id)))
            .map(|r| {
                r.timestamp
                    .unwrap_or_else(|| panic!("record without timestamp"))
            })
            .collect()
    };
    let first_stamps = stamps(&first, first.len());
    assert_eq!(first_stamps.len(), first.len(), "first batch timestamps");
    let mark_ms = first_stamps.iter().max().map_or(0, |t| t + 1);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    wait_until(
        "the clock to pass the first batch's last timestamp",
        WAIT,
        || std::future::ready(now_ms() >= mark_ms),
    )
    .await;
    let time_mark = std::time::UNIX_EPOCH + Duration::from_millis(mark_ms as u64);

    // A saved cursor: exactly what came after it, including events published meanwhile.
    let second = numbered("b", 0..6, 4);
    produce_numbered(&boot, ORDERS, &second, 0).await;
    let second_stamps = stamps(&second, first.len() + second.len());
    assert_eq!(second_stamps.len(), second.len(), "second batch timestamps");
    assert!(
        second_stamps.iter().all(|t| *t >= mark_ms),
        "second batch {second_stamps:?} before the mark {mark_ms}"
    );
    let mut want: Vec<String> = id_list(&first)
        .into_iter()
        .chain(id_list(&second))
        .collect();
    let seen: HashSet<String> = ids(&got).into_iter().collect();
    want.retain(|id| !seen.contains(id));
    let mut ws = WsClient::connect(&s.ws_url(&subscribe_path(ORDERS, &[("from", &saved)]))).await;
    let resumed = ws.take_settled(want.len(), WAIT, QUIET).await;
    assert_eq!(sorted(ids(&resumed)), sorted(want), "resume from {saved}");
    assert_contiguous(&resumed);

    // A time: the events at or after it only. A time after the last record: nothing old,
    // but new events arrive (Tansu answers such a query with offset 0).
    let stamp = rfc3339(time_mark);
    let mut ws = WsClient::connect(&s.ws_url(&subscribe_path(ORDERS, &[("from", &stamp)]))).await;
    assert_eq!(
        sorted(ids(&ws.take_settled(second.len(), WAIT, QUIET).await)),
        sorted(id_list(&second)),
        "from {stamp}"
    );
    let future = rfc3339(std::time::SystemTime::now() + Duration::from_secs(5));
    let mut ws = WsClient::connect(&s.ws_url(&subscribe_path(ORDERS, &[("from", &future)]))).await;
    produce_events(&boot, ORDERS, &[("k0", "c-0", "com.example.test", "s")]).await;
    assert_eq!(
        ids(&ws.take_settled(1, WAIT, QUIET).await),
        ["c-0"],
        "from {future}"
    );

    // SSE: Last-Event-ID wins over `from` and resumes right after that event.
    let url = s
        .envoy
        .url(&subscribe_path(ORDERS, &[("from", "earliest")]));
    let mut sse = SseClient::connect(&url, None).await;
    let head = sse.take(5, WAIT).await;
    assert_eq!(head.len(), 5);
    let last_id = head[4].id.clone().unwrap_or_default();
    drop(sse);
    let mut sse = SseClient::connect(&url, Some(&last_id)).await;
    // 10 + 6 + 1 events, 5 of them before the resume.
    let tail = sse.take_settled(17 - head.len(), WAIT, QUIET).await;
    let head_ids: Vec<String> = ids(&head.iter().map(SseEvent::json).collect::<Vec<_>>());
    let tail_frames: Vec<Value> = tail.iter().map(SseEvent::json).collect();
    let mut everything = head_ids.clone();
    everything.extend(ids(&tail_frames));
    assert_eq!(everything.len(), 17, "no duplicates across the resume");
    let expected: Vec<String> = id_list(&first)
        .into_iter()
        .chain(id_list(&second))
        .chain(["c-0".to_string()])
        .collect();
    assert_eq!(sorted(everything), sorted(expected));
}

/// RFC 3339 UTC with milliseconds, without a date library.
fn rfc3339(t: std::time::SystemTime) -> String {
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

// Two workers: the fast reader must not wait for the producer's task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_closed_with_4008_while_a_fast_client_gets_everything() {
    const QUEUE: usize = 256;
    const EVENTS: usize = 3000;
    let s = stack(&[(ORDERS, 1)], &["--subscriber-queue", &QUEUE.to_string()]).await;
    let path = subscribe_path(ORDERS, &[]);
    let direct = format!("ws://127.0.0.1:{}{path}", s.sidecar.port);
    let mut fast = WsClient::connect(&direct).await;
    let mut slow = WsClient::connect_small_buffer(&direct, s.sidecar.port).await;

    let events = numbered("s", 0..EVENTS, 1);
    let started = std::time::Instant::now();
    let fast_reader = tokio::spawn(async move {
        let frames = fast.take(EVENTS, Duration::from_secs(60)).await;
        (frames, std::time::Instant::now())
    });
    produce_numbered(&s.broker.bootstrap(), ORDERS, &events, 1000).await;
    let produced = started.elapsed();
    let (frames, done) = fast_reader
        .await
        .unwrap_or_else(|e| panic!("fast reader: {e}"));
    assert_same(
        &ids(&frames),
        &id_list(&events),
        "the fast client gets all, in order",
    );
    let behind = done.duration_since(started).saturating_sub(produced);
    assert!(
        behind < Duration::from_secs(5),
        "fast client finished {behind:?} after the producer"
    );

    // The slow client now reads: a prefix of the events, then the close with the cursor
    // (reading ends at the close; the 20 s are only its deadline).
    let got = slow.drain(Duration::from_secs(20)).await;
    let Some(Some(close)) = slow.closed.clone() else {
        panic!("slow client was not closed (got {} events)", got.len());
    };
    assert_eq!(u16::from(close.code), 4008);
    assert!(got.len() < EVENTS, "it cannot have kept up");
    assert_same(
        &ids(&got),
        &id_list(&events[..got.len()]),
        "a prefix, in order",
    );
    let last_cursor = got.last().map_or("0:0".to_string(), |f| {
        f["cursor"].as_str().unwrap_or_default().to_string()
    });
    assert_eq!(
        close.reason.as_str(),
        format!(
            "slow consumer: fell more than {QUEUE} events behind; reconnect with from={last_cursor}"
        )
    );
    // Following the advice loses nothing.
    let resume = format!(
        "ws://127.0.0.1:{}{}",
        s.sidecar.port,
        subscribe_path(ORDERS, &[("from", &last_cursor)])
    );
    let mut again = WsClient::connect(&resume).await;
    let rest = again.take(EVENTS - got.len(), WAIT).await;
    assert_same(
        &ids(&rest),
        &id_list(&events[got.len()..]),
        "the rest after resuming",
    );
}

#[tokio::test]
async fn a_client_resumes_on_another_sidecar_without_gap_or_duplicate() {
    let broker = Broker::start().await;
    broker.create_topic(ORDERS, 3).await;
    let a = Sidecar::start(&broker.bootstrap()).await;
    let b = Sidecar::start(&broker.bootstrap()).await;
    let ws = |sidecar: &Sidecar, from: &str| {
        format!(
            "ws://127.0.0.1:{}{}",
            sidecar.port,
            subscribe_path(ORDERS, &[("from", from)])
        )
    };
    let mut on_a = WsClient::connect(&ws(&a, "latest")).await;
    let first = numbered("x", 0..12, 5);
    produce_numbered(&broker.bootstrap(), ORDERS, &first, 0).await;
    let got_a = on_a.take(7, WAIT).await;
    assert_eq!(got_a.len(), 7);
    let cursor = got_a[6]["cursor"].as_str().unwrap_or_default().to_string();
    on_a.close().await;
    drop(a);

    let second = numbered("y", 0..12, 5);
    produce_numbered(&broker.bootstrap(), ORDERS, &second, 0).await;
    let mut on_b = WsClient::connect(&ws(&b, &cursor)).await;
    let got_b = on_b.take(17, WAIT).await;
    assert!(
        on_b.drain(QUIET).await.is_empty(),
        "nothing more than the 17 missing"
    );

    let mut all = got_a.clone();
    all.extend(got_b.iter().cloned());
    let all_ids = ids(&all);
    let unique: HashSet<&String> = all_ids.iter().collect();
    assert_eq!(unique.len(), all_ids.len(), "no duplicate across sidecars");
    let expected: Vec<String> = id_list(&first)
        .into_iter()
        .chain(id_list(&second))
        .collect();
    assert_eq!(sorted(all_ids), sorted(expected), "no gap across sidecars");
    assert_contiguous(&all);
}

#[tokio::test]
async fn viewer_page_in_headless_chromium_shows_an_order_posted_through_envoy() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let root = repo_root();
    let script = root.join("tests/browser/viewer.mjs");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "playwright-core is missing: run `make deps` (npm ci in tests/browser)"
    );
    // The viewer as a dashboard user has it: subscriptions need a token, given in the link.
    let tokens = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    let token = "viewer-test-token-0001";
    std::fs::write(tokens.path(), format!("{token} {ORDERS}\n")).unwrap_or_else(|e| panic!("{e}"));
    let tokens_path = tokens.path().display().to_string();
    let s = stack(&[(ORDERS, 3)], &["--subscriber-tokens-file", &tokens_path]).await;
    let shot = tempfile::Builder::new()
        .prefix("eventwire-viewer-")
        .suffix(".png")
        .tempfile()
        .unwrap_or_else(|e| panic!("tempfile: {e}"))
        .into_temp_path();
    let keep = std::env::var_os("EVENTWIRE_KEEP_SCREENSHOT").is_some();
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .arg(s.envoy.url("/"))
        .arg(ORDERS)
        .arg(&shot)
        .env("EVENTWIRE_VIEWER_TOKEN", token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("node: {e}"));
    let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("no stdin"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut lines = BufReader::new(stdout).lines();
    let mut next_line = async || {
        tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("viewer.mjs said nothing for 60 s"))
            .unwrap_or_else(|e| panic!("viewer.mjs stdout: {e}"))
            .unwrap_or_else(|| panic!("viewer.mjs exited early (see its stderr above)"))
    };
    assert_eq!(next_line().await, "READY");

    // Filtered out by the page's `type` prefix filter, so it must not show.
    produce_events(
        &s.broker.bootstrap(),
        ORDERS,
        &[("x", "other-1", "org.other.thing", "s")],
    )
    .await;
    // With the client's trace, which the viewer must show.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let resp = s
        .http
        .post(s.envoy.url("/orders"))
        .header("content-type", "application/json")
        .header("x-tenant-id", "acme")
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .body(json!({"id": "ord-ui-1", "total": 12.5}).to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /orders: {e}"));
    assert_eq!(resp.status().as_u16(), 202);
    let ack: Value = resp.json().await.unwrap_or_default();
    let id = ack["id"].as_str().unwrap_or_default().to_string();
    stdin
        .write_all(format!("{id}\n").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("stdin: {e}"));
    drop(stdin);

    let found = next_line().await;
    let found: Value = serde_json::from_str(
        found
            .strip_prefix("FOUND ")
            .unwrap_or_else(|| panic!("{found}")),
    )
    .unwrap_or_else(|e| panic!("FOUND json: {e}"));
    assert_eq!(found["id"], id.as_str());
    assert_eq!(found["trace"], trace_id);
    assert!(
        found["summary"]
            .as_str()
            .is_some_and(|s| s.contains(trace_id)),
        "{found}"
    );
    assert_eq!(found["type"], "com.example.order.placed");
    assert_eq!(
        (&found["partition"], &found["offset"]),
        (&ack["partition"], &ack["offset"])
    );
    assert_eq!(found["attributes"]["tenant"], "acme");
    assert_eq!(found["attributes"]["(key)"], "ord-ui-1");
    assert_eq!(found["open"], true, "the event expands");
    let data: Value = serde_json::from_str(found["data"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("data pane: {e}"));
    assert_eq!(data, json!({"id": "ord-ui-1", "total": 12.5}));
    assert_eq!(found["count"], 1, "the filtered-out event is not listed");
    let line = next_line().await;
    assert!(line.starts_with("SCREENSHOT "), "{line}");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap_or_else(|_| panic!("viewer.mjs did not exit"))
        .unwrap_or_else(|e| panic!("wait: {e}"));
    assert!(status.success(), "viewer.mjs: {status}");
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("screenshot: {e}"));
    assert!(png.starts_with(b"\x89PNG"), "screenshot is a PNG");
    if keep {
        let _ = shot.keep();
    }
}

#[tokio::test]
async fn idle_streams_are_pinged_and_a_vanished_client_is_cleaned_up() {
    let broker = Broker::start().await;
    broker.create_topic(ORDERS, 1).await;
    let args = ["--ping-interval-s", "1", "--hub-grace-ms", "300"];
    let mut sidecar = Sidecar::start_with(&broker.bootstrap(), &args).await;
    let path = subscribe_path(ORDERS, &[]);

    // SSE: `: ping` comments keep an idle stream alive.
    let mut sse = SseClient::connect(&sidecar.url(&path), None).await;
    let idle = sse
        .until_comments(2, tokio::time::Instant::now() + WAIT)
        .await;
    assert!(idle.is_empty(), "events on an idle topic: {idle:?}");
    assert!(
        sse.comments >= 2,
        "{} ping comments within {WAIT:?} at a 1 s interval",
        sse.comments
    );
    drop(sse);

    // A WebSocket client that reads nothing answers no ping: dropped after three intervals,
    // and with it gone the topic's consumer stops too.
    let ws = WsClient::connect(&format!("ws://127.0.0.1:{}{path}", sidecar.port)).await;
    let log_has = |needle: &'static str| {
        let proc = &sidecar.proc;
        move || {
            let found = proc.log_text().contains(needle);
            async move { found }
        }
    };
    wait_until(
        "the silent client to be dropped (log: stopped answering pings)",
        Duration::from_secs(10),
        log_has("stopped answering pings"),
    )
    .await;
    wait_until(
        "the hub to stop its consumer without subscribers (log: fan-out hub stopped)",
        Duration::from_secs(5),
        log_has("fan-out hub stopped"),
    )
    .await;
    drop(ws);

    // Open streams do not hold up a graceful shutdown; they are told why they end.
    let mut sse = SseClient::connect(&sidecar.url(&path), None).await;
    let started = std::time::Instant::now();
    assert_eq!(sidecar.proc.stop(), Some(0), "clean exit on SIGTERM");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let last = sse.take(1, WAIT).await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].event.as_deref(), Some("error"));
    assert!(
        last[0]
            .data
            .starts_with("sidecar shutting down; reconnect with from=0:"),
        "{}",
        last[0].data
    );
    assert!(
        sse.take(1, WAIT).await.is_empty() && sse.ended,
        "the stream ends"
    );
}

/// A refused subscription's status, problem `type` and `Retry-After` (SSE through Envoy).
async fn refused(s: &Stack, path: &str) -> (u16, String, Option<String>) {
    let resp = s
        .http
        .get(s.envoy.url(path))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    if status == 200 {
        return (status, String::new(), retry);
    }
    assert_eq!(ct.as_deref(), Some("application/problem+json"), "{path}");
    let body: Value = resp.json().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let ty = body["type"].as_str().unwrap_or_default().to_owned();
    (status, ty, retry)
}

#[tokio::test]
async fn subscriber_limit_and_internal_topics_are_refused_before_the_upgrade() {
    let s = stack(&[(ORDERS, 1)], &["--max-subscribers", "2"]).await;

    // Internal topics are answered like missing ones, without a subscriber place.
    let (status, ty, _) = refused(&s, &subscribe_path("__consumer_offsets", &[])).await;
    assert_eq!(status, 404);
    assert_eq!(ty, "urn:eventwire:problem:unknown-topic");

    let path = subscribe_path(ORDERS, &[]);
    let ws = WsClient::connect(&s.ws_url(&path)).await;
    let mut sse = SseClient::connect(&s.envoy.url(&path), None).await;

    // Full: SSE and a WebSocket upgrade get 503 problem+json, no upgrade.
    let (status, ty, retry) = refused(&s, &path).await;
    assert_eq!(status, 503);
    assert_eq!(ty, "urn:eventwire:problem:too-many-subscribers");
    assert_eq!(retry.as_deref(), Some("1"));
    match tokio_tungstenite::connect_async(s.ws_url(&path)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503);
            assert_eq!(resp.headers()["content-type"], "application/problem+json");
            assert_eq!(resp.headers()["retry-after"], "1");
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                .unwrap_or_else(|e| panic!("problem body: {e}"));
            assert_eq!(body["type"], "urn:eventwire:problem:too-many-subscribers");
        }
        Ok(_) => panic!("third WebSocket subscriber was upgraded"),
        Err(e) => panic!("third WebSocket subscriber: {e}"),
    }

    // The subscribers in place are unaffected.
    let sent = s.order(json!({"id": "limit-1"})).await;
    let got = sse.take(1, WAIT).await;
    assert_eq!(got.len(), 1, "the SSE subscriber still gets events");
    let frame: Value = serde_json::from_str(&got[0].data).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(frame["event"]["id"], sent["id"]);

    // A client that leaves frees its place.
    ws.close().await;
    wait_until(
        "the closed WebSocket's place to be free (a subscription answered 200)",
        Duration::from_secs(10),
        || async { refused(&s, &path).await.0 == 200 },
    )
    .await;

    // Methods other than GET: 405 with `Allow`.
    let resp = s
        .http
        .post(s.sidecar.url(&path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(resp.headers()["allow"], "GET, HEAD");
}
