//! The same built `.wasm` on Kong's semantics: through the Kong stand-in (`tests/kong-host`,
//! ngx_wasm_module's proxy-wasm behaviour on wasmtime) running the shipped `kong/kong.yml`
//! and `kong/kong.conf`, the real sidecar and the real broker.

use eventwire::config;
use eventwire_e2e::*;
use serde_json::Value;
use std::time::Duration;

const ORDERS: &str = "order-placed-events";
const PAYMENTS: &str = "payment-requested-events";
const WAIT: Duration = Duration::from_secs(10);
/// A request through the host that has no answer by then is taken as hung (the failure
/// this suite exists to catch: a filter pausing where Kong never resumes it).
const HANG: Duration = Duration::from_secs(30);

struct KongStack {
    kong: KongHost,
    upstream: Upstream,
    sidecar: Sidecar,
    broker: Broker,
    http: reqwest::Client,
}

impl KongStack {
    async fn start(topics: &[(&str, i32)]) -> KongStack {
        Self::start_with(&KongConfig::shipped(), topics).await
    }

    async fn start_with(cfg: &KongConfig, topics: &[(&str, i32)]) -> KongStack {
        let broker = Broker::start().await;
        for (t, partitions) in topics {
            broker.create_topic(t, *partitions).await;
        }
        // Secured as in production: the filter's callouts carry the secret on Kong too.
        let sidecar = Sidecar::start_secured(&broker.bootstrap(), &[]).await;
        sidecar.wait_ready().await;
        let upstream = Upstream::start().await;
        let cfg = cfg.with_ingest_secret(INGEST_SECRET);
        let kong = KongHost::start(&cfg, sidecar.port, upstream.port).await;
        KongStack {
            kong,
            upstream,
            sidecar,
            broker,
            http: reqwest::Client::builder()
                .timeout(HANG)
                .build()
                .unwrap_or_else(|e| panic!("client: {e}")),
        }
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let mut req = self.http.post(self.kong.url(path)).body(body.to_vec());
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = req.send().await.unwrap_or_else(|e| {
            panic!(
                "POST {path}: {e} (no answer within {HANG:?}: hung?); kong-host log:\n{}",
                self.kong.proc.log_tail()
            )
        });
        let status = resp.status().as_u16();
        let hdrs = resp
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        (status, hdrs, body)
    }
}

/// One raw HTTP/1.1 exchange (for chunked and oversize bodies).
async fn raw(port: u16, request: Vec<u8>) -> Answer {
    match raw_http::exchange(port, request, HANG).await {
        Ok(r) => (r.status, r.headers, r.body),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bridge_tap_and_untouched_routes_through_kong() {
    let s = KongStack::start(&[(ORDERS, 3), (PAYMENTS, 1)]).await;
    let order =
        br#"{"id":"ord-1001","customer":"c-42","items":[{"sku":"A1","qty":2}],"total":99.5}"#;
    let resp = s
        .post(
            "/orders",
            &[
                ("content-type", "application/json"),
                ("x-tenant-id", "acme"),
            ],
            order,
        )
        .await;
    assert_eq!(resp.0, 202, "{}", String::from_utf8_lossy(&resp.2));
    assert_eq!(header(&resp.1, "content-type"), Some("application/json"));
    // Kong's engine appends a newline to every local response body.
    assert!(
        resp.2.ends_with(b"}\n"),
        "{:?}",
        String::from_utf8_lossy(&resp.2)
    );
    let ack = json_of(&resp.2);
    let id = ack["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(id.len(), 36, "uuid expected: {ack}");
    assert_eq!(ack["topic"], ORDERS);
    assert_eq!(
        header(&resp.1, "location"),
        Some(format!("/v1/events/{id}").as_str())
    );

    let recs = s.broker.records(ORDERS, 1, WAIT);
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.key_str(), Some("ord-1001"));
    assert_eq!(r.header("ce_id"), Some(id.as_str()));
    assert_eq!(r.header("ce_type"), Some("com.example.order.placed"));
    assert_eq!(r.header("ce_source"), Some("/shop/orders"));
    assert_eq!(r.header("ce_tenant"), Some("acme"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.value.as_deref(), Some(&order[..]));
    // The trace the filter started is the event's, and the 202 names it.
    let trace = header(&resp.1, "traceparent");
    assert!(trace.is_some_and(|t| t.len() == 55), "{:?}", resp.1);
    assert_eq!(r.header("ce_traceparent"), trace);
    assert_eq!(ack["partition"], r.partition);
    assert_eq!(ack["offset"], r.offset);
    assert!(
        s.upstream.received().is_empty(),
        "bridge must not reach the upstream"
    );

    // The status route goes to the sidecar as a plain Kong service.
    let status = s
        .http
        .get(s.kong.url(&format!("/v1/events/{id}")))
        .send()
        .await
        .unwrap_or_else(|e| panic!("status: {e}"));
    assert_eq!(status.status().as_u16(), 200);
    let status: Value = status.json().await.unwrap_or_default();
    assert_eq!(status["status"], "published", "{status}");
    // So does the push route: a WebSocket upgrade through the host to the sidecar.
    let ws_url = format!(
        "ws://127.0.0.1:{}{}",
        s.kong.port,
        push::subscribe_path(ORDERS, &[("from", "earliest")])
    );
    let mut ws = push::WsClient::connect(&ws_url).await;
    let frames = ws.take(1, WAIT).await;
    assert_eq!(frames.len(), 1, "no event over the WebSocket through Kong");
    assert_eq!(frames[0]["key"], "ord-1001", "{}", frames[0]);
    assert_eq!(frames[0]["event"]["id"], id.as_str(), "{}", frames[0]);
    ws.close().await;

    // Tap: the upstream gets the request byte-exact, and the event is published.
    let pay = br#"{"order_id":"ord-1001","amount":99.5}"#;
    let resp = s
        .post("/payments", &[("content-type", "application/json")], pay)
        .await;
    assert_eq!(resp.0, 200, "{}", String::from_utf8_lossy(&resp.2));
    assert_eq!(json_of(&resp.2)["upstream"], "demo");
    let got = s.upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].method.as_str(), got[0].path.as_str()),
        ("POST", "/payments")
    );
    assert_eq!(got[0].body, pay);
    let ct = got[0].headers.iter().find(|(n, _)| n == "content-type");
    assert_eq!(ct.map(|(_, v)| v.as_str()), Some("application/json"));
    let pays = s.broker.records(PAYMENTS, 1, WAIT);
    assert_eq!(pays.len(), 1);
    assert_eq!(pays[0].key_str(), Some("ord-1001"));
    assert_eq!(
        pays[0].header("ce_type"),
        Some("com.example.payment.requested")
    );
    assert_eq!(pays[0].value.as_deref(), Some(&pay[..]));

    // Untouched: a route without a filter chain, and a request on the orders route that
    // no rule matches. Upstream only, no event.
    let get = s.http.get(s.kong.url("/products?page=2")).send().await;
    assert_eq!(get.map(|r| r.status().as_u16()).ok(), Some(200));
    let other = s
        .post(
            "/orders/ord-1001/notes",
            &[("content-type", "application/json")],
            b"{}",
        )
        .await;
    assert_eq!(other.0, 200);
    let got = s.upstream.received();
    assert_eq!(got.len(), 3);
    assert_eq!(got[1].path, "/products?page=2");
    assert_eq!(got[2].path, "/orders/ord-1001/notes");
    assert_eq!(s.broker.all_records(ORDERS).len(), 1);
    assert_eq!(s.broker.all_records(PAYMENTS).len(), 1);
    assert_eq!(s.kong.counter("eventwire_events_accepted_total").await, 2);
    assert_eq!(s.kong.counter("eventwire_passthrough_total").await, 0);
    // Counted per rule, in the names meta.json's label_patterns turn into a `rule` label.
    for rule in ["orders", "payments"] {
        let accepted = s.kong.rule_counter("eventwire_events_accepted_total", rule);
        assert_eq!(accepted.await, Some(1), "{rule}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecar_down_answers_503_then_recovers() {
    let mut s = KongStack::start(&[(ORDERS, 1), (PAYMENTS, 1)]).await;
    let order = br#"{"id":"ord-2001"}"#;
    let json = ("content-type", "application/json");
    s.sidecar.proc.stop();

    let resp = s.post("/orders", &[json], order).await;
    let p = assert_problem(&resp, 503, "sidecar-unavailable");
    assert_eq!(header(&resp.1, "retry-after"), Some("1"));
    // Kong reports the failure as `:dispatch_status`, not as a synthesized 503.
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("broken connection")),
        "{p}"
    );
    // Tap passes through without an event while the sidecar is down.
    let pay = br#"{"order_id":"ord-2001"}"#;
    let resp = s.post("/payments", &[json], pay).await;
    assert_eq!(resp.0, 200);
    assert_eq!(s.upstream.received().len(), 1);

    s.sidecar.restart().await;
    s.sidecar.wait_ready().await;
    let resp = s.post("/orders", &[json], order).await;
    assert_eq!(resp.0, 202, "{}", String::from_utf8_lossy(&resp.2));
    let recs = s.broker.records(ORDERS, 1, WAIT);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].key_str(), Some("ord-2001"));
    assert!(s.broker.all_records(PAYMENTS).is_empty());
    assert_eq!(
        s.kong.counter("eventwire_sidecar_unavailable_total").await,
        2
    );
    assert_eq!(s.kong.counter("eventwire_passthrough_total").await, 1);
    assert_eq!(s.kong.counter("eventwire_events_accepted_total").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_bodies_and_bodiless_posts_through_kong() {
    let s = KongStack::start(&[(ORDERS, 1), (PAYMENTS, 1)]).await;
    let json = ("content-type", "application/json");

    let resp = s.post("/orders", &[json], br#"{"id":"#).await;
    assert_problem(&resp, 400, "invalid-json");

    // Over max_body_bytes (1 MiB) by Content-Length: refused in the headers step.
    let big = vec![b' '; 1024 * 1024 + 1];
    let mut req = format!(
        "POST /orders HTTP/1.1\r\nhost: shop\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    assert_problem(&raw(s.kong.port, req).await, 413, "body-too-large");

    // Chunked, no Content-Length: the body step sees the whole 1.5 MB (kong.conf keeps
    // bodies up to 2m in memory) and refuses it.
    let mut req = b"POST /orders HTTP/1.1\r\nhost: shop\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for _ in 0..24 {
        req.extend_from_slice(format!("{:x}\r\n", 65536).as_bytes());
        req.extend_from_slice(&[b' '; 65536]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    assert_problem(&raw(s.kong.port, req).await, 413, "body-too-large");

    // A chunked body within the limit is bridged like any other.
    let body = br#"{"id":"ord-chunked"}"#;
    let mut req = b"POST /orders HTTP/1.1\r\nhost: shop\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    req.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
    req.extend_from_slice(body);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    let resp = raw(s.kong.port, req).await;
    assert_eq!(resp.0, 202, "{}", String::from_utf8_lossy(&resp.2));

    // Empty POSTs: Kong never calls the body callback; the filter must not wait for it.
    let resp = s.post("/orders", &[json], b"").await;
    let p = assert_problem(&resp, 400, "unresolved-value");
    assert!(
        p["detail"].as_str().is_some_and(|d| d.contains("/id")),
        "{p}"
    );
    let resp = s.post("/payments", &[json], b"").await;
    assert_eq!(resp.0, 200, "tap passes a request it cannot publish");
    let got = s.upstream.received();
    assert_eq!(got.len(), 1);
    assert!(got[0].body.is_empty());

    let recs = s.broker.all_records(ORDERS);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].key_str(), Some("ord-chunked"));
    assert!(s.broker.all_records(PAYMENTS).is_empty());
    assert_eq!(s.kong.counter("eventwire_requests_rejected_total").await, 5);
}

const FIXTURE_KONG_YML: &str = r#"
_format_version: "3.0"
services:
- name: backend
  url: http://127.0.0.1:8081
  routes:
  - name: all
    paths: [/]
    strip_path: false
    filter_chains:
    - filters:
      - name: kong_lacks
        config: ""
"#;

#[tokio::test(flavor = "multi_thread")]
async fn host_traps_on_calls_kong_lacks() {
    let upstream = Upstream::start().await;
    let fixture = repo_root().join("tests/kong-host/fixtures/kong_lacks.wat");
    let kong = KongHost::start_with(
        &KongConfig::from_yaml(FIXTURE_KONG_YML),
        1,
        upstream.port,
        &[(&fixture, "kong_lacks.wat")],
    )
    .await;
    let http = reqwest::Client::builder()
        .timeout(HANG)
        .build()
        .unwrap_or_else(|e| panic!("client: {e}"));
    let get = |path: &'static str| {
        let req = http.get(kong.url(path));
        async move {
            let r = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {path}: {e}"));
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
    };

    let traps = [
        (
            "/log-level",
            "host trap (function not yet implemented): proxy_get_log_level",
        ),
        (
            "/done",
            "host trap (function not yet implemented): proxy_done",
        ),
        ("/queue", "host trap (bad usage): could not find queue"),
        ("/trailers", "trailers map"),
        // Bad dispatch arguments trap at once, as in Kong (not an error status).
        ("/method-missing", "dispatch failed: no :method"),
        (
            "/port-invalid",
            "dispatch failed: tcp socket - invalid port",
        ),
        (
            "/stash-twice",
            "host trap (bad usage): local response already stashed",
        ),
    ];
    for (i, (path, why)) in traps.iter().enumerate() {
        let (status, body) = get(path).await;
        assert_eq!(status, 500, "{path}: {body}");
        assert_eq!(
            json_of(body.as_bytes())["message"],
            "An unexpected error occurred"
        );
        let log = kong.log();
        let line = log
            .lines()
            .find(|l| l.contains("trapped in \"on_request_headers\" step") && l.contains(why))
            .unwrap_or_else(|| panic!("{path}: no trap line naming {why:?}; log:\n{log}"));
        assert!(line.contains("[error]"), "{line}");
        // A trapped instance is replaced: the next request runs on a fresh one
        // (on_configure again) and passes.
        let (status, _) = get("/ok").await;
        assert_eq!(status, 200, "after {path}");
        let configured = kong.log().matches("kong_lacks fixture configured").count();
        assert_eq!(configured, i + 2, "one instance at start, one per trap");
    }
    // One local response is fine, and Kong appends a newline to its body.
    let (status, body) = get("/reply").await;
    assert_eq!((status, body.as_str()), (418, "kong\n"));
    // proxy_continue_stream is implemented by Kong (SDK 0.2 resumes requests with it).
    let (status, _) = get("/continue").await;
    assert_eq!(status, 200);
    let got: Vec<String> = upstream.received().into_iter().map(|r| r.path).collect();
    let mut want = vec!["/ok"; traps.len()];
    want.push("/continue");
    assert_eq!(got, want);
    let status: Value = reqwest::get(format!("http://127.0.0.1:{}/status", kong.admin_port))
        .await
        .unwrap_or_else(|e| panic!("status: {e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(status["traps"], traps.len(), "{status}");
}

/// A size as kong.conf writes it (`2m`, `8k`).
fn kong_size(v: &str) -> usize {
    let v = v.trim().to_ascii_lowercase();
    let (n, mul) = match v.chars().last() {
        Some('k') => (&v[..v.len() - 1], 1024),
        Some('m') => (&v[..v.len() - 1], 1024 * 1024),
        _ => (v.as_str(), 1),
    };
    n.parse::<usize>()
        .unwrap_or_else(|e| panic!("size {v}: {e}"))
        * mul
}

#[test]
fn kong_yml_filter_configs_pass_schema_and_parser() {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("kong/eventwire.meta.json"))
            .unwrap_or_else(|e| panic!("meta.json: {e}")),
    )
    .unwrap_or_else(|e| panic!("meta.json: {e}"));
    let schema =
        jsonschema::draft4::new(&meta["config_schema"]).unwrap_or_else(|e| panic!("schema: {e}"));
    let conf = std::fs::read_to_string(repo_root().join("kong/kong.conf"))
        .unwrap_or_else(|e| panic!("kong.conf: {e}"));
    let setting = |key: &str| {
        conf.lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| panic!("kong.conf has no {key}"))
    };
    assert_eq!(setting("wasm"), "on");
    assert_eq!(setting("wasm_filters"), "bundled,user");
    assert!(!setting("wasm_filters_path").is_empty());
    let body_buffer = kong_size(&setting("nginx_http_client_body_buffer_size"));
    for t in ["connect", "send", "read"] {
        setting(&format!("nginx_wasm_socket_{t}_timeout"));
    }

    let configs = KongConfig::shipped().filter_configs();
    assert_eq!(configs.len(), 2, "the orders bridge and the payments tap");
    for (owner, filter, cfg) in configs {
        assert_eq!(filter, "eventwire", "{owner}");
        assert!(cfg.is_object(), "{owner}: config must be a JSON object");
        let errors: Vec<String> = schema
            .iter_errors(&cfg)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{owner} fails the schema: {errors:?}");
        let parsed = config::parse(cfg.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{owner} fails the parser: {e}"));
        // Kong dispatches to a literal address, never a cluster name.
        let up = &parsed.sidecar.upstream;
        assert!(
            up.parse::<std::net::SocketAddr>().is_ok(),
            "{owner}: sidecar.upstream {up:?} is not host:port"
        );
        // Kong has no xds.route_name: rules must not select by route name.
        assert!(
            cfg["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|r| r["match"].get("route_name").is_none()),
            "{owner}"
        );
        assert!(
            body_buffer >= parsed.max_body_bytes,
            "{owner}: nginx_http_client_body_buffer_size {body_buffer} < max_body_bytes {}",
            parsed.max_body_bytes
        );
    }
}

/// A sidecar that accepts and never answers: Kong's engine times the callout out itself
/// and reports `timeout` in `:dispatch_status` (Envoy would synthesize a 504).
#[tokio::test(flavor = "multi_thread")]
async fn callout_timeout_is_503_with_the_engines_reason() {
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let stalled_port = stalled.local_addr().map(|a| a.port()).unwrap_or(0);
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = stalled.accept().await {
            held.push(sock);
        }
    });
    let upstream = Upstream::start().await;
    let cfg = KongConfig::from_yaml(
        &KongConfig::shipped()
            .yaml()
            .replace("timeout_ms: 5000", "timeout_ms: 300"),
    );
    let kong = KongHost::start(&cfg, stalled_port, upstream.port).await;
    let http = reqwest::Client::builder()
        .timeout(HANG)
        .build()
        .unwrap_or_else(|e| panic!("client: {e}"));
    let post = |path: &str, body: &'static [u8]| {
        http.post(kong.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = post("/orders", br#"{"id":"ord-3001"}"#)
        .await
        .unwrap_or_else(|e| panic!("POST /orders: {e}"));
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let p: Value = resp.json().await.unwrap_or_default();
    assert_eq!(status, 503, "{p}");
    assert_eq!(p["type"], "urn:eventwire:problem:sidecar-unavailable");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("(timeout)")),
        "{p}"
    );
    // Tap goes on upstream without its event.
    let resp = post("/payments", br#"{"order_id":"ord-3001"}"#)
        .await
        .unwrap_or_else(|e| panic!("POST /payments: {e}"));
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(upstream.received().len(), 1);
    hold.abort();
}

/// Kong's auth plugins set the consumer headers before the filter chain runs (the chain is
/// attached in Kong's access phase, after the Lua plugins); `rules[].consumer` copies them.
#[tokio::test]
async fn kong_consumer_headers_become_extensions() {
    let shipped = KongConfig::shipped();
    let line = "            extensions: { x-tenant-id: tenant }\n";
    assert!(
        shipped.yaml().contains(line),
        "kong.yml changed: no orders extensions line"
    );
    let yaml = shipped.yaml().replacen(
        line,
        &format!("{line}            consumer: {{ id: consumerid, username: consumer }}\n"),
        1,
    );
    let s = KongStack::start_with(&KongConfig::from_yaml(&yaml), &[(ORDERS, 1)]).await;
    let resp = s
        .post(
            "/orders",
            &[
                ("content-type", "application/json"),
                ("x-consumer-id", "c-7"),
                ("x-consumer-username", "alice"),
            ],
            br#"{"id":"ord-7"}"#,
        )
        .await;
    assert_eq!(resp.0, 202, "{}", String::from_utf8_lossy(&resp.2));
    let recs = s.broker.records_settled(ORDERS, 1, WAIT);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].header("ce_consumerid"), Some("c-7"));
    assert_eq!(recs[0].header("ce_consumer"), Some("alice"));
    // Without an authenticated consumer the attributes are simply absent.
    let resp = s
        .post(
            "/orders",
            &[("content-type", "application/json")],
            br#"{"id":"ord-8"}"#,
        )
        .await;
    assert_eq!(resp.0, 202);
    let recs = s.broker.records_settled(ORDERS, 2, WAIT);
    assert_eq!(recs.len(), 2);
    let anon = recs.iter().find(|r| r.key_str() == Some("ord-8"));
    assert_eq!(anon.map(|r| r.header("ce_consumerid")), Some(None));
}

/// Kong's engine cannot call out from the response phase nor resume a held answer, so an
/// `after_upstream` rule refuses the request on Kong, before anything goes upstream.
#[tokio::test]
async fn after_upstream_is_refused_on_kong_before_the_upstream() {
    let shipped = KongConfig::shipped();
    let line = "            mode: tap\n";
    assert!(
        shipped.yaml().contains(line),
        "kong.yml changed: no tap rule"
    );
    let yaml = shipped
        .yaml()
        .replacen(line, "            mode: after_upstream\n", 1);
    let s = KongStack::start_with(&KongConfig::from_yaml(&yaml), &[(PAYMENTS, 1)]).await;
    let resp = s
        .post(
            "/payments",
            &[("content-type", "application/json")],
            br#"{"order_id":"ord-9"}"#,
        )
        .await;
    let p = assert_problem(&resp, 500, "proxy-failure");
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not possible on Kong")),
        "{p}"
    );
    assert!(s.upstream.received().is_empty(), "the upstream was called");
    assert!(s.broker.all_records(PAYMENTS).is_empty());
    assert!(s.kong.log().contains("not possible on Kong"));
}
