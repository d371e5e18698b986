//! The proxy-wasm shell: host calls only, decisions in the host-free modules.
//!
//! Rules of the road (see ../shared/notes/proxy-wasm-hosts.md):
//! - only `hostcalls::*` functions are used, never the trait wrappers that `unwrap()`; the
//!   hostcalls still `panic!` on a status they do not expect, so each is called only in a
//!   phase where the host answers Ok or NotFound (a panic kills the VM for every request);
//! - every header the request needs is read in the headers phase (reading them later
//!   panics in Envoy once the headers were continued);
//! - after a `Pause`, every path ends in exactly one `resume_http_request` or local reply.

use crate::config::{self, Config, Mode, OnFailure, Rule};
use crate::problem::{FilterError, PROBLEM_JSON};
use crate::publish::{self, Request, Stamp, Verdict};
use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    // Info, not Trace: the SDK formats every record up to this level before the host filters
    // it, and debug lines would then cost a format per request.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { config: None, metrics: Metrics::default() })
    });
}}

struct Root {
    config: Option<Rc<Config>>,
    metrics: Metrics,
}

/// Counters in the proxy's own stats (Envoy: `wasmcustom.<name>` in /stats,
/// `<name>` in /stats/prometheus). `None` when the host refused to define one.
#[derive(Clone, Copy, Default)]
struct Metrics {
    /// Events the sidecar acknowledged.
    accepted: Option<u32>,
    /// Requests the filter itself answered 4xx (bad data for an event).
    rejected: Option<u32>,
    /// Problem answers of the sidecar (bad event, unknown topic, backpressure).
    refused: Option<u32>,
    /// Sidecar unreachable, reset or timed out.
    unavailable: Option<u32>,
    /// Requests sent upstream without their event (`on_failure: passthrough`, tap).
    passthrough: Option<u32>,
}

impl Metrics {
    fn define() -> Metrics {
        let counter = |name: &str| match hostcalls::define_metric(MetricType::Counter, name) {
            Ok(id) => Some(id),
            Err(e) => {
                warn!("cannot define metric {name}: {e:?}");
                None
            }
        };
        Metrics {
            accepted: counter("eventwire_events_accepted_total"),
            rejected: counter("eventwire_requests_rejected_total"),
            refused: counter("eventwire_sidecar_refused_total"),
            unavailable: counter("eventwire_sidecar_unavailable_total"),
            passthrough: counter("eventwire_passthrough_total"),
        }
    }
}

fn bump(metric: Option<u32>) {
    if let Some(id) = metric {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) if !b.is_empty() => b,
            _ => b"{}".to_vec(),
        };
        match config::parse(&bytes) {
            Ok(c) => {
                if c.rules.is_empty() {
                    warn!("configuration has no rules; no route publishes events");
                }
                info!(
                    "configured {} rule(s), sidecar upstream '{}'",
                    c.rules.len(),
                    c.sidecar.upstream
                );
                self.config = Some(Rc::new(c));
                self.metrics = Metrics::define();
                true
            }
            Err(e) => {
                error!("configuration refused: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None panics in the SDK; without a config every request just passes.
        Some(Box::new(Stream {
            config: self.config.clone(),
            metrics: self.metrics,
            context_id,
            state: State::Idle,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

enum State {
    /// Not an enabled route, or finished.
    Idle,
    /// Buffering the body of a matched request.
    Body {
        rule: usize,
        headers: Vec<(String, Vec<u8>)>,
        size: usize,
    },
    /// Waiting for the sidecar's answer.
    Ack { rule: usize, id: Option<String> },
    /// A local reply was sent; nothing more may go upstream.
    Replied,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Request,
    Callout,
}

struct Stream {
    config: Option<Rc<Config>>,
    metrics: Metrics,
    context_id: u32,
    state: State,
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        let (rule, id) = match std::mem::replace(&mut self.state, State::Idle) {
            State::Ack { rule, id } => (rule, id),
            _ => return,
        };
        let Some(cfg) = self.config.clone() else {
            return;
        };
        let Some(rule) = cfg.rules.get(rule) else {
            return;
        };
        // Reading callout headers when there are none traps in Envoy.
        let header = |name: &str| -> Option<Vec<u8>> {
            if num_headers == 0 {
                return None;
            }
            hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, name)
                .ok()
                .flatten()
        };
        let status =
            header(":status").and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok());
        let content_type = header("content-type");
        let verdict = publish::verdict(
            status,
            content_type.as_deref(),
            None,
            cfg.sidecar.timeout_ms,
        );
        let id = id.as_deref().unwrap_or("-");
        match verdict {
            Verdict::Accepted => {
                bump(self.metrics.accepted);
                debug!("rule {} event {id} accepted", rule.name);
                match rule.mode {
                    Mode::Tap => resume(),
                    Mode::Bridge => {
                        let body = callout_body(body_size);
                        let location = header("location");
                        let location = location
                            .as_deref()
                            .and_then(|l| std::str::from_utf8(l).ok());
                        let mut headers = vec![("content-type", "application/json")];
                        if let Some(l) = location {
                            headers.push(("location", l));
                        }
                        send(202, headers, &body);
                        self.state = State::Replied;
                    }
                }
            }
            Verdict::Refused { status } => {
                let retry = header("retry-after");
                let retry = retry.as_deref().and_then(|r| std::str::from_utf8(r).ok());
                warn!(
                    "rule {} event {id} refused by the sidecar with {status}",
                    rule.name
                );
                bump(self.metrics.refused);
                if passes_through(rule, status >= 500) {
                    bump(self.metrics.passthrough);
                    resume();
                } else {
                    let mut headers = vec![("content-type", PROBLEM_JSON)];
                    if let Some(r) = retry {
                        headers.push(("retry-after", r));
                    }
                    send(status, headers, &callout_body(body_size));
                    self.state = State::Replied;
                }
            }
            Verdict::Unavailable { detail } => {
                warn!("rule {} event {id}: {detail}", rule.name);
                self.fail(
                    rule,
                    FilterError::SidecarUnavailable { detail },
                    Phase::Callout,
                );
            }
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(cfg) = self.config.clone() else {
            return Action::Continue;
        };
        if cfg.rules.is_empty() {
            return Action::Continue;
        }
        let route = if cfg.needs_route_name {
            property(&["xds", "route_name"])
        } else {
            None
        };
        // Untouched routes should cost little: read only what some rule matches on.
        let read = |header: &str, prop: [&str; 2], needed: bool| -> String {
            if !needed {
                return String::new();
            }
            request_header(header)
                .or_else(|| property(&prop))
                .unwrap_or_default()
        };
        let method = read(":method", ["request", "method"], cfg.needs_method);
        let path = read(":path", ["request", "path"], cfg.needs_path);
        let Some(idx) = cfg.find(route.as_deref(), &method, &path) else {
            return Action::Continue;
        };
        let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(h) => h,
            Err(s) => {
                error!("cannot read request headers: {s:?}");
                return Action::Continue;
            }
        };
        let content_length = publish::header(&headers, "content-length")
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok());
        let rule = &cfg.rules[idx];
        if content_length.is_some_and(|n| n > cfg.max_body_bytes as u64) {
            let e = FilterError::BodyTooLarge {
                limit: cfg.max_body_bytes,
            };
            return self.fail(rule, e, Phase::Request);
        }
        let chunked = publish::header(&headers, "transfer-encoding").is_some();
        let framing_only = !end_of_stream && on_kong();
        if publish::body_expected(end_of_stream, content_length, chunked, framing_only) {
            self.state = State::Body {
                rule: idx,
                headers,
                size: 0,
            };
            return Action::Pause;
        }
        self.publish(&cfg, idx, &headers, &[])
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let (rule, size) = match &mut self.state {
            State::Body { rule, size, .. } => (rule, size),
            // Continue here would resume the request while the callout is pending or after
            // our own reply: a bridged request would reach the upstream.
            State::Ack { .. } | State::Replied => return Action::Pause,
            State::Idle => return Action::Continue,
        };
        *size = body_size;
        let rule = *rule;
        let Some(cfg) = self.config.clone() else {
            return Action::Continue;
        };
        if body_size > cfg.max_body_bytes {
            let e = FilterError::BodyTooLarge {
                limit: cfg.max_body_bytes,
            };
            return self.fail(&cfg.rules[rule], e, Phase::Request);
        }
        if !end_of_stream {
            // Keep buffering: Continue here would stream the chunks upstream.
            return Action::Pause;
        }
        self.publish_buffered(&cfg)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // With trailers the last body callback never says end_of_stream; this is the end.
        let Some(cfg) = self.config.clone() else {
            return Action::Continue;
        };
        match self.state {
            State::Body { .. } => self.publish_buffered(&cfg),
            State::Ack { .. } | State::Replied => Action::Pause,
            State::Idle => Action::Continue,
        }
    }
}

impl Stream {
    fn publish_buffered(&mut self, cfg: &Config) -> Action {
        let State::Body {
            rule,
            headers,
            size,
        } = std::mem::replace(&mut self.state, State::Idle)
        else {
            return Action::Continue;
        };
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size) {
            Ok(b) => b.unwrap_or_default(),
            Err(s) => {
                error!("cannot read the request body: {s:?}");
                Vec::new()
            }
        };
        self.publish(cfg, rule, &headers, &body)
    }

    fn publish(
        &mut self,
        cfg: &Config,
        idx: usize,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
    ) -> Action {
        let rule = &cfg.rules[idx];
        // Borrowed from the headers already read: no copies on the hot path.
        let text = |name: &str, fallback: &'static str| -> &str {
            publish::header(headers, name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or(fallback)
        };
        let req = Request {
            scheme: text(":scheme", "http"),
            authority: text(":authority", "unknown"),
            path: text(":path", "/"),
            headers,
            body,
        };
        let stamp = Stamp {
            now_nanos: now_nanos(),
            random: random16(self.context_id),
        };
        let callout = match publish::build(rule, &cfg.sidecar, &req, &stamp) {
            Ok(c) => c,
            Err(e) => {
                info!("rule {} request refused: {e}", rule.name);
                return self.fail(rule, e, Phase::Request);
            }
        };
        let timeout = Duration::from_millis(cfg.sidecar.timeout_ms);
        let dispatched = hostcalls::dispatch_http_call(
            &cfg.sidecar.upstream,
            callout.header_refs(),
            Some(callout.body),
            Vec::new(),
            timeout,
        );
        match dispatched {
            Ok(_token) => {
                self.state = State::Ack {
                    rule: idx,
                    id: callout.id.map(|c| c.into_owned()),
                };
                Action::Pause
            }
            Err(s) => {
                let detail = format!(
                    "the callout to sidecar upstream '{}' failed at once ({s:?})",
                    cfg.sidecar.upstream
                );
                error!("rule {}: {detail}", rule.name);
                self.fail(
                    rule,
                    FilterError::SidecarUnavailable { detail },
                    Phase::Request,
                )
            }
        }
    }

    /// Ends a request that could not be published: an error reply, or on with no event.
    /// Inside a request callback passing on is the callback's `Continue`; after the callout
    /// it is an explicit resume.
    fn fail(&mut self, rule: &Rule, e: FilterError, phase: Phase) -> Action {
        self.state = State::Idle;
        let unavailable = matches!(e, FilterError::SidecarUnavailable { .. });
        bump(if unavailable {
            self.metrics.unavailable
        } else {
            self.metrics.rejected
        });
        if passes_through(rule, unavailable) {
            bump(self.metrics.passthrough);
            warn!(
                "rule {}: passing the request on without an event: {e}",
                rule.name
            );
            if phase == Phase::Callout {
                resume();
            }
            return Action::Continue;
        }
        let body = e.body();
        let mut headers = vec![("content-type", PROBLEM_JSON)];
        if let Some(r) = e.retry_after() {
            headers.push(("retry-after", r));
        }
        send(e.status(), headers, &body);
        self.state = State::Replied;
        Action::Pause
    }
}

/// `on_failure: passthrough` covers an unreachable sidecar; bad request data is passed on
/// only in tap mode, whose upstream answer must not turn into an error.
fn passes_through(rule: &Rule, unavailable: bool) -> bool {
    rule.on_failure == OnFailure::Passthrough && (unavailable || rule.mode == Mode::Tap)
}

thread_local! {
    static ON_KONG: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Kong (nginx) exposes nginx variables as `ngx.*` properties; Envoy answers NotFound.
/// Asked once per VM, on the first request that needs it.
fn on_kong() -> bool {
    ON_KONG.with(|cell| {
        *cell
            .get()
            .get_or_insert_with(|| property(&["ngx", "nginx_version"]).is_some())
    })
}

fn resume() {
    if let Err(s) = hostcalls::resume_http_request() {
        error!("resume failed: {s:?}");
    }
}

fn send(status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
    if let Err(s) = hostcalls::send_http_response(status, headers, Some(body)) {
        error!("local reply {status} failed: {s:?}");
    }
}

fn callout_body(size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

fn request_header(name: &str) -> Option<String> {
    let v = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name).ok()??;
    String::from_utf8(v).ok()
}

fn property(path: &[&str]) -> Option<String> {
    let v = hostcalls::get_property(path.to_vec()).ok()??;
    String::from_utf8(v).ok()
}

fn now_nanos() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(target_os = "wasi")]
#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    #[link_name = "random_get"]
    fn wasi_random_get(buf: *mut u8, len: usize) -> u16;
}

/// 16 random bytes for the event id, from WASI `random_get` (both Envoy and Kong provide
/// it). A counter would repeat across VMs and restarts.
fn random16(context_id: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    #[cfg(target_os = "wasi")]
    {
        // SAFETY: the buffer is valid for 16 writable bytes for the whole call.
        if unsafe { wasi_random_get(b.as_mut_ptr(), b.len()) } == 0 {
            return b;
        }
        error!("random_get failed; mixing time and context id instead");
    }
    let mut x = now_nanos() ^ (u64::from(context_id) << 32);
    for chunk in b.chunks_mut(8) {
        x = splitmix64(x);
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    b
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
