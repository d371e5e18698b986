//! The ingest callout, host-free: a buffered request on an enabled route becomes
//! `POST /v1/events` to the sidecar in CloudEvents HTTP binary mode.
//!
//! Binary mode keeps the request body as the event data byte for byte: no JSON
//! re-serialization, no base64, one copy from the proxy into the callout. A request that
//! already is a CloudEvent (binary, structured, or a batch) goes on as it came.

use crate::cloudevent::{self, Incoming};
use crate::config::{JwtPayload, Rule, Sidecar, ValueSource, json_kind};
use crate::problem::FilterError;
use crate::redact;
use crate::route::strip_query;
use crate::trace::{self, TraceParent};
use eventwire_contract::header_value::{
    decode as decode_header_value, encode as encode_header_value,
};
use eventwire_contract::{KEY_HEADER, TOPIC_HEADER};
use serde_json::Value;
use std::borrow::Cow;

/// What the shell gathered from the proxy for one request on an enabled route.
pub struct Request<'a> {
    pub scheme: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    /// All request headers; names as the host gives them (Envoy lowercases, Kong may not).
    pub headers: &'a [(String, Vec<u8>)],
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        header(self.headers, name)
    }

    fn header_str(&self, name: &str) -> Result<Option<&'a str>, FilterError> {
        self.header(name)
            .map(|v| {
                std::str::from_utf8(v).map_err(|_| FilterError::InvalidHeader {
                    name: name.to_string(),
                    reason: "value is not valid UTF-8",
                })
            })
            .transpose()
    }
}

pub fn header<'h>(headers: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Host-provided inputs that make each event unique.
pub struct Stamp {
    pub now_nanos: u64,
    pub random: [u8; 16],
    /// Ids for a trace the filter starts (a request without a valid `traceparent`).
    pub trace: [u8; 24],
}

/// The ingest callout, ready for `dispatch_http_call`.
pub struct Callout<'a> {
    pub headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The request body, or a batch the filter had to key (`keyed_batch`).
    pub body: Cow<'a, [u8]>,
    /// The event id, when the filter knows it before the sidecar answers (for logs).
    pub id: Option<Cow<'a, str>>,
    /// The event's trace context (a batch: the request's), echoed in the 202 and logged.
    pub trace: TraceParent,
}

impl Callout<'_> {
    pub fn header_refs(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(n, v)| (n.as_ref(), v.as_ref()))
            .collect()
    }

    /// Kept while the request is upstream (`after_upstream`): the request is gone by then.
    pub fn into_owned(self) -> Callout<'static> {
        Callout {
            headers: self
                .headers
                .into_iter()
                .map(|(n, v)| (owned(n), owned(v)))
                .collect(),
            body: Cow::Owned(self.body.into_owned()),
            id: self.id.map(owned),
            trace: self.trace,
        }
    }

    /// Sets `name` (lower case) to `value`, replacing what the request gave it.
    pub fn set_header(&mut self, name: String, value: String) {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((Cow::Owned(name), Cow::Owned(value)));
    }

    /// Whether the callout carries a CloudEvent in its body (structured or a batch), where
    /// extension headers would not reach the event.
    pub fn event_in_body(&self) -> bool {
        self.headers.iter().any(|(n, v)| {
            n == "content-type" && (v == cloudevent::STRUCTURED || v == cloudevent::BATCH)
        })
    }
}

pub fn build<'a>(
    rule: &'a Rule,
    sidecar: &'a Sidecar,
    req: &Request<'a>,
    stamp: &Stamp,
) -> Result<Callout<'a>, FilterError> {
    let content_type = req.header_str("content-type")?;
    let mode = cloudevent::incoming_mode(content_type, req.header("ce-specversion").is_some());
    let mut h: Vec<(Cow<'a, str>, Cow<'a, str>)> = Vec::with_capacity(16);
    h.push((":method".into(), "POST".into()));
    h.push((":path".into(), sidecar.path.as_str().into()));
    h.push((":authority".into(), sidecar.authority.as_str().into()));
    h.push((":scheme".into(), "http".into()));
    h.push((TOPIC_HEADER.into(), rule.topic.as_str().into()));
    if let Some(a) = &sidecar.authorization {
        h.push(("authorization".into(), a.as_str().into()));
    }
    let ctx = TraceContext::of(req, stamp);
    if mode == Incoming::Batch {
        let trace = ctx.parent;
        ctx.into_headers(&mut h, Carried::Request);
        return batch(rule, req, h, trace);
    }
    // A client's event with a valid trace context of its own keeps it.
    let mut own: Option<TraceParent> = None;
    let (body, data) = if rule.redact.is_empty() {
        let data = EventData::of(
            mode,
            content_type,
            req.body,
            rule.needs_json_body(),
            &mut own,
        )?;
        (Cow::Borrowed(req.body), data)
    } else {
        let (body, data) = redacted(rule, mode, content_type, req.body, &mut own)?;
        (Cow::Owned(body), data)
    };
    if let Some(src) = &rule.key {
        let key = resolve(src, "partition key", rule, req, &data)?;
        h.push((
            KEY_HEADER.into(),
            owned(encode_header_value(key.as_bytes())),
        ));
    }
    let request_trace = ctx.parent;
    let id = match mode {
        Incoming::Structured => {
            h.push(("content-type".into(), cloudevent::STRUCTURED.into()));
            ctx.onto_client_event(own, &mut h);
            None
        }
        Incoming::Binary => {
            own = forward_binary(req, &mut h)?;
            ctx.onto_client_event(own, &mut h);
            None
        }
        Incoming::Plain | Incoming::Batch => {
            ctx.into_headers(&mut h, Carried::Event);
            Some(wrap(rule, req, stamp, content_type, &data, &mut h)?)
        }
    };
    Ok(Callout {
        headers: h,
        body,
        id,
        trace: own.unwrap_or(request_trace),
    })
}

/// The trace an event joins: the request's when it carries a valid `traceparent` (with its
/// `tracestate`), else a new one.
struct TraceContext<'a> {
    parent: TraceParent,
    text: Cow<'a, str>,
    state: Option<&'a str>,
}

/// Where a trace context goes on the callout.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Carried {
    /// The event's extension (`ce-traceparent`): an event the filter builds.
    Event,
    /// The callout's own `traceparent`: the sidecar gives it to each event of a client's
    /// CloudEvent or batch that has no valid one (a header per event would mean rewriting
    /// the client's body).
    Request,
}

impl<'a> TraceContext<'a> {
    fn of(req: &Request<'a>, stamp: &Stamp) -> TraceContext<'a> {
        let incoming = req.header("traceparent");
        match incoming.and_then(TraceParent::parse) {
            Some(parent) => TraceContext {
                parent,
                // Sent on byte for byte when it already is the version-00 form.
                text: match incoming.and_then(|v| std::str::from_utf8(v).ok()) {
                    Some(t) if t == parent.as_str() => Cow::Borrowed(t),
                    _ => Cow::Owned(parent.as_str().to_owned()),
                },
                state: req.header("tracestate").and_then(trace::tracestate),
            },
            None => {
                let parent = TraceParent::start(&stamp.trace);
                TraceContext {
                    parent,
                    text: Cow::Owned(parent.as_str().to_owned()),
                    state: None,
                }
            }
        }
    }

    fn into_headers(self, h: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>, carried: Carried) {
        let (parent, state) = match carried {
            Carried::Event => ("ce-traceparent", "ce-tracestate"),
            Carried::Request => ("traceparent", "tracestate"),
        };
        h.push((parent.into(), self.text));
        if let Some(s) = self.state {
            // As an attribute it is percent-encoded like every `ce-` value (`%` and `"`
            // are legal in tracestate values).
            let value = match carried {
                Carried::Event => encode_header_value(s.as_bytes()),
                Carried::Request => Cow::Borrowed(s),
            };
            h.push((state.into(), value));
        }
    }

    /// A client's event without a valid trace context gets the request's through the
    /// sidecar; one with its own needs nothing.
    fn onto_client_event(
        self,
        own: Option<TraceParent>,
        h: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>,
    ) {
        if own.is_none() {
            self.into_headers(h, Carried::Request);
        }
    }
}

/// A client's structured event's valid `traceparent`.
fn own_trace(event: &Value) -> Option<TraceParent> {
    let text = event.get("traceparent")?.as_str()?;
    TraceParent::parse(text.as_bytes())
}

/// A redacting rule's body with its fields taken out, and the data keys are read from (so a
/// key or subject never carries a value the rule redacts). Only JSON can be redacted: any
/// other body on such a rule is refused rather than published whole.
fn redacted(
    rule: &Rule,
    mode: Incoming,
    content_type: Option<&str>,
    body: &[u8],
    own: &mut Option<TraceParent>,
) -> Result<(Vec<u8>, EventData), FilterError> {
    match mode {
        Incoming::Structured => {
            let mut event = parse_json(body)?;
            check_structured(&event)?;
            redact_event(rule, &mut event)?;
            *own = own_trace(&event);
            let bytes = to_json(&event)?;
            let data = match event.get_mut("data").map(Value::take) {
                Some(d) => EventData::Json(d),
                None => EventData::NotJson("the event has no JSON data"),
            };
            Ok((bytes, data))
        }
        _ if body.is_empty() => Ok((Vec::new(), EventData::NotJson("the request body is empty"))),
        _ if content_type.is_some_and(cloudevent::is_json) => {
            let mut data = parse_json(body)?;
            redact::apply(&mut data, &rule.redact, &rule.redaction_key);
            Ok((to_json(&data)?, EventData::Json(data)))
        }
        _ => Err(FilterError::InvalidJson {
            detail: format!(
                "rule '{}' redacts fields, so the body must be JSON (a JSON content-type)",
                rule.name
            ),
        }),
    }
}

/// Redacts a structured event's `data`; `data_base64` cannot be looked into, so it is refused.
fn redact_event(rule: &Rule, event: &mut Value) -> Result<(), FilterError> {
    if event.get("data_base64").is_some() {
        return Err(FilterError::InvalidCloudEvent {
            attribute: "data_base64",
            detail: format!(
                "rule '{}' redacts fields, so the event data must be JSON (`data`)",
                rule.name
            ),
        });
    }
    if let Some(data) = event.get_mut("data") {
        redact::apply(data, &rule.redact, &rule.redaction_key);
    }
    Ok(())
}

fn to_json(v: &Value) -> Result<Vec<u8>, FilterError> {
    serde_json::to_vec(v).map_err(|e| FilterError::InvalidJson {
        detail: e.to_string(),
    })
}

/// A batch goes to the sidecar as it came, checked there event by event. A key from the
/// request (header, path) keys every event; a key from the data cannot be one header, so
/// each event gets it as its `partitionkey` extension (CloudEvents Partitioning).
fn batch<'a>(
    rule: &'a Rule,
    req: &Request<'a>,
    mut h: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    trace: TraceParent,
) -> Result<Callout<'a>, FilterError> {
    h.push(("content-type".into(), cloudevent::BATCH.into()));
    let from_body = rule.key.as_ref().filter(|k| k.uses_body());
    if from_body.is_some() || !rule.redact.is_empty() {
        return Ok(Callout {
            headers: h,
            body: Cow::Owned(rewritten_batch(from_body, rule, req)?),
            id: None,
            trace,
        });
    }
    let body = match &rule.key {
        Some(src) => {
            let key = resolve(
                src,
                "partition key",
                rule,
                req,
                &EventData::NotJson("batch"),
            )?;
            h.push((
                KEY_HEADER.into(),
                owned(encode_header_value(key.as_bytes())),
            ));
            Cow::Borrowed(req.body)
        }
        None => Cow::Borrowed(req.body),
    };
    Ok(Callout {
        headers: h,
        body,
        id: None,
        trace,
    })
}

/// The batch with each event's data redacted (a redacting rule), then `partitionkey` set from
/// the data (`key` from the body), where the event has none.
fn rewritten_batch(
    key: Option<&ValueSource>,
    rule: &Rule,
    req: &Request<'_>,
) -> Result<Vec<u8>, FilterError> {
    let Value::Array(mut events) = parse_json(req.body)? else {
        return Err(FilterError::InvalidCloudEvent {
            attribute: "",
            detail: "a batch must be a JSON array of CloudEvents".into(),
        });
    };
    for (index, event) in events.iter_mut().enumerate() {
        let mut each = || {
            check_structured(event)?;
            if !rule.redact.is_empty() {
                redact_event(rule, event)?;
            }
            key.map_or(Ok(()), |src| key_event(event, src, rule, req))
        };
        each().map_err(|e| in_batch(e, index))?;
    }
    to_json(&Value::Array(events))
}

fn key_event(
    event: &mut Value,
    src: &ValueSource,
    rule: &Rule,
    req: &Request<'_>,
) -> Result<(), FilterError> {
    let Some(obj) = event.as_object_mut() else {
        return Ok(());
    };
    if obj.contains_key("partitionkey") {
        return Ok(());
    }
    // Taken out and put back so the data is not copied to be looked into.
    let data = match obj.remove("data") {
        Some(d) if !obj.contains_key("data_base64") => EventData::Json(d),
        _ => EventData::NotJson("the event has no JSON data"),
    };
    let key = resolve(src, "partition key", rule, req, &data).map(Cow::into_owned);
    if let EventData::Json(d) = data {
        obj.insert("data".into(), d);
    }
    obj.insert("partitionkey".into(), Value::String(key?));
    Ok(())
}

/// Names the event of a batch an error is about.
fn in_batch(e: FilterError, index: usize) -> FilterError {
    match e {
        FilterError::InvalidCloudEvent { attribute, detail } => FilterError::InvalidCloudEvent {
            attribute,
            detail: format!("event {index} of the batch: {detail}"),
        },
        FilterError::Unresolved {
            what,
            source,
            reason,
        } => FilterError::Unresolved {
            what,
            source,
            reason: format!("event {index} of the batch: {reason}"),
        },
        other => other,
    }
}

/// The headers of a batch callout for the events of `rule`.
pub fn batch_headers<'a>(rule: &'a Rule, sidecar: &'a Sidecar) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        (":method", "POST"),
        (":path", sidecar.path.as_str()),
        (":authority", sidecar.authority.as_str()),
        (":scheme", "http"),
        (TOPIC_HEADER, rule.topic.as_str()),
        ("content-type", cloudevent::BATCH),
    ];
    if let Some(a) = &sidecar.authorization {
        h.push(("authorization", a.as_str()));
    }
    h
}

/// The event of a binary-mode callout in the JSON event format, to go in a batch with
/// others (`coalesce`). Attributes come from the `ce-*` headers, `datacontenttype` from
/// `content-type`, `partitionkey` from the key header; JSON data stays the body's bytes,
/// other data goes as `data_base64`. `None` when a header value does not decode to text:
/// that event goes alone.
pub fn structured(c: &Callout<'_>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(c.body.len() + 320);
    out.push(b'{');
    let mut json_data = false;
    for (name, value) in &c.headers {
        let attr = if let Some(a) = name.strip_prefix("ce-") {
            a
        } else if name == "content-type" {
            json_data = cloudevent::is_json(value);
            "datacontenttype"
        } else if name == KEY_HEADER {
            "partitionkey"
        } else {
            continue;
        };
        if out.len() > 1 {
            out.push(b',');
        }
        json_string(&mut out, attr);
        out.push(b':');
        if name != "content-type" && value.bytes().any(|b| b == b'%' || b == b'"') {
            json_string(&mut out, &decode_header_value(value).ok()?);
        } else {
            json_string(&mut out, value);
        }
    }
    if !c.body.is_empty() {
        if json_data {
            // Checked to be JSON when the event was built (`EventData::of`).
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(&c.body);
        } else {
            out.extend_from_slice(b",\"data_base64\":\"");
            base64(&mut out, &c.body);
            out.push(b'"');
        }
    }
    out.push(b'}');
    Some(out)
}

fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn base64(out: &mut Vec<u8>, data: &[u8]) {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    out.reserve(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= chunk.len() {
                ABC[((n >> shift) & 63) as usize]
            } else {
                b'='
            });
        }
    }
}

/// The claims a rule copies from the JWT payload its proxy verified and forwards as base64url
/// JSON (Envoy `jwt_authn` `forward_payload_header`). Without the header, none: requiring a
/// token on the route is the proxy's job.
fn jwt_claims<'a>(
    jwt: &'a JwtPayload,
    req: &Request<'a>,
    h: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>,
) -> Result<(), FilterError> {
    let Some(raw) = req.header(&jwt.header) else {
        return Ok(());
    };
    let bad = |reason| FilterError::InvalidHeader {
        name: jwt.header.clone(),
        reason,
    };
    let bytes = base64url_decode(raw).ok_or_else(|| bad("not base64url"))?;
    let payload: Value = serde_json::from_slice(&bytes).map_err(|_| bad("not a JSON payload"))?;
    for (claim, ce_header) in &jwt.claims {
        let value = match payload.get(claim) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => encode_header_value(s.as_bytes()).into_owned(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            Some(_) => return Err(bad("a copied claim must be a string, number or boolean")),
        };
        h.push((ce_header.as_str().into(), Cow::Owned(value)));
    }
    Ok(())
}

/// Base64url with or without padding (RFC 4648 section 5); `None` on any other byte.
fn base64url_decode(text: &[u8]) -> Option<Vec<u8>> {
    let text = text
        .strip_suffix(b"==")
        .or(text.strip_suffix(b"="))
        .unwrap_or(text);
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn owned(c: Cow<'_, str>) -> Cow<'static, str> {
    Cow::Owned(c.into_owned())
}

/// The event data as JSON, parsed only when a JSON pointer needs it.
enum EventData {
    NotJson(&'static str),
    Json(Value),
    /// Valid JSON that no pointer looks into: checked without building a tree.
    Checked,
}

impl EventData {
    fn of(
        mode: Incoming,
        content_type: Option<&str>,
        body: &[u8],
        need_tree: bool,
        own: &mut Option<TraceParent>,
    ) -> Result<Self, FilterError> {
        match mode {
            Incoming::Structured => {
                let mut event: Value = parse_json(body)?;
                check_structured(&event)?;
                *own = own_trace(&event);
                match event.get_mut("data").map(Value::take) {
                    Some(data) if event.get("data_base64").is_none() => Ok(EventData::Json(data)),
                    _ => Ok(EventData::NotJson("the event has no JSON data")),
                }
            }
            Incoming::Batch => Ok(EventData::NotJson("batch")),
            Incoming::Plain | Incoming::Binary => {
                if body.is_empty() {
                    return Ok(EventData::NotJson("the request body is empty"));
                }
                match content_type {
                    Some(ct) if cloudevent::is_json(ct) && need_tree => {
                        Ok(EventData::Json(parse_json(body)?))
                    }
                    Some(ct) if cloudevent::is_json(ct) => {
                        serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(|e| {
                            FilterError::InvalidJson {
                                detail: e.to_string(),
                            }
                        })?;
                        Ok(EventData::Checked)
                    }
                    _ => Ok(EventData::NotJson("the content-type is not JSON")),
                }
            }
        }
    }
}

fn parse_json(body: &[u8]) -> Result<Value, FilterError> {
    serde_json::from_slice(body).map_err(|e| FilterError::InvalidJson {
        detail: e.to_string(),
    })
}

/// The filter checks only what it needs to route the event; the sidecar validates it fully.
fn check_structured(event: &Value) -> Result<(), FilterError> {
    let Some(obj) = event.as_object() else {
        return Err(FilterError::InvalidCloudEvent {
            attribute: "",
            detail: "a structured CloudEvent must be a JSON object".into(),
        });
    };
    if obj.get("specversion").and_then(Value::as_str) != Some(cloudevent::SPECVERSION) {
        return Err(FilterError::InvalidCloudEvent {
            attribute: "specversion",
            detail: "specversion must be \"1.0\"".into(),
        });
    }
    for attr in ["id", "source", "type"] {
        if obj
            .get(attr)
            .and_then(Value::as_str)
            .is_none_or(|s| s.is_empty())
        {
            return Err(FilterError::InvalidCloudEvent {
                attribute: attr,
                detail: format!("attribute {attr} must be a non-empty string"),
            });
        }
    }
    Ok(())
}

/// The client's binary-mode event goes on as it came; returns the trace context it carries.
fn forward_binary<'a>(
    req: &Request<'a>,
    h: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>,
) -> Result<Option<TraceParent>, FilterError> {
    if req.header("ce-specversion") != Some(cloudevent::SPECVERSION.as_bytes()) {
        return Err(FilterError::InvalidCloudEvent {
            attribute: "specversion",
            detail: "header ce-specversion must be 1.0".into(),
        });
    }
    for (header, attr) in [
        ("ce-id", "id"),
        ("ce-source", "source"),
        ("ce-type", "type"),
    ] {
        if req.header(header).is_none_or(<[u8]>::is_empty) {
            return Err(FilterError::InvalidCloudEvent {
                attribute: attr,
                detail: format!("header {header} is required and must not be empty"),
            });
        }
    }
    for (name, value) in req.headers {
        let is_ce = name.len() > 3 && name.as_bytes()[..3].eq_ignore_ascii_case(b"ce-");
        if is_ce || name.eq_ignore_ascii_case("content-type") {
            let v = std::str::from_utf8(value).map_err(|_| FilterError::InvalidHeader {
                name: name.clone(),
                reason: "value is not valid UTF-8",
            })?;
            h.push((Cow::Owned(name.to_ascii_lowercase()), Cow::Borrowed(v)));
        }
    }
    Ok(req.header("ce-traceparent").and_then(TraceParent::parse))
}

/// Builds a new event around a plain request; returns its id.
fn wrap<'a>(
    rule: &'a Rule,
    req: &Request<'a>,
    stamp: &Stamp,
    content_type: Option<&'a str>,
    data: &EventData,
    h: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>,
) -> Result<Cow<'a, str>, FilterError> {
    let id: Cow<'a, str> = match req.header("idempotency-key") {
        Some(raw) => match cloudevent::idempotency_id(raw) {
            Some(id) => owned(encode_header_value(id.as_bytes())),
            None => {
                return Err(FilterError::InvalidHeader {
                    name: "idempotency-key".into(),
                    reason: "must be 1 to 256 printable ASCII characters",
                });
            }
        },
        None => Cow::Owned(cloudevent::uuid_v4(stamp.random)),
    };
    h.push(("ce-specversion".into(), cloudevent::SPECVERSION.into()));
    h.push(("ce-id".into(), id.clone()));
    let source = match &rule.source {
        Some(s) => encode_header_value(s.as_bytes()),
        None => {
            let s = format!(
                "{}://{}{}",
                req.scheme,
                req.authority,
                strip_query(req.path)
            );
            owned(encode_header_value(s.as_bytes()))
        }
    };
    h.push(("ce-source".into(), source));
    h.push((
        "ce-type".into(),
        encode_header_value(rule.ce_type.as_bytes()),
    ));
    h.push((
        "ce-time".into(),
        cloudevent::rfc3339(stamp.now_nanos).into(),
    ));
    if let Some(schema) = &rule.dataschema {
        h.push((
            "ce-dataschema".into(),
            encode_header_value(schema.as_bytes()),
        ));
    }
    if let Some(src) = &rule.subject {
        let subject = resolve(src, "subject", rule, req, data)?;
        h.push((
            "ce-subject".into(),
            owned(encode_header_value(subject.as_bytes())),
        ));
    }
    // An empty body has no data, so no datacontenttype either.
    if let (Some(ct), false) = (content_type, req.body.is_empty()) {
        h.push(("content-type".into(), ct.into()));
    }
    for ext in &rule.extensions {
        if let Some(v) = req.header(&ext.header) {
            h.push((ext.ce_header.as_str().into(), encode_header_value(v)));
        }
    }
    if let Some(jwt) = &rule.jwt_payload {
        jwt_claims(jwt, req, h)?;
    }
    // The id may have been percent-encoded for the header; logs want the plain one.
    Ok(match cloudevent::percent_decode(&id) {
        Some(plain) => Cow::Owned(plain.into_owned()),
        None => id,
    })
}

fn resolve<'a>(
    src: &ValueSource,
    what: &'static str,
    rule: &Rule,
    req: &Request<'a>,
    data: &EventData,
) -> Result<Cow<'a, str>, FilterError> {
    let fail = |reason: String| FilterError::Unresolved {
        what,
        source: src.to_string(),
        reason,
    };
    match src {
        ValueSource::Header(name) => match req.header(name) {
            None => Err(fail("the header is missing".into())),
            Some([]) => Err(fail("the header is empty".into())),
            Some(v) => std::str::from_utf8(v)
                .map(Cow::Borrowed)
                .map_err(|_| fail("the value is not valid UTF-8".into())),
        },
        ValueSource::PathParam(name) => {
            let raw = rule
                .matcher
                .path
                .as_ref()
                .and_then(|p| p.capture(req.path, name))
                .ok_or_else(|| fail("the path does not match".into()))?;
            match cloudevent::percent_decode(raw) {
                Some(v) if !v.is_empty() => Ok(Cow::Owned(v.into_owned())),
                Some(_) => Err(fail("the segment is empty".into())),
                None => Err(fail(
                    "the segment is not valid percent-encoded UTF-8".into(),
                )),
            }
        }
        ValueSource::JsonPointer(ptr) => {
            let json = match data {
                EventData::Json(v) => v,
                EventData::NotJson(why) => return Err(fail(why.to_string())),
                EventData::Checked => return Err(fail("the body was not parsed".into())),
            };
            match json.pointer(ptr) {
                None => Err(fail("not found in the body".into())),
                Some(Value::String(s)) if s.is_empty() => Err(fail("the value is empty".into())),
                Some(Value::String(s)) => Ok(Cow::Owned(s.clone())),
                Some(Value::Number(n)) => Ok(Cow::Owned(n.to_string())),
                Some(other) => Err(fail(format!(
                    "must be a string or a number, found {}",
                    json_kind(other)
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn cfg(rule: &str) -> config::Config {
        let json = format!(r#"{{"rules":[{rule}]}}"#);
        match config::parse(json.as_bytes()) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn hdrs(list: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    const STAMP: Stamp = Stamp {
        now_nanos: 1_522_949_460_000_000_000,
        random: [7; 16],
        trace: [9; 24],
    };

    fn get<'c>(c: &'c Callout<'_>, name: &str) -> Option<&'c str> {
        c.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_ref())
    }

    const ORDERS: &str = r#"{"match":{"path":"/orders/{shop}"},"topic":"orders","type":"com.example.order.placed",
        "key":{"json_pointer":"/id"},"subject":{"path_param":"shop"},"extensions":{"x-tenant":"tenant"},
        "dataschema":"urn:eventwire:schema:order:v1"}"#;

    fn request<'a>(headers: &'a [(String, Vec<u8>)], body: &'a [u8]) -> Request<'a> {
        Request {
            scheme: "https",
            authority: "shop.example.com",
            path: "/orders/berlin%20mitte?x=1",
            headers,
            body,
        }
    }

    #[test]
    fn plain_json_request_becomes_a_binary_mode_event() {
        let c = cfg(ORDERS);
        let headers = hdrs(&[
            ("content-type", "application/json"),
            ("x-tenant", "acme corp"),
            ("authorization", "Bearer secret"),
        ]);
        let body = br#"{"id": 42, "total": 9.5}"#;
        let req = request(&headers, body);
        let out = match build(&c.rules[0], &c.sidecar, &req, &STAMP) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(get(&out, ":path"), Some("/v1/events"));
        assert_eq!(get(&out, ":authority"), Some("eventwire_sidecar"));
        assert_eq!(get(&out, "eventwire-topic"), Some("orders"));
        assert_eq!(get(&out, "eventwire-key"), Some("42"));
        assert_eq!(get(&out, "ce-specversion"), Some("1.0"));
        let id = get(&out, "ce-id").unwrap_or_default();
        assert_eq!(id, "07070707-0707-4707-8707-070707070707");
        assert_eq!(out.id.as_deref(), Some(id));
        assert_eq!(
            get(&out, "ce-source"),
            Some("https://shop.example.com/orders/berlin%2520mitte")
        );
        assert_eq!(get(&out, "ce-type"), Some("com.example.order.placed"));
        assert_eq!(get(&out, "ce-time"), Some("2018-04-05T17:31:00.000000Z"));
        assert_eq!(get(&out, "ce-subject"), Some("berlin%20mitte"));
        assert_eq!(
            get(&out, "ce-dataschema"),
            Some("urn:eventwire:schema:order:v1")
        );
        assert_eq!(get(&out, "ce-tenant"), Some("acme%20corp"));
        assert_eq!(get(&out, "content-type"), Some("application/json"));
        assert!(out.headers.iter().all(|(_, v)| !v.contains("secret")));
        assert_eq!(&out.body[..], &body[..]);
    }

    #[test]
    fn idempotency_key_becomes_the_id() {
        let c = cfg(r#"{"topic":"t","type":"x"}"#);
        let headers = hdrs(&[("Idempotency-Key", "\"order 7\"")]);
        let out = match build(&c.rules[0], &c.sidecar, &request(&headers, b""), &STAMP) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(get(&out, "ce-id"), Some("order%207"));
        assert_eq!(out.id.as_deref(), Some("order 7"));
        assert_eq!(get(&out, "content-type"), None);
        let bad = hdrs(&[("idempotency-key", "")]);
        let e = build(&c.rules[0], &c.sidecar, &request(&bad, b""), &STAMP).err();
        assert!(
            matches!(e, Some(FilterError::InvalidHeader { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn unresolvable_keys_are_400_naming_the_source() {
        let c = cfg(ORDERS);
        let json = hdrs(&[("content-type", "application/json")]);
        let text = hdrs(&[("content-type", "text/plain")]);
        for (headers, body, reason) in [
            (&json, &b"{\"id\": "[..], "EOF"),
            (&json, &b"{\"no\": 1}"[..], "not found in the body"),
            (&json, &b"{\"id\": {}}"[..], "found an object"),
            (&json, &b"{\"id\": \"\"}"[..], "empty"),
            (&json, &b""[..], "body is empty"),
            (&text, &b"id=1"[..], "not JSON"),
        ] {
            match build(&c.rules[0], &c.sidecar, &request(headers, body), &STAMP) {
                Ok(_) => panic!("accepted {body:?}"),
                Err(e) => {
                    assert_eq!(e.status(), 400);
                    assert!(e.to_string().contains(reason), "{e}");
                    if !matches!(e, FilterError::InvalidJson { .. }) {
                        assert!(e.to_string().contains("JSON pointer /id"), "{e}");
                    }
                }
            }
        }
    }

    #[test]
    fn invalid_json_is_refused_even_without_a_pointer() {
        let c = cfg(r#"{"topic":"t","type":"x"}"#);
        let json = hdrs(&[("content-type", "application/json")]);
        let e = build(&c.rules[0], &c.sidecar, &request(&json, b"{nope"), &STAMP).err();
        assert!(matches!(e, Some(FilterError::InvalidJson { .. })), "{e:?}");
        let ok = build(&c.rules[0], &c.sidecar, &request(&json, b"[1,2]"), &STAMP);
        assert!(ok.is_ok());
    }

    #[test]
    fn header_and_path_keys() {
        let c = cfg(
            r#"{"match":{"path":"/orders/{shop}"},"topic":"t","type":"x","key":{"header":"X-Order"}}"#,
        );
        let with = hdrs(&[("x-order", "o-1")]);
        let out = build(&c.rules[0], &c.sidecar, &request(&with, b""), &STAMP);
        assert_eq!(
            out.ok().as_ref().and_then(|o| get(o, "eventwire-key")),
            Some("o-1")
        );
        let e = build(&c.rules[0], &c.sidecar, &request(&[], b""), &STAMP).err();
        assert!(e.is_some_and(|e| {
            e.to_string()
                .contains("header x-order: the header is missing")
        }));
        let p = cfg(
            r#"{"match":{"path":"/orders/{shop}"},"topic":"t","type":"x","key":{"path_param":"shop"}}"#,
        );
        let out = build(&p.rules[0], &p.sidecar, &request(&[], b""), &STAMP);
        assert_eq!(
            out.ok().as_ref().and_then(|o| get(o, "eventwire-key")),
            Some("berlin%20mitte")
        );
    }

    #[test]
    fn binary_cloudevents_pass_through() {
        let c = cfg(r#"{"topic":"t","type":"ignored","extensions":{"x-tenant":"tenant"}}"#);
        let headers = hdrs(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "evt-1"),
            ("ce-source", "/mine"),
            ("ce-type", "com.mine"),
            ("CE-Custom", "v"),
            ("content-type", "text/plain"),
            ("x-tenant", "acme"),
        ]);
        let out = match build(&c.rules[0], &c.sidecar, &request(&headers, b"hi"), &STAMP) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(get(&out, "ce-id"), Some("evt-1"));
        assert_eq!(get(&out, "ce-type"), Some("com.mine"));
        assert_eq!(get(&out, "ce-custom"), Some("v"));
        assert_eq!(get(&out, "ce-tenant"), None);
        assert_eq!(get(&out, "ce-time"), None);
        assert_eq!(out.id, None);
        let missing = hdrs(&[("ce-specversion", "1.0"), ("ce-id", "x")]);
        let e = build(&c.rules[0], &c.sidecar, &request(&missing, b""), &STAMP).err();
        assert!(e.is_some_and(|e| e.to_string().contains("ce-source")));
        let wrong = hdrs(&[("ce-specversion", "0.3")]);
        let e = build(&c.rules[0], &c.sidecar, &request(&wrong, b""), &STAMP).err();
        assert!(matches!(e, Some(FilterError::InvalidCloudEvent { .. })));
    }

    /// The trace `STAMP` starts.
    const STARTED: &str = "00-09090909090909090909090909090909-0909090909090909-01";
    const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn built<'a>(c: &'a config::Config, req: &Request<'a>) -> Callout<'a> {
        match build(&c.rules[0], &c.sidecar, req, &STAMP) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn a_request_trace_becomes_the_events_and_goes_on_the_callout() {
        let c = cfg(r#"{"topic":"t","type":"x"}"#);
        let traced = hdrs(&[
            ("traceparent", INCOMING),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ]);
        let out = built(&c, &request(&traced, b""));
        assert_eq!(get(&out, "ce-traceparent"), Some(INCOMING));
        assert_eq!(get(&out, "ce-tracestate"), Some("rojo=00f067aa0ba902b7"));
        // The event carries it; the callout itself needs none.
        assert_eq!(get(&out, "traceparent"), None);
        // `%` and `"` are legal in tracestate and percent-encoded like every `ce-` value.
        let odd = hdrs(&[("traceparent", INCOMING), ("tracestate", "a=5%,b=\"q\"")]);
        let out = built(&c, &request(&odd, b""));
        assert_eq!(get(&out, "ce-tracestate"), Some("a=5%25,b=%22q%22"));
        assert_eq!(out.trace.as_str(), INCOMING);
        // Invalid or absent: a new trace, and a tracestate without its parent is dropped.
        for headers in [
            hdrs(&[("traceparent", "00-zz"), ("tracestate", "a=b")]),
            hdrs(&[]),
        ] {
            let out = built(&c, &request(&headers, b""));
            assert_eq!(get(&out, "ce-traceparent"), Some(STARTED));
            assert_eq!(get(&out, "ce-tracestate"), None);
            assert_eq!(out.trace.as_str(), STARTED);
        }
    }

    #[test]
    fn a_client_cloudevent_keeps_its_own_trace() {
        let c = cfg(r#"{"topic":"t","type":"x"}"#);
        let own = "00-11111111111111111111111111111111-2222222222222222-00";
        let binary = [
            ("ce-specversion", "1.0"),
            ("ce-id", "e"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ];
        let mut with_own = binary.to_vec();
        with_own.extend([("ce-traceparent", own), ("traceparent", INCOMING)]);
        let headers = hdrs(&with_own);
        let out = built(&c, &request(&headers, b""));
        let traceparents: Vec<_> = out
            .headers
            .iter()
            .filter(|(n, _)| n == "ce-traceparent")
            .collect();
        assert_eq!(traceparents.len(), 1);
        assert_eq!(get(&out, "ce-traceparent"), Some(own));
        assert_eq!(
            get(&out, "traceparent"),
            None,
            "its own is kept: nothing to give it"
        );
        assert_eq!(out.trace.as_str(), own);
        // Without a valid one it joins the request's trace: the sidecar gives it the
        // callout's, the client's headers go on as they came.
        let mut invalid = binary.to_vec();
        invalid.push(("ce-traceparent", "00-zz"));
        for list in [&binary[..], &invalid[..]] {
            let headers = hdrs(list);
            let out = built(&c, &request(&headers, b""));
            assert_eq!(get(&out, "traceparent"), Some(STARTED));
            let ce = list
                .iter()
                .find(|(n, _)| *n == "ce-traceparent")
                .map(|(_, v)| *v);
            assert_eq!(get(&out, "ce-traceparent"), ce);
            assert_eq!(out.trace.as_str(), STARTED);
        }
        // A batch's events keep theirs; the callout carries the request's for the rest.
        let headers = hdrs(&[
            ("content-type", "application/cloudevents-batch+json"),
            ("traceparent", INCOMING),
        ]);
        let body = br#"[{"specversion":"1.0","id":"e","source":"/s","type":"t"}]"#;
        let out = built(&c, &request(&headers, body));
        assert_eq!(&out.body[..], &body[..]);
        assert_eq!(get(&out, "traceparent"), Some(INCOMING));
        assert_eq!(get(&out, "ce-traceparent"), None);
    }

    #[test]
    fn structured_cloudevents_pass_through_with_key_from_data() {
        let c = cfg(r#"{"topic":"t","type":"x","key":{"json_pointer":"/order/id"}}"#);
        let headers = hdrs(&[("content-type", "application/cloudevents+json")]);
        let body = br#"{"specversion":"1.0","id":"e1","source":"/s","type":"t","data":{"order":{"id":"o-9"}}}"#;
        let out = match build(&c.rules[0], &c.sidecar, &request(&headers, body), &STAMP) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            get(&out, "content-type"),
            Some("application/cloudevents+json")
        );
        assert_eq!(get(&out, "eventwire-key"), Some("o-9"));
        assert_eq!(get(&out, "ce-id"), None);
        // The client's bytes go on untouched; the sidecar gives the event the callout's trace.
        assert_eq!(&out.body[..], &body[..]);
        assert_eq!(get(&out, "traceparent"), Some(STARTED));
        let own = br#"{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","specversion":"1.0","id":"e1","source":"/s","type":"t","data":{"order":{"id":"o-9"}}}"#;
        let out = match build(&c.rules[0], &c.sidecar, &request(&headers, own), &STAMP) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(&out.body[..], &own[..]);
        assert_eq!(out.trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for (bad, why) in [
            (
                &br#"{"specversion":"0.3","id":"e","source":"/s","type":"t"}"#[..],
                "specversion",
            ),
            (
                &br#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#[..],
                "id",
            ),
            (
                &br#"{"specversion":"1.0","id":"e","type":"t"}"#[..],
                "source",
            ),
            (&br#"[1]"#[..], "JSON object"),
        ] {
            let e = build(&c.rules[0], &c.sidecar, &request(&headers, bad), &STAMP).err();
            assert!(
                e.as_ref().is_some_and(|e| e.to_string().contains(why)),
                "{e:?}"
            );
        }
    }

    /// The callout for a batch request on the config's first rule.
    fn batch<'a>(
        c: &'a config::Config,
        headers: &'a [(String, Vec<u8>)],
        body: &'a [u8],
    ) -> Result<Callout<'a>, FilterError> {
        build(&c.rules[0], &c.sidecar, &request(headers, body), &STAMP)
    }

    #[test]
    fn batches_go_on_as_they_came_keyed_by_the_rule() {
        let batch_headers = hdrs(&[
            ("content-type", "application/cloudevents-batch+json"),
            ("x-tenant", "t1"),
        ]);
        let body = br#"[{"specversion":"1.0","id":"a","source":"/s","type":"t","data":{"id":"o1"}},
                       {"specversion":"1.0","id":"b","source":"/s","type":"t","partitionkey":"mine","data":{"id":"o2"}}]"#;
        let header_of = |c: &Callout<'_>, name: &str| {
            c.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_string())
        };
        let plain = cfg(r#"{"topic":"t","type":"x"}"#);
        let c = batch(&plain, &batch_headers, body).unwrap();
        assert!(matches!(c.body, Cow::Borrowed(b) if b == body));
        assert_eq!(
            header_of(&c, "content-type").as_deref(),
            Some("application/cloudevents-batch+json")
        );
        assert_eq!((header_of(&c, KEY_HEADER), c.id), (None, None));
        let by_header = cfg(r#"{"topic":"t","type":"x","key":{"header":"x-tenant"}}"#);
        let c = batch(&by_header, &batch_headers, body).unwrap();
        assert_eq!(header_of(&c, KEY_HEADER).as_deref(), Some("t1"));
        assert!(matches!(c.body, Cow::Borrowed(_)));
        let by_data = cfg(r#"{"topic":"t","type":"x","key":{"json_pointer":"/id"}}"#);
        let c = batch(&by_data, &batch_headers, body).unwrap();
        assert_eq!(header_of(&c, KEY_HEADER), None);
        let events: Value = serde_json::from_slice(&c.body).unwrap();
        assert_eq!(events[0]["partitionkey"], "o1");
        assert_eq!(events[0]["data"]["id"], "o1");
        assert_eq!(
            events[1]["partitionkey"], "mine",
            "an event's own key is kept"
        );
        let unkeyed =
            br#"[{"specversion":"1.0","id":"a","source":"/s","type":"t","data":{"id":"o1"}},
                          {"specversion":"1.0","id":"b","source":"/s","type":"t","data":{}}]"#;
        let e = batch(&by_data, &batch_headers, unkeyed).err();
        assert!(
            e.as_ref()
                .is_some_and(|e| e.to_string().contains("event 1 of the batch")),
            "{e:?}"
        );
        let e = batch(&by_data, &batch_headers, br#"{"id":"o1"}"#).err();
        assert!(matches!(e, Some(FilterError::InvalidCloudEvent { .. })));
    }

    #[test]
    fn events_turn_into_the_json_format_for_a_batch() {
        let c = cfg(ORDERS);
        let headers = hdrs(&[
            ("content-type", "application/json"),
            ("x-tenant", "acme \"corp\""),
        ]);
        let body = br#"{"id": 42, "total": 9.5}"#;
        let out = build(&c.rules[0], &c.sidecar, &request(&headers, body), &STAMP).unwrap();
        let event = structured(&out).unwrap();
        // The data's bytes stay as they were: no re-serialization.
        let text = String::from_utf8(event.clone()).unwrap();
        assert!(
            text.ends_with(r#","data":{"id": 42, "total": 9.5}}"#),
            "{text}"
        );
        let v: Value = serde_json::from_slice(&event).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], out.id.as_deref().unwrap());
        assert_eq!(
            v["source"],
            "https://shop.example.com/orders/berlin%20mitte"
        );
        assert_eq!(v["subject"], "berlin mitte");
        assert_eq!(v["tenant"], "acme \"corp\"", "percent-decoded");
        assert_eq!(v["partitionkey"], "42");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["time"], "2018-04-05T17:31:00.000000Z");
        for pseudo in [":path", "eventwire-topic", "eventwire-key", "path", "topic"] {
            assert!(v.get(pseudo).is_none(), "{pseudo} is not an attribute");
        }

        let c = cfg(r#"{"topic":"t","type":"x"}"#);
        for (body, b64) in [
            (&b"\x00\xffab"[..], "AP9hYg=="),
            (b"abc", "YWJj"),
            (b"a", "YQ=="),
        ] {
            let headers = hdrs(&[("content-type", "application/octet-stream")]);
            let out = build(&c.rules[0], &c.sidecar, &request(&headers, body), &STAMP).unwrap();
            let v: Value = serde_json::from_slice(&structured(&out).unwrap()).unwrap();
            assert_eq!(v["data_base64"], b64);
            assert!(v.get("data").is_none());
        }
        let out = build(&c.rules[0], &c.sidecar, &request(&[], b""), &STAMP).unwrap();
        let v: Value = serde_json::from_slice(&structured(&out).unwrap()).unwrap();
        assert!(v.get("data").is_none() && v.get("data_base64").is_none());
    }

    /// A rule that drops, masks and hashes, keyed by the hashed email.
    fn redacting() -> config::Config {
        let json = r#"{"redaction_key":{"value":"redaction-key-0123456789"},"rules":[{"topic":"orders",
            "type":"t","key":{"json_pointer":"/email"},"redact":[{"pointer":"/card","action":"drop"},
            {"pointer":"/cvv","action":"mask"},{"pointer":"/email","action":"hash"}]}]}"#;
        let mut c = config::parse(json.as_bytes()).unwrap();
        c.rules[0].redaction_key = b"redaction-key-0123456789".to_vec();
        c
    }

    #[test]
    fn redaction_takes_fields_out_of_the_event_and_its_key() {
        let c = redacting();
        let email_hash = redact::hash(
            &serde_json::json!("a@example.com"),
            b"redaction-key-0123456789",
        );
        let json = hdrs(&[("content-type", "application/json")]);
        let body = br#"{"id":"o-1","card":"4111 1111","cvv":"123","email":"a@example.com"}"#;
        let out = build(&c.rules[0], &c.sidecar, &request(&json, body), &STAMP).unwrap();
        let data: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(
            data,
            serde_json::json!({"id":"o-1","cvv":"***","email": email_hash})
        );
        assert_eq!(
            get(&out, KEY_HEADER),
            Some(email_hash.as_str()),
            "the key is the hash"
        );

        // Structured events and batches are redacted inside `data`.
        let ce = hdrs(&[("content-type", cloudevent::STRUCTURED)]);
        let event = br#"{"specversion":"1.0","id":"e1","source":"/s","type":"t","data":{"card":"4111","email":"a@example.com"}}"#;
        let out = build(&c.rules[0], &c.sidecar, &request(&ce, event), &STAMP).unwrap();
        let v: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(v["data"], serde_json::json!({"email": email_hash}));
        assert_eq!(v["id"], "e1");
        let batch = hdrs(&[("content-type", cloudevent::BATCH)]);
        let events = format!("[{}]", String::from_utf8_lossy(event));
        let out = build(
            &c.rules[0],
            &c.sidecar,
            &request(&batch, events.as_bytes()),
            &STAMP,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(v[0]["data"], serde_json::json!({"email": email_hash}));
        assert_eq!(v[0]["partitionkey"], email_hash.as_str());

        // What cannot be looked into is refused, never published whole.
        let text = hdrs(&[("content-type", "text/plain")]);
        let e = build(
            &c.rules[0],
            &c.sidecar,
            &request(&text, b"card 4111"),
            &STAMP,
        )
        .err();
        assert!(matches!(e, Some(FilterError::InvalidJson { .. })), "{e:?}");
        let b64 =
            br#"{"specversion":"1.0","id":"e1","source":"/s","type":"t","data_base64":"eA=="}"#;
        let e = build(&c.rules[0], &c.sidecar, &request(&ce, b64), &STAMP).err();
        assert!(
            matches!(
                e,
                Some(FilterError::InvalidCloudEvent {
                    attribute: "data_base64",
                    ..
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn claims_of_the_forwarded_jwt_payload_become_extensions() {
        let c = cfg(
            r#"{"topic":"orders","type":"t","extensions":{"x-tenant":"tenant"},
              "jwt_payload":{"header":"x-jwt-payload","claims":{"sub":"principal","tier":"tier","roles":"roles"}}}"#,
        );
        // {"sub":"user 7","tier":3,"iss":"x"}, base64url without padding, as Envoy forwards it.
        let payload = "eyJzdWIiOiJ1c2VyIDciLCJ0aWVyIjozLCJpc3MiOiJ4In0";
        assert_eq!(
            base64url_decode(payload.as_bytes()).as_deref(),
            Some(&br#"{"sub":"user 7","tier":3,"iss":"x"}"#[..])
        );
        let headers = hdrs(&[
            ("x-jwt-payload", payload),
            ("content-type", "application/json"),
        ]);
        let out = build(&c.rules[0], &c.sidecar, &request(&headers, b"{}"), &STAMP).unwrap();
        assert_eq!(get(&out, "ce-principal"), Some("user%207"));
        assert_eq!(get(&out, "ce-tier"), Some("3"));
        assert_eq!(get(&out, "ce-roles"), None, "a claim the payload lacks");
        let none = hdrs(&[("content-type", "application/json")]);
        let out = build(&c.rules[0], &c.sidecar, &request(&none, b"{}"), &STAMP).unwrap();
        assert_eq!(
            get(&out, "ce-principal"),
            None,
            "no payload header, no claims"
        );
        for bad in ["not base64!", "bm90IGpzb24", "eyJyb2xlcyI6WyJhIl19"] {
            let headers = hdrs(&[("x-jwt-payload", bad)]);
            let e = build(&c.rules[0], &c.sidecar, &request(&headers, b""), &STAMP).err();
            assert!(
                matches!(e, Some(FilterError::InvalidHeader { .. })),
                "{bad}: {e:?}"
            );
        }
    }
}
