//! Event-to-command delivery: each `[[delivery]]` of the deliveries file consumes a topic in
//! its own Kafka consumer group and POSTs every event, in order per partition, to an HTTP
//! service as a CloudEvent, committing an offset only after the service answered 2xx.
//!
//! `config`, `policy` and `request` decide; `worker` carries it out against Kafka and HTTP.

pub mod config;
pub mod policy;
pub mod request;
