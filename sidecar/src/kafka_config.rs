//! librdkafka client configuration shared by every Kafka client of the sidecar: the
//! producer, the push consumers, `tail` and `topic create`.

use rdkafka::ClientConfig;

/// A client of `brokers`; callers add their own settings, then `with_overrides`.
pub fn client(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    config
}

/// A consumer that only assigns partitions: no group membership, no commits, so it never
/// disturbs real consumers. Some brokers (Tansu) want a group id even so; `group_id` must
/// be unique so that nothing is shared.
pub fn assign_only(brokers: &str, group_id: String) -> ClientConfig {
    let mut config = client(brokers);
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    config
}

/// The operator's `--kafka` properties, applied last so that they win.
pub fn with_overrides(mut config: ClientConfig, overrides: &[(String, String)]) -> ClientConfig {
    for (key, value) in overrides {
        config.set(key, value);
    }
    config
}
