//! A small HTTP backend that records what reaches it: the "backend" behind Envoy.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use std::sync::{Arc, Mutex};

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

type Log = Arc<Mutex<Vec<Received>>>;

pub struct Upstream {
    pub port: u16,
    log: Log,
    task: tokio::task::JoinHandle<()>,
}

/// The router shared by the tests and the `demo-upstream` binary: answers 200 with a JSON
/// summary of what it got.
pub fn router(log: Log) -> Router {
    Router::new().fallback(handle).with_state(log)
}

async fn handle(
    State(log): State<Log>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> ([(&'static str, &'static str); 1], String) {
    let rec = Received {
        method: method.to_string(),
        path: uri.to_string(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    let summary = serde_json::json!({
        "upstream": "demo",
        "method": rec.method,
        "path": rec.path,
        "body_bytes": rec.body.len(),
    });
    log.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
    ([("content-type", "application/json")], summary.to_string())
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind upstream: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let log: Log = Arc::default();
        let app = router(log.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { port, log, task }
    }

    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
