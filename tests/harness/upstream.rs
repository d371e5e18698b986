//! A small HTTP backend that records what reaches it: the "backend" behind Envoy. By default
//! it answers 200 with a JSON summary of the request; a test can script the answer of a path
//! (status, headers, body byte for byte), at start (`start_with`) or later (`answer`).

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A scripted answer: the status, the headers in order, the body byte for byte.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// `status` with no headers and an empty body.
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }
}

type Log = Arc<Mutex<Vec<Received>>>;
/// Scripted answers by request path (the query left out), whatever the method.
type Script = Arc<Mutex<HashMap<String, Reply>>>;

#[derive(Clone)]
struct App {
    log: Log,
    script: Script,
}

pub struct Upstream {
    pub port: u16,
    log: Log,
    script: Script,
    task: tokio::task::JoinHandle<()>,
}

/// The router shared by the tests and the `demo-upstream` binary: answers 200 with a JSON
/// summary of what it got.
pub fn router(log: Log) -> Router {
    scripted_router(log, Script::default())
}

fn scripted_router(log: Log, script: Script) -> Router {
    Router::new()
        .fallback(handle)
        .with_state(App { log, script })
}

async fn handle(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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
    let scripted = app
        .script
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(uri.path())
        .cloned();
    let summary = serde_json::json!({
        "upstream": "demo",
        "method": rec.method,
        "path": rec.path,
        "body_bytes": rec.body.len(),
    });
    app.log.lock().unwrap_or_else(|e| e.into_inner()).push(rec);
    match scripted {
        Some(answer) => scripted_response(answer),
        None => ([("content-type", "application/json")], summary.to_string()).into_response(),
    }
}

fn scripted_response(answer: Reply) -> Response {
    let mut builder = Response::builder().status(answer.status);
    for (n, v) in &answer.headers {
        builder = builder.header(n, v);
    }
    builder
        .body(Body::from(answer.body))
        .unwrap_or_else(|e| panic!("scripted answer {}: {e}", answer.status))
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::start_with(std::iter::empty::<(&str, Reply)>()).await
    }

    /// Answers each given path (exact, query left out) as scripted; other paths get the
    /// default answer.
    pub async fn start_with<'a>(script: impl IntoIterator<Item = (&'a str, Reply)>) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind upstream: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let log: Log = Arc::default();
        let script: Script = Arc::new(Mutex::new(
            script
                .into_iter()
                .map(|(path, answer)| (path.to_string(), answer))
                .collect(),
        ));
        let app = scripted_router(log.clone(), script.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream {
            port,
            log,
            script,
            task,
        }
    }

    /// From now on answers requests for `path` (exact, query left out) with `answer`.
    pub fn answer(&self, path: &str, answer: Reply) {
        self.script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_string(), answer);
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
