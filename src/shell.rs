//! The proxy-wasm shell: proxy callbacks into `stream`, `Host` onto proxy-wasm calls.
//! Nothing here decides anything.
//!
//! Only `hostcalls::*` functions are used, never the SDK's trait wrappers that `unwrap()`.
//! The hostcalls still panic on a status they do not expect, so `stream` calls each only in
//! a phase where the host answers Ok or NotFound.

use crate::host::{Counter, HeaderList, Host, HostError, Level};
use crate::stream::{self, Flow, Stream, Vm};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::fmt;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    // Info, not Trace: the SDK formats every record up to this level before the host filters
    // it, and debug lines would then cost a format per request.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { vm: None, host: ProxyHost::default() })
    });
}}

/// The host as the filter sees it, plus the ids of the counters it defined.
#[derive(Clone, Copy, Default)]
struct ProxyHost {
    /// `None` where the host refused to define one.
    metrics: [Option<u32>; Counter::ALL.len()],
}

impl ProxyHost {
    fn define_metrics(&mut self) {
        for c in Counter::ALL {
            self.metrics[c.index()] = match hostcalls::define_metric(MetricType::Counter, c.name())
            {
                Ok(id) => Some(id),
                Err(e) => {
                    log::warn!("cannot define metric {}: {e:?}", c.name());
                    None
                }
            };
        }
    }
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

    fn dispatch(
        &self,
        upstream: &str,
        headers: HeaderList<'_>,
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<(), HostError> {
        let timeout = Duration::from_millis(timeout_ms);
        hostcalls::dispatch_http_call(upstream, headers, Some(body), Vec::new(), timeout)
            .map(|_token| ())
            .map_err(host_error)
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

    fn bump(&self, counter: Counter) {
        if let Some(id) = self.metrics[counter.index()] {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn now_nanos(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }

    fn random16(&self) -> Option<[u8; 16]> {
        let mut b = [0u8; 16];
        // SAFETY: the buffer is valid for 16 writable bytes for the whole call.
        (unsafe { wasi_random_get(b.as_mut_ptr(), b.len()) } == 0).then_some(b)
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

struct Root {
    vm: Option<Rc<Vm>>,
    host: ProxyHost,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten();
        let Some(config) = stream::configure(&self.host, bytes.as_deref()) else {
            return false;
        };
        self.vm = Some(Vm::new(config));
        self.host.define_metrics();
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None panics in the SDK; without a config every request just passes.
        Some(Box::new(Http {
            stream: Stream::new(self.vm.clone(), context_id),
            host: self.host,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    stream: Stream,
    host: ProxyHost,
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
            .on_callout_response(&self.host, num_headers, body_size);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.stream.on_request_headers(&self.host, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(
            self.stream
                .on_request_body(&self.host, body_size, end_of_stream),
        )
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.stream.on_request_trailers(&self.host))
    }
}
