//! Reading an event out of a `POST /v1/events` request: the topic and key headers of the
//! contract, the mode (binary, structured or batch), the size-capped body.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use eventwire_contract::{KEY_HEADER, TOPIC_HEADER, header_value, topic};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::IngestError;
use crate::cloudevent::{
    self, BATCH_CONTENT_TYPE, CloudEvent, ParseError, STRUCTURED_CONTENT_TYPE, validate,
};
use crate::sink::OutRecord;

enum Mode {
    Binary,
    Structured,
    Batch,
}

/// What a request carries.
pub enum Events {
    One(CloudEvent),
    /// `application/cloudevents-batch+json`, in the order sent.
    Batch(Vec<CloudEvent>),
}

/// Size limits of one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_batch_events: usize,
}

/// The events the request carries, in whichever mode they were sent.
pub async fn read_events(
    headers: &HeaderMap,
    body: Body,
    limits: Limits,
) -> Result<Events, IngestError> {
    let mode = mode(headers)?;
    let body = read_body(headers, body, limits.max_body_bytes).await?;
    Ok(match mode {
        Mode::Structured => Events::One(cloudevent::parse_structured(&body)?),
        Mode::Binary => Events::One(binary(headers, &body)?),
        Mode::Batch => Events::Batch(batch(&body, limits.max_batch_events)?),
    })
}

fn batch(body: &[u8], max: usize) -> Result<Vec<CloudEvent>, IngestError> {
    let events = cloudevent::parse_batch(body).map_err(|e| match e.index {
        Some(index) => IngestError::InBatch {
            index,
            error: Box::new(e.error.into()),
        },
        None => e.error.into(),
    })?;
    if events.len() > max {
        return Err(IngestError::BatchTooLarge(events.len(), max));
    }
    Ok(events)
}

fn mode(headers: &HeaderMap) -> Result<Mode, IngestError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(validate::essence);
    match content_type.as_deref() {
        Some(STRUCTURED_CONTENT_TYPE) => Ok(Mode::Structured),
        Some(BATCH_CONTENT_TYPE) => Ok(Mode::Batch),
        _ if headers.contains_key("ce-specversion") => Ok(Mode::Binary),
        _ => Err(IngestError::NotACloudEvent),
    }
}

fn binary(headers: &HeaderMap, body: &[u8]) -> Result<CloudEvent, IngestError> {
    let content_type = match headers.get(header::CONTENT_TYPE) {
        Some(v) => Some(header_text(header::CONTENT_TYPE.as_str(), v.as_bytes())?),
        None => None,
    };
    let pairs = headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_bytes()));
    Ok(cloudevent::parse_binary(pairs, content_type, body)?)
}

fn header_text<'a>(name: &str, raw: &'a [u8]) -> Result<&'a str, IngestError> {
    std::str::from_utf8(raw).map_err(|_| header_error(name, "value is not UTF-8".into()))
}

fn header_error(name: &str, reason: String) -> IngestError {
    IngestError::Parse(ParseError::Header {
        header: name.to_owned(),
        reason,
    })
}

/// Reads the body, refusing it early by Content-Length and again while streaming (a client
/// can lie about the length or use chunked encoding).
async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, IngestError> {
    let too_large =
        || IngestError::BodyTooLarge(format!("the body exceeds the limit of {max} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large());
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(IngestError::BodyRead(e.to_string())),
    }
}

/// The topic the event goes to, by the contract's rule (our clients are not only the filter).
pub fn topic(headers: &HeaderMap) -> Result<String, IngestError> {
    let raw = headers.get(TOPIC_HEADER).ok_or(IngestError::MissingTopic)?;
    let name = std::str::from_utf8(raw.as_bytes())
        .map_err(|_| IngestError::InvalidTopic("not UTF-8".into()))?;
    topic::validate(name).map_err(|e| IngestError::InvalidTopic(e.to_string()))?;
    Ok(name.to_owned())
}

/// The Kafka record of the event, keyed by the contract's key header when there is one.
pub fn out_record(
    headers: &HeaderMap,
    event: &CloudEvent,
    topic: &str,
) -> Result<OutRecord, IngestError> {
    let key = match headers.get(KEY_HEADER) {
        Some(raw) => {
            let text = header_text(KEY_HEADER, raw.as_bytes())?;
            Some(header_value::decode(text).map_err(|e| header_error(KEY_HEADER, e.to_string()))?)
        }
        None => None,
    };
    let record = event.to_kafka(key);
    Ok(OutRecord {
        topic: topic.to_owned(),
        key: record.key,
        headers: record.headers,
        value: record.value,
    })
}
