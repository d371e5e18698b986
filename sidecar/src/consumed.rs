//! Kafka messages as the CloudEvents mapping reads them: the rdkafka side of
//! `cloudevent::ConsumedRecord`, kept out of `cloudevent` so that stays free of rdkafka.

use rdkafka::message::{Headers, Message};

use crate::cloudevent::ConsumedRecord;

/// A record as rdkafka hands it to a consumer (`tail`, the fan-out hubs), borrowed or
/// detached (the delivery workers hold detached ones).
pub fn record<M: Message>(message: &M) -> ConsumedRecord<'_> {
    let headers = message
        .headers()
        .map(|h| h.iter().map(|header| (header.key, header.value)).collect())
        .unwrap_or_default();
    ConsumedRecord {
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key(),
        headers,
        value: message.payload(),
    }
}
