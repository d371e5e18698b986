//! `topic create`: the broker used in tests cannot auto-create topics, so the demo and tests
//! create them explicitly; an existing topic counts as success to keep scripts idempotent.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaArgs;
use crate::error::AppError;
use crate::kafka_config;

const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

pub async fn create(
    name: &str,
    partitions: i32,
    replication: i32,
    kafka: &KafkaArgs,
) -> Result<(), AppError> {
    eventwire_contract::topic::validate(name)
        .map_err(|e| AppError::Other(format!("invalid topic name `{name}`: {e}")))?;
    let config =
        kafka_config::with_overrides(kafka_config::client(&kafka.brokers), &kafka.properties()?);
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
    let options = AdminOptions::new()
        .request_timeout(Some(ADMIN_TIMEOUT))
        .operation_timeout(Some(ADMIN_TIMEOUT));
    for result in admin.create_topics([&topic], &options).await? {
        match result {
            Ok(t) => println!("created topic {t} ({partitions} partitions)"),
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => println!("topic {t} already exists"),
            Err((t, code)) => {
                return Err(AppError::Other(format!(
                    "cannot create topic `{t}`: {code}"
                )));
            }
        }
    }
    Ok(())
}
