//! The `eventwire-sidecar` binary: parses the command line and runs it (see `app`).

use std::process::ExitCode;

use clap::Parser;
use eventwire_sidecar::{app, config::Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    app::init_tracing(cli.log_format);
    match app::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
