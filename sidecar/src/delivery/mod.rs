//! Event-to-command delivery: each `[[delivery]]` of the deliveries file consumes a topic in
//! its own Kafka consumer group and POSTs every event, in order per partition, to an HTTP
//! service as a CloudEvent, committing an offset only after the service answered 2xx.
//!
//! `config`, `policy` and `request` decide; `worker` carries it out against Kafka and HTTP;
//! `reload` follows the file while the sidecar runs.

pub mod config;
pub mod keyorder;
pub mod policy;
pub mod reload;
pub mod reply;
pub mod request;
pub mod worker;

use std::path::Path;

use thiserror::Error;

/// The deliveries file cannot be read or used: the sidecar does not start.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("--deliveries-file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("--deliveries-file {path}: {source}")]
    Invalid {
        path: String,
        source: config::ConfigError,
    },
}

/// Reads and checks the deliveries file.
pub fn load(path: &Path) -> Result<Vec<config::Delivery>, LoadError> {
    let shown = || path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: shown(),
        source,
    })?;
    let dir = path.parent().unwrap_or(Path::new(""));
    config::parse(&text, dir).map_err(|source| LoadError::Invalid {
        path: shown(),
        source,
    })
}
