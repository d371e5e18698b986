//! Schema evolution with the real sidecar binary (and Tansu): a subject whose new version
//! breaks its compatibility mode stops the start, naming the file, the mode and every
//! change; a compatible pair starts, and each event is checked against the version its
//! `dataschema` names before anything is durable.

use eventwire_e2e::*;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
const V1: &str = "urn:eventwire:schema:order-placed:v1";
const V2: &str = "urn:eventwire:schema:order-placed:v2";

/// A `--schema-dir` holding the subject `order-placed` with `versions` (v1, v2, ...).
fn schema_dir(versions: &[Value]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("eventwire-schemas-")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"));
    let subject = dir.path().join("order-placed");
    std::fs::create_dir(&subject).unwrap_or_else(|e| panic!("{}: {e}", subject.display()));
    for (i, schema) in versions.iter().enumerate() {
        let path = subject.join(format!("v{}.json", i + 1));
        std::fs::write(&path, schema.to_string())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    dir
}

/// An order schema: closed, `id` and `total` required, plus `more` properties.
fn order(id: &str, total: &str, more: Value, required: &[&str]) -> Value {
    let mut properties = json!({"id": {"type": "string"}, "total": {"type": total}});
    if let (Some(p), Some(more)) = (properties.as_object_mut(), more.as_object()) {
        p.extend(more.clone());
    }
    let mut all = vec!["id", "total"];
    all.extend_from_slice(required);
    json!({"$id": id, "type": "object", "properties": properties, "required": all,
           "additionalProperties": false})
}

#[tokio::test]
async fn an_incompatible_version_stops_the_start_naming_the_change() {
    // v2 adds a required property and narrows `total`: old data cannot be read with it.
    let dir = schema_dir(&[
        order(V1, "number", json!({}), &[]),
        order(
            V2,
            "integer",
            json!({"coupon": {"type": "string"}}),
            &["coupon"],
        ),
    ]);
    let data = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (status, log) = start_with_schemas(dir.path(), data.path()).await;
    assert_eq!(status, Some(1), "exit status: {log}");
    let v2 = dir.path().join("order-placed/v2.json");
    let want = format!(
        "error: --schema-dir {}: not backward compatible with v1.json: a consumer using v2 \
         cannot read v1 data (required property /properties/coupon added; type of \
         /properties/total narrowed from number to integer)",
        v2.display()
    );
    assert!(log.contains(&want), "{log}");
    assert!(
        !Path::new(&data.path().join("spool")).exists(),
        "nothing was opened"
    );
}

#[tokio::test]
async fn a_compatible_version_starts_and_events_are_checked_against_the_version_they_name() {
    // v2 adds an optional `coupon` to the closed model: backward compatible.
    let dir = schema_dir(&[
        order(V1, "number", json!({}), &[]),
        order(
            V2,
            "number",
            json!({"coupon": {"type": "string", "maxLength": 12}}),
            &[],
        ),
    ]);
    let broker = Broker::start().await;
    let topic = topic("schema-evolution");
    broker.create_topic(&topic, 1).await;
    let schema_dir = dir.path().display().to_string();
    let sidecar = Sidecar::start_with(&broker.bootstrap(), &["--schema-dir", &schema_dir]).await;
    sidecar.wait_ready().await;
    let log = sidecar.proc.log_text();
    for want in ["order-placed", "v1..v2", V2, "backward"] {
        assert!(log.contains(want), "{want} not logged at start: {log}");
    }

    let http = reqwest::Client::new();
    let post = |id: &str, schema: &str, body: Value| {
        let req = http
            .post(sidecar.url("/v1/events"))
            .header("eventwire-topic", &topic)
            .header("content-type", "application/json")
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-source", "/shop/orders")
            .header("ce-type", "com.example.order.placed")
            .header("ce-dataschema", schema)
            .body(body.to_string());
        async move {
            let r = req.send().await.unwrap_or_else(|e| panic!("POST: {e}"));
            let status = r.status().as_u16();
            let problem: Value = r.json().await.unwrap_or(Value::Null);
            (status, problem)
        }
    };
    let with_coupon = json!({"id": "o-1", "total": 10.5, "coupon": "SUMMER"});
    let (status, problem) = post("e-1", V2, with_coupon.clone()).await;
    assert_eq!(status, 202, "v2 data named v2: {problem}");
    let (status, problem) = post("e-2", V1, json!({"id": "o-2", "total": 3})).await;
    assert_eq!(status, 202, "v1 data named v1: {problem}");

    // v1 has no coupon (closed); v2 bounds it. Neither reaches Kafka.
    let refused = [
        ("e-3", V1, with_coupon, "", "additionalProperties"),
        (
            "e-4",
            V2,
            json!({"id": "o-4", "total": 1, "coupon": "MUCH-TOO-LONG-COUPON"}),
            "/coupon",
            "maxLength",
        ),
    ];
    for (id, schema, body, pointer, keyword) in refused {
        let (status, problem) = post(id, schema, body).await;
        assert_eq!(status, 400, "{id}: {problem}");
        assert_eq!(
            problem["type"], "urn:eventwire:problem:invalid-data",
            "{problem}"
        );
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(schema), "{id}: names its schema: {problem}");
        let errors = problem["errors"].as_array().cloned().unwrap_or_default();
        assert!(
            errors
                .iter()
                .any(|e| e["pointer"] == pointer && e["keyword"] == keyword),
            "{id}: ({pointer}, {keyword}) not in {problem}"
        );
    }

    let records = broker.records_settled(&topic, 2, WAIT);
    let schemas: Vec<Option<&str>> = records.iter().map(|r| r.header("ce_dataschema")).collect();
    assert_eq!(
        schemas,
        [Some(V2), Some(V1)],
        "only the accepted events, in order"
    );
}

/// The sidecar with `schemas` and `data`, until it got past the schemas (their versions
/// recorded) or exited: its exit status (`None`: it was running) and its log.
async fn start_with_schemas(schemas: &Path, data: &Path) -> (Option<i32>, String) {
    let held = HeldPort::new();
    let listen = format!("127.0.0.1:{}", held.port);
    let mut sidecar = Proc::spawn(
        "sidecar",
        std::process::Command::new(paths().sidecar)
            // No broker is needed: the schemas are read before anything else.
            .args(["serve", "--listen", &listen, "--brokers", "127.0.0.1:9"])
            .arg("--data-dir")
            .arg(data)
            .arg("--schema-dir")
            .arg(schemas),
    );
    wait_until("the schemas to be checked", WAIT, || {
        let done = sidecar.exited() || sidecar.log_text().contains("schema versions match");
        async move { done }
    })
    .await;
    let exited = sidecar.exited();
    let log = sidecar.log_text();
    let status = sidecar.stop();
    (status.filter(|_| exited), log)
}

#[tokio::test]
async fn a_version_edited_after_its_first_load_is_refused() {
    let v1 = order(V1, "number", json!({}), &[]);
    let v2 = order(V2, "number", json!({"coupon": {"type": "string"}}), &[]);
    let dir = schema_dir(&[v1.clone(), v2]);
    let data = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (status, log) = start_with_schemas(dir.path(), data.path()).await;
    assert_eq!(status, None, "first start: {log}");
    let record = data.path().join("schema-versions.json");
    let recorded = || -> Value {
        let text = std::fs::read_to_string(&record)
            .unwrap_or_else(|e| panic!("{}: {e}", record.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", record.display()))
    };
    let first = recorded();
    let ids: Vec<&String> = first
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    assert_eq!(ids, [V1, V2], "both versions recorded: {first}");

    // Re-indented: the same content, not a change.
    let v1_path = dir.path().join("order-placed/v1.json");
    let pretty = serde_json::to_string_pretty(&v1).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&v1_path, pretty).unwrap_or_else(|e| panic!("{}: {e}", v1_path.display()));
    let (status, log) = start_with_schemas(dir.path(), data.path()).await;
    assert_eq!(
        status, None,
        "a re-indented version is the same version: {log}"
    );
    assert_eq!(recorded(), first, "nothing new to record");

    // A bound on `id`: still compatible with v2, so only the record can tell.
    let mut edited = v1;
    edited["properties"]["id"]["maxLength"] = json!(8);
    std::fs::write(&v1_path, edited.to_string())
        .unwrap_or_else(|e| panic!("{}: {e}", v1_path.display()));
    let (status, log) = start_with_schemas(dir.path(), data.path()).await;
    assert_eq!(status, Some(1), "an edited version stops the start: {log}");
    let want = format!(
        "error: --schema-dir {}: changed since this sidecar first loaded it (`$id` {V1}",
        v1_path.display()
    );
    assert!(log.contains(&want), "{log}");
    assert!(log.contains("Put the change in v3.json"), "{log}");
    assert_eq!(recorded(), first, "a refused start records nothing");
}
