//! Delivery to HTTP services (`--deliveries-file`) against Tansu and the sidecar binary: an
//! in-test HTTP service records what it gets and answers from a script.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use eventwire_e2e::push::produce_events;
use eventwire_e2e::*;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
/// Listening on after the awaited requests, to see any that should not come (a duplicate, a
/// retry of a refused event). The check itself, not a wait for something to happen.
const QUIET: Duration = Duration::from_millis(1500);

/// One request the service got.
#[derive(Debug, Clone)]
struct Got {
    id: String,
    ty: String,
    headers: HeaderMap,
    body: Vec<u8>,
    at: Instant,
}

#[derive(Default)]
struct Service {
    got: Mutex<Vec<Got>>,
    /// Statuses to answer per event id, in turn; 200 once used up.
    script: Mutex<HashMap<String, VecDeque<u16>>>,
}

impl Service {
    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn count(&self, id: &str) -> usize {
        self.got().iter().filter(|g| g.id == id).count()
    }
}

async fn receive(
    State(s): State<Arc<Service>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = text("ce-id");
    let status = s
        .script
        .lock()
        .unwrap()
        .get_mut(&id)
        .and_then(VecDeque::pop_front)
        .unwrap_or(200);
    s.got.lock().unwrap().push(Got {
        ty: text("ce-type"),
        id,
        headers: headers.clone(),
        body: body.to_vec(),
        at: Instant::now(),
    });
    StatusCode::from_u16(status).unwrap()
}

/// The service on 127.0.0.1:0; its URL.
async fn service(script: &[(&str, &[u16])]) -> (Arc<Service>, String) {
    let state = Arc::new(Service::default());
    for (id, statuses) in script {
        state
            .script
            .lock()
            .unwrap()
            .insert((*id).to_owned(), statuses.iter().copied().collect());
    }
    let app = axum::Router::new()
        .route("/events", axum::routing::post(receive))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (state, format!("http://127.0.0.1:{port}/events"))
}

fn deliveries_file(dir: &tempfile::TempDir, toml: &str) -> String {
    let path = dir.path().join("deliveries.toml");
    std::fs::write(&path, toml).unwrap();
    path.display().to_string()
}

async fn sidecar(broker: &Broker, file: &str) -> Sidecar {
    Sidecar::start_with(
        &broker.bootstrap(),
        &["--deliveries-file", file, "--push-fetch-wait-ms", "50"],
    )
    .await
}

async fn wait_for(svc: &Arc<Service>, what: &str, done: impl Fn(&[Got]) -> bool) {
    wait_until(what, WAIT, || {
        let got = svc.got();
        let ok = done(&got);
        async move { ok }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_is_delivered_in_key_order_in_binary_mode() {
    let broker = Broker::start().await;
    let topic = topic("deliver-all");
    broker.create_topic(&topic, 3).await;
    let (svc, url) = service(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = deliveries_file(
        &dir,
        &format!("[[delivery]]\nname = \"all\"\ntopic = \"{topic}\"\nurl = \"{url}\"\n"),
    );
    let _sidecar = sidecar(&broker, &file).await;

    let keys = ["k0", "k1", "k2", "k3", "k4"];
    let ids: Vec<(String, String)> = (0..30)
        .map(|n| {
            (
                keys[n % keys.len()].to_owned(),
                format!("{}-{n:02}", keys[n % keys.len()]),
            )
        })
        .collect();
    let events: Vec<(&str, &str, &str, &str)> = ids
        .iter()
        .map(|(k, id)| {
            (
                k.as_str(),
                id.as_str(),
                "com.example.order.placed",
                k.as_str(),
            )
        })
        .collect();
    produce_events(&broker.bootstrap(), &topic, &events).await;

    wait_for(&svc, "all 30 events delivered", |got| got.len() >= 30).await;
    tokio::time::sleep(QUIET).await;
    let got = svc.got();
    assert_eq!(
        got.len(),
        30,
        "each event once: {:?}",
        got.iter().map(|g| &g.id).collect::<Vec<_>>()
    );

    // Per key, the order produced (ids carry a rising number).
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for g in &got {
        let key = g.id.split('-').next().unwrap().to_owned();
        per_key.entry(key).or_default().push(g.id.clone());
    }
    assert_eq!(per_key.len(), keys.len());
    for (key, seen) in &per_key {
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, &sorted, "order of key {key}");
        assert_eq!(seen.len(), 6, "events of key {key}");
    }

    let first = got
        .iter()
        .find(|g| g.id == "k1-01")
        .expect("k1-01 delivered");
    let header = |name: &str| first.headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(first.ty, "com.example.order.placed");
    assert_eq!(header("ce-specversion"), Some("1.0"));
    assert_eq!(header("ce-source"), Some("/test"));
    assert_eq!(header("ce-subject"), Some("k1"));
    assert_eq!(header("content-type"), Some("application/json"));
    assert_eq!(first.body, br#"{"id":"k1-01","pad":""}"#);
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_hold_the_partition_and_refusals_go_to_the_dead_letter_topic() {
    let broker = Broker::start().await;
    let topic = topic("deliver-retry");
    let dlq = topic_name_dlq(&topic);
    broker.create_topic(&topic, 1).await;
    broker.create_topic(&dlq, 1).await;
    let (svc, url) = service(&[("e1", &[503, 503]), ("e3", &[400])]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = deliveries_file(
        &dir,
        &format!(
            "[[delivery]]\nname = \"retry\"\ntopic = \"{topic}\"\nurl = \"{url}\"\n\
             initial_backoff_ms = 100\nmax_backoff_ms = 200\ndead_letter_topic = \"{dlq}\"\n"
        ),
    );
    let _sidecar = sidecar(&broker, &file).await;

    let events = [
        ("a", "e1", "t.one", "s"),
        ("b", "e2", "t.two", "s"),
        ("c", "e3", "t.three", "s"),
        ("d", "e4", "t.four", "s"),
    ];
    produce_events(&broker.bootstrap(), &topic, &events).await;

    wait_for(&svc, "e4 delivered", |got| got.iter().any(|g| g.id == "e4")).await;
    tokio::time::sleep(QUIET).await;
    let got = svc.got();
    let order: Vec<&str> = got.iter().map(|g| g.id.as_str()).collect();
    // e1 twice refused then taken; nothing after it before that; e3 refused once, not retried.
    assert_eq!(order, ["e1", "e1", "e1", "e2", "e3", "e4"]);
    assert_eq!(svc.count("e3"), 1);
    let e1_last = got
        .iter()
        .filter(|g| g.id == "e1")
        .map(|g| g.at)
        .max()
        .unwrap();
    let e2 = got.iter().find(|g| g.id == "e2").unwrap().at;
    assert!(e2 >= e1_last, "e2 went out before e1 was delivered");

    let dead = tokio::task::block_in_place(|| broker.records_settled(&dlq, 1, WAIT));
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    let d = &dead[0];
    assert_eq!(d.header("ce_id"), Some("e3"));
    assert_eq!(d.key_str(), Some("c"));
    assert_eq!(d.header("eventwire_dlq_reason"), Some("rejected"));
    assert_eq!(d.header("eventwire_dlq_status"), Some("400"));
    assert_eq!(d.header("eventwire_dlq_attempts"), Some("1"));
    assert_eq!(d.header("eventwire_dlq_topic"), Some(topic.as_str()));
    assert_eq!(d.header("eventwire_dlq_partition"), Some("0"));
    assert_eq!(d.header("eventwire_dlq_offset"), Some("2"));
    assert_eq!(d.value.as_deref(), Some(&br#"{"id":"e3","pad":""}"#[..]));
}

fn topic_name_dlq(topic: &str) -> String {
    format!("{topic}.dlq")
}
