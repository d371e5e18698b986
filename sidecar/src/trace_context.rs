//! The W3C trace context an event carries as its CloudEvents distributed-tracing extension
//! (`traceparent`, e.g. `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`).
//! Pure code: the ids feed log lines whether or not spans are exported (`telemetry`).

use std::fmt;

use thiserror::Error;

/// The extension attribute, and its Kafka record header (CloudEvents Kafka binding).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACEPARENT_HEADER: &str = "ce_traceparent";
pub const TRACESTATE_HEADER: &str = "ce_tracestate";

/// Version 00 is `vv-<32 hex>-<16 hex>-ff`; later versions may append `-...` fields.
const V00_LEN: usize = 55;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

/// A valid `traceparent`: nonzero ids, a known layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    pub flags: u8,
}

/// Why a `traceparent` is ignored (the event is then treated as carrying none).
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum TraceParentError {
    #[error("not `version-traceid-parentid-flags`")]
    Layout,
    #[error("not lower-case hex")]
    Hex,
    #[error("version ff is invalid")]
    Version,
    #[error("an all-zero trace id or parent id is invalid")]
    ZeroId,
}

impl TraceParent {
    /// Strict by the W3C rules: a value that is not exactly right is no trace context at all.
    pub fn parse(value: &str) -> Result<TraceParent, TraceParentError> {
        let v = value.as_bytes();
        if v.len() < V00_LEN || [2, 35, 52].iter().any(|&i| v[i] != b'-') {
            return Err(TraceParentError::Layout);
        }
        let version = hex::<1>(&v[0..2])?[0];
        match version {
            0xff => return Err(TraceParentError::Version),
            0 if v.len() != V00_LEN => return Err(TraceParentError::Layout),
            // A later version is read as 00 when its extra fields are dash-separated.
            _ if v.len() > V00_LEN && v[V00_LEN] != b'-' => return Err(TraceParentError::Layout),
            _ => {}
        }
        let trace_id = hex::<16>(&v[3..35])?;
        let parent_id = hex::<8>(&v[36..52])?;
        let flags = hex::<1>(&v[53..55])?[0];
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return Err(TraceParentError::ZeroId);
        }
        Ok(TraceParent {
            trace_id: TraceId(trace_id),
            parent_id: SpanId(parent_id),
            flags,
        })
    }

    /// The event's trace context from its Kafka record headers, when valid.
    pub fn from_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Self> {
        let (_, value) = headers
            .into_iter()
            .find(|(name, _)| *name == TRACEPARENT_HEADER)?;
        Self::parse(value).ok()
    }
}

fn hex<const N: usize>(text: &[u8]) -> Result<[u8; N], TraceParentError> {
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Ok(out)
}

/// Upper-case hex is refused: the spec requires lower case and so do its test suites.
fn nibble(c: u8) -> Result<u8, TraceParentError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(TraceParentError::Hex),
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

/// As in `traceparent` and in OTLP JSON: lower-case hex.
impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_a_valid_traceparent() {
        let tp = TraceParent::parse(GOOD).unwrap();
        assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        let unsampled = GOOD.replace("-01", "-00");
        assert_eq!(TraceParent::parse(&unsampled).unwrap().flags, 0);
    }

    #[test]
    fn a_later_version_is_read_as_00_with_its_extra_fields_ignored() {
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        assert!(TraceParent::parse(v1).is_ok());
        let glued = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(TraceParent::parse(glued), Err(TraceParentError::Layout));
    }

    #[test]
    fn refuses_invalid_values() {
        use TraceParentError::*;
        let trailing = format!("{GOOD}-");
        let shifted = format!(" {GOOD}");
        let cases = [
            ("", Layout),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                Layout,
            ),
            (trailing.as_str(), Layout),
            (&shifted[..55], Layout),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Layout,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Version,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                Hex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                Hex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
                Hex,
            ),
            (
                "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Hex,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ZeroId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                ZeroId,
            ),
            // Multi-byte UTF-8 where a dash belongs must not split a character.
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473é00f067aa0ba902b7-01",
                Layout,
            ),
        ];
        for (value, error) in cases {
            assert_eq!(TraceParent::parse(value), Err(error), "{value:?}");
        }
    }

    #[test]
    fn reads_the_kafka_header() {
        let headers = [("ce_id", "e1"), (TRACEPARENT_HEADER, GOOD)];
        let tp = TraceParent::from_headers(headers).unwrap();
        assert_eq!(
            tp.parent_id.0,
            [0, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(TraceParent::from_headers([("ce_id", "e1")]), None);
        assert_eq!(
            TraceParent::from_headers([(TRACEPARENT_HEADER, "junk")]),
            None
        );
    }
}
