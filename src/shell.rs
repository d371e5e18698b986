//! The proxy-wasm shell: proxy callbacks into `stream`, `Host` onto proxy-wasm calls.
//! Nothing here decides anything.
//!
//! Only `hostcalls::*` functions are used, never the SDK's trait wrappers that `unwrap()`.
//! The hostcalls still panic on a status they do not expect, so `stream` calls each only in
//! a phase where the host answers Ok or NotFound.

use crate::answer::Answer;
use crate::config::Config;
use crate::host::{CALLOUT_HISTOGRAM, Counter, HeaderList, Host, HostError, Level, rule_metric};
use crate::stream::{self, Flow, Stream, Vm};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::{Rc, Weak};
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    // Info, not Trace: the SDK formats every record up to this level before the host filters
    // it, and debug lines would then cost a format per request.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            context_id,
            vm: None,
            host: ProxyHost::default(),
            streams: Rc::default(),
        })
    });
}}

/// The host as the filter sees it, plus the ids of the metrics it defined.
#[derive(Clone, Default)]
struct ProxyHost {
    metrics: Rc<MetricIds>,
    wake: Rc<WakeQueue>,
}

/// Host metric ids; `None` where the host refused to define one.
#[derive(Default)]
struct MetricIds {
    requests: Option<u32>,
    /// By rule index.
    rules: Vec<RuleMetrics>,
}

struct RuleMetrics {
    counters: [Option<u32>; Counter::ALL.len()],
    callout_ms: Option<u32>,
}

/// Envoy's shared queue that wakes this VM's root context (`on_queue_ready`), registered
/// on the first wake-up: Kong's engine traps on shared queues, and it never wakes.
#[derive(Default)]
struct WakeQueue {
    /// Unique per VM: Envoy keys queues by VM id and name, and the last one to register a
    /// name would take the wake-ups of every worker.
    name: String,
    id: Cell<Option<u32>>,
}

impl ProxyHost {
    /// Defined once per configuration: a host call per metric, none per request.
    fn define_metrics(&mut self, config: &Config) {
        let rules = config.rules.iter().map(|rule| {
            let mut counters = [None; Counter::ALL.len()];
            for c in Counter::ALL.into_iter().filter(|c| c.per_rule()) {
                counters[c.index()] =
                    define(MetricType::Counter, &rule_metric(c.name(), &rule.name));
            }
            let histogram = rule_metric(CALLOUT_HISTOGRAM, &rule.name);
            RuleMetrics {
                counters,
                callout_ms: define(MetricType::Histogram, &histogram),
            }
        });
        self.metrics = Rc::new(MetricIds {
            requests: define(MetricType::Counter, Counter::Requests.name()),
            rules: rules.collect(),
        });
    }
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name)
        .map_err(|e| log::warn!("cannot define metric {name}: {e:?}"))
        .ok()
}

fn host_error(s: proxy_wasm::types::Status) -> HostError {
    HostError(format!("{s:?}"))
}

impl Host for ProxyHost {
    fn request_headers(&self) -> Result<Vec<(String, Vec<u8>)>, HostError> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).map_err(host_error)
    }

    fn request_header(&self, name: &str) -> Option<String> {
        let v = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name).ok()??;
        String::from_utf8(v).ok()
    }

    fn property(&self, path: &[&str]) -> Option<String> {
        let v = hostcalls::get_property(path.to_vec()).ok()??;
        String::from_utf8(v).ok()
    }

    fn request_body(&self, size: usize) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size).map_err(host_error)
    }

    fn callout_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn callout_body(&self, size: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }

    fn response_body(&self, size: usize) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size).map_err(host_error)
    }

    fn resume_response(&self) {
        if let Err(s) = hostcalls::resume_http_response() {
            log::error!("resume of the answer failed: {s:?}");
        }
    }

    fn dispatch(
        &self,
        upstream: &str,
        headers: HeaderList<'_>,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        let timeout = Duration::from_millis(timeout_ms);
        hostcalls::dispatch_http_call(upstream, headers, Some(body), Vec::new(), timeout)
            .map_err(host_error)
    }

    fn wake(&self) -> Result<(), HostError> {
        let id = match self.wake.id.get() {
            Some(id) => id,
            None => {
                let id = hostcalls::register_shared_queue(&self.wake.name).map_err(host_error)?;
                self.wake.id.set(Some(id));
                id
            }
        };
        hostcalls::enqueue_shared_queue(id, Some(b"")).map_err(host_error)
    }

    fn reply(&self, status: u16, headers: HeaderList<'_>, body: &[u8]) {
        if let Err(s) = hostcalls::send_http_response(u32::from(status), headers, Some(body)) {
            log::error!("local reply {status} failed: {s:?}");
        }
    }

    fn resume(&self) {
        if let Err(s) = hostcalls::resume_http_request() {
            log::error!("resume failed: {s:?}");
        }
    }

    fn bump_by(&self, counter: Counter, rule: usize, by: u64) {
        let id = if counter.per_rule() {
            let rule = self.metrics.rules.get(rule);
            rule.and_then(|r| r.counters[counter.index()])
        } else {
            self.metrics.requests
        };
        // Envoy refuses an increment of 0 (BadArgument).
        if let (Some(id), Ok(by @ 1..)) = (id, i64::try_from(by)) {
            let _ = hostcalls::increment_metric(id, by);
        }
    }

    fn record_callout_ms(&self, rule: usize, ms: u64) {
        if let Some(id) = self.metrics.rules.get(rule).and_then(|r| r.callout_ms) {
            let _ = hostcalls::record_metric(id, ms);
        }
    }

    fn now_nanos(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }

    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn fill_random(&self, buf: &mut [u8]) -> bool {
        // SAFETY: the buffer is valid for buf.len() writable bytes for the whole call.
        unsafe { wasi_random_get(buf.as_mut_ptr(), buf.len()) == 0 }
    }

    fn log(&self, level: Level, message: fmt::Arguments<'_>) {
        log::log!(level, "{message}");
    }
}

// WASI's generator; both Envoy and Kong provide it.
#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    #[link_name = "random_get"]
    fn wasi_random_get(buf: *mut u8, len: usize) -> u16;
}

/// The requests of this VM by context id, for the root context to answer those that
/// waited for a batch. A list: it holds the requests in flight, and a hash map would cost
/// the .wasm more than the scans cost.
type Streams = Rc<RefCell<Vec<(u32, Weak<RefCell<Stream>>)>>>;

struct Root {
    context_id: u32,
    vm: Option<Rc<Vm>>,
    host: ProxyHost,
    streams: Streams,
}

impl Root {
    /// Each answer to its request: the host acts on that request while it is the
    /// effective context. A request that went away meanwhile is skipped.
    fn deliver(&self, answers: Vec<(u32, Answer<'static>)>) {
        if answers.is_empty() {
            return;
        }
        for (context_id, answer) in answers {
            let stream = self
                .streams
                .borrow()
                .iter()
                .find(|(id, _)| *id == context_id)
                .and_then(|(_, s)| s.upgrade());
            let Some(stream) = stream else {
                continue;
            };
            if hostcalls::set_effective_context(context_id).is_err() {
                continue;
            }
            if let Ok(mut stream) = stream.try_borrow_mut() {
                stream.on_answer(&self.host, &answer);
            }
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }

    fn flush(&self) {
        if let Some(vm) = &self.vm {
            let failed = stream::flush(&self.host, vm);
            self.deliver(failed);
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        let Some(vm) = self.vm.clone() else {
            return;
        };
        let answers = stream::batch_answered(&self.host, &vm, token, num_headers, body_size);
        self.deliver(answers);
        self.flush();
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten();
        let Some(config) = stream::configure(&self.host, bytes.as_deref()) else {
            return false;
        };
        self.host.define_metrics(&config);
        self.vm = Some(Vm::new(config));
        let mut salt = [0u8; 16];
        self.host.fill_random(&mut salt);
        let mut name = String::from("eventwire-wake-");
        for b in salt {
            name.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            name.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        name.push('-');
        name.push_str(&self.context_id.to_string());
        self.host.wake = Rc::new(WakeQueue {
            name,
            id: Cell::new(None),
        });
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        // The items only say "wake up"; the waiting events are in the coalescer.
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        self.flush();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None panics in the SDK; without a config every request just passes.
        let stream = Rc::new(RefCell::new(Stream::new(self.vm.clone(), context_id)));
        self.streams
            .borrow_mut()
            .push((context_id, Rc::downgrade(&stream)));
        Some(Box::new(Http {
            context_id,
            stream,
            host: self.host.clone(),
            streams: self.streams.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    context_id: u32,
    stream: Rc<RefCell<Stream>>,
    host: ProxyHost,
    streams: Streams,
}

impl Drop for Http {
    fn drop(&mut self) {
        if let Ok(mut stream) = self.stream.try_borrow_mut() {
            stream.on_drop(&self.host);
        }
        let mut streams = self.streams.borrow_mut();
        if let Some(at) = streams.iter().position(|(id, _)| *id == self.context_id) {
            streams.swap_remove(at);
        }
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        self.stream
            .borrow_mut()
            .on_callout_response(&self.host, num_headers, body_size);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(
            self.stream
                .borrow_mut()
                .on_request_headers(&self.host, end_of_stream),
        )
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(
            self.stream
                .borrow_mut()
                .on_request_body(&self.host, body_size, end_of_stream),
        )
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.stream.borrow_mut().on_request_trailers(&self.host))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(
            self.stream
                .borrow_mut()
                .on_response_headers(&self.host, end_of_stream),
        )
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(
            self.stream
                .borrow_mut()
                .on_response_body(&self.host, body_size, end_of_stream),
        )
    }
}
