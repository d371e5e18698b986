//! The wire contract between the eventwire filter and the sidecar, in one place.
//!
//! The filter sends each event to the sidecar as `POST` [`INGEST_PATH`] in CloudEvents HTTP
//! binary mode, plus two headers of ours: [`TOPIC_HEADER`] (validated by [`topic::validate`]
//! on both sides) and [`KEY_HEADER`] (the partition key, encoded with
//! [`header_value::encode`] and decoded with [`header_value::decode`]). Either side answers a
//! refusal as [`problem::Problem`] `application/problem+json`, and the filter relays the
//! sidecar's problems verbatim, so both speak the one table of [`problem::Kind`]s.
//!
//! No I/O and no host calls: this crate compiles for `wasm32-wasip1` inside the filter and
//! natively inside the sidecar and the fuzz targets.

pub mod header_value;
pub mod problem;
pub mod topic;

/// The topic the event goes to (the filter's rule `topic`).
pub const TOPIC_HEADER: &str = "eventwire-topic";
/// The Kafka partition key, percent-encoded like a `ce-*` value; absent = no key.
pub const KEY_HEADER: &str = "eventwire-key";
/// Where the sidecar takes events.
pub const INGEST_PATH: &str = "/v1/events";
/// How long the filter waits for the sidecar's answer by default (`sidecar.timeout_ms`).
/// The sidecar's ack timeout must stay below it so that the filter gets the sidecar's answer
/// (202 after spooling) rather than timing out itself.
pub const DEFAULT_CALLOUT_TIMEOUT_MS: u64 = 5_000;
/// The largest request body either side accepts by default (`max_body_bytes`,
/// `--max-body-bytes`).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1_048_576;
/// The shortest ingest secret either side accepts (visible ASCII): 16 random characters are
/// about 100 bits.
pub const MIN_SECRET_LEN: usize = 16;
/// The variable the sidecar and (Envoy) the filter's VM read the ingest secret from by default.
pub const SECRET_ENV: &str = "EVENTWIRE_INGEST_SECRET";

/// An accepted event's `Location`, `/v1/events/<id>` with the id percent-encoded as one path
/// segment (all but RFC 3986 unreserved characters): the sidecar answers it for one event,
/// the filter for each event of a batch.
pub fn event_location(id: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(INGEST_PATH.len() + 1 + id.len());
    out.push_str(INGEST_PATH);
    out.push('/');
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    out
}

#[cfg(test)]
mod location_tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn ids_become_one_path_segment() {
        assert_eq!(super::event_location("e-1.a_b~"), "/v1/events/e-1.a_b~");
        assert_eq!(
            super::event_location("a b/é,\""),
            "/v1/events/a%20b%2F%C3%A9%2C%22"
        );
    }
}
