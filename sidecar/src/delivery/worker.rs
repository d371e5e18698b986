//! The running side of one delivery: a group consumer, one lane (task) per partition that
//! POSTs its events one at a time in offset order, and the offset commit after each event
//! is done with (2xx and its reply published, filtered out, or dead-lettered).
//!
//! The dispatcher reads the consumer and hands each record to its partition's lane through a
//! small channel. A lane stuck on retries must not hold the others up, so when its channel
//! is full the dispatcher parks further records of that partition in an overflow list and
//! pauses the partition (librdkafka stops fetching it, so the list stays bounded by what was
//! already prefetched); it resumes once the lane caught up.
//!
//! When a rebalance takes partitions away, their finished offsets are committed at once and
//! their lanes stop after the event in hand, without committing it: the new owner delivers
//! from the committed offset, so only events in flight at the handover are delivered twice.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::config::{Delivery, Order};
use super::keyorder::{Key, KeyOrder};
use super::policy::{Outcome, RetryPolicy, Verdict, retry_after};
use super::reply::{self, Original};
use super::request::{self, HttpDelivery};
use crate::cloudevent::ConsumedRecord;
use crate::metrics::{DeliveryMetrics, Metrics};
use crate::producer::KafkaProducer;
use crate::schema::Schemas;
use crate::sink::OutRecord;
use crate::trace_context::{TRACEPARENT, TraceId, TraceParent};
use crate::{consumed, kafka_config};

/// Records a lane may have queued before its partition is paused.
const LANE_CAPACITY: usize = 64;
/// How often parked records are offered to their lanes again.
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);
/// How often the lag is measured: a broker round trip per owned partition.
const LAG_INTERVAL: Duration = Duration::from_secs(5);
const LAG_TIMEOUT: Duration = Duration::from_secs(3);
/// A failing dead-letter or reply produce is retried this often (the partition waits).
const PRODUCE_RETRY: Duration = Duration::from_secs(1);
/// Answer bodies are read (so the connection can be reused, or as a reply) up to this much.
const MAX_ANSWER_BYTES: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("delivery `{name}`: Kafka consumer: {source}")]
    Kafka {
        name: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("delivery `{name}`: client certificate: {reason}")]
    Identity { name: String, reason: String },
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
    pub metrics: Arc<Metrics>,
    /// `--schema-dir`: replies are held to the schemas ingested events are.
    pub schemas: Arc<Schemas>,
}

/// Starts one delivery; it runs until `stop` turns true, then finishes the event in flight
/// on each partition, commits, and ends its task.
pub fn start(
    delivery: Delivery,
    shared: &Shared,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, WorkerError> {
    let ctx = Arc::new(Ctx::new(delivery, shared)?);
    tracing::info!(delivery = %ctx.delivery.name, topic = %ctx.delivery.topic, url = %ctx.delivery.url, group = %ctx.delivery.group, "delivering a topic to an HTTP service");
    Ok(tokio::spawn(dispatch(ctx, stop)))
}

struct Ctx {
    delivery: Delivery,
    policy: RetryPolicy,
    consumer: StreamConsumer<Owned>,
    producer: Arc<KafkaProducer>,
    http: reqwest::Client,
    /// `max_in_flight` permits: one per POST, across the delivery's lanes.
    in_flight: tokio::sync::Semaphore,
    metrics: DeliveryMetrics,
    schemas: Arc<Schemas>,
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
            // A sidecar that died holds its partitions until its session times out; 10 s
            // instead of librdkafka's 45 s bounds that stall after a crash (`--kafka` wins).
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "3000")
            .set(
                "fetch.wait.max.ms",
                shared.fetch_wait.as_millis().to_string(),
            );
        let owned = Owned {
            name: delivery.name.clone(),
            partitions: Mutex::default(),
        };
        let consumer: StreamConsumer<Owned> =
            kafka_config::with_overrides(config, &shared.overrides)
                .create_with_context(owned)
                .map_err(kafka)?;
        consumer.subscribe(&[&delivery.topic]).map_err(kafka)?;
        let http_error = |source| WorkerError::Http {
            name: delivery.name.clone(),
            source,
        };
        // The `ca_file`'s CAs are trusted besides the system's (OpenSSL's store); the server's
        // certificate and name are always checked.
        let extra_cas = delivery
            .ca_file
            .iter()
            .flat_map(|ca| &ca.certificates)
            .map(|der| reqwest::Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .map_err(http_error)?;
        let mut http = reqwest::Client::builder()
            // A 3xx is the service's answer, not something to follow (policy gives up).
            .redirect(reqwest::redirect::Policy::none())
            .tls_certs_merge(extra_cas);
        if let Some(id) = &delivery.client_identity {
            let identity =
                super::config::identity(&id.cert_pem, &id.key_pem).map_err(|reason| {
                    WorkerError::Identity {
                        name: delivery.name.clone(),
                        reason,
                    }
                })?;
            http = http.identity(identity);
        }
        let http = http.build().map_err(http_error)?;
        Ok(Ctx {
            policy: RetryPolicy {
                max_attempts: delivery.max_attempts,
                initial_backoff: delivery.initial_backoff,
                max_backoff: delivery.max_backoff,
            },
            metrics: shared.metrics.delivery(&delivery.name),
            in_flight: tokio::sync::Semaphore::new(delivery.max_in_flight as usize),
            delivery,
            consumer,
            producer: shared.producer.clone(),
            http,
            schemas: shared.schemas.clone(),
        })
    }

    fn name(&self) -> &str {
        &self.delivery.name
    }

    fn owned(&self) -> &Owned {
        self.consumer.context()
    }
}

/// The partitions this member works on, shared with the consumer's rebalance callback.
struct Owned {
    name: String,
    partitions: Mutex<HashMap<i32, Claim>>,
}

/// One owned partition: its lane's revoked flag, and the offset after the last event done
/// with (what is committed).
struct Claim {
    revoked: Arc<AtomicBool>,
    next: Option<i64>,
}

impl Owned {
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Claim>> {
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A new lane's flag for `partition`; a previous lane of it (revoked since) stops.
    fn claim(&self, partition: i32) -> Arc<AtomicBool> {
        let revoked = Arc::new(AtomicBool::new(false));
        let claim = Claim {
            revoked: revoked.clone(),
            next: None,
        };
        if let Some(old) = self.lock().insert(partition, claim) {
            old.revoked.store(true, Ordering::Release);
        }
        revoked
    }

    /// Records `next` as the partition's offset to commit; false if the lane lost it.
    fn done(&self, partition: i32, revoked: &AtomicBool, next: i64) -> bool {
        let mut owned = self.lock();
        match owned.get_mut(&partition) {
            Some(claim) if !revoked.load(Ordering::Acquire) => {
                claim.next = Some(next);
                true
            }
            _ => false,
        }
    }

    /// Forgets `partitions` and stops their lanes; returns their offsets to commit now.
    fn release(&self, partitions: impl Iterator<Item = i32>) -> Vec<(i32, i64)> {
        let mut owned = self.lock();
        let mut finished = Vec::new();
        for partition in partitions {
            if let Some(claim) = owned.remove(&partition) {
                claim.revoked.store(true, Ordering::Release);
                finished.extend(claim.next.map(|next| (partition, next)));
            }
        }
        finished
    }

    /// The offset after the last event of `partition` done with, if any yet.
    fn next(&self, partition: i32) -> Option<i64> {
        self.lock().get(&partition).and_then(|claim| claim.next)
    }

    fn finished(&self) -> Vec<(i32, i64)> {
        self.lock()
            .iter()
            .filter_map(|(p, claim)| Some((*p, claim.next?)))
            .collect()
    }
}

impl ClientContext for Owned {}

impl ConsumerContext for Owned {
    /// Runs inside librdkafka's rebalance, before the partitions go: the last word on them.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Owned>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let elements = revoked.elements();
        let Some(topic) = elements.first().map(|e| e.topic().to_owned()) else {
            return;
        };
        let finished = self.release(elements.iter().map(|e| e.partition()));
        tracing::info!(delivery = %self.name, partitions = elements.len(), "partitions revoked (rebalance)");
        if !finished.is_empty() {
            commit_offsets(consumer, &self.name, &topic, &finished, CommitMode::Sync);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Owned>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            let partitions: Vec<i32> = assigned.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(delivery = %self.name, ?partitions, "partitions assigned");
        }
    }
}

/// One partition's queue: the lane task's channel plus what waits for room in it.
struct Lane {
    partition: i32,
    tx: mpsc::Sender<OwnedMessage>,
    overflow: VecDeque<OwnedMessage>,
    paused: bool,
    revoked: Arc<AtomicBool>,
    /// The highest offset handed on: a refetch after a pause repeats records the lane
    /// already has, which must not be delivered twice by this sidecar.
    last: i64,
    /// The lane's first offset: where the partition stands until an event is done with.
    first: i64,
}

async fn dispatch(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut lanes: HashMap<i32, Lane> = HashMap::new();
    let mut tasks: HashMap<i32, JoinHandle<()>> = HashMap::new();
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    let mut lag_tick = tokio::time::interval(LAG_INTERVAL);
    let mut lag_task: Option<JoinHandle<()>> = None;
    while !*stop.borrow() {
        tokio::select! {
            _ = stop.changed() => break,
            received = ctx.consumer.recv() => match received {
                Ok(message) => {
                    let message = message.detach();
                    let (partition, offset) = (message.partition(), message.offset());
                    // After a rebalance the partition starts over from its committed offset.
                    if lanes.get(&partition).is_some_and(|l| l.revoked.load(Ordering::Acquire)) {
                        lanes.remove(&partition);
                    }
                    let lane = lanes.entry(partition).or_insert_with(|| {
                        let revoked = ctx.owned().claim(partition);
                        let (tx, rx) = mpsc::channel(LANE_CAPACITY);
                        let previous = tasks.remove(&partition);
                        let task = start_lane(ctx.clone(), previous, rx, revoked.clone(), stop.clone());
                        tasks.insert(partition, task);
                        Lane { partition, tx, overflow: VecDeque::new(), paused: false, revoked, last: -1, first: offset }
                    });
                    offer(&ctx, lane, message);
                }
                Err(e) => {
                    tracing::warn!(delivery = %ctx.name(), error = %e, "consumer error");
                    tokio::time::sleep(DRAIN_INTERVAL).await;
                }
            },
            _ = drain.tick() => {
                lanes.retain(|_, lane| !lane.revoked.load(Ordering::Acquire));
                lanes.values_mut().for_each(|lane| flush(&ctx, lane));
                tasks.retain(|_, task| !task.is_finished());
            }
            _ = lag_tick.tick() => {
                if lag_task.as_ref().is_none_or(JoinHandle::is_finished) {
                    let positions = positions(&ctx, &lanes);
                    let ctx = ctx.clone();
                    lag_task = Some(tokio::task::spawn_blocking(move || measure_lag(&ctx, &positions)));
                }
            }
        }
    }
    // Closing the channels and the stop flag let each lane end after its current event.
    drop(lanes);
    for task in tasks.into_values() {
        let _ = task.await;
    }
    let finished = ctx.owned().finished();
    if !finished.is_empty() {
        let topic = &ctx.delivery.topic;
        commit_offsets(
            &ctx.consumer,
            ctx.name(),
            topic,
            &finished,
            CommitMode::Sync,
        );
    }
    // A delivery removed by a reload leaves no stale backlog behind in the metrics.
    ctx.metrics.set_lag(0);
    tracing::info!(delivery = %ctx.name(), "delivery stopped");
}

/// Each owned partition's offset to commit next (what is done with is before it).
fn positions(ctx: &Ctx, lanes: &HashMap<i32, Lane>) -> Vec<(i32, i64)> {
    lanes
        .values()
        .filter(|lane| !lane.revoked.load(Ordering::Acquire))
        .map(|lane| {
            let next = ctx.owned().next(lane.partition);
            (lane.partition, next.unwrap_or(lane.first))
        })
        .collect()
}

/// The partitions' end offsets from the broker (not librdkafka's cached ones: a paused
/// partition is not fetched, and its backlog is what the lag is for). Blocking.
fn measure_lag(ctx: &Ctx, positions: &[(i32, i64)]) {
    let topic = &ctx.delivery.topic;
    let mut lag = 0;
    for &(partition, next) in positions {
        match ctx.consumer.fetch_watermarks(topic, partition, LAG_TIMEOUT) {
            Ok((_low, high)) => lag += (high - next).max(0),
            // The last value stays: an unreachable broker is its own alert.
            Err(e) => {
                tracing::debug!(delivery = %ctx.name(), partition, error = %e, "cannot measure the lag");
                return;
            }
        }
    }
    ctx.metrics.set_lag(lag);
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
            // The lane ended (shutdown or revoked): nothing more to hand it.
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

/// A partition kept through a rebalance gets a new lane while the old one may still wait
/// for its last answer: the new one starts after it, so the partition stays one at a time.
fn start_lane(
    ctx: Arc<Ctx>,
    previous: Option<JoinHandle<()>>,
    rx: mpsc::Receiver<OwnedMessage>,
    revoked: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Some(previous) = previous {
            let _ = previous.await;
        }
        match ctx.delivery.ordering {
            Order::Partition => run_lane(ctx, rx, revoked, stop).await,
            Order::Key => run_lane_by_key(ctx, rx, revoked, stop).await,
        }
    })
}

/// One partition: its events one at a time, in order; each committed once done with.
async fn run_lane(
    ctx: Arc<Ctx>,
    mut rx: mpsc::Receiver<OwnedMessage>,
    revoked: Arc<AtomicBool>,
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
        if revoked.load(Ordering::Acquire) {
            return;
        }
        // Not done (stopped while waiting to retry): left uncommitted for the next owner.
        if !handle(&ctx, &message, &mut stop).await {
            return;
        }
        commit_done(&ctx, message.partition(), message.offset() + 1, &revoked);
    }
}

/// Records `next` as the partition's offset to commit and commits it, unless the lane lost
/// the partition. Async: a lost commit only means a redelivery; the sync commit at the end
/// catches up.
fn commit_done(ctx: &Ctx, partition: i32, next: i64, revoked: &AtomicBool) {
    if ctx.owned().done(partition, revoked, next) {
        let topic = &ctx.delivery.topic;
        commit_offsets(
            &ctx.consumer,
            ctx.name(),
            topic,
            &[(partition, next)],
            CommitMode::Async,
        );
    }
}

/// One partition with `ordering = "key"`: each key's events one at a time, in order, keys
/// side by side (`keyorder`), at most a lane's capacity of events taken in at once; the
/// commit follows the lowest offset not yet done with.
async fn run_lane_by_key(
    ctx: Arc<Ctx>,
    mut rx: mpsc::Receiver<OwnedMessage>,
    revoked: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut order: KeyOrder<OwnedMessage> = KeyOrder::new();
    let mut running: tokio::task::JoinSet<(OwnedMessage, bool)> = tokio::task::JoinSet::new();
    let stop_tasks = stop.clone();
    let start = |running: &mut tokio::task::JoinSet<_>, message: OwnedMessage| {
        let (ctx, mut stop) = (ctx.clone(), stop_tasks.clone());
        running.spawn(async move {
            let done = handle(&ctx, &message, &mut stop).await;
            (message, done)
        });
    };
    // Once stopped, revoked or closed: nothing new starts; what runs finishes.
    let mut ending = false;
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut stop), if !ending => ending = true,
            joined = running.join_next(), if !running.is_empty() => {
                let Some(Ok((message, done))) = joined else { continue };
                // Not done (stopped while waiting to retry): left uncommitted.
                if !done {
                    ending = true;
                    continue;
                }
                let (next, commit) = order.done(message.offset(), &key_of(&message));
                if let Some(commit) = commit {
                    commit_done(&ctx, message.partition(), commit, &revoked);
                }
                ending |= revoked.load(Ordering::Acquire);
                if let (false, Some(next)) = (ending, next) {
                    start(&mut running, next);
                }
            }
            received = rx.recv(), if !ending && order.len() < LANE_CAPACITY => match received {
                Some(message) if !revoked.load(Ordering::Acquire) => {
                    let (offset, key) = (message.offset(), key_of(&message));
                    if let Some(message) = order.admit(offset, key, message) {
                        start(&mut running, message);
                    }
                }
                _ => ending = true,
            },
        }
        if ending && running.is_empty() {
            return;
        }
    }
}

fn key_of(message: &OwnedMessage) -> Key {
    message.key().map(<[u8]>::to_vec)
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
        trace_id: header_text(&record, TRACEPARENT)
            .and_then(|t| TraceParent::parse(t).ok())
            .map(|t| t.trace_id),
        partition: record.partition,
        offset: record.offset,
    };
    let request = match request::build(&record, ctx.delivery.content_mode) {
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
        ctx.metrics.event("filtered");
        return true;
    }
    deliver(ctx, &record, &request, &about, stop).await
}

/// The value of a `ce_<attribute>` record header, if it is text.
fn header_text<'a>(record: &ConsumedRecord<'a>, attribute: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .find(|(k, _)| k.strip_prefix("ce_") == Some(attribute))
        .and_then(|(_, v)| std::str::from_utf8((*v)?).ok())
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
        let (outcome, answer) = send(ctx, request).await;
        let random = getrandom::u64().unwrap_or(u64::MAX / 2);
        match ctx.policy.decide(&outcome, attempt, random) {
            Verdict::Done => {
                tracing::debug!(delivery = about.delivery, event_id = %about.event_id, trace_id = about.trace_id.map(display), attempt, "delivered");
                ctx.metrics.event("delivered");
                return match answer {
                    Some(answer) => publish_reply(ctx, record, about, &answer, stop).await,
                    None => true,
                };
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

/// A 2xx answer kept to be read as a possible reply.
struct Answer {
    headers: HeaderMap,
    body: Option<Vec<u8>>,
}

/// One POST. Any answer is an outcome; so are timeouts and broken connections. A 2xx
/// answer is kept when the delivery publishes replies.
async fn send(ctx: &Ctx, request: &HttpDelivery) -> (Outcome, Option<Answer>) {
    // Never closed, so acquiring only waits.
    let _permit = ctx.in_flight.acquire().await;
    let started = Instant::now();
    let result = ctx
        .http
        .post(&ctx.delivery.url)
        .timeout(ctx.delivery.timeout)
        .headers(header_map(&request.headers))
        .body(request.body.clone())
        .send()
        .await;
    let (outcome, answer) = match result {
        Ok(mut answer) => {
            let retry_after = answer
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, SystemTime::now()));
            let code = answer.status().as_u16();
            let keep = ctx.delivery.wants_replies() && answer.status().is_success();
            let headers = keep.then(|| std::mem::take(answer.headers_mut()));
            let body = read_body(&mut answer, keep).await;
            let kept = headers.map(|headers| Answer { headers, body });
            (Outcome::Status { code, retry_after }, kept)
        }
        Err(e) if e.is_timeout() => (Outcome::Timeout, None),
        Err(e) => (Outcome::Transport(error_chain(&e)), None),
    };
    ctx.metrics.attempt(&outcome, started.elapsed());
    (outcome, answer)
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

/// Reads the answer so the connection goes back to the pool, keeping it if asked; a huge
/// one (or a broken read) is dropped and gives `None`.
async fn read_body(answer: &mut reqwest::Response, keep: bool) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut read = 0usize;
    loop {
        match answer.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                if read > MAX_ANSWER_BYTES {
                    return None;
                }
                if keep {
                    body.extend_from_slice(&chunk);
                }
            }
            Ok(None) => return Some(body),
            Err(_) => return None,
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

/// Publishes the service's reply, if its answer is one. A reply that cannot be published
/// (not valid, no topic for its type) is logged and counted: the service did take the
/// command, so retrying the event would repeat it. False when stopped first.
async fn publish_reply(
    ctx: &Ctx,
    record: &ConsumedRecord<'_>,
    about: &About<'_>,
    answer: &Answer,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let original = Original {
        id: &about.event_id,
        key: record.key,
        traceparent: header_text(record, TRACEPARENT),
        tracestate: header_text(record, "tracestate"),
    };
    let body = match &answer.body {
        Some(body) => reply::Body::Whole(body),
        None => reply::Body::TooLarge(MAX_ANSWER_BYTES),
    };
    let topic_for = |ty: &str| ctx.delivery.reply_topic_for(ty).map(str::to_owned);
    let out = match reply::reply(&answer.headers, body, &original, topic_for, &ctx.schemas) {
        Ok(Some(out)) => out,
        Ok(None) => return true,
        Err(e) => {
            tracing::error!(delivery = about.delivery, event_id = %about.event_id, trace_id = about.trace_id.map(display), error = %e, "reply not published");
            ctx.metrics.reply(e.as_str());
            return true;
        }
    };
    let reply_id = header_text_out(&out, "ce_id");
    if !produce_until_taken(ctx, &out, about, "reply", stop).await {
        return false;
    }
    tracing::info!(delivery = about.delivery, event_id = %about.event_id, trace_id = about.trace_id.map(display), reply_id, reply_topic = %out.topic, "reply published");
    ctx.metrics.reply("published");
    true
}

fn header_text_out<'a>(out: &'a OutRecord, name: &str) -> &'a str {
    out.headers
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// Produces `out`, retrying until the broker took it; false when stopped first.
async fn produce_until_taken(
    ctx: &Ctx,
    out: &OutRecord,
    about: &About<'_>,
    what: &'static str,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        match ctx.producer.produce(out).await {
            Ok(_) => return true,
            Err(e) => {
                tracing::error!(delivery = about.delivery, event_id = %about.event_id, topic = %out.topic, error = %e, "{what} produce failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(PRODUCE_RETRY) => {}
                    () = stopped(stop) => return false,
                }
            }
        }
    }
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
        ctx.metrics.event("dropped");
        return true;
    };
    let out = dead_letter_record(topic, record, reason, status, attempts);
    if !produce_until_taken(ctx, &out, about, "dead-letter", stop).await {
        return false;
    }
    tracing::info!(delivery = about.delivery, event_id = %about.event_id, trace_id = about.trace_id.map(display), dead_letter_topic = %topic, reason, "event dead-lettered");
    ctx.metrics.event("dead_lettered");
    true
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

fn commit_offsets<C: Consumer<Owned>>(
    consumer: &C,
    name: &str,
    topic: &str,
    offsets: &[(i32, i64)],
    mode: CommitMode,
) {
    let mut tpl = TopicPartitionList::new();
    for (partition, next) in offsets {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            tracing::warn!(delivery = %name, error = %e, "cannot name an offset to commit");
            return;
        }
    }
    // After a rebalance took the partition away the commit fails; the new owner redelivers
    // from the last committed offset (at least once).
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(delivery = %name, error = %e, "offset commit failed");
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
