//! An HTTP answer as a test client got it, and the checks every suite makes of one.

use serde_json::Value;

/// Status, headers (names as the client library gave them) and body.
pub type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// The first header `name` (any case) of `hdrs`.
pub fn header<'a>(hdrs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hdrs.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

pub fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Asserts a problem+json answer with the given status and problem slug; the problem.
pub fn assert_problem(resp: &Answer, status: u16, slug: &str) -> Value {
    let (got, hdrs, body) = resp;
    assert_eq!(*got, status, "body: {}", String::from_utf8_lossy(body));
    assert_eq!(
        header(hdrs, "content-type"),
        Some("application/problem+json")
    );
    let p = json_of(body);
    assert_eq!(p["type"], format!("urn:eventwire:problem:{slug}"), "{p}");
    assert_eq!(p["status"], status, "{p}");
    p
}
