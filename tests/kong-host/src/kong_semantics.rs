//! Kong's proxy-wasm engine (ngx_wasm_module, as embedded by Kong Gateway 3.x), emulated:
//! every behaviour this host imitates is in this one module, each with its source.
//!
//! Sources: `ngx_wasm_module` at 3bed278 (`src/...` paths below), Kong at 22246ef
//! (`kong/...`), and the project's verified note `shared/notes/proxy-wasm-hosts.md`
//! ("note"), which wins where it and the sources disagree.
//!
//! | # | behaviour | source |
//! |---|---|---|
//! | 1 | The request-headers step runs before the body is read: in nginx's rewrite phase on the bare engine, in the access phase in Kong Gateway (Kong attaches the chain from Lua's access phase, which sets `req_headers_in_access`); the body is read only in the content phase, after the headers step continued. | `src/wasm/ngx_wasm_ops.c:448-519`, `src/common/lua/ngx_wasm_lua_ffi.c:155-156`, `kong/init.lua:1209, 1239` (`runloop.wasm_attach` after the Lua plugins' access handlers), `src/http/ngx_http_wasm_module.c:860-905` (the wasm access handler moves itself after Lua's, so the filter sees what auth plugins set, e.g. `X-Consumer-ID`), `kong/runloop/wasm.lua:1021-1060`; note |
//! | 2 | `on_request_headers` always gets `end_of_stream = false`. | `src/http/proxy_wasm/ngx_http_proxy_wasm.c:36-41`; note |
//! | 3 | `on_request_body` is called once, with the whole body and `end_of_stream = true`, and not at all when there is no body (or it is empty). | `ngx_http_proxy_wasm.c:66-70, 84-140`, `ngx_wasm_ops.c:506-527`; note |
//! | 4 | A `Pause` is resumed only by the last pending dispatch answer (the chain then continues) or by `proxy_continue_stream`/`proxy_continue_request`; a pause with nothing pending waits forever, so a filter pausing in headers to wait for the body hangs (no body callback comes). | `ngx_http_proxy_wasm_dispatch.c:930-955`, `src/common/proxy_wasm/ngx_proxy_wasm.c:533-575`, `ngx_proxy_wasm_host.c:1030-1045`; note ("verified 2026-12-02") |
//! | 5 | The action a callback returns wins over the host's own next action (a dispatch's implicit pause), except a local response, which ends the chain. | `ngx_proxy_wasm.c:864-876`, `ngx_http_proxy_wasm_dispatch.c:447` |
//! | 6 | Dispatch only from `on_request_headers`, `on_request_body`, `on_tick`, `on_http_call_response` (else a trap). | `ngx_proxy_wasm_host.c:1187-1207`; note |
//! | 7 | Dispatch upstream is a literal address: `host:port`, `[ipv6]:port`, `unix:/path`; no port = 80 (443 with TLS); a name goes through Kong's resolver (here: the system resolver). A cluster name is not an address: it fails to resolve. | `src/common/ngx_wasm_socket_tcp.c:139-228`, `kong/conf_loader/init.lua:723-727`; note |
//! | 8 | `:method` and `:path` are required; missing ones, a bad port or an empty host TRAP synchronously (`dispatch failed: no :method`, `dispatch failed: tcp socket - invalid port`). `:authority` is optional (Host = authority, else the upstream; `localhost` for unix sockets). | `ngx_http_proxy_wasm_dispatch.c:30-38, 290-346, 398-406, 560-590`, `ngx_wasm_socket_tcp.c:224-227`; note |
//! | 9 | `:scheme: https` means TLS to the dispatch target. | `ngx_http_proxy_wasm_dispatch.c:311-330`; note |
//! | 10 | The dispatch timeout sets connect, send and read timeouts alike. | `ngx_http_proxy_wasm_dispatch.c:409-411` |
//! | 11 | The request sent is HTTP/1.1 with `Host`, `Connection: close` and `Content-Length` (unless given), then the filter's headers. | `ngx_http_proxy_wasm_dispatch.c:640-700` |
//! | 12 | Asynchronous failures (connect refused, reset, timeout, bad answer) arrive as `on_http_call_response(token, 0, 0, 0)`; the call-response map then holds only `:dispatch_status` (`timeout`, `broken connection`, `tls handshake failure`, `resolver failure`, `reader failure`); on success it is `ok` next to `:status`. | `ngx_http_proxy_wasm_dispatch.c:905-925`, `src/common/proxy_wasm/ngx_proxy_wasm_maps.c:45-90, 149-200, 834-848`, `ngx_wasm_socket_tcp.c:39-50`, `docs/PROXY_WASM.md` "HTTP Dispatches"; note |
//! | 13 | Dispatch tokens are one process-wide counter starting at 0. | `ngx_http_proxy_wasm_dispatch.c:193, 255` |
//! | 14 | Properties are strings: `request.path` (`$request_uri`, with the query), `request.url_path`, `request.method`, `request.scheme`, `request.host` (the server's hostname), `request.protocol`, `request.query`, `request.headers.*`, `source.address` (IP only), `source.port`, `plugin_name`, `plugin_root_id`, `ngx.<variable>`; `route_name`, `node`, `cluster_name`, ... are "not supported" (None); `xds.*` does not exist (None); scoped (dotted) properties outside a request fail. | `src/common/proxy_wasm/ngx_proxy_wasm_properties.c:455-660, 1085-1160`, `docs/PROXY_WASM.md` "Supported Properties"; note |
//! | 15 | Kong's own properties (Lua getters): `kong.route_id`, `kong.route_name`, `kong.service_id`, `kong.service_name`, `kong.version`, `kong.client.protocol`, `kong.nginx.subsystem`, `kong.node.id`, `kong.request.port`, `kong.router.route`/`kong.router.service` (JSON), `kong.ctx.shared.*`. | `kong/runloop/wasm.lua:779-930`; note |
//! | 16 | `send_local_response` appends `\n` to a non-empty body, refuses a status outside 100..999 (BadArgument), TRAPS when a local response is already stashed or the response was sent, and cancels pending dispatches. | `src/http/ngx_http_wasm_local_response.c:37-64, 130-142`, `ngx_proxy_wasm_host.c:1114-1160`; note |
//! | 17 | Metrics are named `pw.<filter>.<name>` (at most 256 bytes); recording a counter traps. Here they are readable at the admin endpoint `/metrics`. | `docs/METRICS.md`, `ngx_proxy_wasm_host.c:1606-1780`, `docs/DIRECTIVES.md` `max_metric_name_length`; note |
//! | 18 | Calls Kong lacks TRAP (`host trap (function not yet implemented): <name>`): `proxy_get_log_level`, `proxy_done`, `proxy_continue_response`, `proxy_close_stream`, `proxy_resolve_shared_queue`, the gRPC calls, `proxy_get_status`, `proxy_clear_route_cache`. | `ngx_proxy_wasm_host.c:1903-2290` (entries with `ngx_proxy_wasm_hfuncs_nop`), `src/wasm/vm/ngx_wavm_host.c:301-306`; note |
//! | 19 | Shared queues: Kong defines no `shm_queue` zone, so `proxy_register_shared_queue`, `proxy_enqueue_shared_queue`, `proxy_dequeue_shared_queue` trap (`could not find queue`). | `ngx_proxy_wasm_host.c:1410-1560`, `kong/templates/nginx.lua:23-40` (only `shm_kv`), `kong.conf.default` "WASM injected directives" |
//! | 20 | Trailers: `on_request_trailers`/`on_response_trailers` are never called; a trailers map access TRAPS (the engine has no trailers map, and the SDK turns its BadArgument into a panic). | `docs/PROXY_WASM.md` "Supported Entrypoints", `ngx_proxy_wasm_maps.c:133-142`, `ngx_proxy_wasm_host.c:579-580`; note (trap) |
//! | 21 | `proxy_continue_stream` IS implemented for the HTTP request/response stream types (it is how SDK 0.2.x resumes a request); other stream types are an error, not a trap. | `ngx_proxy_wasm_host.c:1001-1023, 2050-2052`, `docs/PROXY_WASM.md` "Supported Host ABI" |
//! | 22 | Any trap or error in a request step answers 500; the trapped instance is discarded and a fresh one (with `on_vm_start`/`on_configure` again) serves the next request. A failed `on_configure` fails the filter for good: every request on its chain gets 500. | `src/http/proxy_wasm/ngx_http_proxy_wasm.c:389-393`, `ngx_proxy_wasm.c:990-1010, 1240-1250, 1362-1372` |
//! | 23 | A request body nginx spilled to a temporary file (larger than `client_body_buffer_size`, Kong's default 8k) cannot be read by the filter: `get_buffer` answers NotFound and logs `cannot read request body buffered to file`. | `ngx_proxy_wasm_host.c:66-83`, `kong/templates/kong_defaults.lua:91`; note |
//! | 24 | Request body readable in the headers, body and log steps only; the dispatch answer body in `on_http_call_response` (and log) only; else a trap. Request headers settable before the response is produced, response headers before `on_response_body`. | `ngx_proxy_wasm_host.c:31-135, 655-715` |
//! | 25 | Shared data needs an `shm_kv` zone (`nginx_wasm_shm_kv` / `nginx_wasm_shm_kv_<zone>` in kong.conf); without one get/set trap. | `ngx_proxy_wasm_host.c:1262-1330`, `kong.conf.default` |
//! | 26 | `proxy_set_tick_period_milliseconds` only in the root context, once. | `ngx_proxy_wasm_host.c:268-290` |
//! | 27 | The filter's name is the `.wasm` file's basename; a JSON `config` (filter with a `config_schema` in `<name>.meta.json`) reaches `on_configure` as its JSON text. | `kong.conf.default` `wasm_filters_path`, `kong/runloop/wasm.lua:686-720`; note |
//! | 28 | Chains: a route's and its service's chains both apply (service filters first); filters or chains with `enabled: false` are skipped. | `kong/runloop/wasm.lua:540-600, 672-683` |
//! | 29 | L4 (stream) contexts: Kong never calls `on_new_connection`/`on_downstream_data`/...; `proxy_continue_stream` for the downstream/upstream stream types, the L4 data buffers and `proxy_resume_downstream`/`_upstream` TRAP. | `docs/PROXY_WASM.md` "Supported Entrypoints" (NYI), `ngx_proxy_wasm_host.c:1016-1020, 2042-2048` (the engine answers an error the SDK panics on); note ("L4": trap) |
//!
//! Assumptions (neither the sources nor the note say, or this host simplifies):
//! - hostnames in dispatches resolve with the system resolver (Kong: its Lua DNS client);
//! - no TLS stack: a dispatch with `:scheme: https` fails asynchronously with
//!   `tls handshake failure` (the filter talks plain HTTP to a loopback sidecar);
//! - a dispatch timeout of 0 falls back to `nginx_wasm_socket_{connect,read,send}_timeout`;
//! - `on_response_body` is called once with the whole (buffered) response and
//!   `end_of_stream = true` (Kong calls it per chunk); a trap in a response step answers 500;
//! - answers to dispatches a filter issued before returning `Continue` are delivered after
//!   the upstream answered, before the response steps (Kong delivers them as they arrive);
//! - `proxy_call_foreign_function` (`resolve_lua`) and the vNEXT ABI names are not
//!   emulated: a foreign call traps, a module importing a vNEXT name fails to load;
//! - `proxy_set_effective_context` is accepted and ignored (one context per callback here);
//! - one instance per filter entry of a chain (Kong shares one instance per module and
//!   worker, with a root context per entry; a trap there discards all of them);
//! - Kong also validates a filter's JSON config against its `config_schema` when the
//!   declarative config is loaded; this host only requires the schema to exist (the tests
//!   validate `kong/kong.yml` against it);
//! - contexts whose client went away get no `on_log`/`on_done`;
//! - not Kong's proxy, only its engine: HTTP/1.1 only on the listener (no HTTP/2, no TLS),
//!   routing by path prefix only (`decl.rs`), `Host`/`X-Forwarded-*`/`X-Real-IP` towards the
//!   upstream as Kong sets them, no `Via`/`X-Kong-*` response headers.

use crate::abi::{self, Ctx, HostData};
use crate::decl::KongConf;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wasmtime::{Engine, Instance, Linker, Module, Store};

/// What this host reports as Kong's version (`kong.version`) and nginx's (`ngx.nginx_version`).
pub const KONG_VERSION: &str = "3.9.1";
pub const NGINX_VERSION: &str = "1.27.1";

mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const INTERNAL_FAILURE: i32 = 10;
}

const ACTION_PAUSE: i32 = 1;

/// The engine's steps (`ngx_proxy_wasm_step_e`); host calls check them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Root,
    Tick,
    Create,
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    DispatchResponse,
    Log,
    Done,
}

impl Step {
    pub fn callback(self) -> &'static str {
        match self {
            Step::Root => "on_configure",
            Step::Tick => "on_tick",
            Step::Create => "on_context_create",
            Step::RequestHeaders => "on_request_headers",
            Step::RequestBody => "on_request_body",
            Step::ResponseHeaders => "on_response_headers",
            Step::ResponseBody => "on_response_body",
            Step::DispatchResponse => "on_http_call_response",
            Step::Log => "on_log",
            Step::Done => "on_done",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Logging (nginx error.log style) and metrics.

pub struct Log {
    pub debug: bool,
}

impl Log {
    pub fn line(&self, level: &str, msg: &str) {
        if level == "debug" && !self.debug {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!(
            "{}.{:03} [{level}] {}",
            now.as_secs(),
            now.subsec_millis(),
            msg.replace('\n', "\\n")
        );
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

struct Metric {
    name: String,
    kind: MetricKind,
    value: i64,
}

#[derive(Default)]
pub struct Metrics {
    list: Mutex<Vec<Metric>>,
}

impl Metrics {
    pub fn snapshot(&self) -> BTreeMap<String, i64> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().map(|m| (m.name.clone(), m.value)).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Process-wide state (one nginx worker).

pub struct Shared {
    pub conf: KongConf,
    pub log: Log,
    pub metrics: Metrics,
    /// `shm_kv` zones defined in kong.conf (`*` = the default zone).
    pub kv_zones: Vec<String>,
    kv: Mutex<HashMap<String, (Vec<u8>, u32)>>,
    next_context: AtomicU32,
    next_token: AtomicU32,
    pub hostname: String,
    pub node_id: String,
    pub traps: AtomicU64,
}

impl Shared {
    pub fn new(conf: KongConf, kv_zones: Vec<String>, debug: bool) -> Shared {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        Shared {
            conf,
            log: Log { debug },
            metrics: Metrics::default(),
            kv_zones,
            kv: Mutex::new(HashMap::new()),
            // Root contexts take small ids; request contexts count up from here.
            next_context: AtomicU32::new(1000),
            next_token: AtomicU32::new(0),
            hostname,
            node_id: "5fb8f4b2-2f7e-4e8a-9d41-6b3c1f0e7a10".into(),
            traps: AtomicU64::new(0),
        }
    }

    fn context_id(&self) -> u32 {
        self.next_context.fetch_add(1, Ordering::Relaxed)
    }
}

/// The Kong side of one VM instance (the store's data).
pub struct VmState {
    pub shared: Arc<Shared>,
    pub filter: String,
    pub root_id: u32,
    pub config: Vec<u8>,
    pub step: Step,
    /// The request whose callback runs now (`None` in root callbacks).
    pub ex: Option<Exchange>,
    /// The dispatch answer `on_http_call_response` is reading.
    pub answer: Option<Answer>,
    /// Dispatches issued from a root callback (`on_tick`).
    pub root_calls: Vec<Dispatch>,
    pub tick_period: u32,
    /// Set by a host function that traps, so the log names the host's reason.
    pub trap: Option<String>,
    /// Ids of this filter's metrics, by index into `Shared::metrics`.
    metric_ids: Vec<usize>,
}

/// One request as the filter chain sees it.
#[derive(Default)]
pub struct Exchange {
    pub context_id: u32,
    pub method: String,
    /// Path with query (`$request_uri`).
    pub path: String,
    pub scheme: String,
    pub authority: String,
    pub protocol: String,
    pub headers: Vec<(String, Vec<u8>)>,
    /// `None` until read, and when there is none.
    pub body: Option<Vec<u8>>,
    pub body_in_file: bool,
    pub client: Option<SocketAddr>,
    pub server_port: u16,
    pub route_id: Option<String>,
    pub route_name: Option<String>,
    pub route_json: Option<String>,
    pub service_id: Option<String>,
    pub service_name: Option<String>,
    pub service_json: Option<String>,
    pub props: HashMap<String, Vec<u8>>,
    /// The response under way (response steps).
    pub resp: Option<Resp>,
    pub header_sent: bool,
    /// A stashed local response.
    pub local: Option<Resp>,
    /// Dispatches issued during the current callback.
    pub new_calls: Vec<Dispatch>,
    pub pending_calls: usize,
    pub resumed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// Where a dispatch goes (parsed as `ngx_wasm_socket_tcp_init` does).
#[derive(Debug, Clone)]
pub enum Target {
    Addr(SocketAddr),
    Unix(std::path::PathBuf),
    Name(String, u16),
}

#[derive(Debug, Clone)]
pub struct Dispatch {
    pub token: u32,
    pub target: Target,
    pub tls: bool,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// A dispatch's outcome as the engine hands it to the filter.
#[derive(Debug, Clone)]
pub struct Answer {
    pub token: u32,
    /// `None` on failure.
    pub status: Option<u16>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// `:dispatch_status`: `ok` or the failure.
    pub dispatch_status: &'static str,
}

// ---------------------------------------------------------------------------------------
// Host functions.

fn kong<'a>(c: &'a mut Ctx<'_>) -> &'a mut VmState {
    &mut c.data_mut().kong
}

/// A host trap: remembered so that the log line carries the engine's wording.
fn trap(c: &mut Ctx<'_>, msg: String) -> wasmtime::Error {
    kong(c).trap = Some(msg.clone());
    wasmtime::Error::msg(msg)
}

fn nyi(name: &str) -> String {
    // src/wasm/vm/ngx_wavm_host.c:301-306
    format!("host trap (function not yet implemented): {name}")
}

fn bad_usage(msg: &str) -> String {
    format!("host trap (bad usage): {msg}")
}

fn log_as(c: &mut Ctx<'_>, level: &str, msg: &str) {
    let k = kong(c);
    let ctx = k.ex.as_ref().map_or(k.root_id, |e| e.context_id);
    k.shared.log.line(
        level,
        &format!("[proxy-wasm][\"{}\" #{ctx}] {msg}", k.filter),
    );
}

fn ex_mut<'a>(c: &'a mut Ctx<'_>) -> Option<&'a mut Exchange> {
    kong(c).ex.as_mut()
}

/// Case-insensitive header lookup.
fn find<'h>(headers: &'h [(String, Vec<u8>)], name: &str) -> Option<&'h [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

const MAP_REQUEST_HEADERS: i32 = 0;
const MAP_RESPONSE_HEADERS: i32 = 2;
const MAP_CALL_RESPONSE_HEADERS: i32 = 6;

/// Trailers and gRPC metadata maps: no such maps in the engine (row 20).
fn unsupported_map(c: &mut Ctx<'_>, map: i32) -> Option<wasmtime::Error> {
    match map {
        MAP_REQUEST_HEADERS | MAP_RESPONSE_HEADERS | MAP_CALL_RESPONSE_HEADERS => None,
        1 | 3 | 7 => Some(trap(
            c,
            format!("host trap (bad argument): NYI - trailers map (map_type {map})"),
        )),
        _ => Some(trap(
            c,
            format!("host trap (bad argument): NYI - get_map bad map_type: {map}"),
        )),
    }
}

/// The map a header call reads, with the engine's pseudo-headers first (`maps.c:149-200`).
fn map_pairs(k: &VmState, map: i32) -> Option<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    match map {
        MAP_REQUEST_HEADERS => {
            let ex = k.ex.as_ref()?;
            for (n, v) in [
                (":path", &ex.path),
                (":method", &ex.method),
                (":scheme", &ex.scheme),
                (":authority", &ex.authority),
            ] {
                if !v.is_empty() {
                    out.push((n.to_string(), v.as_bytes().to_vec()));
                }
            }
            out.extend(ex.headers.iter().cloned());
        }
        MAP_RESPONSE_HEADERS => {
            let resp = k.ex.as_ref()?.resp.as_ref()?;
            out.push((":status".into(), resp.status.to_string().into_bytes()));
            out.extend(resp.headers.iter().cloned());
        }
        MAP_CALL_RESPONSE_HEADERS => {
            if k.step != Step::DispatchResponse {
                return None;
            }
            let a = k.answer.as_ref()?;
            if let Some(s) = a.status {
                out.push((":status".into(), s.to_string().into_bytes()));
            }
            out.push((
                ":dispatch_status".into(),
                a.dispatch_status.as_bytes().to_vec(),
            ));
            out.extend(a.headers.iter().cloned());
        }
        _ => return None,
    }
    Some(out)
}

/// Whether headers of `map` may be changed now (`ngx_proxy_wasm_host.c:655-715`).
fn check_set_map(c: &mut Ctx<'_>, map: i32) -> Result<Option<i32>, wasmtime::Error> {
    if let Some(e) = unsupported_map(c, map) {
        return Err(e);
    }
    let step = kong(c).step;
    let sent = kong(c).ex.as_ref().is_some_and(|e| e.header_sent);
    let ok = match map {
        MAP_REQUEST_HEADERS => {
            matches!(step, Step::RequestHeaders | Step::RequestBody)
                || (step == Step::DispatchResponse
                    && kong(c).ex.as_ref().is_some_and(|e| e.resp.is_none()))
        }
        MAP_RESPONSE_HEADERS => {
            matches!(
                step,
                Step::RequestHeaders | Step::RequestBody | Step::ResponseHeaders
            ) || (step == Step::DispatchResponse && !sent)
        }
        _ => return Ok(Some(status::BAD_ARGUMENT)),
    };
    if !ok {
        let msg = if map == MAP_REQUEST_HEADERS {
            "can only set request headers before response is produced"
        } else {
            "can only set response headers before \"on_response_body\""
        };
        return Err(trap(c, bad_usage(msg)));
    }
    Ok(None)
}

/// The headers list a set/add/replace/remove call changes, with its pseudo-header setters.
fn edit_map(k: &mut VmState, map: i32, f: impl FnOnce(&mut Vec<(String, Vec<u8>)>)) {
    let Some(ex) = k.ex.as_mut() else { return };
    match map {
        MAP_REQUEST_HEADERS => {
            let mut all = vec![
                (":path".to_string(), ex.path.clone().into_bytes()),
                (":method".to_string(), ex.method.clone().into_bytes()),
            ];
            all.append(&mut ex.headers);
            f(&mut all);
            for (n, v) in all {
                match n.as_str() {
                    ":path" => ex.path = String::from_utf8_lossy(&v).into_owned(),
                    ":method" => ex.method = String::from_utf8_lossy(&v).into_owned(),
                    ":scheme" | ":authority" => {}
                    _ => ex.headers.push((n, v)),
                }
            }
        }
        MAP_RESPONSE_HEADERS => {
            let resp = ex.resp.get_or_insert_with(Resp::default);
            let mut all = vec![(":status".to_string(), resp.status.to_string().into_bytes())];
            all.append(&mut resp.headers);
            f(&mut all);
            for (n, v) in all {
                if n == ":status" {
                    if let Some(s) = std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()) {
                        resp.status = s;
                    }
                } else {
                    resp.headers.push((n, v));
                }
            }
        }
        _ => {}
    }
}

/// A property, or `Err(())` for the engine's error result (scoped property outside a request).
fn property(k: &VmState, path: &str) -> Result<Option<Vec<u8>>, ()> {
    let s = |v: &str| Ok(Some(v.as_bytes().to_vec()));
    match path {
        "plugin_name" => return s(&k.filter),
        "plugin_root_id" => return s(""),
        "plugin_vm_id" => return Ok(None),
        "node"
        | "cluster_name"
        | "cluster_metadata"
        | "listener_direction"
        | "listener_metadata"
        | "route_name"
        | "route_metadata"
        | "upstream_host_metadata" => {
            k.shared.log.line(
                "error",
                &format!("[wasm] \"{path}\" property not supported"),
            );
            return Ok(None);
        }
        _ => {}
    }
    let Some(ex) = k.ex.as_ref() else {
        // ngx_proxy_wasm_properties.c:1103-1111
        if path.contains('.') {
            k.shared.log.line(
                "error",
                "[wasm] cannot get scoped properties outside of a request",
            );
            return Err(());
        }
        return Ok(None);
    };
    if let Some(v) = ex.props.get(path) {
        return Ok(Some(v.clone()));
    }
    let url_path = ex.path.split('?').next().unwrap_or("");
    let query = ex.path.split_once('?').map_or("", |(_, q)| q);
    let ip = ex.client.map(|a| a.ip().to_string()).unwrap_or_default();
    let port = ex.client.map(|a| a.port().to_string()).unwrap_or_default();
    let header = |name: &str| find(&ex.headers, name).map(<[u8]>::to_vec);
    let opt = |v: &Option<String>| Ok(v.as_ref().map(|v| v.as_bytes().to_vec()));
    if let Some(name) = path.strip_prefix("request.headers.") {
        return Ok(header(name));
    }
    if let Some(var) = path.strip_prefix("ngx.") {
        if let Some(h) = var.strip_prefix("http_") {
            return Ok(header(&h.replace('_', "-")));
        }
        return match var {
            "nginx_version" => s(NGINX_VERSION),
            "hostname" => s(&k.shared.hostname),
            "request_uri" => s(&ex.path),
            "uri" => s(url_path),
            "args" | "query_string" => s(query),
            "request_method" => s(&ex.method),
            "scheme" => s(&ex.scheme),
            "host" => s(ex.authority.split(':').next().unwrap_or("")),
            "remote_addr" => s(&ip),
            "remote_port" => s(&port),
            "server_protocol" => s(&ex.protocol),
            "server_port" => s(&ex.server_port.to_string()),
            "content_length" => Ok(header("content-length")),
            "content_type" => Ok(header("content-type")),
            "pid" => s(&std::process::id().to_string()),
            _ => Ok(None),
        };
    }
    if let Some(key) = path.strip_prefix("kong.ctx.shared.") {
        return Ok(ex.props.get(&format!("kong.ctx.shared.{key}")).cloned());
    }
    match path {
        "request.path" => s(&ex.path),
        "request.url_path" => s(url_path),
        "request.host" => s(&k.shared.hostname),
        "request.scheme" => s(&ex.scheme),
        "request.method" => s(&ex.method),
        "request.useragent" => Ok(header("user-agent")),
        "request.protocol" => s(&ex.protocol),
        "request.query" => s(query),
        "request.id" => Ok(header("x-request-id")),
        "request.referer" => Ok(header("referer")),
        "request.size" => Ok(header("content-length")),
        "source.address" => s(&ip),
        "source.port" => s(&port),
        "kong.route_id" => opt(&ex.route_id),
        "kong.route_name" => opt(&ex.route_name),
        "kong.service_id" => opt(&ex.service_id),
        "kong.service_name" => opt(&ex.service_name),
        "kong.router.route" => opt(&ex.route_json),
        "kong.router.service" => opt(&ex.service_json),
        "kong.version" => s(KONG_VERSION),
        "kong.client.protocol" => s(&ex.scheme),
        "kong.nginx.subsystem" => s("http"),
        "kong.node.id" => s(&k.shared.node_id),
        "kong.request.port" => s(&ex.server_port.to_string()),
        _ => Ok(None),
    }
}

/// `ngx_wasm_socket_tcp_init` + `ngx_parse_url`: the dispatch target, or the trap text.
pub fn parse_target(host: &str, tls: bool) -> Result<Target, String> {
    let fail = |e: &str| format!("dispatch failed: tcp socket - {e}");
    if let Some(path) = host.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(fail("no path in the unix domain socket"));
        }
        return Ok(Target::Unix(path.into()));
    }
    let default_port = if tls { 443 } else { 80 };
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (ip6, after) = rest.split_once(']').ok_or_else(|| fail("invalid host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| fail("invalid port"))?,
            None if after.is_empty() => default_port,
            None => return Err(fail("invalid host")),
        };
        let ip: std::net::Ipv6Addr = ip6.parse().map_err(|_| fail("invalid host"))?;
        return Ok(Target::Addr(SocketAddr::from((ip, port))));
    } else {
        match host.split_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| fail("invalid port"))?,
            ),
            None => (host, default_port),
        }
    };
    if name.is_empty() {
        return Err(fail("no host"));
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(Target::Addr(SocketAddr::new(ip, port))),
        Err(_) => Ok(Target::Name(name.to_string(), port)),
    }
}

fn metric_name(filter: &str, name: &str) -> String {
    format!("pw.{filter}.{name}")
}

type R = wasmtime::Result<i32>;

/// `proxy_increment_metric` / `proxy_record_metric`: one metric changed, or a trap naming why
/// (an unknown id, or a counter recorded / a histogram incremented), as Kong's engine does.
fn update_metric(
    c: &mut Ctx<'_>,
    id: i32,
    verb: &str,
    refused: MetricKind,
    apply: impl FnOnce(&mut i64),
) -> R {
    let res = {
        let k = kong(c);
        let mut list = k
            .shared
            .metrics
            .list
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match list.get_mut(id as u32 as usize) {
            None => Err("metric not found"),
            Some(m) if m.kind == refused => Err(match refused {
                MetricKind::Histogram => "metric is a histogram",
                _ => "metric is a counter",
            }),
            Some(m) => {
                apply(&mut m.value);
                Ok(())
            }
        }
    };
    match res {
        Ok(()) => Ok(status::OK),
        Err(why) => Err(trap(
            c,
            format!("host trap (internal error): could not {verb} metric id \"{id}\": {why}"),
        )),
    }
}

/// Every proxy-wasm 0.2.1 (and 0.1.0 legacy) host function, with Kong's behaviour.
pub fn link(linker: &mut Linker<HostData>) -> wasmtime::Result<()> {
    // --- integration ---
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Ctx<'_>, level: i32, p: i32, n: i32| -> R {
            let msg = abi::read_str(&mut c, p, n)?;
            let lvl = match level {
                0 | 1 => "debug",
                2 => "info",
                3 => "warn",
                4 => "error",
                5 => "crit",
                _ => {
                    kong(&mut c).shared.log.line(
                        "alert",
                        &format!("[wasm] NYI - proxy_log bad log_level: {level}"),
                    );
                    return Ok(status::BAD_ARGUMENT);
                }
            };
            log_as(&mut c, lvl, &msg);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: Ctx<'_>, _r: i32| -> R { Err(trap(&mut c, nyi("proxy_get_log_level"))) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Ctx<'_>, ret: i32| -> R {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            abi::write_u64(&mut c, ret, now)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Ctx<'_>, period: i32| -> R {
            if kong(&mut c).ex.is_some() {
                return Err(trap(
                    &mut c,
                    "can only set tick_period in root context".into(),
                ));
            }
            if period != 0 && kong(&mut c).tick_period != 0 {
                return Err(trap(&mut c, "tick_period already set".into()));
            }
            kong(&mut c).tick_period = period as u32;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |_c: Ctx<'_>, _id: i32| -> R { Ok(status::OK) },
    )?;
    linker.func_wrap("env", "proxy_done", |mut c: Ctx<'_>| -> R {
        Err(trap(&mut c, nyi("proxy_done")))
    })?;

    // --- buffers ---
    let get_buffer = |mut c: Ctx<'_>, bt: i32, start: i32, max: i32, rp: i32, rs: i32| -> R {
        let step = kong(&mut c).step;
        let (start, max) = (start as u32 as usize, max as u32 as usize);
        let data: Option<Vec<u8>> = match bt {
            0 => {
                if !matches!(step, Step::RequestHeaders | Step::RequestBody | Step::Log) {
                    return Err(trap(
                        &mut c,
                        bad_usage(
                            "can only get request body during \"on_request_body\", \"on_log\"",
                        ),
                    ));
                }
                let k = kong(&mut c);
                match k.ex.as_ref() {
                    Some(ex) if ex.body_in_file => {
                        k.shared.log.line(
                            "error",
                            &format!(
                                "[proxy-wasm][\"{}\" #{}] cannot read request body buffered to file at \"/tmp/client_body_temp/0000000001\"",
                                k.filter, ex.context_id
                            ),
                        );
                        None
                    }
                    Some(ex) => ex.body.clone().filter(|b| !b.is_empty()),
                    None => None,
                }
            }
            1 => {
                if step != Step::ResponseBody {
                    return Err(trap(
                        &mut c,
                        bad_usage("can only get response body during \"on_response_body\""),
                    ));
                }
                ex_mut(&mut c)
                    .and_then(|e| e.resp.as_ref())
                    .map(|r| r.body.clone())
                    .filter(|b| !b.is_empty())
            }
            4 => {
                if !matches!(step, Step::DispatchResponse | Step::Log) {
                    return Err(trap(
                        &mut c,
                        bad_usage(
                            "can only get dispatch response body during \"on_http_dispatch_response\"",
                        ),
                    ));
                }
                kong(&mut c)
                    .answer
                    .as_ref()
                    .map(|a| a.body.clone())
                    .filter(|b| !b.is_empty())
            }
            // L4 data buffers (row 29).
            2 | 3 => {
                let msg = format!("{} (L4 buffer type {bt})", nyi("proxy_get_buffer_bytes"));
                return Err(trap(&mut c, msg));
            }
            6 => None,
            7 => Some(kong(&mut c).config.clone()).filter(|b| !b.is_empty()),
            _ => {
                kong(&mut c).shared.log.line(
                    "alert",
                    &format!("[wasm] NYI - get_buffer bad buf_type: {bt}"),
                );
                return Ok(status::BAD_ARGUMENT);
            }
        };
        let Some(data) = data else {
            return Ok(status::NOT_FOUND);
        };
        let from = start.min(data.len());
        let to = from.saturating_add(max).min(data.len());
        abi::hand_over(&mut c, &data[from..to], rp, rs)?;
        Ok(status::OK)
    };
    linker.func_wrap("env", "proxy_get_buffer_bytes", get_buffer)?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Ctx<'_>, bt: i32, start: i32, size: i32, p: i32, n: i32| -> R {
            let data = abi::read(&mut c, p, n)?;
            let step = kong(&mut c).step;
            let (start, size) = (start as u32 as usize, size as u32 as usize);
            let splice = |buf: &mut Vec<u8>| {
                let from = start.min(buf.len());
                let to = from.saturating_add(size).min(buf.len());
                buf.splice(from..to, data.iter().copied());
            };
            match bt {
                0 => {
                    if !matches!(step, Step::RequestHeaders | Step::RequestBody) {
                        return Err(trap(
                            &mut c,
                            bad_usage("can only set request body during \"on_request_body\""),
                        ));
                    }
                    if let Some(ex) = ex_mut(&mut c) {
                        splice(ex.body.get_or_insert_with(Vec::new));
                    }
                }
                1 => {
                    if step != Step::ResponseBody {
                        return Err(trap(
                            &mut c,
                            bad_usage("can only set response body during \"on_response_body\""),
                        ));
                    }
                    if let Some(r) = ex_mut(&mut c).and_then(|e| e.resp.as_mut()) {
                        splice(&mut r.body);
                    }
                }
                _ => return Ok(status::BAD_ARGUMENT),
            }
            Ok(status::OK)
        },
    )?;

    // --- header maps ---
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Ctx<'_>, map: i32, rp: i32, rs: i32| -> R {
            if let Some(e) = unsupported_map(&mut c, map) {
                return Err(e);
            }
            let Some(pairs) = map_pairs(kong(&mut c), map) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let bytes = abi::serialize_map(&pairs);
            abi::hand_over(&mut c, &bytes, rp, rs)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Ctx<'_>, map: i32, kp: i32, kn: i32, rp: i32, rs: i32| -> R {
            if let Some(e) = unsupported_map(&mut c, map) {
                return Err(e);
            }
            let key = abi::read_str(&mut c, kp, kn)?;
            let Some(pairs) = map_pairs(kong(&mut c), map) else {
                return Ok(status::NOT_FOUND);
            };
            let Some(v) = find(&pairs, &key).map(<[u8]>::to_vec) else {
                return Ok(status::NOT_FOUND);
            };
            abi::hand_over(&mut c, &v, rp, rs)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: Ctx<'_>, map: i32, p: i32, n: i32| -> R {
            if let Some(s) = check_set_map(&mut c, map)? {
                return Ok(s);
            }
            let raw = abi::read(&mut c, p, n)?;
            let Some(new) = abi::deserialize_map(&raw) else {
                return Ok(status::BAD_ARGUMENT);
            };
            edit_map(kong(&mut c), map, |all| {
                all.retain(|(k, _)| k.starts_with(':'));
                for (k, v) in new {
                    match all.iter_mut().find(|(n, _)| *n == k && k.starts_with(':')) {
                        Some(slot) => slot.1 = v,
                        None => all.push((k, v)),
                    }
                }
            });
            Ok(status::OK)
        },
    )?;
    for (name, kind) in [
        ("proxy_add_header_map_value", 0),
        ("proxy_replace_header_map_value", 1),
    ] {
        linker.func_wrap(
            "env",
            name,
            move |mut c: Ctx<'_>, map: i32, kp: i32, kn: i32, vp: i32, vn: i32| -> R {
                if let Some(s) = check_set_map(&mut c, map)? {
                    return Ok(s);
                }
                let key = abi::read_str(&mut c, kp, kn)?;
                let val = abi::read(&mut c, vp, vn)?;
                edit_map(kong(&mut c), map, |all| {
                    let pos = all.iter().position(|(n, _)| n.eq_ignore_ascii_case(&key));
                    match (kind, pos) {
                        (1, Some(i)) => {
                            all[i].1 = val;
                            let k2 = key.clone();
                            let mut seen = false;
                            all.retain(|(n, _)| {
                                if n.eq_ignore_ascii_case(&k2) {
                                    let keep = !seen;
                                    seen = true;
                                    keep
                                } else {
                                    true
                                }
                            });
                        }
                        (_, Some(i)) if key.starts_with(':') => all[i].1 = val,
                        _ => all.push((key, val)),
                    }
                });
                Ok(status::OK)
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Ctx<'_>, map: i32, kp: i32, kn: i32| -> R {
            if let Some(s) = check_set_map(&mut c, map)? {
                return Ok(s);
            }
            let key = abi::read_str(&mut c, kp, kn)?;
            edit_map(kong(&mut c), map, |all| {
                all.retain(|(n, _)| n.starts_with(':') || !n.eq_ignore_ascii_case(&key))
            });
            Ok(status::OK)
        },
    )?;

    // --- properties ---
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Ctx<'_>, p: i32, n: i32, rp: i32, rs: i32| -> R {
            let raw = abi::read(&mut c, p, n)?;
            let path = abi::dotted_path(&raw);
            match property(kong(&mut c), &path) {
                Err(()) => Ok(status::INTERNAL_FAILURE),
                Ok(None) => Ok(status::NOT_FOUND),
                Ok(Some(v)) => {
                    abi::hand_over(&mut c, &v, rp, rs)?;
                    Ok(status::OK)
                }
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Ctx<'_>, p: i32, n: i32, vp: i32, vn: i32| -> R {
            let raw = abi::read(&mut c, p, n)?;
            let path = abi::dotted_path(&raw);
            let val = abi::read(&mut c, vp, vn)?;
            if let Some(var) = path.strip_prefix("ngx.") {
                return Err(trap(
                    &mut c,
                    format!("host trap (internal error): could not set \"ngx.{var}\": variable not changeable"),
                ));
            }
            let Some(ex) = ex_mut(&mut c) else {
                return Ok(status::INTERNAL_FAILURE);
            };
            if path.starts_with("wasmx.") || path.starts_with("kong.ctx.shared.") {
                ex.props.insert(path, val);
                return Ok(status::OK);
            }
            Ok(status::NOT_FOUND)
        },
    )?;

    // --- shared key/value store (needs an shm_kv zone, row 25) ---
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Ctx<'_>, kp: i32, kn: i32, rp: i32, rs: i32, rcas: i32| -> R {
            let key = abi::read_str(&mut c, kp, kn)?;
            if !kv_zone_exists(kong(&mut c), &key) {
                return Err(trap(
                    &mut c,
                    bad_usage("failed getting value from shm (could not resolve namespace)"),
                ));
            }
            let got = {
                let kv = kong(&mut c)
                    .shared
                    .kv
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                kv.get(&key).cloned()
            };
            let Some((v, cas)) = got else {
                return Ok(status::NOT_FOUND);
            };
            abi::hand_over(&mut c, &v, rp, rs)?;
            abi::write_u32(&mut c, rcas, cas)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Ctx<'_>, kp: i32, kn: i32, vp: i32, vn: i32, cas: i32| -> R {
            let key = abi::read_str(&mut c, kp, kn)?;
            let val = abi::read(&mut c, vp, vn)?;
            if !kv_zone_exists(kong(&mut c), &key) {
                return Err(trap(
                    &mut c,
                    bad_usage("failed setting value to shm (could not resolve namespace)"),
                ));
            }
            let mut kv = kong(&mut c)
                .shared
                .kv
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let cur = kv.get(&key).map_or(0, |(_, c)| *c);
            if cas != 0 && cas as u32 != cur {
                return Ok(8); // CasMismatch
            }
            kv.insert(key, (val, cur.wrapping_add(1).max(1)));
            Ok(status::OK)
        },
    )?;

    // --- shared queues (row 19) ---
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: Ctx<'_>, _p: i32, _n: i32, _r: i32| -> R {
            Err(trap(&mut c, bad_usage("could not find queue")))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: Ctx<'_>, _a: i32, _b: i32, _p: i32, _n: i32, _r: i32| -> R {
            Err(trap(&mut c, nyi("proxy_resolve_shared_queue")))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: Ctx<'_>, _q: i32, _p: i32, _n: i32| -> R {
            Err(trap(&mut c, bad_usage("could not find queue")))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: Ctx<'_>, _q: i32, _p: i32, _n: i32| -> R {
            Err(trap(&mut c, bad_usage("could not find queue")))
        },
    )?;

    // --- stream / http (rows 4, 16, 21) ---
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: Ctx<'_>, ty: i32| -> R {
            match ty {
                0 | 1 => {
                    if let Some(ex) = ex_mut(&mut c) {
                        ex.resumed = true;
                    }
                    Ok(status::OK)
                }
                // L4 (downstream/upstream data): the engine logs NYI and fails the call,
                // which the SDK turns into a panic; the note records L4 as a trap (row 29).
                2 | 3 => Err(trap(
                    &mut c,
                    format!("{} (L4 stream type {ty})", nyi("proxy_continue_stream")),
                )),
                _ => {
                    kong(&mut c)
                        .shared
                        .log
                        .line("alert", &format!("[wasm] NYI - continue stream type: {ty}"));
                    Ok(status::INTERNAL_FAILURE)
                }
            }
        },
    )?;
    for name in ["proxy_resume_downstream", "proxy_resume_upstream"] {
        linker.func_wrap("env", name, move |mut c: Ctx<'_>| -> R {
            Err(trap(&mut c, nyi(name)))
        })?;
    }
    linker.func_wrap("env", "proxy_continue_request", |mut c: Ctx<'_>| -> R {
        if let Some(ex) = ex_mut(&mut c) {
            ex.resumed = true;
        }
        Ok(status::OK)
    })?;
    linker.func_wrap("env", "proxy_continue_response", |mut c: Ctx<'_>| -> R {
        Err(trap(&mut c, nyi("proxy_continue_response")))
    })?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: Ctx<'_>, _t: i32| -> R { Err(trap(&mut c, nyi("proxy_close_stream"))) },
    )?;
    linker.func_wrap("env", "proxy_clear_route_cache", |mut c: Ctx<'_>| -> R {
        Err(trap(&mut c, nyi("proxy_clear_route_cache")))
    })?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Ctx<'_>,
         status_code: i32,
         _rp: i32,
         _rn: i32,
         bp: i32,
         bn: i32,
         hp: i32,
         hn: i32,
         _grpc: i32|
         -> R {
            let body = abi::read(&mut c, bp, bn)?;
            let raw = abi::read(&mut c, hp, hn)?;
            let Some(headers) = abi::deserialize_map(&raw) else {
                return Ok(status::INTERNAL_FAILURE);
            };
            let step = kong(&mut c).step;
            let Some(ex) = ex_mut(&mut c) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let mut body = body;
            if !body.is_empty() {
                body.push(b'\n'); // ngx_http_wasm_local_response.c:130-142
            }
            if step == Step::ResponseHeaders && !ex.header_sent {
                // In the header filter the response itself is replaced (host.c:1086-1110).
                let resp = ex.resp.get_or_insert_with(Resp::default);
                resp.status = status_code as u16;
                resp.body = body;
                return Ok(status::OK);
            }
            if ex.header_sent {
                return Err(trap(&mut c, bad_usage("response already sent")));
            }
            if ex.local.is_some() {
                return Err(trap(&mut c, bad_usage("local response already stashed")));
            }
            if !(100..=999).contains(&status_code) {
                return Ok(status::BAD_ARGUMENT);
            }
            ex.local = Some(Resp {
                status: status_code as u16,
                headers,
                body,
            });
            Ok(status::OK)
        },
    )?;

    // --- http dispatch (rows 6-13) ---
    let dispatch = |mut c: Ctx<'_>,
                    up: i32,
                    upn: i32,
                    hp: i32,
                    hn: i32,
                    bp: i32,
                    bn: i32,
                    _tp: i32,
                    _tn: i32,
                    timeout: i32,
                    rtoken: i32|
     -> R {
        let step = kong(&mut c).step;
        if !matches!(
            step,
            Step::RequestHeaders | Step::RequestBody | Step::Tick | Step::DispatchResponse
        ) {
            return Err(trap(
                &mut c,
                bad_usage(
                    "can only send HTTP dispatch during \"on_request_headers\", \"on_request_body\", \"on_tick\", \"on_dispatch_response\", \"on_foreign_function\"",
                ),
            ));
        }
        let host = abi::read_str(&mut c, up, upn)?;
        let raw = abi::read(&mut c, hp, hn)?;
        let body = abi::read(&mut c, bp, bn)?;
        let Some(pairs) = abi::deserialize_map(&raw) else {
            return Err(trap(&mut c, "dispatch failed: marshalling error".into()));
        };
        let text = |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .filter(|v| !v.is_empty())
        };
        let tls = text(":scheme").as_deref() == Some("https");
        let Some(method) = text(":method") else {
            return Err(trap(&mut c, "dispatch failed: no :method".into()));
        };
        let Some(path) = text(":path") else {
            return Err(trap(&mut c, "dispatch failed: no :path".into()));
        };
        let target = match parse_target(&host, tls) {
            Ok(t) => t,
            Err(msg) => return Err(trap(&mut c, msg)),
        };
        let authority = text(":authority").unwrap_or_else(|| match target {
            Target::Unix(_) => "localhost".into(),
            _ => host.clone(),
        });
        let headers: Vec<(String, Vec<u8>)> = pairs
            .into_iter()
            .filter(|(n, _)| {
                !n.starts_with(':')
                    && !n.eq_ignore_ascii_case("host")
                    && !n.eq_ignore_ascii_case("connection")
            })
            .collect();
        let k = kong(&mut c);
        let timeout = if timeout == 0 {
            k.shared.conf.socket_read_timeout
        } else {
            Duration::from_millis(timeout as u32 as u64)
        };
        let token = k.shared.next_token.fetch_add(1, Ordering::Relaxed);
        let call = Dispatch {
            token,
            target,
            tls,
            method,
            path,
            authority,
            headers,
            body,
            timeout,
        };
        match k.ex.as_mut() {
            Some(ex) => ex.new_calls.push(call),
            None => k.root_calls.push(call),
        }
        abi::write_u32(&mut c, rtoken, token)?;
        Ok(status::OK)
    };
    linker.func_wrap("env", "proxy_http_call", dispatch)?;

    // --- gRPC: none (row 18) ---
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: Ctx<'_>,
         _a: i32,
         _b: i32,
         _c2: i32,
         _d: i32,
         _e: i32,
         _f: i32,
         _g: i32,
         _h: i32,
         _i: i32,
         _j: i32,
         _k: i32,
         _l: i32|
         -> R { Err(trap(&mut c, nyi("proxy_grpc_call"))) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: Ctx<'_>,
         _a: i32,
         _b: i32,
         _c2: i32,
         _d: i32,
         _e: i32,
         _f: i32,
         _g: i32,
         _h: i32,
         _i: i32|
         -> R { Err(trap(&mut c, nyi("proxy_grpc_stream"))) },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: Ctx<'_>, _a: i32, _b: i32, _c2: i32, _d: i32| -> R {
            Err(trap(&mut c, nyi("proxy_grpc_send")))
        },
    )?;
    linker.func_wrap("env", "proxy_grpc_cancel", |mut c: Ctx<'_>, _t: i32| -> R {
        Err(trap(&mut c, nyi("proxy_grpc_cancel")))
    })?;
    linker.func_wrap("env", "proxy_grpc_close", |mut c: Ctx<'_>, _t: i32| -> R {
        Err(trap(&mut c, nyi("proxy_grpc_close")))
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: Ctx<'_>, _a: i32, _b: i32, _c2: i32| -> R {
            Err(trap(&mut c, nyi("proxy_get_status")))
        },
    )?;

    // --- foreign functions (not emulated) ---
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: Ctx<'_>, p: i32, n: i32, _a: i32, _b: i32, _c2: i32, _d: i32| -> R {
            let name = abi::read_str(&mut c, p, n)?;
            let msg = if name == "resolve_lua" {
                "host trap (internal error): resolve_lua is not emulated by this host".to_string()
            } else {
                "host trap (internal error): unknown foreign function".to_string()
            };
            Err(trap(&mut c, msg))
        },
    )?;

    // --- metrics (row 17) ---
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Ctx<'_>, ty: i32, p: i32, n: i32, rid: i32| -> R {
            let name = abi::read_str(&mut c, p, n)?;
            let kind = match ty {
                0 => MetricKind::Counter,
                1 => MetricKind::Gauge,
                2 => MetricKind::Histogram,
                _ => return Ok(status::BAD_ARGUMENT),
            };
            let k = kong(&mut c);
            let full = metric_name(&k.filter, &name);
            if full.len() > 256 {
                let msg = format!("could not define metric: name \"{name}\" too long");
                return Err(trap(&mut c, format!("host trap (internal error): {msg}")));
            }
            let id = {
                let mut list = k
                    .shared
                    .metrics
                    .list
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                match list.iter().position(|m| m.name == full) {
                    Some(i) => i,
                    None => {
                        list.push(Metric {
                            name: full,
                            kind,
                            value: 0,
                        });
                        list.len() - 1
                    }
                }
            };
            k.metric_ids.push(id);
            abi::write_u32(&mut c, rid, id as u32)?;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: Ctx<'_>, id: i32, offset: i64| -> R {
            update_metric(&mut c, id, "increment", MetricKind::Histogram, |v| {
                *v = v.saturating_add(offset)
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: Ctx<'_>, id: i32, value: i64| -> R {
            update_metric(&mut c, id, "record", MetricKind::Counter, |v| *v = value)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: Ctx<'_>, id: i32, ret: i32| -> R {
            let v = {
                let k = kong(&mut c);
                let list = k
                    .shared
                    .metrics
                    .list
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                list.get(id as u32 as usize).map(|m| m.value)
            };
            match v {
                Some(v) => {
                    abi::write_u64(&mut c, ret, v as u64)?;
                    Ok(status::OK)
                }
                None => Err(trap(
                    &mut c,
                    format!("host trap (internal error): could not retrieve metric id \"{id}\""),
                )),
            }
        },
    )?;

    // --- legacy 0.1.0 ---
    linker.func_wrap(
        "env",
        "proxy_get_configuration",
        |mut c: Ctx<'_>, rp: i32, rs: i32| -> R {
            let cfg = kong(&mut c).config.clone();
            abi::hand_over(&mut c, &cfg, rp, rs)?;
            Ok(status::OK)
        },
    )?;
    Ok(())
}

fn kv_zone_exists(k: &VmState, key: &str) -> bool {
    match key.split_once('/') {
        Some((zone, _)) if k.shared.kv_zones.iter().any(|z| z == zone) => true,
        _ => k.shared.kv_zones.iter().any(|z| z == "*"),
    }
}

// ---------------------------------------------------------------------------------------
// Filters, instances and the request driver.

/// One filter of one chain: its module, its configuration and its (replaceable) instance.
pub struct FilterVm {
    pub name: String,
    pub config: Vec<u8>,
    module: Module,
    engine: Engine,
    linker: Arc<Linker<HostData>>,
    shared: Arc<Shared>,
    root_id: u32,
    slot: Mutex<Slot>,
}

struct Slot {
    live: Option<Live>,
    /// Bumped whenever the instance is discarded; contexts of an older one are dead.
    generation: u64,
    /// `on_vm_start`/`on_configure` failed: the filter is unusable (row 22).
    failed: Option<String>,
}

struct Live {
    store: Store<HostData>,
    instance: Instance,
}

/// Why a callback could not run.
#[derive(Debug)]
pub enum Fail {
    /// The callback trapped (logged where it happened).
    Trap,
    /// The instance the context lived in trapped meanwhile.
    Gone,
    /// The filter failed to start or configure (logged at start).
    Unusable,
}

static ROOT_IDS: AtomicU32 = AtomicU32::new(1);

impl FilterVm {
    pub fn new(
        name: &str,
        config: Vec<u8>,
        module: Module,
        engine: Engine,
        linker: Arc<Linker<HostData>>,
        shared: Arc<Shared>,
    ) -> Arc<FilterVm> {
        let vm = Arc::new(FilterVm {
            name: name.to_string(),
            config,
            module,
            engine,
            linker,
            shared,
            root_id: ROOT_IDS.fetch_add(1, Ordering::Relaxed),
            slot: Mutex::new(Slot {
                live: None,
                generation: 0,
                failed: None,
            }),
        });
        // A filter that fails here is logged and answers 500 (row 22).
        let _ = vm.ensure_live();
        vm
    }

    fn log(&self, level: &str, msg: &str) {
        self.shared.log.line(level, msg);
    }

    /// Instantiates, runs `_initialize`, creates the root context, `on_vm_start`,
    /// `on_configure` (ngx_proxy_wasm.c `ngx_proxy_wasm_start`).
    fn start(&self) -> Result<Live, String> {
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .inherit_stdout()
            .inherit_stderr()
            .build_p1();
        let data = HostData {
            wasi,
            kong: VmState {
                shared: self.shared.clone(),
                filter: self.name.clone(),
                root_id: self.root_id,
                config: self.config.clone(),
                step: Step::Root,
                ex: None,
                answer: None,
                root_calls: Vec::new(),
                tick_period: 0,
                trap: None,
                metric_ids: Vec::new(),
            },
        };
        let mut store = Store::new(&self.engine, data);
        let instance = self
            .linker
            .instantiate(&mut store, &self.module)
            .map_err(|e| format!("failed instantiating \"{}\" filter: {e:#}", self.name))?;
        let run = |store: &mut Store<HostData>, f: &str, args: &[i32]| {
            tokio::task::block_in_place(|| abi::call(store, &instance, f, args)).map_err(|e| {
                let why = store
                    .data_mut()
                    .kong
                    .trap
                    .take()
                    .unwrap_or_else(|| format!("{e:#}"));
                format!("\"{}\" filter trapped in {f}: {why}", self.name)
            })
        };
        if instance.get_func(&mut store, "_initialize").is_some() {
            run(&mut store, "_initialize", &[])?;
        } else if instance.get_func(&mut store, "_start").is_some() {
            run(&mut store, "_start", &[])?;
        }
        let root = self.root_id as i32;
        run(&mut store, "proxy_on_context_create", &[root, 0])?;
        if run(&mut store, "proxy_on_vm_start", &[root, 0])? == Some(0) {
            return Err(format!("\"{}\" filter failed on_vm_start", self.name));
        }
        let len = self.config.len() as i32;
        if run(&mut store, "proxy_on_configure", &[root, len])? == Some(0) {
            return Err(format!("\"{}\" filter failed configuring", self.name));
        }
        Ok(Live { store, instance })
    }

    /// The live instance's generation, starting one if the last trapped.
    fn ensure_live(self: &Arc<Self>) -> Result<u64, Fail> {
        let started = {
            let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
            if slot.failed.is_some() {
                return Err(Fail::Unusable);
            }
            if slot.live.is_some() {
                return Ok(slot.generation);
            }
            match self.start() {
                Ok(live) => {
                    let period = live.store.data().kong.tick_period;
                    slot.live = Some(live);
                    self.log(
                        "info",
                        &format!(
                            "[wasm] \"{}\" filter started (root context #{})",
                            self.name, self.root_id
                        ),
                    );
                    (slot.generation, period)
                }
                Err(e) => {
                    self.log("emerg", &format!("[wasm] {e}"));
                    slot.failed = Some(e);
                    return Err(Fail::Unusable);
                }
            }
        };
        if started.1 > 0 {
            self.spawn_ticker(started.0, started.1);
        }
        Ok(started.0)
    }

    /// `on_tick` every period for the life of this instance (row 26).
    fn spawn_ticker(self: &Arc<Self>, generation: u64, period_ms: u32) {
        let vm = self.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(period_ms.into()));
            every.tick().await;
            loop {
                every.tick().await;
                let mut none = None;
                let root = vm.root_id as i32;
                match vm.call(
                    generation,
                    Step::Tick,
                    &mut none,
                    "proxy_on_tick",
                    &[root],
                    None,
                ) {
                    Ok(_) => {}
                    Err(_) => return,
                }
                for call in vm.take_root_calls(generation) {
                    let vm = vm.clone();
                    tokio::spawn(async move {
                        let answer = crate::http::dispatch(&vm.shared, call).await;
                        let mut none = None;
                        let args = answer_args(root, &answer);
                        let _ = vm.call(
                            generation,
                            Step::DispatchResponse,
                            &mut none,
                            "proxy_on_http_call_response",
                            &args,
                            Some(answer),
                        );
                    });
                }
            }
        });
    }

    fn take_root_calls(&self, generation: u64) -> Vec<Dispatch> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.generation != generation {
            return Vec::new();
        }
        slot.live
            .as_mut()
            .map(|l| std::mem::take(&mut l.store.data_mut().kong.root_calls))
            .unwrap_or_default()
    }

    /// One callback into the guest with the request (if any) lent to the store for the call.
    /// A trap discards the instance (row 22).
    pub fn call(
        &self,
        generation: u64,
        step: Step,
        ex: &mut Option<Exchange>,
        export: &str,
        args: &[i32],
        answer: Option<Answer>,
    ) -> Result<i32, Fail> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.generation != generation {
            return Err(Fail::Gone);
        }
        let Some(live) = slot.live.as_mut() else {
            return Err(Fail::Gone);
        };
        {
            let k = &mut live.store.data_mut().kong;
            k.step = step;
            k.ex = ex.take();
            k.answer = answer;
            k.trap = None;
        }
        let instance = live.instance;
        let res =
            tokio::task::block_in_place(|| abi::call(&mut live.store, &instance, export, args));
        let k = &mut live.store.data_mut().kong;
        *ex = k.ex.take();
        k.answer = None;
        k.step = Step::Root;
        match res {
            Ok(v) => Ok(v.unwrap_or(0)),
            Err(e) => {
                let why = k.trap.take().unwrap_or_else(|| format!("{e:#}"));
                let ctx = args.first().copied().unwrap_or(0);
                self.shared.traps.fetch_add(1, Ordering::Relaxed);
                self.log(
                    "error",
                    &format!(
                        "[wasm] \"{}\" filter (context #{ctx}) trapped in \"{}\" step: {why}",
                        self.name,
                        step.callback()
                    ),
                );
                slot.live = None;
                slot.generation += 1;
                Err(Fail::Trap)
            }
        }
    }
}

fn answer_args(ctx: i32, a: &Answer) -> [i32; 5] {
    let n = if a.status.is_some() {
        a.headers.len() as i32 + 1
    } else {
        0
    };
    let body = if a.status.is_some() {
        a.body.len() as i32
    } else {
        0
    };
    [ctx, a.token as i32, n, body, 0]
}

/// A filter chain attached to a request (row 28).
pub struct Chain {
    pub filters: Vec<Arc<FilterVm>>,
}

/// How a request ends from the chain's point of view.
pub enum Outcome {
    /// Proxy to the upstream with the (possibly changed) request.
    Proxy(Exchange),
    /// Answer with this (a stashed local response, or Kong's 500).
    Reply(Exchange, Resp),
}

/// Kong's answer to a failed chain (its error handler's JSON).
pub fn kong_error(status: u16, message: &str) -> Resp {
    Resp {
        status,
        headers: vec![(
            "content-type".into(),
            b"application/json; charset=utf-8".to_vec(),
        )],
        body: format!("{{\n  \"message\":\"{message}\"\n}}").into_bytes(),
    }
}

struct Running {
    contexts: Vec<(u32, u64)>,
}

type Pending = tokio::task::JoinSet<(usize, Answer)>;

impl Chain {
    /// Runs the request steps: context creation, headers (before the body is read), then
    /// the body once it was read by `read_body` (rows 1-5, 22-23).
    pub async fn request<F, Fut>(&self, ex: Exchange, read_body: F) -> (Outcome, ChainState)
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Option<Vec<u8>>>,
    {
        let mut ex = Some(ex);
        let mut st = ChainState {
            running: Running {
                contexts: Vec::new(),
            },
            pending: Pending::new(),
        };
        for f in &self.filters {
            let generation = match f.ensure_live() {
                Ok(g) => g,
                Err(_) => return self.fail(ex, st),
            };
            let ctx = f.shared.context_id();
            st.running.contexts.push((ctx, generation));
            if let Some(e) = ex.as_mut() {
                e.context_id = ctx;
            }
            let args = [ctx as i32, f.root_id as i32];
            if f.call(
                generation,
                Step::Create,
                &mut ex,
                "proxy_on_context_create",
                &args,
                None,
            )
            .is_err()
            {
                return self.fail(ex, st);
            }
        }
        // Headers: end_of_stream is always false (row 2).
        match self.step(&mut st, &mut ex, Step::RequestHeaders).await {
            Ok(()) => {}
            Err(StepEnd::Local) => return self.local(ex, st),
            Err(StepEnd::Failed) => return self.fail(ex, st),
        }
        // Only now is the body read (the content phase, row 1).
        let body = read_body().await;
        let limit = self
            .filters
            .first()
            .map_or(8192, |f| f.shared.conf.client_body_buffer_size);
        if let Some(e) = ex.as_mut() {
            e.body_in_file = body.as_ref().is_some_and(|b| b.len() > limit);
            e.body = body;
        }
        let has_body = ex
            .as_ref()
            .and_then(|e| e.body.as_ref())
            .is_some_and(|b| !b.is_empty());
        if has_body {
            match self.step(&mut st, &mut ex, Step::RequestBody).await {
                Ok(()) => {}
                Err(StepEnd::Local) => return self.local(ex, st),
                Err(StepEnd::Failed) => return self.fail(ex, st),
            }
        }
        match ex {
            Some(e) => (Outcome::Proxy(e), st),
            None => self.fail(None, st),
        }
    }

    fn fail(&self, ex: Option<Exchange>, st: ChainState) -> (Outcome, ChainState) {
        (
            Outcome::Reply(
                ex.unwrap_or_default(),
                kong_error(500, "An unexpected error occurred"),
            ),
            st,
        )
    }

    fn local(&self, ex: Option<Exchange>, mut st: ChainState) -> (Outcome, ChainState) {
        // "local response produced, cancelling pending dispatch operations"
        st.pending.abort_all();
        let mut ex = ex.unwrap_or_default();
        let resp = ex.local.take().unwrap_or_default();
        (Outcome::Reply(ex, resp), st)
    }

    /// One request step through the chain, with Kong's pause semantics (rows 4, 5).
    async fn step(
        &self,
        st: &mut ChainState,
        ex: &mut Option<Exchange>,
        step: Step,
    ) -> Result<(), StepEnd> {
        for (i, f) in self.filters.iter().enumerate() {
            let (ctx, generation) = st.running.contexts[i];
            if let Some(e) = ex.as_mut() {
                e.context_id = ctx;
                e.resumed = false;
            }
            let args: Vec<i32> = match step {
                Step::RequestHeaders => {
                    let n = ex.as_ref().map_or(0, |e| e.headers.len() + 4);
                    vec![ctx as i32, n as i32, 0]
                }
                _ => {
                    let n = ex
                        .as_ref()
                        .and_then(|e| e.body.as_ref())
                        .map_or(0, Vec::len);
                    vec![ctx as i32, n as i32, 1]
                }
            };
            let export = match step {
                Step::RequestHeaders => "proxy_on_request_headers",
                _ => "proxy_on_request_body",
            };
            let action = f
                .call(generation, step, ex, export, &args, None)
                .map_err(|_| StepEnd::Failed)?;
            self.spawn_calls(st, ex, i);
            if ex.as_ref().is_some_and(|e| e.local.is_some()) {
                return Err(StepEnd::Local);
            }
            if action != ACTION_PAUSE {
                continue;
            }
            // Paused: only dispatch answers (the last one continues the chain) or an
            // explicit resume end this.
            loop {
                if ex.as_ref().is_some_and(|e| e.resumed) {
                    break;
                }
                let Some(done) = st.pending.join_next().await else {
                    f.shared.log.line(
                        "debug",
                        &format!(
                            "[kong-host] filter chain paused in \"{}\" (context #{ctx}) with no pending dispatch: nothing can resume it (as in Kong, the request hangs)",
                            step.callback()
                        ),
                    );
                    std::future::pending::<()>().await;
                    return Err(StepEnd::Failed);
                };
                let Ok((fi, answer)) = done else { continue };
                self.deliver(st, ex, fi, answer)?;
                if st.pending.is_empty() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn deliver(
        &self,
        st: &mut ChainState,
        ex: &mut Option<Exchange>,
        fi: usize,
        answer: Answer,
    ) -> Result<(), StepEnd> {
        let Some(f) = self.filters.get(fi) else {
            return Ok(());
        };
        let (ctx, generation) = st.running.contexts[fi];
        if let Some(e) = ex.as_mut() {
            e.context_id = ctx;
            e.pending_calls = st.pending.len();
        }
        let args = answer_args(ctx as i32, &answer);
        f.call(
            generation,
            Step::DispatchResponse,
            ex,
            "proxy_on_http_call_response",
            &args,
            Some(answer),
        )
        .map_err(|_| StepEnd::Failed)?;
        self.spawn_calls(st, ex, fi);
        if ex.as_ref().is_some_and(|e| e.local.is_some()) {
            return Err(StepEnd::Local);
        }
        Ok(())
    }

    fn spawn_calls(&self, st: &mut ChainState, ex: &mut Option<Exchange>, fi: usize) {
        let Some(e) = ex.as_mut() else { return };
        let Some(f) = self.filters.get(fi) else {
            return;
        };
        for call in e.new_calls.drain(..) {
            let shared = f.shared.clone();
            st.pending
                .spawn(async move { (fi, crate::http::dispatch(&shared, call).await) });
        }
        e.pending_calls = st.pending.len();
    }

    /// Answers still pending (a filter dispatched and continued), then the response steps,
    /// then log and done (assumptions above).
    pub async fn respond(&self, mut st: ChainState, ex: Exchange, resp: Resp) -> Resp {
        let mut ex = Some(ex);
        while let Some(done) = st.pending.join_next().await {
            if let Ok((fi, answer)) = done
                && self.deliver(&mut st, &mut ex, fi, answer).is_err()
            {
                break;
            }
        }
        if let Some(e) = ex.as_mut() {
            e.local = None;
            e.resp = Some(resp);
            e.header_sent = false;
        }
        let mut failed = false;
        for step in [Step::ResponseHeaders, Step::ResponseBody] {
            for (i, f) in self.filters.iter().enumerate() {
                let Some(&(ctx, generation)) = st.running.contexts.get(i) else {
                    continue;
                };
                let Some(e) = ex.as_mut() else { break };
                e.context_id = ctx;
                let r = e.resp.as_ref();
                let args = match step {
                    Step::ResponseHeaders => {
                        [ctx as i32, r.map_or(0, |r| r.headers.len() + 1) as i32, 0]
                    }
                    _ => [ctx as i32, r.map_or(0, |r| r.body.len()) as i32, 1],
                };
                let export = match step {
                    Step::ResponseHeaders => "proxy_on_response_headers",
                    _ => "proxy_on_response_body",
                };
                if let Err(Fail::Trap) = f.call(generation, step, &mut ex, export, &args, None) {
                    failed = true;
                }
            }
            if let Some(e) = ex.as_mut() {
                e.header_sent = true;
            }
        }
        for (i, f) in self.filters.iter().enumerate() {
            let Some(&(ctx, generation)) = st.running.contexts.get(i) else {
                continue;
            };
            if let Some(e) = ex.as_mut() {
                e.context_id = ctx;
            }
            let _ = f.call(
                generation,
                Step::Log,
                &mut ex,
                "proxy_on_log",
                &[ctx as i32],
                None,
            );
            let _ = f.call(
                generation,
                Step::Done,
                &mut ex,
                "proxy_on_done",
                &[ctx as i32],
                None,
            );
            let _ = f.call(
                generation,
                Step::Done,
                &mut ex,
                "proxy_on_delete",
                &[ctx as i32],
                None,
            );
        }
        if failed {
            return kong_error(500, "An unexpected error occurred");
        }
        ex.and_then(|e| e.resp)
            .unwrap_or_else(|| kong_error(500, "An unexpected error occurred"))
    }
}

pub struct ChainState {
    running: Running,
    pending: Pending,
}

enum StepEnd {
    Local,
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_targets_are_literal_addresses() {
        let addr = |s: &str| match parse_target(s, false) {
            Ok(Target::Addr(a)) => a.to_string(),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(addr("127.0.0.1:8090"), "127.0.0.1:8090");
        assert_eq!(addr("127.0.0.1"), "127.0.0.1:80");
        assert_eq!(addr("[::1]:8090"), "[::1]:8090");
        assert!(matches!(parse_target("127.0.0.1", true), Ok(Target::Addr(a)) if a.port() == 443));
        assert!(
            matches!(parse_target("unix:/run/sidecar.sock", false), Ok(Target::Unix(p)) if p.to_str() == Some("/run/sidecar.sock"))
        );
        // A name (e.g. an Envoy cluster name) is resolved, not taken as an address.
        assert!(
            matches!(parse_target("eventwire_sidecar", false), Ok(Target::Name(n, 80)) if n == "eventwire_sidecar")
        );
        // Synchronous failures are traps with the engine's wording.
        for (bad, why) in [
            ("127.0.0.1:http", "invalid port"),
            ("127.0.0.1:0", "invalid port"),
            (":8090", "no host"),
            ("[::1", "invalid host"),
        ] {
            assert_eq!(
                parse_target(bad, false).err(),
                Some(format!("dispatch failed: tcp socket - {why}")),
                "{bad}"
            );
        }
    }

    #[test]
    fn properties_are_kongs() {
        let shared = Arc::new(Shared::new(KongConf::default(), Vec::new(), false));
        let mut k = VmState {
            shared,
            filter: "eventwire".into(),
            root_id: 1,
            config: Vec::new(),
            step: Step::RequestHeaders,
            ex: None,
            answer: None,
            root_calls: Vec::new(),
            tick_period: 0,
            trap: None,
            metric_ids: Vec::new(),
        };
        // Outside a request: scoped properties fail, plugin_name works.
        assert_eq!(property(&k, "request.path"), Err(()));
        assert_eq!(property(&k, "plugin_name"), Ok(Some(b"eventwire".to_vec())));
        k.ex = Some(Exchange {
            method: "POST".into(),
            path: "/orders?x=1".into(),
            client: "10.1.2.3:5555".parse().ok(),
            route_id: Some("r-1".into()),
            ..Default::default()
        });
        let get = |p: &str| {
            property(&k, p)
                .ok()
                .flatten()
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        assert_eq!(get("request.path").as_deref(), Some("/orders?x=1"));
        assert_eq!(get("request.url_path").as_deref(), Some("/orders"));
        assert_eq!(get("request.method").as_deref(), Some("POST"));
        assert_eq!(get("source.address").as_deref(), Some("10.1.2.3"));
        assert_eq!(get("kong.route_id").as_deref(), Some("r-1"));
        assert_eq!(get("kong.version").as_deref(), Some(KONG_VERSION));
        assert_eq!(get("ngx.nginx_version").as_deref(), Some(NGINX_VERSION));
        assert_eq!(get("xds.route_name"), None);
        assert_eq!(get("route_name"), None);
    }
}
