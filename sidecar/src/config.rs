//! Command line and environment. Every `serve` flag also has an env var so the sidecar can be
//! configured from a container spec without a wrapper script.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use eventwire_contract::DEFAULT_MAX_BODY_BYTES;

#[derive(Debug, Parser)]
#[command(
    name = "eventwire-sidecar",
    version,
    about = "Receives CloudEvents over HTTP and produces them to Kafka"
)]
// Without a subcommand the top-level flags are the `serve` flags.
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Log line format (logs go to stderr).
    #[arg(long, env = "EVENTWIRE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Async runtime threads. Default: one less than the CPUs (at least 1), since librdkafka
    /// runs threads of its own; on 2 cores one runtime thread costs less CPU per event.
    #[arg(long, env = "EVENTWIRE_WORKER_THREADS", global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

impl Cli {
    pub fn runtime_threads(&self) -> usize {
        match self.worker_threads {
            Some(n) => usize::from(n),
            None => std::thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1))
                .max(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the default).
    Serve(Box<ServeArgs>),
    /// Print the records of a topic as JSON lines (CloudEvents in structured form).
    Tail(TailArgs),
    /// Manage topics.
    Topic {
        #[command(subcommand)]
        action: TopicCommand,
    },
}

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "EVENTWIRE_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Extra librdkafka property KEY=VALUE (repeatable; env: comma-separated); applied last.
    #[arg(long = "kafka", env = "EVENTWIRE_KAFKA", value_name = "KEY=VALUE", value_delimiter = ',', value_parser = parse_key_value)]
    pub kafka: Vec<(String, String)>,
    /// SASL mechanism for every Kafka client: SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN. The
    /// password comes from EVENTWIRE_KAFKA_SASL_PASSWORD or --kafka-sasl-password-file,
    /// never from a flag (`ps` shows flags).
    #[arg(long, env = "EVENTWIRE_KAFKA_SASL_MECHANISM", value_parser = ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"], requires = "kafka_sasl_username")]
    pub kafka_sasl_mechanism: Option<String>,
    #[arg(
        long,
        env = "EVENTWIRE_KAFKA_SASL_USERNAME",
        requires = "kafka_sasl_mechanism"
    )]
    pub kafka_sasl_username: Option<String>,
    /// File holding the SASL password (its first line).
    #[arg(long, env = "EVENTWIRE_KAFKA_SASL_PASSWORD_FILE", value_name = "PATH")]
    pub kafka_sasl_password_file: Option<std::path::PathBuf>,
    /// TLS to the brokers (security.protocol SSL, or SASL_SSL with SASL).
    #[arg(long, env = "EVENTWIRE_KAFKA_TLS")]
    pub kafka_tls: bool,
    /// CA certificate(s) (PEM) the brokers' certificates are checked against; default: the
    /// system's.
    #[arg(
        long,
        env = "EVENTWIRE_KAFKA_CA_FILE",
        value_name = "PATH",
        requires = "kafka_tls"
    )]
    pub kafka_ca_file: Option<std::path::PathBuf>,
}

/// The SASL password's variable: a secret, so no flag.
pub const KAFKA_SASL_PASSWORD_ENV: &str = "EVENTWIRE_KAFKA_SASL_PASSWORD";

impl KafkaArgs {
    /// The librdkafka properties of every client: security from the flags above, then
    /// `--kafka` (which wins).
    pub fn properties(&self) -> Result<Vec<(String, String)>, crate::error::AppError> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| p.push((k.to_string(), v));
        let protocol = match (&self.kafka_sasl_mechanism, self.kafka_tls) {
            (Some(_), true) => "SASL_SSL",
            (Some(_), false) => "SASL_PLAINTEXT",
            (None, true) => "SSL",
            (None, false) => "PLAINTEXT",
        };
        set("security.protocol", protocol.into());
        if let (Some(mechanism), Some(user)) =
            (&self.kafka_sasl_mechanism, &self.kafka_sasl_username)
        {
            set("sasl.mechanism", mechanism.clone());
            set("sasl.username", user.clone());
            set("sasl.password", self.sasl_password()?);
        }
        if let Some(ca) = &self.kafka_ca_file {
            set("ssl.ca.location", ca.display().to_string());
        }
        p.extend(self.kafka.iter().cloned());
        Ok(p)
    }

    fn sasl_password(&self) -> Result<String, crate::error::AppError> {
        let missing = || {
            crate::error::AppError::Other(format!(
                "--kafka-sasl-mechanism needs a password: {KAFKA_SASL_PASSWORD_ENV} or --kafka-sasl-password-file"
            ))
        };
        match &self.kafka_sasl_password_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| {
                    crate::error::AppError::Other(format!(
                        "--kafka-sasl-password-file {}: {e}",
                        path.display()
                    ))
                })?
                .lines()
                .next()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .ok_or_else(missing),
            None => std::env::var(KAFKA_SASL_PASSWORD_ENV)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(missing),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "EVENTWIRE_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Largest accepted request body.
    #[arg(long, env = "EVENTWIRE_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES as usize)]
    pub max_body_bytes: usize,
    /// File with the secrets ingest accepts (`Authorization: Bearer <secret>`), one per
    /// line, read again when it changes. Without it, `EVENTWIRE_INGEST_SECRET` (the secret
    /// itself, never a flag: `ps` would show it); without either, ingest is open.
    #[arg(long, env = "EVENTWIRE_INGEST_SECRET_FILE", value_name = "PATH")]
    pub ingest_secret_file: Option<std::path::PathBuf>,
    /// Directory of JSON Schemas (`*.json`, each with a unique `$id`); an event whose
    /// `dataschema` names one is checked against it before anything is durable.
    #[arg(long, env = "EVENTWIRE_SCHEMA_DIR", value_name = "DIR")]
    pub schema_dir: Option<std::path::PathBuf>,
    /// TOML file of `[[delivery]]` tables: topics delivered to HTTP services as CloudEvents
    /// (README "Delivery to HTTP services"). Checked at start; a mistake stops it.
    #[arg(long, env = "EVENTWIRE_DELIVERIES_FILE", value_name = "PATH")]
    pub deliveries_file: Option<std::path::PathBuf>,
    /// Most events in one `application/cloudevents-batch+json` request.
    #[arg(long, env = "EVENTWIRE_MAX_BATCH_EVENTS", default_value_t = 1000, value_parser = clap::value_parser!(usize))]
    pub max_batch_events: usize,
    #[command(flatten)]
    pub durability: DurabilityArgs,
    #[command(flatten)]
    pub push: PushArgs,
    #[command(flatten)]
    pub subscribers: SubscriberArgs,
}

/// Who may subscribe (`/v1/subscribe`, `/v1/tickets`) and read event status
/// (`GET /v1/events/<id>`). With neither file, those are open.
#[derive(Debug, Clone, Args)]
pub struct SubscriberArgs {
    /// File of static subscriber tokens, one per line, optionally followed by the topics it
    /// may read (`<token> orders,payment-*`); read again when it changes.
    #[arg(long, env = "EVENTWIRE_SUBSCRIBER_TOKENS_FILE", value_name = "PATH")]
    pub subscriber_tokens_file: Option<std::path::PathBuf>,
    /// JWKS file with the keys subscriber JWTs are verified with (`oct`: HS256, `RSA`:
    /// RS256, `EC` P-256: ES256); read again when it changes.
    #[arg(long, env = "EVENTWIRE_SUBSCRIBER_JWKS_FILE", value_name = "PATH")]
    pub subscriber_jwks_file: Option<std::path::PathBuf>,
    /// The `aud` a subscriber JWT must carry (unset: `aud` is not checked).
    #[arg(long, env = "EVENTWIRE_SUBSCRIBER_JWT_AUDIENCE")]
    pub subscriber_jwt_audience: Option<String>,
    /// The `iss` a subscriber JWT must carry (unset: `iss` is not checked).
    #[arg(long, env = "EVENTWIRE_SUBSCRIBER_JWT_ISSUER")]
    pub subscriber_jwt_issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`; a live subscription closes (4401) this long
    /// after its token's `exp`.
    #[arg(long, env = "EVENTWIRE_SUBSCRIBER_JWT_LEEWAY_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub subscriber_jwt_leeway_s: u64,
    /// Subscriptions one token (a JWT's `sub`, a static token) may have open at once; more
    /// get 429 `subscription-quota`.
    #[arg(long, env = "EVENTWIRE_MAX_SUBSCRIPTIONS_PER_TOKEN", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_subscriptions_per_token: u32,
    /// Subscriptions one client address may have open at once; more get 429
    /// `subscription-quota`. The address is the connection's, or the right-most
    /// `X-Forwarded-For` entry when the connection comes from a trusted proxy.
    #[arg(long, env = "EVENTWIRE_MAX_SUBSCRIPTIONS_PER_CLIENT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_subscriptions_per_client: u32,
    /// Proxies (IP addresses, comma-separated) whose `X-Forwarded-For` names the client.
    #[arg(
        long,
        env = "EVENTWIRE_TRUSTED_PROXIES",
        value_delimiter = ',',
        default_value = "127.0.0.1,::1"
    )]
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl SubscriberArgs {
    pub fn auth_config(&self) -> crate::auth::SubscriberAuthConfig {
        crate::auth::SubscriberAuthConfig {
            tokens_file: self.subscriber_tokens_file.clone(),
            jwks_file: self.subscriber_jwks_file.clone(),
            audience: self.subscriber_jwt_audience.clone(),
            issuer: self.subscriber_jwt_issuer.clone(),
            leeway: std::time::Duration::from_secs(self.subscriber_jwt_leeway_s),
        }
    }
}

/// The push side: `GET /v1/subscribe` (WebSocket, SSE) and the `/ui` viewer.
#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    /// Events (N) a subscriber may fall behind its topic. One that stays more than N behind
    /// for 100 ms, or falls 2N behind, is closed alone (WebSocket code 4008, SSE
    /// `event: error`) with the cursor to reconnect from.
    #[arg(long, env = "EVENTWIRE_SUBSCRIBER_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub subscriber_queue: u32,
    /// Seconds between WebSocket pings (SSE: `: ping` comments); a client silent for three
    /// intervals is dropped.
    #[arg(long, env = "EVENTWIRE_PING_INTERVAL_S", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ping_interval_s: u64,
    /// How long a topic's shared consumer stays after its last subscriber left.
    #[arg(long, env = "EVENTWIRE_HUB_GRACE_MS", default_value_t = 5000)]
    pub hub_grace_ms: u64,
    /// The push consumers' fetch.wait.max.ms. Kafka answers a fetch as soon as records
    /// arrive, but the test broker (Tansu) only after this wait: there it is the latency floor.
    #[arg(long, env = "EVENTWIRE_PUSH_FETCH_WAIT_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub push_fetch_wait_ms: u64,
    /// Open subscriptions (WebSocket and SSE) on this sidecar; more are refused before the
    /// upgrade with 503 `too-many-subscribers`.
    #[arg(long, env = "EVENTWIRE_MAX_SUBSCRIBERS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_subscribers: u32,
    /// Subscriptions replaying (any `from` behind the live position) at once, each with its
    /// own consumer; more are refused before the upgrade with 503 `too-many-replays`.
    #[arg(long, env = "EVENTWIRE_MAX_REPLAYS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_replays: u32,
    /// Bytes of a topic's events a subscriber may fall behind (what the topic's hub keeps for
    /// it); over it like over --subscriber-queue, the subscriber is closed with 4008.
    #[arg(long, env = "EVENTWIRE_SUBSCRIBER_QUEUE_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1_048_576..))]
    pub subscriber_queue_bytes: u64,
    /// Seconds a replay may take to catch up with the live position; then the client is
    /// closed with 4008 and its cursor (reconnecting continues the replay).
    #[arg(long, env = "EVENTWIRE_MAX_REPLAY_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_replay_s: u64,
    /// Topics open to subscribers (comma-separated); empty = every topic. Internal topics
    /// (`__consumer_offsets`, any name starting with `__`) are never open.
    #[arg(long, env = "EVENTWIRE_PUSH_TOPICS", value_delimiter = ',')]
    pub push_topics: Vec<String>,
}

/// When an event counts as accepted, and where it waits while Kafka is away.
#[derive(Debug, Clone, Args)]
pub struct DurabilityArgs {
    /// `broker`: answer after the broker's ack, or after spooling when the broker does not ack
    /// within --ack-timeout-ms. `spool`: answer once the event is in the spool.
    #[arg(long, env = "EVENTWIRE_ACK", value_enum, default_value_t = crate::durable::AckMode::Broker)]
    pub ack: crate::durable::AckMode,
    /// How long a request waits for the broker before the event is spooled instead; keep it
    /// well below the filter's callout timeout (5000 ms by default).
    #[arg(long, env = "EVENTWIRE_ACK_TIMEOUT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub ack_timeout_ms: u64,
    /// How long the producer retries one record (librdkafka message.timeout.ms) before the
    /// spool forwarder takes over.
    #[arg(long, env = "EVENTWIRE_DELIVERY_TIMEOUT_MS", default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1..=900_000))]
    pub delivery_timeout_ms: u64,
    /// Directory for the spool, the status log and the dead-letter file.
    #[arg(long, env = "EVENTWIRE_DATA_DIR", default_value = "eventwire-data")]
    pub data_dir: std::path::PathBuf,
    /// Bytes of spooled events waiting for the broker before new events get 503.
    #[arg(long, env = "EVENTWIRE_SPOOL_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub spool_max_bytes: u64,
    /// How long an event id is remembered for idempotency and delivery status.
    #[arg(long, env = "EVENTWIRE_IDEMPOTENCY_WINDOW_S", default_value_t = 86_400)]
    pub idempotency_window_s: u64,
    /// At most this many ids are remembered (the oldest are forgotten first).
    #[arg(
        long,
        env = "EVENTWIRE_IDEMPOTENCY_MAX_ENTRIES",
        default_value_t = 100_000
    )]
    pub idempotency_max_entries: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StartAt {
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Topic to read (all partitions).
    #[arg(long)]
    pub topic: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Where to start in each partition.
    #[arg(long = "from", value_enum, default_value_t = StartAt::Earliest)]
    pub from: StartAt,
    /// Exit after this many records.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this long without a record.
    #[arg(long)]
    pub idle_exit_ms: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic (succeeds if it already exists).
    Create {
        name: String,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        #[arg(long, default_value_t = 1)]
        replication_factor: i32,
        #[command(flatten)]
        kafka: KafkaArgs,
    },
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_subcommands() {
        let cli = Cli::try_parse_from(["eventwire-sidecar"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.to_string(), "127.0.0.1:8090");
        assert_eq!(cli.serve.durability.delivery_timeout_ms, 120_000);
        assert_eq!(cli.serve.durability.ack_timeout_ms, 2000);
        assert_eq!(cli.serve.durability.ack, crate::durable::AckMode::Broker);
        assert_eq!(cli.serve.max_body_bytes, 1_048_576);
        assert_eq!(cli.serve.max_body_bytes as u64, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(cli.serve.max_batch_events, 1000);
        assert!(cli.worker_threads.is_none() && cli.runtime_threads() >= 1);
        assert_eq!(cli.serve.push.subscriber_queue, 1024);
        assert_eq!(cli.serve.push.ping_interval_s, 15);
        assert_eq!(cli.serve.push.max_subscribers, 10_000);
        assert_eq!(cli.serve.push.max_replays, 32);
        assert_eq!(cli.serve.push.subscriber_queue_bytes, 64 << 20);
        assert_eq!(cli.serve.push.max_replay_s, 300);
        assert!(cli.serve.push.push_topics.is_empty());
        let cli =
            Cli::try_parse_from(["x", "--push-topics", "a,b", "--max-subscribers", "2"]).unwrap();
        assert_eq!(cli.serve.push.push_topics, ["a", "b"]);
        assert_eq!(cli.serve.push.max_subscribers, 2);

        let cli = Cli::try_parse_from([
            "x",
            "--kafka",
            "a=b",
            "--kafka",
            "c=d=e",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(
            cli.serve.kafka.kafka,
            vec![("a".into(), "b".into()), ("c".into(), "d=e".into())]
        );
        assert_eq!(cli.log_format, LogFormat::Json);

        let cli = Cli::try_parse_from(["x", "tail", "--topic", "t", "--count", "2"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Tail(TailArgs {
                count: Some(2),
                from: StartAt::Earliest,
                ..
            }))
        ));
        let cli = Cli::try_parse_from(["x", "topic", "create", "orders"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Topic {
                action: TopicCommand::Create { partitions: 3, .. }
            })
        ));
        assert!(Cli::try_parse_from(["x", "--kafka", "novalue"]).is_err());
    }
}
