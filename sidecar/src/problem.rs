//! The one place a refusal becomes an HTTP answer: RFC 9457 `application/problem+json` from
//! the contract's [`Kind`] table, with the headers its status calls for (`Retry-After` on a
//! 503, `Allow` on a 405, `Upgrade: websocket` on a 426). Errors only say which kind they
//! are and what is at fault; they never build a response themselves.

use std::fmt;
use std::future::Ready;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use eventwire_contract::problem::{CONTENT_TYPE, Kind, Problem};
use thiserror::Error;

/// An error that can be answered as a problem; its `Display` is the `detail`.
pub trait ProblemSource: fmt::Display {
    fn kind(&self) -> Kind;
    /// The CloudEvents attribute or HTTP header at fault.
    fn attribute(&self) -> Option<&str> {
        None
    }
    /// The query parameter (or request header standing in for one) at fault.
    fn parameter(&self) -> Option<&str> {
        None
    }
    /// The position of the event at fault in a batch.
    fn index(&self) -> Option<usize> {
        None
    }
    /// The methods the resource supports, for a 405's `Allow` (RFC 9110 requires it).
    fn allow(&self) -> Option<&'static str> {
        None
    }
    /// Extra problem members (RFC 9457 extensions), e.g. `errors` of a schema check.
    fn errors(&self) -> Option<serde_json::Value> {
        None
    }
    /// The `WWW-Authenticate` challenge of a 401: which credentials the resource wants.
    fn challenge(&self) -> &'static str {
        "Bearer realm=\"eventwire-ingest\""
    }
}

/// Renders any problem source: the body, its content type and the headers its kind needs.
pub fn response(source: &impl ProblemSource) -> Response {
    let kind = source.kind();
    let detail = source.to_string();
    let problem = Problem::new(kind, &detail)
        .attribute(source.attribute())
        .parameter(source.parameter())
        .index(source.index());
    let body = match source.errors() {
        None => problem.to_json(),
        Some(errors) => with_errors(&problem, errors).to_string().into_bytes(),
    };
    let status = StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, body).into_response();
    add_headers(response.headers_mut(), source);
    response
}

/// The problem body alone, for an answer that reports several (a batch's 207).
pub fn value(source: &impl ProblemSource) -> serde_json::Value {
    let detail = source.to_string();
    let problem = Problem::new(source.kind(), &detail)
        .attribute(source.attribute())
        .parameter(source.parameter())
        .index(source.index());
    match source.errors() {
        None => serde_json::to_value(problem).unwrap_or_default(),
        Some(errors) => with_errors(&problem, errors),
    }
}

fn with_errors(problem: &Problem<'_>, errors: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::to_value(problem).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        map.insert("errors".into(), errors);
    }
    v
}

fn add_headers(headers: &mut HeaderMap, source: &impl ProblemSource) {
    let kind = source.kind();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    if let Some(seconds) = kind.retry_after() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
    }
    match (kind, source.allow()) {
        (Kind::MethodNotAllowed, Some(methods)) => {
            headers.insert(header::ALLOW, HeaderValue::from_static(methods));
        }
        (Kind::TransportRequired, _) => {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        (Kind::Unauthorized, _) => {
            let challenge = HeaderValue::from_static(source.challenge());
            headers.insert(header::WWW_AUTHENTICATE, challenge);
        }
        _ => {}
    }
}

/// Refusals of the routing itself, the same on every route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RouteError {
    #[error("no such resource")]
    NotFound,
    /// With the methods the resource does support, when the route knows them.
    #[error("method not allowed for this resource")]
    MethodNotAllowed(Option<&'static str>),
}

impl ProblemSource for RouteError {
    fn kind(&self) -> Kind {
        match self {
            RouteError::NotFound => Kind::NotFound,
            RouteError::MethodNotAllowed(_) => Kind::MethodNotAllowed,
        }
    }

    fn allow(&self) -> Option<&'static str> {
        match self {
            RouteError::MethodNotAllowed(allow) => *allow,
            RouteError::NotFound => None,
        }
    }
}

impl IntoResponse for RouteError {
    fn into_response(self) -> Response {
        response(&self)
    }
}

/// A route's method fallback: only the route knows its methods, so each passes them
/// (`get(h).fallback(problem::allow("GET, HEAD"))`).
pub fn allow(
    methods: &'static str,
) -> impl Fn() -> Ready<Response> + Clone + Send + Sync + 'static {
    move || std::future::ready(RouteError::MethodNotAllowed(Some(methods)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;
    use serde_json::{Value, json};

    struct Fault(Kind, Option<&'static str>, Option<&'static str>);

    impl fmt::Display for Fault {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("what went wrong")
        }
    }

    impl ProblemSource for Fault {
        fn kind(&self) -> Kind {
            self.0
        }
        fn attribute(&self) -> Option<&str> {
            self.1
        }
        fn parameter(&self) -> Option<&str> {
            self.2
        }
    }

    async fn body(r: Response) -> Value {
        let bytes = to_bytes(r.into_body(), usize::MAX).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn problem_json_shape() {
        let r = response(&Fault(Kind::InvalidCloudEvent, Some("time"), None));
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            body(r).await,
            json!({
                "type": "urn:eventwire:problem:invalid-cloudevent",
                "title": "Invalid CloudEvent",
                "status": 400,
                "detail": "what went wrong",
                "attribute": "time",
            })
        );
        let r = response(&Fault(Kind::InvalidFrom, None, Some("from")));
        let v = body(r).await;
        assert_eq!(v["parameter"], "from");
        assert!(v.get("attribute").is_none(), "{v}");
    }

    #[tokio::test]
    async fn responses_carry_status_and_headers() {
        for kind in Kind::ALL {
            let r = response(&Fault(*kind, None, None));
            assert_eq!(r.status().as_u16(), kind.status(), "{kind:?}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
            let retry = r.headers().get(header::RETRY_AFTER);
            assert_eq!(retry.is_some(), kind.status() == 503, "{kind:?}");
            if let Some(retry) = retry {
                assert_eq!(retry, "1");
            }
            let upgrade = r.headers().get(header::UPGRADE);
            assert_eq!(
                upgrade.is_some(),
                *kind == Kind::TransportRequired,
                "{kind:?}"
            );
            let v = body(r).await;
            assert_eq!(v["status"], kind.status(), "{kind:?}");
            assert_eq!(v["title"], kind.title(), "{kind:?}");
        }
        let r = RouteError::MethodNotAllowed(Some("GET, HEAD")).into_response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(r.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let r = RouteError::NotFound.into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(r.headers().get(header::ALLOW).is_none());
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}
