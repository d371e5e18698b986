//! Percent-encoding of `ce-*` and `eventwire-key` header values (CloudEvents HTTP binding
//! v1.0.2, 3.1.3.2). The filter encodes, the sidecar decodes: one codec, so a key or
//! attribute survives the hop byte for byte.
//!
//! Decoding also accepts RFC 7230 quoted-string sections, because the binding says header
//! values may arrive quoted and the C# SDK (whose vectors we test against) unquotes them.

use std::borrow::Cow;
use std::fmt;

/// Space, `"`, `%` and everything outside printable ASCII become `%XX`, byte by byte over
/// the UTF-8 (the RECOMMENDED form). Borrows when nothing needs encoding, the common case.
pub fn encode(value: &[u8]) -> Cow<'_, str> {
    let needs = |b: u8| !(0x21..=0x7e).contains(&b) || b == b'"' || b == b'%';
    let Some(first) = value.iter().position(|&b| needs(b)) else {
        // Only printable ASCII, so valid UTF-8; the fallback is never taken.
        return Cow::Borrowed(std::str::from_utf8(value).unwrap_or_default());
    };
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len() + 16);
    out.push_str(std::str::from_utf8(&value[..first]).unwrap_or_default());
    for &b in &value[first..] {
        if needs(b) {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        } else {
            out.push(b as char);
        }
    }
    Cow::Owned(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    BadEscape(usize),
    UnterminatedQuote,
    UnterminatedEscape,
    NotUtf8(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadEscape(at) => {
                write!(f, "`%` at byte {at} is not followed by two hex digits")
            }
            DecodeError::UnterminatedQuote => f.write_str("quoted string is not terminated"),
            DecodeError::UnterminatedEscape => {
                f.write_str("backslash at the end of a quoted string escapes nothing")
            }
            DecodeError::NotUtf8(at) => write!(f, "decoded bytes are not valid UTF-8 (byte {at})"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// The attribute string a header value carries.
pub fn decode(header: &str) -> Result<String, DecodeError> {
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
                let &escaped = bytes.get(i).ok_or(DecodeError::UnterminatedEscape)?;
                out.push(escaped);
            }
            b'%' => {
                out.push(hex_pair(bytes, i + 1).ok_or(DecodeError::BadEscape(i))?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    if quoted {
        return Err(DecodeError::UnterminatedQuote);
    }
    // std's UTF-8 check rejects surrogates, overlong forms and truncated sequences.
    String::from_utf8(out).map_err(|e| DecodeError::NotUtf8(e.utf8_error().valid_up_to()))
}

fn hex_pair(bytes: &[u8], at: usize) -> Option<u8> {
    let hi = (*bytes.get(at)? as char).to_digit(16)?;
    let lo = (*bytes.get(at + 1)? as char).to_digit(16)?;
    u8::try_from(hi * 16 + lo).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Compiled in, so the same vectors run natively and in wasm (no file system there).
    const VECTORS: &str =
        include_str!("../../tests/fixtures/cloudevents/vectors/http-header-percent-encoding.json");

    fn cases(key: &str) -> Vec<Value> {
        let v: Value = serde_json::from_str(VECTORS.trim_start_matches('\u{feff}'))
            .unwrap_or_else(|e| panic!("vectors are not JSON: {e}"));
        match v.get(key).and_then(Value::as_array) {
            Some(a) => a.clone(),
            None => panic!("no {key} cases"),
        }
    }

    fn pair(case: &Value) -> (&str, &str) {
        match (case["value"].as_str(), case["header"].as_str()) {
            (Some(v), Some(h)) => (v, h),
            _ => panic!("bad case {case}"),
        }
    }

    #[test]
    fn roundtrip_vectors() {
        let all = cases("roundtrip");
        assert!(all.len() >= 7, "{} roundtrip cases", all.len());
        for case in &all {
            let (value, header) = pair(case);
            assert_eq!(encode(value.as_bytes()), header, "encode {value:?}");
            assert_eq!(decode(header).as_deref(), Ok(value), "decode {header:?}");
        }
    }

    #[test]
    fn decode_only_vectors() {
        let all = cases("decode_only");
        assert!(!all.is_empty());
        for case in &all {
            let (value, header) = pair(case);
            assert_eq!(decode(header).as_deref(), Ok(value), "decode {header:?}");
        }
    }

    #[test]
    fn decode_must_reject_vectors() {
        let rejects = cases("decode_must_reject");
        assert!(rejects.len() >= 16, "{} reject cases", rejects.len());
        for header in &rejects {
            let Some(header) = header.as_str() else {
                panic!("bad case {header}");
            };
            assert!(decode(header).is_err(), "must reject {header:?}");
        }
    }

    #[test]
    fn encode_borrows_when_it_can() {
        assert!(matches!(encode(b"plain"), Cow::Borrowed("plain")));
        assert_eq!(encode(&[0xff, b'a']), "%FFa");
        assert_eq!(encode(b"line1\r\nline2"), "line1%0D%0Aline2");
    }
}
