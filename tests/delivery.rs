//! Delivery to HTTP services (`--deliveries-file`) against Tansu and the sidecar binary: an
//! in-test HTTP service records what it gets and answers from a script.

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use eventwire_e2e::push::{produce_events, produce_events_placed};
use eventwire_e2e::*;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
/// Listening on after the awaited requests, to see any that should not come (a duplicate, a
/// retry of a refused event). The check itself, not a wait for something to happen.
const QUIET: Duration = Duration::from_millis(1500);

/// One request the service got.
#[derive(Debug, Clone)]
struct Got {
    /// The URL path it came to (which of several deliveries sent it).
    path: String,
    id: String,
    ty: String,
    headers: HeaderMap,
    body: Vec<u8>,
    at: Instant,
}

/// A scripted answer: status, headers, body.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn status(status: u16) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn header(mut self, name: &'static str, value: &str) -> Answer {
        self.headers.push((name, value.to_owned()));
        self
    }

    fn body(mut self, body: &[u8]) -> Answer {
        self.body = body.to_vec();
        self
    }
}

#[derive(Default)]
struct Service {
    got: Mutex<Vec<Got>>,
    /// Answers per event id, in turn; a plain 200 once used up.
    script: Mutex<HashMap<String, VecDeque<Answer>>>,
    /// How long each answer takes after the request was recorded: paces a stream so that a
    /// test can act while it is under way (never an assertion on speed).
    delay: Duration,
    /// Paths whose requests are recorded but not answered until `release`.
    held: Mutex<HashSet<String>>,
    released: tokio::sync::watch::Sender<bool>,
}

impl Service {
    /// Serves every path on 127.0.0.1:0; the base URL (`http://127.0.0.1:<port>`).
    async fn start(delay: Duration) -> (Arc<Service>, String) {
        let state = Arc::new(Service {
            delay,
            ..Service::default()
        });
        let app = axum::Router::new()
            .fallback(axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (state, format!("http://127.0.0.1:{port}"))
    }

    fn script(&self, id: &str, answers: impl IntoIterator<Item = Answer>) {
        self.script
            .lock()
            .unwrap()
            .insert(id.to_owned(), answers.into_iter().collect());
    }

    /// Requests to `path` are recorded, then wait for `release` before they are answered.
    fn hold(&self, path: &str) {
        self.held.lock().unwrap().insert(path.to_owned());
    }

    fn release(&self) {
        self.released.send_replace(true);
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    fn count(&self, id: &str) -> usize {
        self.got().iter().filter(|g| g.id == id).count()
    }
}

async fn receive(
    State(s): State<Arc<Service>>,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let id = text("ce-id");
    let answer = s
        .script
        .lock()
        .unwrap()
        .get_mut(&id)
        .and_then(VecDeque::pop_front)
        .unwrap_or(Answer::status(200));
    s.got.lock().unwrap().push(Got {
        path: uri.path().to_owned(),
        ty: text("ce-type"),
        id,
        headers: headers.clone(),
        body: body.to_vec(),
        at: Instant::now(),
    });
    if s.held.lock().unwrap().contains(uri.path()) {
        let _ = s.released.subscribe().wait_for(|released| *released).await;
    }
    if !s.delay.is_zero() {
        tokio::time::sleep(s.delay).await;
    }
    let mut response = Response::builder().status(answer.status);
    for (name, value) in &answer.headers {
        response = response.header(*name, value);
    }
    response.body(axum::body::Body::from(answer.body)).unwrap()
}

/// The service on 127.0.0.1:0 answering statuses from `script`; its URL (`/events`).
async fn service(script: &[(&str, &[u16])]) -> (Arc<Service>, String) {
    let (state, base) = Service::start(Duration::ZERO).await;
    for (id, statuses) in script {
        state.script(id, statuses.iter().map(|s| Answer::status(*s)));
    }
    (state, format!("{base}/events"))
}

fn deliveries_file(dir: &tempfile::TempDir, toml: &str) -> String {
    deliveries_file_named(dir, "deliveries.toml", toml)
}

fn deliveries_file_named(dir: &tempfile::TempDir, name: &str, toml: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, toml).unwrap();
    path.display().to_string()
}

async fn sidecar(broker: &Broker, file: &str) -> Sidecar {
    sidecar_with(broker, file, &[]).await
}

/// Set (to anything) to have librdkafka's consumer group log (`debug=cgrp`) in the sidecars'
/// logs, and the tests that look at groups print them.
const GROUP_LOG: &str = "EVENTWIRE_TEST_GROUP_LOG";

fn group_log() -> bool {
    std::env::var_os(GROUP_LOG).is_some()
}

/// With extra `serve` flags, e.g. `["--kafka", "session.timeout.ms=6000"]`.
async fn sidecar_with(broker: &Broker, file: &str, extra: &[&str]) -> Sidecar {
    let mut args = vec!["--deliveries-file", file, "--push-fetch-wait-ms", "50"];
    args.extend_from_slice(extra);
    let mut env = Vec::new();
    if group_log() {
        args.extend(["--kafka", "debug=cgrp"]);
        env.push(("EVENTWIRE_LOG", "info,librdkafka=debug"));
    }
    Sidecar::start_with_env(&broker.bootstrap(), &args, &env).await
}

async fn wait_for(svc: &Arc<Service>, what: &str, done: impl Fn(&[Got]) -> bool) {
    wait_for_within(svc, what, WAIT, done).await;
}

async fn wait_for_within(
    svc: &Arc<Service>,
    what: &str,
    limit: Duration,
    done: impl Fn(&[Got]) -> bool,
) {
    wait_until(what, limit, || {
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

/// `n` events numbered from `from`, spread over `keys` keys: `(key, id)` with ids
/// `<key>-<number>`, the number rising in produce order.
fn numbered(from: usize, n: usize, keys: usize) -> Vec<(String, String)> {
    (from..from + n)
        .map(|i| {
            let key = format!("k{:02}", i % keys);
            let id = format!("{key}-{i:04}");
            (key, id)
        })
        .collect()
}

fn key_of(id: &str) -> &str {
    id.split('-').next().unwrap_or_default()
}

/// Produces `(key, id)` events; where each landed, by id.
async fn produce_numbered(
    bootstrap: &str,
    topic: &str,
    events: &[(String, String)],
) -> HashMap<String, (i32, i64)> {
    let tuples: Vec<(&str, &str, &str, &str)> = events
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
    let placed = produce_events_placed(bootstrap, topic, &tuples).await;
    events
        .iter()
        .map(|(_, id)| id.clone())
        .zip(placed)
        .collect()
}

/// The ids among `got`, each once.
fn distinct(got: &[Got]) -> HashSet<&str> {
    got.iter().map(|g| g.id.as_str()).collect()
}

/// Each key's events were first delivered in the order produced, and every event was.
fn assert_first_deliveries_in_key_order(got: &[Got], produced: &[(String, String)]) {
    let mut seen = HashSet::new();
    let mut firsts: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for g in got {
        if seen.insert(g.id.as_str()) {
            firsts.entry(key_of(&g.id)).or_default().push(&g.id);
        }
    }
    let mut want: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (key, id) in produced {
        want.entry(key.as_str()).or_default().push(id);
    }
    for (key, ids) in &want {
        assert_eq!(
            firsts.get(key),
            Some(ids),
            "first deliveries of key {key} (left) against the order produced (right)"
        );
    }
    assert_eq!(
        firsts.len(),
        want.len(),
        "keys delivered that were never produced"
    );
}

/// Every id `at most` times among `got`; the ones beyond, with their counts.
fn over(got: &[Got], most: usize) -> BTreeMap<&str, usize> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for g in got {
        *counts.entry(g.id.as_str()).or_default() += 1;
    }
    counts.retain(|_, n| *n > most);
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_killed_mid_stream_resumes_from_the_committed_offsets_and_loses_nothing() {
    killed_mid_stream("partition").await;
}

// The same with the keys of a partition side by side: the commit trails the lowest offset
// not done with, so nothing above it is skipped after the kill either.
#[tokio::test(flavor = "multi_thread")]
async fn with_key_ordering_a_killed_sidecar_loses_nothing_either() {
    killed_mid_stream("key").await;
}

async fn killed_mid_stream(ordering: &str) {
    const N: usize = 300;
    let started = Instant::now();
    let broker = Broker::start().await;
    let topic = topic("deliver-kill");
    broker.create_topic(&topic, 4).await;
    // Each answer takes 10 ms, so the stream lasts long enough for a kill to fall inside it.
    let (svc, base) = Service::start(Duration::from_millis(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let group = format!("{topic}-group");
    let group = group.as_str();
    let file = deliveries_file(
        &dir,
        &format!(
            "[[delivery]]\nname = \"kill\"\ntopic = \"{topic}\"\nurl = \"{base}/events\"\n\
             group = \"{group}\"\nordering = \"{ordering}\"\n"
        ),
    );
    // A restarted sidecar joins as a new member: it gets partitions once the killed one's
    // session timed out (librdkafka's default, 45 s), so a short one here.
    let mut sidecar = sidecar_with(&broker, &file, &["--kafka", "session.timeout.ms=6000"]).await;

    let events = numbered(0, N, 20);
    let producing = {
        let (bootstrap, topic, events) = (broker.bootstrap(), topic.clone(), events.clone());
        tokio::spawn(async move { produce_numbered(&bootstrap, &topic, &events).await })
    };
    wait_for(&svc, "a third of the events delivered", |got| {
        distinct(got).len() >= N / 3
    })
    .await;
    sidecar.proc.kill9();
    let committed = tokio::task::block_in_place(|| broker.committed_offsets(group, &topic));
    let placed = producing.await.unwrap();
    let partitions: HashSet<i32> = placed.values().map(|(p, _)| *p).collect();
    assert!(
        partitions.len() >= 3,
        "the keys should spread over the partitions: {partitions:?}"
    );
    // Everything the killed sidecar sent has arrived by now (its requests were written before
    // the kill; the broker round trip above took longer): what follows is the new process's.
    let before = svc.got();
    let delivered_before = distinct(&before);
    assert!(
        delivered_before.len() < N,
        "every event was delivered before the kill: it did not fall mid-stream"
    );
    assert!(
        committed.values().any(|next| *next > 0),
        "nothing committed after {} deliveries: {committed:?}",
        before.len()
    );
    // An offset is committed only once its event was done with.
    for (id, (partition, offset)) in &placed {
        if *offset < committed.get(partition).copied().unwrap_or(0) {
            assert!(
                delivered_before.contains(id.as_str()),
                "{id} (partition {partition}, offset {offset}) is below the committed {committed:?} \
                 but was never delivered"
            );
        }
    }
    assert_eq!(
        over(&before, 1),
        BTreeMap::new(),
        "delivered twice before the kill"
    );

    sidecar.restart().await;
    // Generous: the group may wait for the killed member's session to time out.
    wait_for_within(
        &svc,
        "every event delivered after the restart",
        WAIT * 4,
        |got| distinct(got).len() >= N,
    )
    .await;
    tokio::time::sleep(QUIET).await;
    let got = svc.got();
    let after = &got[before.len()..];

    let all: HashSet<&str> = distinct(&got);
    let produced: HashSet<&str> = events.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(all, produced, "every event delivered, nothing else");
    assert_eq!(
        over(after, 1),
        BTreeMap::new(),
        "delivered twice after the restart"
    );
    // The restarted sidecar resumed at the committed offsets: whatever it delivered again had
    // not been committed at the kill (it was in flight, or its commit had not landed).
    for g in after {
        let (partition, offset) = placed[&g.id];
        let next = committed.get(&partition).copied().unwrap_or(0);
        assert!(
            offset >= next,
            "{} (partition {partition}, offset {offset}) delivered after the restart although \
             the partition was committed up to {next}",
            g.id
        );
    }
    let duplicates: Vec<&str> = distinct(after)
        .intersection(&delivered_before)
        .copied()
        .collect();
    println!(
        "ordering {ordering}: duplicates: {} of {N} (delivered before the kill: {}, committed at \
         the kill: {committed:?}, took {:?})",
        duplicates.len(),
        delivered_before.len(),
        started.elapsed()
    );
    if group_log() {
        println!("---- sidecar ----\n{}", sidecar.proc.log_text());
    }
    assert_first_deliveries_in_key_order(&got, &events);
    let committed = tokio::task::block_in_place(|| broker.committed_offsets(group, &topic));
    assert_eq!(
        committed,
        ends(&placed),
        "committed offsets at the end (left), the partitions' ends (right)"
    );
}

/// Each partition's end (its last offset + 1) among `placed`.
fn ends(placed: &HashMap<String, (i32, i64)>) -> BTreeMap<i32, i64> {
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for (partition, offset) in placed.values() {
        let end = ends.entry(*partition).or_default();
        *end = (*end).max(offset + 1);
    }
    ends
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_is_waited_before_the_next_attempt() {
    let broker = Broker::start().await;
    let topic = topic("deliver-retry-after");
    broker.create_topic(&topic, 1).await;
    let (svc, base) = Service::start(Duration::ZERO).await;
    svc.script(
        "ra-1",
        [
            Answer::status(503).header("retry-after", "2"),
            Answer::status(200),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    // Without the header the retry would come within 50 ms (full jitter up to the backoff).
    let file = deliveries_file(
        &dir,
        &format!(
            "[[delivery]]\nname = \"ra\"\ntopic = \"{topic}\"\nurl = \"{base}/events\"\n\
             initial_backoff_ms = 50\nmax_backoff_ms = 20000\n"
        ),
    );
    let _sidecar = sidecar(&broker, &file).await;
    produce_events(
        &broker.bootstrap(),
        &topic,
        &[("a", "ra-1", "com.example.t", "s")],
    )
    .await;

    wait_for(&svc, "ra-1 attempted twice", |got| {
        got.iter().filter(|g| g.id == "ra-1").count() >= 2
    })
    .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(svc.count("ra-1"), 2, "one 503, then delivered once more");
    let at: Vec<Instant> = svc.got().iter().map(|g| g.at).collect();
    let gap = at[1] - at[0];
    assert!(
        gap >= Duration::from_secs(2),
        "the retry came {gap:?} after the 503 with Retry-After: 2"
    );
    assert!(
        gap < Duration::from_secs(15),
        "the retry came only after {gap:?}"
    );
}

// More events than a lane queues before its partition is paused (and no longer fetched): the
// lag must come from the broker's end offset, not from what the consumer happened to fetch.
#[tokio::test(flavor = "multi_thread")]
async fn the_lag_counts_every_event_not_done_with_and_falls_to_zero() {
    const EVENTS: usize = 150;
    let broker = Broker::start().await;
    let topic = topic("deliver-lag");
    broker.create_topic(&topic, 1).await;
    let (svc, base) = Service::start(Duration::ZERO).await;
    svc.hold("/held");
    let dir = tempfile::tempdir().unwrap();
    let file = deliveries_file(
        &dir,
        &format!("[[delivery]]\nname = \"lag\"\ntopic = \"{topic}\"\nurl = \"{base}/held\"\n"),
    );
    let sidecar = sidecar(&broker, &file).await;
    let lag = || async {
        sidecar
            .metrics()
            .await
            .get("eventwire_delivery_lag", &[("delivery", "lag")])
    };
    let events: Vec<(String, String)> = (0..EVENTS)
        .map(|i| (format!("k{}", i % 7), format!("lag-{i}")))
        .collect();
    produce_numbered(&broker.bootstrap(), &topic, &events).await;

    wait_for(&svc, "the first event, held", |got| !got.is_empty()).await;
    wait_until(
        "a lag of every event (the one in hand too)",
        WAIT,
        || async { lag().await == Some(EVENTS as f64) },
    )
    .await;
    svc.release();
    wait_for(&svc, "every event delivered", |got| got.len() >= EVENTS).await;
    wait_until("the lag back to zero", WAIT, || async {
        lag().await == Some(0.0)
    })
    .await;
}

// `ordering = "key"`: a retried event holds back only its own key; the other keys of its
// partition go past it, each key still in order, and the commit reaches the end.
#[tokio::test(flavor = "multi_thread")]
async fn key_ordering_lets_other_keys_pass_a_retried_event() {
    let broker = Broker::start().await;
    let topic = topic("deliver-by-key");
    broker.create_topic(&topic, 1).await;
    let (svc, url) = service(&[("a-1", &[503, 503, 503])]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = deliveries_file(
        &dir,
        &format!(
            "[[delivery]]\nname = \"bykey\"\ntopic = \"{topic}\"\nurl = \"{url}\"\n\
             ordering = \"key\"\ninitial_backoff_ms = 300\nmax_backoff_ms = 300\n"
        ),
    );
    let _sidecar = sidecar(&broker, &file).await;
    let events = [
        ("a", "a-1", "t", "s"),
        ("b", "b-1", "t", "s"),
        ("a", "a-2", "t", "s"),
        ("b", "b-2", "t", "s"),
        ("c", "c-1", "t", "s"),
    ];
    produce_events(&broker.bootstrap(), &topic, &events).await;
    wait_for(&svc, "a-2 delivered", |got| {
        got.iter().any(|g| g.id == "a-2")
    })
    .await;
    tokio::time::sleep(QUIET).await;

    let got = svc.got();
    let at =
        |id: &str| -> Vec<Instant> { got.iter().filter(|g| g.id == id).map(|g| g.at).collect() };
    assert_eq!(at("a-1").len(), 4, "three 503s, then delivered");
    for id in ["b-1", "a-2", "b-2", "c-1"] {
        assert_eq!(at(id).len(), 1, "{id} delivered once");
    }
    let a1_done = at("a-1")[3];
    for id in ["b-1", "b-2", "c-1"] {
        assert!(at(id)[0] < a1_done, "{id} waited for a-1 of another key");
    }
    assert!(at("b-1")[0] < at("b-2")[0], "b in order");
    assert!(at("a-2")[0] > a1_done, "a-2 only after a-1 was done with");
    // Commits are async: the last one may trail the last answer a little.
    let committed = || {
        let offsets = broker.committed_offsets("eventwire-delivery-bykey", &topic);
        async move { offsets.get(&0) == Some(&5) }
    };
    wait_until("offset 5 (after all five) committed", WAIT, || {
        tokio::task::block_in_place(committed)
    })
    .await;
}

/// Waits until the sidecar's log has `line` `times` times (a reload is done when it says so).
async fn logged(sidecar: &Sidecar, line: &str, times: usize) {
    wait_until(&format!("{line:?} logged {times} times"), WAIT, || {
        let n = sidecar.proc.log_text().matches(line).count();
        async move { n >= times }
    })
    .await;
}

// The deliveries file is followed while the sidecar runs: a changed delivery starts again
// with its new settings from its committed offset, a new one starts, a broken file changes
// nothing (and says which field), a removed one stops.
#[tokio::test(flavor = "multi_thread")]
async fn the_deliveries_file_is_followed_without_a_restart() {
    let broker = Broker::start().await;
    let (orders, payments) = (topic("reload-orders"), topic("reload-payments"));
    for t in [&orders, &payments] {
        broker.create_topic(t, 1).await;
    }
    let (svc, base) = Service::start(Duration::ZERO).await;
    let delivery = |name: &str, topic: &str, path: &str| {
        format!("[[delivery]]\nname = \"{name}\"\ntopic = \"{topic}\"\nurl = \"{base}{path}\"\n")
    };
    let dir = tempfile::tempdir().unwrap();
    let file = deliveries_file(&dir, &delivery("orders", &orders, "/one"));
    let sidecar = sidecar(&broker, &file).await;
    let bootstrap = broker.bootstrap();
    let send = |topic: &str, id: &str| {
        let (bootstrap, topic, id) = (bootstrap.clone(), topic.to_owned(), id.to_owned());
        async move { produce_events(&bootstrap, &topic, &[("k", &id, "com.example.t", "s")]).await }
    };
    // By id: the two deliveries run side by side.
    let paths = |svc: &Service| -> Vec<(String, String)> {
        let mut got: Vec<_> = svc
            .got()
            .iter()
            .map(|g| (g.id.clone(), g.path.clone()))
            .collect();
        got.sort();
        got
    };

    send(&orders, "ev-1").await;
    wait_for(&svc, "ev-1", |got| !got.is_empty()).await;

    // `orders` moves to /two; `payments` is new.
    let both = delivery("orders", &orders, "/two") + &delivery("payments", &payments, "/three");
    std::fs::write(&file, &both).unwrap();
    logged(
        &sidecar,
        "delivery changed: started again with its new settings",
        1,
    )
    .await;
    send(&orders, "ev-2").await;
    send(&payments, "ev-3").await;
    wait_for(&svc, "ev-2 and ev-3", |got| got.len() >= 3).await;

    // A typo: refused whole, naming the field; both deliveries go on as they were.
    std::fs::write(&file, both.replace("url =", "uri =")).unwrap();
    logged(&sidecar, "deliveries file not reloaded", 1).await;
    let log = sidecar.proc.log_text();
    assert!(log.contains("delivery[0].uri"), "the field is named: {log}");
    send(&orders, "ev-4").await;
    wait_for(&svc, "ev-4", |got| got.len() >= 4).await;

    // `orders` removed: it stops; `payments` goes on.
    std::fs::write(&file, delivery("payments", &payments, "/three")).unwrap();
    logged(&sidecar, "delivery removed from the deliveries file", 1).await;
    send(&orders, "ev-5").await;
    send(&payments, "ev-6").await;
    wait_for(&svc, "ev-6", |got| got.iter().any(|g| g.id == "ev-6")).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        paths(&svc),
        [
            ("ev-1", "/one"),
            ("ev-2", "/two"),
            ("ev-3", "/three"),
            ("ev-4", "/two"),
            ("ev-6", "/three"),
        ]
        .map(|(id, path)| (id.to_owned(), path.to_owned())),
        "each event once, by the settings in force; none of a removed delivery"
    );
    let m = sidecar.metrics().await;
    let reloads = |outcome| m.get("eventwire_delivery_reloads_total", &[("outcome", outcome)]);
    assert_eq!(
        (reloads("applied"), reloads("refused")),
        (Some(2.0), Some(1.0))
    );
}

/// Polls `check` until it holds or `limit` passed; whether it held.
async fn within(limit: Duration, check: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// A partition's deliveries in arrival order, cut into runs of one sidecar (URL path) each:
/// `(path, offsets)`.
type Runs<'a> = Vec<(&'a str, Vec<i64>)>;

fn runs<'a>(got: &'a [Got], placed: &HashMap<String, (i32, i64)>) -> BTreeMap<i32, Runs<'a>> {
    let mut runs: BTreeMap<i32, Runs> = BTreeMap::new();
    for g in got {
        let (partition, offset) = placed[&g.id];
        let partition = runs.entry(partition).or_default();
        match partition.last_mut() {
            Some((path, offsets)) if *path == g.path => offsets.push(offset),
            _ => partition.push((&g.path, vec![offset])),
        }
    }
    runs
}

/// One line per run: `/a 0..=29 (30)`, and where it is not one offset after the other.
fn show_runs(runs: &BTreeMap<i32, Runs>) -> String {
    let mut text = String::new();
    for (partition, runs) in runs {
        let shown: Vec<String> = runs
            .iter()
            .map(|(path, offsets)| {
                let ordered = offsets.windows(2).all(|w| w[1] == w[0] + 1);
                format!(
                    "{path} {}..={} ({}{})",
                    offsets[0],
                    offsets[offsets.len() - 1],
                    offsets.len(),
                    if ordered { "" } else { ", not consecutive" }
                )
            })
            .collect();
        text.push_str(&format!("\n  partition {partition}: {}", shown.join(", ")));
    }
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sidecars_in_one_group_share_the_partitions() {
    const FIRST: usize = 120;
    const SECOND: usize = 120;
    let started = Instant::now();
    let broker = Broker::start().await;
    let topic = topic("deliver-shared");
    let group = "deliver-shared-group";
    broker.create_topic(&topic, 4).await;
    let (svc, base) = Service::start(Duration::from_millis(5)).await;
    // The first sidecar's requests wait until the second one has joined: it is in the middle
    // of its partitions, with more of them queued, when they are shared out.
    svc.hold("/a");
    let dir = tempfile::tempdir().unwrap();
    let file = |path: &str| {
        deliveries_file_named(
            &dir,
            &format!("{path}.toml"),
            &format!(
                "[[delivery]]\nname = \"shared\"\ntopic = \"{topic}\"\nurl = \"{base}/{path}\"\n\
                 group = \"{group}\"\n"
            ),
        )
    };
    let sidecar_a = sidecar(&broker, &file("a")).await;

    let first = numbered(0, FIRST, 16);
    let mut placed = produce_numbered(&broker.bootstrap(), &topic, &first).await;
    let partitions: HashSet<i32> = placed.values().map(|(p, _)| *p).collect();
    assert_eq!(partitions.len(), 4, "the keys should cover the partitions");
    wait_for(
        &svc,
        "the first sidecar to send each partition's first event",
        |got| got.len() >= 4,
    )
    .await;

    let sidecar_b = sidecar(&broker, &file("b")).await;
    let b_delivered = || svc.got().iter().any(|g| g.path == "/b");
    // Bounded: a sidecar that waited for its request in flight before giving a partition
    // up would hold the handover until the release below.
    let b_while_a_held = within(WAIT, b_delivered).await;
    let held = svc.got().iter().filter(|g| g.path == "/a").count();
    svc.release();
    let second = numbered(FIRST, SECOND, 16);
    placed.extend(produce_numbered(&broker.bootstrap(), &topic, &second).await);
    let events: Vec<(String, String)> = first.iter().chain(&second).cloned().collect();

    wait_for_within(&svc, "every event delivered", WAIT * 4, |got| {
        distinct(got).len() >= FIRST + SECOND
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let got = svc.got();
    let committed = tokio::task::block_in_place(|| broker.committed_offsets(group, &topic));
    let took = started.elapsed();

    let runs = runs(&got, &placed);
    let count = |path: &str| got.iter().filter(|g| g.path == path).count();
    println!(
        "deliveries: /a {}, /b {} ({} duplicates) of {} events; /a had {held} requests held, \
         /b delivered {} while they were; committed at the end: {committed:?}; took {took:?}; \
         per partition, in arrival order: {}",
        count("/a"),
        count("/b"),
        got.len() - FIRST - SECOND,
        FIRST + SECOND,
        if b_while_a_held { "some" } else { "nothing" },
        show_runs(&runs)
    );
    if group_log() {
        for (name, s) in [("a", &sidecar_a), ("b", &sidecar_b)] {
            println!("---- sidecar {name} ----\n{}", s.proc.log_text());
        }
    }

    let all: HashSet<&str> = distinct(&got);
    let produced: HashSet<&str> = events.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(all, produced, "every event delivered, nothing else");
    assert!(
        count("/a") > held,
        "the first sidecar delivered nothing after the release"
    );
    assert!(
        count("/b") > 0,
        "the second sidecar delivered nothing: the group did not share the partitions"
    );
    // One sidecar at a time per partition: one run, or two when the partition was handed
    // over as the second sidecar joined. Within a run, one offset after the other, except
    // that a sidecar keeping the partition through the rebalance may resume once from the
    // committed offset (repeating the event it had in flight).
    for (partition, runs) in &runs {
        assert!(
            runs.len() <= 2,
            "partition {partition} went back and forth between the sidecars:{}",
            show_runs(&BTreeMap::from([(*partition, runs.clone())]))
        );
        for (path, offsets) in runs {
            let skips = offsets.windows(2).any(|w| w[1] > w[0] + 1);
            let resumes = offsets.windows(2).filter(|w| w[1] <= w[0]).count();
            assert!(
                !skips && resumes <= 1,
                "partition {partition}: {path} delivered out of order: {offsets:?}"
            );
        }
    }
    assert_first_deliveries_in_key_order(&got, &events);
    // Every event done with is committed, by whichever sidecar owns its partition now.
    assert_eq!(
        committed,
        ends(&placed),
        "committed offsets at the end (left), the partitions' ends (right)"
    );
}

/// Writes one record with exactly these headers.
async fn produce_record(
    bootstrap: &str,
    topic: &str,
    key: &str,
    headers: &[(&str, &str)],
    value: &[u8],
) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut owned = OwnedHeaders::new();
    for (name, value) in headers {
        owned = owned.insert(Header {
            key: name,
            value: Some(*value),
        });
    }
    let record = FutureRecord::to(topic)
        .key(key)
        .payload(value)
        .headers(owned);
    producer
        .send(record, Duration::from_secs(30))
        .await
        .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
}

/// The attributes of a test event, binary mode.
fn ce_headers<'a>(id: &'a str, ty: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("ce_specversion", "1.0"),
        ("ce_id", id),
        ("ce_source", "/orders"),
        ("ce_type", ty),
        ("content-type", "application/json"),
    ]
}

// Reply events (`reply_topic`, `reply_topic_by_type`), their data held to `--schema-dir`.
#[tokio::test(flavor = "multi_thread")]
async fn cloudevent_answers_are_published_as_replies_and_other_answers_are_not() {
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const AUTHORIZED: &str = "https://example.com/schemas/payment-authorized/v1";
    // Odd spacing and a non-ASCII character: byte-exact means byte-exact.
    const BINARY_DATA: &[u8] =
        "{ \"authorized\" : true,\n  \"amount\": 12.50, \"note\": \"ü\" }".as_bytes();
    let broker = Broker::start().await;
    let topic = topic("deliver-reply");
    let replies = format!("{topic}.replies");
    let declined = format!("{topic}.declined");
    for t in [&topic, &replies, &declined] {
        broker.create_topic(t, 1).await;
    }
    let (svc, base) = Service::start(Duration::ZERO).await;
    // A 2xx that is not a CloudEvent: nothing is published.
    svc.script(
        "plain-1",
        [Answer::status(200)
            .header("content-type", "application/json")
            .body(br#"{"ok":true}"#)],
    );
    // Binary mode, no traceparent of its own.
    svc.script(
        "bin-1",
        [Answer::status(201)
            .header("ce-specversion", "1.0")
            .header("ce-id", "reply-bin-1")
            .header("ce-source", "/billing")
            .header("ce-type", "com.example.payment.authorized")
            .header("ce-dataschema", AUTHORIZED)
            .header("content-type", "application/json")
            .body(BINARY_DATA)],
    );
    // A reply whose data breaks the schema it names: refused like an ingested event.
    svc.script(
        "bad-1",
        [Answer::status(200)
            .header("ce-specversion", "1.0")
            .header("ce-id", "reply-bad-1")
            .header("ce-source", "/billing")
            .header("ce-type", "com.example.payment.authorized")
            .header("ce-dataschema", AUTHORIZED)
            .header("content-type", "application/json")
            .body(br#"{"authorized":"yes"}"#)],
    );
    // Structured mode, of a type routed to its own topic.
    svc.script(
        "struct-1",
        [Answer::status(200)
            .header("content-type", "application/cloudevents+json")
            .body(
                br#"{"specversion":"1.0","id":"reply-struct-1","source":"/billing","type":"com.example.payment.declined","datacontenttype":"application/json","data":{"reason":"limit","amount":12.5}}"#,
            )],
    );
    let dir = tempfile::tempdir().unwrap();
    let file = deliveries_file(
        &dir,
        &format!(
            "[[delivery]]\nname = \"reply\"\ntopic = \"{topic}\"\nurl = \"{base}/events\"\n\
             reply_topic = \"{replies}\"\n\
             reply_topic_by_type = {{ \"com.example.payment.declined\" = \"{declined}\" }}\n"
        ),
    );
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    std::fs::write(
        schemas.join("payment-authorized.json"),
        format!(
            r#"{{"$id":"{AUTHORIZED}","type":"object","required":["authorized"],"properties":{{"authorized":{{"type":"boolean"}}}}}}"#
        ),
    )
    .unwrap();
    let schema_dir = schemas.display().to_string();
    let sidecar = sidecar_with(&broker, &file, &["--schema-dir", &schema_dir]).await;

    // One partition, in this order: once the binary reply is on `replies`, the plain answer
    // before it was handled long since.
    let bootstrap = broker.bootstrap();
    let plain = ce_headers("plain-1", "com.example.order.placed");
    produce_record(&bootstrap, &topic, "ord-plain", &plain, br#"{"n":1}"#).await;
    let mut traced = ce_headers("bin-1", "com.example.order.placed");
    traced.push(("ce_traceparent", TRACEPARENT));
    produce_record(&bootstrap, &topic, "ord-bin", &traced, br#"{"n":2}"#).await;
    let structured = ce_headers("struct-1", "com.example.order.placed");
    produce_record(&bootstrap, &topic, "ord-struct", &structured, br#"{"n":3}"#).await;
    let bad = ce_headers("bad-1", "com.example.order.placed");
    produce_record(&bootstrap, &topic, "ord-bad", &bad, br#"{"n":4}"#).await;

    wait_for(&svc, "all four events delivered", |got| got.len() >= 4).await;
    let order: Vec<String> = svc.got().iter().map(|g| g.id.clone()).collect();
    assert_eq!(order, ["plain-1", "bin-1", "struct-1", "bad-1"]);
    let replies_total = |outcome: &'static str| {
        let sidecar = &sidecar;
        async move {
            sidecar.metrics().await.get(
                "eventwire_delivery_replies_total",
                &[("delivery", "reply"), ("outcome", outcome)],
            )
        }
    };
    wait_until("the refused reply to be counted", WAIT, || async {
        replies_total("invalid").await == Some(1.0)
    })
    .await;
    assert_eq!(replies_total("published").await, Some(2.0));

    let on_replies = tokio::task::block_in_place(|| broker.records_settled(&replies, 1, WAIT));
    assert_eq!(
        on_replies.len(),
        1,
        "only the binary CloudEvent answer is a reply on {replies}: {on_replies:?}"
    );
    let r = &on_replies[0];
    assert_eq!(r.key_str(), Some("ord-bin"), "the original record's key");
    assert_eq!(r.header("ce_id"), Some("reply-bin-1"));
    assert_eq!(r.header("ce_specversion"), Some("1.0"));
    assert_eq!(r.header("ce_source"), Some("/billing"));
    assert_eq!(r.header("ce_type"), Some("com.example.payment.authorized"));
    assert_eq!(r.header("ce_causationid"), Some("bin-1"));
    assert_eq!(r.header("ce_dataschema"), Some(AUTHORIZED));
    assert_eq!(
        r.header("ce_traceparent"),
        Some(TRACEPARENT),
        "the original's traceparent, as the reply carried none"
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.value.as_deref(), Some(BINARY_DATA), "data byte-exact");

    let on_declined = tokio::task::block_in_place(|| broker.records_settled(&declined, 1, WAIT));
    assert_eq!(
        on_declined.len(),
        1,
        "the structured answer, routed by its type to {declined}: {on_declined:?}"
    );
    let r = &on_declined[0];
    assert_eq!(r.key_str(), Some("ord-struct"));
    assert_eq!(r.header("ce_id"), Some("reply-struct-1"));
    assert_eq!(r.header("ce_type"), Some("com.example.payment.declined"));
    assert_eq!(r.header("ce_source"), Some("/billing"));
    assert_eq!(r.header("ce_causationid"), Some("struct-1"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.value.as_deref(),
        Some(&br#"{"reason":"limit","amount":12.5}"#[..]),
        "the structured event's data, byte-exact"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn structured_content_mode_sends_the_json_event_format() {
    let broker = Broker::start().await;
    let topic = topic("deliver-structured");
    broker.create_topic(&topic, 1).await;
    let (svc, url) = service(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = deliveries_file(
        &dir,
        &format!(
            "[[delivery]]\nname = \"structured\"\ntopic = \"{topic}\"\nurl = \"{url}\"\ncontent_mode = \"structured\"\n"
        ),
    );
    let _sidecar = sidecar(&broker, &file).await;
    let events = [
        ("ord-1", "s-1", "com.example.order.placed", "ord-1"),
        ("ord-2", "s-2", "com.example.order.placed", "ord-2"),
    ];
    produce_events(&broker.bootstrap(), &topic, &events).await;

    wait_for(&svc, "both events delivered", |got| got.len() >= 2).await;
    let got = svc.got();
    for (g, (key, id, ty, subject)) in got.iter().zip(events) {
        let header = |name: &str| g.headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(header("content-type"), Some("application/cloudevents+json"));
        assert_eq!(header("ce-id"), None, "no binary-mode headers");
        let event: serde_json::Value =
            serde_json::from_slice(&g.body).unwrap_or_else(|e| panic!("body not JSON: {e}"));
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], id);
        assert_eq!(event["type"], ty);
        assert_eq!(event["subject"], subject);
        assert_eq!(event["partitionkey"], key);
        // JSON data stays JSON inside the event.
        assert_eq!(event["data"]["id"], id, "{event}");
    }
}
