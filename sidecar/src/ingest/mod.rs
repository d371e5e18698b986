//! The HTTP API: `POST /v1/events`, `GET /v1/events/<id>`, health and readiness. Every
//! error is problem+json (`problem`). An event's status is read with a subscriber's
//! credentials (`auth::subscriber`), for the topics they may read.

mod error;
mod request;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use eventwire_contract::INGEST_PATH;
use eventwire_contract::problem::Kind;
use serde_json::json;

pub use error::IngestError;
pub use request::Limits;

use request::Events;

use crate::cloudevent::CloudEvent;
use crate::problem::{ProblemSource, RouteError, allow};
use crate::sink::{EventRecord, EventSink, PublishError};
use crate::status::{Accepted, Snapshot};
use crate::subscribe::SubscribeError;
use crate::telemetry;
use crate::trace_context::{TraceId, TraceParent};
use tracing::field::display;

#[derive(Clone)]
pub struct AppState {
    pub sink: Arc<dyn EventSink>,
    pub limits: Limits,
    pub auth: Arc<crate::auth::IngestAuth>,
    /// Who may read an event's status: the subscribers of its topic.
    pub readers: Arc<crate::auth::SubscriberAuth>,
    /// The schemas event data is checked against (`--schema-dir`).
    pub schemas: Arc<crate::schema::Schemas>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        // Each route names its methods for the 405's `Allow` (RFC 9110).
        .route(INGEST_PATH, post(post_event).fallback(allow("POST")))
        .route(
            "/v1/events/{id}",
            get(get_event).fallback(allow("GET, HEAD")),
        )
        .route("/healthz", get(healthz).fallback(allow("GET, HEAD")))
        .route("/readyz", get(readyz).fallback(allow("GET, HEAD")))
        .fallback(|| async { RouteError::NotFound })
        .method_not_allowed_fallback(|| async { RouteError::MethodNotAllowed(None) })
        // We enforce --max-body-bytes ourselves so the 413 is problem+json, not axum's text.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.sink.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        IngestError::NotReady.into_response()
    }
}

async fn post_event(State(state): State<AppState>, request: Request) -> Response {
    let response = publish(&state, request).await;
    state.metrics.ingest_answered(refusal(&response));
    response
}

/// The slug of a refusal's problem type, `None` for a 2xx (a 207 included).
fn refusal(response: &Response) -> Option<&'static str> {
    if response.status().is_success() {
        return None;
    }
    // Every refusal is rendered by `reject`, which keeps its kind in the response.
    let kind = response.extensions().get::<Kind>();
    Some(kind.map_or("unknown", |k| k.slug()))
}

async fn publish(state: &AppState, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // Before anything is read: a caller without the secret learns nothing else.
    let grant = match state.auth.check(&parts.headers) {
        Ok(g) => g,
        Err(e) => return reject(IngestError::from(e), None),
    };
    let topic = match request::topic(&parts.headers) {
        Ok(t) => t,
        Err(e) => return reject(e, None),
    };
    if !grant.allows(&topic) {
        return reject(IngestError::ForbiddenTopic(topic), None);
    }
    match request::read_events(&parts.headers, body, state.limits).await {
        Ok(Events::One(mut event)) => {
            request::adopt_trace(&parts.headers, &mut event);
            publish_one(state, &parts.headers, event, &topic).await
        }
        Ok(Events::Batch(mut events)) => {
            for event in &mut events {
                request::adopt_trace(&parts.headers, event);
            }
            publish_batch(state, &parts.headers, events, &topic).await
        }
        // Binary mode names the id in a header even when the event is invalid.
        Err(e) => reject(e, About::binary(&parts.headers)),
    }
}

/// Whom a log line is about: an event's id and, when it carries a valid one, its trace.
#[derive(Clone, Copy)]
struct About<'a> {
    id: &'a str,
    trace_id: Option<TraceId>,
}

impl<'a> About<'a> {
    fn event(event: &'a CloudEvent, trace: Option<&TraceParent>) -> Self {
        About {
            id: &event.id,
            trace_id: trace.map(|t| t.trace_id),
        }
    }

    fn binary(headers: &'a HeaderMap) -> Option<Self> {
        let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
        Some(About {
            id: text("ce-id")?,
            trace_id: text("ce-traceparent")
                .and_then(|v| TraceParent::parse(v).ok())
                .map(|t| t.trace_id),
        })
    }
}

async fn publish_one(
    state: &AppState,
    headers: &HeaderMap,
    event: CloudEvent,
    topic: &str,
) -> Response {
    let trace = telemetry::event_trace(&event);
    if let Err(e) = check_data(state, &event) {
        return reject(e, Some(About::event(&event, trace.as_ref())));
    }
    let record = match request::out_record(headers, &event, topic) {
        Ok(r) => r,
        Err(e) => return reject(e, Some(About::event(&event, trace.as_ref()))),
    };
    let event = EventRecord {
        id: event.id,
        source: event.source,
        record,
    };
    let span = telemetry::ingest_span(&event);
    // A task of its own: a client that hangs up must not cut an accepted event's bookkeeping
    // short (the duplicates waiting on it would wait forever).
    let (sink, id) = (state.sink.clone(), event.id.clone());
    let about = About {
        id: &id,
        trace_id: trace.map(|t| t.trace_id),
    };
    match tokio::spawn(async move { sink.accept(event).await }).await {
        Ok(accepted) => answer(accepted, about, &span),
        Err(e) => {
            let error = IngestError::BrokerUnavailable(format!("publish task failed: {e}"));
            telemetry::failed(&span, &error);
            reject(error, Some(about))
        }
    }
}

/// The event's data against the schema its `dataschema` names, before anything is durable.
fn check_data(state: &AppState, event: &CloudEvent) -> Result<(), IngestError> {
    state
        .schemas
        .check(event.dataschema.as_deref(), event.data.as_deref())
        .map_err(IngestError::InvalidData)
}

/// A batch is made durable together (one producer batch, one spool sync) and answered once,
/// with each event's result in batch order.
async fn publish_batch(
    state: &AppState,
    headers: &HeaderMap,
    events: Vec<CloudEvent>,
    topic: &str,
) -> Response {
    let mut records = Vec::with_capacity(events.len());
    for (index, event) in events.into_iter().enumerate() {
        if let Err(e) = check_data(state, &event) {
            let error = Box::new(e);
            let trace = telemetry::event_trace(&event);
            let about = About::event(&event, trace.as_ref());
            return reject(IngestError::InBatch { index, error }, Some(about));
        }
        match request::out_record(headers, &event, topic) {
            Ok(record) => records.push(EventRecord {
                id: event.id,
                source: event.source,
                record,
            }),
            // Only the batch's own headers can fail here: the batch is refused whole.
            Err(e) => return reject(e, None),
        }
    }
    let ids: Vec<(String, String)> = records
        .iter()
        .map(|e| (e.id.clone(), e.source.clone()))
        .collect();
    let traces: Vec<Option<TraceId>> = records.iter().map(EventRecord::trace_id).collect();
    let spans: Vec<tracing::Span> = if telemetry::enabled() {
        records.iter().map(telemetry::ingest_span).collect()
    } else {
        Vec::new()
    };
    let sink = state.sink.clone();
    match tokio::spawn(async move { sink.accept_batch(records).await }).await {
        Ok(results) => {
            for (span, result) in spans.iter().zip(&results) {
                if let Err(e) = result {
                    telemetry::failed(span, e);
                }
            }
            log_refused(&ids, &traces, &results);
            batch_answer(&ids, results)
        }
        Err(e) => reject(
            IngestError::BrokerUnavailable(format!("publish task failed: {e}")),
            None,
        ),
    }
}

/// One line per event of a batch that was not accepted, naming it (the answer's line only
/// counts them).
fn log_refused(
    ids: &[(String, String)],
    traces: &[Option<TraceId>],
    results: &[Result<Accepted, PublishError>],
) {
    for (((id, _), trace), result) in ids.iter().zip(traces).zip(results) {
        if let Err(e) = result {
            let trace_id = trace.map(tracing::field::display);
            tracing::info!(event_id = %id, trace_id, error = %e, "batch event not accepted");
        }
    }
}

/// 202 when every event was accepted; the common refusal when none was and all for the same
/// reason; else 207 with each event's snapshot or problem, so a client resends only those
/// (resending the whole batch is safe too: ids already accepted get their first answer).
fn batch_answer(
    ids: &[(String, String)],
    results: Vec<Result<Accepted, PublishError>>,
) -> Response {
    let mut results: Vec<Result<Snapshot, IngestError>> =
        results.into_iter().map(outcome).collect();
    if let Some(e) = common_refusal(&mut results) {
        return reject(e, None);
    }
    let refused = results.iter().filter(|r| r.is_err()).count();
    let status = if refused == 0 {
        StatusCode::ACCEPTED
    } else {
        tracing::warn!(events = results.len(), refused, "batch partly accepted");
        StatusCode::MULTI_STATUS
    };
    // Raw values keep each event's members in the order of the answer for one event (a
    // `Value` sorts them), so the filter relays either to its client alike.
    let events: Vec<Box<serde_json::value::RawValue>> = results
        .iter()
        .zip(ids)
        .filter_map(|(result, (id, source))| match result {
            Ok(snapshot) => serde_json::value::to_raw_value(snapshot).ok(),
            Err(e) => serde_json::value::to_raw_value(
                &json!({"id": id, "source": source, "problem": crate::problem::value(e)}),
            )
            .ok(),
        })
        .collect();
    (status, Json(json!({ "events": events }))).into_response()
}

/// The refusal of every event, when all were refused for the same reason.
fn common_refusal(results: &mut Vec<Result<Snapshot, IngestError>>) -> Option<IngestError> {
    let first = results.first()?.as_ref().err()?.kind();
    let same = |r: &Result<Snapshot, IngestError>| {
        r.as_ref().err().map(ProblemSource::kind) == Some(first)
    };
    if results.iter().all(same) {
        results.swap_remove(0).err()
    } else {
        None
    }
}

/// What one accepted (or refused) event tells its client.
fn outcome(accepted: Result<Accepted, PublishError>) -> Result<Snapshot, IngestError> {
    match accepted {
        Ok(Accepted::New(snapshot) | Accepted::Repeat(snapshot)) => Ok(snapshot),
        Ok(Accepted::Conflict(first)) => Err(IngestError::IdempotencyConflict(format!(
            "event id `{}` from `{}` was already accepted for topic `{}` with another payload",
            first.id, first.source, first.topic
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The 202, or why the event was not accepted.
fn answer(
    accepted: Result<Accepted, PublishError>,
    about: About<'_>,
    span: &tracing::Span,
) -> Response {
    match outcome(accepted) {
        Ok(snapshot) => accepted_answer(&snapshot, about.trace_id),
        Err(e) => {
            telemetry::failed(span, &e);
            reject(e, Some(about))
        }
    }
}

#[derive(serde::Deserialize)]
struct StatusQuery {
    source: Option<String>,
}

/// `GET /v1/events/<id>[?source=...]`: where an accepted event is now.
async fn get_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<StatusQuery>,
    headers: HeaderMap,
) -> Response {
    let access = match state.readers.check_header(&headers) {
        Ok(access) => access,
        Err(e) => return SubscribeError::from(e).into_response(),
    };
    match state.sink.status(&id, q.source.as_deref()) {
        Some(snapshot) if !access.allows(&snapshot.topic) => {
            SubscribeError::ForbiddenTopic(snapshot.topic).into_response()
        }
        Some(snapshot) => Json(snapshot).into_response(),
        None => IngestError::UnknownEvent(id).into_response(),
    }
}

/// The 202 the filter relays verbatim, with where to ask for the event's status later.
fn accepted_answer(snapshot: &Snapshot, trace_id: Option<TraceId>) -> Response {
    tracing::debug!(event_id = %snapshot.id, trace_id = trace_id.map(display), topic = %snapshot.topic, state = ?snapshot.state, "event accepted");
    let json = serde_json::to_vec(snapshot).unwrap_or_default();
    let location = eventwire_contract::event_location(&snapshot.id);
    (
        StatusCode::ACCEPTED,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::LOCATION, location),
        ],
        json,
    )
        .into_response()
}

/// Logs a rejection (client faults at info, server-side trouble at warn) and renders it,
/// its kind kept in the response for `eventwire_ingest_requests_total`.
fn reject(error: IngestError, about: Option<About<'_>>) -> Response {
    let kind = error.kind();
    let (status, slug) = (kind.status(), kind.slug());
    let event_id = about.map(|a| a.id);
    let trace_id = about.and_then(|a| a.trace_id).map(display);
    if status >= 500 {
        tracing::warn!(event_id, trace_id, status, slug, detail = %error, "event not published");
    } else {
        tracing::info!(event_id, trace_id, status, slug, detail = %error, "event rejected");
    }
    let mut response = error.into_response();
    response.extensions_mut().insert(kind);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::IngestAuth;
    use crate::cloudevent::{BATCH_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE};
    use crate::sink::{BoxFuture, Delivered, OutRecord, Outcome};
    use crate::status::StatusStore;
    use axum::body::Body;
    use axum::http::HeaderMap;
    use axum::http::Request as HttpRequest;
    use eventwire_contract::{KEY_HEADER, TOPIC_HEADER};
    use http_body_util::BodyExt;
    use serde_json::Value;
    use std::sync::Mutex;
    use std::time::Duration;
    use tower::ServiceExt;

    /// Records what would have been produced; topic "missing" does not exist.
    struct FakeSink {
        records: Mutex<Vec<OutRecord>>,
        status: StatusStore,
    }

    impl Default for FakeSink {
        fn default() -> Self {
            FakeSink {
                records: Mutex::default(),
                status: StatusStore::open(None, Duration::from_secs(60), 100).unwrap(),
            }
        }
    }

    impl FakeSink {
        async fn produce(&self, event: EventRecord) -> Result<Outcome, PublishError> {
            let record = event.record;
            if record.topic == "missing" {
                return Err(PublishError::UnknownTopic(record.topic));
            }
            let mut records = self.records.lock().unwrap();
            records.push(record);
            Ok(Outcome::Published(Delivered {
                partition: 2,
                offset: records.len() as i64 - 1,
            }))
        }
    }

    impl EventSink for FakeSink {
        fn accept(&self, event: EventRecord) -> BoxFuture<'_, Result<Accepted, PublishError>> {
            Box::pin(self.status.once(event, |e| self.produce(e)))
        }
        fn status(&self, id: &str, source: Option<&str>) -> Option<Snapshot> {
            self.status.get(id, source)
        }
        fn is_ready(&self) -> bool {
            false
        }
    }

    fn app(sink: Arc<FakeSink>) -> Router {
        app_with(sink, IngestAuth::load(None).unwrap())
    }

    fn app_with(sink: Arc<FakeSink>, auth: IngestAuth) -> Router {
        router(AppState {
            sink,
            limits: Limits {
                max_body_bytes: 128,
                max_batch_events: 3,
            },
            auth: Arc::new(auth),
            readers: Arc::new(crate::auth::SubscriberAuth::open()),
            schemas: Arc::default(),
            metrics: Arc::default(),
        })
    }

    fn batch_app(sink: Arc<FakeSink>) -> Router {
        router(AppState {
            sink,
            limits: Limits {
                max_body_bytes: 4096,
                max_batch_events: 3,
            },
            auth: Arc::new(IngestAuth::load(None).unwrap()),
            readers: Arc::new(crate::auth::SubscriberAuth::open()),
            schemas: Arc::default(),
            metrics: Arc::default(),
        })
    }

    async fn send(app: Router, req: HttpRequest<Body>) -> (StatusCode, HeaderMap, String) {
        let resp = app.oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    fn binary_request(topic: &str) -> axum::http::request::Builder {
        HttpRequest::post("/v1/events")
            .header(TOPIC_HEADER, topic)
            .header("ce-specversion", "1.0")
            .header("ce-id", "e1")
            .header("ce-source", "/src")
            .header("ce-type", "t")
    }

    fn slug(body: &str) -> String {
        let v: Value = serde_json::from_str(body).unwrap();
        v["type"]
            .as_str()
            .unwrap()
            .trim_start_matches("urn:eventwire:problem:")
            .to_owned()
    }

    #[tokio::test]
    async fn binary_event_is_published() {
        let sink = Arc::new(FakeSink::default());
        let req = binary_request("orders")
            .header("content-type", "text/plain")
            .header(KEY_HEADER, "k%C3%A9")
            .body(Body::from("hello"))
            .unwrap();
        let (status, headers, body) = send(app(sink.clone()), req).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            body,
            r#"{"id":"e1","source":"/src","topic":"orders","status":"published","partition":2,"offset":0}"#
        );
        assert_eq!(headers[header::LOCATION], "/v1/events/e1");
        let record = sink.records.lock().unwrap()[0].clone();
        assert_eq!(record.key.as_deref(), Some("ké"));
        assert_eq!(record.value.as_deref(), Some(b"hello".as_slice()));
        assert!(
            record
                .headers
                .contains(&("content-type".into(), "text/plain".into()))
        );
    }

    #[tokio::test]
    async fn with_a_secret_only_its_holders_publish() {
        let secrets = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            secrets.path(),
            "0123456789abcdef-one\n0123456789abcdef-two\n",
        )
        .unwrap();
        let sink = Arc::new(FakeSink::default());
        let auth = || IngestAuth::load(Some(secrets.path())).unwrap();
        let event = |auth: Option<&str>| {
            let mut req = binary_request("orders");
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            req.body(Body::from("hello")).unwrap()
        };
        for wrong in [
            None,
            Some("Bearer 0123456789abcdef-six"),
            Some("0123456789abcdef-one"),
        ] {
            let (status, headers, body) = send(app_with(sink.clone(), auth()), event(wrong)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong:?}: {body}");
            assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
            assert_eq!(
                headers[header::WWW_AUTHENTICATE],
                r#"Bearer realm="eventwire-ingest""#
            );
            assert!(
                body.contains("urn:eventwire:problem:unauthorized"),
                "{body}"
            );
        }
        assert!(sink.records.lock().unwrap().is_empty(), "nothing published");
        for right in ["Bearer 0123456789abcdef-one", "Bearer 0123456789abcdef-two"] {
            let (status, _, _) = send(app_with(sink.clone(), auth()), event(Some(right))).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{right}");
        }
        // A secret limited to other topics: 403 naming the topic header, nothing published.
        std::fs::write(secrets.path(), "0123456789abcdef-one payments,audit-*\n").unwrap();
        let before = sink.records.lock().unwrap().len();
        let req = event(Some("Bearer 0123456789abcdef-one"));
        let (status, headers, body) = send(app_with(sink.clone(), auth()), req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        let p: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(p["type"], "urn:eventwire:problem:forbidden-topic");
        assert_eq!(p["attribute"], TOPIC_HEADER);
        assert!(
            p["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("`orders`"),
            "{p}"
        );
        assert_eq!(sink.records.lock().unwrap().len(), before);
    }

    #[tokio::test]
    async fn structured_event_is_published() {
        let sink = Arc::new(FakeSink::default());
        let body = r#"{"specversion":"1.0","id":"s1","source":"/s","type":"t","data":{"a":1}}"#;
        let req = HttpRequest::post("/v1/events")
            .header(TOPIC_HEADER, "orders")
            .header(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )
            .body(Body::from(body))
            .unwrap();
        let (status, _, _) = send(app(sink.clone()), req).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(
            sink.records.lock().unwrap()[0].value.as_deref(),
            Some(br#"{"a":1}"#.as_slice())
        );
    }

    fn batch_request(events: &[(&str, &str)]) -> HttpRequest<Body> {
        let events: Vec<String> = events
            .iter()
            .map(|(id, data)| {
                format!(
                    r#"{{"specversion":"1.0","id":"{id}","source":"/s","type":"t","data":{data}}}"#
                )
            })
            .collect();
        HttpRequest::post("/v1/events")
            .header(TOPIC_HEADER, "orders")
            .header("content-type", BATCH_CONTENT_TYPE)
            .body(Body::from(format!("[{}]", events.join(","))))
            .unwrap()
    }

    #[tokio::test]
    async fn a_batch_is_published_in_order_and_answered_once() {
        let sink = Arc::new(FakeSink::default());
        let req = batch_request(&[("b1", "1"), ("b2", "2"), ("b3", "3")]);
        let (status, _, body) = send(batch_app(sink.clone()), req).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        let ids: Vec<&str> = answer["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["b1", "b2", "b3"]);
        assert_eq!(answer["events"][2]["status"], "published");
        let values: Vec<Vec<u8>> = sink
            .records
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.value.clone().unwrap())
            .collect();
        assert_eq!(values, [b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
    }

    #[tokio::test]
    async fn data_that_fails_its_schema_is_refused_and_nothing_is_published() {
        let sink = Arc::new(FakeSink::default());
        let mut schemas = crate::schema::Schemas::default();
        schemas
            .add(&serde_json::json!({"$id": "urn:s", "required": ["n"],
                "properties": {"n": {"type": "integer"}}}))
            .unwrap();
        let app = router(AppState {
            sink: sink.clone(),
            limits: Limits {
                max_body_bytes: 4096,
                max_batch_events: 3,
            },
            auth: Arc::new(IngestAuth::load(None).unwrap()),
            readers: Arc::new(crate::auth::SubscriberAuth::open()),
            schemas: Arc::new(schemas),
            metrics: Arc::default(),
        });
        let event = |id: &str, data: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"{id}","source":"/s","type":"t","dataschema":"urn:s","data":{data}}}"#
            )
        };
        let batch = format!(
            "[{},{}]",
            event("a", r#"{"n":1}"#),
            event("b", r#"{"n":"x"}"#)
        );
        let req = HttpRequest::post("/v1/events")
            .header(TOPIC_HEADER, "orders")
            .header("content-type", BATCH_CONTENT_TYPE)
            .body(Body::from(batch))
            .unwrap();
        let (status, _, body) = send(app.clone(), req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let problem: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(slug(&body), "invalid-data");
        assert_eq!(problem["index"], 1, "{body}");
        assert_eq!(problem["errors"][0]["pointer"], "/n", "{body}");
        assert_eq!(problem["errors"][0]["keyword"], "type", "{body}");
        let one = HttpRequest::post("/v1/events")
            .header(TOPIC_HEADER, "orders")
            .header("content-type", STRUCTURED_CONTENT_TYPE)
            .body(Body::from(event("c", "{}")))
            .unwrap();
        let (status, _, body) = send(app.clone(), one).await;
        assert_eq!(
            (status, slug(&body)),
            (StatusCode::BAD_REQUEST, "invalid-data".into())
        );
        assert!(sink.records.lock().unwrap().is_empty(), "nothing published");
        let good = HttpRequest::post("/v1/events")
            .header(TOPIC_HEADER, "orders")
            .header("content-type", STRUCTURED_CONTENT_TYPE)
            .body(Body::from(event("d", r#"{"n":2}"#)))
            .unwrap();
        assert_eq!(send(app, good).await.0, StatusCode::ACCEPTED);
    }

    #[tokio::test]
    async fn a_batch_is_refused_whole_or_answered_per_event() {
        let sink = Arc::new(FakeSink::default());
        // An invalid event refuses the whole batch and names its position.
        let bad = r#"[{"specversion":"1.0","id":"x","source":"/s","type":"t"},{"specversion":"1.0","id":"y","source":"/s"}]"#;
        let req = HttpRequest::post("/v1/events")
            .header(TOPIC_HEADER, "orders")
            .header("content-type", BATCH_CONTENT_TYPE)
            .body(Body::from(bad))
            .unwrap();
        let (status, _, body) = send(batch_app(sink.clone()), req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let problem: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (problem["index"].as_u64(), problem["attribute"].as_str()),
            (Some(1), Some("type")),
            "{body}"
        );
        let req = batch_request(&[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]);
        let (status, _, body) = send(batch_app(sink.clone()), req).await;
        assert_eq!(
            (status, slug(&body)),
            (StatusCode::PAYLOAD_TOO_LARGE, "batch-too-large".into())
        );
        assert!(sink.records.lock().unwrap().is_empty());
        // One event conflicts with an earlier one: 207, the others are accepted.
        let (status, _, _) = send(batch_app(sink.clone()), batch_request(&[("c1", "1")])).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let req = batch_request(&[("c2", "2"), ("c1", "9")]);
        let (status, _, body) = send(batch_app(sink.clone()), req).await;
        assert_eq!(status, StatusCode::MULTI_STATUS, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["events"][0]["status"], "published");
        assert_eq!(answer["events"][1]["id"], "c1");
        assert_eq!(
            answer["events"][1]["problem"]["type"],
            "urn:eventwire:problem:idempotency-conflict"
        );
        assert_eq!(sink.records.lock().unwrap().len(), 2);
        // Every event refused for one reason: that refusal, as for a single event.
        let req = batch_request(&[("c1", "8"), ("c1", "7")]);
        let (status, _, body) = send(batch_app(sink.clone()), req).await;
        assert_eq!(
            (status, slug(&body)),
            (StatusCode::CONFLICT, "idempotency-conflict".into())
        );
    }

    #[tokio::test]
    async fn rejections() {
        let post = || HttpRequest::post("/v1/events");
        let cases: Vec<(HttpRequest<Body>, StatusCode, &str)> = vec![
            (
                post().body(Body::empty()).unwrap(),
                StatusCode::BAD_REQUEST,
                "missing-topic",
            ),
            (
                post()
                    .header(TOPIC_HEADER, "..")
                    .body(Body::empty())
                    .unwrap(),
                StatusCode::BAD_REQUEST,
                "invalid-topic",
            ),
            (
                post()
                    .header(TOPIC_HEADER, "t")
                    .body(Body::empty())
                    .unwrap(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-a-cloudevent",
            ),
            (
                post()
                    .header(TOPIC_HEADER, "t")
                    .header("content-type", BATCH_CONTENT_TYPE)
                    .body(Body::from("[]"))
                    .unwrap(),
                StatusCode::BAD_REQUEST,
                "invalid-cloudevent",
            ),
            (
                post()
                    .header(TOPIC_HEADER, "t")
                    .header("content-type", STRUCTURED_CONTENT_TYPE)
                    .body(Body::from("{"))
                    .unwrap(),
                StatusCode::BAD_REQUEST,
                "invalid-json",
            ),
            (
                binary_request("t")
                    .body(Body::from(vec![b'x'; 129]))
                    .unwrap(),
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
            ),
            (
                binary_request("t")
                    .header("content-length", "1000")
                    .body(Body::from("x"))
                    .unwrap(),
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
            ),
            (
                binary_request("t")
                    .header("ce-time", "lunchtime")
                    .body(Body::empty())
                    .unwrap(),
                StatusCode::BAD_REQUEST,
                "invalid-cloudevent",
            ),
            (
                binary_request("t")
                    .header("ce-x", "%zz")
                    .body(Body::empty())
                    .unwrap(),
                StatusCode::BAD_REQUEST,
                "invalid-header",
            ),
            (
                binary_request("missing").body(Body::empty()).unwrap(),
                StatusCode::NOT_FOUND,
                "unknown-topic",
            ),
            (
                HttpRequest::get("/nope").body(Body::empty()).unwrap(),
                StatusCode::NOT_FOUND,
                "not-found",
            ),
            (
                HttpRequest::get("/v1/events").body(Body::empty()).unwrap(),
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
            ),
            (
                HttpRequest::get("/readyz").body(Body::empty()).unwrap(),
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
            ),
        ];
        for (req, want_status, want_slug) in cases {
            let (status, headers, body) = send(app(Arc::new(FakeSink::default())), req).await;
            assert_eq!(
                (status, slug(&body).as_str()),
                (want_status, want_slug),
                "{body}"
            );
            assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        }
        for (req, allow) in [
            (HttpRequest::get("/v1/events"), "POST"),
            (HttpRequest::delete("/v1/events/e1"), "GET, HEAD"),
            (HttpRequest::post("/healthz"), "GET, HEAD"),
        ] {
            let req = req.body(Body::empty()).unwrap();
            let (status, headers, _) = send(app(Arc::new(FakeSink::default())), req).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(headers[header::ALLOW], allow);
        }
    }

    #[tokio::test]
    async fn invalid_cloudevent_names_attribute() {
        let req = binary_request("t")
            .header("ce-subject", "a%0Ab")
            .body(Body::empty())
            .unwrap();
        let (_, _, body) = send(app(Arc::new(FakeSink::default())), req).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["attribute"], "subject");
        let req = binary_request("t")
            .header(KEY_HEADER, "%")
            .body(Body::empty())
            .unwrap();
        let (_, _, body) = send(app(Arc::new(FakeSink::default())), req).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["status"].as_u64(), v["attribute"].as_str()),
            (Some(400), Some(KEY_HEADER))
        );
    }

    #[tokio::test]
    async fn healthz_is_ok() {
        let req = HttpRequest::get("/healthz").body(Body::empty()).unwrap();
        let (status, _, body) = send(app(Arc::new(FakeSink::default())), req).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, r#"{"status":"ok"}"#)
        );
    }

    #[tokio::test]
    async fn repeats_get_the_first_answer_and_status_is_served() {
        let sink = Arc::new(FakeSink::default());
        let post = |body: &'static str| binary_request("orders").body(Body::from(body)).unwrap();
        let (status, headers, first) = send(app(sink.clone()), post("a")).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let (status, again, repeat) = send(app(sink.clone()), post("a")).await;
        assert_eq!(
            (status, repeat.as_str()),
            (StatusCode::ACCEPTED, first.as_str())
        );
        assert_eq!(again[header::LOCATION], headers[header::LOCATION]);
        assert_eq!(
            sink.records.lock().unwrap().len(),
            1,
            "a repeat is not produced"
        );

        let (status, _, body) = send(app(sink.clone()), post("b")).await;
        assert_eq!(
            (status, slug(&body).as_str()),
            (StatusCode::CONFLICT, "idempotency-conflict")
        );
        assert!(
            body.contains("was already accepted for topic `orders`"),
            "{body}"
        );

        let get = |uri: &str| HttpRequest::get(uri).body(Body::empty()).unwrap();
        let (status, _, body) = send(app(sink.clone()), get("/v1/events/e1")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, first.as_str()));
        let (status, _, body) = send(app(sink.clone()), get("/v1/events/e1?source=/other")).await;
        assert_eq!(
            (status, slug(&body).as_str()),
            (StatusCode::NOT_FOUND, "unknown-event")
        );
    }

    #[tokio::test]
    async fn a_refused_event_is_forgotten() {
        let sink = Arc::new(FakeSink::default());
        let req = || binary_request("missing").body(Body::empty()).unwrap();
        for _ in 0..2 {
            let (status, _, body) = send(app(sink.clone()), req()).await;
            assert_eq!(
                (status, slug(&body).as_str()),
                (StatusCode::NOT_FOUND, "unknown-topic")
            );
        }
        let get = HttpRequest::get("/v1/events/e1")
            .body(Body::empty())
            .unwrap();
        let (status, _, _) = send(app(sink), get).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
