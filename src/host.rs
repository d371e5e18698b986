//! What the filter needs from the proxy, as a trait: the request state machine (`stream`)
//! decides, the proxy-wasm shell (`shell`) carries out. Unit tests drive the machine with a
//! mock host that records every effect.
//!
//! Each method maps to one proxy-wasm call (or none) that both Envoy and Kong implement;
//! the shell must not panic in any of them (a panic kills the VM for every request).

use std::fmt;

pub use log::Level;

/// A host call that answered with an error status (the shell's rendering of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError(pub String);

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The filter's counters in the proxy's stats (Envoy: `wasmcustom.<name>` in /stats and
/// `<name>` in /stats/prometheus; Kong: `pw.<filter>.<name>`). `Requests` is one counter;
/// the others are one per rule, named `<name>.rule.<rule name>` (`rule_metric`), which the
/// shipped Envoy config (`stats_tags`) and Kong's meta.json (`label_patterns`) turn into a
/// `rule` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Requests the filter saw (with per-route enablement in Envoy: only on enabled routes).
    Requests,
    /// Events the sidecar acknowledged.
    Accepted,
    /// Requests the filter itself refused (bad data for an event).
    Rejected,
    /// Problem answers of the sidecar (bad event, unknown topic, backpressure).
    Refused,
    /// Sidecar unreachable, reset or timed out.
    Unavailable,
    /// Requests sent upstream without their event (`on_failure: passthrough`, tap).
    Passthrough,
    /// The proxy failed a call the filter needs (e.g. a body it could not hand over).
    ProxyFailed,
    /// Batch callouts: events that waited while the rule's callouts were in flight, sent
    /// together (`coalesce`).
    Batches,
    /// Events sent in those batches (the rest went alone).
    BatchedEvents,
    /// Bytes of the callouts' bodies sent to the sidecar (the events' data, or batches).
    PublishedBytes,
    /// `after_upstream` requests whose upstream status was not in `publish_on`.
    UpstreamSkipped,
}

impl Counter {
    pub const ALL: [Counter; 11] = [
        Counter::Requests,
        Counter::Accepted,
        Counter::Rejected,
        Counter::Refused,
        Counter::Unavailable,
        Counter::Passthrough,
        Counter::ProxyFailed,
        Counter::Batches,
        Counter::BatchedEvents,
        Counter::PublishedBytes,
        Counter::UpstreamSkipped,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Requests => "eventwire_requests_total",
            Counter::Accepted => "eventwire_events_accepted_total",
            Counter::Rejected => "eventwire_requests_rejected_total",
            Counter::Refused => "eventwire_sidecar_refused_total",
            Counter::Unavailable => "eventwire_sidecar_unavailable_total",
            Counter::Passthrough => "eventwire_passthrough_total",
            Counter::ProxyFailed => "eventwire_proxy_failures_total",
            Counter::Batches => "eventwire_batches_total",
            Counter::BatchedEvents => "eventwire_batched_events_total",
            Counter::PublishedBytes => "eventwire_published_bytes_total",
            Counter::UpstreamSkipped => "eventwire_upstream_skipped_total",
        }
    }

    /// Counted per rule, or once for the filter.
    pub const fn per_rule(self) -> bool {
        !matches!(self, Counter::Requests)
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

/// The histogram of callout round trips, one per rule, in milliseconds (the unit Envoy's
/// default buckets are made for).
pub const CALLOUT_HISTOGRAM: &str = "eventwire_callout_duration_ms";

/// A per-rule metric's name: `eventwire_events_accepted_total.rule.orders`. Rule names are
/// `[A-Za-z0-9_-]` (checked at configuration), so the name splits back unambiguously.
pub fn rule_metric(metric: &str, rule: &str) -> String {
    format!("{metric}.rule.{rule}")
}

/// The rule argument of a counter that is not per rule (`Counter::Requests`).
pub const NO_RULE: usize = usize::MAX;

/// Which proxy runs the filter: their phases differ (see `stream::body_expected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Envoy,
    /// Kong's engine, ngx_wasm_module (nginx exposes its variables as `ngx.*` properties).
    Kong,
}

/// The headers a callout or local reply is sent with, in the host's calling convention.
pub type HeaderList<'a> = Vec<(&'a str, &'a str)>;

pub trait Host {
    /// All request headers (names as the host gives them). Only in the headers phase:
    /// Envoy panics the SDK when they are read after the headers were continued.
    fn request_headers(&self) -> Result<Vec<(String, Vec<u8>)>, HostError>;
    /// One request header as text; `None` when absent or not UTF-8.
    fn request_header(&self, name: &str) -> Option<String>;
    /// A property (`["xds", "route_name"]`, `["request", "path"]`) as text.
    fn property(&self, path: &[&str]) -> Option<String>;
    /// The buffered request body; `Ok(None)` when the host has none to give.
    fn request_body(&self, size: usize) -> Result<Option<Vec<u8>>, HostError>;
    /// One header of the callout's answer. Never called when the answer has no headers
    /// (that traps in Envoy).
    fn callout_header(&self, name: &str) -> Option<Vec<u8>>;
    fn callout_body(&self, size: usize) -> Vec<u8>;
    /// Sends the callout; its answer arrives as `Stream::on_callout_response` (or, sent
    /// from the root context, as `stream::batch_answered` with this token).
    fn dispatch(
        &self,
        upstream: &str,
        headers: HeaderList<'_>,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError>;
    /// Has the host call the root context soon, outside any request (`stream::flush`).
    /// Envoy only (a shared queue); Kong's engine has none.
    fn wake(&self) -> Result<(), HostError>;
    /// Answers the client; nothing more goes upstream.
    fn reply(&self, status: u16, headers: HeaderList<'_>, body: &[u8]);
    /// Lets a paused request continue upstream.
    fn resume(&self);
    /// One header of the upstream's answer (`:status` included). Only in the response
    /// headers phase.
    fn response_header(&self, name: &str) -> Option<Vec<u8>>;
    /// The buffered body of the upstream's answer.
    fn response_body(&self, size: usize) -> Result<Option<Vec<u8>>, HostError>;
    /// Lets a paused answer continue to the client.
    fn resume_response(&self);
    /// Adds to a counter: the filter's (`Counter::Requests`) or rule `rule`'s (an index
    /// into the configured rules).
    fn bump(&self, counter: Counter, rule: usize) {
        self.bump_by(counter, rule, 1);
    }
    fn bump_by(&self, counter: Counter, rule: usize, by: u64);
    /// Records one callout round trip of rule `rule` in its histogram.
    fn record_callout_ms(&self, rule: usize, ms: u64);
    fn now_nanos(&self) -> u64;
    /// A variable of the VM's environment (WASI `environ_get`; Envoy passes what
    /// `vm_config.environment_variables` names). Only at configuration.
    fn env(&self, name: &str) -> Option<String>;
    /// Fills `buf` with random bytes; false when the host's generator failed.
    fn fill_random(&self, buf: &mut [u8]) -> bool;
    fn log(&self, level: Level, message: fmt::Arguments<'_>);
}
