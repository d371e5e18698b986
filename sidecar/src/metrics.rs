//! `GET /metrics`: the sidecar's own measurements in the Prometheus text format (0.0.4).
//!
//! Counters and the produce histogram are recorded where things happen; what the sidecar
//! already keeps (spool, status store, broker liveness, replays, hub positions) is read from
//! its owner at each scrape ([`Observed`]) rather than tracked twice. Not behind ingest or
//! subscriber auth: it is scraped from inside the network, and the shipped proxies do not
//! route it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::problem::allow;

/// Topic series before further topics count together under [`OTHER_TOPICS`].
const MAX_TOPIC_SERIES: usize = 1000;
/// Not a valid Kafka topic name, so it never stands for one topic.
const OTHER_TOPICS: &str = "(other)";

pub use prometheus_client::metrics::counter::Counter as PushCounter;

/// From a local broker's 1 ms to the producer's retries; above 10 s is `+Inf`.
const PRODUCE_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriberLabels {
    topic: String,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LagLabels {
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    delivery: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryOutcomeLabels {
    delivery: String,
    outcome: &'static str,
}

/// From a local service's millisecond to the longest `timeout_ms` worth a bucket.
const DELIVERY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The handles of one delivery (`--deliveries-file`), resolved when it starts.
pub struct DeliveryMetrics {
    name: String,
    attempts: Family<DeliveryOutcomeLabels, Counter>,
    events: Family<DeliveryOutcomeLabels, Counter>,
    replies: Family<DeliveryOutcomeLabels, Counter>,
    duration: Histogram,
    lag: Gauge,
}

impl DeliveryMetrics {
    fn counter(&self, family: &Family<DeliveryOutcomeLabels, Counter>, outcome: &'static str) {
        family
            .get_or_create(&DeliveryOutcomeLabels {
                delivery: self.name.clone(),
                outcome,
            })
            .inc();
    }

    /// One POST and how it ended.
    pub fn attempt(&self, outcome: &crate::delivery::policy::Outcome, took: Duration) {
        self.duration.observe(took.as_secs_f64());
        self.counter(&self.attempts, outcome.label());
    }

    /// An event done with: `delivered`, `filtered`, `dead_lettered` or `dropped`.
    pub fn event(&self, outcome: &'static str) {
        self.counter(&self.events, outcome);
    }

    /// A reply: `published`, `invalid` or `unrouted`.
    pub fn reply(&self, outcome: &'static str) {
        self.counter(&self.replies, outcome);
    }

    /// Events not yet done with on the partitions this sidecar owns.
    pub fn set_lag(&self, events: i64) {
        self.lag.set(events);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// What the spool forwarder is doing; exported one-hot as `eventwire_forwarder_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ForwarderState {
    /// Nothing spooled to forward.
    Idle,
    /// Spooled records are with the producer and the broker is reachable.
    Forwarding,
    /// A delivery failed and is being retried, or the broker is unreachable while
    /// spooled records wait.
    WaitingForBroker,
    /// The forwarder has ended (shutdown).
    Stopped,
}

impl ForwarderState {
    const ALL: [ForwarderState; 4] = [
        ForwarderState::Idle,
        ForwarderState::Forwarding,
        ForwarderState::WaitingForBroker,
        ForwarderState::Stopped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ForwarderState::Idle => "idle",
            ForwarderState::Forwarding => "forwarding",
            ForwarderState::WaitingForBroker => "waiting_for_broker",
            ForwarderState::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> ForwarderState {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(ForwarderState::Stopped)
    }
}

/// The forwarder's state, written by the forwarder and read at scrape time.
#[derive(Debug, Default)]
pub struct ForwarderCell(AtomicU8);

impl ForwarderCell {
    pub fn set(&self, state: ForwarderState) {
        self.0.store(state as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> ForwarderState {
        ForwarderState::from_u8(self.0.load(Ordering::Relaxed))
    }
}

/// The per-topic ingest counters, resolved once per topic: the hot path then does one map
/// lookup by `&str`, without building a label set.
#[derive(Clone)]
struct TopicCounters {
    events: Counter,
    bytes: Counter,
}

impl TopicCounters {
    fn count(&self, bytes: usize) {
        self.events.inc();
        self.bytes.inc_by(bytes as u64);
    }
}

/// The push side's handles for one subscription, resolved when it starts.
pub struct SubscriptionMetrics {
    pub frames: Counter,
    pub slow_closed: Counter,
    subscribers: Gauge,
}

impl Drop for SubscriptionMetrics {
    fn drop(&mut self) {
        self.subscribers.dec();
    }
}

/// State the sidecar keeps anyway, copied into the gauges when `/metrics` is scraped.
pub trait Observed: Send + Sync {
    fn observe(&self, metrics: &Metrics);
}

/// Gauges set by [`Observed`] sources at scrape time.
pub struct Snapshot {
    pub in_flight: i64,
    pub spool_records: i64,
    pub spool_bytes: i64,
    pub idempotency_entries: i64,
    pub broker_up: bool,
    pub forwarder: ForwarderState,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    accepted: Counter,
    events: Family<TopicLabels, Counter>,
    bytes: Family<TopicLabels, Counter>,
    topics: RwLock<HashMap<String, TopicCounters>>,
    produce_duration: Histogram,
    produce_errors: Counter,
    in_flight: Gauge,
    spool_records: Gauge,
    spool_bytes: Gauge,
    forwarder: Family<StateLabels, Gauge>,
    broker_up: Gauge,
    idempotency_entries: Gauge,
    subscribers: Family<SubscriberLabels, Gauge>,
    frames: Family<TopicLabels, Counter>,
    slow_closed: Family<TopicLabels, Counter>,
    replays: Gauge,
    lag: Family<LagLabels, Gauge>,
    delivery_attempts: Family<DeliveryOutcomeLabels, Counter>,
    delivery_events: Family<DeliveryOutcomeLabels, Counter>,
    delivery_replies: Family<DeliveryOutcomeLabels, Counter>,
    delivery_duration: Family<DeliveryLabels, Histogram, fn() -> Histogram>,
    delivery_lag: Family<DeliveryLabels, Gauge>,
    delivery_reloads: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix("eventwire"),
            requests: Family::default(),
            accepted: Counter::default(),
            events: Family::default(),
            bytes: Family::default(),
            topics: RwLock::default(),
            produce_duration: Histogram::new(PRODUCE_BUCKETS),
            produce_errors: Counter::default(),
            in_flight: Gauge::default(),
            spool_records: Gauge::default(),
            spool_bytes: Gauge::default(),
            forwarder: Family::default(),
            broker_up: Gauge::default(),
            idempotency_entries: Gauge::default(),
            subscribers: Family::default(),
            frames: Family::default(),
            slow_closed: Family::default(),
            replays: Gauge::default(),
            lag: Family::default(),
            delivery_attempts: Family::default(),
            delivery_events: Family::default(),
            delivery_replies: Family::default(),
            delivery_duration: Family::new_with_constructor(|| Histogram::new(DELIVERY_BUCKETS)),
            delivery_lag: Family::default(),
            delivery_reloads: Family::default(),
        };
        m.register()
    }

    /// Every family is in the registry from the start, so a scrape shows each metric's
    /// HELP and TYPE even before its first sample.
    fn register(mut self) -> Metrics {
        let accepted = self.requests.get_or_create_owned(&OutcomeLabels {
            outcome: "accepted",
        });
        self.accepted = accepted;
        for state in ForwarderState::ALL {
            self.forwarder.get_or_create_owned(&StateLabels {
                state: state.label(),
            });
        }
        let r = &mut self.registry;
        r.register(
            "ingest_requests",
            "Answered POST /v1/events requests by outcome: accepted (any 2xx) or the slug of the problem type",
            self.requests.clone(),
        );
        r.register(
            "ingest_events",
            "Events made durable (published or spooled) by topic; a batch counts each event, a repeated id does not",
            self.events.clone(),
        );
        r.register(
            "ingest_bytes",
            "Bytes of the Kafka record values (the event data) of the events counted by eventwire_ingest_events_total",
            self.bytes.clone(),
        );
        r.register(
            "produce_duration_seconds",
            "Time from handing a record to the Kafka producer to the broker's acknowledgement (as the sidecar observes it)",
            self.produce_duration.clone(),
        );
        r.register(
            "produce_errors",
            "Failed delivery attempts: records the producer refused or the broker did not acknowledge (each failed retry counts)",
            self.produce_errors.clone(),
        );
        r.register(
            "events_in_flight",
            "Events not yet acknowledged by Kafka: being published directly plus spooled and not yet forwarded",
            self.in_flight.clone(),
        );
        r.register(
            "spool_records",
            "Events in the spool not yet forwarded to Kafka",
            self.spool_records.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes of spool records not yet forwarded to Kafka (the --spool-max-bytes measure)",
            self.spool_bytes.clone(),
        );
        r.register(
            "forwarder_state",
            "What the spool forwarder is doing, one-hot: idle, forwarding, waiting_for_broker or stopped",
            self.forwarder.clone(),
        );
        r.register(
            "broker_up",
            "1 while the producer's health probe gets broker metadata (what /readyz reports), else 0",
            self.broker_up.clone(),
        );
        r.register(
            "idempotency_entries",
            "Events in the status and idempotency store",
            self.idempotency_entries.clone(),
        );
        r.register(
            "subscribers",
            "Open push subscriptions by topic and transport (websocket or sse)",
            self.subscribers.clone(),
        );
        r.register(
            "push_frames_sent",
            "Events written to push subscribers by topic",
            self.frames.clone(),
        );
        r.register(
            "push_slow_clients_closed",
            "Push subscribers closed for falling behind (slow consumer or slow replay) by topic",
            self.slow_closed.clone(),
        );
        r.register(
            "push_replays_running",
            "Places among --max-replays in use: subscriptions replaying with their own consumer or resolving a start that may replay",
            self.replays.clone(),
        );
        r.register(
            "push_consumer_lag",
            "Records between the high watermark and the position of the topic's live fan-out consumer, by partition",
            self.lag.clone(),
        );
        r.register(
            "delivery_attempts",
            "POSTs to delivery services by delivery and outcome: 2xx, 3xx, 4xx, 5xx, other, timeout or connection_error",
            self.delivery_attempts.clone(),
        );
        r.register(
            "delivery_events",
            "Events a delivery is done with (their offset committed) by outcome: delivered, filtered, dead_lettered or dropped (given up without a dead_letter_topic)",
            self.delivery_events.clone(),
        );
        r.register(
            "delivery_replies",
            "Reply events of delivery services by outcome: published, invalid (not a valid CloudEvent, or its data refused by its schema) or unrouted (no topic for its type)",
            self.delivery_replies.clone(),
        );
        r.register(
            "delivery_duration_seconds",
            "Time from sending a delivery POST to the end of its answer (or the timeout, or the connection error), by delivery",
            self.delivery_duration.clone(),
        );
        r.register(
            "delivery_lag",
            "Events a delivery has not yet done with on the partitions this sidecar owns (high watermark minus the next offset to commit), measured every 5 s",
            self.delivery_lag.clone(),
        );
        r.register(
            "delivery_reloads",
            "Changes of the deliveries file (or a ca_file it names) by outcome: applied, or refused (the file does not parse; the running deliveries go on)",
            self.delivery_reloads.clone(),
        );
        self
    }

    /// The handles of the delivery named `name`.
    pub fn delivery(&self, name: &str) -> DeliveryMetrics {
        DeliveryMetrics {
            name: name.to_owned(),
            attempts: self.delivery_attempts.clone(),
            events: self.delivery_events.clone(),
            replies: self.delivery_replies.clone(),
            duration: self.delivery_duration.get_or_create_owned(&DeliveryLabels {
                delivery: name.to_owned(),
            }),
            lag: self.delivery_lag.get_or_create_owned(&DeliveryLabels {
                delivery: name.to_owned(),
            }),
        }
    }

    /// A change of the deliveries file: `applied` or `refused`.
    pub fn deliveries_reloaded(&self, outcome: &'static str) {
        self.delivery_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// An answered `POST /v1/events`: `None` is a 2xx, else the slug of the problem answered.
    pub fn ingest_answered(&self, refused: Option<&'static str>) {
        match refused {
            None => self.accepted.inc(),
            Some(outcome) => self
                .requests
                .get_or_create(&OutcomeLabels { outcome })
                .inc(),
        };
    }

    /// An event made durable for `topic`, with `bytes` of record value.
    pub fn event_accepted(&self, topic: &str, bytes: usize) {
        if let Some(c) = read(&self.topics).get(topic) {
            c.count(bytes);
            return;
        }
        self.topic_counters(topic).count(bytes);
    }

    #[cold]
    fn topic_counters(&self, topic: &str) -> TopicCounters {
        // A topic is admitted unchecked while the broker is unreachable (the spool takes
        // it): a client must not be able to grow the series without bound.
        let full = read(&self.topics).len() >= MAX_TOPIC_SERIES;
        let labels = TopicLabels {
            topic: if full { OTHER_TOPICS } else { topic }.to_owned(),
        };
        let counters = TopicCounters {
            events: self.events.get_or_create_owned(&labels),
            bytes: self.bytes.get_or_create_owned(&labels),
        };
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        topics.insert(labels.topic, counters.clone());
        counters
    }

    pub fn produced(&self, took: Duration) {
        self.produce_duration.observe(took.as_secs_f64());
    }

    pub fn produce_failed(&self) {
        self.produce_errors.inc();
    }

    /// The handles of a subscription starting now; it counts as a subscriber until dropped.
    pub fn subscription(&self, topic: &str, sse: bool) -> SubscriptionMetrics {
        let transport = if sse { "sse" } else { "websocket" };
        let labels = TopicLabels {
            topic: topic.to_owned(),
        };
        let subscribers = self.subscribers.get_or_create_owned(&SubscriberLabels {
            topic: labels.topic.clone(),
            transport,
        });
        subscribers.inc();
        SubscriptionMetrics {
            frames: self.frames.get_or_create_owned(&labels),
            slow_closed: self.slow_closed.get_or_create_owned(&labels),
            subscribers,
        }
    }

    /// The scrape-time gauges of the durable path.
    pub fn set_durable(&self, s: &Snapshot) {
        self.in_flight.set(s.in_flight);
        self.spool_records.set(s.spool_records);
        self.spool_bytes.set(s.spool_bytes);
        self.idempotency_entries.set(s.idempotency_entries);
        self.broker_up.set(i64::from(s.broker_up));
        for state in ForwarderState::ALL {
            let on = i64::from(state == s.forwarder);
            self.forwarder
                .get_or_create(&StateLabels {
                    state: state.label(),
                })
                .set(on);
        }
    }

    pub fn set_replays(&self, running: usize) {
        self.replays.set(running as i64);
    }

    /// The lag of every live hub; hubs that stopped since the last scrape drop out.
    pub fn set_consumer_lag(&self, lags: &[(&str, i32, i64)]) {
        self.lag.clear();
        for &(topic, partition, lag) in lags {
            let labels = LagLabels {
                topic: topic.to_owned(),
                partition,
            };
            self.lag.get_or_create(&labels).set(lag);
        }
    }

    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(8192);
        prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone)]
struct MetricsState {
    metrics: Arc<Metrics>,
    sources: Arc<[Arc<dyn Observed>]>,
}

/// `GET /metrics`, reading `sources` at each scrape.
pub fn router(metrics: Arc<Metrics>, sources: Vec<Arc<dyn Observed>>) -> Router {
    Router::new()
        .route("/metrics", get(scrape).fallback(allow("GET, HEAD")))
        .with_state(MetricsState {
            metrics,
            sources: sources.into(),
        })
}

async fn scrape(State(state): State<MetricsState>) -> Response {
    for source in state.sources.iter() {
        source.observe(&state.metrics);
    }
    match state.metrics.render() {
        Ok(text) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        // Writing to a String does not fail; should an encoder report an error, say so.
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventwire_contract::problem::Kind;

    const FAMILIES: [(&str, &str); 16] = [
        ("eventwire_ingest_requests_total", "counter"),
        ("eventwire_ingest_events_total", "counter"),
        ("eventwire_ingest_bytes_total", "counter"),
        ("eventwire_produce_duration_seconds", "histogram"),
        ("eventwire_produce_errors_total", "counter"),
        ("eventwire_events_in_flight", "gauge"),
        ("eventwire_spool_records", "gauge"),
        ("eventwire_spool_bytes", "gauge"),
        ("eventwire_forwarder_state", "gauge"),
        ("eventwire_broker_up", "gauge"),
        ("eventwire_idempotency_entries", "gauge"),
        ("eventwire_subscribers", "gauge"),
        ("eventwire_push_frames_sent_total", "counter"),
        ("eventwire_push_slow_clients_closed_total", "counter"),
        ("eventwire_push_replays_running", "gauge"),
        ("eventwire_push_consumer_lag", "gauge"),
    ];

    fn lines(m: &Metrics) -> Vec<String> {
        m.render().unwrap().lines().map(str::to_owned).collect()
    }

    fn has(m: &Metrics, line: &str) -> bool {
        lines(m).iter().any(|l| l == line)
    }

    fn snapshot(forwarder: ForwarderState) -> Snapshot {
        Snapshot {
            in_flight: 3,
            spool_records: 2,
            spool_bytes: 512,
            idempotency_entries: 7,
            broker_up: true,
            forwarder,
        }
    }

    /// Families with labels appear with their first series (the encoder skips empty ones).
    #[test]
    fn every_family_is_rendered_under_its_name() {
        let m = Metrics::new();
        m.event_accepted("orders", 1);
        let _sub = m.subscription("orders", false);
        m.set_consumer_lag(&[("orders", 0, 0)]);
        let types: Vec<String> = lines(&m)
            .into_iter()
            .filter(|l| l.starts_with("# TYPE "))
            .collect();
        let want: Vec<String> = FAMILIES
            .iter()
            .map(|(name, kind)| format!("# TYPE {name} {kind}"))
            .collect();
        assert_eq!(types, want);
        assert!(has(
            &m,
            r#"eventwire_ingest_requests_total{outcome="accepted"} 0"#
        ));
        assert!(has(
            &m,
            "eventwire_produce_duration_seconds_bucket{le=\"0.001\"} 0"
        ));
        assert!(has(
            &m,
            "eventwire_produce_duration_seconds_bucket{le=\"+Inf\"} 0"
        ));
    }

    #[test]
    fn the_forwarder_state_is_one_hot() {
        let m = Metrics::new();
        m.set_durable(&snapshot(ForwarderState::Forwarding));
        let states = |m: &Metrics| -> Vec<String> {
            lines(m)
                .into_iter()
                .filter(|l| l.starts_with("eventwire_forwarder_state{"))
                .filter(|l| l.ends_with(" 1"))
                .collect()
        };
        assert_eq!(
            states(&m),
            [r#"eventwire_forwarder_state{state="forwarding"} 1"#]
        );
        m.set_durable(&snapshot(ForwarderState::WaitingForBroker));
        assert_eq!(
            states(&m),
            [r#"eventwire_forwarder_state{state="waiting_for_broker"} 1"#]
        );
        assert!(has(
            &m,
            r#"eventwire_forwarder_state{state="forwarding"} 0"#
        ));
        assert!(has(&m, "eventwire_events_in_flight 3"));
        assert!(has(&m, "eventwire_spool_bytes 512"));
        assert!(has(&m, "eventwire_idempotency_entries 7"));
        assert!(has(&m, "eventwire_broker_up 1"));
        let cell = ForwarderCell::default();
        assert_eq!(cell.get(), ForwarderState::Idle);
        cell.set(ForwarderState::Stopped);
        assert_eq!(cell.get(), ForwarderState::Stopped);
    }

    #[test]
    fn ingest_counts_by_outcome_and_topic() {
        let m = Metrics::new();
        m.ingest_answered(None);
        m.ingest_answered(None);
        m.ingest_answered(Some(Kind::InvalidCloudEvent.slug()));
        m.event_accepted("orders", 10);
        m.event_accepted("orders", 5);
        m.event_accepted("audit", 1);
        assert!(has(
            &m,
            r#"eventwire_ingest_requests_total{outcome="accepted"} 2"#
        ));
        assert!(has(
            &m,
            r#"eventwire_ingest_requests_total{outcome="invalid-cloudevent"} 1"#
        ));
        assert!(has(
            &m,
            r#"eventwire_ingest_events_total{topic="orders"} 2"#
        ));
        assert!(has(
            &m,
            r#"eventwire_ingest_bytes_total{topic="orders"} 15"#
        ));
        assert!(has(&m, r#"eventwire_ingest_bytes_total{topic="audit"} 1"#));
        m.produced(Duration::from_millis(3));
        m.produce_failed();
        assert!(has(&m, "eventwire_produce_duration_seconds_count 1"));
        assert!(has(
            &m,
            "eventwire_produce_duration_seconds_bucket{le=\"0.0025\"} 0"
        ));
        assert!(has(
            &m,
            "eventwire_produce_duration_seconds_bucket{le=\"0.005\"} 1"
        ));
        assert!(has(&m, "eventwire_produce_errors_total 1"));
    }

    #[test]
    fn topics_beyond_the_series_limit_count_together() {
        let m = Metrics::new();
        for n in 0..MAX_TOPIC_SERIES + 2 {
            m.event_accepted(&format!("t{n}"), 1);
        }
        m.event_accepted("t0", 1);
        assert!(has(&m, r#"eventwire_ingest_events_total{topic="t0"} 2"#));
        assert!(has(
            &m,
            r#"eventwire_ingest_events_total{topic="(other)"} 2"#
        ));
        let beyond = format!("topic=\"t{}\"", MAX_TOPIC_SERIES);
        assert!(!lines(&m).iter().any(|l| l.contains(&beyond)));
    }

    #[test]
    fn a_subscription_counts_while_it_lives() {
        let m = Metrics::new();
        let a = m.subscription("orders", true);
        let b = m.subscription("orders", false);
        a.frames.inc();
        b.frames.inc();
        b.slow_closed.inc();
        let sse = r#"eventwire_subscribers{topic="orders",transport="sse"}"#;
        assert!(has(&m, &format!("{sse} 1")));
        assert!(has(
            &m,
            r#"eventwire_push_frames_sent_total{topic="orders"} 2"#
        ));
        assert!(has(
            &m,
            r#"eventwire_push_slow_clients_closed_total{topic="orders"} 1"#
        ));
        drop(a);
        assert!(has(&m, &format!("{sse} 0")));
        m.set_consumer_lag(&[("orders", 0, 4), ("orders", 1, 0)]);
        assert!(has(
            &m,
            r#"eventwire_push_consumer_lag{topic="orders",partition="0"} 4"#
        ));
        m.set_consumer_lag(&[]);
        assert!(
            !lines(&m)
                .iter()
                .any(|l| l.starts_with("eventwire_push_consumer_lag{"))
        );
    }

    struct Fixed;

    impl Observed for Fixed {
        fn observe(&self, metrics: &Metrics) {
            metrics.set_replays(2);
        }
    }

    #[tokio::test]
    async fn scraped_over_http_with_sources_read() {
        use axum::body::Body;
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let app = router(Arc::new(Metrics::new()), vec![Arc::new(Fixed)]);
        let get = axum::http::Request::get("/metrics")
            .body(Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(get).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.lines()
                .any(|l| l == "eventwire_push_replays_running 2"),
            "{text}"
        );
        let post = axum::http::Request::post("/metrics")
            .body(Body::empty())
            .unwrap();
        let resp = app.oneshot(post).await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
