//! The durable sink: an event is acknowledged only once it is durable, in Kafka or in the
//! local spool, and every spooled event is forwarded to Kafka in acceptance order.
//!
//! `--ack broker` (default): publish directly while the broker is healthy and nothing is
//! spooled; if the broker has not acknowledged within `--ack-timeout-ms`, or is down, or is
//! refusing, the event goes to the spool and the client hears `spooled`. While anything is
//! spooled, new events queue behind it, so order per key holds.
//! `--ack spool`: every event is spooled first; the answer never waits for the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::{ForwarderCell, ForwarderState, Metrics, Observed, Snapshot as Gauges};
use crate::producer::{KafkaProducer, Pending};
use crate::sink::{BoxFuture, Delivered, EventRecord, EventSink, Outcome, PublishError};
use crate::spool::{Entry, Refused, Spool, SpoolError};
use crate::status::{Accepted, Snapshot, State, StatusStore};

/// How long a request whose event the spool refused still waits for its in-flight write.
const IN_DOUBT_WAIT: Duration = Duration::from_millis(1500);
/// At shutdown, the send in progress may finish within this; cutting it would make the
/// next start send it again.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);
/// Spooled records in the producer at once while a backlog drains: enough to fill its
/// batches (`linger.ms`) many times over, few enough that a shutdown finishes them.
const FORWARD_IN_FLIGHT: usize = 256;
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AckMode {
    Broker,
    Spool,
}

pub struct DurableSink {
    kafka: Arc<KafkaProducer>,
    spool: Spool,
    /// Owned here: every state of an accepted event is written by what made it durable.
    status: Arc<StatusStore>,
    mode: AckMode,
    ack_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Events handed to the producer directly whose request still waits for the broker.
    direct: AtomicI64,
    forwarder: ForwarderCell,
}

/// Counts a direct publish as in flight while its request waits for the broker.
struct Direct<'a>(&'a AtomicI64);

impl<'a> Direct<'a> {
    fn enter(count: &'a AtomicI64) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Direct(count)
    }
}

impl Drop for Direct<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DurableSink {
    pub fn new(
        kafka: Arc<KafkaProducer>,
        spool: Spool,
        status: StatusStore,
        mode: AckMode,
        ack_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        DurableSink {
            kafka,
            spool,
            status: Arc::new(status),
            mode,
            ack_timeout,
            metrics,
            direct: AtomicI64::new(0),
            forwarder: ForwarderCell::default(),
        }
    }

    /// Accepts through the status store; the event is counted only when this request made
    /// it durable (a repeated id was counted by its first).
    async fn accept_counted(&self, event: EventRecord) -> Result<Accepted, PublishError> {
        let bytes = event.record.value.as_ref().map_or(0, Vec::len);
        let accepted = self.status.once(event, |e| self.make_durable(e)).await;
        if let Ok(Accepted::New(snapshot)) = &accepted {
            self.metrics.event_accepted(&snapshot.topic, bytes);
        }
        accepted
    }

    async fn make_durable(&self, event: EventRecord) -> Result<Outcome, PublishError> {
        if !self.kafka.is_ready() {
            // Without the broker the topic cannot be checked; a topic known to be missing
            // is still refused at once.
            if self.kafka.cached_topic(&event.record.topic) == Some(false) {
                return Err(PublishError::UnknownTopic(event.record.topic));
            }
            return self.spool(event, None).await;
        }
        // Checked in spool mode too (cached): a typo in a topic is a 404 now, not a record
        // that blocks the forwarder until the producer gives up on it.
        match self.kafka.check_topic(&event.record.topic).await {
            Err(e) if e.is_permanent() => return Err(e),
            Err(_) => return self.spool(event, None).await,
            Ok(()) => {}
        }
        if self.mode == AckMode::Spool || self.spool.backlog() > 0 {
            return self.spool(event, None).await;
        }
        let mut pending = match self.kafka.enqueue(&event.record) {
            Ok(p) => p,
            Err(e) if e.is_permanent() => return Err(e),
            // Queue full or producer trouble: the spool absorbs it.
            Err(_) => return self.spool(event, None).await,
        };
        let waited = {
            let _direct = Direct::enter(&self.direct);
            tokio::time::timeout(self.ack_timeout, pending.wait()).await
        };
        match waited {
            Ok(Ok(d)) => Ok(Outcome::Published(d)),
            Ok(Err(e)) if e.is_permanent() => Err(e),
            Ok(Err(_)) => {
                self.kafka.recover_if_fatal();
                self.spool(event, None).await
            }
            // Still in flight: spool it and let the forwarder hear the late answer.
            Err(_) => self.spool_in_flight(event, pending).await,
        }
    }

    /// Spools an event whose write is still in flight. If the spool refuses it, the answer
    /// comes from that write after all: waiting a little longer for it, and else recording
    /// its late outcome, so that a client retrying the same id after our 503 gets the first
    /// answer instead of a second record.
    async fn spool_in_flight(
        &self,
        event: EventRecord,
        pending: Pending,
    ) -> Result<Outcome, PublishError> {
        let keep = event.clone();
        let (refused, pending) = match self.spool.append(event, Some(pending)).await {
            Ok(_) => return Ok(Outcome::Spooled),
            Err(Refused { error, pending }) => (spool_error(error), pending),
        };
        let Some(mut pending) = pending else {
            return Err(refused);
        };
        match tokio::time::timeout(IN_DOUBT_WAIT, pending.wait()).await {
            Ok(Ok(d)) => Ok(Outcome::Published(d)),
            Ok(Err(e)) if e.is_permanent() => Err(e),
            Ok(Err(_)) => Err(refused),
            Err(_) => {
                let status = self.status.clone();
                tokio::spawn(async move {
                    if let Ok(d) = pending.wait().await {
                        tracing::warn!(event_id = %keep.id, trace_id = keep.trace_id().map(display), "an event answered 503 was published after all; a retry with its id gets this answer");
                        let state = State::Published {
                            partition: d.partition,
                            offset: d.offset,
                        };
                        status.record(&keep, state);
                    }
                });
                Err(refused)
            }
        }
    }

    async fn spool(
        &self,
        event: EventRecord,
        pending: Option<Pending>,
    ) -> Result<Outcome, PublishError> {
        // Only for the debug line: the event moves into the spool.
        let about =
            tracing::enabled!(tracing::Level::DEBUG).then(|| (event.id.clone(), event.trace_id()));
        match self.spool.append(event, pending).await {
            Ok(seq) => {
                if let Some((id, trace_id)) = about {
                    tracing::debug!(event_id = %id, trace_id = trace_id.map(display), seq, "event spooled");
                }
                Ok(Outcome::Spooled)
            }
            Err(refused) => Err(spool_error(refused.error)),
        }
    }

    /// Forwards spooled events until `stop` turns true. Up to `FORWARD_IN_FLIGHT` records
    /// are handed to the producer ahead of the oldest unfinished one, so a backlog drains at
    /// the broker's rate instead of one round trip per event; results are taken in spool
    /// order, so the `forwarded` position and every status move in acceptance order. Order
    /// per partition is the idempotent producer's: it keeps in-flight batches in order across
    /// its own retries. Only when it gives up on a record (after the delivery timeout) can
    /// records behind it land first; the records of that partition time out in order too.
    /// An event taken but not yet forwarded at shutdown stays in the spool and is forwarded
    /// by the next start.
    pub fn spawn_forwarder(
        self: &Arc<Self>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut window = Window::default();
            loop {
                let oldest = match window.entries.pop_front() {
                    Some(entry) => entry,
                    None => {
                        this.forwarder.set(ForwarderState::Idle);
                        window.blocked = false;
                        tokio::select! {
                            e = this.spool.next() => this.hand_over(e, &mut window),
                            _ = stop.wait_for(|s| *s) => break,
                        }
                        continue;
                    }
                };
                this.forwarder.set(ForwarderState::Forwarding);
                let forward = this.forward(oldest);
                tokio::pin!(forward);
                let stopping = loop {
                    tokio::select! {
                        () = &mut forward => break false,
                        e = this.spool.next(), if window.has_room() => this.hand_over(e, &mut window),
                        _ = stop.wait_for(|s| *s) => break true,
                    }
                };
                if stopping {
                    let rest = async {
                        forward.await;
                        while let Some(entry) = window.entries.pop_front() {
                            this.forward(entry).await;
                        }
                    };
                    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, rest).await;
                    break;
                }
            }
            this.forwarder.set(ForwarderState::Stopped);
        })
    }

    /// Puts a spooled event in flight behind the others. If the producer does not take it,
    /// nothing more is sent ahead of it: it is sent (and retried) when its turn comes.
    fn hand_over(&self, mut entry: Entry, window: &mut Window) {
        if entry.pending.is_none() && !window.blocked {
            entry.pending = self.kafka.enqueue(&entry.event.record).ok();
        }
        window.blocked |= entry.pending.is_none();
        window.entries.push_back(entry);
    }

    async fn forward(&self, mut entry: Entry) {
        let mut result = match entry.pending.as_mut() {
            Some(p) => Some(p.wait().await),
            None => None,
        };
        // The first retry goes at once: a failure of a record sent ahead is old news by the
        // time its turn comes (the records before it were retried meanwhile).
        let mut backoff = Duration::ZERO;
        loop {
            match result {
                Some(Ok(d)) => return self.forwarded(&entry, Ok(d)).await,
                Some(Err(e)) if e.is_permanent() => return self.forwarded(&entry, Err(e)).await,
                Some(Err(e)) => {
                    self.forwarder.set(ForwarderState::WaitingForBroker);
                    tracing::warn!(event_id = %entry.event.id, trace_id = entry.event.trace_id().map(display), error = %e, retry_in_ms = backoff.as_millis() as u64, "spool: forwarding failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).clamp(RETRY_FIRST, RETRY_MAX);
                }
                None => {}
            }
            result = Some(self.kafka.produce(&entry.event.record).await);
        }
    }

    async fn forwarded(&self, entry: &Entry, result: Result<Delivered, PublishError>) {
        let ev = &entry.event;
        let state = match result {
            Ok(d) => {
                tracing::debug!(event_id = %ev.id, trace_id = ev.trace_id().map(display), partition = d.partition, offset = d.offset, "spooled event published");
                State::Published {
                    partition: d.partition,
                    offset: d.offset,
                }
            }
            Err(e) => {
                // Never dropped silently: kept in the dead-letter file and reported.
                tracing::error!(event_id = %ev.id, trace_id = ev.trace_id().map(display), topic = %ev.record.topic, error = %e, "spooled event cannot be published; moved to the dead-letter file");
                while let Err(io) = self.spool.dead_letter(ev) {
                    tracing::error!(event_id = %ev.id, trace_id = ev.trace_id().map(display), error = %io, "dead-letter write failed; retrying");
                    tokio::time::sleep(RETRY_MAX).await;
                }
                State::Failed {
                    reason: e.to_string(),
                }
            }
        };
        self.status.update(&ev.id, &ev.source, state);
        self.spool.forwarded(entry);
    }
}

/// The spooled events the forwarder has taken, oldest first, most already in the producer.
#[derive(Default)]
struct Window {
    entries: std::collections::VecDeque<Entry>,
    /// The producer refused one of them: take no more until it has been forwarded.
    blocked: bool,
}

impl Window {
    fn has_room(&self) -> bool {
        !self.blocked && self.entries.len() < FORWARD_IN_FLIGHT
    }
}

fn spool_error(e: SpoolError) -> PublishError {
    match e {
        SpoolError::Full(bytes) => PublishError::SpoolFull(format!(
            "the spool holds {bytes} bytes waiting for the broker, its limit"
        )),
        e => PublishError::Unavailable(format!("could not spool the event: {e}")),
    }
}

impl EventSink for DurableSink {
    fn accept(&self, event: EventRecord) -> BoxFuture<'_, Result<Accepted, PublishError>> {
        Box::pin(self.accept_counted(event))
    }

    fn accept_batch(
        &self,
        events: Vec<EventRecord>,
    ) -> BoxFuture<'_, Vec<Result<Accepted, PublishError>>> {
        Box::pin(async move {
            // One topic lookup first: then every event's check answers from the cache without
            // yielding, so the events reach the producer (or the spool) in batch order, which
            // the producer keeps per partition.
            if let Some(first) = events.first()
                && self.kafka.is_ready()
            {
                let _ = self.kafka.check_topic(&first.record.topic).await;
            }
            crate::sink::accept_each(self, events).await
        })
    }

    fn status(&self, id: &str, source: Option<&str>) -> Option<Snapshot> {
        self.status.get(id, source)
    }

    fn is_ready(&self) -> bool {
        self.kafka.is_ready()
    }
}

impl Observed for DurableSink {
    fn observe(&self, metrics: &Metrics) {
        let spooled = i64::try_from(self.spool.backlog()).unwrap_or(i64::MAX);
        let broker_up = self.kafka.is_ready();
        // A record with the producer while the broker is unreachable waits for it: the
        // producer only reports the failure after its delivery timeout.
        let forwarder = match self.forwarder.get() {
            ForwarderState::Forwarding if !broker_up => ForwarderState::WaitingForBroker,
            state => state,
        };
        metrics.set_durable(&Gauges {
            in_flight: self.direct.load(Ordering::Relaxed) + spooled,
            spool_records: spooled,
            spool_bytes: i64::try_from(self.spool.bytes()).unwrap_or(i64::MAX),
            idempotency_entries: i64::try_from(self.status.entry_count()).unwrap_or(i64::MAX),
            broker_up,
            forwarder,
        });
    }
}
