//! CloudEvents Kafka protocol binding, binary content mode, in both directions.
//! `from_kafka` is shared by `tail` and the fan-out, so it is lenient: it maps what a
//! record carries and only insists on the marker of a CloudEvent, `ce_specversion`.

use base64::Engine as _;
use serde::Serialize;
use serde_json::{Map, Value, json};
use thiserror::Error;

use super::{CloudEvent, STRUCTURED_CONTENT_TYPE, validate};

/// What to produce: key, headers (all UTF-8 strings) and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord {
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub value: Option<Vec<u8>>,
}

/// The binding's extension that travels as the record key rather than as a header.
const PARTITION_KEY: &str = "partitionkey";

impl CloudEvent {
    /// Maps the event to a binary-mode record. `key` (the `eventwire-key` header) wins over the
    /// `partitionkey` extension.
    pub fn to_kafka(&self, key: Option<String>) -> KafkaRecord {
        let mut headers = vec![
            ("ce_specversion".to_owned(), super::SPEC_VERSION.to_owned()),
            ("ce_id".to_owned(), self.id.clone()),
            ("ce_source".to_owned(), self.source.clone()),
            ("ce_type".to_owned(), self.ty.clone()),
        ];
        let optional = [
            ("time", &self.time),
            ("subject", &self.subject),
            ("dataschema", &self.dataschema),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                headers.push((format!("ce_{name}"), v.clone()));
            }
        }
        for (name, value) in self.extensions.iter().filter(|(n, _)| *n != PARTITION_KEY) {
            headers.push((format!("ce_{name}"), value.canonical()));
        }
        if let Some(ct) = &self.datacontenttype {
            headers.push(("content-type".to_owned(), ct.clone()));
        }
        let key = key.or_else(|| self.extensions.get(PARTITION_KEY).map(|v| v.canonical()));
        KafkaRecord {
            key,
            headers,
            value: self.data.clone(),
        }
    }
}

/// A consumed record, borrowed from whatever client read it.
#[derive(Debug, Clone)]
pub struct ConsumedRecord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
    pub value: Option<&'a [u8]>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NotACloudEvent {
    #[error("record has no ce_specversion header and is not structured-mode")]
    NoSpecVersion,
    #[error("header `{0}` is not UTF-8")]
    NotUtf8(String),
    #[error("structured-mode record value is not a JSON object")]
    BadStructured,
}

/// Maps a record back to a structured (JSON format) CloudEvent.
pub fn from_kafka(rec: &ConsumedRecord) -> Result<Map<String, Value>, NotACloudEvent> {
    let mut event = Map::new();
    let mut content_type = None;
    for (name, value) in &rec.headers {
        let Some(value) = value else { continue };
        let text =
            || std::str::from_utf8(value).map_err(|_| NotACloudEvent::NotUtf8((*name).to_owned()));
        if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(text()?);
        } else if let Some(attr) = name.strip_prefix("ce_") {
            event.insert(attr.to_owned(), Value::String(text()?.to_owned()));
        }
    }
    if content_type.is_some_and(|ct| validate::essence(ct) == STRUCTURED_CONTENT_TYPE) {
        return structured(rec.value);
    }
    if !event.contains_key("specversion") {
        return Err(NotACloudEvent::NoSpecVersion);
    }
    if let Some(key) = rec.key.and_then(|k| std::str::from_utf8(k).ok()) {
        event
            .entry(PARTITION_KEY)
            .or_insert_with(|| Value::String(key.to_owned()));
    }
    if let Some(ct) = content_type {
        event.insert("datacontenttype".into(), Value::String(ct.to_owned()));
    }
    if let Some(value) = rec.value {
        let (name, data) = data_member(content_type, value);
        event.insert(name.into(), data);
    }
    Ok(event)
}

fn structured(value: Option<&[u8]>) -> Result<Map<String, Value>, NotACloudEvent> {
    match value.map(serde_json::from_slice::<Value>) {
        Some(Ok(Value::Object(map))) => Ok(map),
        _ => Err(NotACloudEvent::BadStructured),
    }
}

/// JSON event format 3.1: JSON stays JSON, text becomes a string, the rest is base64.
fn data_member(content_type: Option<&str>, value: &[u8]) -> (&'static str, Value) {
    if content_type.is_some_and(validate::is_json_media_type)
        && let Ok(json) = serde_json::from_slice::<Value>(value)
    {
        return ("data", json);
    }
    let textual = content_type.is_none_or(|ct| validate::essence(ct).starts_with("text/"));
    match std::str::from_utf8(value) {
        Ok(text) if textual => ("data", Value::String(text.to_owned())),
        _ => (
            "data_base64",
            Value::String(base64::engine::general_purpose::STANDARD.encode(value)),
        ),
    }
}

/// The line `tail` prints and the fan-out sends (plus a cursor): position, key and event.
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The key as a string, or `{"base64": ...}` when it is not UTF-8.
    pub key: Option<Value>,
    /// `null` when the record is not a CloudEvent (then `error` says why).
    pub event: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ConsumedRecord<'_> {
    pub fn envelope(&self) -> Envelope<'_> {
        let key = self.key.map(|k| match std::str::from_utf8(k) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(k) }),
        });
        let (event, error) = match from_kafka(self) {
            Ok(event) => (Some(event), None),
            Err(e) => (None, Some(e.to_string())),
        };
        Envelope {
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
            key,
            event,
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse_structured;
    use super::*;

    fn consumed<'a>(rec: &'a KafkaRecord) -> ConsumedRecord<'a> {
        ConsumedRecord {
            topic: "t",
            partition: 0,
            offset: 7,
            key: rec.key.as_deref().map(str::as_bytes),
            headers: rec
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), Some(v.as_bytes())))
                .collect(),
            value: rec.value.as_deref(),
        }
    }

    const FULL: &str = r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":"sub",
        "time":"2018-04-05T03:56:24Z","dataschema":"https://x/s","datacontenttype":"application/json",
        "flag":true,"count":3,"partitionkey":"pk","data":{"message":"Hello World!"}}"#;

    #[test]
    fn to_kafka_binary_mode() {
        let event = parse_structured(FULL.as_bytes()).unwrap();
        let rec = event.to_kafka(None);
        let names: Vec<&str> = rec.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "ce_time",
                "ce_subject",
                "ce_dataschema",
                "ce_count",
                "ce_flag",
                "content-type"
            ]
        );
        assert!(rec.headers.contains(&("ce_flag".into(), "true".into())));
        assert!(rec.headers.contains(&("ce_count".into(), "3".into())));
        assert_eq!(rec.key.as_deref(), Some("pk"));
        assert_eq!(
            rec.value.as_deref(),
            Some(br#"{"message":"Hello World!"}"#.as_slice())
        );
        assert_eq!(
            event.to_kafka(Some("override".into())).key.as_deref(),
            Some("override")
        );
    }

    #[test]
    fn round_trip_json_data() {
        let event = parse_structured(FULL.as_bytes()).unwrap();
        let rec = event.to_kafka(None);
        let back = from_kafka(&consumed(&rec)).unwrap();
        assert_eq!(back["data"], json!({"message": "Hello World!"}));
        assert_eq!(back["partitionkey"], "pk");
        assert_eq!(
            back["flag"], "true",
            "extensions come back as their canonical strings"
        );
        let reparsed = parse_structured(&serde_json::to_vec(&back).unwrap()).unwrap();
        assert_eq!(reparsed.data, event.data);
        assert_eq!((reparsed.id, reparsed.time), (event.id, event.time));
    }

    #[test]
    fn round_trip_text_binary_and_empty() {
        let base = r#""specversion":"1.0","id":"1","source":"/s","type":"t""#;
        let cases = [
            (
                format!(r#"{{{base},"datacontenttype":"text/plain","data":"hi"}}"#),
                "data",
                json!("hi"),
            ),
            (
                format!(r#"{{{base},"datacontenttype":"image/png","data_base64":"AAH/"}}"#),
                "data_base64",
                json!("AAH/"),
            ),
            (
                format!(r#"{{{base},"datacontenttype":"application/json","data":"not json"}}"#),
                "data",
                json!("not json"),
            ),
        ];
        for (body, member, expected) in cases {
            let event = parse_structured(body.as_bytes()).unwrap();
            let rec = event.to_kafka(None);
            let back = from_kafka(&consumed(&rec)).unwrap();
            assert_eq!(back[member], expected, "{body}");
            let reparsed = parse_structured(&serde_json::to_vec(&back).unwrap()).unwrap();
            assert_eq!(reparsed.data, event.data, "{body}");
        }
        let empty = parse_structured(format!("{{{base}}}").as_bytes())
            .unwrap()
            .to_kafka(None);
        assert_eq!((empty.key.as_ref(), empty.value.as_ref()), (None, None));
        let back = from_kafka(&consumed(&empty)).unwrap();
        assert!(!back.contains_key("data") && !back.contains_key("data_base64"));
    }

    #[test]
    fn from_kafka_conformance_scenario_and_non_events() {
        let headers = [
            ("ce_specversion", "1.0"),
            ("ce_id", "1234-1234-1234"),
            ("ce_type", "com.example.someevent"),
            ("ce_source", "/mycontext/subcontext"),
            ("ce_time", "2018-04-05T03:56:24Z"),
            ("content-type", "application/json"),
        ];
        let rec = ConsumedRecord {
            topic: "t",
            partition: 1,
            offset: 2,
            key: Some(&[0xff]),
            headers: headers
                .iter()
                .map(|(k, v)| (*k, Some(v.as_bytes())))
                .collect(),
            value: Some(br#"{"message": "Hello World!"}"#),
        };
        let event = from_kafka(&rec).unwrap();
        assert_eq!(event["datacontenttype"], "application/json");
        assert_eq!(event["data"], json!({"message": "Hello World!"}));
        assert!(
            !event.contains_key("partitionkey"),
            "non-UTF-8 key is not a partitionkey"
        );
        assert_eq!(rec.envelope().key, Some(json!({"base64": "/w=="})));

        let plain = ConsumedRecord {
            headers: vec![],
            ..rec.clone()
        };
        assert_eq!(from_kafka(&plain), Err(NotACloudEvent::NoSpecVersion));
        let line = serde_json::to_string(&plain.envelope()).unwrap();
        let prefix = r#"{"topic":"t","partition":1,"offset":2,"key":{"base64":"/w=="},"event":null,"error":"#;
        assert!(line.starts_with(prefix), "{line}");

        let structured_body = br#"{"specversion":"1.0","id":"s","source":"/s","type":"t"}"#;
        let structured = ConsumedRecord {
            headers: vec![(
                "content-type",
                Some(b"application/cloudevents+json; charset=utf-8".as_slice()),
            )],
            value: Some(structured_body),
            ..rec
        };
        assert_eq!(from_kafka(&structured).unwrap()["id"], "s");
    }
}
