//! The filter's decisions, host-free: one `Stream` per HTTP request walks from the request
//! headers to exactly one outcome (passed on untouched, event published and the request
//! answered or resumed, or refused), calling the proxy only through [`Host`].
//!
//! Rules of the road (each learnt on a real host; see README "Envoy" and "Kong"):
//! - every header the request needs is read in the headers phase (Envoy's SDK panics on a
//!   later read once the headers were continued);
//! - a body that follows is awaited with a pause in the headers phase on Envoy, and in the
//!   body phase on Kong, which reads the body only after the headers phase continued
//!   ([`headers_flow_before_body`]);
//! - after a `Pause`, every path ends in exactly one `resume` or one local reply;
//! - callout headers are read only when the answer has some (Envoy traps otherwise), except
//!   Kong's `:dispatch_status`, which its engine sets on a failure with no headers.

use crate::answer::{self, Verdict};
use crate::callout::{self, Request, Stamp};
use crate::config::{self, Config, Mode, OnFailure, Rule};
use crate::host::{Counter, Flavor, Host, Level};
use crate::problem::{Cause, FilterError};
use eventwire_contract::problem;
use std::cell::Cell;
use std::rc::Rc;

/// What a request callback tells the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Pause,
}

/// What every stream of one VM shares.
pub struct Vm {
    pub config: Config,
    /// Asked of the host once, on the first request that needs it.
    flavor: Cell<Option<Flavor>>,
}

impl Vm {
    pub fn new(config: Config) -> Rc<Vm> {
        Rc::new(Vm {
            config,
            flavor: Cell::new(None),
        })
    }

    /// Kong's engine exposes nginx variables as `ngx.*` properties; Envoy has none.
    fn flavor(&self, host: &impl Host) -> Flavor {
        if let Some(known) = self.flavor.get() {
            return known;
        }
        let flavor = match host.property(&["ngx", "nginx_version"]) {
            Some(_) => Flavor::Kong,
            None => Flavor::Envoy,
        };
        self.flavor.set(Some(flavor));
        flavor
    }
}

/// `on_configure`: the plugin configuration (none or empty = `{}`) parsed and validated once.
/// `None` refuses the configuration; the log line names the field.
pub fn configure(host: &impl Host, bytes: Option<&[u8]>) -> Option<Config> {
    let bytes = match bytes {
        Some(b) if !b.is_empty() => b,
        _ => b"{}",
    };
    match config::parse(bytes) {
        Ok(c) => {
            if c.rules.is_empty() {
                host.log(
                    Level::Warn,
                    format_args!("configuration has no rules; no route publishes events"),
                );
            }
            host.log(
                Level::Info,
                format_args!(
                    "configured {} rule(s), sidecar upstream '{}'",
                    c.rules.len(),
                    c.sidecar.upstream
                ),
            );
            Some(c)
        }
        Err(e) => {
            host.log(Level::Error, format_args!("configuration refused: {e}"));
            None
        }
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

/// Inside a request callback passing on is the callback's `Continue`; after the callout it
/// is an explicit resume.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Request,
    Callout,
}

pub struct Stream {
    /// `None` when the VM has no accepted configuration: every request passes.
    vm: Option<Rc<Vm>>,
    context_id: u32,
    state: State,
}

impl Stream {
    pub fn new(vm: Option<Rc<Vm>>, context_id: u32) -> Stream {
        Stream {
            vm,
            context_id,
            state: State::Idle,
        }
    }

    pub fn on_request_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Flow {
        let Some(vm) = self.vm.clone() else {
            return Flow::Continue;
        };
        host.bump(Counter::Requests);
        let cfg = &vm.config;
        let Some(idx) = matching_rule(cfg, host) else {
            return Flow::Continue;
        };
        let Some(rule) = cfg.rules.get(idx) else {
            return Flow::Continue;
        };
        let headers = match host.request_headers() {
            Ok(h) => h,
            Err(e) => {
                let detail = format!("cannot read the request headers: {e}");
                return self.fail(
                    host,
                    rule,
                    FilterError::ProxyFailure { detail },
                    Phase::Request,
                );
            }
        };
        let content_length = callout::header(&headers, "content-length")
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok());
        if content_length.is_some_and(|n| n > cfg.max_body_bytes as u64) {
            let e = FilterError::BodyTooLarge {
                limit: cfg.max_body_bytes,
            };
            return self.fail(host, rule, e, Phase::Request);
        }
        let chunked = callout::header(&headers, "transfer-encoding").is_some();
        let flavor = vm.flavor(host);
        let framing_only = !end_of_stream && flavor == Flavor::Kong;
        if body_expected(end_of_stream, content_length, chunked, framing_only) {
            self.state = State::Body {
                rule: idx,
                headers,
                size: 0,
            };
            return headers_flow_before_body(flavor);
        }
        self.publish(host, cfg, idx, &headers, &[])
    }

    pub fn on_request_body(
        &mut self,
        host: &impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let (rule, size) = match &mut self.state {
            State::Body { rule, size, .. } => (*rule, size),
            // Continue here would resume the request while the callout is pending or after
            // our own reply: a bridged request would reach the upstream.
            State::Ack { .. } | State::Replied => return Flow::Pause,
            State::Idle => return Flow::Continue,
        };
        *size = body_size;
        let Some(vm) = self.vm.clone() else {
            return Flow::Continue;
        };
        if body_size > vm.config.max_body_bytes {
            let e = FilterError::BodyTooLarge {
                limit: vm.config.max_body_bytes,
            };
            return match vm.config.rules.get(rule) {
                Some(rule) => self.fail(host, rule, e, Phase::Request),
                None => Flow::Continue,
            };
        }
        if !end_of_stream {
            // Keep buffering: Continue here would stream the chunks upstream.
            return Flow::Pause;
        }
        self.publish_buffered(host, &vm.config)
    }

    /// With trailers the last body callback never says end_of_stream; this is the end.
    pub fn on_request_trailers(&mut self, host: &impl Host) -> Flow {
        let Some(vm) = self.vm.clone() else {
            return Flow::Continue;
        };
        match self.state {
            State::Body { .. } => self.publish_buffered(host, &vm.config),
            State::Ack { .. } | State::Replied => Flow::Pause,
            State::Idle => Flow::Continue,
        }
    }

    /// The sidecar's answer (or the host's word that there is none).
    pub fn on_callout_response(&mut self, host: &impl Host, num_headers: usize, body_size: usize) {
        let (idx, id) = match std::mem::replace(&mut self.state, State::Idle) {
            State::Ack { rule, id } => (rule, id),
            other => {
                self.state = other;
                return;
            }
        };
        let Some(vm) = self.vm.clone() else {
            return;
        };
        let cfg = &vm.config;
        let Some(rule) = cfg.rules.get(idx) else {
            return;
        };
        let header = |name: &str| {
            (num_headers > 0)
                .then(|| host.callout_header(name))
                .flatten()
        };
        let status = header(":status").and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok());
        let content_type = header("content-type");
        let dispatch_status = match (num_headers, vm.flavor(host)) {
            (0, Flavor::Kong) => host.callout_header(":dispatch_status"),
            _ => None,
        };
        let verdict = answer::verdict(
            status,
            content_type.as_deref(),
            dispatch_status.as_deref(),
            cfg.sidecar.timeout_ms,
        );
        let id = id.as_deref().unwrap_or("-");
        match verdict {
            Verdict::Accepted { status } => {
                host.bump(Counter::Accepted);
                host.log(
                    Level::Debug,
                    format_args!("rule {} event {id} accepted", rule.name),
                );
                self.accepted(host, rule, status, body_size, header("location"));
            }
            Verdict::Refused { status } => {
                host.log(
                    Level::Warn,
                    format_args!(
                        "rule {} event {id} refused by the sidecar with {status}",
                        rule.name
                    ),
                );
                host.bump(Counter::Refused);
                let cause = if status >= 500 {
                    Cause::Infrastructure
                } else {
                    Cause::Request
                };
                if passes_through(rule, cause) {
                    host.bump(Counter::Passthrough);
                    host.resume();
                } else {
                    // The sidecar's problem, relayed as it is.
                    let retry = header("retry-after");
                    let retry = retry.as_deref().and_then(|r| std::str::from_utf8(r).ok());
                    let mut headers = vec![("content-type", problem::CONTENT_TYPE)];
                    if let Some(r) = retry {
                        headers.push(("retry-after", r));
                    }
                    host.reply(status, headers, &host.callout_body(body_size));
                    self.state = State::Replied;
                }
            }
            Verdict::Unavailable { detail } => {
                host.log(
                    Level::Warn,
                    format_args!("rule {} event {id}: {detail}", rule.name),
                );
                let e = FilterError::SidecarUnavailable { detail };
                self.fail(host, rule, e, Phase::Callout);
            }
        }
    }

    /// Tap: the request goes on upstream. Bridge: the client gets the sidecar's 202 answer.
    fn accepted(
        &mut self,
        host: &impl Host,
        rule: &Rule,
        status: u16,
        body_size: usize,
        location: Option<Vec<u8>>,
    ) {
        match rule.mode {
            Mode::Tap => host.resume(),
            Mode::Bridge => {
                let body = host.callout_body(body_size);
                let location = location
                    .as_deref()
                    .and_then(|l| std::str::from_utf8(l).ok());
                let mut headers = vec![("content-type", "application/json")];
                if let Some(l) = location {
                    headers.push(("location", l));
                }
                // 202, or a batch's 207 when only some of its events were accepted.
                host.reply(status, headers, &body);
                self.state = State::Replied;
            }
        }
    }

    fn publish_buffered(&mut self, host: &impl Host, cfg: &Config) -> Flow {
        let State::Body {
            rule,
            headers,
            size,
        } = std::mem::replace(&mut self.state, State::Idle)
        else {
            return Flow::Continue;
        };
        let body = match host.request_body(size) {
            Ok(Some(b)) if b.len() == size => b,
            Ok(None) if size == 0 => Vec::new(),
            // Publishing what we got would be an event with a body the client never sent.
            Ok(got) => {
                let got = got.map_or(0, |b| b.len());
                let detail = format!(
                    "the proxy announced a {size}-byte request body and handed over {got} bytes"
                );
                return self.fail_rule(host, cfg, rule, FilterError::ProxyFailure { detail });
            }
            Err(e) => {
                let detail = format!("cannot read the request body: {e}");
                return self.fail_rule(host, cfg, rule, FilterError::ProxyFailure { detail });
            }
        };
        self.publish(host, cfg, rule, &headers, &body)
    }

    fn publish(
        &mut self,
        host: &impl Host,
        cfg: &Config,
        idx: usize,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
    ) -> Flow {
        let Some(rule) = cfg.rules.get(idx) else {
            return Flow::Continue;
        };
        // Borrowed from the headers already read: no copies on the hot path.
        let text = |name: &str, fallback: &'static str| -> &str {
            callout::header(headers, name)
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
        let stamp = self.stamp(host);
        let out = match callout::build(rule, &cfg.sidecar, &req, &stamp) {
            Ok(c) => c,
            Err(e) => {
                host.log(
                    Level::Info,
                    format_args!("rule {} request refused: {e}", rule.name),
                );
                return self.fail(host, rule, e, Phase::Request);
            }
        };
        let dispatched = host.dispatch(
            &cfg.sidecar.upstream,
            out.header_refs(),
            &out.body,
            cfg.sidecar.timeout_ms,
        );
        match dispatched {
            Ok(()) => {
                self.state = State::Ack {
                    rule: idx,
                    id: out.id.map(|c| c.into_owned()),
                };
                Flow::Pause
            }
            Err(e) => {
                let detail = format!(
                    "the callout to sidecar upstream '{}' failed at once ({e})",
                    cfg.sidecar.upstream
                );
                host.log(Level::Error, format_args!("rule {}: {detail}", rule.name));
                let e = FilterError::SidecarUnavailable { detail };
                self.fail(host, rule, e, Phase::Request)
            }
        }
    }

    /// The time and randomness that make an event unique. Should the host's generator fail,
    /// time and context id are mixed instead: a counter alone would repeat across VMs.
    fn stamp(&self, host: &impl Host) -> Stamp {
        let now_nanos = host.now_nanos();
        let random = host.random16().unwrap_or_else(|| {
            host.log(
                Level::Error,
                format_args!("random_get failed; mixing time and context id instead"),
            );
            fallback_random(now_nanos, self.context_id)
        });
        Stamp { now_nanos, random }
    }

    fn fail_rule(&mut self, host: &impl Host, cfg: &Config, idx: usize, e: FilterError) -> Flow {
        match cfg.rules.get(idx) {
            Some(rule) => self.fail(host, rule, e, Phase::Request),
            None => Flow::Continue,
        }
    }

    /// Ends a request that could not be published: an error reply, or on with no event.
    fn fail(&mut self, host: &impl Host, rule: &Rule, e: FilterError, phase: Phase) -> Flow {
        self.state = State::Idle;
        host.bump(match &e {
            FilterError::SidecarUnavailable { .. } => Counter::Unavailable,
            FilterError::ProxyFailure { .. } => Counter::ProxyFailed,
            _ => Counter::Rejected,
        });
        if passes_through(rule, e.cause()) {
            host.bump(Counter::Passthrough);
            host.log(
                Level::Warn,
                format_args!(
                    "rule {}: passing the request on without an event: {e}",
                    rule.name
                ),
            );
            if phase == Phase::Callout {
                host.resume();
            }
            return Flow::Continue;
        }
        let kind = e.kind();
        let mut headers = vec![("content-type", problem::CONTENT_TYPE)];
        if let Some(r) = kind.retry_after() {
            headers.push(("retry-after", r));
        }
        host.reply(kind.status(), headers, &e.body());
        self.state = State::Replied;
        Flow::Pause
    }
}

/// The first rule that matches, reading only what some rule matches on: untouched routes
/// should cost little.
fn matching_rule(cfg: &Config, host: &impl Host) -> Option<usize> {
    if cfg.rules.is_empty() {
        return None;
    }
    let route = if cfg.needs_route_name {
        host.property(&["xds", "route_name"])
    } else {
        None
    };
    let read = |header: &str, prop: [&str; 2], needed: bool| -> String {
        if !needed {
            return String::new();
        }
        host.request_header(header)
            .or_else(|| host.property(&prop))
            .unwrap_or_default()
    };
    let method = read(":method", ["request", "method"], cfg.needs_method);
    let path = read(":path", ["request", "path"], cfg.needs_path);
    cfg.find(route.as_deref(), &method, &path)
}

/// `on_failure: passthrough` covers a failing sidecar or proxy; bad request data is passed
/// on only in tap mode, whose upstream answer must not turn into an error.
fn passes_through(rule: &Rule, cause: Cause) -> bool {
    rule.on_failure == OnFailure::Passthrough
        && (cause == Cause::Infrastructure || rule.mode == Mode::Tap)
}

/// What the headers phase returns when a body callback follows (every header the event
/// needs was read already; nothing more is read until the body is in).
///
/// - Envoy: `Pause`, so nothing goes upstream before the event is published; the body
///   callbacks still come (`allow_on_headers_stop_iteration: true`).
/// - Kong: `Continue`. ngx_wasm_module runs the headers step before nginx reads the body
///   (rewrite/access phase) and calls `on_http_request_body` only after the headers step
///   continued; a pause there is resumed by nothing but a dispatch answer or a resume, so
///   the request would hang. Continuing does not let the request upstream yet: the body
///   callback comes first (content phase), and it pauses until the sidecar answered.
pub fn headers_flow_before_body(flavor: Flavor) -> Flow {
    match flavor {
        Flavor::Envoy => Flow::Pause,
        Flavor::Kong => Flow::Continue,
    }
}

/// Whether a body callback follows the request headers.
///
/// Envoy's `end_of_stream` on headers is exact, and only it: Envoy strips
/// `transfer-encoding` from chunked HTTP/1 requests, and an HTTP/2 client may send
/// `content-length: 0` and end the stream with an empty DATA frame. Kong reports
/// `end_of_stream=false` even without a body and then never calls the body callback, so on
/// Kong (`framing_only`) the framing headers decide.
pub fn body_expected(
    end_of_stream: bool,
    content_length: Option<u64>,
    chunked: bool,
    framing_only: bool,
) -> bool {
    if end_of_stream {
        return false;
    }
    if !framing_only {
        return true;
    }
    match content_length {
        Some(n) => n > 0,
        None => chunked,
    }
}

fn fallback_random(now_nanos: u64, context_id: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut x = now_nanos ^ (u64::from(context_id) << 32);
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

#[cfg(test)]
mod tests;
