//! End-to-end harness: starts the real broker (Tansu, sqlite storage), the sidecar, Envoy
//! with the built `.wasm`, and an in-process upstream, each on its own loopback ports and
//! directories so tests run in parallel. No port is picked and released: the upstream and
//! Envoy bind port 0 and report what they got, the sidecar and the broker bind a port that
//! a `HeldPort` keeps for them (see there), so parallel test processes never collide. Every process is stopped when its handle drops,
//! also when the test fails (and, via PR_SET_PDEATHSIG, when the test process dies).

pub mod answer;
pub mod broker;
pub mod envoy;
pub mod kong;
pub mod proc;
pub mod prom;
pub mod push;
pub mod raw_http;
pub mod upstream;

pub use answer::{Answer, assert_problem, header, json_of};
pub use broker::{Broker, Record};
pub use envoy::{Envoy, EnvoyConfig};
pub use kong::{KongConfig, KongHost};
pub use proc::{HeldPort, Proc, repo_root};
pub use upstream::{Received, Reply, Upstream};

/// The ingest secret of every test stack: Envoy gets it in `SECRET_ENV` (the shipped config
/// reads it from there), the stack's sidecar in its `--ingest-secret-file`.
pub const INGEST_SECRET: &str = "eventwire-test-ingest-secret-0001";
pub const SECRET_ENV: &str = "EVENTWIRE_INGEST_SECRET";

/// The `Authorization` value a caller of a stack's sidecar must send.
pub fn bearer() -> String {
    format!("Bearer {INGEST_SECRET}")
}

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where the built artefacts and installed tools are; `make test` sets these.
pub struct Paths {
    pub envoy: PathBuf,
    pub tansu: PathBuf,
    pub sidecar: PathBuf,
    pub wasm: PathBuf,
    /// The Kong stand-in (`tests/kong-host`).
    pub kong_host: PathBuf,
}

pub fn paths() -> Paths {
    let root = repo_root();
    let env =
        |name: &str, default: PathBuf| std::env::var_os(name).map(PathBuf::from).unwrap_or(default);
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache"));
    Paths {
        envoy: env("EVENTWIRE_ENVOY", root.join(".venv/bin/envoy")),
        tansu: env(
            "EVENTWIRE_TANSU",
            cache.join("eventwire/tansu-0.6.0/bin/tansu"),
        ),
        sidecar: env(
            "EVENTWIRE_SIDECAR",
            root.join("target/release/eventwire-sidecar"),
        ),
        wasm: env(
            "EVENTWIRE_WASM",
            root.join("target/wasm32-wasip1/wasm/eventwire.wasm"),
        ),
        kong_host: env(
            "EVENTWIRE_KONG_HOST",
            root.join("target/release/eventwire-kong-host"),
        ),
    }
}

/// The sidecar process on its own port and data directory (spool, status log). The port is
/// held for the whole life of this value, so a restart gets it again and nothing else can.
pub struct Sidecar {
    pub proc: Proc,
    pub port: u16,
    brokers: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    data: tempfile::TempDir,
    // Last: released only after the process has been stopped.
    _held: HeldPort,
}

impl Sidecar {
    pub async fn start(brokers: &str) -> Sidecar {
        Self::start_with(brokers, &[]).await
    }

    /// Starts with extra `serve` flags, e.g. `["--ack-timeout-ms", "300"]`; ingest open.
    pub async fn start_with(brokers: &str, args: &[&str]) -> Sidecar {
        Self::start_in(brokers, args, &[], false).await
    }

    /// Like `start_with`, with extra environment variables (e.g. `OTEL_*`).
    pub async fn start_with_env(brokers: &str, args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        Self::start_in(brokers, args, env, false).await
    }

    /// Like `start_with`, ingest needing [`INGEST_SECRET`] (from `secret_file()`).
    pub async fn start_secured(brokers: &str, args: &[&str]) -> Sidecar {
        Self::start_in(brokers, args, &[], true).await
    }

    async fn start_in(
        brokers: &str,
        args: &[&str],
        env: &[(&str, &str)],
        secured: bool,
    ) -> Sidecar {
        let data = tempfile::Builder::new()
            .prefix("eventwire-sidecar-data-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let held = HeldPort::new();
        let port = held.port;
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if secured {
            let file = data.path().join("ingest-secrets");
            std::fs::write(&file, format!("{INGEST_SECRET}\n"))
                .unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
            args.push("--ingest-secret-file".into());
            args.push(file.display().to_string());
        }
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let proc = Self::spawn(brokers, port, &args, &env, data.path());
        let sidecar = Sidecar {
            proc,
            port,
            brokers: brokers.to_string(),
            args,
            env,
            data,
            _held: held,
        };
        sidecar.wait_healthy().await;
        sidecar
    }

    fn spawn(
        brokers: &str,
        port: u16,
        args: &[String],
        env: &[(String, String)],
        data: &std::path::Path,
    ) -> Proc {
        let listen = format!("127.0.0.1:{port}");
        Proc::spawn(
            "sidecar",
            std::process::Command::new(paths().sidecar)
                .args([
                    "serve",
                    "--listen",
                    &listen,
                    "--brokers",
                    brokers,
                    "--data-dir",
                ])
                .arg(data)
                .args(args)
                .envs(env.iter().map(|(k, v)| (k, v))),
        )
    }

    /// Starts it again on the same port and data (after `proc.stop()` or `proc.kill9()`).
    pub async fn restart(&mut self) {
        self.proc = Self::spawn(
            &self.brokers,
            self.port,
            &self.args,
            &self.env,
            self.data.path(),
        );
        self.wait_healthy().await;
    }

    /// Up means answering `/healthz`; `/readyz` (broker reachable) is `wait_ready`'s.
    async fn wait_healthy(&self) {
        let url = self.url("/healthz");
        let what = format!("the sidecar to answer {url}");
        wait_until(&what, Duration::from_secs(30), || async {
            assert!(!self.proc.exited(), "the sidecar exited instead of {what}");
            reqwest::get(&url).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// Waits until `/readyz` says the broker is reachable.
    pub async fn wait_ready(&self) {
        let url = self.url("/readyz");
        let what = format!("the sidecar to see the broker ({url})");
        wait_until(&what, Duration::from_secs(30), || async {
            assert!(!self.proc.exited(), "the sidecar exited instead of {what}");
            reqwest::get(&url).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The sidecar's `/metrics`, parsed.
    pub async fn metrics(&self) -> prom::Samples {
        let url = self.url("/metrics");
        let text = match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_else(|e| panic!("GET {url}: {e}")),
            Err(e) => panic!("GET {url}: {e}"),
        };
        prom::parse(&text)
    }

    /// The secret file of a secured sidecar (it reads it again within a second of a change).
    pub fn secret_file(&self) -> std::path::PathBuf {
        self.data.path().join("ingest-secrets")
    }
}

/// A whole stack for one test: a broker with `topics`, the sidecar (with extra `serve`
/// flags; ingest needs [`INGEST_SECRET`], as in `make run`), an in-process upstream and
/// Envoy running `cfg`; all stopped when it drops.
pub struct Stack {
    pub envoy: Envoy,
    pub upstream: Upstream,
    pub sidecar: Sidecar,
    pub broker: Broker,
    pub http: reqwest::Client,
}

impl Stack {
    pub async fn start(cfg: &EnvoyConfig, topics: &[(&str, i32)], sidecar_args: &[&str]) -> Stack {
        Self::start_with_env(cfg, topics, sidecar_args, &[]).await
    }

    /// Like `start`, the sidecar also getting `sidecar_env` (e.g. `OTEL_*`).
    pub async fn start_with_env(
        cfg: &EnvoyConfig,
        topics: &[(&str, i32)],
        sidecar_args: &[&str],
        sidecar_env: &[(&str, &str)],
    ) -> Stack {
        let broker = Broker::start().await;
        for (t, partitions) in topics {
            broker.create_topic(t, *partitions).await;
        }
        let brokers = broker.bootstrap();
        let sidecar = Sidecar::start_in(&brokers, sidecar_args, sidecar_env, true).await;
        sidecar.wait_ready().await;
        let upstream = Upstream::start().await;
        let envoy = Envoy::start(cfg, sidecar.port, upstream.port).await;
        Stack {
            envoy,
            upstream,
            sidecar,
            broker,
            http: reqwest::Client::new(),
        }
    }
}

impl Stack {
    /// `POST path` through Envoy: status, the answer's headers, its body.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut req = self.http.post(self.envoy.url(path)).body(body.to_vec());
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
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

/// Polls `check` until it holds; panics naming `what` (what never happened) once `limit`
/// has passed. The 50 ms between polls is the polling interval, not a wait for anything.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A unique topic name per test, so tests sharing nothing can also share no names.
pub fn topic(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}
