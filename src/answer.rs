//! Judging the sidecar's answer to the ingest callout, host-free.

use crate::cloudevent;
use eventwire_contract::problem;
use std::borrow::Cow;

/// The sidecar's answer as far as the filter reads it: from the callout (`Stream`), or one
/// event's share of a batch answer (`coalesce::split`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Answer<'a> {
    /// `None`: the callout came back without headers.
    pub status: Option<u16>,
    pub content_type: Option<Cow<'a, [u8]>>,
    /// Kong's `:dispatch_status` on a failure without headers.
    pub dispatch_status: Option<Cow<'a, [u8]>>,
    pub retry_after: Option<Cow<'a, [u8]>>,
    pub location: Option<Cow<'a, [u8]>>,
    pub body: Cow<'a, [u8]>,
}

impl Answer<'_> {
    pub fn is_problem(&self) -> bool {
        is_problem(self.content_type.as_deref())
    }

    pub fn verdict(&self, timeout_ms: u64) -> Verdict {
        verdict(
            self.status,
            self.content_type.as_deref(),
            self.dispatch_status.as_deref(),
            timeout_ms,
        )
    }
}

fn is_problem(content_type: Option<&[u8]>) -> bool {
    content_type.is_some_and(|ct| {
        std::str::from_utf8(ct)
            .map(|ct| cloudevent::media_type(ct).eq_ignore_ascii_case(problem::CONTENT_TYPE))
            .unwrap_or(false)
    })
}

/// How the sidecar's answer to the callout turns out for the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: the event is durable (for a batch's 207, some of them); relay the sidecar's
    /// status and JSON body.
    Accepted { status: u16 },
    /// The sidecar's own problem+json refusal (bad event, unknown topic, backpressure):
    /// relay status, body and `Retry-After` as they are.
    Refused { status: u16 },
    /// No answer from the sidecar itself: unreachable, reset or timed out.
    Unavailable { detail: String },
}

/// `status` is `None` when the callout came back without headers (Kong's failures, resets);
/// Envoy synthesizes 503/504 replies for connect failures and timeouts instead, which carry
/// no problem+json and so land here as `Unavailable` too.
pub fn verdict(
    status: Option<u16>,
    content_type: Option<&[u8]>,
    dispatch_status: Option<&[u8]>,
    timeout_ms: u64,
) -> Verdict {
    let is_problem = is_problem(content_type);
    match status {
        Some(s @ 200..=299) => Verdict::Accepted { status: s },
        // The filter's own credentials, not the client's: the proxy is misconfigured.
        Some(401) => Verdict::Unavailable {
            detail: "the event sidecar refused the filter's credentials (check sidecar.secret \
                     against the sidecar's --ingest-secret-file)"
                .into(),
        },
        Some(s @ 400..=599) if is_problem => Verdict::Refused { status: s },
        Some(504) => Verdict::Unavailable {
            detail: format!("the event sidecar did not answer within {timeout_ms} ms"),
        },
        Some(s) => Verdict::Unavailable {
            detail: format!("the event sidecar could not be reached (status {s})"),
        },
        None => Verdict::Unavailable {
            detail: match dispatch_status.map(String::from_utf8_lossy) {
                Some(why) => format!("the event sidecar could not be reached ({why})"),
                None => "the event sidecar could not be reached".into(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn verdicts() {
        assert_eq!(
            verdict(Some(202), None, None, 5),
            Verdict::Accepted { status: 202 }
        );
        assert_eq!(
            verdict(Some(207), None, None, 5),
            Verdict::Accepted { status: 207 }
        );
        assert_eq!(
            verdict(Some(404), Some(b"application/problem+json"), None, 5),
            Verdict::Refused { status: 404 }
        );
        match verdict(Some(401), Some(b"application/problem+json"), None, 5) {
            Verdict::Unavailable { detail } => assert!(detail.contains("sidecar.secret")),
            v => panic!("a 401 is the proxy's misconfiguration, not the client's: {v:?}"),
        }
        // Envoy's synthesized replies carry no problem+json.
        assert!(matches!(
            verdict(Some(503), Some(b"text/plain"), None, 5),
            Verdict::Unavailable { .. }
        ));
        match verdict(Some(504), Some(b"text/plain"), None, 250) {
            Verdict::Unavailable { detail } => assert!(detail.contains("250 ms")),
            v => panic!("{v:?}"),
        }
        match verdict(None, None, Some(b"broken connection"), 5) {
            Verdict::Unavailable { detail } => assert!(detail.contains("broken connection")),
            v => panic!("{v:?}"),
        }
    }
}
