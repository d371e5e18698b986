//! The demo backend for `make run`: answers every request with a JSON summary and prints
//! one line per request, so the demo shows which requests reached the backend.

use eventwire_e2e::upstream::router;
use std::sync::{Arc, Mutex};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".to_string());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-upstream: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let log = Arc::new(Mutex::new(Vec::new()));
    let printer = log.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let log = printer.lock().unwrap_or_else(|e| e.into_inner());
            for r in log.iter().skip(seen) {
                let r: &eventwire_e2e::Received = r;
                println!(
                    "demo-upstream: {} {} ({} bytes)",
                    r.method,
                    r.path,
                    r.body.len()
                );
            }
            seen = log.len();
        }
    });
    println!("demo-upstream: listening on {addr}");
    let _ = axum::serve(listener, router(log)).await;
}
