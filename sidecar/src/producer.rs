//! The Kafka producer (idempotent, `acks=all`): hands records to librdkafka, classifies its
//! errors, keeps a topic-existence cache and the broker liveness `/readyz` reports.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::metadata::Metadata;
use rdkafka::producer::future_producer::DeliveryFuture;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::metrics::Metrics;
use crate::sink::{Delivered, OutRecord, PublishError};
use crate::{kafka_config, telemetry};

/// A delivery still in flight in the producer, with its `eventwire.produce` span (which
/// ends when this is dropped: once answered, or given up on).
pub struct Pending {
    delivery: Pin<Box<DeliveryFuture>>,
    handed_over: Instant,
    metrics: Arc<Metrics>,
    span: tracing::Span,
}

impl Pending {
    /// Resolves when the broker acknowledged the record or the producer gave up on it.
    pub async fn wait(&mut self) -> Result<Delivered, PublishError> {
        let result = match (&mut self.delivery).await {
            Ok(Ok(d)) => Ok(Delivered {
                partition: d.partition,
                offset: d.offset,
            }),
            Ok(Err((e, _))) => Err(classify("", e)),
            Err(_) => Err(PublishError::Unavailable(
                "the producer shut down before delivery".into(),
            )),
        };
        match &result {
            Ok(_) => self.metrics.produced(self.handed_over.elapsed()),
            Err(_) => self.metrics.produce_failed(),
        }
        telemetry::produced(&self.span, &result);
        result
    }
}

/// Positive topic answers change rarely; negative ones are kept short so a topic created a
/// moment ago becomes usable quickly.
const TOPIC_TTL_EXISTS: Duration = Duration::from_secs(60);
const TOPIC_TTL_MISSING: Duration = Duration::from_secs(2);
const TOPIC_CACHE_PRUNE_AT: usize = 1024;
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// `/readyz` stays green this long after the last successful metadata answer.
const READY_WINDOW: Duration = Duration::from_secs(3);
const HEALTH_PROBE_INTERVAL: Duration = Duration::from_secs(1);

pub struct KafkaSettings {
    pub brokers: String,
    pub delivery_timeout: Duration,
    pub overrides: Vec<(String, String)>,
}

pub struct KafkaProducer {
    /// Replaced when librdkafka reports a fatal error (idempotent producer state lost):
    /// such a producer never delivers again.
    producer: std::sync::RwLock<FutureProducer>,
    config: ClientConfig,
    topics: Mutex<HashMap<String, (bool, Instant)>>,
    last_metadata_ok: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl KafkaProducer {
    pub fn new(settings: &KafkaSettings, metrics: Arc<Metrics>) -> KafkaResult<Self> {
        let mut config = kafka_config::client(&settings.brokers);
        // The delivery timeout is long on purpose: requests stop waiting after the ack
        // timeout and spool the event, while the producer keeps retrying idempotently. (Tansu
        // 0.6.0's sqlite storage also panics when an idempotent producer bumps its epoch after
        // a timed-out in-flight request, which a long timeout avoids.)
        config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            // librdkafka backs off up to 10 s between reconnects; a spool waiting for its
            // broker should notice it back within a second.
            .set("reconnect.backoff.max.ms", "1000")
            .set(
                "message.timeout.ms",
                settings.delivery_timeout.as_millis().to_string(),
            );
        let config = kafka_config::with_overrides(config, &settings.overrides);
        Ok(Self {
            producer: std::sync::RwLock::new(config.create()?),
            config,
            topics: Mutex::new(HashMap::new()),
            last_metadata_ok: Mutex::new(None),
            metrics,
        })
    }

    /// Polls broker metadata every second so `/readyz` reflects reachability even when idle.
    pub fn spawn_health_probe(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_PROBE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = this.metadata(None).await {
                    tracing::debug!(error = %e, "health probe: metadata request failed");
                }
            }
        })
    }

    /// Waits (blocking) until queued records are delivered or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.producer().flush(timeout)
    }

    /// Fetches metadata off the async threads (librdkafka blocks) and records liveness.
    async fn metadata(&self, topic: Option<&str>) -> Result<Metadata, PublishError> {
        let producer = self.producer();
        let topic = topic.map(str::to_owned);
        let fetched = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(topic.as_deref(), METADATA_TIMEOUT)
        })
        .await
        .map_err(|e| PublishError::Unavailable(format!("metadata task failed: {e}")))?
        .map_err(|e| PublishError::Unavailable(format!("metadata request failed: {e}")))?;
        *lock(&self.last_metadata_ok) = Some(Instant::now());
        Ok(fetched)
    }

    /// Answers unknown topics at once: the broker may not auto-create them, and a produce to
    /// one would only fail after the whole delivery timeout.
    pub async fn check_topic(&self, topic: &str) -> Result<(), PublishError> {
        let exists = match self.cached_topic(topic) {
            Some(exists) => exists,
            None => {
                let exists = topic_in(&self.metadata(Some(topic)).await?, topic)?;
                self.remember_topic(topic, exists);
                exists
            }
        };
        if exists {
            Ok(())
        } else {
            Err(PublishError::UnknownTopic(topic.to_owned()))
        }
    }

    /// What the cache knows of a topic without asking the broker.
    pub fn cached_topic(&self, topic: &str) -> Option<bool> {
        let topics = lock(&self.topics);
        let &(exists, at) = topics.get(topic)?;
        (at.elapsed() < ttl(exists)).then_some(exists)
    }

    fn remember_topic(&self, topic: &str, exists: bool) {
        let mut topics = lock(&self.topics);
        if topics.len() >= TOPIC_CACHE_PRUNE_AT {
            // Clients choose topic names, so bound the map by dropping expired answers.
            topics.retain(|_, (exists, at)| at.elapsed() < ttl(*exists));
        }
        topics.insert(topic.to_owned(), (exists, Instant::now()));
    }

    /// Hands the record to the producer; the returned `Pending` resolves on the broker's
    /// acknowledgement. Many can be in flight at once and librdkafka batches them.
    pub fn enqueue(&self, record: &OutRecord) -> Result<Pending, PublishError> {
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            },
        );
        let mut future_record = FutureRecord::<[u8], [u8]>::to(&record.topic).headers(headers);
        if let Some(key) = &record.key {
            future_record = future_record.key(key.as_bytes());
        }
        if let Some(value) = &record.value {
            future_record = future_record.payload(value);
        }
        let span = telemetry::produce_span(record);
        // send_result enqueues at once (send() would wait and serialize the callers).
        let delivery = self
            .producer()
            .send_result(future_record)
            .map_err(|(e, _)| {
                self.metrics.produce_failed();
                let error = classify(&record.topic, e);
                telemetry::failed(&span, &error);
                error
            })?;
        Ok(Pending {
            delivery: Box::pin(delivery),
            handed_over: Instant::now(),
            metrics: self.metrics.clone(),
            span,
        })
    }

    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After a fatal error the producer is dead; a new one picks up where the spool is.
    pub fn recover_if_fatal(&self) {
        let producer = self.producer();
        let Some(fatal) = producer.client().fatal_error() else {
            return;
        };
        tracing::error!(error = ?fatal, "producer fatal error; creating a new producer");
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                *self
                    .producer
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
            }
            Err(e) => tracing::error!(error = %e, "cannot create a new producer"),
        }
    }

    /// Produces one record and waits for the outcome (bounded by the delivery timeout).
    pub async fn produce(&self, record: &OutRecord) -> Result<Delivered, PublishError> {
        let result = self.enqueue(record)?.wait().await;
        if result.is_err() {
            self.recover_if_fatal();
        }
        if let Err(PublishError::UnknownTopic(_)) = &result {
            self.remember_topic(&record.topic, false);
        }
        result.map_err(|e| match e {
            PublishError::UnknownTopic(_) => PublishError::UnknownTopic(record.topic.clone()),
            other => other,
        })
    }

    pub fn is_ready(&self) -> bool {
        lock(&self.last_metadata_ok).is_some_and(|at| at.elapsed() < READY_WINDOW)
    }
}

fn ttl(exists: bool) -> Duration {
    if exists {
        TOPIC_TTL_EXISTS
    } else {
        TOPIC_TTL_MISSING
    }
}

/// Poisoning only means another request panicked mid-update of plain data; keep serving.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn topic_in(metadata: &Metadata, topic: &str) -> Result<bool, PublishError> {
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(false);
    };
    match found.error().map(RDKafkaErrorCode::from) {
        None => Ok(!found.partitions().is_empty()),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => Ok(false),
        Some(code) => Err(PublishError::Unavailable(format!(
            "metadata for topic `{topic}`: {code}"
        ))),
    }
}

fn classify(topic: &str, e: KafkaError) -> PublishError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => PublishError::QueueFull,
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => PublishError::TooLarge(
            "the record exceeds Kafka's message size limit (message.max.bytes)".into(),
        ),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            PublishError::UnknownTopic(topic.to_owned())
        }
        // Retrying cannot change these answers; retried forever, one such record at the head
        // of the spool would hold back every event behind it.
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::MessageBatchTooLarge,
        ) => PublishError::Refused(e.to_string()),
        _ => PublishError::Unavailable(format!("delivery failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_producer_errors() {
        let e = |code| classify("t", KafkaError::MessageProduction(code));
        assert_eq!(e(RDKafkaErrorCode::QueueFull), PublishError::QueueFull);
        assert_eq!(
            e(RDKafkaErrorCode::UnknownTopicOrPartition),
            PublishError::UnknownTopic("t".into())
        );
        assert!(matches!(
            e(RDKafkaErrorCode::MessageSizeTooLarge),
            PublishError::TooLarge(_)
        ));
        assert!(matches!(
            e(RDKafkaErrorCode::MessageTimedOut),
            PublishError::Unavailable(_)
        ));
    }
}
