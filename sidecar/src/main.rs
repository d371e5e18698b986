//! The `eventwire-sidecar` binary: parses the command line and runs it (see `app`).

use std::process::ExitCode;

use clap::Parser;
use eventwire_sidecar::{app, config::Cli};

// glibc's allocator showed as a tenth of the sidecar's CPU on the bridge load (`make bench`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    app::init_tracing(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.runtime_threads())
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(app::run(cli)).map_err(|e| e.to_string()),
        Err(e) => Err(format!("cannot start the async runtime: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
