//! eventwire-kong-host: a stand-in for Kong Gateway in tests. It reads a decK declarative
//! file, loads the filters (`<name>.wasm`, name = basename) from the filters path, routes
//! each request by path prefix, runs the route's filter chain with Kong's proxy-wasm engine
//! semantics (`kong_semantics`) and proxies to the service unless the chain answered.
//!
//! ```text
//! eventwire-kong-host --config kong.yml [--kong-conf kong.conf] [--filters-path DIR]
//!     [--listen 127.0.0.1:0] [--admin-listen 127.0.0.1:0] [--port-file F] [--debug]
//! ```
//! The port file gets `{"proxy":P,"admin":A}` once everything is loaded. The log (nginx
//! error.log style) goes to stderr; the admin port serves `/metrics` (the filters'
//! `pw.<filter>.<name>` metrics as JSON) and `/status`.

mod abi;
mod decl;
mod http;
mod kong_semantics;

use bytes::Bytes;
use http::{Body, Upstream, full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use kong_semantics::{Chain, Exchange, FilterVm, Outcome, Shared};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;

struct Args {
    config: PathBuf,
    kong_conf: Option<PathBuf>,
    filters_path: Option<PathBuf>,
    listen: String,
    admin_listen: String,
    port_file: Option<PathBuf>,
    debug: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: eventwire-kong-host --config kong.yml [--kong-conf kong.conf] [--filters-path DIR] \
         [--listen ADDR] [--admin-listen ADDR] [--port-file FILE] [--debug]"
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        config: PathBuf::new(),
        kong_conf: None,
        filters_path: None,
        listen: "127.0.0.1:8000".into(),
        admin_listen: "127.0.0.1:0".into(),
        port_file: None,
        debug: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--config" | "-c" => a.config = PathBuf::from(val()),
            "--kong-conf" => a.kong_conf = Some(PathBuf::from(val())),
            "--filters-path" => a.filters_path = Some(PathBuf::from(val())),
            "--listen" => a.listen = val(),
            "--admin-listen" => a.admin_listen = val(),
            "--port-file" => a.port_file = Some(PathBuf::from(val())),
            "--debug" => a.debug = true,
            _ => usage(),
        }
    }
    if a.config.as_os_str().is_empty() {
        usage()
    }
    a
}

struct App {
    cfg: decl::Config,
    /// Per route (same index), its chain (service's filters, then the route's).
    chains: Vec<Option<Arc<Chain>>>,
    shared: Arc<Shared>,
    listen_port: u16,
}

fn fatal(msg: &str) -> ! {
    eprintln!("[emerg] {msg}");
    std::process::exit(1)
}

/// `*.wasm` at the top of the filters path (Kong's discovery); `*.wat` too, a test-only
/// extension for the text fixtures.
fn discover(dir: &std::path::Path) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        fatal(&format!(
            "wasm_filters_path {}: not a directory",
            dir.display()
        ));
    };
    for e in entries.flatten() {
        let p = e.path();
        let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
        if (ext == "wasm" || ext == "wat")
            && p.is_file()
            && let Some(stem) = p.file_stem().and_then(|s| s.to_str())
        {
            out.entry(stem.to_string()).or_insert(p);
        }
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let conf = match &a.kong_conf {
        Some(p) => decl::load_kong_conf(p).unwrap_or_else(|e| fatal(&e)),
        None => decl::KongConf {
            wasm: true,
            ..Default::default()
        },
    };
    let cfg = decl::load(&a.config).unwrap_or_else(|e| fatal(&e));
    let any_chain = cfg.routes.iter().any(|r| !r.chain.is_empty())
        || cfg.services.iter().any(|s| !s.chain.is_empty());
    if any_chain && !conf.wasm {
        fatal("filter_chains need `wasm = on` in kong.conf");
    }
    let dir = a
        .filters_path
        .clone()
        .or_else(|| conf.filters_path.clone())
        .unwrap_or_else(|| fatal("no wasm_filters_path (kong.conf) or --filters-path"));
    let mut available = discover(&dir);
    let allow_user = conf.filters.iter().any(|f| f == "user");
    available.retain(|name, _| allow_user || conf.filters.iter().any(|f| f == name));

    let kv_zones = conf.kv_zones.clone();
    let shared = Arc::new(Shared::new(conf, kv_zones, a.debug));
    let engine = wasmtime::Engine::default();
    let mut linker = wasmtime::Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |d: &mut abi::HostData| &mut d.wasi)
        .unwrap_or_else(|e| fatal(&format!("wasi: {e}")));
    kong_semantics::link(&mut linker).unwrap_or_else(|e| fatal(&format!("host functions: {e}")));
    let linker = Arc::new(linker);

    let mut modules: HashMap<String, wasmtime::Module> = HashMap::new();
    let mut chains = Vec::new();
    for r in &cfg.routes {
        let svc = &cfg.services[r.service];
        let entries: Vec<_> = svc.chain.iter().chain(r.chain.iter()).collect();
        if entries.is_empty() {
            chains.push(None);
            continue;
        }
        let mut filters = Vec::new();
        for e in entries {
            let Some(path) = available.get(&e.name) else {
                fatal(&format!(
                    "route {:?}: filter_chains: no such filter: {} (not in {})",
                    r.name,
                    e.name,
                    dir.display()
                ));
            };
            // Kong takes a JSON config only from a filter whose <name>.meta.json (next to the
            // .wasm) has a config_schema; otherwise config must be a string.
            if e.json {
                let meta = path.with_extension("meta.json");
                let has_schema = std::fs::read_to_string(&meta)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .is_some_and(|m| m.get("config_schema").is_some());
                if !has_schema {
                    fatal(&format!(
                        "route {:?}: filter {}: config must be a string ({} has no config_schema)",
                        r.name,
                        e.name,
                        meta.display()
                    ));
                }
            }
            let module = match modules.get(&e.name) {
                Some(m) => m.clone(),
                None => {
                    let m = wasmtime::Module::from_file(&engine, path)
                        .unwrap_or_else(|err| fatal(&format!("{}: {err:#}", path.display())));
                    modules.insert(e.name.clone(), m.clone());
                    m
                }
            };
            filters.push(FilterVm::new(
                &e.name,
                e.config.clone(),
                module,
                engine.clone(),
                linker.clone(),
                shared.clone(),
            ));
        }
        chains.push(Some(Arc::new(Chain { filters })));
    }

    let listener = TcpListener::bind(&a.listen)
        .await
        .unwrap_or_else(|e| fatal(&format!("listen {}: {e}", a.listen)));
    let admin = TcpListener::bind(&a.admin_listen)
        .await
        .unwrap_or_else(|e| fatal(&format!("listen {}: {e}", a.admin_listen)));
    let port = listener.local_addr().map(|x| x.port()).unwrap_or(0);
    let admin_port = admin.local_addr().map(|x| x.port()).unwrap_or(0);
    let app = Arc::new(App {
        cfg,
        chains,
        shared: shared.clone(),
        listen_port: port,
    });
    if let Some(pf) = &a.port_file {
        let tmp = pf.with_extension("tmp");
        let text = format!("{{\"proxy\":{port},\"admin\":{admin_port}}}\n");
        if std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, pf))
            .is_err()
        {
            fatal(&format!("cannot write {}", pf.display()));
        }
    }
    shared.log.line(
        "notice",
        &format!(
            "[kong-host] proxy listening on 127.0.0.1:{port}, admin on 127.0.0.1:{admin_port}"
        ),
    );

    let admin_app = app.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = admin.accept().await else {
                continue;
            };
            let app = admin_app.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| admin_handle(app.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(app.clone(), req, peer));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn admin_handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let json = |v: serde_json::Value| {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(v.to_string()))
            .unwrap_or_else(|_| Response::new(full(Bytes::new())))
    };
    Ok(match req.uri().path() {
        "/metrics" => json(serde_json::json!(app.shared.metrics.snapshot())),
        "/status" => json(serde_json::json!({
            "kong_version": kong_semantics::KONG_VERSION,
            "traps": app.shared.traps.load(Ordering::Relaxed),
            "routes": app.cfg.routes.len(),
        })),
        _ => Response::builder()
            .status(404)
            .body(full("not found\n"))
            .unwrap_or_else(|_| Response::new(full(Bytes::new()))),
    })
}

async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let Some((route, matched)) = app.cfg.route(&method, &path) else {
        let r = kong_semantics::kong_error(404, "no Route matched with those values");
        return Ok(http::to_response(r));
    };
    let ri = app
        .cfg
        .routes
        .iter()
        .position(|r| std::ptr::eq(r, route))
        .unwrap_or(0);
    let svc = &app.cfg.services[route.service];
    let up = Upstream {
        host: svc.host.clone(),
        port: svc.port,
        path: decl::upstream_path(svc, route, matched, &path),
        preserve_host: route.preserve_host,
        client_ip: peer.ip().to_string(),
        listen_port: app.listen_port,
        original_path: path.clone(),
    };
    let Some(chain) = app.chains.get(ri).cloned().flatten() else {
        return Ok(http::proxy_stream(&up, req).await);
    };
    let (parts, body) = req.into_parts();
    let headers: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    let authority = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let ex = Exchange {
        method: method.clone(),
        path: path.clone(),
        scheme: "http".into(),
        authority,
        protocol: format!("{:?}", parts.version),
        headers,
        client: Some(peer),
        server_port: app.listen_port,
        route_id: Some(route.id.clone()),
        route_name: route.name.clone(),
        route_json: Some(
            serde_json::json!({"id": route.id, "name": route.name, "paths": route.paths,
                               "methods": route.methods, "strip_path": route.strip_path})
            .to_string(),
        ),
        service_id: Some(svc.id.clone()),
        service_name: svc.name.clone(),
        service_json: Some(
            serde_json::json!({"id": svc.id, "name": svc.name, "host": svc.host,
                               "port": svc.port, "path": svc.path, "protocol": svc.scheme})
            .to_string(),
        ),
        ..Default::default()
    };
    let read_body = || async move {
        use http_body_util::BodyExt;
        match body.collect().await {
            Ok(b) => Some(b.to_bytes().to_vec()).filter(|b| !b.is_empty()),
            Err(_) => None,
        }
    };
    let (outcome, st) = chain.request(ex, read_body).await;
    let (ex, resp) = match outcome {
        Outcome::Proxy(ex) => {
            let up = Upstream {
                path: decl::upstream_path(svc, route, matched, &ex.path),
                ..up
            };
            let body = ex.body.clone().unwrap_or_default();
            let resp = http::proxy_buffered(&up, &ex.method, &ex.headers, body).await;
            (ex, resp)
        }
        Outcome::Reply(ex, resp) => (ex, resp),
    };
    let resp = chain.respond(st, ex, resp).await;
    Ok(http::to_response(resp))
}
