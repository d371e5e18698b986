//! One Kafka consumer per topic per sidecar (a hub), shared by all subscribers of the topic
//! through a `tokio::sync::broadcast` of pre-serialized envelopes: 1,000 subscribers cost one
//! consumer and one serialization per record. Subscribers that start behind the hub replay
//! with their own short-lived consumer (see `subscription`). Also the Kafka queries the push
//! side needs (partitions, watermarks, offsets for a time).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use thiserror::Error;
use tokio::sync::{broadcast, watch};

use crate::cloudevent::ConsumedRecord;
use crate::cursor::Cursor;
use crate::filter::{Attributes, attributes_of};

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a hub checks whether it still has subscribers.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// After a consumer error, wait before polling again so a down broker is not hammered.
const ERROR_BACKOFF: Duration = Duration::from_millis(500);

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

#[derive(Debug, Error)]
pub enum FanoutError {
    #[error("topic `{0}` does not exist")]
    UnknownTopic(String),
    #[error("Kafka is not available: {0}")]
    Unavailable(String),
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
}

impl Delivery {
    pub fn from_message(message: &BorrowedMessage<'_>) -> Delivery {
        let record = ConsumedRecord::from_message(message);
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
        }
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
}

struct Hub {
    tx: broadcast::Sender<Arc<Delivery>>,
    /// Advanced and broadcast under one lock, so a joiner's (`rx`, `position`) agree.
    position: Mutex<Cursor>,
    partitions: Vec<i32>,
}

impl Hub {
    fn join(&self) -> Joined {
        let position = lock(&self.position);
        Joined {
            rx: self.tx.subscribe(),
            position: position.clone(),
            partitions: self.partitions.clone(),
        }
    }

    fn publish(&self, delivery: Delivery) {
        let mut position = lock(&self.position);
        position.advance(delivery.partition, delivery.offset);
        // No receivers is fine: the hub is in its grace period.
        let _ = self.tx.send(Arc::new(delivery));
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
    /// For metadata, watermark and time queries (blocking calls, run on the blocking pool).
    admin: Arc<BaseConsumer>,
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    shutdown: watch::Sender<bool>,
    clients: AtomicU64,
}

impl Fanout {
    pub fn new(config: FanoutConfig) -> Result<Arc<Fanout>, KafkaError> {
        let admin = client_config(&config, "meta", 0).create()?;
        Ok(Arc::new(Fanout {
            config,
            admin: Arc::new(admin),
            hubs: Mutex::new(HashMap::new()),
            shutdown: watch::channel(false).0,
            clients: AtomicU64::new(1),
        }))
    }

    pub fn queue(&self) -> usize {
        self.config.queue
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
        if let Some(hub) = lock(&self.hubs).get(topic) {
            return Ok(hub.join());
        }
        let (hub, consumer) = self.new_hub(topic).await?;
        let mut hubs = lock(&self.hubs);
        // Another subscriber may have started one meanwhile; ours is dropped unused.
        if let Some(existing) = hubs.get(topic) {
            return Ok(existing.join());
        }
        hubs.insert(topic.to_owned(), hub.clone());
        let joined = hub.join();
        tokio::spawn(self.clone().run_hub(topic.to_owned(), hub, consumer));
        Ok(joined)
    }

    async fn new_hub(&self, topic: &str) -> Result<(Arc<Hub>, StreamConsumer), FanoutError> {
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
        };
        tracing::info!(topic, "fan-out hub started");
        Ok((Arc::new(hub), consumer))
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
        if hubs.get(topic).is_some_and(|h| Arc::ptr_eq(h, hub)) {
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
        blocking(move || {
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

    /// (low, high) watermarks of each partition.
    pub async fn watermarks(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<(i32, (i64, i64))>, FanoutError> {
        let admin = self.admin.clone();
        let (topic, partitions) = (topic.to_owned(), partitions.to_vec());
        blocking(move || {
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
        blocking(move || {
            let mut query = TopicPartitionList::new();
            for (p, _) in &marks {
                query.add_partition_offset(&topic, *p, Offset::Offset(millis))?;
            }
            let found = admin.offsets_for_times(query, METADATA_TIMEOUT)?;
            let mut cursor = Cursor::default();
            for (p, (low, high)) in marks {
                let answer = found.find_partition(&topic, p).map(|e| e.offset());
                let offset = match answer {
                    Some(Offset::Offset(o)) if o > low => o,
                    // Tansu 0.6 answers 0 instead of -1 (none) for a time after the last
                    // record, so an answer at the start must be checked against the record.
                    Some(Offset::Offset(_)) if low < high => {
                        let probe = probe_config.create::<BaseConsumer>()?;
                        if first_record_before(&probe, &topic, p, low, millis) {
                            high
                        } else {
                            low
                        }
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FanoutError> + Send + 'static,
) -> Result<T, FanoutError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FanoutError::Unavailable(format!("query task failed: {e}")))?
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
        };
        let frame = d.frame(&Cursor::new([(0, 3), (1, 8)]));
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["cursor"], "0:3,1:8");
        assert_eq!(v["offset"], 7);
    }
}
