//! Kong's configuration as this host reads it: a decK declarative file
//! (`_format_version: "3.0"`: services with `url`, routes with `name`/`paths`/`methods`,
//! `filter_chains` nested under a route or a service) and the few `kong.conf` keys the
//! filter depends on.
//!
//! Routing is Kong's path-prefix matching only (no hosts, headers, regex paths, SNIs or
//! priorities): among the routes whose `methods` allow the request, the longest matching
//! path prefix wins. `strip_path` (default true, as in Kong) removes that prefix before the
//! service's own path is put in front (Kong's `path_handling: v0`); `preserve_host`
//! (default false) keeps the client's `Host`.

use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(rename = "_format_version")]
    format_version: String,
    #[serde(default, rename = "_transform")]
    _transform: Option<bool>,
    #[serde(default)]
    services: Vec<ServiceDecl>,
}

#[derive(Debug, Deserialize)]
struct ServiceDecl {
    name: Option<String>,
    id: Option<String>,
    url: String,
    #[serde(default)]
    routes: Vec<RouteDecl>,
    #[serde(default)]
    filter_chains: Vec<ChainDecl>,
}

#[derive(Debug, Deserialize)]
struct RouteDecl {
    name: Option<String>,
    id: Option<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    protocols: Vec<String>,
    strip_path: Option<bool>,
    preserve_host: Option<bool>,
    #[serde(default)]
    filter_chains: Vec<ChainDecl>,
}

#[derive(Debug, Deserialize)]
struct ChainDecl {
    name: Option<String>,
    enabled: Option<bool>,
    filters: Vec<FilterDecl>,
}

#[derive(Debug, Deserialize)]
struct FilterDecl {
    name: String,
    enabled: Option<bool>,
    config: Option<serde_json::Value>,
}

/// One filter entry of a chain, as Kong hands it to the engine.
#[derive(Debug, Clone)]
pub struct FilterEntry {
    pub name: String,
    /// Kong passes a JSON `config` (filter with a `config_schema`) as its JSON text, and a
    /// string `config` as it is.
    pub config: Vec<u8>,
    /// The config was a JSON object/array (needs a `config_schema` in `<name>.meta.json`).
    pub json: bool,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub id: String,
    pub name: Option<String>,
    pub scheme: String,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub chain: Vec<FilterEntry>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub id: String,
    pub name: Option<String>,
    pub paths: Vec<String>,
    pub methods: Vec<String>,
    pub strip_path: bool,
    pub preserve_host: bool,
    pub service: usize,
    pub chain: Vec<FilterEntry>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub services: Vec<Service>,
    pub routes: Vec<Route>,
}

/// A stable id per entity without `id:` (Kong would generate a UUID; tests only need it to
/// be stable and unique).
fn synth_id(kind: u8, n: usize) -> String {
    format!("00000000-0000-4000-8{kind:03x}-{n:012x}")
}

fn chain(decls: &[ChainDecl]) -> Vec<FilterEntry> {
    decls
        .iter()
        .filter(|c| c.enabled.unwrap_or(true))
        .flat_map(|c| {
            let _ = &c.name;
            c.filters.iter()
        })
        .filter(|f| f.enabled.unwrap_or(true))
        .map(|f| FilterEntry {
            name: f.name.clone(),
            json: matches!(
                f.config,
                Some(serde_json::Value::Object(_) | serde_json::Value::Array(_))
            ),
            config: match &f.config {
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
                Some(v) => v.to_string().into_bytes(),
            },
        })
        .collect()
}

fn parse_url(url: &str) -> Result<(String, String, u16, String), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("service url {url:?}: no scheme"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, String::new()),
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
            h.to_string(),
            p.parse::<u16>()
                .map_err(|_| format!("service url {url:?}: bad port"))?,
        ),
        _ => (authority.to_string(), default_port),
    };
    if scheme != "http" {
        return Err(format!(
            "service url {url:?}: only http upstreams are supported by this host"
        ));
    }
    Ok((scheme.to_string(), host, port, path))
}

pub fn load(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text)
}

pub fn parse(text: &str) -> Result<Config, String> {
    let file: File =
        serde_norway::from_str(text).map_err(|e| format!("declarative config: {e}"))?;
    if !file.format_version.starts_with('3') {
        return Err(format!(
            "_format_version {:?}: this host reads 3.x",
            file.format_version
        ));
    }
    let mut cfg = Config {
        services: Vec::new(),
        routes: Vec::new(),
    };
    for (si, s) in file.services.iter().enumerate() {
        let (scheme, host, port, spath) = parse_url(&s.url)?;
        cfg.services.push(Service {
            id: s.id.clone().unwrap_or_else(|| synth_id(1, si)),
            name: s.name.clone(),
            scheme,
            host,
            port,
            path: spath,
            chain: chain(&s.filter_chains),
        });
        for r in &s.routes {
            if r.paths.is_empty() {
                return Err(format!(
                    "route {:?}: this host routes by paths only",
                    r.name
                ));
            }
            if r.protocols.iter().any(|p| p != "http" && p != "https") {
                return Err(format!("route {:?}: only http routes", r.name));
            }
            if let Some(p) = r.paths.iter().find(|p| p.starts_with('~')) {
                return Err(format!("route {:?}: regex path {p} not supported", r.name));
            }
            let n = cfg.routes.len();
            cfg.routes.push(Route {
                id: r.id.clone().unwrap_or_else(|| synth_id(2, n)),
                name: r.name.clone(),
                paths: r.paths.clone(),
                methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                strip_path: r.strip_path.unwrap_or(true),
                preserve_host: r.preserve_host.unwrap_or(false),
                service: si,
                chain: chain(&r.filter_chains),
            });
        }
    }
    Ok(cfg)
}

impl Config {
    /// The route for a request: methods must allow it; the longest path prefix wins.
    pub fn route(&self, method: &str, path: &str) -> Option<(&Route, usize)> {
        let path = path.split('?').next().unwrap_or("");
        let mut best: Option<(&Route, usize)> = None;
        for r in &self.routes {
            if !r.methods.is_empty() && !r.methods.iter().any(|m| m == method) {
                continue;
            }
            for p in &r.paths {
                if path.starts_with(p.as_str()) && best.is_none_or(|(_, len)| p.len() > len) {
                    best = Some((r, p.len()));
                }
            }
        }
        best
    }
}

/// The upstream path: `strip_path` removes the matched prefix, the service path goes first.
pub fn upstream_path(
    service: &Service,
    route: &Route,
    matched: usize,
    path_and_query: &str,
) -> String {
    let rest = if route.strip_path {
        &path_and_query[matched.min(path_and_query.len())..]
    } else {
        path_and_query
    };
    let base = service.path.trim_end_matches('/');
    let joined = match (
        base.is_empty(),
        rest.starts_with('/') || rest.starts_with('?'),
    ) {
        (true, true) => rest.to_string(),
        (true, false) => format!("/{rest}"),
        (false, true) => format!("{base}{rest}"),
        (false, false) if rest.is_empty() => base.to_string(),
        (false, false) => format!("{base}/{rest}"),
    };
    if joined.starts_with('?') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// The `kong.conf` keys this host honours (everything else is ignored).
#[derive(Debug, Clone)]
pub struct KongConf {
    pub wasm: bool,
    pub filters_path: Option<PathBuf>,
    /// `wasm_filters`: `bundled`, `user` or filter names.
    pub filters: Vec<String>,
    /// `nginx_http_client_body_buffer_size` (Kong's default 8k).
    pub client_body_buffer_size: usize,
    /// `nginx_wasm_socket_{connect,read,send}_timeout` (ngx_wasm_module's default 60s).
    pub socket_connect_timeout: Duration,
    pub socket_read_timeout: Duration,
    pub socket_send_timeout: Duration,
    /// `shm_kv` zones: `nginx_wasm_shm_kv` (the `*` zone) and `nginx_wasm_shm_kv_<zone>`.
    pub kv_zones: Vec<String>,
}

impl Default for KongConf {
    fn default() -> Self {
        KongConf {
            wasm: false,
            filters_path: None,
            filters: vec!["bundled".into(), "user".into()],
            client_body_buffer_size: 8 * 1024,
            socket_connect_timeout: Duration::from_secs(60),
            socket_read_timeout: Duration::from_secs(60),
            socket_send_timeout: Duration::from_secs(60),
            kv_zones: Vec::new(),
        }
    }
}

/// nginx sizes: `8k`, `2m`, `1048576`.
pub fn parse_size(v: &str) -> Option<usize> {
    let v = v.trim().to_ascii_lowercase();
    let (num, mul) = match v.chars().last()? {
        'k' => (&v[..v.len() - 1], 1024),
        'm' => (&v[..v.len() - 1], 1024 * 1024),
        'g' => (&v[..v.len() - 1], 1024 * 1024 * 1024),
        _ => (v.as_str(), 1),
    };
    num.trim().parse::<usize>().ok().map(|n| n * mul)
}

/// nginx times: `500ms`, `5s`, `1m`, `60` (seconds).
pub fn parse_time(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Some(ms) = v.strip_suffix("ms") {
        return ms.trim().parse().ok().map(Duration::from_millis);
    }
    if let Some(s) = v.strip_suffix('s') {
        return s.trim().parse().ok().map(Duration::from_secs);
    }
    if let Some(m) = v.strip_suffix('m') {
        return m
            .trim()
            .parse::<u64>()
            .ok()
            .map(|m| Duration::from_secs(m * 60));
    }
    v.parse().ok().map(Duration::from_secs)
}

pub fn load_kong_conf(path: &Path) -> Result<KongConf, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut kv = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some((k, v)) = line.split_once('=') {
            kv.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let mut c = KongConf::default();
    let bad = |k: &str, v: &str| format!("{}: {k} = {v}: not understood", path.display());
    for (k, v) in &kv {
        match k.as_str() {
            "wasm" => c.wasm = matches!(v.as_str(), "on" | "true"),
            "wasm_filters_path" => c.filters_path = Some(PathBuf::from(v)),
            "wasm_filters" => c.filters = v.split(',').map(|s| s.trim().to_string()).collect(),
            "nginx_http_client_body_buffer_size" => {
                c.client_body_buffer_size = parse_size(v).ok_or_else(|| bad(k, v))?
            }
            "nginx_wasm_socket_connect_timeout" => {
                c.socket_connect_timeout = parse_time(v).ok_or_else(|| bad(k, v))?
            }
            "nginx_wasm_socket_read_timeout" => {
                c.socket_read_timeout = parse_time(v).ok_or_else(|| bad(k, v))?
            }
            "nginx_wasm_socket_send_timeout" => {
                c.socket_send_timeout = parse_time(v).ok_or_else(|| bad(k, v))?
            }
            "nginx_wasm_shm_kv" => c.kv_zones.push("*".into()),
            _ => {
                if let Some(zone) = k.strip_prefix("nginx_wasm_shm_kv_") {
                    c.kv_zones.push(zone.to_string());
                }
            }
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_longest_prefix_and_method() {
        let cfg = parse(
            r#"
_format_version: "3.0"
services:
- name: a
  url: http://127.0.0.1:1/base
  routes:
  - name: all
    paths: [/]
  - name: orders
    paths: [/orders]
    methods: [POST]
    strip_path: false
"#,
        )
        .unwrap();
        assert_eq!(
            cfg.route("POST", "/orders?x=1").unwrap().0.name.as_deref(),
            Some("orders")
        );
        assert_eq!(
            cfg.route("GET", "/orders").unwrap().0.name.as_deref(),
            Some("all")
        );
        let (r, n) = cfg.route("GET", "/x/y?q").unwrap();
        assert_eq!(
            upstream_path(&cfg.services[0], r, n, "/x/y?q"),
            "/base/x/y?q"
        );
        let (r, n) = cfg.route("POST", "/orders").unwrap();
        assert_eq!(
            upstream_path(&cfg.services[0], r, n, "/orders"),
            "/base/orders"
        );
    }

    #[test]
    fn sizes_and_times() {
        assert_eq!(parse_size("8k"), Some(8192));
        assert_eq!(parse_size("2m"), Some(2 << 20));
        assert_eq!(parse_time("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_time("6s"), Some(Duration::from_secs(6)));
    }
}
