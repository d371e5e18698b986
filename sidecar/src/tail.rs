//! `tail`: print a topic's records as JSON lines, each with the event in structured form.
//! Assign-only (no group membership, no commits), so it never disturbs real consumers.

use std::io::Write;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{KafkaArgs, StartAt, TailArgs};
use crate::error::AppError;
use crate::kafka_config;

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(args: TailArgs) -> Result<(), AppError> {
    if args.count == Some(0) {
        return Ok(());
    }
    let consumer = consumer(&args.kafka)?;
    let partitions = tokio::task::block_in_place(|| partitions(&consumer, &args.topic))?;
    let start = match args.from {
        StartAt::Earliest => Offset::Beginning,
        StartAt::Latest => Offset::End,
    };
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment.add_partition_offset(&args.topic, partition, start)?;
    }
    consumer.assign(&assignment)?;
    print_records(&consumer, &args).await
}

fn consumer(kafka: &KafkaArgs) -> Result<StreamConsumer, AppError> {
    let group = format!("eventwire-tail-{}", std::process::id());
    let config = kafka_config::assign_only(&kafka.brokers, group);
    Ok(kafka_config::with_overrides(config, &kafka.properties()?).create()?)
}

fn partitions(consumer: &StreamConsumer, topic: &str) -> Result<Vec<i32>, AppError> {
    let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().iter().map(|p| p.id()).collect())
        }
        _ => Err(AppError::Other(format!("topic `{topic}` does not exist"))),
    }
}

async fn print_records(consumer: &StreamConsumer, args: &TailArgs) -> Result<(), AppError> {
    let idle = args.idle_exit_ms.map(Duration::from_millis);
    let mut printed = 0u64;
    loop {
        let idle_timer = async {
            match idle {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = consumer.recv() => match received {
                Ok(message) => {
                    print_line(&message)?;
                    printed += 1;
                    if args.count.is_some_and(|n| printed >= n) {
                        return Ok(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "consume error"),
            },
            () = idle_timer => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn print_line(message: &BorrowedMessage<'_>) -> Result<(), AppError> {
    let record = crate::consumed::record(message);
    let mut out = std::io::stdout().lock();
    let line =
        serde_json::to_string(&record.envelope()).map_err(|e| AppError::Other(e.to_string()))?;
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}
