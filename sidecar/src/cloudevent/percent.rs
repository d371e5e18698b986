//! Percent-encoding of `ce-*` HTTP header values (CloudEvents HTTP binding v1.0.2, 3.1.3.2).
//!
//! Decoding also accepts RFC 7230 quoted-string sections, because the binding says header
//! values may arrive quoted and the C# SDK (whose vectors we test against) unquotes them.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PercentError {
    #[error("`%` at byte {0} is not followed by two hex digits")]
    BadEscape(usize),
    #[error("quoted string is not terminated")]
    UnterminatedQuote,
    #[error("backslash at the end of a quoted string escapes nothing")]
    UnterminatedEscape,
    #[error("decoded bytes are not valid UTF-8 (byte {0})")]
    NotUtf8(usize),
}

/// Decodes a header value into the attribute string it carries.
pub fn decode(header: &str) -> Result<String, PercentError> {
    let bytes = header.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut quoted = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => quoted = !quoted,
            b'\\' if quoted => {
                // Inside a quoted-string a backslash takes the next byte literally.
                i += 1;
                let &escaped = bytes.get(i).ok_or(PercentError::UnterminatedEscape)?;
                out.push(escaped);
            }
            b'%' => {
                out.push(hex_pair(bytes, i + 1).ok_or(PercentError::BadEscape(i))?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    if quoted {
        return Err(PercentError::UnterminatedQuote);
    }
    // std's UTF-8 check rejects surrogates, overlong forms and truncated sequences.
    String::from_utf8(out).map_err(|e| PercentError::NotUtf8(e.utf8_error().valid_up_to()))
}

fn hex_pair(bytes: &[u8], at: usize) -> Option<u8> {
    let hi = (*bytes.get(at)? as char).to_digit(16)?;
    let lo = (*bytes.get(at + 1)? as char).to_digit(16)?;
    u8::try_from(hi * 16 + lo).ok()
}

/// Encodes an attribute value for a `ce-*` header: space, `"`, `%` and everything outside
/// printable ASCII become `%XX` (the RECOMMENDED form of the binding). Only the tests use it
/// today; HTTP delivery of events (fan-out to webhooks) will.
#[allow(dead_code)]
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/cloudevents/vectors/http-header-percent-encoding.json"
        );
        let text = std::fs::read_to_string(path).expect("percent-encoding vectors readable");
        serde_json::from_str(text.trim_start_matches('\u{feff}')).expect("vectors are JSON")
    }

    fn cases<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
        v[key].as_array().expect("array of cases")
    }

    #[test]
    fn roundtrip_vectors() {
        let v = vectors();
        for case in cases(&v, "roundtrip") {
            let (value, header) = (
                case["value"].as_str().unwrap(),
                case["header"].as_str().unwrap(),
            );
            assert_eq!(encode(value), header, "encode {value:?}");
            assert_eq!(decode(header).as_deref(), Ok(value), "decode {header:?}");
        }
    }

    #[test]
    fn decode_only_vectors() {
        let v = vectors();
        for case in cases(&v, "decode_only") {
            let (value, header) = (
                case["value"].as_str().unwrap(),
                case["header"].as_str().unwrap(),
            );
            assert_eq!(decode(header).as_deref(), Ok(value), "decode {header:?}");
        }
    }

    #[test]
    fn decode_must_reject_vectors() {
        let v = vectors();
        let rejects = cases(&v, "decode_must_reject");
        assert!(rejects.len() >= 16);
        for header in rejects {
            let header = header.as_str().unwrap();
            assert!(
                decode(header).is_err(),
                "must reject {header:?}, got {:?}",
                decode(header)
            );
        }
    }
}
