//! A consumed Kafka record -> the HTTP request that delivers it (CloudEvents HTTP binding,
//! binary mode: `ce_*` record headers become `ce-*` HTTP headers, the value is the body; or
//! structured mode on request: the JSON event format). Pure code. A structured-mode record
//! is sent structured, as it is.

use serde_json::{Map, Value};
use thiserror::Error;

use super::config::ContentMode;
use crate::cloudevent::kafka::{NotACloudEvent, from_kafka};
use crate::cloudevent::validate::essence;
use crate::cloudevent::{ConsumedRecord, STRUCTURED_CONTENT_TYPE};
use crate::subscription_filter::{Attributes, attributes_of};

/// What to send, plus what the worker needs to know about the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpDelivery {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// `id` (empty if the event has none: it is then logged as such, not refused here).
    pub id: String,
    /// Context attributes, the form filters match against.
    pub attributes: Attributes,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("not a CloudEvent: {0}")]
    NotACloudEvent(#[from] NotACloudEvent),
}

/// Builds the request for `record`; a record that is not a CloudEvent cannot be delivered.
pub fn build(record: &ConsumedRecord, mode: ContentMode) -> Result<HttpDelivery, RequestError> {
    let event = from_kafka(record)?;
    let structured = || {
        vec![(
            "content-type".to_owned(),
            STRUCTURED_CONTENT_TYPE.to_owned(),
        )]
    };
    let (headers, body) = if is_structured(record) {
        (structured(), record.value.map(<[u8]>::to_vec))
    } else if mode == ContentMode::Structured {
        // `from_kafka` gave the JSON event format: JSON data stays JSON, other data base64.
        (structured(), serde_json::to_vec(&event).ok())
    } else {
        (binary_headers(record), record.value.map(<[u8]>::to_vec))
    };
    Ok(HttpDelivery {
        headers,
        body: body.unwrap_or_default(),
        id: string_attr(&event, "id"),
        attributes: attributes_of(&event),
    })
}

fn is_structured(record: &ConsumedRecord) -> bool {
    record.headers.iter().any(|(name, value)| {
        name.eq_ignore_ascii_case("content-type")
            && value
                .and_then(|v| std::str::from_utf8(v).ok())
                .is_some_and(|ct| essence(ct) == STRUCTURED_CONTENT_TYPE)
    })
}

/// `from_kafka` already refused non-UTF-8 `ce_*` and `content-type` values, so none is
/// dropped here; values are percent-encoded as the HTTP binding asks (3.1.3.2).
fn binary_headers(record: &ConsumedRecord) -> Vec<(String, String)> {
    record
        .headers
        .iter()
        .filter_map(|(name, value)| {
            let text = std::str::from_utf8((*value)?).ok()?;
            if name.eq_ignore_ascii_case("content-type") {
                Some(("content-type".to_owned(), text.to_owned()))
            } else {
                let attr = name.strip_prefix("ce_")?;
                let encoded = eventwire_contract::header_value::encode(text.as_bytes());
                Some((format!("ce-{attr}"), encoded.into_owned()))
            }
        })
        .collect()
}

fn string_attr(event: &Map<String, Value>, name: &str) -> String {
    event
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(
        headers: Vec<(&'a str, Option<&'a [u8]>)>,
        value: &'a [u8],
    ) -> ConsumedRecord<'a> {
        ConsumedRecord {
            topic: "orders",
            partition: 2,
            offset: 7,
            key: Some(b"ord-1"),
            headers,
            value: Some(value),
        }
    }

    fn header<'a>(d: &'a HttpDelivery, name: &str) -> Option<&'a str> {
        d.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn binary_record_becomes_binary_request() {
        let r = record(
            vec![
                ("ce_specversion", Some(b"1.0")),
                ("ce_id", Some(b"e-1")),
                ("ce_type", Some(b"com.example.order.placed")),
                ("ce_source", Some(b"/shop")),
                ("ce_subject", Some("caf\u{e9} 1".as_bytes())),
                ("content-type", Some(b"application/json")),
                ("eventwire-internal", Some(b"x")),
            ],
            br#"{"n":1}"#,
        );
        let d = build(&r, ContentMode::Binary).unwrap();
        assert_eq!(d.id, "e-1");
        assert_eq!(header(&d, "ce-id"), Some("e-1"));
        assert_eq!(header(&d, "ce-specversion"), Some("1.0"));
        assert_eq!(header(&d, "ce-type"), Some("com.example.order.placed"));
        assert_eq!(header(&d, "ce-subject"), Some("caf%C3%A9%201"));
        assert_eq!(header(&d, "content-type"), Some("application/json"));
        assert_eq!(header(&d, "eventwire-internal"), None);
        assert_eq!(d.body, br#"{"n":1}"#);
        assert_eq!(
            d.attributes.get("type").map(String::as_str),
            Some("com.example.order.placed")
        );
        // The key is the partition key extension filters may match on, not a header.
        assert_eq!(
            d.attributes.get("partitionkey").map(String::as_str),
            Some("ord-1")
        );
        assert_eq!(header(&d, "ce-partitionkey"), None);
    }

    #[test]
    fn structured_record_is_sent_structured() {
        let body = br#"{"specversion":"1.0","id":"s-1","type":"t","source":"/s"}"#;
        let r = record(
            vec![(
                "content-type",
                Some(b"application/cloudevents+json; charset=utf-8"),
            )],
            body,
        );
        let d = build(&r, ContentMode::Binary).unwrap();
        assert_eq!(d.id, "s-1");
        assert_eq!(
            d.headers,
            vec![("content-type".into(), STRUCTURED_CONTENT_TYPE.into())]
        );
        assert_eq!(d.body, body);
    }

    #[test]
    fn not_a_cloudevent_is_refused() {
        let r = record(vec![("content-type", Some(b"text/plain"))], b"hi");
        assert_eq!(
            build(&r, ContentMode::Binary),
            Err(RequestError::NotACloudEvent(NotACloudEvent::NoSpecVersion))
        );
        let bad = record(
            vec![("ce_specversion", Some(b"1.0")), ("ce_id", Some(b"\xff"))],
            b"",
        );
        assert!(build(&bad, ContentMode::Binary).is_err());
    }

    #[test]
    fn binary_record_can_be_sent_structured() {
        let r = record(
            vec![
                ("ce_specversion", Some(b"1.0")),
                ("ce_id", Some(b"e-1")),
                ("ce_type", Some(b"t")),
                ("ce_source", Some(b"/s")),
                ("content-type", Some(b"application/json")),
            ],
            br#"{"n":1}"#,
        );
        let d = build(&r, ContentMode::Structured).unwrap();
        assert_eq!(
            d.headers,
            vec![("content-type".into(), STRUCTURED_CONTENT_TYPE.into())]
        );
        let event: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(event["id"], "e-1");
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["datacontenttype"], "application/json");
        assert_eq!(event["data"], serde_json::json!({"n": 1}));
        assert_eq!(event["partitionkey"], "ord-1");
        assert_eq!(d.id, "e-1");
    }

    #[test]
    fn no_value_is_an_empty_body() {
        let mut r = record(
            vec![("ce_specversion", Some(b"1.0")), ("ce_id", Some(b"x"))],
            b"",
        );
        r.value = None;
        assert_eq!(build(&r, ContentMode::Binary).unwrap().body, b"");
    }
}
