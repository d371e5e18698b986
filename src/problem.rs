//! The filter's own error answers, as `application/problem+json` local replies in the
//! contract's one problem style (the same the sidecar answers with).

use eventwire_contract::problem::{Kind, Problem};
use std::fmt;

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
    SidecarUnavailable {
        detail: String,
    },
    /// The proxy failed a call the filter needs, e.g. did not hand over the body it
    /// announced (on Kong: a body spilled to a temporary file, see
    /// `nginx_http_client_body_buffer_size`).
    ProxyFailure {
        detail: String,
    },
    /// `after_upstream`: the upstream's answer lacks what the event takes from it (the
    /// partition key, a JSON body).
    UnusableAnswer {
        detail: String,
    },
}

/// Why a request could not be published, for the passthrough policy and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Bad data for an event: the client's to fix.
    Request,
    /// The sidecar or the proxy failed: not the client's fault, and the upstream may still
    /// serve the request.
    Infrastructure,
}

impl FilterError {
    pub fn kind(&self) -> Kind {
        match self {
            FilterError::BodyTooLarge { .. } => Kind::BodyTooLarge,
            FilterError::InvalidJson { .. } => Kind::InvalidJson,
            FilterError::Unresolved { .. } => Kind::UnresolvedValue,
            FilterError::InvalidHeader { .. } => Kind::InvalidHeader,
            FilterError::InvalidCloudEvent { .. } => Kind::InvalidCloudEvent,
            FilterError::SidecarUnavailable { .. } => Kind::SidecarUnavailable,
            FilterError::ProxyFailure { .. } => Kind::ProxyFailure,
            FilterError::UnusableAnswer { .. } => Kind::UnusableAnswer,
        }
    }

    pub fn status(&self) -> u16 {
        self.kind().status()
    }

    pub fn cause(&self) -> Cause {
        match self {
            FilterError::SidecarUnavailable { .. }
            | FilterError::ProxyFailure { .. }
            | FilterError::UnusableAnswer { .. } => Cause::Infrastructure,
            _ => Cause::Request,
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

    pub fn body(&self) -> Vec<u8> {
        let detail = self.to_string();
        Problem::new(self.kind(), &detail)
            .attribute(self.attribute())
            .to_json()
    }
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
            FilterError::SidecarUnavailable { detail }
            | FilterError::ProxyFailure { detail }
            | FilterError::UnusableAnswer { detail } => f.write_str(detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn body(e: &FilterError) -> Value {
        match serde_json::from_slice(&e.body()) {
            Ok(v) => v,
            Err(err) => panic!("{e:?}: the body is not JSON: {err}"),
        }
    }

    #[test]
    fn problem_body_is_rfc9457() {
        let e = FilterError::Unresolved {
            what: "partition key",
            source: "JSON pointer /id".into(),
            reason: "not found in the body".into(),
        };
        assert_eq!(
            body(&e),
            json!({
                "type": "urn:eventwire:problem:unresolved-value",
                "title": "Required value missing from the request",
                "status": 400,
                "detail": "partition key from JSON pointer /id: not found in the body",
                "attribute": "partitionkey",
            })
        );
        assert_eq!(e.cause(), Cause::Request);
        let down = FilterError::SidecarUnavailable { detail: "x".into() };
        let v = body(&down);
        assert_eq!(v["status"], 503);
        assert_eq!(v["type"], "urn:eventwire:problem:sidecar-unavailable");
        assert!(v.get("attribute").is_none(), "{v}");
        assert_eq!(down.kind().retry_after(), Some("1"));
        assert_eq!(down.cause(), Cause::Infrastructure);
        assert_eq!(FilterError::BodyTooLarge { limit: 1 }.status(), 413);
        let spilled = FilterError::ProxyFailure { detail: "y".into() };
        assert_eq!(
            (spilled.status(), spilled.cause()),
            (500, Cause::Infrastructure)
        );
    }
}
