//! The filter's own error answers, as RFC 9457 `application/problem+json` local replies.

use serde::Serialize;
use std::fmt;

pub const PROBLEM_JSON: &str = "application/problem+json";
/// Seconds a client should wait before retrying a 503; a sidecar restart takes about this long.
pub const RETRY_AFTER_SECONDS: &str = "1";

/// Everything that stops a request on an enabled route before the sidecar accepted its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterError {
    BodyTooLarge {
        limit: usize,
    },
    InvalidJson {
        detail: String,
    },
    /// A partition key or subject that the rule asks for cannot be taken from the request.
    Unresolved {
        what: &'static str,
        source: String,
        reason: String,
    },
    InvalidHeader {
        name: String,
        reason: &'static str,
    },
    InvalidCloudEvent {
        /// The attribute at fault (empty when it is the event as a whole).
        attribute: &'static str,
        detail: String,
    },
    BatchUnsupported,
    SidecarUnavailable {
        detail: String,
    },
}

impl FilterError {
    pub fn status(&self) -> u32 {
        match self {
            FilterError::BodyTooLarge { .. } => 413,
            FilterError::BatchUnsupported => 415,
            FilterError::SidecarUnavailable { .. } => 503,
            _ => 400,
        }
    }

    pub fn slug(&self) -> &'static str {
        match self {
            FilterError::BodyTooLarge { .. } => "body-too-large",
            FilterError::InvalidJson { .. } => "invalid-json",
            FilterError::Unresolved { .. } => "unresolved-value",
            FilterError::InvalidHeader { .. } => "invalid-header",
            FilterError::InvalidCloudEvent { .. } => "invalid-cloudevent",
            FilterError::BatchUnsupported => "batch-unsupported",
            FilterError::SidecarUnavailable { .. } => "sidecar-unavailable",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            FilterError::BodyTooLarge { .. } => "Request body too large",
            FilterError::InvalidJson { .. } => "Request body is not valid JSON",
            FilterError::Unresolved { .. } => "Required value missing from the request",
            FilterError::InvalidHeader { .. } => "Invalid request header",
            FilterError::InvalidCloudEvent { .. } => "Invalid CloudEvent",
            FilterError::BatchUnsupported => "CloudEvents batch mode is not supported",
            FilterError::SidecarUnavailable { .. } => "Event publishing is unavailable",
        }
    }

    pub fn retry_after(&self) -> Option<&'static str> {
        match self {
            FilterError::SidecarUnavailable { .. } => Some(RETRY_AFTER_SECONDS),
            _ => None,
        }
    }

    /// The CloudEvents attribute or request header at fault, named as the sidecar names it.
    pub fn attribute(&self) -> Option<&str> {
        match self {
            FilterError::InvalidHeader { name, .. } => Some(name),
            FilterError::InvalidCloudEvent { attribute, .. } if !attribute.is_empty() => {
                Some(attribute)
            }
            FilterError::Unresolved { what, .. } => Some(match *what {
                "subject" => "subject",
                _ => "partitionkey",
            }),
            _ => None,
        }
    }

    /// The problem+json body. Serializing a struct of plain strings cannot fail.
    pub fn body(&self) -> Vec<u8> {
        let detail = self.to_string();
        let problem = Problem {
            r#type: problem_type(self.slug()),
            title: self.title(),
            status: self.status(),
            detail: &detail,
            attribute: self.attribute(),
        };
        serde_json::to_vec(&problem).unwrap_or_default()
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    r#type: String,
    title: &'a str,
    status: u32,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    attribute: Option<&'a str>,
}

pub fn problem_type(slug: &str) -> String {
    format!("urn:eventwire:problem:{slug}")
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FilterError::BodyTooLarge { limit } => {
                write!(f, "the request body exceeds the limit of {limit} bytes")
            }
            FilterError::InvalidJson { detail } => write!(f, "request body: {detail}"),
            FilterError::Unresolved {
                what,
                source,
                reason,
            } => write!(f, "{what} from {source}: {reason}"),
            FilterError::InvalidHeader { name, reason } => write!(f, "header {name}: {reason}"),
            FilterError::InvalidCloudEvent { detail, .. } => f.write_str(detail),
            FilterError::BatchUnsupported => f.write_str(
                "send one event per request (application/cloudevents+json or binary mode)",
            ),
            FilterError::SidecarUnavailable { detail } => f.write_str(detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn problem_body_is_rfc9457() {
        let e = FilterError::Unresolved {
            what: "partition key",
            source: "JSON pointer /id".into(),
            reason: "not found in the body".into(),
        };
        let v: serde_json::Value = match serde_json::from_slice(&e.body()) {
            Ok(v) => v,
            Err(err) => panic!("{err}"),
        };
        assert_eq!(v["type"], "urn:eventwire:problem:unresolved-value");
        assert_eq!(v["status"], 400);
        assert_eq!(
            v["detail"],
            "partition key from JSON pointer /id: not found in the body"
        );
        assert_eq!(v["attribute"], "partitionkey");
        assert_eq!(e.retry_after(), None);
        let down = FilterError::SidecarUnavailable { detail: "x".into() };
        assert_eq!(down.status(), 503);
        assert_eq!(down.retry_after(), Some("1"));
        let down_body: serde_json::Value = serde_json::from_slice(&down.body()).unwrap_or_default();
        assert!(down_body.get("attribute").is_none());
        assert_eq!(FilterError::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(FilterError::BatchUnsupported.status(), 415);
    }
}
