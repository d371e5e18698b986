//! Every refusal either side answers, as RFC 9457 `application/problem+json`.
//!
//! The filter relays the sidecar's problems verbatim, so a client sees one style whichever
//! side refused: `type` is `urn:eventwire:problem:<slug>` with a stable slug per [`Kind`],
//! `status` is the HTTP status, `attribute` names the CloudEvents attribute or header at
//! fault and `parameter` the query parameter. Every 503 is transient and carries
//! `Retry-After`.

use serde::{Serialize, Serializer};

pub const CONTENT_TYPE: &str = "application/problem+json";
pub const TYPE_PREFIX: &str = "urn:eventwire:problem:";
/// Seconds a client should wait before retrying a 503; a sidecar restart takes about this long.
pub const RETRY_AFTER_SECONDS: &str = "1";

macro_rules! kinds {
    ($($kind:ident = $status:literal, $slug:literal, $title:literal;)*) => {
        /// One row per way a request can be refused, by the filter or the sidecar.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Kind { $($kind,)* }

        impl Kind {
            pub const ALL: &'static [Kind] = &[$(Kind::$kind,)*];

            pub const fn status(self) -> u16 {
                match self { $(Kind::$kind => $status,)* }
            }

            pub const fn slug(self) -> &'static str {
                match self { $(Kind::$kind => $slug,)* }
            }

            pub const fn title(self) -> &'static str {
                match self { $(Kind::$kind => $title,)* }
            }
        }
    };
}

kinds! {
    // The request on an enabled route (filter) or the event (sidecar).
    BodyTooLarge = 413, "body-too-large", "Request body too large";
    InvalidBody = 400, "invalid-body", "Request body could not be read";
    ProxyFailure = 500, "proxy-failure", "The proxy failed the filter";
    InvalidJson = 400, "invalid-json", "Request body is not valid JSON";
    InvalidHeader = 400, "invalid-header", "Invalid request header";
    InvalidCloudEvent = 400, "invalid-cloudevent", "Invalid CloudEvent";
    NotACloudEvent = 415, "not-a-cloudevent", "Not a CloudEvent";
    BatchTooLarge = 413, "batch-too-large", "Too many events in one batch";
    UnresolvedValue = 400, "unresolved-value", "Required value missing from the request";
    InvalidData = 400, "invalid-data", "Event data does not match its schema";
    // Where the event goes.
    MissingTopic = 400, "missing-topic", "Missing topic";
    InvalidTopic = 400, "invalid-topic", "Invalid topic";
    UnknownTopic = 404, "unknown-topic", "Unknown topic";
    // Who may publish, subscribe or read an event's status.
    Unauthorized = 401, "unauthorized", "Credentials missing or not accepted";
    ForbiddenTopic = 403, "forbidden-topic", "Topic not allowed for these credentials";
    // Durability and idempotency.
    IdempotencyConflict = 409, "idempotency-conflict", "Event id reused with another payload";
    BrokerRefused = 422, "broker-refused", "Refused by the broker";
    BrokerUnavailable = 503, "broker-unavailable", "Kafka is unavailable";
    SpoolFull = 503, "spool-full", "Spool full";
    SidecarUnavailable = 503, "sidecar-unavailable", "Event publishing is unavailable";
    UnusableAnswer = 502, "unusable-upstream-answer", "The upstream's answer cannot make the event";
    NotReady = 503, "not-ready", "Not ready";
    UnknownEvent = 404, "unknown-event", "Unknown event";
    // Subscriptions (push side).
    InvalidQuery = 400, "invalid-query", "Invalid query string";
    InvalidFrom = 400, "invalid-from", "Invalid start position";
    InvalidFilter = 400, "invalid-filter", "Invalid filter";
    TooManySubscribers = 503, "too-many-subscribers", "Too many subscribers";
    SubscriptionQuota = 429, "subscription-quota", "Too many subscriptions for this token or client";
    TooManyReplays = 503, "too-many-replays", "Too many replays";
    TransportRequired = 426, "transport-required", "Upgrade required";
    // Plain HTTP.
    NotFound = 404, "not-found", "Not found";
    MethodNotAllowed = 405, "method-not-allowed", "Method not allowed";
}

impl Kind {
    /// `Retry-After` for the transient ones (every 503).
    pub const fn retry_after(self) -> Option<&'static str> {
        if self.status() == 503 {
            Some(RETRY_AFTER_SECONDS)
        } else {
            None
        }
    }
}

/// The problem+json body; field order is the wire order.
#[derive(Debug, Clone, Serialize)]
pub struct Problem<'a> {
    #[serde(rename = "type", serialize_with = "type_uri")]
    pub kind: Kind,
    pub title: &'static str,
    pub status: u16,
    pub detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribute: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<&'a str>,
    /// The position (from 0) of the event at fault in a batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

fn type_uri<S: Serializer>(kind: &Kind, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{TYPE_PREFIX}{}", kind.slug()))
}

impl<'a> Problem<'a> {
    pub fn new(kind: Kind, detail: &'a str) -> Self {
        Problem {
            kind,
            title: kind.title(),
            status: kind.status(),
            detail,
            attribute: None,
            parameter: None,
            index: None,
        }
    }

    /// The CloudEvents attribute or HTTP header at fault.
    pub fn attribute(mut self, attribute: Option<&'a str>) -> Self {
        self.attribute = attribute;
        self
    }

    /// The query parameter at fault.
    pub fn parameter(mut self, parameter: Option<&'a str>) -> Self {
        self.parameter = parameter;
        self
    }

    /// The event at fault in a batch.
    pub fn index(mut self, index: Option<usize>) -> Self {
        self.index = index;
        self
    }

    /// The body. A struct of plain strings always serializes; the fallback is never taken.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn body_is_rfc9457_in_wire_order() {
        let p =
            Problem::new(Kind::InvalidCloudEvent, "attribute `time`: bad").attribute(Some("time"));
        let text = match String::from_utf8(p.to_json()) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            text,
            r#"{"type":"urn:eventwire:problem:invalid-cloudevent","title":"Invalid CloudEvent","status":400,"detail":"attribute `time`: bad","attribute":"time"}"#
        );
        let q: Value = match serde_json::from_slice(
            &Problem::new(Kind::InvalidFrom, "x")
                .parameter(Some("from"))
                .to_json(),
        ) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            q,
            json!({"type": "urn:eventwire:problem:invalid-from", "title": "Invalid start position",
                   "status": 400, "detail": "x", "parameter": "from"})
        );
    }

    #[test]
    fn slugs_are_unique_and_503s_retry() {
        for (i, a) in Kind::ALL.iter().enumerate() {
            assert!(
                a.slug()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{a:?}"
            );
            assert!((400..600).contains(&a.status()), "{a:?}");
            assert_eq!(a.retry_after().is_some(), a.status() == 503, "{a:?}");
            for b in &Kind::ALL[i + 1..] {
                assert_ne!(a.slug(), b.slug());
            }
        }
        assert_eq!(Kind::ALL.len(), 32);
        assert_eq!(Kind::SpoolFull.retry_after(), Some("1"));
        assert_eq!(Kind::BodyTooLarge.retry_after(), None);
    }
}
