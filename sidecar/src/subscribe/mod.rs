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
//! Who may subscribe (`auth::subscriber`): a bearer token in `Authorization`, as the
//! WebSocket subprotocol `bearer.<token>` (offered with `eventwire`, which the answer
//! selects), or a single-use `ticket=` from `POST /v1/tickets`; 401 / 403 before the upgrade.
//! A token's forced filter is applied together with the subscriber's own, and a
//! subscription ends when its token expires (WebSocket 4401, SSE `event: error`).
//!
//! Limits, checked before the upgrade: `--max-subscribers` open subscriptions and
//! `--max-replays` replaying ones (503 + `Retry-After: 1`); internal topics (`__*`) and, with
//! `--push-topics`, unlisted ones are 404 `unknown-topic`, exactly like a missing topic. After
//! it: a write that does not complete in `WRITE_TIMEOUT` ends the subscription, and a replay
//! still behind after `--max-replay-s` is closed with 4008 and its cursor.

mod error;
mod pump;
mod quota;
mod request;
mod sse;
mod websocket;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::Extensions;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::mpsc;

pub use error::SubscribeError;

use crate::auth::subscriber::{WS_PROTOCOL, ws_protocol_token};
use crate::auth::ticket::TICKET_TTL;
use crate::auth::{Access, SubscriberAuth, Tickets};
use crate::fanout::Fanout;
use crate::problem::allow;
use crate::subscription::{StartError, Subscription};
use crate::subscription_filter::Filter;
use request::Request;

pub use quota::Quota;
use quota::client_address;

/// Largest message a subscriber may send (it only needs pings and a close).
const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

const VIEWER_HTML: &str = include_str!("viewer.html");

#[derive(Clone)]
pub struct PushState {
    pub fanout: Arc<Fanout>,
    pub ping_interval: Duration,
    pub auth: Arc<SubscriberAuth>,
    pub tickets: Arc<Tickets>,
    pub quota: Arc<Quota>,
    pub per_client: Arc<Quota>,
    /// Proxies whose `X-Forwarded-For` names the client (`--trusted-proxies`).
    pub trusted_proxies: Arc<[IpAddr]>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub fn router(state: PushState) -> Router {
    Router::new()
        .route("/v1/subscribe", get(subscribe).fallback(allow("GET, HEAD")))
        .route("/v1/tickets", post(ticket).fallback(allow("POST")))
        .route("/ui", get(viewer).fallback(allow("GET, HEAD")))
        .with_state(state)
}

async fn viewer() -> Html<&'static str> {
    Html(VIEWER_HTML)
}

async fn subscribe(
    State(state): State<PushState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
    extensions: Extensions,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, SubscribeError> {
    let Query(query) = query.map_err(|e| SubscribeError::InvalidQuery(e.body_text()))?;
    let sse = request::wants_sse(&headers);
    let last_event_id = sse.then(|| request::last_event_id(&headers)).flatten();
    let request = request::parse_request(&query, last_event_id)?;
    if upgrade.is_err() && !sse {
        return Err(SubscribeError::TransportRequired);
    }
    let access = authorize(&state, &headers, &request, upgrade.is_ok())?;
    if !access.allows(&request.topic) {
        return Err(SubscribeError::ForbiddenTopic(request.topic));
    }
    let quota = |what, flag| move |limit| SubscribeError::Quota { limit, what, flag };
    let place = state
        .quota
        .take(access.principal.as_deref())
        .map_err(quota("token", "token"))?;
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    let client = client_address(peer, forwarded, &state.trusted_proxies);
    let client_place = state
        .per_client
        .take(client.as_deref())
        .map_err(quota("client address", "client"))?;
    let sub = start(&state.fanout, request, access.filter).await?;
    tracing::debug!(topic = sub.topic(), cursor = %sub.cursor(), sse, principal = access.principal, "subscriber joined");
    let (tx, rx) = mpsc::channel(1);
    let shutdown = state.fanout.shutdown_signal();
    let counted = state.metrics.subscription(sub.topic(), upgrade.is_err());
    let frames = counted.frames.clone();
    tokio::spawn(async move {
        pump::pump(sub, tx, shutdown, access.expires, &counted.slow_closed).await;
        drop((place, client_place, counted));
    });
    let ping = state.ping_interval;
    Ok(match upgrade {
        Ok(ws) => ws
            .protocols([WS_PROTOCOL])
            .max_message_size(MAX_CLIENT_MESSAGE)
            .max_frame_size(MAX_CLIENT_MESSAGE)
            .on_upgrade(move |socket| websocket::serve_websocket(socket, rx, ping, frames))
            .into_response(),
        Err(_) => sse::serve_sse(rx, ping, frames).into_response(),
    })
}

/// The subscriber's access: a ticket, else the token subprotocol (WebSocket), else the
/// `Authorization` header.
fn authorize(
    state: &PushState,
    headers: &HeaderMap,
    request: &Request,
    websocket: bool,
) -> Result<Access, SubscribeError> {
    if let Some(ticket) = &request.ticket {
        return Ok(state.tickets.redeem(ticket)?);
    }
    match ws_protocol_token(headers).filter(|_| websocket) {
        Some(token) => Ok(state.auth.check(token)?),
        None => Ok(state.auth.check_header(headers)?),
    }
}

/// `POST /v1/tickets`: a single-use ticket carrying the bearer token's access.
async fn ticket(
    State(state): State<PushState>,
    headers: HeaderMap,
) -> Result<Response, SubscribeError> {
    let access = state.auth.check_header(&headers)?;
    let ticket = state.tickets.issue(access)?;
    let body = serde_json::json!({"ticket": ticket, "expires_in": TICKET_TTL.as_secs()});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Admits and starts the subscription; every refusal here comes before the upgrade. The
/// token's forced filter holds together with the subscriber's own.
async fn start(
    fanout: &Arc<Fanout>,
    request: Request,
    forced: Option<Filter>,
) -> Result<Subscription, SubscribeError> {
    if !fanout.limits().topic_open(&request.topic) {
        return Err(SubscribeError::UnknownTopic(request.topic));
    }
    let admitted = fanout.admit().map_err(StartError::from)?;
    let sub = Subscription::start(
        fanout.clone(),
        &request.topic,
        &request.from,
        Filter::and(forced, request.filter),
        admitted,
    )
    .await?;
    Ok(sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{StatusCode, header};

    #[tokio::test]
    async fn viewer_and_problems_over_http() {
        use axum::body::Body;
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let fanout = Fanout::with_limits(
            crate::fanout::FanoutConfig::unreachable(),
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
            auth: Arc::new(SubscriberAuth::open()),
            tickets: Arc::default(),
            quota: Quota::new(1),
            per_client: Quota::new(1),
            trusted_proxies: Arc::new([]),
            metrics: Arc::default(),
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
