//! Why an event was not accepted, each reason one contract [`Kind`].

use eventwire_contract::TOPIC_HEADER;
use eventwire_contract::problem::Kind;
use thiserror::Error;

use crate::cloudevent::ParseError;
use crate::problem::ProblemSource;
use crate::sink::PublishError;

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
    #[error("the batch holds {0} events; at most {1} are accepted in one request")]
    BatchTooLarge(usize, usize),
    /// One event of a batch, by its position: the batch is refused whole.
    #[error("event {index} of the batch: {error}")]
    InBatch {
        index: usize,
        error: Box<IngestError>,
    },
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
    #[error("no successful Kafka metadata request recently")]
    NotReady,
    #[error("{0}")]
    Unauthorized(#[from] crate::auth::AuthError),
    #[error(
        "these credentials may not publish to topic `{0}` (the topics after the secret in --ingest-secret-file)"
    )]
    ForbiddenTopic(String),
    #[error("{0}")]
    InvalidData(crate::schema::DataError),
}

impl From<PublishError> for IngestError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::UnknownTopic(t) => IngestError::UnknownTopic(t),
            // The producer reports a full local queue when it is handed a record; the durable
            // sink spools such an event, so only a sink without a spool returns this. A queue
            // that stays full means the broker is not keeping up: transient, like a down broker.
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

impl ProblemSource for IngestError {
    fn kind(&self) -> Kind {
        use IngestError::*;
        match self {
            MissingTopic => Kind::MissingTopic,
            InvalidTopic(_) => Kind::InvalidTopic,
            NotACloudEvent => Kind::NotACloudEvent,
            BatchTooLarge(..) => Kind::BatchTooLarge,
            InBatch { error, .. } => error.kind(),
            BodyTooLarge(_) => Kind::BodyTooLarge,
            BodyRead(_) => Kind::InvalidBody,
            Parse(ParseError::Header { .. }) => Kind::InvalidHeader,
            Parse(ParseError::Json { .. }) => Kind::InvalidJson,
            Parse(ParseError::Invalid(_)) => Kind::InvalidCloudEvent,
            UnknownTopic(_) => Kind::UnknownTopic,
            BrokerUnavailable(_) => Kind::BrokerUnavailable,
            SpoolFull(_) => Kind::SpoolFull,
            BrokerRefused(_) => Kind::BrokerRefused,
            IdempotencyConflict(_) => Kind::IdempotencyConflict,
            UnknownEvent(_) => Kind::UnknownEvent,
            NotReady => Kind::NotReady,
            Unauthorized(_) => Kind::Unauthorized,
            ForbiddenTopic(_) => Kind::ForbiddenTopic,
            InvalidData(_) => Kind::InvalidData,
        }
    }

    fn errors(&self) -> Option<serde_json::Value> {
        match self {
            IngestError::InvalidData(e) => e.errors(),
            IngestError::InBatch { error, .. } => error.errors(),
            _ => None,
        }
    }

    fn attribute(&self) -> Option<&str> {
        match self {
            IngestError::MissingTopic
            | IngestError::InvalidTopic(_)
            | IngestError::ForbiddenTopic(_) => Some(TOPIC_HEADER),
            IngestError::Parse(ParseError::Header { header, .. }) => Some(header),
            IngestError::Parse(ParseError::Invalid(e)) if !e.attribute.is_empty() => {
                Some(&e.attribute)
            }
            IngestError::InBatch { error, .. } => error.attribute(),
            IngestError::InvalidData(_) => Some("data"),
            _ => None,
        }
    }

    fn index(&self) -> Option<usize> {
        match self {
            IngestError::InBatch { index, .. } => Some(*index),
            _ => None,
        }
    }
}

impl axum::response::IntoResponse for IngestError {
    fn into_response(self) -> axum::response::Response {
        crate::problem::response(&self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudevent::CeError;
    use axum::body::to_bytes;
    use axum::http::{StatusCode, header};
    use axum::response::{IntoResponse, Response};

    async fn text(r: Response) -> String {
        let bytes = to_bytes(r.into_body(), usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn problem_json_shape() {
        let err = IngestError::Parse(ParseError::Invalid(CeError {
            attribute: "time".into(),
            reason: "bad".into(),
        }));
        assert_eq!(
            text(err.into_response()).await,
            r#"{"type":"urn:eventwire:problem:invalid-cloudevent","title":"Invalid CloudEvent","status":400,"detail":"attribute `time`: bad","attribute":"time"}"#
        );
        let text = text(IngestError::NotReady.into_response()).await;
        assert!(
            text.starts_with(r#"{"type":"urn:eventwire:problem:not-ready","title":"#),
            "{text}"
        );
        assert!(!text.contains("attribute"));
    }

    #[tokio::test]
    async fn responses_carry_status_and_headers() {
        let r = IngestError::BrokerUnavailable("down".into()).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let r = IngestError::MissingTopic.into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
        assert!(text(r).await.contains(r#""attribute":"eventwire-topic""#));
    }

    #[test]
    fn every_publish_error_has_an_answer() {
        let cases = [
            (
                PublishError::UnknownTopic("t".into()),
                404,
                "topic `t` does not exist",
            ),
            (
                PublishError::QueueFull,
                503,
                "Kafka is not available: the producer queue is full",
            ),
            (PublishError::TooLarge("big".into()), 413, "big"),
            (
                PublishError::Unavailable("down".into()),
                503,
                "Kafka is not available: down",
            ),
            (
                PublishError::SpoolFull("full".into()),
                503,
                "full; retry shortly",
            ),
            (PublishError::Refused("no".into()), 422, "no"),
        ];
        for (e, status, detail) in cases {
            let e = IngestError::from(e);
            assert_eq!(
                (e.kind().status(), e.to_string().as_str()),
                (status, detail)
            );
        }
    }
}
