//! The running side of one delivery: a group consumer, one lane (task) per partition that
//! POSTs its events one at a time in offset order, and the offset commit after each event
//! is done with (2xx, filtered out, or dead-lettered).
//!
//! The dispatcher reads the consumer and hands each record to its partition's lane through a
//! small channel. A lane stuck on retries must not hold the others up, so when its channel
//! is full the dispatcher parks further records of that partition in an overflow list and
//! pauses the partition (librdkafka stops fetching it, so the list stays bounded by what was
//! already prefetched); it resumes once the lane caught up.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::config::Delivery;
use super::policy::{Outcome, RetryPolicy, Verdict, retry_after};
use super::request::{self, HttpDelivery};
use crate::cloudevent::ConsumedRecord;
use crate::producer::KafkaProducer;
use crate::sink::OutRecord;
use crate::trace_context::{TraceId, TraceParent};
use crate::{consumed, kafka_config};

/// Records a lane may have queued before its partition is paused.
const LANE_CAPACITY: usize = 64;
/// How often parked records are offered to their lanes again.
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);
/// A failing dead-letter produce is retried this often (the partition waits meanwhile).
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);
/// Answer bodies are read (so the connection can be reused) up to this much, then dropped.
const MAX_ANSWER_BYTES: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("delivery `{name}`: Kafka consumer: {source}")]
    Kafka {
        name: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("delivery `{name}`: HTTP client: {source}")]
    Http {
        name: String,
        source: reqwest::Error,
    },
}

/// What every delivery shares.
#[derive(Clone)]
pub struct Shared {
    pub brokers: String,
    pub overrides: Vec<(String, String)>,
    pub fetch_wait: Duration,
    pub producer: Arc<KafkaProducer>,
}

/// Starts every delivery; each runs until `stop` turns true, then finishes the delivery in
/// flight on each partition, commits, and ends its task.
pub fn spawn(
    deliveries: Vec<Delivery>,
    shared: &Shared,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, WorkerError> {
    deliveries
        .into_iter()
        .map(|d| {
            let ctx = Arc::new(Ctx::new(d, shared)?);
            tracing::info!(delivery = %ctx.delivery.name, topic = %ctx.delivery.topic, url = %ctx.delivery.url, group = %ctx.delivery.group, "delivering a topic to an HTTP service");
            Ok(tokio::spawn(dispatch(ctx, stop.clone())))
        })
        .collect()
}

struct Ctx {
    delivery: Delivery,
    policy: RetryPolicy,
    consumer: StreamConsumer,
    producer: Arc<KafkaProducer>,
    http: reqwest::Client,
    /// The next offset of each partition after the last event done with: what is committed.
    done: Mutex<HashMap<i32, i64>>,
}

impl Ctx {
    fn new(delivery: Delivery, shared: &Shared) -> Result<Ctx, WorkerError> {
        let kafka = |source| WorkerError::Kafka {
            name: delivery.name.clone(),
            source,
        };
        let mut config = kafka_config::client(&shared.brokers);
        config
            .set("group.id", &delivery.group)
            // Offsets are committed by hand, each only once its event is done with.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "fetch.wait.max.ms",
                shared.fetch_wait.as_millis().to_string(),
            );
        let consumer: StreamConsumer = kafka_config::with_overrides(config, &shared.overrides)
            .create()
            .map_err(kafka)?;
        consumer.subscribe(&[&delivery.topic]).map_err(kafka)?;
        let http = reqwest::Client::builder()
            // A 3xx is the service's answer, not something to follow (policy gives up).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|source| WorkerError::Http {
                name: delivery.name.clone(),
                source,
            })?;
        Ok(Ctx {
            policy: RetryPolicy {
                max_attempts: delivery.max_attempts,
                initial_backoff: delivery.initial_backoff,
                max_backoff: delivery.max_backoff,
            },
            delivery,
            consumer,
            producer: shared.producer.clone(),
            http,
            done: Mutex::default(),
        })
    }

    fn name(&self) -> &str {
        &self.delivery.name
    }
}

/// One partition's queue: the lane task's channel plus what waits for room in it.
struct Lane {
    partition: i32,
    tx: mpsc::Sender<OwnedMessage>,
    overflow: VecDeque<OwnedMessage>,
    paused: bool,
    /// The highest offset handed on: a refetch after a pause or rebalance repeats records the
    /// lane already has, which must not be delivered twice by this sidecar.
    last: i64,
}

async fn dispatch(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut lanes: HashMap<i32, Lane> = HashMap::new();
    let mut tasks = Vec::new();
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    while !*stop.borrow() {
        tokio::select! {
            _ = stop.changed() => break,
            received = ctx.consumer.recv() => match received {
                Ok(message) => {
                    let message = message.detach();
                    let partition = message.partition();
                    let lane = lanes.entry(partition).or_insert_with(|| {
                        let (tx, rx) = mpsc::channel(LANE_CAPACITY);
                        tasks.push(tokio::spawn(run_lane(ctx.clone(), rx, stop.clone())));
                        Lane { partition, tx, overflow: VecDeque::new(), paused: false, last: -1 }
                    });
                    offer(&ctx, lane, message);
                }
                Err(e) => {
                    tracing::warn!(delivery = %ctx.name(), error = %e, "consumer error");
                    tokio::time::sleep(DRAIN_INTERVAL).await;
                }
            },
            _ = drain.tick() => lanes.values_mut().for_each(|lane| flush(&ctx, lane)),
        }
    }
    // Closing the channels and the stop flag let each lane end after its current event.
    drop(lanes);
    for task in tasks {
        let _ = task.await;
    }
    commit_done(&ctx, CommitMode::Sync);
    tracing::info!(delivery = %ctx.name(), "delivery stopped");
}

fn offer(ctx: &Ctx, lane: &mut Lane, message: OwnedMessage) {
    if message.offset() <= lane.last {
        return;
    }
    lane.last = message.offset();
    lane.overflow.push_back(message);
    flush(ctx, lane);
}

/// Moves parked records into the lane while it has room; pauses or resumes the partition.
fn flush(ctx: &Ctx, lane: &mut Lane) {
    while let Some(message) = lane.overflow.pop_front() {
        match lane.tx.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(message)) => {
                lane.overflow.push_front(message);
                break;
            }
            // The lane ended (shutdown): nothing more to hand it.
            Err(mpsc::error::TrySendError::Closed(_)) => lane.overflow.clear(),
        }
    }
    let full = !lane.overflow.is_empty();
    if full != lane.paused {
        set_paused(ctx, lane, full);
    }
}

fn set_paused(ctx: &Ctx, lane: &mut Lane, pause: bool) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&ctx.delivery.topic, lane.partition);
    let result = if pause {
        ctx.consumer.pause(&tpl)
    } else {
        ctx.consumer.resume(&tpl)
    };
    match result {
        Ok(()) => lane.paused = pause,
        Err(e) => {
            tracing::warn!(delivery = %ctx.name(), partition = lane.partition, pause, error = %e, "cannot pause or resume a partition")
        }
    }
}

/// One partition: its events one at a time, in order; each committed once done with.
async fn run_lane(
    ctx: Arc<Ctx>,
    mut rx: mpsc::Receiver<OwnedMessage>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let message = tokio::select! {
            biased;
            _ = stopped(&mut stop) => return,
            message = rx.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        // Not done (stopped while waiting to retry): left uncommitted for the next owner.
        if !handle(&ctx, &message, &mut stop).await {
            return;
        }
        mark_done(&ctx, message.partition(), message.offset());
    }
}

/// Resolves once `stop` is true (at once if it already is).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The event's fields on every log line about it.
struct About<'a> {
    delivery: &'a str,
    event_id: String,
    trace_id: Option<TraceId>,
    partition: i32,
    offset: i64,
}

/// Delivers, skips or dead-letters one event; false when stopped before it was done with.
async fn handle(ctx: &Ctx, message: &OwnedMessage, stop: &mut watch::Receiver<bool>) -> bool {
    let record = consumed::record(message);
    let mut about = About {
        delivery: ctx.name(),
        event_id: String::new(),
        trace_id: trace_id(&record),
        partition: record.partition,
        offset: record.offset,
    };
    let request = match request::build(&record) {
        Ok(request) => request,
        Err(e) => {
            tracing::warn!(delivery = about.delivery, partition = about.partition, offset = about.offset, error = %e, "record cannot be delivered");
            return dead_letter(ctx, &record, &about, "not-a-cloudevent", None, 0, stop).await;
        }
    };
    about.event_id = request.id.clone();
    if ctx
        .delivery
        .filter
        .as_ref()
        .is_some_and(|f| !f.matches(&request.attributes))
    {
        tracing::debug!(delivery = about.delivery, event_id = %about.event_id, "filtered out");
        return true;
    }
    deliver(ctx, &record, &request, &about, stop).await
}

fn trace_id(record: &ConsumedRecord) -> Option<TraceId> {
    let headers = record
        .headers
        .iter()
        .filter_map(|(k, v)| Some((*k, std::str::from_utf8((*v)?).ok()?)));
    TraceParent::from_headers(headers).map(|t| t.trace_id)
}

/// Attempts until the policy says done or give up; false when stopped meanwhile.
async fn deliver(
    ctx: &Ctx,
    record: &ConsumedRecord<'_>,
    request: &HttpDelivery,
    about: &About<'_>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut attempt = 0u32;
    loop {
        attempt = attempt.saturating_add(1);
        let outcome = send(ctx, request).await;
        let random = getrandom::u64().unwrap_or(u64::MAX / 2);
        match ctx.policy.decide(&outcome, attempt, random) {
            Verdict::Done => {
                tracing::debug!(delivery = about.delivery, event_id = %about.event_id, trace_id = about.trace_id.map(display), attempt, "delivered");
                return true;
            }
            Verdict::Retry { after } => {
                tracing::warn!(delivery = about.delivery, event_id = %about.event_id, trace_id = about.trace_id.map(display), partition = about.partition, offset = about.offset, attempt, outcome = ?outcome, retry_in_ms = after.as_millis() as u64, "delivery failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(after) => {}
                    () = stopped(stop) => return false,
                }
            }
            Verdict::GiveUp(reason) => {
                let status = match outcome {
                    Outcome::Status { code, .. } => Some(code),
                    _ => None,
                };
                tracing::warn!(delivery = about.delivery, event_id = %about.event_id, trace_id = about.trace_id.map(display), partition = about.partition, offset = about.offset, attempt, outcome = ?outcome, reason = reason.as_str(), "delivery given up");
                return dead_letter(ctx, record, about, reason.as_str(), status, attempt, stop)
                    .await;
            }
        }
    }
}

/// One POST. Any answer is an outcome; so are timeouts and broken connections.
async fn send(ctx: &Ctx, request: &HttpDelivery) -> Outcome {
    let result = ctx
        .http
        .post(&ctx.delivery.url)
        .timeout(ctx.delivery.timeout)
        .headers(header_map(&request.headers))
        .body(request.body.clone())
        .send()
        .await;
    match result {
        Ok(mut answer) => {
            let retry_after = answer
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, SystemTime::now()));
            let code = answer.status().as_u16();
            drain_body(&mut answer).await;
            Outcome::Status { code, retry_after }
        }
        Err(e) if e.is_timeout() => Outcome::Timeout,
        Err(e) => Outcome::Transport(error_chain(&e)),
    }
}

/// A header the HTTP stack cannot carry (a `ce_` name with odd characters) is left out
/// rather than failing the event for ever.
fn header_map(headers: &[(String, String)]) -> HeaderMap {
    headers
        .iter()
        .filter_map(|(k, v)| {
            Some((
                HeaderName::try_from(k.as_str()).ok()?,
                HeaderValue::try_from(v.as_str()).ok()?,
            ))
        })
        .collect()
}

/// Reads the answer so the connection goes back to the pool; a huge one is dropped instead.
async fn drain_body(answer: &mut reqwest::Response) {
    let mut read = 0usize;
    while let Ok(Some(chunk)) = answer.chunk().await {
        read += chunk.len();
        if read > MAX_ANSWER_BYTES {
            return;
        }
    }
}

/// reqwest's own message is generic ("error sending request"); the cause says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Produces the record to the dead-letter topic (if any), retrying until the broker took it:
/// the event is committed only after that. False when stopped first.
async fn dead_letter(
    ctx: &Ctx,
    record: &ConsumedRecord<'_>,
    about: &About<'_>,
    reason: &str,
    status: Option<u16>,
    attempts: u32,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let Some(topic) = &ctx.delivery.dead_letter_topic else {
        tracing::error!(delivery = about.delivery, event_id = %about.event_id, trace_id = about.trace_id.map(display), partition = about.partition, offset = about.offset, reason, status, "event dropped: no dead_letter_topic");
        return true;
    };
    let out = dead_letter_record(topic, record, reason, status, attempts);
    loop {
        match ctx.producer.produce(&out).await {
            Ok(at) => {
                tracing::info!(delivery = about.delivery, event_id = %about.event_id, trace_id = about.trace_id.map(display), dead_letter_topic = %topic, partition = at.partition, offset = at.offset, reason, "event dead-lettered");
                return true;
            }
            Err(e) => {
                tracing::error!(delivery = about.delivery, event_id = %about.event_id, dead_letter_topic = %topic, error = %e, "dead-letter produce failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(DEAD_LETTER_RETRY) => {}
                    () = stopped(stop) => return false,
                }
            }
        }
    }
}

/// The original record (key, headers, value) plus where it came from and why it is here.
/// `OutRecord` carries text: a non-UTF-8 key or header value is kept lossily.
fn dead_letter_record(
    topic: &str,
    record: &ConsumedRecord,
    reason: &str,
    status: Option<u16>,
    attempts: u32,
) -> OutRecord {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let mut headers: Vec<(String, String)> = record
        .headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.map(text).unwrap_or_default()))
        .collect();
    headers.extend([
        ("eventwire_dlq_reason".to_owned(), reason.to_owned()),
        (
            "eventwire_dlq_status".to_owned(),
            status.map(|s| s.to_string()).unwrap_or_default(),
        ),
        ("eventwire_dlq_attempts".to_owned(), attempts.to_string()),
        ("eventwire_dlq_topic".to_owned(), record.topic.to_owned()),
        (
            "eventwire_dlq_partition".to_owned(),
            record.partition.to_string(),
        ),
        ("eventwire_dlq_offset".to_owned(), record.offset.to_string()),
    ]);
    OutRecord {
        topic: topic.to_owned(),
        key: record.key.map(text),
        headers,
        value: record.value.map(<[u8]>::to_vec),
    }
}

/// Records the event as done and commits its partition's next offset (asynchronously: a
/// lost commit only means a redelivery, and the sync commit on shutdown catches up).
fn mark_done(ctx: &Ctx, partition: i32, offset: i64) {
    ctx.done
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(partition, offset + 1);
    commit(ctx, &[(partition, offset + 1)], CommitMode::Async);
}

fn commit_done(ctx: &Ctx, mode: CommitMode) {
    let done: Vec<(i32, i64)> = ctx
        .done
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|(p, o)| (*p, *o))
        .collect();
    if !done.is_empty() {
        commit(ctx, &done, mode);
    }
}

fn commit(ctx: &Ctx, offsets: &[(i32, i64)], mode: CommitMode) {
    let mut tpl = TopicPartitionList::new();
    for (partition, next) in offsets {
        if let Err(e) =
            tpl.add_partition_offset(&ctx.delivery.topic, *partition, Offset::Offset(*next))
        {
            tracing::warn!(delivery = %ctx.name(), error = %e, "cannot name an offset to commit");
            return;
        }
    }
    // After a rebalance took the partition away the commit fails; the new owner redelivers
    // from the last committed offset (at least once).
    if let Err(e) = ctx.consumer.commit(&tpl, mode) {
        tracing::warn!(delivery = %ctx.name(), error = %e, "offset commit failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_record_keeps_the_original_and_says_why() {
        let record = ConsumedRecord {
            topic: "orders",
            partition: 2,
            offset: 41,
            key: Some(b"ord-1"),
            headers: vec![("ce_id", Some(b"e-1")), ("empty", None)],
            value: Some(b"{}"),
        };
        let out = dead_letter_record("orders.dlq", &record, "rejected", Some(400), 1);
        assert_eq!(out.topic, "orders.dlq");
        assert_eq!(out.key.as_deref(), Some("ord-1"));
        assert_eq!(out.value.as_deref(), Some(&b"{}"[..]));
        let h = |name: &str| {
            out.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("ce_id"), Some("e-1"));
        assert_eq!(h("eventwire_dlq_reason"), Some("rejected"));
        assert_eq!(h("eventwire_dlq_status"), Some("400"));
        assert_eq!(h("eventwire_dlq_attempts"), Some("1"));
        assert_eq!(h("eventwire_dlq_topic"), Some("orders"));
        assert_eq!(h("eventwire_dlq_partition"), Some("2"));
        assert_eq!(h("eventwire_dlq_offset"), Some("41"));
    }

    #[test]
    fn unusable_headers_are_left_out() {
        let map = header_map(&[
            ("ce-id".into(), "a".into()),
            ("ce-bad name".into(), "b".into()),
            ("ce-x".into(), "line\nbreak".into()),
        ]);
        assert_eq!(map.len(), 1);
    }
}
