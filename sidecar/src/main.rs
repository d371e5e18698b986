//! eventwire sidecar: the Envoy filter POSTs CloudEvents here; we produce them to Kafka and
//! answer once the broker acknowledged them.

mod cloudevent;
mod config;
mod consumed;
mod cursor;
mod durable;
mod fanout;
mod filter;
mod ingest;
mod problem;
mod publish;
mod spool;
mod status;
mod subscribe;
mod subscription;
mod tail;
mod topic;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use thiserror::Error;
use tracing_subscriber::EnvFilter;

use config::{Cli, Command, LogFormat, ServeArgs, TopicCommand};
use durable::DurableSink;
use publish::{KafkaPublisher, KafkaSettings};
use spool::Spool;
use status::StatusStore;

/// The filter's callout timeout default; the delivery timeout must stay below it so the filter
/// receives our answer instead of timing out itself.
const FILTER_CALLOUT_TIMEOUT_MS: u64 = 5000;
/// Everything the broker has not acknowledged is already in the spool, so the flush on
/// shutdown only saves the next start some re-sends; keep it short.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

#[derive(Debug, Error)]
pub enum AppError {
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Spool(#[from] spool::SpoolError),
    #[error("{0}")]
    Other(String),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(args).await,
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `EVENTWIRE_LOG` wins over `RUST_LOG` so the sidecar can be tuned apart from other Rust
/// processes sharing an environment.
fn init_tracing(format: LogFormat) {
    let directives = std::env::var("EVENTWIRE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("warning: invalid log filter {directives:?} ({e}); using info");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(args: ServeArgs) -> Result<(), AppError> {
    let d = &args.durability;
    if d.ack_timeout_ms >= FILTER_CALLOUT_TIMEOUT_MS {
        tracing::warn!(
            ack_timeout_ms = d.ack_timeout_ms,
            "ack timeout is not below the filter's default callout timeout ({FILTER_CALLOUT_TIMEOUT_MS} ms)"
        );
    }
    let settings = KafkaSettings {
        brokers: args.kafka.brokers.clone(),
        delivery_timeout: Duration::from_millis(d.delivery_timeout_ms),
        overrides: args.kafka.kafka.clone(),
    };
    let publisher = Arc::new(KafkaPublisher::new(&settings)?);
    let probe = publisher.spawn_health_probe();
    std::fs::create_dir_all(&d.data_dir)?;
    let spool = Spool::open(&d.data_dir.join("spool"), d.spool_max_bytes)?;
    let status = Arc::new(StatusStore::open(
        Some(&d.data_dir.join("status.log")),
        Duration::from_secs(d.idempotency_window_s),
        d.idempotency_max_entries,
    )?);
    let sink = Arc::new(DurableSink::new(
        publisher.clone(),
        spool,
        status.clone(),
        d.ack,
        Duration::from_millis(d.ack_timeout_ms),
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let forwarder = sink.spawn_forwarder(stopped);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %args.listen, brokers = %args.kafka.brokers, data_dir = %d.data_dir.display(), ack = ?d.ack, "eventwire sidecar listening");
    let fanout = push_fanout(&args)?;
    let app = ingest::router(ingest::AppState {
        sink,
        status,
        max_body_bytes: args.max_body_bytes,
    })
    .merge(subscribe::router(subscribe::PushState {
        fanout: fanout.clone(),
        ping_interval: Duration::from_secs(args.push.ping_interval_s),
    }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // Open subscriptions would otherwise hold the graceful shutdown forever.
            fanout.shutdown();
        })
        .await?;
    // Flush while the forwarder still records what gets delivered, then stop it; whatever is
    // not in Kafka by then stays in the spool for the next start.
    if publisher.is_ready() {
        flush(publisher.clone()).await;
    }
    let _ = stop.send(true);
    let _ = forwarder.await;
    probe.abort();
    tracing::info!("stopped");
    Ok(())
}

fn push_fanout(args: &ServeArgs) -> Result<Arc<fanout::Fanout>, AppError> {
    let config = fanout::FanoutConfig {
        brokers: args.kafka.brokers.clone(),
        overrides: args.kafka.kafka.clone(),
        queue: args.push.subscriber_queue as usize,
        grace: Duration::from_millis(args.push.hub_grace_ms),
        fetch_wait: Duration::from_millis(args.push.push_fetch_wait_ms),
    };
    Ok(fanout::Fanout::with_limits(
        config,
        fanout::PushLimits::from(&args.push),
    )?)
}

async fn flush(publisher: Arc<KafkaPublisher>) {
    tracing::info!("flushing the producer");
    match tokio::task::spawn_blocking(move || publisher.flush(SHUTDOWN_FLUSH)).await {
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
