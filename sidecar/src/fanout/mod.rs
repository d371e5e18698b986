//! One Kafka consumer per topic per sidecar (a hub), shared by all subscribers of the topic
//! through a `tokio::sync::broadcast` of pre-serialized envelopes: 1,000 subscribers cost one
//! consumer and one serialization per record. Subscribers that start behind the hub replay
//! with their own short-lived consumer (see `subscription`). Also the Kafka queries the push
//! side needs (partitions, watermarks, offsets for a time).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch};

use crate::cursor::Cursor;
use crate::subscription_filter::{Attributes, attributes_of};

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a hub checks whether it still has subscribers.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// After a consumer error, wait before polling again so a down broker is not hammered.
const ERROR_BACKOFF: Duration = Duration::from_millis(500);
/// Blocking Kafka queries (metadata, watermarks, offsets for a time) the push side runs at
/// once, so a crowd of subscribers cannot fill the blocking pool that ingest also uses.
const MAX_QUERIES: usize = 4;
/// Prefetch bound of every push consumer (librdkafka `queued.max.messages.kbytes`, default
/// 64 MiB); `fetch.max.bytes` follows it (librdkafka caps it at this, but never below
/// `message.max.bytes`). One consumer then costs a few MiB, not 64.
const CONSUMER_QUEUE_KBYTES: &str = "2048";

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

/// One record as every subscriber gets it: serialized once, the cursor appended per
/// subscriber (it depends on where that subscriber is).
#[derive(Debug)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
    /// `None` when the record is not a CloudEvent.
    pub attributes: Option<Attributes>,
    /// The envelope JSON without its closing brace.
    head: String,
    /// Bytes the hub had published up to and including this record (0 for a replay).
    end_bytes: u64,
}

impl Delivery {
    pub fn from_message(message: &BorrowedMessage<'_>) -> Delivery {
        let record = crate::consumed::record(message);
        let envelope = record.envelope();
        let attributes = envelope.event.as_ref().map(attributes_of);
        // Serializing a map of JSON values cannot fail; an empty object keeps the frame valid.
        let mut head = serde_json::to_string(&envelope).unwrap_or_else(|_| "{}".into());
        head.pop();
        Delivery {
            partition: record.partition,
            offset: record.offset,
            attributes,
            head,
            end_bytes: 0,
        }
    }

    /// Bytes this record holds in memory, roughly (the envelope; attributes are small).
    pub fn size(&self) -> u64 {
        self.head.len() as u64 + 64
    }

    pub fn end_bytes(&self) -> u64 {
        self.end_bytes
    }

    /// The envelope `tail` prints plus the subscription's cursor after this record.
    pub fn frame(&self, cursor: &Cursor) -> String {
        let sep = if self.head.len() > 1 { "," } else { "" };
        format!("{}{sep}\"cursor\":\"{cursor}\"}}", self.head)
    }
}

/// A subscriber's handle on a hub: everything broadcast after `position`.
pub struct Joined {
    pub rx: broadcast::Receiver<Arc<Delivery>>,
    /// The hub's position when `rx` was created: every record at or after it arrives on `rx`.
    pub position: Cursor,
    pub partitions: Vec<i32>,
    /// Bytes the hub has published, ever; minus a subscriber's `end_bytes` = its lag in bytes.
    pub published: Arc<AtomicU64>,
    /// `published` when `rx` was created.
    pub bytes: u64,
}

struct Hub {
    tx: broadcast::Sender<Arc<Delivery>>,
    /// Advanced and broadcast under one lock, so a joiner's (`rx`, `position`) agree.
    position: Mutex<Cursor>,
    partitions: Vec<i32>,
    /// Advanced under the `position` lock too.
    published: Arc<AtomicU64>,
}

impl Hub {
    fn join(&self) -> Joined {
        let position = lock(&self.position);
        Joined {
            rx: self.tx.subscribe(),
            position: position.clone(),
            partitions: self.partitions.clone(),
            published: self.published.clone(),
            bytes: self.published.load(Ordering::Relaxed),
        }
    }

    fn publish(&self, mut delivery: Delivery) {
        let mut position = lock(&self.position);
        position.advance(delivery.partition, delivery.offset);
        let total = self.published.load(Ordering::Relaxed) + delivery.size();
        self.published.store(total, Ordering::Relaxed);
        delivery.end_bytes = total;
        // No receivers is fine: the hub is in its grace period.
        let _ = self.tx.send(Arc::new(delivery));
    }
}

/// A hub being started, or started: every subscriber that arrives meanwhile awaits the same
/// start (one metadata lookup, one consumer), and shares its error too.
type HubSlot = Shared<BoxFuture<'static, Result<Arc<Hub>, FanoutError>>>;

fn is_hub(slot: &HubSlot, hub: &Arc<Hub>) -> bool {
    matches!(slot.peek(), Some(Ok(h)) if Arc::ptr_eq(h, hub))
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
    /// For metadata, watermark and time queries (blocking calls, run on the blocking pool).
    admin: Arc<BaseConsumer>,
    hubs: Mutex<HashMap<String, HubSlot>>,
    shutdown: watch::Sender<bool>,
    clients: AtomicU64,
    limits: PushLimits,
    subscribers: Arc<Semaphore>,
    replays: Arc<Semaphore>,
    queries: Arc<Semaphore>,
}

impl Fanout {
    pub fn with_limits(
        config: FanoutConfig,
        limits: PushLimits,
    ) -> Result<Arc<Fanout>, KafkaError> {
        let admin = client_config(&config, "meta", 0).create()?;
        Ok(Arc::new(Fanout {
            config,
            admin: Arc::new(admin),
            hubs: Mutex::new(HashMap::new()),
            shutdown: watch::channel(false).0,
            clients: AtomicU64::new(1),
            subscribers: Arc::new(Semaphore::new(limits.max_subscribers)),
            replays: Arc::new(Semaphore::new(limits.max_replays)),
            queries: Arc::new(Semaphore::new(MAX_QUERIES)),
            limits,
        }))
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

    async fn start_hub(self: Arc<Self>, topic: String) -> Result<Arc<Hub>, FanoutError> {
        let (hub, consumer) = self.new_hub(&topic).await?;
        let hub = Arc::new(hub);
        tokio::spawn(self.clone().run_hub(topic, hub.clone(), consumer));
        Ok(hub)
    }

    async fn new_hub(&self, topic: &str) -> Result<(Hub, StreamConsumer), FanoutError> {
        let partitions = self.partitions(topic).await?;
        let start = self.watermarks(topic, &partitions).await?;
        let start = Cursor::new(start.iter().map(|(p, (_, high))| (*p, *high)));
        let consumer = self.consumer("hub")?;
        consumer.assign(&assignment(topic, &start)?)?;
        // Twice the queue: a subscriber is closed when it stays over the queue for a moment
        // (see `subscribe`), so the ring must hold more than the queue meanwhile.
        let (tx, _) = broadcast::channel(self.config.queue.max(1) * 2);
        let hub = Hub {
            tx,
            position: Mutex::new(start),
            partitions,
            published: Arc::new(AtomicU64::new(0)),
        };
        tracing::info!(topic, "fan-out hub started");
        Ok((hub, consumer))
    }

    async fn run_hub(self: Arc<Self>, topic: String, hub: Arc<Hub>, consumer: StreamConsumer) {
        let mut shutdown = self.shutdown_signal();
        let mut tick = tokio::time::interval(IDLE_CHECK);
        let mut idle_since: Option<Instant> = None;
        loop {
            tokio::select! {
                received = consumer.recv() => match received {
                    Ok(message) => {
                        hub.publish(Delivery::from_message(&message));
                        // A ready consumer never yields on its own, and the subscribers just
                        // woken wait in this worker's unstealable LIFO slot: let them run.
                        tokio::task::yield_now().await;
                    }
                    Err(e) => {
                        tracing::warn!(topic, error = %e, "fan-out consumer error");
                        tokio::time::sleep(ERROR_BACKOFF).await;
                    }
                },
                _ = tick.tick() => {
                    if hub.tx.receiver_count() > 0 {
                        idle_since = None;
                    } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= self.config.grace
                        && self.remove_if_idle(&topic, &hub)
                    {
                        break;
                    }
                }
                () = stopped(&mut shutdown) => break,
            }
        }
        tracing::info!(topic, "fan-out hub stopped");
    }

    /// Under the map lock, so no subscriber can join between the check and the removal.
    fn remove_if_idle(&self, topic: &str, hub: &Arc<Hub>) -> bool {
        let mut hubs = lock(&self.hubs);
        if hub.tx.receiver_count() > 0 {
            return false;
        }
        if hubs.get(topic).is_some_and(|slot| is_hub(slot, hub)) {
            hubs.remove(topic);
        }
        true
    }

    /// A consumer for assign-only reading: no group membership, no commits.
    pub fn consumer(&self, role: &str) -> Result<StreamConsumer, KafkaError> {
        client_config(&self.config, role, self.next_client()).create()
    }

    fn next_client(&self) -> u64 {
        self.clients.fetch_add(1, Ordering::Relaxed)
    }

    pub async fn partitions(&self, topic: &str) -> Result<Vec<i32>, FanoutError> {
        let admin = self.admin.clone();
        let name = topic.to_owned();
        self.query(move || {
            let metadata = admin.fetch_metadata(Some(&name), METADATA_TIMEOUT)?;
            let found = metadata.topics().iter().find(|t| t.name() == name);
            match found {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
                    ids.sort_unstable();
                    Ok(ids)
                }
                Some(t)
                    if t.error().is_some_and(|e| {
                        RDKafkaErrorCode::from(e) != RDKafkaErrorCode::UnknownTopicOrPartition
                    }) =>
                {
                    Err(FanoutError::Unavailable(format!(
                        "metadata for `{name}`: {:?}",
                        t.error()
                    )))
                }
                _ => Err(FanoutError::UnknownTopic(name)),
            }
        })
        .await
    }

    /// Runs a blocking Kafka query on the blocking pool, at most `MAX_QUERIES` at once (the
    /// permit goes with the task, so an abandoned request still counts until it ends).
    async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, FanoutError> + Send + 'static,
    ) -> Result<T, FanoutError> {
        let permit = self
            .queries
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| FanoutError::Unavailable(format!("query slots closed: {e}")))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| FanoutError::Unavailable(format!("query task failed: {e}")))?
    }

    /// (low, high) watermarks of each partition.
    pub async fn watermarks(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<(i32, (i64, i64))>, FanoutError> {
        let admin = self.admin.clone();
        let (topic, partitions) = (topic.to_owned(), partitions.to_vec());
        self.query(move || {
            partitions
                .iter()
                .map(|&p| Ok((p, admin.fetch_watermarks(&topic, p, METADATA_TIMEOUT)?)))
                .collect()
        })
        .await
    }

    /// The first offset at or after `millis` in each partition, or the high watermark when
    /// there is none.
    pub async fn offsets_at(
        &self,
        topic: &str,
        partitions: &[i32],
        millis: i64,
    ) -> Result<Cursor, FanoutError> {
        let marks = self.watermarks(topic, partitions).await?;
        let admin = self.admin.clone();
        let probe_config = client_config(&self.config, "probe", self.next_client());
        let topic = topic.to_owned();
        self.query(move || {
            let mut query = TopicPartitionList::new();
            for (p, _) in &marks {
                query.add_partition_offset(&topic, *p, Offset::Offset(millis))?;
            }
            let found = admin.offsets_for_times(query, METADATA_TIMEOUT)?;
            // One probe for all partitions that need one.
            let mut probe: Option<BaseConsumer> = None;
            let mut cursor = Cursor::default();
            for (p, (low, high)) in marks {
                let answer = found.find_partition(&topic, p).map(|e| e.offset());
                let offset = match answer {
                    Some(Offset::Offset(o)) if o > low => o,
                    // Tansu 0.6 answers 0 instead of -1 (none) for a time after the last
                    // record, so an answer at the start must be checked against the record.
                    Some(Offset::Offset(_)) if low < high => {
                        if probe.is_none() {
                            probe = Some(probe_config.create::<BaseConsumer>()?);
                        }
                        let before = probe.as_ref().is_some_and(|probe| {
                            first_record_before(probe, &topic, p, low, millis)
                        });
                        if before { high } else { low }
                    }
                    Some(Offset::Offset(o)) => o.clamp(low, high),
                    _ => high,
                };
                cursor.set(p, offset);
            }
            Ok(cursor)
        })
        .await
    }
}

/// Whether the record at `offset` has a timestamp before `millis` (unknown counts as not).
fn first_record_before(
    probe: &BaseConsumer,
    topic: &str,
    partition: i32,
    offset: i64,
    millis: i64,
) -> bool {
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(offset))
        .and_then(|()| probe.assign(&tpl))
        .is_err()
    {
        return false;
    }
    match probe.poll(METADATA_TIMEOUT) {
        Some(Ok(m)) => m.timestamp().to_millis().is_some_and(|t| t < millis),
        _ => false,
    }
}

pub fn assignment(topic: &str, cursor: &Cursor) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in cursor.iter() {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))?;
    }
    Ok(tpl)
}

fn client_config(config: &FanoutConfig, role: &str, n: u64) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        // Tansu wants a group id even for assign-only use; unique so nothing is shared.
        .set(
            "group.id",
            format!("eventwire-push-{}-{role}-{n}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Small prefetch: one consumer per hub and per replay must stay cheap.
        .set("queued.max.messages.kbytes", CONSUMER_QUEUE_KBYTES)
        .set("queued.min.messages", "1000")
        // Bounds the wait of an empty fetch, which is the latency floor of a live event
        // when the broker does not answer a fetch as soon as data arrives (Tansu).
        .set(
            "fetch.wait.max.ms",
            config.fetch_wait.as_millis().to_string(),
        );
    for (key, value) in &config.overrides {
        c.set(key, value);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_appends_the_cursor() {
        let d = Delivery {
            partition: 1,
            offset: 7,
            attributes: None,
            head: r#"{"topic":"t","partition":1,"offset":7,"key":null,"event":null"#.into(),
            end_bytes: 0,
        };
        let frame = d.frame(&Cursor::new([(0, 3), (1, 8)]));
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["cursor"], "0:3,1:8");
        assert_eq!(v["offset"], 7);
    }

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

    #[test]
    fn consumers_prefetch_little() {
        let config = FanoutConfig {
            brokers: "127.0.0.1:1".into(),
            overrides: vec![],
            queue: 8,
            grace: Duration::from_secs(1),
            fetch_wait: Duration::from_millis(100),
        };
        let c = client_config(&config, "replay", 1);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("2048"));
    }

    #[tokio::test]
    async fn admission_is_bounded() {
        let config = FanoutConfig {
            brokers: "127.0.0.1:1".into(),
            overrides: vec![],
            queue: 8,
            grace: Duration::from_secs(1),
            fetch_wait: Duration::from_millis(100),
        };
        let fanout = Fanout::with_limits(
            config,
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
