//! The CloudEvent v1.0.2 model: parsing from the HTTP binary and structured (JSON) modes,
//! validation, and the Kafka binary-mode mapping (in `kafka`). Pure code, no I/O.

pub mod kafka;
pub mod validate;

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use eventwire_contract::header_value;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use thiserror::Error;

pub use kafka::ConsumedRecord;

pub const SPEC_VERSION: &str = "1.0";
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// An extension attribute value. CloudEvents has more types (URI, Timestamp, Binary), but
/// on the wire they are all strings, so only the JSON-distinguishable ones are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtValue {
    String(String),
    Boolean(bool),
    Integer(i32),
}

impl ExtValue {
    /// Canonical string form used in Kafka headers (`true`/`false`, decimal integers).
    pub fn canonical(&self) -> String {
        match self {
            ExtValue::String(s) => s.clone(),
            ExtValue::Boolean(b) => b.to_string(),
            ExtValue::Integer(i) => i.to_string(),
        }
    }
}

/// A validated CloudEvent (specversion is always 1.0, so it is not stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvent {
    pub id: String,
    pub source: String,
    pub ty: String,
    pub datacontenttype: Option<String>,
    pub dataschema: Option<String>,
    pub subject: Option<String>,
    pub time: Option<String>,
    pub extensions: BTreeMap<String, ExtValue>,
    pub data: Option<Vec<u8>>,
}

/// A context attribute that failed validation (`attribute` empty: the event as a whole).
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub struct CeError {
    pub attribute: String,
    pub reason: String,
}

impl std::fmt::Display for CeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.attribute.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "attribute `{}`: {}", self.attribute, self.reason)
        }
    }
}

impl CeError {
    fn new(attribute: &str, reason: impl Into<String>) -> Self {
        Self {
            attribute: attribute.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Why an HTTP request could not be turned into a CloudEvent.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("header `{header}`: {reason}")]
    Header { header: String, reason: String },
    #[error("invalid JSON at line {line} column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error(transparent)]
    Invalid(#[from] CeError),
}

/// An attribute value before validation, from either mode.
#[derive(Debug, Clone, PartialEq)]
enum AttrValue {
    String(String),
    Boolean(bool),
    Integer(i32),
    /// Anything else (fraction, out-of-range number, object, array), described for errors.
    Other(&'static str),
}

type Attrs = BTreeMap<String, AttrValue>;

const CORE_OPTIONAL: [&str; 4] = ["datacontenttype", "dataschema", "subject", "time"];

/// Parses HTTP binary mode. `headers` are (lower-case name, raw value) pairs; `content_type`
/// is the Content-Type header (becomes datacontenttype); `body` is the data.
pub fn parse_binary<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<CloudEvent, ParseError> {
    let mut attrs = Attrs::new();
    for (name, raw) in headers {
        let Some(attr) = name.strip_prefix("ce-") else {
            continue;
        };
        let header_err = |reason: String| ParseError::Header {
            header: name.to_owned(),
            reason,
        };
        let text = std::str::from_utf8(raw).map_err(|_| header_err("value is not UTF-8".into()))?;
        let value = header_value::decode(text).map_err(|e| header_err(e.to_string()))?;
        if matches!(attr, "data" | "datacontenttype") {
            // Binary mode carries these as body and Content-Type; a header would be ambiguous.
            return Err(header_err(
                "not allowed in binary mode (use the body / Content-Type)".into(),
            ));
        }
        if attrs
            .insert(attr.to_owned(), AttrValue::String(value))
            .is_some()
        {
            return Err(header_err("header given more than once".into()));
        }
    }
    if let Some(ct) = content_type {
        // Data declared JSON must be JSON: consumers parse it by its content type.
        if !body.is_empty() && validate::is_json_media_type(ct) {
            serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(json_error)?;
        }
        attrs.insert("datacontenttype".into(), AttrValue::String(ct.to_owned()));
    }
    let data = (!body.is_empty()).then(|| body.to_vec());
    build(attrs, data)
}

/// Parses the JSON event format (structured mode), keeping `data` byte-exact.
pub fn parse_structured(body: &[u8]) -> Result<CloudEvent, ParseError> {
    let members = serde_json::from_slice::<Members>(body)
        .map_err(json_error)?
        .0;
    let mut attrs = Attrs::new();
    let (mut data, mut data_base64) = (None, None);
    for (name, raw) in members {
        if raw.get() == "null" {
            continue; // JSON null means the attribute is absent.
        }
        match name.as_str() {
            "data" => data = Some(raw),
            "data_base64" => data_base64 = Some(raw),
            _ => {
                attrs.insert(name, attr_value(&raw));
            }
        }
    }
    let data = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(
                CeError::new("data_base64", "`data` and `data_base64` are exclusive").into(),
            );
        }
        (None, Some(b64)) => Some(decode_base64(&b64)?),
        (Some(raw), None) => Some(structured_data(&raw, &mut attrs)),
        (None, None) => None,
    };
    build(attrs, data)
}

/// An event of a batch that is not valid, and where it is (`None`: the batch as a whole).
#[derive(Debug, PartialEq, Eq)]
pub struct BatchError {
    pub index: Option<usize>,
    pub error: ParseError,
}

/// Parses the JSON batch format: an array of events in the JSON format. The first invalid
/// event fails the batch, so a batch is accepted whole or not at all.
pub fn parse_batch(body: &[u8]) -> Result<Vec<CloudEvent>, BatchError> {
    let whole = |error| BatchError { index: None, error };
    let raw = serde_json::from_slice::<Vec<&RawValue>>(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => whole(
            CeError::new(
                "",
                "a batch is a JSON array of CloudEvents in the JSON format",
            )
            .into(),
        ),
        _ => whole(json_error(e)),
    })?;
    if raw.is_empty() {
        return Err(whole(
            CeError::new("", "a batch holds at least one event").into(),
        ));
    }
    raw.iter()
        .enumerate()
        .map(|(index, event)| {
            parse_structured(event.get().as_bytes()).map_err(|error| BatchError {
                index: Some(index),
                error,
            })
        })
        .collect()
}

fn json_error(e: serde_json::Error) -> ParseError {
    match e.classify() {
        // Well-formed JSON of the wrong shape (e.g. an array) is a CloudEvents problem.
        serde_json::error::Category::Data => CeError::new("", e.to_string()).into(),
        _ => {
            let (line, column) = (e.line(), e.column());
            // serde's Display ends with the position, which the error already carries.
            let text = e.to_string();
            let suffix = format!(" at line {line} column {column}");
            let message = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
            ParseError::Json {
                line,
                column,
                message,
            }
        }
    }
}

fn decode_base64(raw: &RawValue) -> Result<Vec<u8>, CeError> {
    let err = |why: &str| CeError::new("data_base64", why);
    let text: String = serde_json::from_str(raw.get()).map_err(|_| err("must be a string"))?;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| err(&format!("invalid base64: {e}")))
}

/// JSON event format 3.1: JSON data stays JSON text; a string under a non-JSON media type is
/// the payload itself (e.g. text/plain), so it is unescaped.
fn structured_data(raw: &RawValue, attrs: &mut Attrs) -> Vec<u8> {
    let text = raw.get().as_bytes().to_vec();
    match attrs.get("datacontenttype") {
        None => {
            attrs.insert(
                "datacontenttype".into(),
                AttrValue::String("application/json".into()),
            );
            text
        }
        Some(AttrValue::String(ct)) if !validate::is_json_media_type(ct) => {
            serde_json::from_str::<String>(raw.get()).map_or(text, String::into_bytes)
        }
        // JSON media types, and non-string content types (rejected by validation later).
        Some(_) => text,
    }
}

fn attr_value(raw: &RawValue) -> AttrValue {
    match serde_json::from_str::<serde_json::Value>(raw.get()) {
        Ok(serde_json::Value::String(s)) => AttrValue::String(s),
        Ok(serde_json::Value::Bool(b)) => AttrValue::Boolean(b),
        Ok(serde_json::Value::Number(n)) => match n.as_i64().map(i32::try_from) {
            Some(Ok(i)) => AttrValue::Integer(i),
            Some(Err(_)) => AttrValue::Other("an integer outside the 32-bit range"),
            None => AttrValue::Other("a non-integer number"),
        },
        Ok(serde_json::Value::Array(_)) => AttrValue::Other("an array"),
        Ok(serde_json::Value::Object(_)) => AttrValue::Other("an object"),
        Ok(serde_json::Value::Null) | Err(_) => AttrValue::Other("null"),
    }
}

/// Validates the collected attributes and assembles the event.
fn build(mut attrs: Attrs, data: Option<Vec<u8>>) -> Result<CloudEvent, ParseError> {
    let specversion = required(&mut attrs, "specversion")?;
    if specversion != SPEC_VERSION {
        return Err(CeError::new(
            "specversion",
            format!("must be \"1.0\", got {specversion:?}"),
        )
        .into());
    }
    let id = required(&mut attrs, "id")?;
    let source = required(&mut attrs, "source")?;
    check(&source, "source", validate::uri_reference)?;
    let ty = required(&mut attrs, "type")?;
    let [datacontenttype, dataschema, subject, time] =
        CORE_OPTIONAL.map(|name| optional(&mut attrs, name));
    let (datacontenttype, dataschema, subject, time) =
        (datacontenttype?, dataschema?, subject?, time?);
    if let Some(ct) = &datacontenttype {
        check(ct, "datacontenttype", validate::media_type)?;
    }
    if let Some(schema) = &dataschema {
        check(schema, "dataschema", validate::absolute_uri)?;
    }
    if let Some(t) = &time {
        check(t, "time", validate::timestamp)?;
    }
    let extensions = extensions(attrs)?;
    Ok(CloudEvent {
        id,
        source,
        ty,
        datacontenttype,
        dataschema,
        subject,
        time,
        extensions,
        data,
    })
}

fn check(value: &str, name: &str, rule: fn(&str) -> Result<(), String>) -> Result<(), CeError> {
    rule(value).map_err(|reason| CeError::new(name, reason))
}

fn required(attrs: &mut Attrs, name: &str) -> Result<String, CeError> {
    optional(attrs, name)?.ok_or_else(|| CeError::new(name, "required attribute is missing"))
}

/// A core attribute: must be a non-empty string without control characters.
fn optional(attrs: &mut Attrs, name: &str) -> Result<Option<String>, CeError> {
    match attrs.remove(name) {
        None => Ok(None),
        Some(AttrValue::String(s)) if s.is_empty() => Err(CeError::new(name, "must not be empty")),
        Some(AttrValue::String(s)) => check(&s, name, validate::no_controls).map(|()| Some(s)),
        Some(other) => Err(CeError::new(
            name,
            format!("must be a string, got {}", describe(&other)),
        )),
    }
}

fn extensions(attrs: Attrs) -> Result<BTreeMap<String, ExtValue>, CeError> {
    attrs
        .into_iter()
        .map(|(name, value)| {
            check(&name, &name, validate::attribute_name)?;
            let value = match value {
                AttrValue::String(s) => {
                    check(&s, &name, validate::no_controls).map(|()| ExtValue::String(s))?
                }
                AttrValue::Boolean(b) => ExtValue::Boolean(b),
                AttrValue::Integer(i) => ExtValue::Integer(i),
                AttrValue::Other(what) => {
                    let reason = format!(
                        "extension values must be a string, boolean or integer, got {what}"
                    );
                    return Err(CeError::new(&name, reason));
                }
            };
            Ok((name, value))
        })
        .collect()
}

fn describe(v: &AttrValue) -> &'static str {
    match v {
        AttrValue::String(_) => "a string",
        AttrValue::Boolean(_) => "a boolean",
        AttrValue::Integer(_) => "a number",
        AttrValue::Other(what) => what,
    }
}

/// A JSON object's members in order, rejecting duplicate names (which would make the event
/// ambiguous) instead of silently keeping the last one.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object (a CloudEvent in the JSON format)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members: Vec<(String, Box<RawValue>)> = Vec::new();
                while let Some((name, value)) = map.next_entry::<String, Box<RawValue>>()? {
                    if members.iter().any(|(n, _)| *n == name) {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate member `{name}`"
                        )));
                    }
                    members.push((name, value));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The CloudEvents conformance project's JSON-format events, copied into the repository.
    const CONFORMANCE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/cloudevents/conformance/format-json"
    );

    fn conformance(file: &str) -> Vec<(String, Value)> {
        let path = format!("{CONFORMANCE}/{file}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let doc: Value = serde_json::from_str(text.trim_start_matches('\u{feff}')).expect("JSON");
        let tests = doc["tests"].as_array().expect("tests array");
        tests
            .iter()
            .map(|t| (t["id"].as_str().unwrap().to_owned(), t["event"].clone()))
            .collect()
    }

    #[test]
    fn conformance_valid_events_accepted() {
        let events = conformance("valid-events.json");
        assert_eq!(events.len(), 10);
        for (id, event) in events {
            let body = serde_json::to_vec(&event).unwrap();
            let parsed = parse_structured(&body);
            assert!(parsed.is_ok(), "{id}: {parsed:?}");
        }
    }

    #[test]
    fn conformance_invalid_events_rejected() {
        let events = conformance("invalid-events.json");
        assert_eq!(events.len(), 25);
        for (id, event) in events {
            let body = serde_json::to_vec(&event).unwrap();
            let parsed = parse_structured(&body);
            assert!(
                matches!(parsed, Err(ParseError::Invalid(_))),
                "{id}: {parsed:?}"
            );
        }
    }

    #[test]
    fn invalid_events_name_the_attribute() {
        let attr = |body: &str| match parse_structured(body.as_bytes()) {
            Err(ParseError::Invalid(e)) => e.attribute,
            other => panic!("{body}: {other:?}"),
        };
        let base = r#""specversion":"1.0","id":"x","source":"/s","type":"t""#;
        assert_eq!(
            attr(r#"{"id":25,"specversion":"1.0","source":"/s","type":"t"}"#),
            "id"
        );
        assert_eq!(
            attr(&format!(r#"{{{base},"time":"2018-04-05T18:31Z"}}"#)),
            "time"
        );
        assert_eq!(
            attr(&format!(r#"{{{base},"MyExtension":"bad"}}"#)),
            "MyExtension"
        );
        assert_eq!(attr(&format!(r#"{{{base},"ext":1.5}}"#)), "ext");
        assert_eq!(attr(&format!(r#"{{{base},"ext":{{}}}}"#)), "ext");
        assert_eq!(attr(&format!(r#"{{{base},"ext":[1]}}"#)), "ext");
        assert_eq!(
            attr(&format!(r#"{{{base},"subject":"a\r\nb"}}"#)),
            "subject"
        );
        assert_eq!(
            attr(&format!(r#"{{{base},"dataschema":"rel/x"}}"#)),
            "dataschema"
        );
        assert_eq!(
            attr(&format!(r#"{{{base},"data":1,"data_base64":"AA=="}}"#)),
            "data_base64"
        );
    }

    #[test]
    fn structured_data_is_byte_exact() {
        let data = |body: &str| parse_structured(body.as_bytes()).unwrap();
        let base = r#""specversion":"1.0","id":"x","source":"/s","type":"t""#;
        let e = data(&format!(
            r#"{{{base},"data": {{"b" : 1.50, "a":[ 1e3 ]}} }}"#
        ));
        assert_eq!(
            e.data.as_deref(),
            Some(br#"{"b" : 1.50, "a":[ 1e3 ]}"#.as_slice())
        );
        assert_eq!(e.datacontenttype.as_deref(), Some("application/json"));
        let e = data(&format!(
            r#"{{{base},"datacontenttype":"text/plain","data":"caf\u00e9\n"}}"#
        ));
        assert_eq!(e.data.as_deref(), Some("café\n".as_bytes()));
        let e = data(&format!(
            r#"{{{base},"datacontenttype":"application/x+json","data":"s"}}"#
        ));
        assert_eq!(e.data.as_deref(), Some(br#""s""#.as_slice()));
        let e = data(&format!(
            r#"{{{base},"datacontenttype":"text/plain","data":[1]}}"#
        ));
        assert_eq!(e.data.as_deref(), Some(b"[1]".as_slice()));
        let e = data(&format!(
            r#"{{{base},"datacontenttype":"image/png","data_base64":"AAH/"}}"#
        ));
        assert_eq!(e.data.as_deref(), Some([0u8, 1, 255].as_slice()));
        let e = data(&format!(r#"{{{base},"data":null,"ext":true,"num":-7}}"#));
        assert_eq!(e.data, None);
        assert_eq!(e.extensions["ext"], ExtValue::Boolean(true));
        assert_eq!(e.extensions["num"].canonical(), "-7");
    }

    #[test]
    fn structured_json_errors() {
        match parse_structured(b"{\n \"id\": }") {
            Err(ParseError::Json {
                line: 2,
                column,
                message,
            }) => {
                assert!(column > 0);
                assert!(!message.contains("line"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_structured(b"[1]"),
            Err(ParseError::Invalid(_))
        ));
        let dup = br#"{"specversion":"1.0","id":"a","id":"b","source":"/s","type":"t"}"#;
        assert!(parse_structured(dup).is_err());
    }

    #[test]
    fn binary_mode() {
        let headers: Vec<(&str, &[u8])> = vec![
            ("ce-specversion", b"1.0"),
            ("ce-id", b"42"),
            ("ce-source", b"/orders"),
            ("ce-type", b"order.created"),
            ("ce-subject", b"caf%C3%A9%20au%20lait"),
            ("ce-traceparent", b"00-abc"),
            ("host", b"x"),
        ];
        let e = parse_binary(headers.clone(), Some("application/json"), b"{}").unwrap();
        assert_eq!(e.subject.as_deref(), Some("café au lait"));
        assert_eq!(
            e.extensions["traceparent"],
            ExtValue::String("00-abc".into())
        );
        assert_eq!(e.data.as_deref(), Some(b"{}".as_slice()));
        let no_body = parse_binary(headers.clone(), None, b"").unwrap();
        assert_eq!((no_body.data, no_body.datacontenttype), (None, None));

        let mut bad = headers.clone();
        bad.push(("ce-comment", b"line1%0D%0Aline2"));
        match parse_binary(bad, None, b"") {
            Err(ParseError::Invalid(e)) => assert_eq!(e.attribute, "comment"),
            other => panic!("{other:?}"),
        }
        let mut bad = headers.clone();
        bad.push(("ce-comment", b"bad %zz"));
        assert!(
            matches!(parse_binary(bad, None, b""), Err(ParseError::Header { header, .. }) if header == "ce-comment")
        );
        let mut bad = headers;
        bad.push(("ce-id", b"again"));
        assert!(matches!(
            parse_binary(bad, None, b""),
            Err(ParseError::Header { .. })
        ));
    }

    #[test]
    fn batches_parse_whole_or_name_the_event_at_fault() {
        let good = r#"[{"specversion":"1.0","id":"a","source":"/s","type":"t","data":{"n":1}},
                       {"specversion":"1.0","id":"b","source":"/s","type":"t","partitionkey":"k"}]"#;
        let events = parse_batch(good.as_bytes()).unwrap();
        assert_eq!(
            events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(events[0].data.as_deref(), Some(br#"{"n":1}"#.as_slice()));
        let bad = r#"[{"specversion":"1.0","id":"a","source":"/s","type":"t"},
                      {"specversion":"1.0","id":"b","source":"/s","type":"t","time":"noon"}]"#;
        let e = parse_batch(bad.as_bytes()).unwrap_err();
        assert_eq!(e.index, Some(1));
        assert!(
            matches!(e.error, ParseError::Invalid(CeError { ref attribute, .. }) if attribute == "time")
        );
        for (body, why) in [
            ("[]", "at least one event"),
            (r#"{"specversion":"1.0"}"#, "JSON array"),
            ("[1]", "JSON object"),
        ] {
            let e = parse_batch(body.as_bytes()).unwrap_err();
            assert!(e.error.to_string().contains(why), "{body}: {e:?}");
        }
        assert!(matches!(
            parse_batch(b"[{").unwrap_err(),
            BatchError {
                index: None,
                error: ParseError::Json { .. }
            }
        ));
    }
}
