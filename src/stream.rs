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

use crate::answer::{Answer, Verdict};
use crate::callout::{self, Callout, Request, Stamp};
use crate::coalesce::{self, Coalescer, Split, Waiting};
use crate::config::{self, Config, Mode, OnFailure, Rule};
use crate::host::{Counter, Flavor, Host, Level, NO_RULE};
use crate::problem::{Cause, FilterError};
use crate::response;
use crate::trace::TraceParent;
use eventwire_contract::problem;
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
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
    coalescer: RefCell<Coalescer>,
    /// Off for good once the host refused to wake the root context.
    coalescing: Cell<bool>,
}

impl Vm {
    pub fn new(config: Config) -> Rc<Vm> {
        let coalescer = Coalescer::new(
            config.sidecar.batching,
            config.max_body_bytes,
            config.rules.len(),
        );
        Rc::new(Vm {
            coalescing: Cell::new(coalescer.enabled()),
            coalescer: RefCell::new(coalescer),
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
    match config::parse(bytes).and_then(|c| resolve_secrets(host, c)) {
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

/// The ingest secret into the header every callout carries, and the redaction key into the
/// rules that redact, each from where the config says.
fn resolve_secrets(host: &impl Host, mut c: Config) -> Result<Config, config::ConfigError> {
    if let Some(src) = &c.sidecar.secret {
        let secret = resolve(host, src, "sidecar.secret")?;
        c.sidecar.authorization = Some(format!("Bearer {secret}"));
    }
    if let Some(src) = &c.redaction_key {
        let key = resolve(host, src, "redaction_key")?;
        for rule in c.rules.iter_mut().filter(|r| !r.redact.is_empty()) {
            rule.redaction_key = key.as_bytes().to_vec();
        }
    }
    Ok(c)
}

fn resolve(
    host: &impl Host,
    src: &config::SecretSource,
    field: &str,
) -> Result<String, config::ConfigError> {
    let name = match src {
        config::SecretSource::Value(v) => return Ok(v.clone()),
        config::SecretSource::Env(name) => name,
    };
    let refused = |why: String| config::ConfigError {
        field: format!("{field}.env"),
        message: why,
    };
    let v = host.env(name).ok_or_else(|| {
        refused(format!(
            "{name} is not set in the VM (Envoy: list it in \
             vm_config.environment_variables.host_env_keys)"
        ))
    })?;
    match config::weak_secret(&v) {
        Some(why) => Err(refused(format!("{name}: {why}"))),
        None => Ok(v),
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
    /// Waiting for the sidecar's answer. `slot`: the callout is this request's own and
    /// counts in the coalescer's in-flight callouts of the rule.
    Ack {
        rule: usize,
        id: Option<String>,
        slot: bool,
        /// The event's trace context, for the 202 and the logs.
        trace: TraceParent,
        /// When its own callout went (host clock); 0 while it waits for a batch.
        sent_nanos: u64,
        /// `after_upstream`: the upstream's answer waits for this event.
        answer_held: bool,
    },
    /// `after_upstream`: the request went upstream; its event waits for the answer.
    Upstream {
        rule: usize,
        event: Box<Callout<'static>>,
    },
    /// `after_upstream`: the answer is held until its body (which the event reads) is in.
    ResponseBody {
        rule: usize,
        event: Box<Callout<'static>>,
        size: usize,
    },
    /// A local reply was sent; nothing more may go upstream.
    Replied,
}

/// Inside a request callback passing on is the callback's `Continue`; after the callout it
/// is an explicit resume.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Request,
    Callout,
    /// In the answer's headers or body phase, or after a callout sent from there: passing
    /// on means the upstream's answer goes to the client.
    Response,
    /// After the callout of an event whose answer is held: passing on resumes the answer.
    HeldAnswer,
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
        host.bump(Counter::Requests, NO_RULE);
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
                    idx,
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
            return self.fail(host, idx, rule, e, Phase::Request);
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
            State::Idle | State::Upstream { .. } | State::ResponseBody { .. } => {
                return Flow::Continue;
            }
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
                Some(r) => self.fail(host, rule, r, e, Phase::Request),
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
            State::Idle | State::Upstream { .. } | State::ResponseBody { .. } => Flow::Continue,
        }
    }

    /// `after_upstream`: the upstream answered. A status outside `publish_on` passes on with
    /// no event; otherwise the answer waits until its event is durable.
    pub fn on_response_headers(&mut self, host: &impl Host, end_of_stream: bool) -> Flow {
        let (rule, mut event) = match std::mem::replace(&mut self.state, State::Idle) {
            State::Upstream { rule, event } => (rule, event),
            other => {
                self.state = other;
                return Flow::Continue;
            }
        };
        let Some(vm) = self.vm.clone() else {
            return Flow::Continue;
        };
        let Some(r) = vm.config.rules.get(rule) else {
            return Flow::Continue;
        };
        let status = host
            .response_header(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
            .unwrap_or(0);
        if !r.publish_on.iter().any(|m| m.matches(status)) {
            host.bump(Counter::UpstreamSkipped, rule);
            return Flow::Continue;
        }
        // Headers are read here: Envoy's SDK panics on a read after this phase.
        match response::from_headers(&r.response, status, |n| host.response_header(n)) {
            Ok(picked) => picked.into_iter().for_each(|(n, v)| event.set_header(n, v)),
            Err(e) => return self.fail(host, rule, r, e, Phase::Response),
        }
        if r.response.needs_body() {
            if end_of_stream {
                let e = FilterError::UnusableAnswer {
                    detail: "the answer has no body to take values from".into(),
                };
                return self.fail(host, rule, r, e, Phase::Response);
            }
            self.state = State::ResponseBody {
                rule,
                event,
                size: 0,
            };
            return Flow::Pause;
        }
        self.send_held(host, &vm.config, rule, *event)
    }

    pub fn on_response_body(
        &mut self,
        host: &impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Flow {
        let (rule, size) = match &mut self.state {
            State::ResponseBody { rule, size, .. } => (*rule, size),
            // The upstream's answer waits for the callout.
            State::Ack {
                answer_held: true, ..
            } => return Flow::Pause,
            // Anything else, our own local replies included (Envoy runs them through this
            // callback too): a pause here would hold their body for ever.
            _ => return Flow::Continue,
        };
        *size = body_size;
        let Some(vm) = self.vm.clone() else {
            return Flow::Continue;
        };
        let Some(r) = vm.config.rules.get(rule) else {
            return Flow::Continue;
        };
        if body_size > r.response.max_body_bytes {
            let e = FilterError::UnusableAnswer {
                detail: format!(
                    "the answer's body exceeds response.max_body_bytes ({})",
                    r.response.max_body_bytes
                ),
            };
            return self.fail(host, rule, r, e, Phase::Response);
        }
        if !end_of_stream {
            return Flow::Pause;
        }
        let State::ResponseBody {
            rule, mut event, ..
        } = std::mem::replace(&mut self.state, State::Idle)
        else {
            return Flow::Continue;
        };
        let body = match host.response_body(body_size) {
            Ok(Some(b)) => b,
            Ok(None) => Vec::new(),
            Err(e) => {
                let detail = format!("cannot read the answer's body: {e}");
                return self.fail(
                    host,
                    rule,
                    r,
                    FilterError::ProxyFailure { detail },
                    Phase::Response,
                );
            }
        };
        match response::from_body(&r.response, &body) {
            Ok(picked) => picked.into_iter().for_each(|(n, v)| event.set_header(n, v)),
            Err(e) => return self.fail(host, rule, r, e, Phase::Response),
        }
        self.send_held(host, &vm.config, rule, *event)
    }

    /// Sends an `after_upstream` event; the answer stays paused until the sidecar's word.
    fn send_held(
        &mut self,
        host: &impl Host,
        cfg: &Config,
        idx: usize,
        event: Callout<'static>,
    ) -> Flow {
        self.send(host, cfg, idx, event, Phase::Response)
    }

    /// The sidecar's answer to this request's own callout (or the host's word that there
    /// is none).
    pub fn on_callout_response(&mut self, host: &impl Host, num_headers: usize, body_size: usize) {
        let State::Ack {
            rule,
            slot,
            sent_nanos,
            ..
        } = self.state
        else {
            return;
        };
        let Some(vm) = self.vm.clone() else {
            return;
        };
        record_round_trip(host, rule, sent_nanos);
        let answer = read_answer(host, vm.flavor(host), num_headers, body_size);
        self.on_answer(host, &answer);
        if slot && vm.coalescer.borrow_mut().done(rule) {
            wake(host, &vm);
        }
    }

    /// The request goes away (client gone) with its own callout in flight: the answer
    /// will find no one, so its callout is free now.
    pub fn on_drop(&mut self, host: &impl Host) {
        if let (
            State::Ack {
                rule, slot: true, ..
            },
            Some(vm),
        ) = (&self.state, &self.vm)
            && vm.coalescer.borrow_mut().done(*rule)
        {
            wake(host, vm);
        }
        self.state = State::Idle;
    }

    /// The sidecar's answer for this request's event: from its own callout, or its share of
    /// a batch (`coalesce`), delivered by the root context.
    pub fn on_answer(&mut self, host: &impl Host, answer: &Answer<'_>) {
        let (idx, id, trace, held) = match std::mem::replace(&mut self.state, State::Idle) {
            State::Ack {
                rule,
                id,
                trace,
                answer_held,
                ..
            } => (rule, id, trace, answer_held),
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
        let id = id.as_deref().unwrap_or("-");
        let trace_id = trace.trace_id();
        match answer.verdict(cfg.sidecar.timeout_ms) {
            Verdict::Accepted { status } => {
                host.bump(Counter::Accepted, idx);
                host.log(
                    Level::Debug,
                    format_args!("rule {} event {id} trace {trace_id} accepted", rule.name),
                );
                if held {
                    host.resume_response();
                } else {
                    self.accepted(host, rule, status, answer, trace);
                }
            }
            Verdict::Refused { status } => {
                host.log(
                    Level::Warn,
                    format_args!(
                        "rule {} event {id} trace {trace_id} refused by the sidecar with {status}",
                        rule.name
                    ),
                );
                host.bump(Counter::Refused, idx);
                let cause = if status >= 500 {
                    Cause::Infrastructure
                } else {
                    Cause::Request
                };
                if passes_through(rule, cause) {
                    host.bump(Counter::Passthrough, idx);
                    if held {
                        host.resume_response();
                    } else {
                        host.resume();
                    }
                } else {
                    // The sidecar's problem, relayed as it is.
                    let retry = answer.retry_after.as_deref();
                    let retry = retry.and_then(|r| std::str::from_utf8(r).ok());
                    let mut headers = vec![("content-type", problem::CONTENT_TYPE)];
                    if let Some(r) = retry {
                        headers.push(("retry-after", r));
                    }
                    host.reply(status, headers, &answer.body);
                    self.state = State::Replied;
                }
            }
            Verdict::Unavailable { detail } => {
                host.log(
                    Level::Warn,
                    format_args!("rule {} event {id} trace {trace_id}: {detail}", rule.name),
                );
                let e = FilterError::SidecarUnavailable { detail };
                let phase = if held {
                    Phase::HeldAnswer
                } else {
                    Phase::Callout
                };
                self.fail(host, idx, rule, e, phase);
            }
        }
    }

    /// Tap: the request goes on upstream. Bridge: the client gets the sidecar's 202 answer.
    fn accepted(
        &mut self,
        host: &impl Host,
        rule: &Rule,
        status: u16,
        answer: &Answer<'_>,
        trace: TraceParent,
    ) {
        match rule.mode {
            Mode::Tap => host.resume(),
            // Its event goes after the answer (`send_held`), never from here.
            Mode::AfterUpstream => host.resume_response(),
            Mode::Bridge => {
                let location = answer
                    .location
                    .as_deref()
                    .and_then(|l| std::str::from_utf8(l).ok());
                let mut headers = vec![("content-type", "application/json")];
                if let Some(l) = location {
                    headers.push(("location", l));
                }
                headers.push(("traceparent", trace.as_str()));
                // 202, or a batch's 207 when only some of its events were accepted.
                host.reply(status, headers, &answer.body);
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
                return self.fail(host, idx, rule, e, Phase::Request);
            }
        };
        if rule.mode == Mode::AfterUpstream {
            return self.hold_for_answer(host, idx, rule, out);
        }
        self.send(host, cfg, idx, out, Phase::Request)
    }

    /// Sends the event in its own callout, or has it wait to go with others of its rule
    /// while theirs is in flight (`coalesce`). `phase`: `Response` when the upstream's
    /// answer is held meanwhile.
    fn send(
        &mut self,
        host: &impl Host,
        cfg: &Config,
        idx: usize,
        out: Callout<'_>,
        phase: Phase,
    ) -> Flow {
        let slot = match self.coalesce(host, idx, &out) {
            Coalesced::Waiting => {
                self.state = State::Ack {
                    rule: idx,
                    id: out.id.map(Cow::into_owned),
                    slot: false,
                    trace: out.trace,
                    sent_nanos: 0,
                    answer_held: matches!(phase, Phase::Response),
                };
                return Flow::Pause;
            }
            Coalesced::Direct { slot } => slot,
        };
        self.dispatch(host, cfg, idx, out, slot, phase)
    }

    /// Sends one event's callout and waits for the sidecar's answer.
    fn dispatch(
        &mut self,
        host: &impl Host,
        cfg: &Config,
        idx: usize,
        out: Callout<'_>,
        slot: bool,
        phase: Phase,
    ) -> Flow {
        let Some(rule) = cfg.rules.get(idx) else {
            return Flow::Continue;
        };
        let sent_nanos = host.now_nanos();
        let dispatched = host.dispatch(
            &cfg.sidecar.upstream,
            out.header_refs(),
            &out.body,
            cfg.sidecar.timeout_ms,
        );
        match dispatched {
            Ok(_token) => {
                host.bump_by(Counter::PublishedBytes, idx, out.body.len() as u64);
                self.state = State::Ack {
                    rule: idx,
                    id: out.id.map(Cow::into_owned),
                    slot,
                    trace: out.trace,
                    sent_nanos,
                    answer_held: matches!(phase, Phase::Response),
                };
                Flow::Pause
            }
            Err(e) => {
                if let Some(vm) = &self.vm
                    && slot
                    && vm.coalescer.borrow_mut().done(idx)
                {
                    wake(host, vm);
                }
                let detail = format!(
                    "the callout to sidecar upstream '{}' failed at once ({e})",
                    cfg.sidecar.upstream
                );
                let id = out.id.as_deref().unwrap_or("-");
                let trace_id = out.trace.trace_id();
                host.log(
                    Level::Error,
                    format_args!("rule {} event {id} trace {trace_id}: {detail}", rule.name),
                );
                let e = FilterError::SidecarUnavailable { detail };
                self.fail(host, idx, rule, e, phase)
            }
        }
    }

    /// `after_upstream`: the event is built (so bad request data is refused before the
    /// upstream sees it) and kept; the request goes on.
    fn hold_for_answer(
        &mut self,
        host: &impl Host,
        idx: usize,
        rule: &Rule,
        out: Callout<'_>,
    ) -> Flow {
        let refuse = |detail: &str| FilterError::InvalidCloudEvent {
            attribute: "",
            detail: detail.to_string(),
        };
        if out.event_in_body() {
            let e = refuse(
                "an after_upstream rule publishes plain requests and binary-mode CloudEvents, not structured ones or batches",
            );
            return self.fail(host, idx, rule, e, Phase::Request);
        }
        if self
            .vm
            .as_ref()
            .is_some_and(|vm| vm.flavor(host) == Flavor::Kong)
        {
            let detail = "mode after_upstream is not possible on Kong: its engine cannot call out or hold the answer in the response phase".to_string();
            host.log(Level::Error, format_args!("rule {}: {detail}", rule.name));
            return self.fail(
                host,
                idx,
                rule,
                FilterError::ProxyFailure { detail },
                Phase::Request,
            );
        }
        self.state = State::Upstream {
            rule: idx,
            event: Box::new(out.into_owned()),
        };
        Flow::Continue
    }

    /// Whether the event takes its own callout now or waits to go with others. Only events
    /// the filter built (plain requests) wait: a CloudEvent the client sent goes as it came.
    fn coalesce(&self, host: &impl Host, rule: usize, out: &Callout<'_>) -> Coalesced {
        let Some(vm) = &self.vm else {
            return Coalesced::Direct { slot: false };
        };
        if !vm.coalescing.get() || vm.flavor(host) != Flavor::Envoy || out.id.is_none() {
            return Coalesced::Direct { slot: false };
        }
        let mut c = vm.coalescer.borrow_mut();
        if c.direct(rule) {
            return Coalesced::Direct { slot: true };
        }
        let Some(event) = callout::structured(out) else {
            return Coalesced::Direct { slot: false };
        };
        let waiting = Waiting {
            context_id: self.context_id,
            event,
        };
        if c.wait(rule, waiting) {
            drop(c);
            // The first wake-up registers the host's queue; if that fails, this is the
            // only event waiting and it goes alone after all.
            if !wake(host, vm) {
                vm.coalescer.borrow_mut().take_back(rule);
                return Coalesced::Direct { slot: false };
            }
        }
        Coalesced::Waiting
    }

    /// The time and randomness that make an event unique. Should the host's generator fail,
    /// time and context id are mixed instead: a counter alone would repeat across VMs.
    fn stamp(&self, host: &impl Host) -> Stamp {
        let now_nanos = host.now_nanos();
        // One host call for the event id and the ids of a trace the filter may start.
        let mut bytes = [0u8; 40];
        if !host.fill_random(&mut bytes) {
            host.log(
                Level::Error,
                format_args!("random_get failed; mixing time and context id instead"),
            );
            fallback_random(now_nanos, self.context_id, &mut bytes);
        }
        let mut random = [0u8; 16];
        let mut trace = [0u8; 24];
        random.copy_from_slice(&bytes[..16]);
        trace.copy_from_slice(&bytes[16..]);
        Stamp {
            now_nanos,
            random,
            trace,
        }
    }

    fn fail_rule(&mut self, host: &impl Host, cfg: &Config, idx: usize, e: FilterError) -> Flow {
        match cfg.rules.get(idx) {
            Some(rule) => self.fail(host, idx, rule, e, Phase::Request),
            None => Flow::Continue,
        }
    }

    /// Ends a request that could not be published: an error reply, or on with no event.
    fn fail(
        &mut self,
        host: &impl Host,
        idx: usize,
        rule: &Rule,
        e: FilterError,
        phase: Phase,
    ) -> Flow {
        self.state = State::Idle;
        let counter = match &e {
            FilterError::SidecarUnavailable { .. } => Counter::Unavailable,
            FilterError::ProxyFailure { .. } => Counter::ProxyFailed,
            _ => Counter::Rejected,
        };
        host.bump(counter, idx);
        if passes_through(rule, e.cause()) {
            host.bump(Counter::Passthrough, idx);
            host.log(
                Level::Warn,
                format_args!(
                    "rule {}: passing the request on without an event: {e}",
                    rule.name
                ),
            );
            match phase {
                Phase::Callout => host.resume(),
                Phase::HeldAnswer => host.resume_response(),
                Phase::Request | Phase::Response => {}
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

enum Coalesced {
    Waiting,
    Direct { slot: bool },
}

/// Asks the host to run the root context, which sends the waiting events (`flush`).
/// Without wake-ups waiting events would never go, so a refusal turns batching off: every
/// event goes alone from then on.
fn wake(host: &impl Host, vm: &Vm) -> bool {
    match host.wake() {
        Ok(()) => true,
        Err(e) => {
            host.log(
                Level::Error,
                format_args!("cannot wake the root context ({e}); events go one by one"),
            );
            vm.coalescing.set(false);
            vm.coalescer.borrow_mut().woken();
            false
        }
    }
}

/// The root context's turn: sends the waiting events of each rule with a callout free, as
/// one batch each. Returns the answers of batches that could not be sent at all.
pub fn flush(host: &impl Host, vm: &Vm) -> Vec<(u32, Answer<'static>)> {
    let cfg = &vm.config;
    let mut failed = Vec::new();
    vm.coalescer.borrow_mut().woken();
    loop {
        let Some(mut batch) = vm.coalescer.borrow_mut().next_batch() else {
            return failed;
        };
        let Some(rule) = cfg.rules.get(batch.rule) else {
            vm.coalescer.borrow_mut().unsent(&batch);
            continue;
        };
        let headers = callout::batch_headers(rule, &cfg.sidecar);
        let body = batch.body();
        batch.sent_nanos = host.now_nanos();
        match host.dispatch(
            &cfg.sidecar.upstream,
            headers,
            &body,
            cfg.sidecar.timeout_ms,
        ) {
            Ok(token) => {
                host.bump(Counter::Batches, batch.rule);
                host.bump_by(
                    Counter::BatchedEvents,
                    batch.rule,
                    batch.waiting.len() as u64,
                );
                host.bump_by(Counter::PublishedBytes, batch.rule, body.len() as u64);
                vm.coalescer.borrow_mut().sent(token, batch);
            }
            Err(e) => {
                host.log(
                    Level::Error,
                    format_args!(
                        "rule {}: the batch callout to sidecar upstream '{}' failed at once ({e})",
                        rule.name, cfg.sidecar.upstream
                    ),
                );
                vm.coalescer.borrow_mut().unsent(&batch);
                let none = Answer::default();
                failed.extend(batch.waiting.iter().map(|w| (w.context_id, none.clone())));
            }
        }
    }
}

/// The answer to a batch callout (`token`), split into each waiting request's answer;
/// events the sidecar did not judge go again with the next batch.
pub fn batch_answered(
    host: &impl Host,
    vm: &Vm,
    token: u32,
    num_headers: usize,
    body_size: usize,
) -> Vec<(u32, Answer<'static>)> {
    let Some(batch) = vm.coalescer.borrow_mut().answered(token) else {
        return Vec::new();
    };
    record_round_trip(host, batch.rule, batch.sent_nanos);
    let answer = read_answer(host, vm.flavor(host), num_headers, body_size);
    let mut waiting = batch.waiting;
    match coalesce::split(&answer, waiting.len()) {
        Split::Each(each) => waiting
            .iter()
            .zip(each)
            .map(|(w, a)| (w.context_id, owned_answer(a)))
            .collect(),
        Split::All => {
            let a = owned_answer(answer.clone());
            waiting.iter().map(|w| (w.context_id, a.clone())).collect()
        }
        Split::One { index } => {
            let refused = waiting.remove(index);
            vm.coalescer.borrow_mut().requeue(batch.rule, waiting);
            vec![(refused.context_id, owned_answer(answer.clone()))]
        }
    }
}

fn owned_answer(a: Answer<'_>) -> Answer<'static> {
    let own = |c: Option<Cow<'_, [u8]>>| c.map(|c| Cow::Owned(c.into_owned()));
    Answer {
        status: a.status,
        content_type: own(a.content_type),
        dispatch_status: own(a.dispatch_status),
        retry_after: own(a.retry_after),
        location: own(a.location),
        body: Cow::Owned(a.body.into_owned()),
    }
}

/// Reads the callout answer the host holds. Headers only when it has some (Envoy traps
/// otherwise), except Kong's `:dispatch_status` on a failure.
fn read_answer(
    host: &impl Host,
    flavor: Flavor,
    num_headers: usize,
    body_size: usize,
) -> Answer<'static> {
    let header = |name: &str| {
        (num_headers > 0)
            .then(|| host.callout_header(name))
            .flatten()
            .map(Cow::Owned)
    };
    let status: Option<u16> =
        header(":status").and_then(|s| std::str::from_utf8(&s).ok()?.parse().ok());
    let dispatch_status = match (num_headers, flavor) {
        (0, Flavor::Kong) => host.callout_header(":dispatch_status").map(Cow::Owned),
        _ => None,
    };
    let body = if body_size > 0 {
        host.callout_body(body_size)
    } else {
        Vec::new()
    };
    // Each header read is a host call: only what the answer's kind uses.
    let (location, retry_after) = match status {
        Some(200..=299) => (header("location"), None),
        Some(_) => (None, header("retry-after")),
        None => (None, None),
    };
    Answer {
        status,
        content_type: header("content-type"),
        dispatch_status,
        retry_after,
        location,
        body: Cow::Owned(body),
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

fn fallback_random(now_nanos: u64, context_id: u32, out: &mut [u8]) {
    let mut x = now_nanos ^ (u64::from(context_id) << 32);
    for chunk in out.chunks_mut(8) {
        x = splitmix64(x);
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// A callout's round trip into its rule's histogram (host clock; 0 = not sent by us).
fn record_round_trip(host: &impl Host, rule: usize, sent_nanos: u64) {
    if sent_nanos > 0 {
        let ms = host.now_nanos().saturating_sub(sent_nanos) / 1_000_000;
        host.record_callout_ms(rule, ms);
    }
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
