//! Running a command: `serve` wires the HTTP API, the durable sink and the push side
//! together and shuts them down in order; `tail` and `topic create` are in their modules.

use std::sync::Arc;
use std::time::Duration;

use eventwire_contract::DEFAULT_CALLOUT_TIMEOUT_MS;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::auth::{IngestAuth, SubscriberAuth};
use crate::config::{Cli, Command, DurabilityArgs, LogFormat, ServeArgs, TopicCommand};
use crate::durable::DurableSink;
use crate::error::AppError;
use crate::metrics::Metrics;
use crate::producer::{KafkaProducer, KafkaSettings};
use crate::schema::Schemas;
use crate::spool::Spool;
use crate::status::StatusStore;
use crate::{fanout, ingest, subscribe, tail, telemetry, topic};

/// Everything the broker has not acknowledged is already in the spool, so the flush on
/// shutdown only saves the next start some re-sends; keep it short.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

/// Runs the command the command line names (`serve` when it names none).
pub async fn run(cli: Cli) -> Result<(), AppError> {
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(*args).await,
        Some(Command::Tail(args)) => tail::run(args).await,
        Some(Command::Topic {
            action:
                TopicCommand::Create {
                    name,
                    partitions,
                    replication_factor,
                    kafka,
                },
        }) => topic::create(&name, partitions, replication_factor, &kafka).await,
    }
}

/// `EVENTWIRE_LOG` wins over `RUST_LOG` so the sidecar can be tuned apart from other Rust
/// processes sharing an environment. The exported spans (`telemetry`) are never log lines.
pub fn init_tracing(format: LogFormat) {
    let directives = std::env::var("EVENTWIRE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("warning: invalid log filter {directives:?} ({e}); using info");
        EnvFilter::new("info")
    });
    let filter = match format!("{}=off", telemetry::TARGET).parse() {
        Ok(off) => filter.add_directive(off),
        Err(_) => filter,
    };
    let otel = telemetry::layer().unwrap_or_else(|e| {
        eprintln!("warning: {e}; spans are not exported");
        None
    });
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(otel);
    match format {
        LogFormat::Text => registry.with(log.with_filter(filter)).init(),
        LogFormat::Json => registry.with(log.json().with_filter(filter)).init(),
    }
}

/// Serves until SIGTERM or SIGINT, then drains: open requests finish, the producer is
/// flushed while the forwarder still records deliveries, and what is not in Kafka by then
/// stays in the spool for the next start.
pub async fn serve(args: ServeArgs) -> Result<(), AppError> {
    warn_on_ack_timeout(args.durability.ack_timeout_ms);
    // First: a schema that cannot be used stops the start before anything is opened.
    let schemas = schemas(&args)?;
    let metrics = Arc::new(Metrics::new());
    let producer = Arc::new(KafkaProducer::new(
        &kafka_settings(&args)?,
        metrics.clone(),
    )?);
    let probe = producer.spawn_health_probe();
    let sink = Arc::new(durable_sink(
        &args.durability,
        producer.clone(),
        metrics.clone(),
    )?);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let forwarder = sink.spawn_forwarder(stopped);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let d = &args.durability;
    tracing::info!(listen = %args.listen, brokers = %args.kafka.brokers, data_dir = %d.data_dir.display(), ack = ?d.ack, "eventwire sidecar listening");
    let fanout = push_fanout(&args)?;
    let auth = ingest_auth(&args)?;
    let readers = subscriber_auth(&args)?;
    let reloader = {
        let (a, r) = (auth.clone(), readers.clone());
        crate::auth::spawn_reloader(vec![
            Box::new(move || a.reload()),
            Box::new(move || r.reload()),
        ])
    };
    let (stop_deliveries, deliveries_stopped) = tokio::sync::watch::channel(false);
    let deliveries = deliveries(
        &args,
        producer.clone(),
        &metrics,
        &schemas,
        &deliveries_stopped,
    )?;
    let app = router(&args, sink, fanout.clone(), auth, readers, schemas, metrics);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown_signal().await;
        // Open subscriptions would otherwise hold the graceful shutdown forever.
        fanout.shutdown();
        let _ = stop_deliveries.send(true);
    })
    .await?;
    // Before the flush: a delivery giving up on its last event still dead-letters it.
    if let Some(deliveries) = deliveries {
        let _ = deliveries.await;
    }
    if producer.is_ready() {
        flush(producer.clone()).await;
    }
    let _ = stop.send(true);
    let _ = forwarder.await;
    probe.abort();
    reloader.abort();
    // After the forwarder: the spans of the last sends are queued by now.
    telemetry::shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// The `--deliveries-file` subscriptions, started, and the task that follows the file and
/// ends once they all stopped; none without the flag.
fn deliveries(
    args: &ServeArgs,
    producer: Arc<KafkaProducer>,
    metrics: &Arc<Metrics>,
    schemas: &Arc<Schemas>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, AppError> {
    let Some(path) = &args.deliveries_file else {
        return Ok(None);
    };
    let deliveries = crate::delivery::load(path)?;
    let shared = crate::delivery::worker::Shared {
        brokers: args.kafka.brokers.clone(),
        overrides: args.kafka.properties()?,
        fetch_wait: Duration::from_millis(args.push.push_fetch_wait_ms),
        producer,
        metrics: metrics.clone(),
        schemas: schemas.clone(),
    };
    let running = crate::delivery::reload::Deliveries::start(path, deliveries, shared)?;
    Ok(Some(tokio::spawn(running.follow(stop.clone()))))
}

fn ingest_auth(args: &ServeArgs) -> Result<Arc<IngestAuth>, AppError> {
    let auth = IngestAuth::load(args.ingest_secret_file.as_deref())?;
    if auth.is_open() {
        tracing::warn!(listen = %args.listen, "ingest is not authenticated: anyone who reaches the listener can publish (set --ingest-secret-file)");
    } else {
        tracing::info!(secrets = auth.secrets(), "ingest needs a secret");
    }
    Ok(Arc::new(auth))
}

fn schemas(args: &ServeArgs) -> Result<Arc<Schemas>, AppError> {
    let Some(dir) = &args.schema_dir else {
        return Ok(Arc::default());
    };
    let schemas = Schemas::load_dir(dir)?;
    tracing::info!(dir = %dir.display(), schemas = schemas.len(), subjects = schemas.subjects().len(), "event data is checked against its dataschema");
    for subject in schemas.subjects() {
        let (first, last) = match (subject.versions.first(), subject.versions.last()) {
            (Some(first), Some(last)) => (first, last),
            _ => continue,
        };
        tracing::info!(
            subject = %subject.name,
            versions = %format!("v{}..v{}", first.number, last.number),
            latest = %last.id,
            compatibility = %subject.compatibility,
            transitive = subject.transitive,
            "schema subject: each version checked against {}",
            if subject.transitive { "every earlier one" } else { "the one before it" }
        );
    }
    if !schemas.subjects().is_empty() {
        let data_dir = &args.durability.data_dir;
        std::fs::create_dir_all(data_dir)?;
        let file = data_dir.join(crate::schema::pin::FILE);
        let added = crate::schema::pin::check(schemas.subjects(), &file)?;
        tracing::info!(file = %file.display(), new = added, "schema versions match their first load");
    }
    Ok(Arc::new(schemas))
}

fn subscriber_auth(args: &ServeArgs) -> Result<Arc<SubscriberAuth>, AppError> {
    let auth = SubscriberAuth::load(&args.subscribers.auth_config())?;
    if auth.is_open() {
        tracing::warn!(listen = %args.listen, "subscriptions and event status are not authenticated: anyone who reaches the listener can read every topic (set --subscriber-tokens-file or --subscriber-jwks-file)");
    } else {
        tracing::info!("subscribers need a token");
    }
    Ok(Arc::new(auth))
}

/// The filter must hear our answer (202 after spooling) before its callout times out.
fn warn_on_ack_timeout(ack_timeout_ms: u64) {
    if ack_timeout_ms >= DEFAULT_CALLOUT_TIMEOUT_MS {
        tracing::warn!(
            ack_timeout_ms,
            "ack timeout is not below the filter's default callout timeout ({DEFAULT_CALLOUT_TIMEOUT_MS} ms)"
        );
    }
}

fn kafka_settings(args: &ServeArgs) -> Result<KafkaSettings, AppError> {
    Ok(KafkaSettings {
        brokers: args.kafka.brokers.clone(),
        delivery_timeout: Duration::from_millis(args.durability.delivery_timeout_ms),
        overrides: args.kafka.properties()?,
    })
}

/// The spool and the status store under `--data-dir`, owned by the sink.
fn durable_sink(
    d: &DurabilityArgs,
    producer: Arc<KafkaProducer>,
    metrics: Arc<Metrics>,
) -> Result<DurableSink, AppError> {
    std::fs::create_dir_all(&d.data_dir)?;
    let spool = Spool::open(&d.data_dir.join("spool"), d.spool_max_bytes)?;
    let status = StatusStore::open(
        Some(&d.data_dir.join("status.log")),
        Duration::from_secs(d.idempotency_window_s),
        d.idempotency_max_entries,
    )?;
    let ack_timeout = Duration::from_millis(d.ack_timeout_ms);
    Ok(DurableSink::new(
        producer,
        spool,
        status,
        d.ack,
        ack_timeout,
        metrics,
    ))
}

/// The ingest API, the push side and `/metrics` on one listener.
fn router(
    args: &ServeArgs,
    sink: Arc<DurableSink>,
    fanout: Arc<fanout::Fanout>,
    auth: Arc<IngestAuth>,
    readers: Arc<SubscriberAuth>,
    schemas: Arc<Schemas>,
    metrics: Arc<Metrics>,
) -> axum::Router {
    let observed: Vec<Arc<dyn crate::metrics::Observed>> = vec![sink.clone(), fanout.clone()];
    ingest::router(ingest::AppState {
        sink,
        metrics: metrics.clone(),
        auth,
        readers: readers.clone(),
        schemas,
        limits: ingest::Limits {
            max_body_bytes: args.max_body_bytes,
            max_batch_events: args.max_batch_events,
        },
    })
    .merge(subscribe::router(subscribe::PushState {
        fanout,
        ping_interval: Duration::from_secs(args.push.ping_interval_s),
        auth: readers,
        tickets: Arc::default(),
        quota: subscribe::Quota::new(args.subscribers.max_subscriptions_per_token as usize),
        per_client: subscribe::Quota::new(args.subscribers.max_subscriptions_per_client as usize),
        trusted_proxies: args.subscribers.trusted_proxies.clone().into(),
        metrics: metrics.clone(),
    }))
    .merge(crate::metrics::router(metrics, observed))
}

fn push_fanout(args: &ServeArgs) -> Result<Arc<fanout::Fanout>, AppError> {
    let config = fanout::FanoutConfig {
        brokers: args.kafka.brokers.clone(),
        overrides: args.kafka.properties()?,
        queue: args.push.subscriber_queue as usize,
        grace: Duration::from_millis(args.push.hub_grace_ms),
        fetch_wait: Duration::from_millis(args.push.push_fetch_wait_ms),
    };
    Ok(fanout::Fanout::with_limits(
        config,
        fanout::PushLimits::from(&args.push),
    )?)
}

async fn flush(producer: Arc<KafkaProducer>) {
    tracing::info!("flushing the producer");
    match tokio::task::spawn_blocking(move || producer.flush(SHUTDOWN_FLUSH)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "producer flush incomplete"),
        Err(e) => tracing::warn!(error = %e, "producer flush task failed"),
    }
}

/// Resolves on SIGTERM (orchestrators) or SIGINT (a terminal).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
