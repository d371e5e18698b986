//! A service's 2xx answer -> the reply event to publish, if the answer is a CloudEvent.
//! Pure code. The reply is read like an ingest request (binary or structured mode, the same
//! validation), then tied to the event that caused it: the `causationid` extension names
//! the original's id, the record key is the original's, and a reply without its own trace
//! context continues the original's trace. Its data is held to the schema its
//! `dataschema` names, like an ingested event's: a reply is an event on a topic like any.

use axum::http::{HeaderMap, header};
use thiserror::Error;

use crate::cloudevent::{
    self, BATCH_CONTENT_TYPE, CloudEvent, ExtValue, ParseError, STRUCTURED_CONTENT_TYPE, validate,
};
use crate::schema::Schemas;
use crate::sink::OutRecord;
use crate::trace_context::{TRACEPARENT, TraceParent};

/// The extension a reply carries with the id of the event it answers.
pub const CAUSATION_ID: &str = "causationid";
const TRACESTATE: &str = "tracestate";

/// What a reply inherits from the event it answers.
#[derive(Debug, Clone, Copy)]
pub struct Original<'a> {
    pub id: &'a str,
    /// The record key, so the reply lands in the partition of the same entity.
    pub key: Option<&'a [u8]>,
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

/// A 2xx answer that claims to be a CloudEvent but cannot be published.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReplyError {
    #[error("the reply is not a valid CloudEvent: {0}")]
    Invalid(#[from] ParseError),
    #[error("the reply's data is refused: {0}")]
    InvalidData(String),
    #[error("a batch is not a reply (answer one event)")]
    Batch,
    #[error("the reply exceeds {0} bytes")]
    TooLarge(usize),
    #[error("no topic for a reply of type `{0}` (reply_topic, reply_topic_by_type)")]
    NoTopic(String),
}

impl ReplyError {
    /// The `outcome` label of `eventwire_delivery_replies_total`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReplyError::Invalid(_)
            | ReplyError::InvalidData(_)
            | ReplyError::Batch
            | ReplyError::TooLarge(_) => "invalid",
            ReplyError::NoTopic(_) => "unrouted",
        }
    }
}

/// The answer's body as read: whole, or cut off after the limit.
pub enum Body<'a> {
    Whole(&'a [u8]),
    TooLarge(usize),
}

/// The reply event in `answer` as the record to produce; `Ok(None)` when the answer is not
/// a CloudEvent (a plain 2xx: the command was taken, nothing to say).
pub fn reply(
    headers: &HeaderMap,
    body: Body<'_>,
    original: &Original<'_>,
    topic_for: impl Fn(&str) -> Option<String>,
    schemas: &Schemas,
) -> Result<Option<OutRecord>, ReplyError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let essence = content_type.map(validate::essence);
    let structured = match essence.as_deref() {
        Some(STRUCTURED_CONTENT_TYPE) => true,
        Some(BATCH_CONTENT_TYPE) => return Err(ReplyError::Batch),
        _ if headers.contains_key("ce-specversion") => false,
        _ => return Ok(None),
    };
    let body = match body {
        Body::Whole(body) => body,
        Body::TooLarge(limit) => return Err(ReplyError::TooLarge(limit)),
    };
    let mut event = if structured {
        cloudevent::parse_structured(body)?
    } else {
        let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
        cloudevent::parse_binary(pairs, content_type, body)?
    };
    schemas
        .check(event.dataschema.as_deref(), event.data.as_deref())
        .map_err(|e| ReplyError::InvalidData(e.to_string()))?;
    let topic = topic_for(&event.ty).ok_or_else(|| ReplyError::NoTopic(event.ty.clone()))?;
    caused_by(&mut event, original);
    let key = original
        .key
        .map(|k| String::from_utf8_lossy(k).into_owned());
    let record = event.to_kafka(key);
    Ok(Some(OutRecord {
        topic,
        key: record.key,
        headers: record.headers,
        value: record.value,
    }))
}

/// Ties the reply to the original: ours is the authoritative `causationid`; the trace is
/// the original's unless the reply has a valid one of its own.
fn caused_by(event: &mut CloudEvent, original: &Original<'_>) {
    let text = |v: &str| ExtValue::String(v.to_owned());
    event
        .extensions
        .insert(CAUSATION_ID.to_owned(), text(original.id));
    let own = matches!(event.extensions.get(TRACEPARENT),
        Some(ExtValue::String(t)) if TraceParent::parse(t).is_ok());
    let inherited = original
        .traceparent
        .filter(|t| TraceParent::parse(t).is_ok());
    if let (false, Some(parent)) = (own, inherited) {
        event
            .extensions
            .insert(TRACEPARENT.to_owned(), text(parent));
        match original.tracestate {
            Some(state) => event.extensions.insert(TRACESTATE.to_owned(), text(state)),
            None => event.extensions.remove(TRACESTATE),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const ORIGINAL: Original<'static> = Original {
        id: "order-event-1",
        key: Some(b"ord-1"),
        traceparent: Some(TRACE),
        tracestate: Some("k=v"),
    };

    fn headers(list: &[(&'static str, &'static str)]) -> HeaderMap {
        list.iter()
            .map(|(n, v)| {
                (
                    header::HeaderName::from_static(n),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    fn route(ty: &str) -> Option<String> {
        match ty {
            "com.example.payment.failed" => Some("payments.failed".into()),
            "unroutable" => None,
            _ => Some("payments".into()),
        }
    }

    fn reply_of(
        headers: &HeaderMap,
        body: Body<'_>,
        original: &Original<'_>,
        topic_for: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<OutRecord>, ReplyError> {
        reply(headers, body, original, topic_for, &Schemas::default())
    }

    fn header<'a>(r: &'a OutRecord, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    const BINARY: [(&str, &str); 5] = [
        ("ce-specversion", "1.0"),
        ("ce-id", "pay-1"),
        ("ce-source", "/payments"),
        ("ce-type", "com.example.payment.processed"),
        ("content-type", "application/json"),
    ];

    #[test]
    fn binary_reply_is_keyed_and_caused_by_the_original() {
        let r = reply_of(
            &headers(&BINARY),
            Body::Whole(br#"{"ok":true}"#),
            &ORIGINAL,
            route,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.topic, "payments");
        assert_eq!(r.key.as_deref(), Some("ord-1"));
        assert_eq!(header(&r, "ce_id"), Some("pay-1"));
        assert_eq!(header(&r, "ce_causationid"), Some("order-event-1"));
        assert_eq!(header(&r, "ce_traceparent"), Some(TRACE));
        assert_eq!(header(&r, "ce_tracestate"), Some("k=v"));
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        assert_eq!(r.value.as_deref(), Some(&br#"{"ok":true}"#[..]));
    }

    #[test]
    fn structured_reply_is_routed_by_type_and_keeps_its_own_trace() {
        let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let body = format!(
            r#"{{"specversion":"1.0","id":"pay-2","source":"/p","type":"com.example.payment.failed","traceparent":"{own}","causationid":"forged","data":{{"n":1}}}}"#
        );
        let ct = [(
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        )];
        let r = reply_of(
            &headers(&ct),
            Body::Whole(body.as_bytes()),
            &ORIGINAL,
            route,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.topic, "payments.failed");
        assert_eq!(header(&r, "ce_causationid"), Some("order-event-1"));
        assert_eq!(header(&r, "ce_traceparent"), Some(own));
        assert_eq!(header(&r, "ce_tracestate"), None);
        assert_eq!(r.value.as_deref(), Some(&br#"{"n":1}"#[..]));
    }

    #[test]
    fn a_plain_answer_is_no_reply() {
        let plain = headers(&[("content-type", "application/json")]);
        assert_eq!(
            reply_of(&plain, Body::Whole(b"{}"), &ORIGINAL, route),
            Ok(None)
        );
        assert_eq!(
            reply_of(&HeaderMap::new(), Body::Whole(b""), &ORIGINAL, route),
            Ok(None)
        );
        // Not a CloudEvent either way: the size of a plain answer does not matter.
        assert_eq!(
            reply_of(&plain, Body::TooLarge(10), &ORIGINAL, route),
            Ok(None)
        );
    }

    #[test]
    fn a_broken_reply_is_an_error_not_a_publish() {
        let no_type = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "x"),
            ("ce-source", "/s"),
        ]);
        assert!(matches!(
            reply_of(&no_type, Body::Whole(b""), &ORIGINAL, route),
            Err(ReplyError::Invalid(_))
        ));
        let batch = headers(&[("content-type", "application/cloudevents-batch+json")]);
        assert_eq!(
            reply_of(&batch, Body::Whole(b"[]"), &ORIGINAL, route),
            Err(ReplyError::Batch)
        );
        assert_eq!(
            reply_of(&headers(&BINARY), Body::TooLarge(10), &ORIGINAL, route),
            Err(ReplyError::TooLarge(10))
        );
        let mut unroutable = headers(&BINARY);
        unroutable.insert("ce-type", HeaderValue::from_static("unroutable"));
        let e = reply_of(&unroutable, Body::Whole(b"{}"), &ORIGINAL, route).unwrap_err();
        assert_eq!(e, ReplyError::NoTopic("unroutable".into()));
        assert_eq!(e.as_str(), "unrouted");
    }

    #[test]
    fn a_reply_is_held_to_the_schema_its_dataschema_names() {
        const ID: &str = "https://example.com/schemas/payment/v1";
        let mut schemas = Schemas::default();
        schemas
            .add(&serde_json::json!({"$id": ID, "type": "object", "required": ["ok"]}))
            .unwrap();
        let mut named = headers(&BINARY);
        named.insert("ce-dataschema", HeaderValue::from_static(ID));
        let route = |_: &str| Some("payments".to_owned());
        let e = reply(&named, Body::Whole(b"{}"), &ORIGINAL, route, &schemas).unwrap_err();
        assert!(
            matches!(&e, ReplyError::InvalidData(m) if m.contains("ok")),
            "{e}"
        );
        assert_eq!(e.as_str(), "invalid");
        let good = reply(
            &named,
            Body::Whole(br#"{"ok":1}"#),
            &ORIGINAL,
            route,
            &schemas,
        );
        assert!(matches!(good, Ok(Some(_))), "{good:?}");
        // A schema the sidecar does not know is not checked (as on ingest).
        let other = reply(
            &headers(&BINARY),
            Body::Whole(b"{}"),
            &ORIGINAL,
            route,
            &schemas,
        );
        assert!(matches!(other, Ok(Some(_))), "{other:?}");
    }

    #[test]
    fn without_a_trace_upstream_the_reply_has_none_added() {
        let original = Original {
            traceparent: None,
            tracestate: None,
            ..ORIGINAL
        };
        let r = reply_of(&headers(&BINARY), Body::Whole(b"{}"), &original, route)
            .unwrap()
            .unwrap();
        assert_eq!(header(&r, "ce_traceparent"), None);
        let unkeyed = Original {
            key: None,
            ..ORIGINAL
        };
        let r = reply_of(&headers(&BINARY), Body::Whole(b"{}"), &unkeyed, route)
            .unwrap()
            .unwrap();
        assert_eq!(r.key, None);
    }
}
