//! The Kafka side of the push path: consumer configuration (assign-only, small prefetch) and
//! the blocking queries a subscription start needs (partitions, watermarks, offsets for a
//! time), bounded so a crowd of subscribers cannot fill the blocking pool ingest also uses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::{FanoutConfig, FanoutError};
use crate::cursor::Cursor;
use crate::kafka_config;

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// Blocking Kafka queries (metadata, watermarks, offsets for a time) the push side runs at
/// once.
const MAX_QUERIES: usize = 4;
/// Prefetch bound of every push consumer (librdkafka `queued.max.messages.kbytes`, default
/// 64 MiB); `fetch.max.bytes` follows it (librdkafka caps it at this, but never below
/// `message.max.bytes`). One consumer then costs a few MiB, not 64.
const CONSUMER_QUEUE_KBYTES: &str = "2048";
/// How often a hub consumer reports the high watermarks its fetches saw (librdkafka
/// statistics), for `eventwire_push_consumer_lag`.
const HUB_STATS_INTERVAL_MS: &str = "5000";

/// The high watermark of each partition as the hub consumer's fetches last reported it: the
/// lag then costs no broker request of its own.
#[derive(Debug, Default)]
pub struct HighWatermarks(Mutex<HashMap<i32, i64>>);

impl HighWatermarks {
    pub fn get(&self) -> Vec<(i32, i64)> {
        super::lock(&self.0).iter().map(|(p, h)| (*p, *h)).collect()
    }

    /// Takes the partitions' `hi_offset` from a statistics report; unknown ones (-1) are
    /// left out.
    fn update(&self, topic: &str, report: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<Stats>(report) else {
            return;
        };
        let Some(t) = stats.topics.get(topic) else {
            return;
        };
        let mut marks = super::lock(&self.0);
        for p in t.partitions.values().filter(|p| p.partition >= 0) {
            if p.hi_offset >= 0 {
                marks.insert(p.partition, p.hi_offset);
            }
        }
    }
}

/// The few fields of librdkafka's statistics JSON the lag needs.
#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    topics: HashMap<String, TopicStats>,
}

#[derive(Deserialize)]
struct TopicStats {
    #[serde(default)]
    partitions: HashMap<String, PartitionStats>,
}

#[derive(Deserialize)]
struct PartitionStats {
    partition: i32,
    hi_offset: i64,
}

/// The hub consumer's context: records the high watermarks its statistics report.
pub struct HubContext {
    topic: String,
    marks: Arc<HighWatermarks>,
}

impl ClientContext for HubContext {
    fn stats_raw(&self, report: &[u8]) {
        self.marks.update(&self.topic, report);
    }
}

impl ConsumerContext for HubContext {}

pub type HubConsumer = StreamConsumer<HubContext>;

pub struct KafkaQueries {
    config: FanoutConfig,
    /// For metadata, watermark and time queries (blocking calls, run on the blocking pool).
    admin: Arc<BaseConsumer>,
    clients: AtomicU64,
    queries: Arc<Semaphore>,
}

impl KafkaQueries {
    pub fn new(config: FanoutConfig) -> Result<KafkaQueries, KafkaError> {
        let admin = client_config(&config, "meta", 0).create()?;
        Ok(KafkaQueries {
            config,
            admin: Arc::new(admin),
            clients: AtomicU64::new(1),
            queries: Arc::new(Semaphore::new(MAX_QUERIES)),
        })
    }

    /// A consumer for assign-only reading: no group membership, no commits.
    pub fn consumer(&self, role: &str) -> Result<StreamConsumer, KafkaError> {
        client_config(&self.config, role, self.next_client()).create()
    }

    /// A hub's consumer, reporting the high watermarks it sees into `marks`.
    pub fn hub_consumer(
        &self,
        topic: &str,
        marks: Arc<HighWatermarks>,
    ) -> Result<HubConsumer, KafkaError> {
        let mut config = client_config(&self.config, "hub", self.next_client());
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", HUB_STATS_INTERVAL_MS);
        }
        let topic = topic.to_owned();
        config.create_with_context(HubContext { topic, marks })
    }

    fn next_client(&self) -> u64 {
        self.clients.fetch_add(1, Ordering::Relaxed)
    }

    /// The topic's partition ids, sorted.
    pub async fn partitions(&self, topic: &str) -> Result<Vec<i32>, FanoutError> {
        let (admin, topic) = (self.admin.clone(), topic.to_owned());
        self.query(move || partitions_of(&admin, topic)).await
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
        let probe = client_config(&self.config, "probe", self.next_client());
        let topic = topic.to_owned();
        self.query(move || offsets_for_time(&admin, &probe, &topic, marks, millis))
            .await
    }
}

fn partitions_of(admin: &BaseConsumer, topic: String) -> Result<Vec<i32>, FanoutError> {
    let metadata = admin.fetch_metadata(Some(&topic), METADATA_TIMEOUT)?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
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
                "metadata for `{topic}`: {:?}",
                t.error()
            )))
        }
        _ => Err(FanoutError::UnknownTopic(topic)),
    }
}

/// `offsets_at` on the blocking pool: (low, high) watermarks per partition in `marks`.
fn offsets_for_time(
    admin: &BaseConsumer,
    probe_config: &ClientConfig,
    topic: &str,
    marks: Vec<(i32, (i64, i64))>,
    millis: i64,
) -> Result<Cursor, FanoutError> {
    let mut query = TopicPartitionList::new();
    for (p, _) in &marks {
        query.add_partition_offset(topic, *p, Offset::Offset(millis))?;
    }
    let found = admin.offsets_for_times(query, METADATA_TIMEOUT)?;
    // One probe for all partitions that need one.
    let mut probe: Option<BaseConsumer> = None;
    let mut cursor = Cursor::default();
    for (p, (low, high)) in marks {
        let offset = match found.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) if o > low => o,
            // Tansu 0.6 answers 0 instead of -1 (none) for a time after the last record, so
            // an answer at the start must be checked against the record.
            Some(Offset::Offset(_)) if low < high => {
                let probe = match &mut probe {
                    Some(probe) => probe,
                    None => probe.insert(probe_config.create::<BaseConsumer>()?),
                };
                if first_record_before(probe, topic, p, low, millis) {
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
    let group = format!("eventwire-push-{}-{role}-{n}", std::process::id());
    let mut c = kafka_config::assign_only(&config.brokers, group);
    // Small prefetch: one consumer per hub and per replay must stay cheap.
    c.set("queued.max.messages.kbytes", CONSUMER_QUEUE_KBYTES)
        .set("queued.min.messages", "1000")
        // Bounds the wait of an empty fetch, which is the latency floor of a live event
        // when the broker does not answer a fetch as soon as data arrives (Tansu).
        .set(
            "fetch.wait.max.ms",
            config.fetch_wait.as_millis().to_string(),
        );
    kafka_config::with_overrides(c, &config.overrides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_watermarks_come_from_statistics() {
        let marks = HighWatermarks::default();
        let report = br#"{"name":"c","brokers":{"b":{"x":1}},"topics":{
            "t":{"topic":"t","partitions":{
                "0":{"partition":0,"hi_offset":12,"app_offset":3},
                "1":{"partition":1,"hi_offset":-1},
                "-1":{"partition":-1,"hi_offset":-1}}},
            "u":{"topic":"u","partitions":{"0":{"partition":0,"hi_offset":99}}}}}"#;
        marks.update("t", report);
        assert_eq!(marks.get(), vec![(0, 12)]);
        marks.update("t", b"not json");
        assert_eq!(marks.get(), vec![(0, 12)]);
    }

    #[test]
    fn consumers_prefetch_little() {
        let c = client_config(&FanoutConfig::unreachable(), "replay", 1);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("2048"));
    }
}
