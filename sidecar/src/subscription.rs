//! One subscriber's view of a topic: where it starts, the replay that brings it up to the
//! hub, the hand-over to the hub's broadcast without gap or duplicate, and its filter.
//! The cursor advances per record read (delivered or filtered out), so it is always the
//! exact Kafka position to resume from.

use std::sync::Arc;

use rdkafka::consumer::{Consumer, StreamConsumer};
use thiserror::Error;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::cursor::{Cursor, StartFrom};
use crate::fanout::{Delivery, Fanout, FanoutError, Joined, assignment};
use crate::filter::Filter;

/// Why a subscription could not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("{0}")]
    Fanout(#[from] FanoutError),
    #[error(
        "partition {partition} in the cursor is not a partition of topic `{topic}` ({count} partitions)"
    )]
    UnknownPartition {
        topic: String,
        partition: i32,
        count: usize,
    },
}

impl From<rdkafka::error::KafkaError> for StartError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        StartError::Fanout(e.into())
    }
}

/// Why a subscription ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The subscriber fell more than `limit` events behind the hub; resume from `cursor`.
    SlowConsumer {
        limit: usize,
        cursor: Cursor,
    },
    ShuttingDown {
        cursor: Cursor,
    },
}

/// One event for one subscriber.
#[derive(Debug)]
pub struct Event {
    pub partition: i32,
    pub offset: i64,
    /// The subscription's position after this event (the SSE `id`).
    pub cursor: String,
    /// The envelope JSON (the WebSocket text frame, the SSE `data`).
    pub frame: String,
}

struct Replay {
    consumer: StreamConsumer,
    /// The hub's position when `rx` was created: replay until here, then hand over.
    target: Cursor,
}

pub struct Subscription {
    fanout: Arc<Fanout>,
    topic: String,
    filter: Option<Filter>,
    cursor: Cursor,
    rx: broadcast::Receiver<Arc<Delivery>>,
    replay: Option<Replay>,
    limit: usize,
}

impl Subscription {
    /// Resolves the start position; errors here are answered before any upgrade.
    pub async fn start(
        fanout: Arc<Fanout>,
        topic: &str,
        from: &StartFrom,
        filter: Option<Filter>,
    ) -> Result<Subscription, StartError> {
        // Join first: everything the hub reads from now on is then buffered in `rx`.
        let joined = fanout.join(topic).await?;
        let cursor = resolve(&fanout, topic, from, &joined).await?;
        let mut sub = Subscription {
            limit: fanout.queue(),
            fanout,
            topic: topic.to_owned(),
            filter,
            cursor,
            rx: joined.rx,
            replay: None,
        };
        sub.plan_replay(joined.position)?;
        Ok(sub)
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Whether the subscriber is more than its queue behind the hub (only counted live: a
    /// replay goes at the subscriber's own pace).
    pub fn over_queue(&self) -> bool {
        self.replay.is_none() && self.rx.len() > self.limit
    }

    pub fn slow_consumer(&self, cursor: Cursor) -> End {
        End::SlowConsumer {
            limit: self.limit,
            cursor,
        }
    }

    /// The next event that passes the filter.
    pub async fn next(&mut self) -> Result<Event, End> {
        loop {
            let delivery = match self.replay.is_some() {
                true => match self.next_replayed().await? {
                    Some(d) => Arc::new(d),
                    None => continue,
                },
                false => self.next_live().await?,
            };
            if !self.cursor.is_due(delivery.partition, delivery.offset) {
                // Already delivered by the replay (hand-over) or before the start.
                continue;
            }
            self.cursor.advance(delivery.partition, delivery.offset);
            if self.passes(&delivery) {
                return Ok(Event {
                    partition: delivery.partition,
                    offset: delivery.offset,
                    cursor: self.cursor.to_string(),
                    frame: delivery.frame(&self.cursor),
                });
            }
        }
    }

    fn passes(&self, d: &Delivery) -> bool {
        match (&self.filter, &d.attributes) {
            (None, _) => true,
            (Some(f), Some(attrs)) => f.matches(attrs),
            (Some(f), None) => f.matches(&Default::default()),
        }
    }

    /// Lag above the queue is judged by the caller over time (bursts are normal); a lag
    /// beyond the broadcast's capacity lost records, so it ends the subscription.
    async fn next_live(&mut self) -> Result<Arc<Delivery>, End> {
        match self.rx.recv().await {
            Ok(d) => Ok(d),
            Err(RecvError::Lagged(_)) => Err(self.slow_consumer(self.cursor.clone())),
            Err(RecvError::Closed) => Err(End::ShuttingDown {
                cursor: self.cursor.clone(),
            }),
        }
    }

    /// `None` when the replay finished or was extended; the caller asks again.
    async fn next_replayed(&mut self) -> Result<Option<Delivery>, End> {
        let Some(replay) = &self.replay else {
            return Ok(None);
        };
        if self.cursor.reached(&replay.target) {
            self.hand_over().await;
            return Ok(None);
        }
        match replay.consumer.recv().await {
            Ok(message) => Ok(Some(Delivery::from_message(&message))),
            Err(e) => {
                tracing::warn!(topic = self.topic, error = %e, "replay consumer error");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                Ok(None)
            }
        }
    }

    /// Switches to the hub's broadcast. If the hub ran more than the queue ahead during the
    /// replay, `rx` lost records: rejoin and replay up to the hub's new position instead.
    async fn hand_over(&mut self) {
        if self.rx.len() <= self.limit {
            self.replay = None;
            return;
        }
        match self.fanout.join(&self.topic).await {
            Ok(Joined { rx, position, .. }) => {
                self.rx = rx;
                if let Err(e) = self.plan_replay(position) {
                    tracing::warn!(topic = self.topic, error = %e, "cannot extend replay");
                }
            }
            Err(e) => tracing::warn!(topic = self.topic, error = %e, "cannot rejoin hub"),
        }
    }

    /// Replays with an own consumer the partitions where the cursor is behind `hub`.
    fn plan_replay(&mut self, hub: Cursor) -> Result<(), StartError> {
        let behind = Cursor::new(
            self.cursor
                .iter()
                .filter(|(p, o)| hub.get(*p).is_some_and(|h| *o < h)),
        );
        if behind.iter().next().is_none() {
            self.replay = None;
            return Ok(());
        }
        let consumer = match self.replay.take() {
            Some(r) => r.consumer,
            None => self.fanout.consumer("replay")?,
        };
        consumer.assign(&assignment(&self.topic, &behind)?)?;
        tracing::debug!(topic = self.topic, from = %behind, to = %hub, "replaying");
        self.replay = Some(Replay {
            consumer,
            target: hub,
        });
        Ok(())
    }
}

/// The cursor a subscription starts at, for every partition of the topic.
async fn resolve(
    fanout: &Fanout,
    topic: &str,
    from: &StartFrom,
    joined: &Joined,
) -> Result<Cursor, StartError> {
    let partitions = &joined.partitions;
    match from {
        StartFrom::Latest => Ok(joined.position.clone()),
        StartFrom::Earliest => {
            let marks = fanout.watermarks(topic, partitions).await?;
            Ok(Cursor::new(marks.iter().map(|(p, (low, _))| (*p, *low))))
        }
        StartFrom::Time(millis) => Ok(fanout.offsets_at(topic, partitions, *millis).await?),
        StartFrom::Cursor(given) => {
            if let Some((partition, _)) = given.iter().find(|(p, _)| !partitions.contains(p)) {
                return Err(StartError::UnknownPartition {
                    topic: topic.to_owned(),
                    partition,
                    count: partitions.len(),
                });
            }
            let marks = fanout.watermarks(topic, partitions).await?;
            Ok(Cursor::new(marks.iter().map(|(p, (low, high))| {
                // A partition the cursor lacks was added after it was taken: all of it is
                // new. Offsets outside the log (retention, another cluster) are clamped.
                (*p, given.get(*p).unwrap_or(*low).clamp(*low, *high))
            })))
        }
    }
}

/// Cursor of the subscription just before `event` (for a resume that includes `event`).
pub fn cursor_before(current: &Cursor, event: &Event) -> Cursor {
    let mut before = current.clone();
    before.set(event.partition, event.offset);
    before
}
