//! CloudEvents v1.0.2 primitives the filter needs: the `time` and `id` attributes, and
//! telling an incoming CloudEvent from a plain request. (The `ce-*` header codec is part of
//! the wire contract: `eventwire_contract::header_value`.)

use std::borrow::Cow;

pub const SPECVERSION: &str = "1.0";
pub const STRUCTURED: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";

/// How an incoming request carries its event, if it already is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// A plain request: the filter wraps it into a new event.
    Plain,
    /// `ce-*` headers + body as data.
    Binary,
    /// `application/cloudevents+json`.
    Structured,
    /// `application/cloudevents-batch+json`: not accepted.
    Batch,
}

pub fn incoming_mode(content_type: Option<&str>, has_ce_specversion: bool) -> Incoming {
    match content_type.map(media_type) {
        Some(m) if m.eq_ignore_ascii_case(STRUCTURED) => Incoming::Structured,
        Some(m) if m.eq_ignore_ascii_case(BATCH) => Incoming::Batch,
        _ if has_ce_specversion => Incoming::Binary,
        _ => Incoming::Plain,
    }
}

/// The `type/subtype` part of a Content-Type, without parameters.
pub fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// JSON media types: their bodies stay JSON in the event and JSON pointers apply to them.
pub fn is_json(content_type: &str) -> bool {
    let m = media_type(content_type);
    // Bytes, not a str slice: a header may hold non-ASCII, and slicing inside a UTF-8
    // character would panic and take the VM down (found by fuzzing).
    let b = m.as_bytes();
    m.eq_ignore_ascii_case("application/json")
        || m.eq_ignore_ascii_case("text/json")
        || (b.len() > 5 && b[b.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// Decodes `%XX` escapes (path parameters). `None` on a broken escape or non-UTF-8 result.
pub fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = hex_val(*bytes.get(i + 1)?)?;
            let lo = hex_val(*bytes.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3339 UTC timestamp with microseconds, from nanoseconds since the Unix epoch.
pub fn rfc3339(nanos: u64) -> String {
    let secs = nanos / 1_000_000_000;
    let micros = (nanos % 1_000_000_000) / 1_000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm: no calendar crate in a 100 KB filter.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A random (version 4) UUID from 16 random bytes.
pub fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[usize::from(byte >> 4)] as char);
        s.push(HEX[usize::from(byte & 0xf)] as char);
    }
    s
}

/// An `Idempotency-Key` value as the event id: the IETF draft sends it as a quoted
/// structured-field string, most APIs unquoted; both are accepted.
pub fn idempotency_id(raw: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    let s = s
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s);
    let ok = !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| (0x20..0x7f).contains(&b));
    ok.then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn percent_decoding_of_path_segments() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%FF"), None);
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        // 2018-04-05T17:31:00Z, the conformance suite's sample time.
        assert_eq!(
            rfc3339(1_522_949_460_123_456_789),
            "2018-04-05T17:31:00.123456Z"
        );
        // A leap day and the end of a century.
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(
            rfc3339(4_102_444_799_000_000_000),
            "2099-12-31T23:59:59.000000Z"
        );
    }

    #[test]
    fn uuid_has_version_and_variant() {
        let u = uuid_v4([0xff; 16]);
        assert_eq!(u, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        let z = uuid_v4([0; 16]);
        assert_eq!(z, "00000000-0000-4000-8000-000000000000");
    }

    #[test]
    fn media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/vnd.order+json"));
        assert!(is_json("text/json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("json"));
        assert!(!is_json("+json"));
        // Non-ASCII must not panic (a str slice inside a UTF-8 character would).
        assert!(!is_json("text/é1234"));
        assert!(!is_json("ԅ+jso"));
        assert!(is_json("application/é+json"));
        assert_eq!(incoming_mode(Some(STRUCTURED), false), Incoming::Structured);
        assert_eq!(
            incoming_mode(Some("application/cloudevents+json; charset=utf-8"), true),
            Incoming::Structured
        );
        assert_eq!(incoming_mode(Some(BATCH), false), Incoming::Batch);
        assert_eq!(
            incoming_mode(Some("application/json"), true),
            Incoming::Binary
        );
        assert_eq!(incoming_mode(None, false), Incoming::Plain);
    }

    #[test]
    fn idempotency_keys() {
        assert_eq!(idempotency_id(b"abc-1"), Some("abc-1"));
        assert_eq!(idempotency_id(b"\"8e03978e\""), Some("8e03978e"));
        assert_eq!(idempotency_id(b""), None);
        assert_eq!(idempotency_id(b"\"\""), None);
        assert_eq!(idempotency_id(&[0xc3, 0xa9]), None);
        assert_eq!(idempotency_id(&[b'a'; 257]), None);
    }
}
