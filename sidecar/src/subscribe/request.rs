//! The checked `GET /v1/subscribe` request: topic, start position and filter from the query
//! (and `Last-Event-ID` for a reconnecting EventSource), and which transport it asks for.

use axum::http::{HeaderMap, header};
use eventwire_contract::topic;

use super::SubscribeError;
use crate::cursor::{Cursor, StartFrom};
use crate::subscription_filter::Filter;

/// The checked request: what to read, from where, through which filter.
#[derive(Debug)]
pub struct Request {
    pub topic: String,
    pub from: StartFrom,
    pub filter: Option<Filter>,
    /// A single-use ticket from `POST /v1/tickets`, standing in for a bearer token.
    pub ticket: Option<String>,
}

pub fn parse_request(
    query: &[(String, String)],
    last_event_id: Option<&str>,
) -> Result<Request, SubscribeError> {
    let param = |name: &str| query.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v);
    let topic = param("topic").ok_or(SubscribeError::MissingTopic)?;
    topic::validate(topic)?;
    // An EventSource reconnects to the same URL with Last-Event-ID, so the header wins.
    let from = match last_event_id {
        Some(id) => id.parse::<Cursor>().map(StartFrom::Cursor).map_err(|e| {
            SubscribeError::InvalidFrom {
                part: "Last-Event-ID",
                reason: format!("{id:?} is not a cursor like `0:16,1:8`: {e}"),
            }
        })?,
        None => param("from")
            .map(|f| f.parse::<StartFrom>())
            .transpose()
            .map_err(|e| SubscribeError::InvalidFrom {
                part: "from",
                reason: e.to_string(),
            })?
            .unwrap_or(StartFrom::Latest),
    };
    let filter = param("filter")
        .filter(|f| !f.trim().is_empty())
        .map(|f| Filter::parse(f))
        .transpose()?;
    Ok(Request {
        topic: topic.clone(),
        from,
        filter,
        ticket: param("ticket").cloned(),
    })
}

/// Server-Sent Events when the client accepts `text/event-stream`, else a WebSocket upgrade.
pub fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

/// The cursor an EventSource sends when it reconnects (SSE only; empty means none).
pub fn last_event_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemSource;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn request_parsing() {
        let r = parse_request(&q(&[("topic", "orders")]), None).unwrap();
        assert_eq!((r.topic.as_str(), &r.from), ("orders", &StartFrom::Latest));
        assert!(r.filter.is_none());
        let r = parse_request(&q(&[("topic", "o"), ("from", "0:5")]), Some("0:9,1:2")).unwrap();
        assert_eq!(
            r.from,
            StartFrom::Cursor("0:9,1:2".parse().unwrap()),
            "header wins"
        );
        let r = parse_request(
            &q(&[("topic", "o"), ("filter", r#"{"exact":{"type":"x"}}"#)]),
            None,
        )
        .unwrap();
        assert!(r.filter.is_some());
    }

    type Query<'a> = &'a [(&'a str, &'a str)];

    #[test]
    fn request_errors_name_the_part() {
        let cases: [(Query, Option<&str>, &str, &str); 5] = [
            (&[], None, "missing-topic", "topic"),
            (&[("topic", "a b")], None, "invalid-topic", "topic"),
            (
                &[("topic", "o"), ("from", "yesterday")],
                None,
                "invalid-from",
                "from",
            ),
            (
                &[("topic", "o")],
                Some("x"),
                "invalid-from",
                "Last-Event-ID",
            ),
            (
                &[("topic", "o"), ("filter", r#"[{"prefix":{"type":1}}]"#)],
                None,
                "invalid-filter",
                "filter[0].prefix",
            ),
        ];
        for (query, leid, slug, part) in cases {
            let e = parse_request(&q(query), leid).unwrap_err();
            assert_eq!(e.kind().slug(), slug, "{e}");
            assert_eq!(e.parameter(), Some(part), "{e}");
            assert_eq!(e.kind().status(), 400);
        }
    }
}
