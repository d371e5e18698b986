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
use crate::trace_context::{TRACEPARENT, TraceParent};

const TRACESTATE: &str = "tracestate";

/// W3C caps `tracestate` at 512 characters.
const MAX_TRACESTATE: usize = 512;

/// An event without a valid trace context joins the request's: the filter sends the trace
/// of the HTTP request it passes on (or one it started) as `traceparent` on its callout, so
/// a client's CloudEvent without its own is still traceable. A valid own one is kept; an
/// invalid one is no trace context (W3C) and is replaced, with its `tracestate`, which
/// belongs to it.
pub fn adopt_trace(headers: &HeaderMap, event: &mut CloudEvent) {
    let own = matches!(event.extensions.get(TRACEPARENT),
        Some(cloudevent::ExtValue::String(t)) if TraceParent::parse(t).is_ok());
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let parent = text(TRACEPARENT).filter(|t| TraceParent::parse(t).is_ok());
    let Some(parent) = parent.filter(|_| !own) else {
        return;
    };
    let value = |v: &str| cloudevent::ExtValue::String(v.to_owned());
    event
        .extensions
        .insert(TRACEPARENT.to_owned(), value(parent));
    match text(TRACESTATE).filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE) {
        Some(state) => event.extensions.insert(TRACESTATE.to_owned(), value(state)),
        None => event.extensions.remove(TRACESTATE),
    };
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudevent::{ExtValue, parse_structured};

    const REQUEST_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn event(extra: &str) -> CloudEvent {
        let json = format!(r#"{{"specversion":"1.0","id":"e","source":"/s","type":"t"{extra}}}"#);
        match parse_structured(json.as_bytes()) {
            Ok(e) => e,
            Err(e) => panic!("{e}"),
        }
    }

    fn headers(list: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in list {
            h.insert(*n, header::HeaderValue::from_static(v));
        }
        h
    }

    fn ext(e: &CloudEvent, name: &str) -> Option<String> {
        e.extensions.get(name).map(ExtValue::canonical)
    }

    #[test]
    fn an_event_without_trace_context_joins_the_requests() {
        let h = headers(&[("traceparent", REQUEST_TRACE), ("tracestate", "rojo=1")]);
        let mut e = event("");
        adopt_trace(&h, &mut e);
        assert_eq!(ext(&e, "traceparent").as_deref(), Some(REQUEST_TRACE));
        assert_eq!(ext(&e, "tracestate").as_deref(), Some("rojo=1"));
        // Its own is kept, and so is its (missing) tracestate.
        let own = "00-11111111111111111111111111111111-2222222222222222-00";
        let mut e = event(&format!(r#","traceparent":"{own}""#));
        adopt_trace(&h, &mut e);
        assert_eq!(ext(&e, "traceparent").as_deref(), Some(own));
        assert_eq!(ext(&e, "tracestate"), None);
        // An invalid request trace is none.
        let mut e = event("");
        adopt_trace(&headers(&[("traceparent", "00-zz")]), &mut e);
        assert_eq!(ext(&e, "traceparent"), None);
        // An invalid own one is none either: replaced, its tracestate with it.
        let mut e = event(r#","traceparent":"00-zz","tracestate":"old=1""#);
        adopt_trace(&headers(&[("traceparent", REQUEST_TRACE)]), &mut e);
        assert_eq!(ext(&e, "traceparent").as_deref(), Some(REQUEST_TRACE));
        assert_eq!(ext(&e, "tracestate"), None);
        // A tracestate without a traceparent gives way to the request's.
        let mut e = event(r#","tracestate":"orphan=1""#);
        adopt_trace(&h, &mut e);
        assert_eq!(ext(&e, "tracestate").as_deref(), Some("rojo=1"));
    }
}
