//! One subscriber's view of a topic: where it starts, the replay that brings it up to the
//! hub, the hand-over to the hub's broadcast without gap or duplicate, and its filter.
//! The cursor advances per record read (delivered or filtered out), so it is always the
//! exact Kafka position to resume from.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use thiserror::Error;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{OwnedSemaphorePermit, broadcast};

use crate::cursor::{Cursor, StartFrom};
use crate::fanout::{Delivery, Fanout, FanoutError, Joined, assignment};
use crate::subscription_filter::Filter;

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

/// The limit a slow subscriber went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind {
    Events(usize),
    Bytes(u64),
}

impl fmt::Display for Behind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Behind::Events(n) => write!(f, "{n} events"),
            Behind::Bytes(n) => write!(f, "{n} bytes"),
        }
    }
}

/// How far a live subscriber is behind the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    Within,
    /// Over a limit: closed if it lasts.
    Over(Behind),
    /// Twice over a limit: closed at once.
    FarOver(Behind),
}

/// Why a subscription ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The subscriber fell more than `limit` behind the hub; resume from `cursor`.
    SlowConsumer {
        limit: Behind,
        cursor: Cursor,
    },
    /// The replay did not reach the live position within `limit`; resume from `cursor`.
    ReplayTooLong {
        limit: Duration,
        cursor: Cursor,
    },
    ShuttingDown {
        cursor: Cursor,
    },
    /// The subscriber's token expired; resume from `cursor` with a fresh one.
    TokenExpired {
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
    /// When the replay started (an extension keeps it): bounded by `--max-replay-s`.
    started: Instant,
    /// The place among `--max-replays` this replay takes.
    _permit: OwnedSemaphorePermit,
}

pub struct Subscription {
    fanout: Arc<Fanout>,
    topic: String,
    filter: Option<Filter>,
    cursor: Cursor,
    rx: broadcast::Receiver<Arc<Delivery>>,
    replay: Option<Replay>,
    /// Held for a replay until the replay is planned (or found unneeded).
    replay_permit: Option<OwnedSemaphorePermit>,
    limit: usize,
    limit_bytes: u64,
    /// The hub's published bytes, and where this subscriber's `rx` is in them.
    published: Arc<AtomicU64>,
    seen_bytes: u64,
    /// The place among `--max-subscribers`.
    _admitted: OwnedSemaphorePermit,
}

impl Subscription {
    /// Resolves the start position; errors here are answered before any upgrade.
    pub async fn start(
        fanout: Arc<Fanout>,
        topic: &str,
        from: &StartFrom,
        filter: Option<Filter>,
        admitted: OwnedSemaphorePermit,
    ) -> Result<Subscription, StartError> {
        // Any start but `latest` may replay: take a replay place before the Kafka queries
        // that resolve it (they are as bounded as the replays), give it back if unneeded.
        let replay_permit = match from {
            StartFrom::Latest => None,
            _ => Some(fanout.admit_replay()?),
        };
        // Join first: everything the hub reads from now on is then buffered in `rx`.
        let joined = fanout.join(topic).await?;
        let cursor = resolve(&fanout, topic, from, &joined).await?;
        let mut sub = Subscription {
            limit: fanout.queue(),
            limit_bytes: fanout.limits().queue_bytes,
            fanout,
            topic: topic.to_owned(),
            filter,
            cursor,
            rx: joined.rx,
            replay: None,
            replay_permit,
            published: joined.published,
            seen_bytes: joined.bytes,
            _admitted: admitted,
        };
        sub.plan_replay(joined.position)?;
        Ok(sub)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Bytes of the hub's events waiting in `rx` (the hub keeps them for this subscriber).
    fn lag_bytes(&self) -> u64 {
        self.published
            .load(Ordering::Relaxed)
            .saturating_sub(self.seen_bytes)
    }

    /// How far the subscriber is behind the hub, in events and bytes (only counted live: a
    /// replay goes at the subscriber's own pace, bounded by `--max-replay-s`).
    pub fn lag(&self) -> Lag {
        if self.replay.is_some() {
            return Lag::Within;
        }
        lag_of(
            self.rx.len(),
            self.lag_bytes(),
            self.limit,
            self.limit_bytes,
        )
    }

    pub fn slow_consumer(&self, limit: Behind, cursor: Cursor) -> End {
        End::SlowConsumer { limit, cursor }
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
            Ok(d) => {
                self.seen_bytes = d.end_bytes();
                Ok(d)
            }
            Err(RecvError::Lagged(_)) => {
                Err(self.slow_consumer(Behind::Events(self.limit), self.cursor.clone()))
            }
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
        let max = self.fanout.limits().max_replay;
        if replay.started.elapsed() > max {
            return Err(End::ReplayTooLong {
                limit: max,
                cursor: self.cursor.clone(),
            });
        }
        if self.cursor.reached(&replay.target) {
            self.hand_over().await;
            return Ok(None);
        }
        if self.lag_bytes() > self.limit_bytes {
            // `rx` keeps what the hub read since the join: over the byte budget, let it go
            // and replay further instead.
            self.rejoin().await;
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
        if self.rx.len() <= self.limit && self.lag_bytes() <= self.limit_bytes {
            self.replay = None;
            return;
        }
        self.rejoin().await;
    }

    /// A fresh `rx` from the hub, and a replay extended up to the hub's position.
    async fn rejoin(&mut self) {
        match self.fanout.join(&self.topic).await {
            Ok(Joined {
                rx,
                position,
                published,
                bytes,
                ..
            }) => {
                self.rx = rx;
                self.published = published;
                self.seen_bytes = bytes;
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
            self.replay_permit = None;
            return Ok(());
        }
        let (consumer, started, permit) = match self.replay.take() {
            Some(r) => (r.consumer, r.started, r._permit),
            None => {
                let permit = match self.replay_permit.take() {
                    Some(p) => p,
                    None => self.fanout.admit_replay()?,
                };
                (
                    self.fanout.kafka().consumer("replay")?,
                    Instant::now(),
                    permit,
                )
            }
        };
        consumer.assign(&assignment(&self.topic, &behind)?)?;
        tracing::debug!(topic = self.topic, from = %behind, to = %hub, "replaying");
        self.replay = Some(Replay {
            consumer,
            target: hub,
            started,
            _permit: permit,
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
            let marks = fanout.kafka().watermarks(topic, partitions).await?;
            Ok(Cursor::new(marks.iter().map(|(p, (low, _))| (*p, *low))))
        }
        StartFrom::Time(millis) => Ok(fanout
            .kafka()
            .offsets_at(topic, partitions, *millis)
            .await?),
        StartFrom::Cursor(given) => {
            if let Some((partition, _)) = given.iter().find(|(p, _)| !partitions.contains(p)) {
                return Err(StartError::UnknownPartition {
                    topic: topic.to_owned(),
                    partition,
                    count: partitions.len(),
                });
            }
            let marks = fanout.kafka().watermarks(topic, partitions).await?;
            Ok(Cursor::new(marks.iter().map(|(p, (low, high))| {
                // A partition the cursor lacks was added after it was taken: all of it is
                // new. Offsets outside the log (retention, another cluster) are clamped.
                (*p, given.get(*p).unwrap_or(*low).clamp(*low, *high))
            })))
        }
    }
}

/// Over a limit when more than it behind, far over when more than twice it (events first:
/// the broadcast holds 2 x `limit` events, beyond that records are lost anyway).
fn lag_of(events: usize, bytes: u64, limit: usize, limit_bytes: u64) -> Lag {
    if events > limit.saturating_mul(2) {
        Lag::FarOver(Behind::Events(limit))
    } else if bytes > limit_bytes.saturating_mul(2) {
        Lag::FarOver(Behind::Bytes(limit_bytes))
    } else if events > limit {
        Lag::Over(Behind::Events(limit))
    } else if bytes > limit_bytes {
        Lag::Over(Behind::Bytes(limit_bytes))
    } else {
        Lag::Within
    }
}

/// Cursor of the subscription just before `event` (for a resume that includes `event`).
pub fn cursor_before(current: &Cursor, event: &Event) -> Cursor {
    let mut before = current.clone();
    before.set(event.partition, event.offset);
    before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_events_and_bytes() {
        assert_eq!(lag_of(10, 100, 10, 100), Lag::Within);
        assert_eq!(lag_of(11, 0, 10, 100), Lag::Over(Behind::Events(10)));
        assert_eq!(lag_of(0, 101, 10, 100), Lag::Over(Behind::Bytes(100)));
        assert_eq!(lag_of(21, 0, 10, 100), Lag::FarOver(Behind::Events(10)));
        assert_eq!(lag_of(5, 201, 10, 100), Lag::FarOver(Behind::Bytes(100)));
        assert_eq!(lag_of(11, 201, 10, 100), Lag::FarOver(Behind::Bytes(100)));
        assert_eq!(Behind::Bytes(7).to_string(), "7 bytes");
        assert_eq!(Behind::Events(7).to_string(), "7 events");
    }
}
