//! W3C Trace Context (`traceparent`, `tracestate`) for the CloudEvents distributed-tracing
//! extension: taken from the request when it carries a valid one, started otherwise, so
//! every event can be followed from the client through Kafka to its subscribers.

/// A valid `traceparent`, always rendered as version `00` (a higher version is read by its
/// version-00 prefix and sent on as 00, as the W3C specification asks of a vendor that does
/// not know it). Fixed size and `Copy`: it rides in each request's state without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    text: [u8; LEN],
}

const LEN: usize = 55;
const HEX: &[u8; 16] = b"0123456789abcdef";

/// `tracestate` is capped at 512 characters by the specification.
pub const MAX_TRACESTATE: usize = 512;

impl TraceParent {
    /// Parses a `traceparent` header; `None` for anything the specification says to ignore
    /// (wrong length or separators, upper-case or non-hex digits, version `ff`, all-zero ids).
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let v = value.trim_ascii();
        let head = v.get(..LEN)?;
        let version = hex_field(&head[0..2])?;
        if version == b"ff" || (version == b"00" && v.len() != LEN) {
            return None;
        }
        if v.len() > LEN && v[LEN] != b'-' {
            return None;
        }
        if head[2] != b'-' || head[35] != b'-' || head[52] != b'-' {
            return None;
        }
        let trace = hex_field(&head[3..35])?;
        let parent = hex_field(&head[36..52])?;
        hex_field(&head[53..55])?;
        if is_zero(trace) || is_zero(parent) {
            return None;
        }
        let mut text = [0u8; LEN];
        text.copy_from_slice(head);
        text[..2].copy_from_slice(b"00");
        Some(TraceParent { text })
    }

    /// A new trace: random trace and parent ids, sampled (so tracers downstream record it).
    pub fn start(random: &[u8; 24]) -> TraceParent {
        let mut text = [b'0'; LEN];
        text[2] = b'-';
        text[35] = b'-';
        text[52] = b'-';
        text[54] = b'1';
        hex_into(&mut text[3..35], &random[..16]);
        hex_into(&mut text[36..52], &random[16..]);
        // An all-zero id is invalid; 2^-64 odds, but cheap to rule out.
        for (at, field) in [(34, 3..35), (51, 36..52)] {
            if is_zero(&text[field]) {
                text[at] = b'1';
            }
        }
        TraceParent { text }
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from checked ASCII.
        std::str::from_utf8(&self.text).unwrap_or("")
    }

    /// The 32 hex digits of the trace id (what logs and trace backends search by).
    pub fn trace_id(&self) -> &str {
        self.as_str().get(3..35).unwrap_or("")
    }
}

impl std::fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `tracestate` worth passing on: printable ASCII within the size limit. Its list
/// members are the vendors' business; a malformed one is dropped whole, never repaired.
pub fn tracestate(value: &[u8]) -> Option<&str> {
    let v = value.trim_ascii();
    let ok =
        !v.is_empty() && v.len() <= MAX_TRACESTATE && v.iter().all(|b| (0x20..=0x7e).contains(b));
    ok.then(|| std::str::from_utf8(v).ok()).flatten()
}

fn hex_field(s: &[u8]) -> Option<&[u8]> {
    s.iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        .then_some(s)
}

fn is_zero(s: &[u8]) -> bool {
    s.iter().all(|&b| b == b'0')
}

fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 15)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn valid_traceparents_are_kept_as_they_are() {
        let t = TraceParent::parse(VALID.as_bytes()).map(|t| t.as_str().to_owned());
        assert_eq!(t.as_deref(), Some(VALID));
        let padded = format!(" {VALID}\t");
        assert!(TraceParent::parse(padded.as_bytes()).is_some());
        let t = TraceParent::parse(VALID.as_bytes());
        assert_eq!(
            t.map(|t| t.trace_id().to_owned()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn a_higher_version_is_read_by_its_version_00_prefix() {
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        let t = TraceParent::parse(future.as_bytes()).map(|t| t.as_str().to_owned());
        assert_eq!(t.as_deref(), Some(VALID));
        let glued = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert!(TraceParent::parse(glued.as_bytes()).is_none());
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0z",
        ] {
            assert!(TraceParent::parse(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_started_trace_is_valid_sampled_and_made_of_the_random_bytes() {
        let mut random = [0u8; 24];
        for (i, b) in random.iter_mut().enumerate() {
            *b = i as u8 * 11;
        }
        let t = TraceParent::start(&random);
        assert_eq!(
            t.as_str(),
            "00-000b16212c37424d58636e79848f9aa5-b0bbc6d1dce7f2fd-01"
        );
        assert_eq!(TraceParent::parse(t.as_str().as_bytes()), Some(t));
        let zero = TraceParent::start(&[0; 24]);
        assert!(TraceParent::parse(zero.as_str().as_bytes()).is_some());
    }

    #[test]
    fn tracestate_is_passed_on_only_when_printable_and_small() {
        assert_eq!(
            tracestate(b"rojo=00f067aa0ba902b7"),
            Some("rojo=00f067aa0ba902b7")
        );
        assert_eq!(tracestate(b""), None);
        assert_eq!(tracestate(b"a=\x01"), None);
        assert_eq!(tracestate(&[b'a'; MAX_TRACESTATE + 1]), None);
        assert!(tracestate(&[b'a'; MAX_TRACESTATE]).is_some());
    }
}
