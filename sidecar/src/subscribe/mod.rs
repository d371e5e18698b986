//! `GET /v1/subscribe`: a topic's events pushed over WebSocket (one text frame per event) or
//! Server-Sent Events, and `GET /ui`, the live viewer page. Every parameter is checked before
//! the upgrade, so a mistake is a 4xx problem+json, not a closed socket.
//!
//! Slow clients: each subscriber may fall `--subscriber-queue` (N) events behind the topic's
//! hub. One that stays more than N behind for `OVER_QUEUE_GRACE`, or ever falls 2N behind (the
//! broadcast's capacity), is closed alone (WebSocket code 4008, SSE `event: error`) with the
//! cursor to resume from; the hub and every other subscriber never wait for it. The grace
//! lets a fast client absorb a burst (one Kafka fetch can hold hundreds of records). The same
//! holds in bytes with `--subscriber-queue-bytes`, which bounds what a topic's hub keeps.
//!
//! Limits, checked before the upgrade: `--max-subscribers` open subscriptions and
//! `--max-replays` replaying ones (503 + `Retry-After: 1`); internal topics (`__*`) and, with
//! `--push-topics`, unlisted ones are 404 `unknown-topic`, exactly like a missing topic. After
//! it: a write that does not complete in `WRITE_TIMEOUT` ends the subscription, and a replay
//! still behind after `--max-replay-s` is closed with 4008 and its cursor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use eventwire_contract::problem::Kind;
use eventwire_contract::topic::{self, TopicError};
use thiserror::Error;
use tokio::sync::{mpsc, watch};

use crate::cursor::{Cursor, StartFrom};
use crate::fanout::{Fanout, FanoutError, stopped};
use crate::problem::{ProblemSource, allow};
use crate::subscription::{Behind, End, Event, Lag, StartError, Subscription, cursor_before};
use crate::subscription_filter::{Filter, FilterError};

/// WebSocket close code for a subscriber that fell too far behind (4000-4999 are private
/// use; 4008 mirrors 1008 "policy violation").
pub const SLOW_CONSUMER_CLOSE: u16 = 4008;
/// A write that cannot complete in this time means the client is gone or stuck (WebSocket:
/// the socket is dropped; SSE: the subscription ends and frees its hub slot, replay and
/// `--max-subscribers` place; the connection goes when its last bytes can be written or the
/// proxy's idle timeout resets it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a blocked hand-over re-checks the subscriber's lag.
const OVERFLOW_CHECK: Duration = Duration::from_millis(20);
/// How long a subscriber may stay more than its queue behind before it is closed.
const OVER_QUEUE_GRACE: Duration = Duration::from_millis(100);
/// Close reasons must fit a control frame (123 bytes).
const MAX_CLOSE_REASON: usize = 123;

const VIEWER_HTML: &str = include_str!("viewer.html");

#[derive(Clone)]
pub struct PushState {
    pub fanout: Arc<Fanout>,
    pub ping_interval: Duration,
}

pub fn router(state: PushState) -> Router {
    Router::new()
        .route("/v1/subscribe", get(subscribe).fallback(allow("GET, HEAD")))
        .route("/ui", get(viewer).fallback(allow("GET, HEAD")))
        .with_state(state)
}

async fn viewer() -> Html<&'static str> {
    Html(VIEWER_HTML)
}

#[derive(Debug, Error)]
pub enum SubscribeError {
    #[error("the `topic` query parameter is required")]
    MissingTopic,
    #[error("invalid topic name: {0}")]
    InvalidTopic(#[from] TopicError),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("`{part}`: {reason}")]
    InvalidFrom { part: &'static str, reason: String },
    #[error("{0}")]
    InvalidFilter(#[from] FilterError),
    /// Missing, internal or not in `--push-topics`: the same answer, so nothing leaks.
    #[error("topic `{0}` does not exist or is not open to subscribers")]
    UnknownTopic(String),
    #[error("Kafka is not available: {0}")]
    BrokerUnavailable(String),
    #[error("{0}")]
    TooManySubscribers(String),
    #[error("{0}")]
    TooManyReplays(String),
    #[error(
        "subscribe with a WebSocket upgrade, or with `Accept: text/event-stream` for Server-Sent Events"
    )]
    TransportRequired,
}

impl ProblemSource for SubscribeError {
    fn kind(&self) -> Kind {
        match self {
            SubscribeError::MissingTopic => Kind::MissingTopic,
            SubscribeError::InvalidTopic(_) => Kind::InvalidTopic,
            SubscribeError::InvalidQuery(_) => Kind::InvalidQuery,
            SubscribeError::InvalidFrom { .. } => Kind::InvalidFrom,
            SubscribeError::InvalidFilter(_) => Kind::InvalidFilter,
            SubscribeError::UnknownTopic(_) => Kind::UnknownTopic,
            SubscribeError::BrokerUnavailable(_) => Kind::BrokerUnavailable,
            SubscribeError::TooManySubscribers(_) => Kind::TooManySubscribers,
            SubscribeError::TooManyReplays(_) => Kind::TooManyReplays,
            SubscribeError::TransportRequired => Kind::TransportRequired,
        }
    }

    fn parameter(&self) -> Option<&str> {
        match self {
            SubscribeError::MissingTopic | SubscribeError::InvalidTopic(_) => Some("topic"),
            SubscribeError::InvalidFrom { part, .. } => Some(part),
            SubscribeError::InvalidFilter(e) => Some(&e.path),
            _ => None,
        }
    }
}

impl IntoResponse for SubscribeError {
    fn into_response(self) -> Response {
        crate::problem::response(&self)
    }
}

impl From<StartError> for SubscribeError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Fanout(FanoutError::UnknownTopic(t)) => SubscribeError::UnknownTopic(t),
            StartError::Fanout(FanoutError::Unavailable(why)) => {
                SubscribeError::BrokerUnavailable(why)
            }
            StartError::Fanout(e @ FanoutError::TooManySubscribers(_)) => {
                SubscribeError::TooManySubscribers(e.to_string())
            }
            StartError::Fanout(e @ FanoutError::TooManyReplays(_)) => {
                SubscribeError::TooManyReplays(e.to_string())
            }
            other @ StartError::UnknownPartition { .. } => SubscribeError::InvalidFrom {
                part: "from",
                reason: other.to_string(),
            },
        }
    }
}

/// The checked request: what to read, from where, through which filter.
#[derive(Debug)]
struct Request {
    topic: String,
    from: StartFrom,
    filter: Option<Filter>,
}

fn parse_request(
    query: &[(String, String)],
    last_event_id: Option<&str>,
) -> Result<Request, SubscribeError> {
    let param = |name: &str| query.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v);
    let topic = param("topic").ok_or(SubscribeError::MissingTopic)?;
    topic::validate(topic)?;
    // An EventSource reconnects to the same URL with Last-Event-ID, so the header wins.
    let from = match last_event_id {
        Some(id) => id.parse::<Cursor>().map(StartFrom::Cursor).map_err(|e| {
            SubscribeError::InvalidFrom {
                part: "Last-Event-ID",
                reason: format!("{id:?} is not a cursor like `0:16,1:8`: {e}"),
            }
        })?,
        None => param("from")
            .map(|f| f.parse::<StartFrom>())
            .transpose()
            .map_err(|e| SubscribeError::InvalidFrom {
                part: "from",
                reason: e.to_string(),
            })?
            .unwrap_or(StartFrom::Latest),
    };
    let filter = param("filter")
        .filter(|f| !f.trim().is_empty())
        .map(|f| Filter::parse(f))
        .transpose()?;
    Ok(Request {
        topic: topic.clone(),
        from,
        filter,
    })
}

async fn subscribe(
    State(state): State<PushState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, SubscribeError> {
    let Query(query) = query.map_err(|e| SubscribeError::InvalidQuery(e.body_text()))?;
    let sse = wants_sse(&headers);
    let last_event_id = match sse {
        true => headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty()),
        false => None,
    };
    let request = parse_request(&query, last_event_id)?;
    if upgrade.is_err() && !sse {
        return Err(SubscribeError::TransportRequired);
    }
    let fanout = state.fanout.clone();
    if !fanout.limits().topic_open(&request.topic) {
        return Err(SubscribeError::UnknownTopic(request.topic));
    }
    let admitted = fanout.admit().map_err(StartError::from)?;
    let sub = Subscription::start(
        fanout,
        &request.topic,
        &request.from,
        request.filter,
        admitted,
    )
    .await?;
    tracing::debug!(topic = request.topic, cursor = %sub.cursor(), sse, "subscriber joined");
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(pump(sub, tx, state.fanout.shutdown_signal()));
    Ok(match upgrade {
        Ok(ws) => ws
            .on_upgrade(move |socket| serve_websocket(socket, rx, state.ping_interval))
            .into_response(),
        Err(_) => serve_sse(rx, state.ping_interval).into_response(),
    })
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

/// What the pump hands to a connection's writer.
enum Outgoing {
    Event(Event),
    End(End),
}

/// Moves events from the subscription to the writer. While the writer is busy the
/// subscriber's lag is watched, so a client that stops reading is detected even though
/// nothing is being taken from the broadcast.
async fn pump(
    mut sub: Subscription,
    tx: mpsc::Sender<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut lag = LagWatch::default();
    loop {
        let next = tokio::select! {
            next = sub.next() => next,
            () = tx.closed() => return,
            () = stopped(&mut shutdown) => Err(End::ShuttingDown { cursor: sub.cursor().clone() }),
        };
        let event = match next {
            Ok(event) => event,
            Err(end) => {
                let _ = tx.send(Outgoing::End(end)).await;
                return;
            }
        };
        let before = cursor_before(sub.cursor(), &event);
        let overflow = tokio::select! {
            sent = tx.send(Outgoing::Event(event)) => match sent {
                // The writer has the event: resume after it.
                Ok(()) => lag.too_long(&sub).map(|behind| (behind, sub.cursor().clone())),
                Err(_) => return,
            },
            // The event in hand did not reach the writer: resume before it.
            behind = lag.wait_too_long(&sub) => Some((behind, before)),
            () = tokio::time::sleep(WRITE_TIMEOUT) => {
                // The writer has not taken an event for that long (a replay is not watched
                // for lag): the client is stuck. Free everything; the writer goes on its own.
                tracing::info!(cursor = %before, "closing subscriber whose writes stalled");
                return;
            }
        };
        if let Some((behind, resume)) = overflow {
            let end = sub.slow_consumer(behind, resume);
            // Free the hub's slot before waiting for the writer to take the notice.
            drop(sub);
            let _ = tx.send(Outgoing::End(end)).await;
            return;
        }
    }
}

/// Since when a subscriber has been more than its queue behind.
#[derive(Default)]
struct LagWatch {
    over_since: Option<Instant>,
}

impl LagWatch {
    /// The limit the subscriber has been over for too long (or far over), if any.
    fn too_long(&mut self, sub: &Subscription) -> Option<Behind> {
        match sub.lag() {
            Lag::Within => {
                self.over_since = None;
                None
            }
            Lag::FarOver(behind) => Some(behind),
            Lag::Over(behind) => {
                let since = self.over_since.get_or_insert_with(Instant::now);
                (since.elapsed() >= OVER_QUEUE_GRACE).then_some(behind)
            }
        }
    }

    async fn wait_too_long(&mut self, sub: &Subscription) -> Behind {
        loop {
            if let Some(behind) = self.too_long(sub) {
                return behind;
            }
            tokio::time::sleep(OVERFLOW_CHECK).await;
        }
    }
}

/// The text a client reads when its subscription ends.
fn end_message(end: &End) -> String {
    match end {
        End::SlowConsumer { limit, cursor } => {
            format!("slow consumer: fell more than {limit} behind; reconnect with from={cursor}")
        }
        End::ReplayTooLong { limit, cursor } => format!(
            "slow replay: not caught up after {} s; reconnect with from={cursor}",
            limit.as_secs()
        ),
        End::ShuttingDown { cursor } => {
            format!("sidecar shutting down; reconnect with from={cursor}")
        }
    }
}

fn close_frame(end: &End) -> CloseFrame {
    let code = match end {
        End::SlowConsumer { .. } | End::ReplayTooLong { .. } => SLOW_CONSUMER_CLOSE,
        End::ShuttingDown { .. } => 1001,
    };
    let mut reason = end_message(end);
    if reason.len() > MAX_CLOSE_REASON {
        // Many partitions: the cursor does not fit; the last frame carries it anyway.
        reason = match end {
            End::SlowConsumer { limit, .. } => format!(
                "slow consumer: fell more than {limit} behind; reconnect with from=<last cursor>"
            ),
            End::ReplayTooLong { limit, .. } => format!(
                "slow replay: not caught up after {} s; reconnect with from=<last cursor>",
                limit.as_secs()
            ),
            End::ShuttingDown { .. } => {
                "sidecar shutting down; reconnect with from=<last cursor>".into()
            }
        };
    }
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

async fn serve_websocket(
    mut socket: WebSocket,
    mut rx: mpsc::Receiver<Outgoing>,
    ping_every: Duration,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Outgoing::Event(event)) => {
                    if !send(&mut socket, Message::Text(event.frame.into())).await {
                        return;
                    }
                }
                Some(Outgoing::End(end)) => {
                    tracing::info!(reason = end_message(&end), "closing subscriber");
                    let _ = send(&mut socket, Message::Close(Some(close_frame(&end)))).await;
                    return;
                }
                None => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                // Pongs and anything else a client says prove it is alive.
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > ping_every * 3 {
                    tracing::info!("closing subscriber that stopped answering pings");
                    return;
                }
                if !send(&mut socket, Message::Ping(Default::default())).await {
                    return;
                }
            }
        }
    }
}

async fn send(socket: &mut WebSocket, message: Message) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, socket.send(message)).await,
        Ok(Ok(()))
    )
}

fn serve_sse(
    rx: mpsc::Receiver<Outgoing>,
    ping_every: Duration,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let stream = futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let event = match rx.recv().await? {
            Outgoing::Event(e) => {
                let event = SseEvent::default()
                    .id(e.cursor)
                    .event("cloudevent")
                    .data(e.frame);
                (event, Some(rx))
            }
            Outgoing::End(end) => {
                tracing::info!(reason = end_message(&end), "ending SSE subscriber");
                (
                    SseEvent::default().event("error").data(end_message(&end)),
                    None,
                )
            }
        };
        Some((Ok(event.0), event.1))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(ping_every).text("ping"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn request_parsing() {
        let r = parse_request(&q(&[("topic", "orders")]), None).unwrap();
        assert_eq!((r.topic.as_str(), &r.from), ("orders", &StartFrom::Latest));
        assert!(r.filter.is_none());
        let r = parse_request(&q(&[("topic", "o"), ("from", "0:5")]), Some("0:9,1:2")).unwrap();
        assert_eq!(
            r.from,
            StartFrom::Cursor("0:9,1:2".parse().unwrap()),
            "header wins"
        );
        let r = parse_request(
            &q(&[("topic", "o"), ("filter", r#"{"exact":{"type":"x"}}"#)]),
            None,
        )
        .unwrap();
        assert!(r.filter.is_some());
    }

    type Query<'a> = &'a [(&'a str, &'a str)];

    #[test]
    fn request_errors_name_the_part() {
        let cases: [(Query, Option<&str>, &str, &str); 5] = [
            (&[], None, "missing-topic", "topic"),
            (&[("topic", "a b")], None, "invalid-topic", "topic"),
            (
                &[("topic", "o"), ("from", "yesterday")],
                None,
                "invalid-from",
                "from",
            ),
            (
                &[("topic", "o")],
                Some("x"),
                "invalid-from",
                "Last-Event-ID",
            ),
            (
                &[("topic", "o"), ("filter", r#"[{"prefix":{"type":1}}]"#)],
                None,
                "invalid-filter",
                "filter[0].prefix",
            ),
        ];
        for (query, leid, slug, part) in cases {
            let e = parse_request(&q(query), leid).unwrap_err();
            assert_eq!(e.kind().slug(), slug, "{e}");
            assert_eq!(e.parameter(), Some(part), "{e}");
            assert_eq!(e.kind().status(), 400);
        }
    }

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let short = End::SlowConsumer {
            limit: Behind::Events(1024),
            cursor: "0:16,1:8,2:4".parse().unwrap(),
        };
        let frame = close_frame(&short);
        assert_eq!(frame.code, SLOW_CONSUMER_CLOSE);
        assert_eq!(
            frame.reason.as_str(),
            "slow consumer: fell more than 1024 events behind; reconnect with from=0:16,1:8,2:4"
        );
        let long = End::SlowConsumer {
            limit: Behind::Events(1024),
            cursor: Cursor::new((0..50).map(|p| (p, 1_000_000))),
        };
        let frame = close_frame(&long);
        assert!(frame.reason.len() <= MAX_CLOSE_REASON);
        assert!(frame.reason.ends_with("from=<last cursor>"));
        for end in [
            End::SlowConsumer {
                limit: Behind::Bytes(64 << 20),
                cursor: Cursor::new((0..50).map(|p| (p, 1_000_000))),
            },
            End::ReplayTooLong {
                limit: Duration::from_secs(300),
                cursor: Cursor::new((0..50).map(|p| (p, 1_000_000))),
            },
        ] {
            let frame = close_frame(&end);
            assert_eq!(frame.code, SLOW_CONSUMER_CLOSE);
            assert!(frame.reason.len() <= MAX_CLOSE_REASON, "{}", frame.reason);
        }
        let replay = End::ReplayTooLong {
            limit: Duration::from_secs(300),
            cursor: "0:4".parse().unwrap(),
        };
        assert_eq!(
            end_message(&replay),
            "slow replay: not caught up after 300 s; reconnect with from=0:4"
        );
    }

    #[tokio::test]
    async fn viewer_and_problems_over_http() {
        use axum::body::Body;
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let fanout = Fanout::with_limits(
            crate::fanout::FanoutConfig {
                brokers: "127.0.0.1:1".into(),
                overrides: vec![],
                queue: 8,
                grace: Duration::from_secs(1),
                fetch_wait: Duration::from_millis(100),
            },
            crate::fanout::PushLimits {
                max_subscribers: 1,
                topics: vec!["t".into(), "u".into()],
                ..crate::fanout::PushLimits::default()
            },
        )
        .unwrap();
        let app = router(PushState {
            fanout: fanout.clone(),
            ping_interval: Duration::from_secs(15),
        });
        let get = |uri: &str| axum::http::Request::get(uri).body(Body::empty()).unwrap();
        let resp = app.clone().oneshot(get("/ui")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("/v1/subscribe"));

        let resp = app
            .clone()
            .oneshot(get("/v1/subscribe?topic=t&filter=%7B%22exact%22%3A1%7D"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "urn:eventwire:problem:invalid-filter");
        assert_eq!(v["parameter"], "filter.exact");

        // Valid parameters but neither an upgrade nor SSE: refused before touching Kafka.
        let resp = app
            .clone()
            .oneshot(get("/v1/subscribe?topic=t"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(resp.headers()[header::UPGRADE], "websocket");

        let sse = |uri: &str| {
            axum::http::Request::get(uri)
                .header(header::ACCEPT, "text/event-stream")
                .body(Body::empty())
                .unwrap()
        };
        let problem = |resp: Response| async move {
            let status = resp.status();
            let retry = resp.headers().get(header::RETRY_AFTER).cloned();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            (
                status,
                v["type"].as_str().unwrap_or_default().to_owned(),
                retry,
            )
        };
        // Internal and unlisted topics: the answer of a missing topic, before touching Kafka.
        for topic in ["__consumer_offsets", "v"] {
            let resp = app
                .clone()
                .oneshot(sse(&format!("/v1/subscribe?topic={topic}")))
                .await
                .unwrap();
            let (status, ty, _) = problem(resp).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{topic}");
            assert_eq!(ty, "urn:eventwire:problem:unknown-topic");
        }
        // The one subscriber place is taken: 503 before touching Kafka.
        let _taken = fanout.admit().unwrap();
        let resp = app
            .clone()
            .oneshot(sse("/v1/subscribe?topic=t"))
            .await
            .unwrap();
        let (status, ty, retry) = problem(resp).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ty, "urn:eventwire:problem:too-many-subscribers");
        assert_eq!(retry.unwrap(), "1");

        let post = axum::http::Request::post("/v1/subscribe?topic=t")
            .body(Body::empty())
            .unwrap();
        let resp = app.oneshot(post).await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[header::ALLOW], "GET, HEAD");
    }
}
