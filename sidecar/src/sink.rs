//! What the HTTP layer hands an accepted event to, and what it hears back. The durable
//! sink (`durable`) implements [`EventSink`] with the spool in front of the Kafka producer.

use std::future::Future;
use std::pin::Pin;

use thiserror::Error;

use crate::status::{Accepted, Snapshot};
use crate::trace_context::{TraceId, TraceParent};

/// A record ready to produce (the Kafka binary-mode form of an event plus its topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub value: Option<Vec<u8>>,
}

/// An accepted event: the record to produce plus the identity idempotency and status use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub id: String,
    pub source: String,
    pub record: OutRecord,
}

impl EventRecord {
    /// The trace its valid `ce_traceparent` names, for log lines about it.
    pub fn trace_id(&self) -> Option<TraceId> {
        let headers = self.record.headers.iter();
        TraceParent::from_headers(headers.map(|(k, v)| (k.as_str(), v.as_str())))
            .map(|t| t.trace_id)
    }
}

/// Where the broker stored the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PublishError {
    #[error("topic `{0}` does not exist")]
    UnknownTopic(String),
    /// librdkafka's local queue is full when a record is handed to it (`classify`). The
    /// durable sink spools such an event and the forwarder retries it, so it is not permanent.
    #[error("producer queue full")]
    QueueFull,
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    SpoolFull(String),
    /// The broker refuses this record for good (authorization, policy, invalid record).
    #[error("the broker refused the record: {0}")]
    Refused(String),
}

impl PublishError {
    /// Errors that retrying the same record can never fix.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            PublishError::UnknownTopic(_) | PublishError::TooLarge(_)
        )
    }
}

/// Where an accepted event is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The broker acknowledged it.
    Published(Delivered),
    /// Durable in the local spool; the forwarder will publish it.
    Spooled,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The one thing the HTTP layer needs from the backend.
pub trait EventSink: Send + Sync {
    /// Accepts an event once per `source` + `id`: a new one resolves once it is durable
    /// (acknowledged by the broker or in the spool), a repeat with the first answer.
    fn accept(&self, event: EventRecord) -> BoxFuture<'_, Result<Accepted, PublishError>>;
    /// Accepts a batch: each event as by `accept`, all at once so that they share producer
    /// batches and spool syncs; the results in batch order.
    fn accept_batch(
        &self,
        events: Vec<EventRecord>,
    ) -> BoxFuture<'_, Vec<Result<Accepted, PublishError>>> {
        Box::pin(accept_each(self, events))
    }
    /// Where an accepted event is now, by id (and source, when ids repeat across sources).
    fn status(&self, id: &str, source: Option<&str>) -> Option<Snapshot>;
    /// Whether the backend answered recently (for `/readyz`).
    fn is_ready(&self) -> bool;
}

/// Every event of a batch through `accept`, all polled together and first in batch order, so
/// that what reaches the producer or the spool without waiting does so in that order.
pub async fn accept_each<S: EventSink + ?Sized>(
    sink: &S,
    events: Vec<EventRecord>,
) -> Vec<Result<Accepted, PublishError>> {
    futures_util::future::join_all(events.into_iter().map(|e| sink.accept(e))).await
}
