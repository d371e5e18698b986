//! The push side's shared Kafka reading: one hub per topic per sidecar (`hub`), shared by all
//! subscribers of the topic, so 1,000 subscribers cost one consumer and one serialization per
//! record; subscribers that start behind the hub replay with their own short-lived consumer
//! (see `subscription`). Also admission (`--max-subscribers`, `--max-replays`, open topics)
//! and, in `kafka`, the Kafka queries the push side needs.

mod hub;
mod kafka;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::error::KafkaError;
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

pub use hub::{Delivery, Joined};
pub use kafka::{KafkaQueries, assignment};

use crate::metrics::{Metrics, Observed};

use hub::HubSlot;

/// Admission and resource limits of the push side (see `PushArgs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushLimits {
    /// Open subscriptions on this sidecar; more are refused before the upgrade (503).
    pub max_subscribers: usize,
    /// Subscriptions replaying with an own consumer at once; more are refused (503).
    pub max_replays: usize,
    /// Bytes of a topic's events a subscriber may be behind the hub (what the hub must keep).
    pub queue_bytes: u64,
    /// How long a replay may take before the subscriber is closed to resume later.
    pub max_replay: Duration,
    /// Topics open to subscribers; empty = every topic not starting with `__`.
    pub topics: Vec<String>,
}

/// The `serve` defaults (unit tests build on them).
impl Default for PushLimits {
    fn default() -> Self {
        PushLimits {
            max_subscribers: 10_000,
            max_replays: 32,
            queue_bytes: 64 << 20,
            max_replay: Duration::from_secs(300),
            topics: Vec::new(),
        }
    }
}

impl From<&crate::config::PushArgs> for PushLimits {
    fn from(a: &crate::config::PushArgs) -> Self {
        PushLimits {
            max_subscribers: a.max_subscribers as usize,
            max_replays: a.max_replays as usize,
            queue_bytes: a.subscriber_queue_bytes,
            max_replay: Duration::from_secs(a.max_replay_s),
            topics: a
                .push_topics
                .iter()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect(),
        }
    }
}

impl PushLimits {
    /// Whether subscribers may read `topic`: never an internal topic (`__consumer_offsets`,
    /// `__transaction_state`, ...), and only a listed one when `--push-topics` is set.
    pub fn topic_open(&self, topic: &str) -> bool {
        !topic.starts_with("__")
            && (self.topics.is_empty() || self.topics.iter().any(|t| t == topic))
    }
}

#[derive(Debug, Clone)]
pub struct FanoutConfig {
    pub brokers: String,
    pub overrides: Vec<(String, String)>,
    /// Events a subscriber may fall behind the hub before it is closed.
    pub queue: usize,
    /// How long a hub without subscribers keeps its consumer, so a reconnecting client does
    /// not pay for a new one.
    pub grace: Duration,
    /// fetch.wait.max.ms of the push consumers (see `--push-fetch-wait-ms`).
    pub fetch_wait: Duration,
}

#[cfg(test)]
impl FanoutConfig {
    /// A configuration whose broker never answers: for what must not need Kafka.
    pub fn unreachable() -> FanoutConfig {
        FanoutConfig {
            brokers: "127.0.0.1:1".into(),
            overrides: vec![],
            queue: 8,
            grace: Duration::from_secs(1),
            fetch_wait: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone, Error)]
pub enum FanoutError {
    #[error("topic `{0}` does not exist")]
    UnknownTopic(String),
    #[error("Kafka is not available: {0}")]
    Unavailable(String),
    #[error("this sidecar already serves {0} subscribers; retry shortly or on another instance")]
    TooManySubscribers(usize),
    #[error(
        "this sidecar already replays for {0} subscribers; retry shortly, or start from `latest`"
    )]
    TooManyReplays(usize),
}

impl From<KafkaError> for FanoutError {
    fn from(e: KafkaError) -> Self {
        FanoutError::Unavailable(e.to_string())
    }
}

/// Resolves once shutdown was requested.
pub async fn stopped(signal: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which also means shutting down.
    let _ = signal.wait_for(|stop| *stop).await;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Fanout {
    config: FanoutConfig,
    kafka: KafkaQueries,
    hubs: Mutex<HashMap<String, HubSlot>>,
    shutdown: watch::Sender<bool>,
    limits: PushLimits,
    subscribers: Arc<Semaphore>,
    replays: Arc<Semaphore>,
}

impl Fanout {
    pub fn with_limits(
        config: FanoutConfig,
        limits: PushLimits,
    ) -> Result<Arc<Fanout>, KafkaError> {
        Ok(Arc::new(Fanout {
            kafka: KafkaQueries::new(config.clone())?,
            config,
            hubs: Mutex::new(HashMap::new()),
            shutdown: watch::channel(false).0,
            subscribers: Arc::new(Semaphore::new(limits.max_subscribers)),
            replays: Arc::new(Semaphore::new(limits.max_replays)),
            limits,
        }))
    }

    pub fn kafka(&self) -> &KafkaQueries {
        &self.kafka
    }

    pub fn queue(&self) -> usize {
        self.config.queue
    }

    pub fn limits(&self) -> &PushLimits {
        &self.limits
    }

    /// A place among `--max-subscribers`, held for the subscription's life.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, FanoutError> {
        self.subscribers
            .clone()
            .try_acquire_owned()
            .map_err(|_| FanoutError::TooManySubscribers(self.limits.max_subscribers))
    }

    /// A place among `--max-replays`, held while the subscription replays.
    pub fn admit_replay(&self) -> Result<OwnedSemaphorePermit, FanoutError> {
        self.replays
            .clone()
            .try_acquire_owned()
            .map_err(|_| FanoutError::TooManyReplays(self.limits.max_replays))
    }

    /// Ends every subscription (so graceful shutdown is not held up by open streams).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Subscribes to the topic's hub, starting one if there is none.
    pub async fn join(self: &Arc<Self>, topic: &str) -> Result<Joined, FanoutError> {
        loop {
            let slot = {
                let mut hubs = lock(&self.hubs);
                match hubs.get(topic) {
                    Some(slot) => {
                        if let Some(Ok(hub)) = slot.peek() {
                            return Ok(hub.join());
                        }
                        slot.clone()
                    }
                    None => {
                        let slot = self.clone().start_hub(topic.to_owned()).boxed().shared();
                        hubs.insert(topic.to_owned(), slot.clone());
                        slot
                    }
                }
            };
            let started = slot.clone().await;
            // Join under the map lock: an idle hub is removed under it too, so a hub still in
            // the map sees this receiver before it could decide to stop.
            let mut hubs = lock(&self.hubs);
            let current = hubs.get(topic).is_some_and(|s| s.ptr_eq(&slot));
            match started {
                Ok(hub) if current => return Ok(hub.join()),
                // It started and already stopped again: start another.
                Ok(_) => continue,
                Err(e) => {
                    // Not cached: the next subscriber asks Kafka again.
                    if current {
                        hubs.remove(topic);
                    }
                    return Err(e);
                }
            }
        }
    }
}

impl Observed for Fanout {
    fn observe(&self, metrics: &Metrics) {
        let free = self.replays.available_permits();
        metrics.set_replays(self.limits.max_replays.saturating_sub(free));
        let hubs: Vec<(String, Arc<hub::Hub>)> = lock(&self.hubs)
            .iter()
            .filter_map(|(topic, slot)| match slot.peek() {
                Some(Ok(hub)) => Some((topic.clone(), hub.clone())),
                _ => None,
            })
            .collect();
        let lags: Vec<(&str, i32, i64)> = hubs
            .iter()
            .flat_map(|(topic, hub)| {
                hub.lag()
                    .into_iter()
                    .map(move |(p, lag)| (topic.as_str(), p, lag))
            })
            .collect();
        metrics.set_consumer_lag(&lags);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(topics: &[&str]) -> PushLimits {
        PushLimits {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            ..PushLimits::default()
        }
    }

    #[test]
    fn internal_topics_are_never_open_and_the_allow_list_is_exact() {
        let all = limits(&[]);
        assert!(all.topic_open("orders"));
        assert!(all.topic_open("_single_underscore"));
        assert!(!all.topic_open("__consumer_offsets"));
        assert!(!all.topic_open("__transaction_state"));
        let listed = limits(&["orders", "__consumer_offsets"]);
        assert!(listed.topic_open("orders"));
        assert!(!listed.topic_open("orders2"));
        assert!(
            !listed.topic_open("__consumer_offsets"),
            "internal even when listed"
        );
    }

    #[test]
    fn defaults_match_the_serve_flags() {
        let l = PushLimits::default();
        let cli =
            <crate::config::Cli as clap::Parser>::try_parse_from(["eventwire-sidecar"]).unwrap();
        assert_eq!(
            PushLimits::from(&cli.serve.push).max_subscribers,
            l.max_subscribers
        );
        assert_eq!((l.max_subscribers, l.max_replays), (10_000, 32));
        assert_eq!(l.queue_bytes, 64 << 20);
        assert_eq!(l.max_replay, Duration::from_secs(300));
    }

    #[tokio::test]
    async fn admission_is_bounded() {
        let fanout = Fanout::with_limits(
            FanoutConfig::unreachable(),
            PushLimits {
                max_subscribers: 2,
                max_replays: 1,
                ..limits(&[])
            },
        )
        .unwrap();
        let a = fanout.admit().unwrap();
        let _b = fanout.admit().unwrap();
        assert!(matches!(
            fanout.admit(),
            Err(FanoutError::TooManySubscribers(2))
        ));
        drop(a);
        assert!(fanout.admit().is_ok());
        let r = fanout.admit_replay().unwrap();
        assert!(matches!(
            fanout.admit_replay(),
            Err(FanoutError::TooManyReplays(1))
        ));
        drop(r);
        assert!(fanout.admit_replay().is_ok());
    }
}
