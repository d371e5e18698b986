//! A topic's hub: one consumer whose records are serialized once and broadcast to every
//! subscriber of the topic, started on the first subscriber and stopped after a grace
//! period without any.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, Shared};
use rdkafka::consumer::Consumer;
use rdkafka::message::BorrowedMessage;
use tokio::sync::broadcast;

use super::kafka::{HighWatermarks, HubConsumer, assignment};
use super::{Fanout, FanoutError, lock, stopped};
use crate::cursor::Cursor;
use crate::subscription_filter::{Attributes, attributes_of};
use crate::telemetry;
use crate::trace_context::{TRACEPARENT_HEADER, TRACESTATE_HEADER};

/// How often a hub checks whether it still has subscribers.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// After a consumer error, wait before polling again so a down broker is not hammered.
const ERROR_BACKOFF: Duration = Duration::from_millis(500);

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

/// `eventwire.deliver` for a record about to be broadcast, when spans are exported.
fn deliver_span(message: &BorrowedMessage<'_>, subscribers: usize) -> tracing::Span {
    if !telemetry::enabled() {
        return tracing::Span::none();
    }
    let record = crate::consumed::record(message);
    let header = |name: &str| {
        let (_, value) = record.headers.iter().find(|(k, _)| *k == name)?;
        std::str::from_utf8((*value)?).ok()
    };
    telemetry::deliver_span(&telemetry::Consumed {
        topic: record.topic,
        partition: record.partition,
        offset: record.offset,
        event_id: header("ce_id"),
        traceparent: header(TRACEPARENT_HEADER),
        tracestate: header(TRACESTATE_HEADER),
        subscribers,
    })
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

pub struct Hub {
    tx: broadcast::Sender<Arc<Delivery>>,
    /// Advanced and broadcast under one lock, so a joiner's (`rx`, `position`) agree.
    position: Mutex<Cursor>,
    partitions: Vec<i32>,
    /// Advanced under the `position` lock too.
    published: Arc<AtomicU64>,
    /// What the consumer's fetches last saw of each partition's end.
    marks: Arc<HighWatermarks>,
}

impl Hub {
    pub fn join(&self) -> Joined {
        let position = lock(&self.position);
        Joined {
            rx: self.tx.subscribe(),
            position: position.clone(),
            partitions: self.partitions.clone(),
            published: self.published.clone(),
            bytes: self.published.load(Ordering::Relaxed),
        }
    }

    /// Records between each partition's high watermark and the hub's position, for the
    /// partitions whose watermark the consumer has reported.
    pub fn lag(&self) -> Vec<(i32, i64)> {
        let marks = self.marks.get();
        let position = lock(&self.position);
        marks
            .into_iter()
            .filter_map(|(p, high)| Some((p, (high - position.get(p)?).max(0))))
            .collect()
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
pub type HubSlot = Shared<BoxFuture<'static, Result<Arc<Hub>, FanoutError>>>;

fn is_hub(slot: &HubSlot, hub: &Arc<Hub>) -> bool {
    matches!(slot.peek(), Some(Ok(h)) if Arc::ptr_eq(h, hub))
}

impl Fanout {
    pub(super) async fn start_hub(self: Arc<Self>, topic: String) -> Result<Arc<Hub>, FanoutError> {
        let (hub, consumer) = self.new_hub(&topic).await?;
        let hub = Arc::new(hub);
        tokio::spawn(self.clone().run_hub(topic, hub.clone(), consumer));
        Ok(hub)
    }

    async fn new_hub(&self, topic: &str) -> Result<(Hub, HubConsumer), FanoutError> {
        let partitions = self.kafka.partitions(topic).await?;
        let start = self.kafka.watermarks(topic, &partitions).await?;
        let marks = Arc::new(HighWatermarks::default());
        let start = Cursor::new(start.iter().map(|(p, (_, high))| (*p, *high)));
        let consumer = self.kafka.hub_consumer(topic, marks.clone())?;
        consumer.assign(&assignment(topic, &start)?)?;
        // Twice the queue: a subscriber is closed when it stays over the queue for a moment
        // (see `subscribe`), so the ring must hold more than the queue meanwhile.
        let (tx, _) = broadcast::channel(self.config.queue.max(1) * 2);
        let hub = Hub {
            tx,
            position: Mutex::new(start),
            partitions,
            published: Arc::new(AtomicU64::new(0)),
            marks,
        };
        tracing::info!(topic, "fan-out hub started");
        Ok((hub, consumer))
    }

    async fn run_hub(self: Arc<Self>, topic: String, hub: Arc<Hub>, consumer: HubConsumer) {
        let mut shutdown = self.shutdown_signal();
        let mut tick = tokio::time::interval(IDLE_CHECK);
        let mut idle_since: Option<Instant> = None;
        loop {
            tokio::select! {
                received = consumer.recv() => match received {
                    Ok(message) => {
                        let span = deliver_span(&message, hub.tx.receiver_count());
                        hub.publish(Delivery::from_message(&message));
                        drop(span);
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
}
