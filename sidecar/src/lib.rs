//! eventwire sidecar: the Envoy filter POSTs CloudEvents here; they are produced to Kafka
//! and answered once durable, and topics are pushed to WebSocket and SSE subscribers.
//!
//! The pure modules (CloudEvents parsing and mapping, cursors, subscription filters) build
//! without the `server` feature, so the fuzz targets can use them without rdkafka.

pub mod cloudevent;
pub mod cursor;
pub mod subscription_filter;
pub mod trace_context;

#[cfg(feature = "server")]
pub mod app;
#[cfg(feature = "server")]
mod auth;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
mod consumed;
#[cfg(feature = "server")]
mod delivery;
#[cfg(feature = "server")]
mod durable;
#[cfg(feature = "server")]
pub mod error;
#[cfg(feature = "server")]
mod fanout;
#[cfg(feature = "server")]
mod ingest;
#[cfg(feature = "server")]
mod kafka_config;
#[cfg(feature = "server")]
mod metrics;
#[cfg(feature = "server")]
mod problem;
#[cfg(feature = "server")]
mod producer;
#[cfg(feature = "server")]
mod schema;
#[cfg(feature = "server")]
mod sink;
#[cfg(feature = "server")]
mod spool;
#[cfg(feature = "server")]
mod status;
#[cfg(feature = "server")]
mod subscribe;
#[cfg(feature = "server")]
mod subscription;
#[cfg(feature = "server")]
pub mod tail;
#[cfg(feature = "server")]
mod telemetry;
#[cfg(feature = "server")]
pub mod topic;
