//! What ends a command (`serve`, `tail`, `topic create`) with a failure exit code.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AppError {
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("{0}")]
    Secret(#[from] crate::auth::SecretError),
    #[error("{0}")]
    SubscriberAuth(#[from] crate::auth::SubscriberAuthError),
    #[error("{0}")]
    Schema(#[from] crate::schema::SchemaError),
    #[error("{0}")]
    Deliveries(#[from] crate::delivery::LoadError),
    #[error("{0}")]
    Delivery(#[from] crate::delivery::worker::WorkerError),
    #[error("{0}")]
    Other(String),
}
