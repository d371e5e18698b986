//! The seed's order scenario as `make run` wires it: the shipped envoy.yaml bridges
//! `POST /orders` to `order-placed-events`, the sidecar delivers that topic to the demo
//! payment service with the shipped `sidecar/deliveries.toml`, and the service's replies land
//! on `payment-processed-events` or `payment-failed-events`.

use eventwire_e2e::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const ORDERS: &str = "order-placed-events";
const PROCESSED: &str = "payment-processed-events";
const FAILED: &str = "payment-failed-events";
const WAIT: Duration = Duration::from_secs(30);
/// Where the shipped deliveries file sends orders (the demo's payment service).
const SHIPPED_SERVICE: &str = "127.0.0.1:8082";

/// The shipped deliveries file, pointed at the test's payment service.
fn deliveries_file(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let shipped = repo_root().join("sidecar/deliveries.toml");
    let text = std::fs::read_to_string(&shipped)
        .unwrap_or_else(|e| panic!("read {}: {e}", shipped.display()));
    assert!(
        text.contains(SHIPPED_SERVICE),
        "sidecar/deliveries.toml no longer delivers to {SHIPPED_SERVICE}"
    );
    let file = dir.join("deliveries.toml");
    let ours = text.replace(SHIPPED_SERVICE, &format!("127.0.0.1:{port}"));
    std::fs::write(&file, ours).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_leads_to_one_payment_event_caused_by_it() {
    let held = HeldPort::new();
    let payment_port = held.port;
    let mut payment = Proc::spawn(
        "demo-payment",
        std::process::Command::new(repo_root().join("target/release/demo-payment"))
            .arg(format!("127.0.0.1:{payment_port}")),
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let file = deliveries_file(dir.path(), payment_port);
    let file = file.display().to_string();
    let topics = [
        (ORDERS, 3),
        ("payment-requested-events", 1),
        (PROCESSED, 1),
        (FAILED, 1),
        ("order-placed-events.dlq", 1),
    ];
    let s = Stack::start(
        &EnvoyConfig::shipped(),
        &topics,
        &["--deliveries-file", &file],
    )
    .await;
    assert!(payment.is_running(), "{}", payment.log_tail());

    // Enough orders that a 10% decline rate shows up on both topics in most runs; the
    // assertions hold for any split.
    const N: usize = 30;
    let mut placed = BTreeMap::new(); // order id -> event id
    for n in 0..N {
        let order = format!("ord-demo-{n}");
        let body = format!(r#"{{"id":"{order}","customer":"c-{n}","total":{n}.5}}"#);
        let (status, _, answer) = s
            .post(
                "/orders",
                &[("content-type", "application/json")],
                body.as_bytes(),
            )
            .await;
        assert_eq!(status, 202, "{}", String::from_utf8_lossy(&answer));
        let answer: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
        let id = answer["id"]
            .as_str()
            .unwrap_or_else(|| panic!("202 without an event id: {answer}"))
            .to_owned();
        placed.insert(order, id);
    }

    let mut replies = Vec::new();
    wait_until("a payment event for every order", WAIT, || {
        replies = [PROCESSED, FAILED]
            .iter()
            .flat_map(|t| s.broker.records(t, N, Duration::from_millis(300)))
            .collect::<Vec<_>>();
        let done = replies.len() >= N;
        async move { done }
    })
    .await;
    // Read again after the wait: a second reply for an order would show now.
    let processed = s.broker.all_records(PROCESSED);
    let failed = s.broker.all_records(FAILED);
    assert_eq!(
        processed.len() + failed.len(),
        N,
        "one payment event per order, no duplicates"
    );
    for (topic, records, ty) in [
        (PROCESSED, &processed, "com.example.payment.processed"),
        (FAILED, &failed, "com.example.payment.failed"),
    ] {
        for r in records.iter() {
            let order = r
                .key_str()
                .unwrap_or_else(|| panic!("{topic}: a reply without a key"));
            let cause = placed.remove(order).unwrap_or_else(|| {
                panic!("{topic}: a reply for an unknown or repeated order {order}")
            });
            assert_eq!(
                r.header("ce_causationid"),
                Some(cause.as_str()),
                "{topic} {order}"
            );
            assert_eq!(r.header("ce_type"), Some(ty), "{topic} {order}");
            assert_eq!(r.header("ce_subject"), Some(order), "{topic} {order}");
            let data: Value = serde_json::from_slice(r.value.as_deref().unwrap_or_default())
                .unwrap_or_else(|e| panic!("{topic} {order}: data not JSON: {e}"));
            assert_eq!(data["order_id"], order, "{topic}: {data}");
        }
    }
    assert!(
        placed.is_empty(),
        "orders without a payment event: {placed:?}"
    );
    let declined = failed.len();
    println!(
        "{N} orders: {} processed, {declined} declined",
        processed.len()
    );
    // The service's own log: it saw every order once (idempotency is its own unit test).
    let log = payment.log_text();
    let paid = log.matches("demo-payment: order ord-demo-").count();
    assert_eq!(paid, N, "{log}");
    drop(s);
    payment.stop();
}
