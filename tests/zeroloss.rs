//! Zero loss under faults: real Envoy + filter + sidecar + Tansu, processes stopped and
//! killed for real. Each test prints its counts (sent, acknowledged, found in Kafka by id,
//! duplicates) and asserts the guarantee: an event answered 202 is never lost.

use eventwire_e2e::*;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const TOPIC: &str = "order-placed-events";

async fn stack(sidecar_args: &[&str]) -> Stack {
    Stack::start(&EnvoyConfig::shipped(), &[(TOPIC, 3)], sidecar_args).await
}

/// One order through Envoy with `id` as both the Idempotency-Key and the order id.
async fn post_order(http: &reqwest::Client, url: &str, id: &str) -> (u16, Value, Option<String>) {
    let body = format!(r#"{{"id":"{id}","total":10}}"#);
    let resp = http
        .post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", id)
        .body(body)
        .send()
        .await;
    match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let json = r.json::<Value>().await.unwrap_or(Value::Null);
            (status, json, retry)
        }
        Err(_) => (0, Value::Null, None),
    }
}

/// What the clients of `send_all` have seen so far: answers 202 and anything else.
#[derive(Default)]
struct Progress {
    acked: AtomicUsize,
    failed: AtomicUsize,
}

impl Progress {
    fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }
}

/// Sends `ids` with `workers` concurrent clients; a client retries an id (same
/// Idempotency-Key) after a non-202 up to `retries` times, as a real client would.
/// Returns the acknowledged answers by id.
async fn send_all(
    http: &reqwest::Client,
    url: &str,
    ids: Vec<String>,
    workers: usize,
    retries: usize,
) -> HashMap<String, Value> {
    send_tracked(http, url, ids, workers, retries, Arc::default()).await
}

/// `send_all`, counting every answer in `progress` as it comes.
async fn send_tracked(
    http: &reqwest::Client,
    url: &str,
    ids: Vec<String>,
    workers: usize,
    retries: usize,
    progress: Arc<Progress>,
) -> HashMap<String, Value> {
    let queue = Arc::new(tokio::sync::Mutex::new(ids));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (http, url, queue) = (http.clone(), url.to_string(), queue.clone());
        let progress = progress.clone();
        set.spawn(async move {
            let mut acked = Vec::new();
            while let Some(id) = queue.lock().await.pop() {
                for _ in 0..=retries {
                    let (status, body, _) = post_order(&http, &url, &id).await;
                    if status == 202 {
                        progress.acked.fetch_add(1, Ordering::SeqCst);
                        acked.push((id.clone(), body));
                        break;
                    }
                    progress.failed.fetch_add(1, Ordering::SeqCst);
                    // The client's back-off before its retry, as a real client's; it waits
                    // for nothing in the test.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            acked
        });
    }
    let mut out = HashMap::new();
    while let Some(done) = set.join_next().await {
        out.extend(done.unwrap_or_default());
    }
    out
}

/// Record counts by `ce_id` once at least `want` records arrived (or `limit` passed) and
/// then `broker::QUIET` more, so that a duplicate beyond `want` is counted too.
fn ids_in_kafka(broker: &Broker, want: usize, limit: Duration) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in broker.records_settled(TOPIC, want, limit) {
        *counts
            .entry(r.header("ce_id").unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    counts
}

fn report(
    name: &str,
    sent: usize,
    acked: &HashMap<String, Value>,
    found: &HashMap<String, usize>,
) -> usize {
    let found_acked = acked.keys().filter(|id| found.contains_key(*id)).count();
    let duplicates: usize = found.values().map(|n| n - 1).sum();
    println!(
        "{name}: sent {sent}, acknowledged {}, acknowledged found in Kafka {found_acked}, records {}, duplicates {duplicates}",
        acked.len(),
        found.values().sum::<usize>()
    );
    duplicates
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_outage_spools_then_forwards_every_event_once() {
    let mut s = stack(&["--ack-timeout-ms", "300"]).await;
    let url = s.envoy.url("/orders");
    let mut acked = send_all(&s.http, &url, ids("before", 40), 4, 0).await;
    assert_eq!(acked.len(), 40);

    s.broker.proc.kill9();
    let during = send_all(&s.http, &url, ids("during", 80), 4, 0).await;
    assert_eq!(
        during.len(),
        80,
        "every request must be accepted while the broker is down"
    );
    let spooled = during.values().filter(|b| b["status"] == "spooled").count();
    assert!(spooled > 0, "nothing was spooled during the outage");
    acked.extend(during);

    s.broker.restart().await;
    acked.extend(send_all(&s.http, &url, ids("after", 40), 4, 20).await);
    assert_eq!(acked.len(), 160);

    let found = ids_in_kafka(&s.broker, 160, Duration::from_secs(60));
    let dups = report("broker outage", 160, &acked, &found);
    for id in acked.keys() {
        assert_eq!(
            found.get(id),
            Some(&1),
            "acknowledged event {id} not in Kafka exactly once"
        );
    }
    assert_eq!(dups, 0);

    // The status of a spooled event, through the proxy, now says published.
    let id = "during-0007";
    let status: Value = s
        .http
        .get(s.envoy.url(&format!("/v1/events/{id}")))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("status of {id}: {e}"))
        .json()
        .await
        .unwrap_or(Value::Null);
    assert_eq!(status["status"], "published", "{status}");
    assert_eq!(status["topic"], TOPIC);
    assert!(s.upstream.received().is_empty());
}

/// The forwarder keeps many spooled records in flight (pipelined) and must still deliver one
/// key's events in the order they were accepted: one client, one key, sent one after the
/// other while the broker is down, read back after it returns.
#[tokio::test]
async fn spooled_events_of_one_key_reach_kafka_in_acceptance_order() {
    const N: usize = 120;
    let mut s = stack(&["--ack-timeout-ms", "300"]).await;
    let url = s.envoy.url("/orders");
    let (first, ..) = post_order(&s.http, &url, "warm").await;
    assert_eq!(first, 202);
    s.broker.proc.kill9();
    for n in 0..N {
        let body = format!(r#"{{"id":"same-order","n":{n}}}"#);
        let resp = s
            .http
            .post(&url)
            .header("content-type", "application/json")
            .header("idempotency-key", format!("seq-{n:04}"))
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {n}: {e}"));
        assert_eq!(resp.status().as_u16(), 202, "event {n}");
    }
    s.broker.restart().await;
    let mut records = s
        .broker
        .records_settled(TOPIC, N + 1, Duration::from_secs(60));
    records.sort_by_key(|r| (r.partition, r.offset));
    let order: Vec<u64> = records
        .iter()
        .filter(|r| r.header("ce_id").is_some_and(|id| id.starts_with("seq-")))
        .filter_map(|r| {
            let v: Value = serde_json::from_slice(r.value.as_deref()?).ok()?;
            v["n"].as_u64()
        })
        .collect();
    println!(
        "one key, {N} events spooled during an outage: {} in Kafka",
        order.len()
    );
    assert_eq!(order, (0..N as u64).collect::<Vec<_>>());
}

/// Guarantee under `kill -9` of the sidecar: every acknowledged event is in Kafka. A record
/// can be duplicated only if the sidecar died after the broker acknowledged it and before the
/// acknowledgement was recorded (status log / spool position): at most the events in flight
/// at each kill, so at most kills x concurrent clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecar_kill9_under_load_loses_nothing() {
    const KILLS: usize = 3;
    const WORKERS: usize = 4;
    // Acknowledgements between two kills; KILLS x this stays well below the 300 events, so
    // every kill happens under load.
    const ACKS_BETWEEN_KILLS: usize = 40;
    let mut s = stack(&["--ack-timeout-ms", "300"]).await;
    let url = s.envoy.url("/orders");
    let progress = Arc::new(Progress::default());
    let sender = {
        let (http, url, progress) = (s.http.clone(), url.clone(), progress.clone());
        tokio::spawn(async move {
            send_tracked(&http, &url, ids("kill", 300), WORKERS, 100, progress).await
        })
    };
    for kill in 1..=KILLS {
        let acked = progress.acked();
        wait_until(
            &format!("{ACKS_BETWEEN_KILLS} more acknowledgements before kill {kill}"),
            Duration::from_secs(60),
            || std::future::ready(progress.acked() >= acked + ACKS_BETWEEN_KILLS),
        )
        .await;
        s.sidecar.proc.kill9();
        // Down for real: the clients have seen it refuse before it comes back.
        let failed = progress.failed();
        wait_until(
            &format!("a request to fail while the sidecar is down (kill {kill})"),
            Duration::from_secs(30),
            || std::future::ready(progress.failed() > failed),
        )
        .await;
        s.sidecar.restart().await;
    }
    let acked = sender.await.unwrap_or_default();
    assert_eq!(
        acked.len(),
        300,
        "clients retrying with the same key must all get 202"
    );
    let found = ids_in_kafka(&s.broker, 300, Duration::from_secs(60));
    let dups = report("sidecar kill -9", 300, &acked, &found);
    for id in acked.keys() {
        assert!(found.contains_key(id), "acknowledged event {id} lost");
    }
    assert!(
        dups <= KILLS * WORKERS,
        "{dups} duplicates exceed the bound {}",
        KILLS * WORKERS
    );
}

#[tokio::test]
async fn sidecar_down_acknowledges_nothing() {
    let mut s = stack(&[]).await;
    s.sidecar.proc.kill9();
    let url = s.envoy.url("/orders");
    for id in ids("down", 20) {
        let (status, body, retry) = post_order(&s.http, &url, &id).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["type"], "urn:eventwire:problem:sidecar-unavailable");
        assert_eq!(retry.as_deref(), Some("1"));
    }
    // The filter counted each of the 20 as a callout without an answer, none as accepted.
    assert_eq!(
        s.envoy.counter("eventwire_sidecar_unavailable_total").await,
        20
    );
    assert_eq!(s.envoy.counter("eventwire_events_accepted_total").await, 0);
    let found = ids_in_kafka(&s.broker, 0, Duration::ZERO);
    report("sidecar down", 20, &HashMap::new(), &found);
    assert!(found.is_empty());
    assert!(
        s.upstream.received().is_empty(),
        "bridge must not fall back to the upstream"
    );
}

#[tokio::test]
async fn same_idempotency_key_gives_one_record_and_the_same_answer_across_a_restart() {
    let mut s = stack(&[]).await;
    let url = s.envoy.url("/orders");
    let (status, first, _) = post_order(&s.http, &url, "same-key").await;
    assert_eq!(status, 202);
    for _ in 0..4 {
        let (status, again, _) = post_order(&s.http, &url, "same-key").await;
        assert_eq!((status, &again), (202, &first));
    }
    assert_eq!(s.sidecar.proc.stop(), Some(0));
    s.sidecar.restart().await;
    s.sidecar.wait_ready().await;
    let (status, after, _) = post_order(&s.http, &url, "same-key").await;
    assert_eq!(
        (status, &after),
        (202, &first),
        "the answer must survive a restart"
    );

    // The same key with another payload is a conflict, not a silent replay.
    let resp = s
        .http
        .post(&url)
        .header("content-type", "application/json")
        .header("idempotency-key", "same-key")
        .body(r#"{"id":"same-key","total":999}"#)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status().as_u16(), 409);
    let p: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(p["type"], "urn:eventwire:problem:idempotency-conflict");

    let found = ids_in_kafka(&s.broker, 1, Duration::from_secs(10));
    report(
        "same key x6",
        7,
        &HashMap::from([("same-key".to_string(), first)]),
        &found,
    );
    assert_eq!(found.get("same-key"), Some(&1));
    assert_eq!(found.len(), 1);
}

#[tokio::test]
async fn full_spool_pushes_back_then_drains_and_survives_a_graceful_restart() {
    let mut s = stack(&["--ack", "spool", "--spool-max-bytes", "4000"]).await;
    let url = s.envoy.url("/orders");
    s.broker.proc.kill9();
    let mut acked = HashMap::new();
    let mut pushed_back = None;
    for id in ids("full", 200) {
        let (status, body, retry) = post_order(&s.http, &url, &id).await;
        match status {
            202 => {
                assert_eq!(body["status"], "spooled");
                acked.insert(id, body);
            }
            _ => {
                pushed_back = Some((status, body, retry));
                break;
            }
        }
    }
    let (status, body, retry) = pushed_back.unwrap_or_else(|| panic!("the spool never filled"));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:eventwire:problem:spool-full");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(acked.len() >= 5, "only {} events fit", acked.len());

    // SIGTERM keeps the spool; the next start forwards it once the broker is back.
    assert_eq!(s.sidecar.proc.stop(), Some(0), "graceful stop must exit 0");
    s.sidecar.restart().await;
    s.broker.restart().await;
    let found = ids_in_kafka(&s.broker, acked.len(), Duration::from_secs(60));
    let dups = report("spool full", acked.len() + 1, &acked, &found);
    for id in acked.keys() {
        assert_eq!(
            found.get(id),
            Some(&1),
            "spooled event {id} not forwarded exactly once"
        );
    }
    assert_eq!(dups, 0);
    // Drained: accepting again.
    let (status, body, _) = post_order(&s.http, &url, "after-drain").await;
    assert_eq!(status, 202, "{body}");
}
