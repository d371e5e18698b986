//! RFC 9457 problem details for every way a request can fail. The filter relays these to the
//! HTTP client, so each error has a stable machine-readable slug in `type`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use thiserror::Error;

use crate::cloudevent::ParseError;
use crate::publish::PublishError;

pub const TOPIC_HEADER: &str = "eventwire-topic";
pub const KEY_HEADER: &str = "eventwire-key";

#[derive(Debug, Error)]
pub enum IngestError {
    #[error("the `eventwire-topic` header is required")]
    MissingTopic,
    #[error("invalid topic name: {0}")]
    InvalidTopic(String),
    #[error(
        "send a CloudEvent in binary mode (ce-specversion, ce-id, ce-source, ce-type headers; the body is \
         the data) or in structured mode (Content-Type: application/cloudevents+json)"
    )]
    NotACloudEvent,
    #[error(
        "batches (application/cloudevents-batch+json) are not supported; send one event per request"
    )]
    BatchUnsupported,
    #[error("{0}")]
    BodyTooLarge(String),
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("topic `{0}` does not exist")]
    UnknownTopic(String),
    #[error("Kafka is not available: {0}")]
    BrokerUnavailable(String),
    #[error("{0}; retry shortly")]
    SpoolFull(String),
    #[error("{0}")]
    BrokerRefused(String),
    #[error("{0}")]
    IdempotencyConflict(String),
    #[error("no event with id `{0}` is known (or it is older than the status window)")]
    UnknownEvent(String),
    #[error("no such resource")]
    NotFound,
    #[error("method not allowed for this resource")]
    MethodNotAllowed,
    #[error("no successful Kafka metadata request recently")]
    NotReady,
}

impl From<PublishError> for IngestError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::UnknownTopic(t) => IngestError::UnknownTopic(t),
            // The durable sink spools on a full producer queue; should one get through, it is
            // the broker side that cannot keep up.
            PublishError::QueueFull => {
                IngestError::BrokerUnavailable("the producer queue is full".into())
            }
            PublishError::TooLarge(why) => IngestError::BodyTooLarge(why),
            PublishError::Unavailable(why) => IngestError::BrokerUnavailable(why),
            PublishError::SpoolFull(why) => IngestError::SpoolFull(why),
            PublishError::Refused(why) => IngestError::BrokerRefused(why),
        }
    }
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        use IngestError::*;
        match self {
            MissingTopic | InvalidTopic(_) | BodyRead(_) | Parse(_) => StatusCode::BAD_REQUEST,
            NotACloudEvent | BatchUnsupported => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            UnknownTopic(_) | NotFound | UnknownEvent(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            IdempotencyConflict(_) => StatusCode::CONFLICT,
            BrokerRefused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            BrokerUnavailable(_) | SpoolFull(_) | NotReady => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn slug(&self) -> &'static str {
        use IngestError::*;
        match self {
            MissingTopic => "missing-topic",
            InvalidTopic(_) => "invalid-topic",
            NotACloudEvent => "not-a-cloudevent",
            BatchUnsupported => "batch-unsupported",
            BodyTooLarge(_) => "body-too-large",
            BodyRead(_) => "invalid-body",
            Parse(ParseError::Header { .. }) => "invalid-header",
            Parse(ParseError::Json { .. }) => "invalid-json",
            Parse(ParseError::Invalid(_)) => "invalid-cloudevent",
            UnknownTopic(_) => "unknown-topic",
            BrokerUnavailable(_) => "broker-unavailable",
            SpoolFull(_) => "spool-full",
            BrokerRefused(_) => "broker-refused",
            IdempotencyConflict(_) => "idempotency-conflict",
            UnknownEvent(_) => "unknown-event",
            NotFound => "not-found",
            MethodNotAllowed => "method-not-allowed",
            NotReady => "not-ready",
        }
    }

    fn title(&self) -> &'static str {
        use IngestError::*;
        match self {
            MissingTopic => "Missing topic",
            InvalidTopic(_) => "Invalid topic",
            NotACloudEvent => "Not a CloudEvent",
            BatchUnsupported => "Batch mode unsupported",
            BodyTooLarge(_) => "Body too large",
            BodyRead(_) => "Invalid body",
            Parse(ParseError::Header { .. }) => "Invalid header",
            Parse(ParseError::Json { .. }) => "Invalid JSON",
            Parse(ParseError::Invalid(_)) => "Invalid CloudEvent",
            UnknownTopic(_) => "Unknown topic",
            BrokerUnavailable(_) => "Broker unavailable",
            SpoolFull(_) => "Spool full",
            BrokerRefused(_) => "Refused by the broker",
            IdempotencyConflict(_) => "Event id reused with another payload",
            UnknownEvent(_) => "Unknown event",
            NotFound => "Not found",
            MethodNotAllowed => "Method not allowed",
            NotReady => "Not ready",
        }
    }

    /// The CloudEvents attribute or HTTP header at fault, when there is one.
    pub fn attribute(&self) -> Option<&str> {
        match self {
            IngestError::MissingTopic | IngestError::InvalidTopic(_) => Some(TOPIC_HEADER),
            IngestError::Parse(ParseError::Header { header, .. }) => Some(header),
            IngestError::Parse(ParseError::Invalid(e)) if !e.attribute.is_empty() => {
                Some(&e.attribute)
            }
            _ => None,
        }
    }

    /// The 405 answer of a resource that supports only `allow` (e.g. `"GET, HEAD"`): RFC 9110
    /// requires the `Allow` header, and only the route knows its methods, so each route's
    /// method fallback passes them (`get(h).fallback(|| async { IngestError::method_not_allowed("GET, HEAD") })`).
    pub fn method_not_allowed(allow: &'static str) -> Response {
        let mut response = IngestError::MethodNotAllowed.into_response();
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        response
    }

    pub fn problem(&self) -> Problem<'_> {
        Problem {
            ty: format!("urn:eventwire:problem:{}", self.slug()),
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.to_string(),
            attribute: self.attribute(),
        }
    }
}

/// The `application/problem+json` body; field order is the wire order.
#[derive(Debug, Serialize)]
pub struct Problem<'a> {
    #[serde(rename = "type")]
    pub ty: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribute: Option<&'a str>,
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            // Every 503 here is transient (broker down, queue full, not yet ready).
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudevent::CeError;
    use serde_json::{Value, json};

    #[test]
    fn problem_json_shape() {
        let err = IngestError::Parse(ParseError::Invalid(CeError {
            attribute: "time".into(),
            reason: "bad".into(),
        }));
        let v: Value = serde_json::to_value(err.problem()).unwrap();
        assert_eq!(
            v,
            json!({
                "type": "urn:eventwire:problem:invalid-cloudevent",
                "title": "Invalid CloudEvent",
                "status": 400,
                "detail": "attribute `time`: bad",
                "attribute": "time",
            })
        );
        let text = serde_json::to_string(&IngestError::NotReady.problem()).unwrap();
        assert!(
            text.starts_with(r#"{"type":"urn:eventwire:problem:not-ready","title":"#),
            "{text}"
        );
        assert!(!text.contains("attribute"));
    }

    #[test]
    fn responses_carry_status_and_headers() {
        let r = IngestError::BrokerUnavailable("down".into()).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let r = IngestError::method_not_allowed("GET, HEAD");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let r = IngestError::MissingTopic.into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
