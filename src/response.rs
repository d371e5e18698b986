//! `after_upstream`: what an event takes from the upstream's answer (its status, headers and
//! values by JSON pointer into its body), as callout headers. Host-free.

use crate::config::{ResponseMap, ValueSource, json_kind};
use crate::problem::FilterError;
use eventwire_contract::KEY_HEADER;
use eventwire_contract::header_value::encode as encode_header_value;
use serde_json::Value;

/// (callout header, value) pairs to add to the event's callout.
pub type Picked = Vec<(String, String)>;

/// What the headers phase can take: the status, the configured headers, a header key. A
/// configured header the answer lacks adds no attribute (like request extensions).
pub fn from_headers(
    map: &ResponseMap,
    status: u16,
    header: impl Fn(&str) -> Option<Vec<u8>>,
) -> Result<Picked, FilterError> {
    let mut out = Picked::with_capacity(map.headers.len() + 2);
    if let Some(ce) = &map.status {
        out.push((ce.clone(), status.to_string()));
    }
    for (name, ce) in &map.headers {
        if let Some(v) = header(name).filter(|v| !v.is_empty()) {
            out.push((ce.clone(), encode_header_value(&v).into_owned()));
        }
    }
    if let Some(ValueSource::Header(name)) = &map.key {
        let v = header(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| unusable(format!("the partition key header {name} is missing")))?;
        out.push((KEY_HEADER.to_string(), encode_header_value(&v).into_owned()));
    }
    Ok(out)
}

/// What the body gives: the values by JSON pointer and a pointer key. Only called when the
/// map needs the body (`ResponseMap::needs_body`).
pub fn from_body(map: &ResponseMap, body: &[u8]) -> Result<Picked, FilterError> {
    let json: Value = serde_json::from_slice(body)
        .map_err(|e| unusable(format!("the answer's body is not JSON ({e})")))?;
    let mut out = Picked::with_capacity(map.body.len() + 1);
    for (pointer, ce) in &map.body {
        if let Some(v) = text(&json, pointer)? {
            out.push((ce.clone(), encode_header_value(v.as_bytes()).into_owned()));
        }
    }
    if let Some(ValueSource::JsonPointer(pointer)) = &map.key {
        let v = text(&json, pointer)?.ok_or_else(|| {
            unusable(format!(
                "the partition key {pointer} is not in the answer's body"
            ))
        })?;
        out.push((
            KEY_HEADER.to_string(),
            encode_header_value(v.as_bytes()).into_owned(),
        ));
    }
    Ok(out)
}

/// A string or number at `pointer` as text; `None` when absent (or null, or empty).
fn text(json: &Value, pointer: &str) -> Result<Option<String>, FilterError> {
    match json.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(other) => Err(unusable(format!(
            "{pointer} in the answer's body must be a string, number or boolean, found {}",
            json_kind(other)
        ))),
    }
}

fn unusable(detail: String) -> FilterError {
    FilterError::UnusableAnswer { detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MAX_RESPONSE_BODY_BYTES;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn map(key: Option<ValueSource>) -> ResponseMap {
        ResponseMap {
            key,
            status: Some("ce-httpstatus".into()),
            headers: vec![
                ("location".into(), "ce-location".into()),
                ("x-absent".into(), "ce-absent".into()),
            ],
            body: vec![
                ("/status".into(), "ce-orderstatus".into()),
                ("/total".into(), "ce-total".into()),
                ("/none".into(), "ce-none".into()),
            ],
            max_body_bytes: DEFAULT_MAX_RESPONSE_BODY_BYTES,
        }
    }

    fn header(name: &str) -> Option<Vec<u8>> {
        match name {
            "location" => Some("/orders/ord 7".into()),
            "x-order-id" => Some(b"ord-7".to_vec()),
            _ => None,
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Picked {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn headers_give_status_present_headers_and_a_header_key() {
        let m = map(Some(ValueSource::Header("x-order-id".into())));
        let got = from_headers(&m, 201, header).unwrap();
        assert_eq!(
            got,
            pairs(&[
                ("ce-httpstatus", "201"),
                ("ce-location", "/orders/ord%207"),
                (KEY_HEADER, "ord-7"),
            ])
        );
        let missing = map(Some(ValueSource::Header("x-missing".into())));
        let e = from_headers(&missing, 201, header).unwrap_err();
        assert_eq!(e.status(), 502);
        assert!(e.to_string().contains("x-missing"), "{e}");
    }

    #[test]
    fn body_gives_values_by_pointer_and_a_pointer_key() {
        let m = map(Some(ValueSource::JsonPointer("/id".into())));
        let body = br#"{"id":"ord-7","status":"created","total":12.5,"none":null}"#;
        let got = from_body(&m, body).unwrap();
        assert_eq!(
            got,
            pairs(&[
                ("ce-orderstatus", "created"),
                ("ce-total", "12.5"),
                (KEY_HEADER, "ord-7"),
            ])
        );
    }

    #[test]
    fn an_answer_without_the_key_or_not_json_is_unusable() {
        let m = map(Some(ValueSource::JsonPointer("/id".into())));
        for body in [&b"{}"[..], b"<html>", br#"{"id":"x","status":{"a":1}}"#] {
            let e = from_body(&m, body).unwrap_err();
            assert!(
                matches!(e, FilterError::UnusableAnswer { .. }),
                "{body:?}: {e:?}"
            );
        }
    }
}
