//! Every path of the request state machine, against a mock host that records each effect
//! and traps (panics) where Envoy's or Kong's SDK calls would.

use super::*;
use crate::host::{HeaderList, HostError};
use std::cell::RefCell;
use std::fmt;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Dispatch {
        upstream: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        timeout_ms: u64,
    },
    Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Resume,
    ResumeResponse,
    Wake,
    Bump(Counter),
    Log(Level, String),
}

#[derive(Default)]
struct Mock {
    kong: bool,
    route_name: Option<&'static str>,
    headers: Vec<(String, Vec<u8>)>,
    headers_fail: bool,
    body: Option<Vec<u8>>,
    body_fail: bool,
    /// The callout answer's headers; empty = an answer without headers.
    answer_headers: Vec<(&'static str, &'static str)>,
    answer_body: Vec<u8>,
    /// The upstream's answer (after_upstream).
    response_headers: Vec<(&'static str, &'static str)>,
    response_body: Option<Vec<u8>>,
    dispatch_fails: bool,
    wake_fails: bool,
    random_fails: bool,
    effects: RefCell<Vec<Effect>>,
    /// Every counter change with its rule and amount, and every histogram record.
    counted: RefCell<Vec<(Counter, usize, u64)>>,
    round_trips: RefCell<Vec<(usize, u64)>>,
    /// How far the clock moves at each reading (0: it stands still).
    clock_step_ns: u64,
    clock: std::cell::Cell<u64>,
    /// Every property and single header read, to check what untouched routes cost.
    reads: RefCell<Vec<String>>,
    /// Calls of `request_headers` (Envoy's SDK panics on one after the headers phase).
    header_map_reads: std::cell::Cell<usize>,
}

fn owned(headers: &HeaderList<'_>) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

impl Host for Mock {
    fn request_headers(&self) -> Result<Vec<(String, Vec<u8>)>, HostError> {
        self.header_map_reads.set(self.header_map_reads.get() + 1);
        if self.headers_fail {
            return Err(HostError("InternalFailure".into()));
        }
        Ok(self.headers.clone())
    }

    fn request_header(&self, name: &str) -> Option<String> {
        self.reads.borrow_mut().push(name.to_string());
        let v = callout::header(&self.headers, name)?;
        String::from_utf8(v.to_vec()).ok()
    }

    fn property(&self, path: &[&str]) -> Option<String> {
        let key = path.join(".");
        self.reads.borrow_mut().push(key.clone());
        match key.as_str() {
            "xds.route_name" if !self.kong => self.route_name.map(str::to_string),
            "ngx.nginx_version" if self.kong => Some("1.27.4".into()),
            _ => None,
        }
    }

    fn request_body(&self, _size: usize) -> Result<Option<Vec<u8>>, HostError> {
        if self.body_fail {
            return Err(HostError("NotFound".into()));
        }
        Ok(self.body.clone())
    }

    fn callout_header(&self, name: &str) -> Option<Vec<u8>> {
        if self.answer_headers.is_empty() {
            // Envoy's SDK panics reading headers of an answer that has none; Kong's engine
            // sets only `:dispatch_status` then.
            assert!(
                self.kong,
                "trap: callout header {name} read on an answer without headers"
            );
            assert_eq!(
                name, ":dispatch_status",
                "Kong has only :dispatch_status here"
            );
            return Some(b"broken connection".to_vec());
        }
        self.answer_headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_bytes().to_vec())
    }

    fn callout_body(&self, size: usize) -> Vec<u8> {
        assert_eq!(size, self.answer_body.len(), "callout body size");
        self.answer_body.clone()
    }

    fn dispatch(
        &self,
        upstream: &str,
        headers: HeaderList<'_>,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        if self.dispatch_fails {
            return Err(HostError("BadArgument".into()));
        }
        self.effects.borrow_mut().push(Effect::Dispatch {
            upstream: upstream.to_string(),
            headers: owned(&headers),
            body: body.to_vec(),
            timeout_ms,
        });
        Ok(self.effects.borrow().len() as u32)
    }

    fn wake(&self) -> Result<(), HostError> {
        if self.wake_fails {
            return Err(HostError("NotFound".into()));
        }
        self.effects.borrow_mut().push(Effect::Wake);
        Ok(())
    }

    fn reply(&self, status: u16, headers: HeaderList<'_>, body: &[u8]) {
        self.effects.borrow_mut().push(Effect::Reply {
            status,
            headers: owned(&headers),
            body: body.to_vec(),
        });
    }

    fn resume(&self) {
        self.effects.borrow_mut().push(Effect::Resume);
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.response_headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_bytes().to_vec())
    }

    fn response_body(&self, _size: usize) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self.response_body.clone())
    }

    fn resume_response(&self) {
        self.effects.borrow_mut().push(Effect::ResumeResponse);
    }

    fn bump_by(&self, counter: Counter, rule: usize, by: u64) {
        self.counted.borrow_mut().push((counter, rule, by));
        // Bytes are checked in `counted`; as effects they would be one per byte.
        if counter != Counter::PublishedBytes {
            for _ in 0..by {
                self.effects.borrow_mut().push(Effect::Bump(counter));
            }
        }
    }

    fn record_callout_ms(&self, rule: usize, ms: u64) {
        self.round_trips.borrow_mut().push((rule, ms));
    }

    fn now_nanos(&self) -> u64 {
        self.clock.set(self.clock.get() + self.clock_step_ns);
        1_522_949_460_000_000_000 + self.clock.get()
    }

    fn env(&self, name: &str) -> Option<String> {
        (name == "EVENTWIRE_INGEST_SECRET").then(|| "0123456789abcdef-env".to_string())
    }

    fn fill_random(&self, buf: &mut [u8]) -> bool {
        buf.fill(7);
        !self.random_fails
    }

    fn log(&self, level: Level, message: fmt::Arguments<'_>) {
        self.effects
            .borrow_mut()
            .push(Effect::Log(level, message.to_string()));
    }
}

impl Mock {
    fn with_headers(mut self, list: &[(&str, &str)]) -> Mock {
        self.headers = list
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        self
    }

    fn effects(&self) -> Vec<Effect> {
        self.effects.borrow().clone()
    }

    /// Effects other than logging, in order.
    fn actions(&self) -> Vec<Effect> {
        self.effects()
            .into_iter()
            .filter(|e| !matches!(e, Effect::Log(..)))
            .collect()
    }

    /// Counters bumped, but the one every request bumps.
    fn counters(&self) -> Vec<Counter> {
        self.effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Bump(Counter::Requests) => None,
                Effect::Bump(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    fn logs(&self, level: Level) -> Vec<String> {
        self.effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Log(l, m) if l == level => Some(m),
                _ => None,
            })
            .collect()
    }

    fn dispatched(&self) -> Option<(Headers, Vec<u8>)> {
        self.effects().into_iter().find_map(|e| match e {
            Effect::Dispatch { headers, body, .. } => Some((headers, body)),
            _ => None,
        })
    }

    /// The one local reply, parsed: status, headers, body as JSON.
    fn reply(&self) -> (u16, Headers, serde_json::Value) {
        let replies: Vec<_> = self
            .effects()
            .into_iter()
            .filter_map(|e| match e {
                Effect::Reply {
                    status,
                    headers,
                    body,
                } => Some((status, headers, body)),
                _ => None,
            })
            .collect();
        assert_eq!(replies.len(), 1, "exactly one reply: {:?}", self.effects());
        let (status, headers, body) = replies[0].clone();
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("reply body is not JSON ({e}): {body:?}"));
        (status, headers, json)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

const ORDERS: &str = r#"{"sidecar": {"upstream": "sidecar", "timeout_ms": 250}, "max_body_bytes": 64,
  "rules": [
    {"name": "orders", "match": {"method": "POST", "path": "/orders"}, "topic": "orders",
     "type": "com.example.order.placed", "key": {"json_pointer": "/id"}},
    {"name": "payments", "match": {"path": "/payments"}, "mode": "tap", "topic": "payments",
     "type": "com.example.payment"},
    {"name": "strict-tap", "match": {"path": "/strict"}, "mode": "tap", "on_failure": "reject",
     "topic": "strict", "type": "t"},
    {"name": "soft-bridge", "match": {"path": "/soft"}, "on_failure": "passthrough",
     "topic": "soft", "type": "t", "key": {"json_pointer": "/id"}}
  ]}"#;

fn vm(json: &str) -> Rc<Vm> {
    match config::parse(json.as_bytes()) {
        Ok(c) => Vm::new(c),
        Err(e) => panic!("{e}"),
    }
}

fn post(path: &str, body: &str) -> Mock {
    let len = body.len().to_string();
    let mut m = Mock::default().with_headers(&[
        (":method", "POST"),
        (":path", path),
        (":scheme", "https"),
        (":authority", "shop.example.com"),
        ("content-type", "application/json"),
        ("content-length", &len),
    ]);
    m.body = Some(body.as_bytes().to_vec());
    m
}

/// What the headers phase returns when a body follows: Envoy must pause there (its body
/// callbacks still come, with `allow_on_headers_stop_iteration`); Kong reads the body only
/// after the headers phase continued, so a pause there would never end.
fn expected_headers_flow(m: &Mock) -> Flow {
    if m.kong { Flow::Continue } else { Flow::Pause }
}

/// Headers and body through one stream, up to the pending callout.
fn through_body(m: &Mock, stream: &mut Stream) {
    assert_eq!(
        stream.on_request_headers(m, false),
        expected_headers_flow(m)
    );
    let size = m.body.as_ref().map_or(0, Vec::len);
    assert_eq!(stream.on_request_body(m, size, true), Flow::Pause);
}

fn answer(m: &mut Mock, headers: &[(&'static str, &'static str)], body: &str) {
    m.answer_headers = headers.to_vec();
    m.answer_body = body.as_bytes().to_vec();
}

const ACCEPTED: &[(&str, &str)] = &[
    (":status", "202"),
    ("content-type", "application/json"),
    ("location", "/v1/events/e1"),
];
const ACCEPTED_BODY: &str = r#"{"id":"e1","status":"published"}"#;

#[test]
fn configure_logs_what_it_did() {
    let m = Mock::default();
    let c = configure(&m, None);
    assert!(c.is_some_and(|c| c.rules.is_empty()));
    assert_eq!(
        m.logs(Level::Warn),
        ["configuration has no rules; no route publishes events"]
    );
    assert!(configure(&m, Some(b"")).is_some());
    let m = Mock::default();
    assert!(configure(&m, Some(ORDERS.as_bytes())).is_some());
    assert_eq!(
        m.logs(Level::Info),
        ["configured 4 rule(s), sidecar upstream 'sidecar'"]
    );
    let m = Mock::default();
    assert!(configure(&m, Some(br#"{"sidecar":{"timeout_ms":0}}"#)).is_none());
    assert_eq!(
        m.logs(Level::Error),
        ["configuration refused: sidecar.timeout_ms: must be from 1 to 300000"]
    );
}

#[test]
fn without_config_or_rules_everything_passes() {
    let m = post("/orders", "{}");
    let mut s = Stream::new(None, 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Continue);
    assert_eq!(s.on_request_body(&m, 2, true), Flow::Continue);
    assert_eq!(s.on_request_trailers(&m), Flow::Continue);
    assert_eq!(m.effects(), []);
    let mut s = Stream::new(Some(vm("{}")), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Continue);
    assert_eq!(m.effects(), [Effect::Bump(Counter::Requests)]);
    assert_eq!(*m.reads.borrow(), Vec::<String>::new());
}

#[test]
fn untouched_routes_read_only_what_rules_match_on() {
    let m = post("/elsewhere", "{}");
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Continue);
    assert_eq!(s.on_request_body(&m, 2, true), Flow::Continue);
    assert_eq!(m.effects(), [Effect::Bump(Counter::Requests)]);
    // No rule matches on the route name: it is never asked for.
    assert_eq!(*m.reads.borrow(), [":method", ":path"]);
    let by_route = vm(r#"{"rules":[{"match":{"route_name":"r1"},"topic":"t","type":"x"}]}"#);
    let m = Mock {
        route_name: Some("r2"),
        ..post("/orders", "{}")
    };
    assert_eq!(
        Stream::new(Some(by_route), 1).on_request_headers(&m, false),
        Flow::Continue
    );
    assert_eq!(*m.reads.borrow(), ["xds.route_name"]);
}

#[test]
fn bridge_publishes_then_answers_202_with_the_sidecars_answer() {
    let mut m = post("/orders", r#"{"id": 42}"#);
    // 1.5 ms between clock readings: the round trip is one reading, rounded down to 1 ms.
    m.clock_step_ns = 1_500_000;
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    let Some((headers, body)) = m.dispatched() else {
        panic!("no callout: {:?}", m.effects());
    };
    assert_eq!(header(&headers, ":path"), Some("/v1/events"));
    assert_eq!(header(&headers, "eventwire-topic"), Some("orders"));
    assert_eq!(header(&headers, "eventwire-key"), Some("42"));
    assert_eq!(
        header(&headers, "ce-id"),
        Some("07070707-0707-4707-8707-070707070707")
    );
    assert_eq!(body, br#"{"id": 42}"#);
    assert!(matches!(
        &m.actions()[..],
        [Effect::Bump(Counter::Requests), Effect::Dispatch { upstream, timeout_ms: 250, .. }]
            if upstream == "sidecar"
    ));
    // Nothing may continue while the callout is pending.
    assert_eq!(s.on_request_body(&m, 10, true), Flow::Pause);
    assert_eq!(s.on_request_trailers(&m), Flow::Pause);
    answer(&mut m, ACCEPTED, ACCEPTED_BODY);
    s.on_callout_response(&m, 3, ACCEPTED_BODY.len());
    let (status, headers, json) = m.reply();
    assert_eq!(status, 202);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(header(&headers, "location"), Some("/v1/events/e1"));
    assert_eq!(json["status"], "published");
    assert_eq!(m.counters(), [Counter::Accepted]);
    assert!(!m.actions().contains(&Effect::Resume));
    // The trace the filter started (no traceparent came) is the event's and is echoed.
    let started = "00-07070707070707070707070707070707-0707070707070707-01";
    let callout = m.dispatched().map(|(h, _)| h).unwrap_or_default();
    assert_eq!(header(&callout, "ce-traceparent"), Some(started));
    assert_eq!(header(&headers, "traceparent"), Some(started));
    // Counted for its rule (index 0): the body's bytes, the acceptance, one round trip.
    assert_eq!(
        *m.counted.borrow(),
        [
            (Counter::Requests, NO_RULE, 1),
            (Counter::PublishedBytes, 0, 10),
            (Counter::Accepted, 0, 1)
        ]
    );
    assert_eq!(*m.round_trips.borrow(), [(0, 1)]);
    // After our own reply nothing more goes upstream, and a second answer changes nothing.
    assert_eq!(s.on_request_body(&m, 10, true), Flow::Pause);
    s.on_callout_response(&m, 3, ACCEPTED_BODY.len());
    assert_eq!(m.counters(), [Counter::Accepted]);
}

#[test]
fn tap_resumes_after_the_ack() {
    let mut m = post("/payments", r#"{"amount": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    assert!(m.dispatched().is_some());
    answer(&mut m, ACCEPTED, ACCEPTED_BODY);
    s.on_callout_response(&m, 3, ACCEPTED_BODY.len());
    assert_eq!(
        m.actions().last(),
        Some(&Effect::Resume),
        "{:?}",
        m.effects()
    );
    assert_eq!(m.counters(), [Counter::Accepted]);
    let accepted = m
        .counted
        .borrow()
        .iter()
        .find(|c| c.0 == Counter::Accepted)
        .copied();
    assert_eq!(
        accepted,
        Some((Counter::Accepted, 1, 1)),
        "the payments rule's"
    );
}

#[test]
fn an_incoming_trace_is_the_events_and_is_echoed_in_the_202() {
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut m = post("/orders", r#"{"id": 42}"#);
    m.headers
        .push(("traceparent".into(), incoming.as_bytes().to_vec()));
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    let callout = m.dispatched().map(|(h, _)| h).unwrap_or_default();
    assert_eq!(header(&callout, "ce-traceparent"), Some(incoming));
    answer(&mut m, ACCEPTED, ACCEPTED_BODY);
    s.on_callout_response(&m, 3, ACCEPTED_BODY.len());
    let (status, headers, _) = m.reply();
    assert_eq!(status, 202);
    assert_eq!(header(&headers, "traceparent"), Some(incoming));
}

#[test]
fn bodiless_requests_publish_from_the_headers_phase() {
    // Envoy: end_of_stream on the headers.
    let m = Mock::default().with_headers(&[(":method", "GET"), (":path", "/payments")]);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, true), Flow::Pause);
    assert!(m.dispatched().is_some_and(|(_, body)| body.is_empty()));
    // Kong: end_of_stream is never true; no framing header means no body.
    let m = Mock {
        kong: true,
        ..Mock::default().with_headers(&[(":method", "GET"), (":path", "/payments")])
    };
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert!(m.dispatched().is_some());
}

#[test]
fn the_body_is_buffered_until_end_of_stream() {
    let m = post("/payments", r#"{"amount": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(s.on_request_body(&m, 5, false), Flow::Pause);
    assert_eq!(m.actions(), [Effect::Bump(Counter::Requests)]);
    assert_eq!(s.on_request_body(&m, 13, true), Flow::Pause);
    assert!(m.dispatched().is_some());
}

#[test]
fn trailers_end_the_body() {
    let m = post("/payments", r#"{"amount": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(s.on_request_body(&m, 13, false), Flow::Pause);
    assert_eq!(s.on_request_trailers(&m), Flow::Pause);
    assert!(
        m.dispatched()
            .is_some_and(|(_, b)| b == br#"{"amount": 1}"#)
    );
}

#[test]
fn oversize_bodies_are_413_by_length_or_by_size() {
    let big = "x".repeat(65);
    let m = post("/orders", &big);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    let (status, headers, json) = m.reply();
    assert_eq!(status, 413);
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(header(&headers, "retry-after"), None);
    assert_eq!(json["type"], "urn:eventwire:problem:body-too-large");
    assert_eq!(m.counters(), [Counter::Rejected]);
    assert_eq!(s.on_request_body(&m, 65, true), Flow::Pause);
    assert!(m.dispatched().is_none());
    // Chunked: no length up front, so the running size decides.
    let m = Mock::default().with_headers(&[(":method", "POST"), (":path", "/orders")]);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(s.on_request_body(&m, 40, false), Flow::Pause);
    assert_eq!(s.on_request_body(&m, 80, false), Flow::Pause);
    assert_eq!(m.reply().0, 413);
    // Tap passes an oversize request on untouched (its default is passthrough).
    let m = post("/payments", &big);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Continue);
    assert_eq!(m.counters(), [Counter::Rejected, Counter::Passthrough]);
    assert_eq!(s.on_request_body(&m, 65, true), Flow::Continue);
}

#[test]
fn bad_request_data_is_400_on_a_bridge_and_passes_on_a_tap() {
    let m = post("/orders", r#"{"no_id": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    let (status, _, json) = m.reply();
    assert_eq!(status, 400);
    assert_eq!(json["type"], "urn:eventwire:problem:unresolved-value");
    assert_eq!(json["attribute"], "partitionkey");
    assert_eq!(m.counters(), [Counter::Rejected]);
    assert!(m.dispatched().is_none());
    assert_eq!(
        m.logs(Level::Info),
        ["rule orders request refused: partition key from JSON pointer /id: not found in the body"]
    );
    // Bad data on a bridge is refused even with on_failure: passthrough.
    let m = post("/soft", "{nope");
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    assert_eq!(m.reply().0, 400);
    // A tap never turns bad event data into an error by default...
    let m = post("/payments", "{nope");
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(s.on_request_body(&m, 5, true), Flow::Continue);
    assert_eq!(m.counters(), [Counter::Rejected, Counter::Passthrough]);
    assert!(!m.actions().contains(&Effect::Resume));
    // ...unless told to.
    let m = post("/strict", "{nope");
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    assert_eq!(m.reply().0, 400);
}

#[test]
fn a_callout_that_fails_at_once_is_503_or_passes() {
    let m = Mock {
        dispatch_fails: true,
        ..post("/orders", r#"{"id": 1}"#)
    };
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    let (status, headers, json) = m.reply();
    assert_eq!(status, 503);
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    assert_eq!(json["type"], "urn:eventwire:problem:sidecar-unavailable");
    assert_eq!(
        json["detail"],
        "the callout to sidecar upstream 'sidecar' failed at once (BadArgument)"
    );
    assert_eq!(m.counters(), [Counter::Unavailable]);
    let m = Mock {
        dispatch_fails: true,
        ..post("/soft", r#"{"id": 1}"#)
    };
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(s.on_request_body(&m, 9, true), Flow::Continue);
    assert_eq!(m.counters(), [Counter::Unavailable, Counter::Passthrough]);
    assert!(!m.actions().contains(&Effect::Resume));
}

#[test]
fn sidecar_problems_are_relayed_verbatim() {
    let mut m = post("/orders", r#"{"id": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    let problem = r#"{"type":"urn:eventwire:problem:spool-full","status":503}"#;
    answer(
        &mut m,
        &[
            (":status", "503"),
            ("content-type", "application/problem+json"),
            ("retry-after", "1"),
        ],
        problem,
    );
    s.on_callout_response(&m, 3, problem.len());
    let (status, headers, json) = m.reply();
    assert_eq!(status, 503);
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    assert_eq!(json["type"], "urn:eventwire:problem:spool-full");
    assert_eq!(m.counters(), [Counter::Refused]);
    // A 4xx problem without Retry-After.
    let mut m = post("/orders", r#"{"id": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    let problem = r#"{"type":"urn:eventwire:problem:unknown-topic","status":404}"#;
    answer(
        &mut m,
        &[
            (":status", "404"),
            ("content-type", "application/problem+json"),
        ],
        problem,
    );
    s.on_callout_response(&m, 2, problem.len());
    let (status, headers, _) = m.reply();
    assert_eq!((status, header(&headers, "retry-after")), (404, None));
}

#[test]
fn sidecar_refusals_pass_on_by_policy() {
    let problem = r#"{"type":"urn:eventwire:problem:unknown-topic","status":404}"#;
    let not_found: &[(&str, &str)] = &[
        (":status", "404"),
        ("content-type", "application/problem+json"),
    ];
    // Tap: even a 4xx refusal lets the request go on.
    let mut m = post("/payments", "{}");
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    answer(&mut m, not_found, problem);
    s.on_callout_response(&m, 2, problem.len());
    assert_eq!(
        m.actions(),
        [
            Effect::Bump(Counter::Requests),
            m.actions()[1].clone(),
            Effect::Bump(Counter::Refused),
            Effect::Bump(Counter::Passthrough),
            Effect::Resume
        ]
    );
    // A passthrough bridge passes a 5xx refusal on, but not a 4xx one.
    let mut m = post("/soft", r#"{"id": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    answer(
        &mut m,
        &[
            (":status", "503"),
            ("content-type", "application/problem+json"),
        ],
        "{}",
    );
    s.on_callout_response(&m, 2, 2);
    assert_eq!(m.actions().last(), Some(&Effect::Resume));
    let mut m = post("/soft", r#"{"id": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    answer(&mut m, not_found, problem);
    s.on_callout_response(&m, 2, problem.len());
    assert_eq!(m.reply().0, 404);
}

#[test]
fn an_unreachable_sidecar_is_503_with_the_hosts_reason() {
    // Envoy synthesizes a 503/504 without problem+json.
    let mut m = post("/orders", r#"{"id": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    answer(
        &mut m,
        &[(":status", "504"), ("content-type", "text/plain")],
        "upstream request timeout",
    );
    s.on_callout_response(&m, 2, 24);
    let (status, headers, json) = m.reply();
    assert_eq!((status, header(&headers, "retry-after")), (503, Some("1")));
    assert_eq!(
        json["detail"],
        "the event sidecar did not answer within 250 ms"
    );
    assert_eq!(m.counters(), [Counter::Unavailable]);
    // Envoy: an answer without headers (a reset) must not be read (the mock traps).
    let mut m = post("/orders", r#"{"id": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    answer(&mut m, &[], "");
    s.on_callout_response(&m, 0, 0);
    assert_eq!(
        m.reply().2["detail"],
        "the event sidecar could not be reached"
    );
    // Kong: the engine says why in `:dispatch_status`.
    let mut m = Mock {
        kong: true,
        ..post("/orders", r#"{"id": 1}"#)
    };
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    answer(&mut m, &[], "");
    s.on_callout_response(&m, 0, 0);
    assert_eq!(
        m.reply().2["detail"],
        "the event sidecar could not be reached (broken connection)"
    );
    // Tap with passthrough: resumed without the event.
    let mut m = post("/payments", "{}");
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    answer(&mut m, &[], "");
    s.on_callout_response(&m, 0, 0);
    assert_eq!(m.counters(), [Counter::Unavailable, Counter::Passthrough]);
    assert_eq!(m.actions().last(), Some(&Effect::Resume));
}

#[test]
fn a_body_the_proxy_does_not_hand_over_is_never_published_empty() {
    for m in [
        Mock {
            body: None,
            ..post("/orders", r#"{"id": 1}"#)
        },
        Mock {
            body: Some(b"{".to_vec()),
            ..post("/orders", r#"{"id": 1}"#)
        },
        Mock {
            body_fail: true,
            ..post("/orders", r#"{"id": 1}"#)
        },
    ] {
        let mut s = Stream::new(Some(vm(ORDERS)), 1);
        assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
        assert_eq!(s.on_request_body(&m, 9, true), Flow::Pause);
        assert!(m.dispatched().is_none(), "{:?}", m.effects());
        let (status, _, json) = m.reply();
        assert_eq!(status, 500);
        assert_eq!(json["type"], "urn:eventwire:problem:proxy-failure");
        assert_eq!(m.counters(), [Counter::ProxyFailed]);
    }
    // A tap passes the request on (the upstream still gets the body from the proxy).
    let m = Mock {
        body: None,
        ..post("/payments", "{}")
    };
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(s.on_request_body(&m, 2, true), Flow::Continue);
    assert!(m.dispatched().is_none());
    assert_eq!(m.counters(), [Counter::ProxyFailed, Counter::Passthrough]);
    // An empty body the host has nothing for is an empty body.
    let m = Mock {
        body: None,
        ..post("/payments", "")
    };
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(s.on_request_body(&m, 0, true), Flow::Pause);
    assert!(m.dispatched().is_some_and(|(_, b)| b.is_empty()));
}

#[test]
fn unreadable_request_headers_fail_closed_on_a_bridge() {
    let m = Mock {
        headers_fail: true,
        ..post("/orders", "{}")
    };
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(m.reply().0, 500);
    assert_eq!(m.counters(), [Counter::ProxyFailed]);
}

#[test]
fn the_host_flavor_is_asked_once_per_vm() {
    let shared = vm(ORDERS);
    let m = Mock {
        kong: true,
        ..post("/payments", "{}")
    };
    for id in 1..=3 {
        let mut s = Stream::new(Some(shared.clone()), id);
        assert_eq!(s.on_request_headers(&m, false), Flow::Continue);
    }
    let asked = m
        .reads
        .borrow()
        .iter()
        .filter(|r| *r == "ngx.nginx_version")
        .count();
    assert_eq!(asked, 1);
}

#[test]
fn a_failed_random_generator_still_gives_unique_ids() {
    let ids: Vec<String> = (1..=2)
        .map(|id| {
            let m = Mock {
                random_fails: true,
                ..post("/payments", "{}")
            };
            let mut s = Stream::new(Some(vm(ORDERS)), id);
            through_body(&m, &mut s);
            assert_eq!(
                m.logs(Level::Error),
                ["random_get failed; mixing time and context id instead"]
            );
            let Some((headers, _)) = m.dispatched() else {
                panic!("no callout");
            };
            header(&headers, "ce-id").unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(ids[0].len(), 36);
    assert_ne!(ids[0], ids[1]);
}

#[test]
fn body_presence() {
    // Envoy: end_of_stream decides, chunked requests arrive without transfer-encoding.
    assert!(!body_expected(true, None, false, false));
    assert!(body_expected(false, None, false, false));
    assert!(body_expected(false, Some(10), false, false));
    // HTTP/2: content-length 0 without END_STREAM still ends with a (empty) DATA frame.
    assert!(body_expected(false, Some(0), false, false));
    // Kong: end_of_stream is always false; the framing headers decide.
    assert!(!body_expected(false, None, false, true));
    assert!(body_expected(false, None, true, true));
    assert!(body_expected(false, Some(3), false, true));
    assert!(!body_expected(false, Some(0), false, true));
}

/// Kong (ngx_wasm_module) reads the body in nginx's content phase, only after the headers
/// phase continued: a pause in headers is resumed by nothing, and the request hangs. So on
/// Kong the filter continues from headers and pauses in the body phase, having read every
/// header it needs already (Envoy's rule, kept on both).
#[test]
fn kong_continues_from_headers_and_pauses_in_the_body_phase() {
    for (path, body) in [
        ("/orders", r#"{"id": 1}"#),
        ("/payments", r#"{"amount": 1}"#),
    ] {
        let mut m = Mock {
            kong: true,
            ..post(path, body)
        };
        let mut s = Stream::new(Some(vm(ORDERS)), 1);
        assert_eq!(s.on_request_headers(&m, false), Flow::Continue, "{path}");
        assert_eq!(
            m.actions(),
            [Effect::Bump(Counter::Requests)],
            "{path}: nothing before the body"
        );
        let header_reads = m.header_map_reads.get();
        assert_eq!(
            s.on_request_body(&m, body.len(), true),
            Flow::Pause,
            "{path}"
        );
        assert_eq!(
            m.header_map_reads.get(),
            header_reads,
            "{path}: headers are read in the headers phase only"
        );
        assert!(
            m.dispatched().is_some_and(|(_, b)| b == body.as_bytes()),
            "{path}: {:?}",
            m.effects()
        );
        answer(&mut m, ACCEPTED, ACCEPTED_BODY);
        s.on_callout_response(&m, 3, ACCEPTED_BODY.len());
        if path == "/orders" {
            assert_eq!(m.reply().0, 202);
            assert!(
                !m.actions().contains(&Effect::Resume),
                "bridge never resumes"
            );
            // Anything the host calls after our reply keeps the request paused.
            assert_eq!(s.on_request_body(&m, body.len(), true), Flow::Pause);
        } else {
            assert_eq!(m.actions().last(), Some(&Effect::Resume));
        }
    }
}

#[test]
fn envoy_still_pauses_in_headers_when_a_body_follows() {
    let m = post("/orders", r#"{"id": 1}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(m.actions(), [Effect::Bump(Counter::Requests)]);
    let header_reads = m.header_map_reads.get();
    assert_eq!(s.on_request_body(&m, 9, true), Flow::Pause);
    assert_eq!(m.header_map_reads.get(), header_reads);
    assert!(m.dispatched().is_some());
}

/// After `Continue` from headers on Kong, every refusal still comes from the body phase,
/// which pauses: a bridged request never goes on upstream.
#[test]
fn kong_refusals_after_continue_keep_the_request_from_the_upstream() {
    // Bad JSON, and a body over max_body_bytes (64) that no Content-Length announced.
    let big = format!(r#"{{"id": "{}"}}"#, "x".repeat(80));
    for (headers, body, status) in [
        (None, "{not json".to_string(), 400),
        (Some("chunked"), big, 413),
    ] {
        let mut m = Mock {
            kong: true,
            ..post("/orders", &body)
        };
        if let Some(te) = headers {
            m.headers.retain(|(n, _)| n != "content-length");
            m.headers
                .push(("transfer-encoding".into(), te.as_bytes().to_vec()));
        }
        let mut s = Stream::new(Some(vm(ORDERS)), 1);
        assert_eq!(s.on_request_headers(&m, false), Flow::Continue);
        assert_eq!(s.on_request_body(&m, body.len(), true), Flow::Pause);
        assert_eq!(m.reply().0, status, "{:?}", m.effects());
        assert!(m.dispatched().is_none());
        assert!(!m.actions().contains(&Effect::Resume));
    }
    // Refused by the sidecar: its answer is relayed, nothing resumes.
    let mut m = Mock {
        kong: true,
        ..post("/orders", r#"{"id": 1}"#)
    };
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    let refused = r#"{"type":"urn:eventwire:problem:unknown-topic"}"#;
    answer(
        &mut m,
        &[
            (":status", "404"),
            ("content-type", "application/problem+json"),
        ],
        refused,
    );
    s.on_callout_response(&m, 2, refused.len());
    assert_eq!(m.reply().0, 404);
    assert!(!m.actions().contains(&Effect::Resume));
    // Over the limit by Content-Length: refused in the headers phase already (Kong ends the
    // paused request with the local reply).
    let m = Mock {
        kong: true,
        ..post("/orders", &"x".repeat(100))
    };
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(m.reply().0, 413);
}

const BATCHING: &str = r#"{"sidecar": {"upstream": "sidecar", "timeout_ms": 250,
    "batching": {"max_events": 2, "max_in_flight": 1}},
  "rules": [{"name": "orders", "match": {"path": "/orders"}, "topic": "orders",
    "type": "com.example.order.placed", "key": {"json_pointer": "/id"}}]}"#;

fn order(id: u32) -> Mock {
    let body = format!(r#"{{"id": {id}}}"#);
    let mut m = post("/orders", &body);
    m.headers
        .push(("idempotency-key".into(), format!("order-{id}").into_bytes()));
    m
}

/// The token the mock gave its last callout (that callout's position among its effects).
fn last_token(m: &Mock) -> u32 {
    let at = m
        .effects()
        .iter()
        .rposition(|e| matches!(e, Effect::Dispatch { .. }));
    at.map_or(0, |i| i as u32 + 1)
}

fn dispatches(m: &Mock) -> Vec<(Headers, Vec<u8>)> {
    m.effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Dispatch { headers, body, .. } => Some((headers, body)),
            _ => None,
        })
        .collect()
}

/// Under load, events wait for a free callout and go together; each request gets its own
/// event's answer, as if it had called alone.
#[test]
fn waiting_events_go_as_one_batch_and_each_request_gets_its_answer() {
    let vm = vm(BATCHING);
    let host = Mock::default();
    let mut streams: Vec<(Mock, Stream)> = (1..=4)
        .map(|id| (order(id), Stream::new(Some(vm.clone()), id)))
        .collect();
    for (m, s) in &mut streams {
        through_body(m, s);
    }
    // The first has the callout; the others wait, and the first of them wakes the root.
    assert_eq!(dispatches(&streams[0].0).len(), 1);
    let woken: Vec<usize> = streams
        .iter()
        .map(|(m, _)| m.effects().iter().filter(|e| **e == Effect::Wake).count())
        .collect();
    assert_eq!(woken, [0, 1, 0, 0]);
    assert!(streams[1..].iter().all(|(m, _)| dispatches(m).is_empty()));
    assert!(flush(&host, &vm).is_empty());
    assert!(
        dispatches(&host).is_empty(),
        "the one callout is still taken"
    );

    // The first answer frees the callout and wakes the root for the waiting ones.
    let (m, s) = &mut streams[0];
    answer(m, ACCEPTED, ACCEPTED_BODY);
    s.on_callout_response(m, 3, ACCEPTED_BODY.len());
    assert_eq!(m.reply().0, 202);
    assert!(m.effects().contains(&Effect::Wake));
    assert!(flush(&host, &vm).is_empty());
    let sent = dispatches(&host);
    assert_eq!(sent.len(), 1, "max_in_flight 1");
    assert_eq!(
        host.counters(),
        [
            Counter::Batches,
            Counter::BatchedEvents,
            Counter::BatchedEvents
        ]
    );
    let (headers, body) = &sent[0];
    assert_eq!(
        header(headers, "content-type"),
        Some("application/cloudevents-batch+json")
    );
    assert_eq!(header(headers, "eventwire-topic"), Some("orders"));
    assert_eq!(header(headers, "eventwire-key"), None, "keys go per event");
    let events: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(events.as_array().map(Vec::len), Some(2), "max_events 2");
    assert_eq!(events[0]["id"], "order-2");
    assert_eq!(events[0]["partitionkey"], "2");
    assert_eq!(events[1]["id"], "order-3");
    assert_eq!(events[1]["data"]["id"], 3);
    let started = "00-07070707070707070707070707070707-0707070707070707-01";
    assert_eq!(
        events[0]["traceparent"], started,
        "each event keeps its trace"
    );
    let bytes = (Counter::PublishedBytes, 0, body.len() as u64);
    assert!(host.counted.borrow().contains(&bytes));

    // The sidecar's 207: event 2 accepted, event 3 refused; each request gets its share.
    let mut root = Mock::default();
    let batch_body = r#"{"events":[{"id":"order-2","source":"/s","topic":"orders","status":"published","partition":1,"offset":7},
        {"id":"order-3","source":"/s","problem":{"type":"urn:eventwire:problem:idempotency-conflict","status":409}}]}"#;
    answer(
        &mut root,
        &[(":status", "207"), ("content-type", "application/json")],
        batch_body,
    );
    let token = last_token(&host);
    let answers = batch_answered(&root, &vm, token, 2, batch_body.len());
    assert_eq!(answers.iter().map(|(c, _)| *c).collect::<Vec<_>>(), [2, 3]);
    for ((_, a), (m, s)) in answers.iter().zip(&mut streams[1..3]) {
        s.on_answer(m, a);
    }
    let (status, headers, json) = streams[1].0.reply();
    assert_eq!((status, json["offset"].as_u64()), (202, Some(7)));
    assert_eq!(header(&headers, "location"), Some("/v1/events/order-2"));
    assert_eq!(header(&headers, "traceparent"), Some(started));
    assert_eq!(
        *root.round_trips.borrow(),
        [(0, 0)],
        "one round trip: the batch's"
    );
    let (status, headers, json) = streams[2].0.reply();
    assert_eq!((status, json["status"].as_u64()), (409, Some(409)));
    assert_eq!(
        header(&headers, "content-type"),
        Some(problem::CONTENT_TYPE)
    );
    assert_eq!(streams[1].0.counters(), [Counter::Accepted]);
    assert_eq!(streams[2].0.counters(), [Counter::Refused]);

    // The last one went in the next batch; a sidecar that is gone fails it like a callout.
    assert!(flush(&host, &vm).is_empty());
    let token = last_token(&host);
    assert_eq!(dispatches(&host).len(), 2);
    let answers = batch_answered(&Mock::default(), &vm, token, 0, 0);
    let (m, s) = &mut streams[3];
    s.on_answer(m, &answers[0].1);
    assert_eq!(m.reply().0, 503);
    assert_eq!(m.counters(), [Counter::Unavailable]);
    assert!(
        batch_answered(&root, &vm, token, 2, batch_body.len()).is_empty(),
        "answered once"
    );
}

#[test]
fn a_batch_refused_for_one_event_sends_the_others_again() {
    let vm = vm(BATCHING);
    let host = Mock::default();
    let mut first = order(1);
    let mut s1 = Stream::new(Some(vm.clone()), 1);
    through_body(&first, &mut s1);
    let waiting: Vec<(Mock, Stream)> = (2..=3)
        .map(|id| {
            let m = order(id);
            let mut s = Stream::new(Some(vm.clone()), id);
            through_body(&m, &mut s);
            (m, s)
        })
        .collect();
    answer(&mut first, ACCEPTED, ACCEPTED_BODY);
    s1.on_callout_response(&first, 3, ACCEPTED_BODY.len());
    flush(&host, &vm);
    let mut root = Mock::default();
    let refusal = r#"{"type":"urn:eventwire:problem:invalid-cloudevent","status":400,"index":1}"#;
    answer(
        &mut root,
        &[(":status", "400"), ("content-type", problem::CONTENT_TYPE)],
        refusal,
    );
    let token = last_token(&host);
    let answers = batch_answered(&root, &vm, token, 2, refusal.len());
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].0, 3, "the event at index 1 is refused");
    assert_eq!(answers[0].1.status, Some(400));
    flush(&host, &vm);
    let sent = dispatches(&host);
    assert_eq!(sent.len(), 2);
    let events: serde_json::Value = serde_json::from_slice(&sent[1].1).unwrap();
    assert_eq!(events[0]["id"], "order-2", "the other goes again");
    assert_eq!(events.as_array().map(Vec::len), Some(1));
    drop(waiting);
}

#[test]
fn without_wake_ups_or_on_kong_every_event_goes_alone() {
    for kong in [false, true] {
        let vm = vm(BATCHING);
        let mut a = order(1);
        a.kong = kong;
        let mut s = Stream::new(Some(vm.clone()), 1);
        through_body(&a, &mut s);
        let mut b = order(2);
        b.kong = kong;
        b.wake_fails = true;
        let mut s2 = Stream::new(Some(vm.clone()), 2);
        through_body(&b, &mut s2);
        assert_eq!(
            dispatches(&b).len(),
            1,
            "kong {kong}: the second went alone too"
        );
        assert_eq!(
            header(&dispatches(&b)[0].0, "eventwire-key"),
            Some("2"),
            "binary mode"
        );
        assert_eq!(b.logs(Level::Error).len(), usize::from(!kong));
        // A later event does not even try to wait.
        let mut c = order(3);
        c.kong = kong;
        let mut s3 = Stream::new(Some(vm.clone()), 3);
        through_body(&c, &mut s3);
        assert_eq!(dispatches(&c).len(), 1);
        assert!(!c.effects().contains(&Effect::Wake));
    }
}

#[test]
fn a_request_that_goes_away_frees_its_callout() {
    let vm = vm(BATCHING);
    let a = order(1);
    let mut s1 = Stream::new(Some(vm.clone()), 1);
    through_body(&a, &mut s1);
    let b = order(2);
    let mut s2 = Stream::new(Some(vm.clone()), 2);
    through_body(&b, &mut s2);
    assert!(dispatches(&b).is_empty());
    let gone = Mock::default();
    s1.on_drop(&gone);
    assert!(
        !gone.effects().contains(&Effect::Wake),
        "already woken once"
    );
    let host = Mock::default();
    flush(&host, &vm);
    assert_eq!(dispatches(&host).len(), 1, "the waiting event goes");
}

#[test]
fn the_ingest_secret_goes_on_every_callout_and_a_missing_one_refuses_the_config() {
    let host = Mock::default();
    let cfg = |secret: &str| {
        format!(
            r#"{{"sidecar": {{"upstream": "sidecar", "secret": {secret},
              "batching": {{"max_in_flight": 1}}}},
              "rules": [{{"match": {{"path": "/orders"}}, "topic": "orders", "type": "t"}}]}}"#
        )
    };
    let from_env = cfg(r#"{"env": "EVENTWIRE_INGEST_SECRET"}"#);
    let Some(c) = configure(&host, Some(from_env.as_bytes())) else {
        panic!("refused: {:?}", host.logs(Level::Error));
    };
    let vm = Vm::new(c);
    let m = order(1);
    let mut s = Stream::new(Some(vm.clone()), 1);
    through_body(&m, &mut s);
    let (headers, _) = m.dispatched().unwrap();
    assert_eq!(
        header(&headers, "authorization"),
        Some("Bearer 0123456789abcdef-env")
    );
    let m2 = order(2);
    let mut s2 = Stream::new(Some(vm.clone()), 2);
    through_body(&m2, &mut s2);
    let root = Mock::default();
    flush(&root, &vm);
    answer(&mut Mock::default(), ACCEPTED, ACCEPTED_BODY);
    s.on_callout_response(&Mock::default(), 0, 0);
    flush(&root, &vm);
    let batches = dispatches(&root);
    assert_eq!(batches.len(), 1, "{:?}", root.effects());
    assert_eq!(
        header(&batches[0].0, "authorization"),
        Some("Bearer 0123456789abcdef-env"),
        "batches carry it too"
    );

    let inline = cfg(r#"{"value": "0123456789abcdef-inline"}"#);
    let c = configure(&host, Some(inline.as_bytes())).unwrap();
    assert_eq!(
        c.sidecar.authorization.as_deref(),
        Some("Bearer 0123456789abcdef-inline")
    );
    let host = Mock::default();
    let unset = cfg(r#"{"env": "NO_SUCH_VARIABLE"}"#);
    assert!(configure(&host, Some(unset.as_bytes())).is_none());
    let logged = host.logs(Level::Error).join("\n");
    assert!(
        logged.contains("sidecar.secret.env") && logged.contains("NO_SUCH_VARIABLE"),
        "{logged}"
    );
}

#[test]
fn the_redaction_key_reaches_the_rules_that_redact_and_a_missing_one_refuses_the_config() {
    let cfg = |key: &str| {
        format!(
            r#"{{"redaction_key": {key}, "rules": [
              {{"name": "a", "topic": "orders", "type": "t",
                "redact": [{{"pointer": "/email", "action": "hash"}}]}},
              {{"name": "b", "topic": "audit", "type": "t"}}]}}"#
        )
    };
    let host = Mock::default();
    let c = configure(
        &host,
        Some(cfg(r#"{"env": "EVENTWIRE_INGEST_SECRET"}"#).as_bytes()),
    )
    .unwrap_or_else(|| panic!("refused: {:?}", host.logs(Level::Error)));
    assert_eq!(c.rules[0].redaction_key, b"0123456789abcdef-env");
    assert!(
        c.rules[1].redaction_key.is_empty(),
        "a rule that redacts nothing holds no key"
    );
    let host = Mock::default();
    assert!(configure(&host, Some(cfg(r#"{"env": "NO_SUCH_KEY"}"#).as_bytes())).is_none());
    let logged = host.logs(Level::Error).join("\n");
    assert!(
        logged.contains("redaction_key.env") && logged.contains("NO_SUCH_KEY"),
        "{logged}"
    );
}

const AFTER: &str = r#"{"sidecar": {"upstream": "sidecar", "timeout_ms": 250},
  "rules": [
    {"name": "created", "match": {"path": "/orders"}, "mode": "after_upstream",
     "topic": "orders", "type": "com.example.order.created", "publish_on": [201],
     "response": {"key": {"json_pointer": "/id"}, "status": "httpstatus",
                  "headers": {"location": "location"}, "body": {"/state": "orderstate"}}},
    {"name": "soft", "match": {"path": "/soft"}, "mode": "after_upstream",
     "on_failure": "passthrough", "topic": "soft", "type": "t",
     "response": {"headers": {"location": "location"}}}
  ]}"#;

/// An after_upstream request through the request phase: the request goes on, no callout.
fn upstream_bound(path: &str, body: &str) -> (Mock, Stream) {
    let m = post(path, body);
    let mut s = Stream::new(Some(vm(AFTER)), 1);
    assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
    assert_eq!(
        s.on_request_body(&m, body.len(), true),
        Flow::Continue,
        "the request goes upstream: {:?}",
        m.effects()
    );
    assert!(
        m.dispatched().is_none(),
        "nothing published before the answer"
    );
    (m, s)
}

#[test]
fn after_upstream_publishes_with_the_answers_values_then_passes_it_on() {
    let (mut m, mut s) = upstream_bound("/orders", r#"{"item":"book"}"#);
    m.response_headers = vec![(":status", "201"), ("location", "/orders/ord-7")];
    m.response_body = Some(br#"{"id":"ord-7","state":"created"}"#.to_vec());
    assert_eq!(s.on_response_headers(&m, false), Flow::Pause);
    assert!(m.dispatched().is_none(), "the body is read first");
    assert_eq!(s.on_response_body(&m, 10, false), Flow::Pause);
    assert_eq!(s.on_response_body(&m, 32, true), Flow::Pause);
    let (headers, body) = m.dispatched().expect("published after the answer");
    assert_eq!(
        body, br#"{"item":"book"}"#,
        "the event's data is the request"
    );
    assert_eq!(header(&headers, "ce-httpstatus"), Some("201"));
    assert_eq!(header(&headers, "ce-location"), Some("/orders/ord-7"));
    assert_eq!(header(&headers, "ce-orderstate"), Some("created"));
    assert_eq!(header(&headers, "eventwire-key"), Some("ord-7"));
    assert_eq!(
        header(&headers, "ce-type"),
        Some("com.example.order.created")
    );
    answer(&mut m, ACCEPTED, ACCEPTED_BODY);
    s.on_callout_response(&m, 3, ACCEPTED_BODY.len());
    // The answer's body callbacks while waiting kept it held; none come after.
    assert_answer_resumed(&m);
}

/// The upstream's answer went on, unchanged, after the sidecar accepted the event.
fn assert_answer_resumed(m: &Mock) {
    assert_eq!(m.actions().last(), Some(&Effect::ResumeResponse));
    assert_eq!(m.counters(), [Counter::Accepted]);
    assert!(
        !m.actions()
            .iter()
            .any(|e| matches!(e, Effect::Reply { .. }))
    );
}

#[test]
fn after_upstream_outside_publish_on_publishes_nothing() {
    let (m, mut s) = upstream_bound("/orders", "{}");
    let mut m = m;
    m.response_headers = vec![(":status", "409")];
    assert_eq!(s.on_response_headers(&m, false), Flow::Continue);
    assert_eq!(s.on_response_body(&m, 100, true), Flow::Continue);
    assert!(m.dispatched().is_none());
    assert_eq!(m.counters(), [Counter::UpstreamSkipped]);
}

#[test]
fn after_upstream_sidecar_down_rejects_or_passes_the_answer_on() {
    // reject (the default): the answer is replaced by a 503.
    let (mut m, mut s) = upstream_bound("/orders", "{}");
    m.response_headers = vec![(":status", "201")];
    m.response_body = Some(br#"{"id":"ord-1"}"#.to_vec());
    s.on_response_headers(&m, false);
    s.on_response_body(&m, 14, true);
    answer(&mut m, &[], "");
    s.on_callout_response(&m, 0, 0);
    assert_eq!(m.reply().0, 503);
    assert!(!m.actions().contains(&Effect::ResumeResponse));
    // passthrough: the answer goes on, counted.
    let (mut m, mut s) = upstream_bound("/soft", "{}");
    m.response_headers = vec![(":status", "200")];
    assert_eq!(
        s.on_response_headers(&m, true),
        Flow::Pause,
        "no body needed"
    );
    answer(&mut m, &[], "");
    s.on_callout_response(&m, 0, 0);
    assert_eq!(m.actions().last(), Some(&Effect::ResumeResponse));
    assert_eq!(m.counters(), [Counter::Unavailable, Counter::Passthrough]);
}

#[test]
fn after_upstream_answer_without_the_key_fails_as_configured() {
    let (mut m, mut s) = upstream_bound("/orders", "{}");
    m.response_headers = vec![(":status", "201")];
    m.response_body = Some(br#"{"state":"created"}"#.to_vec());
    s.on_response_headers(&m, false);
    assert_eq!(s.on_response_body(&m, 19, true), Flow::Pause);
    assert!(m.dispatched().is_none());
    let (status, _, body) = m.reply();
    assert_eq!(status, 502);
    assert_eq!(
        body["type"],
        "urn:eventwire:problem:unusable-upstream-answer"
    );
}

#[test]
fn after_upstream_refuses_structured_events_and_kong() {
    let mut m = post("/orders", r#"{"specversion":"1.0"}"#);
    m.headers.retain(|(n, _)| n != "content-type");
    m.headers.push((
        "content-type".into(),
        b"application/cloudevents+json".to_vec(),
    ));
    let mut s = Stream::new(Some(vm(AFTER)), 1);
    s.on_request_headers(&m, false);
    assert_eq!(s.on_request_body(&m, 21, true), Flow::Pause);
    assert_eq!(m.reply().0, 400);
    let mut kong = post("/orders", "{}");
    kong.kong = true;
    let mut s = Stream::new(Some(vm(AFTER)), 1);
    s.on_request_headers(&kong, false);
    s.on_request_body(&kong, 2, true);
    assert_eq!(kong.reply().0, 500);
    assert!(kong.logs(Level::Error)[0].contains("not possible on Kong"));
}

/// Envoy runs the filter's own local replies (a bridge's 202, a 503) through the response
/// callbacks too: they must pass, or the client waits for the body until a timeout.
#[test]
fn own_local_replies_pass_the_response_callbacks() {
    let mut m = post("/orders", r#"{"id": "o-1"}"#);
    let mut s = Stream::new(Some(vm(ORDERS)), 1);
    through_body(&m, &mut s);
    answer(&mut m, ACCEPTED, ACCEPTED_BODY);
    s.on_callout_response(&m, 3, ACCEPTED_BODY.len());
    assert_eq!(m.reply().0, 202);
    assert_eq!(s.on_response_headers(&m, false), Flow::Continue);
    assert_eq!(s.on_response_body(&m, 30, true), Flow::Continue);
}

/// Held answers under load: the events wait for the rule's callout and go as one batch,
/// each with the values of its own answer; each answer is resumed by its share.
#[test]
fn after_upstream_events_wait_and_go_as_one_batch() {
    const CFG: &str = r#"{"sidecar": {"upstream": "sidecar", "timeout_ms": 250,
      "batching": {"max_events": 8, "max_in_flight": 1}},
      "rules": [{"name": "created", "match": {"path": "/orders"}, "mode": "after_upstream",
        "topic": "orders", "type": "com.example.order.created",
        "response": {"key": {"header": "location"}, "status": "httpstatus"}}]}"#;
    const LOCATIONS: [&str; 3] = ["/orders/ord-1", "/orders/ord-2", "/orders/ord-3"];
    let vm = vm(CFG);
    let host = Mock::default();
    let mut streams: Vec<(Mock, Stream)> = (1..=3)
        .zip(LOCATIONS)
        .map(|(id, location)| {
            let body = format!(r#"{{"n":{id}}}"#);
            let mut m = post("/orders", &body);
            let mut s = Stream::new(Some(vm.clone()), id);
            assert_eq!(s.on_request_headers(&m, false), Flow::Pause);
            assert_eq!(s.on_request_body(&m, body.len(), true), Flow::Continue);
            m.response_headers = vec![(":status", "201"), ("location", location)];
            assert_eq!(s.on_response_headers(&m, false), Flow::Pause);
            (m, s)
        })
        .collect();
    assert_eq!(dispatches(&streams[0].0).len(), 1, "the first goes alone");
    assert!(streams[1..].iter().all(|(m, _)| dispatches(m).is_empty()));

    let (m, s) = &mut streams[0];
    answer(m, ACCEPTED, ACCEPTED_BODY);
    s.on_callout_response(m, 3, ACCEPTED_BODY.len());
    assert_eq!(m.actions().last(), Some(&Effect::ResumeResponse));
    assert!(flush(&host, &vm).is_empty());
    let sent = dispatches(&host);
    assert_eq!(sent.len(), 1, "the two waiting went together");
    let events: serde_json::Value = serde_json::from_slice(&sent[0].1).unwrap();
    let keys: Vec<&str> = (0..2)
        .filter_map(|i| events[i]["partitionkey"].as_str())
        .collect();
    assert_eq!(
        keys,
        ["/orders/ord-2", "/orders/ord-3"],
        "each its answer's"
    );
    assert_eq!(events[1]["httpstatus"], "201");
    assert_eq!(events[1]["data"]["n"], 3);

    let mut root = Mock::default();
    let batch_body = r#"{"events":[{"id":"a","source":"/s","topic":"orders","status":"published","partition":0,"offset":1},
        {"id":"b","source":"/s","topic":"orders","status":"published","partition":0,"offset":2}]}"#;
    answer(
        &mut root,
        &[(":status", "200"), ("content-type", "application/json")],
        batch_body,
    );
    let answers = batch_answered(&root, &vm, last_token(&host), 2, batch_body.len());
    assert_eq!(answers.iter().map(|(c, _)| *c).collect::<Vec<_>>(), [2, 3]);
    for ((_, a), (m, s)) in answers.iter().zip(&mut streams[1..]) {
        s.on_answer(m, a);
        assert_answer_resumed(m);
    }
}
