//! Syntax checks for CloudEvents attribute types. Hand-written to stay small: each check
//! returns the reason a value is wrong, the caller adds the attribute name.

/// Extension (and any attribute) names: lower-case ASCII letters and digits only.
pub fn attribute_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(())
    } else {
        Err("attribute names must consist of lower-case letters a-z and digits 0-9".into())
    }
}

/// CloudEvents String: no control characters (C0, DEL, C1). This is also what keeps CR/LF
/// out of Kafka headers and logs.
pub fn no_controls(value: &str) -> Result<(), String> {
    match value
        .chars()
        .find(|c| matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'))
    {
        Some(c) => Err(format!("contains control character U+{:04X}", c as u32)),
        None => Ok(()),
    }
}

/// RFC 3986 URI-reference (relative references allowed).
pub fn uri_reference(value: &str) -> Result<(), String> {
    uri_chars(value)?;
    match scheme_of(value) {
        Some(scheme) => valid_scheme(scheme),
        None => Ok(()),
    }
}

/// RFC 3986 URI with a scheme (absolute, a fragment is allowed).
pub fn absolute_uri(value: &str) -> Result<(), String> {
    uri_chars(value)?;
    let scheme = scheme_of(value).ok_or("must be an absolute URI (with a scheme)")?;
    valid_scheme(scheme)
}

fn uri_chars(value: &str) -> Result<(), String> {
    const OTHER: &[u8] = b"-._~:/?#[]@!$&'()*+,;=";
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return Err(format!("`%` at byte {i} is not a percent-encoded octet"));
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || OTHER.contains(&b)) {
            let c = value[i..].chars().next().unwrap_or('?');
            return Err(format!("character {c:?} is not allowed in a URI"));
        }
        i += 1;
    }
    Ok(())
}

/// The text before the first `:` when it comes before any `/`, `?` or `#` (RFC 3986 4.2: a
/// relative reference cannot have a colon in its first segment).
fn scheme_of(value: &str) -> Option<&str> {
    let end = value.find([':', '/', '?', '#'])?;
    (value.as_bytes()[end] == b':').then(|| &value[..end])
}

fn valid_scheme(scheme: &str) -> Result<(), String> {
    let mut bytes = scheme.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphabetic());
    if first_ok && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) {
        Ok(())
    } else {
        Err(format!("invalid URI scheme {scheme:?}"))
    }
}

/// RFC 3339 date-time: seconds required, fraction of any length, `Z` or `±hh:mm`.
pub fn timestamp(value: &str) -> Result<(), String> {
    let err = || format!("{value:?} is not an RFC 3339 timestamp (e.g. 2018-04-05T17:31:00Z)");
    let b = value.as_bytes();
    if b.len() < 20 || !matches!(b[10], b'T' | b't') {
        return Err(err());
    }
    let sep_ok = b[4] == b'-' && b[7] == b'-' && b[13] == b':' && b[16] == b':';
    let (year, month, day) = (digits(b, 0, 4), digits(b, 5, 2), digits(b, 8, 2));
    let (hour, minute, second) = (digits(b, 11, 2), digits(b, 14, 2), digits(b, 17, 2));
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) =
        (year, month, day, hour, minute, second)
    else {
        return Err(err());
    };
    let date_ok = (1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month);
    // Second 60 is a leap second, which RFC 3339 allows.
    if !sep_ok || !date_ok || hour > 23 || minute > 59 || second > 60 {
        return Err(err());
    }
    let rest = skip_fraction(&b[19..]).ok_or_else(err)?;
    offset(rest).then_some(()).ok_or_else(err)
}

fn skip_fraction(b: &[u8]) -> Option<&[u8]> {
    let Some(after_dot) = b.strip_prefix(b".") else {
        return Some(b);
    };
    let n = after_dot.iter().take_while(|c| c.is_ascii_digit()).count();
    (n > 0).then(|| &after_dot[n..])
}

fn offset(b: &[u8]) -> bool {
    match b {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', _, _, b':', _, _] => {
            matches!((digits(b, 1, 2), digits(b, 4, 2)), (Some(h), Some(m)) if h <= 23 && m <= 59)
        }
        _ => false,
    }
}

fn digits(b: &[u8], at: usize, len: usize) -> Option<u32> {
    let slice = b.get(at..at + len)?;
    slice.iter().try_fold(0u32, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

fn days_in_month(year: u32, month: u32) -> u32 {
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// RFC 2046 media type `type/subtype` with optional `; name=value` parameters.
pub fn media_type(value: &str) -> Result<(), String> {
    let err = |why: &str| format!("{value:?} is not a media type (type/subtype[;params]): {why}");
    let (essence, mut params) = value.split_once(';').unwrap_or((value, ""));
    let (ty, sub) = essence
        .trim()
        .split_once('/')
        .ok_or_else(|| err("no `/`"))?;
    if !is_token(ty) || !is_token(sub) {
        return Err(err("type and subtype must be non-empty tokens"));
    }
    while !params.trim().is_empty() {
        params = parameter(params).ok_or_else(|| err("malformed parameter"))?;
    }
    Ok(())
}

/// Parses one `name=value` parameter and returns the text after its trailing `;` (if any).
fn parameter(input: &str) -> Option<&str> {
    let (name, rest) = input.split_once('=')?;
    if !is_token(name.trim()) {
        return None;
    }
    let rest = rest.trim_start();
    let (value_ok, rest) = if let Some(quoted) = rest.strip_prefix('"') {
        let end = closing_quote(quoted)?;
        (true, &quoted[end + 1..])
    } else {
        let end = rest.find(';').unwrap_or(rest.len());
        (is_token(rest[..end].trim_end()), &rest[end..])
    };
    let rest = rest.trim_start();
    match rest.strip_prefix(';') {
        Some(next) if value_ok => Some(next),
        None if value_ok && rest.is_empty() => Some(rest),
        _ => None,
    }
}

fn closing_quote(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// RFC 7230 token.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The lower-cased `type/subtype` of a media type, without parameters.
pub fn essence(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// JSON media types per the JSON event format 3.1: `application/json`, `text/json`, `*/*+json`.
pub fn is_json_media_type(media_type: &str) -> bool {
    let e = essence(media_type);
    e == "application/json" || e == "text/json" || e.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        for ok in [
            "2018-04-05T17:31:00Z",
            "2018-04-05T17:31:00.000000000Z",
            "2018-04-05T17:31:00.1234567890123+01:00",
            "2018-04-05t17:31:00z",
            "2016-02-29T00:00:00-23:59",
            "2016-12-31T23:59:60Z",
        ] {
            assert_eq!(timestamp(ok), Ok(()), "{ok}");
        }
        for bad in [
            "2018-04-05T18:31Z",
            "2018-04-05T18:31:00+05",
            "2018-04-05T18:31:00+25:00",
            "2018-04-05T18:31:00+05:60",
            "2018-04-05T18:31:00X",
            "2018-04-05T18:31:00+xx:00",
            "2018-04-05T18:31:00.Z",
            "2017-02-29T00:00:00Z",
            "2018-13-05T18:31:00Z",
            "2018-04-05 18:31:00Z",
            "lunchtime",
            "",
        ] {
            assert!(timestamp(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn media_types() {
        for ok in [
            "text/plain",
            "application/cloudevents+json; charset=utf-8",
            "text/plain;charset=\"utf;8\"",
            "multipart/form-data; boundary=x; a=b",
        ] {
            assert_eq!(media_type(ok), Ok(()), "{ok}");
        }
        for bad in [
            "xyz",
            "",
            "text/",
            "/plain",
            "text/plain; charset",
            "text/plain; =x",
            "a b/c",
        ] {
            assert!(media_type(bad).is_err(), "{bad}");
        }
        assert!(is_json_media_type("Application/JSON; charset=utf-8"));
        assert!(is_json_media_type("application/vnd.foo+json"));
        assert!(!is_json_media_type("text/plain"));
    }

    #[test]
    fn uris() {
        for ok in [
            "https://cloudevents.io",
            "#fragment",
            "/a/b?c=d",
            "//authority/path",
            "urn:x:y",
        ] {
            assert_eq!(uri_reference(ok), Ok(()), "{ok}");
        }
        for bad in ["a b", "1http://x", "http://x/%zz", "caf\u{e9}"] {
            assert!(uri_reference(bad).is_err(), "{bad}");
        }
        assert!(absolute_uri("https://cloudevents.io/schema#x").is_ok());
        assert!(absolute_uri("/relative").is_err());
        assert!(absolute_uri("").is_err());
    }

    #[test]
    fn names_and_controls() {
        assert!(attribute_name("averyveryverylongextensionname123").is_ok());
        for bad in ["MyExtension", "my.extension", "my_ext", ""] {
            assert!(attribute_name(bad).is_err(), "{bad}");
        }
        assert!(no_controls("line1\r\nline2").is_err());
        assert!(no_controls("x\u{85}").is_err());
        assert!(no_controls("Euro € 😀").is_ok());
    }
}
