//! An arbitrary request on an enabled route through `callout::build` with a fixed rule set
//! (every key/subject source, bridge and tap, with and without `source`): must never panic,
//! and a callout it builds must be sendable (pseudo-headers first, no CR/LF/NUL anywhere in
//! the headers, the body passed through untouched). Also `verdict`, the header codec and the
//! time/id helpers the callout uses.
#![no_main]

use arbitrary::Arbitrary;
use eventwire::cloudevent;
use eventwire::config::{self, Config};
use eventwire::callout::{self, Request, Stamp};
use eventwire::{answer, stream};
use eventwire_contract::header_value;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const CONFIG: &str = r#"{
  "sidecar": {"upstream": "eventwire_sidecar", "timeout_ms": 5000},
  "max_body_bytes": 1048576,
  "rules": [
    {"name": "orders", "match": {"route_name": "orders-placed"}, "mode": "bridge",
     "topic": "order-placed-events", "type": "com.example.order.placed", "source": "/shop/orders",
     "key": {"json_pointer": "/id"}, "extensions": {"x-tenant-id": "tenant"}},
    {"name": "payments", "match": {"method": "POST", "path": "/payments"}, "mode": "tap",
     "topic": "payments", "type": "com.example.payment", "key": {"json_pointer": "/order/id"},
     "subject": {"json_pointer": "/customer"}},
    {"name": "by-header", "match": {"path": "/h/**"}, "topic": "h", "type": "t",
     "key": {"header": "x-order"}, "subject": {"header": "x-subject"}},
    {"name": "by-path", "match": {"path": "/shops/{shop}/orders/*"}, "topic": "p", "type": "t",
     "key": {"path_param": "shop"}, "subject": {"path_param": "shop"}},
    {"name": "plain", "topic": "plain", "type": "t", "on_failure": "passthrough"}
  ]
}"#;

fn config() -> &'static Config {
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| match config::parse(CONFIG.as_bytes()) {
        Ok(c) => c,
        Err(e) => panic!("fixed fuzz config refused: {e}"),
    })
}

#[derive(Arbitrary, Debug)]
enum Name {
    ContentType,
    SpecVersion,
    Id,
    Source,
    Type,
    Subject,
    Time,
    IdempotencyKey,
    Tenant,
    Order,
    XSubject,
    ContentLength,
    Ce(String),
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Val {
    Json,
    Structured,
    Batch,
    TextPlain,
    One,
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    rule: u8,
    scheme: String,
    authority: String,
    path: String,
    headers: Vec<(Name, Val)>,
    body: Vec<u8>,
    now_nanos: u64,
    random: [u8; 16],
    status: Option<u16>,
    content_type: Option<Vec<u8>>,
    dispatch: Option<Vec<u8>>,
    content_length: Option<u64>,
    flags: u8,
}

/// What a proxy can hand the filter: header values without CR, LF or NUL (names likewise,
/// below). Anything else here is a finding about the filter, not about the harness.
fn field_value(mut v: Vec<u8>) -> Vec<u8> {
    v.retain(|b| !matches!(b, b'\r' | b'\n' | 0));
    v
}

fn header(name: Name, value: Val) -> (String, Vec<u8>) {
    let name = match name {
        Name::ContentType => "content-type".to_string(),
        Name::SpecVersion => "ce-specversion".into(),
        Name::Id => "ce-id".into(),
        Name::Source => "ce-source".into(),
        Name::Type => "ce-type".into(),
        Name::Subject => "ce-subject".into(),
        Name::Time => "ce-time".into(),
        Name::IdempotencyKey => "idempotency-key".into(),
        Name::Tenant => "x-tenant-id".into(),
        Name::Order => "x-order".into(),
        Name::XSubject => "x-subject".into(),
        Name::ContentLength => "content-length".into(),
        Name::Ce(s) => format!("ce-{}", s.to_ascii_lowercase()),
        Name::Other(s) => s.to_ascii_lowercase(),
    };
    let value = match value {
        Val::Json => b"application/json".to_vec(),
        Val::Structured => b"application/cloudevents+json; charset=utf-8".to_vec(),
        Val::Batch => b"application/cloudevents-batch+json".to_vec(),
        Val::TextPlain => b"text/plain".to_vec(),
        Val::One => b"1.0".to_vec(),
        Val::Bytes(b) => b,
    };
    // Proxies refuse CR, LF and NUL in header names as in values.
    let name = name.replace(['\r', '\n', '\0'], "");
    (name, field_value(value))
}

fn clean(s: &str) -> bool {
    !s.contains(['\r', '\n', '\0'])
}

fuzz_target!(|input: Input| {
    let cfg = config();
    let rule = &cfg.rules[usize::from(input.rule) % cfg.rules.len()];
    let headers: Vec<(String, Vec<u8>)> = input
        .headers
        .into_iter()
        .map(|(n, v)| header(n, v))
        .collect();
    let (scheme, authority, path) = (
        input.scheme.replace(['\r', '\n', '\0'], ""),
        input.authority.replace(['\r', '\n', '\0'], ""),
        input.path.replace(['\r', '\n', '\0'], ""),
    );
    let req = Request {
        scheme: &scheme,
        authority: &authority,
        path: &path,
        headers: &headers,
        body: &input.body,
    };
    let stamp = Stamp {
        now_nanos: input.now_nanos,
        random: input.random,
    };
    let _ = cfg.find(Some("orders-placed"), "POST", &path);
    match callout::build(rule, &cfg.sidecar, &req, &stamp) {
        Ok(callout) => {
            let names: Vec<&str> = callout.headers.iter().map(|(n, _)| n.as_ref()).collect();
            assert_eq!(&names[..4], [":method", ":path", ":authority", ":scheme"]);
            for (n, v) in &callout.headers {
                assert!(clean(n) && clean(v), "header {n:?}: {v:?}");
                assert!(!n.is_empty());
            }
            assert_eq!(callout.body, &input.body[..]);
            if let Some(id) = &callout.id {
                assert!(!id.is_empty());
            }
        }
        Err(e) => {
            let status = e.status();
            assert!((400..600).contains(&status), "{e:?}");
            assert!(!e.to_string().is_empty());
            let body: serde_json::Value = match serde_json::from_slice(&e.body()) {
                Ok(v) => v,
                Err(err) => panic!("problem body is not JSON: {err}"),
            };
            assert_eq!(body["status"], status);
        }
    }

    let _ = answer::verdict(
        input.status,
        input.content_type.as_deref(),
        input.dispatch.as_deref(),
        5000,
    );
    let _ = stream::body_expected(
        input.flags & 1 != 0,
        input.content_length,
        input.flags & 2 != 0,
        input.flags & 4 != 0,
    );

    // Header codec: whatever is encoded decodes back to the same bytes.
    let encoded = header_value::encode(&input.body);
    assert!(encoded.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    if let Ok(text) = std::str::from_utf8(&input.body) {
        assert_eq!(header_value::decode(&encoded).as_deref(), Ok(text));
    }
    let t = cloudevent::rfc3339(input.now_nanos);
    assert!(t.len() >= 27 && t.ends_with('Z'), "{t}");
    assert_eq!(cloudevent::uuid_v4(input.random).len(), 36);
    for (_, v) in &headers {
        let _ = cloudevent::idempotency_id(v);
        if let Ok(s) = std::str::from_utf8(v) {
            let _ = cloudevent::percent_decode(s);
            let _ = cloudevent::incoming_mode(Some(s), true);
            let _ = cloudevent::is_json(s);
        }
    }
});
