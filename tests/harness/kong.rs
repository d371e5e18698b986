//! The Kong stand-in (`tests/kong-host`, Kong's proxy-wasm engine semantics on wasmtime)
//! running the shipped `kong/kong.yml` and `kong/kong.conf`, with the sidecar's and the
//! upstream's ports swapped in for the test, and the built `.wasm` (plus its
//! `eventwire.meta.json`, as Kong wants it) in a filters directory of its own.

use super::{Proc, paths, repo_root, wait_until};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The addresses `kong/kong.yml` is written with.
const SHIPPED_SIDECAR: &str = "127.0.0.1:8090";
const SHIPPED_UPSTREAM: &str = "127.0.0.1:8081";

#[derive(Clone)]
pub struct KongConfig {
    yaml: String,
}

impl KongConfig {
    /// The declarative config exactly as shipped.
    pub fn shipped() -> KongConfig {
        let path = repo_root().join("kong/kong.yml");
        let yaml =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        KongConfig { yaml }
    }

    /// Any decK text (for fixtures); `127.0.0.1:8090` / `:8081` are swapped like the shipped one.
    pub fn from_yaml(yaml: &str) -> KongConfig {
        KongConfig {
            yaml: yaml.to_string(),
        }
    }

    pub fn yaml(&self) -> &str {
        &self.yaml
    }

    /// Every filter `config` in the file: (route or service name, filter name, config).
    pub fn filter_configs(&self) -> Vec<(String, String, serde_json::Value)> {
        let doc: serde_json::Value = serde_norway::from_str(&self.yaml)
            .unwrap_or_else(|e| panic!("kong.yml is not YAML: {e}"));
        let mut out = Vec::new();
        let chains = |owner: &serde_json::Value, out: &mut Vec<_>| {
            let name = owner["name"].as_str().unwrap_or("?").to_string();
            for chain in owner["filter_chains"].as_array().into_iter().flatten() {
                for f in chain["filters"].as_array().into_iter().flatten() {
                    out.push((
                        name.clone(),
                        f["name"].as_str().unwrap_or("?").to_string(),
                        f["config"].clone(),
                    ));
                }
            }
        };
        for svc in doc["services"].as_array().into_iter().flatten() {
            chains(svc, &mut out);
            for route in svc["routes"].as_array().into_iter().flatten() {
                chains(route, &mut out);
            }
        }
        out
    }

    /// The same with `"secret": {"value": secret}` in every eventwire filter's `sidecar`
    /// (Kong passes no per-request environment; the inline form is what kong.yml would use).
    pub fn with_ingest_secret(&self, secret: &str) -> KongConfig {
        let mut doc: serde_json::Value = serde_norway::from_str(&self.yaml)
            .unwrap_or_else(|e| panic!("kong.yml is not YAML: {e}"));
        let add = |owner: &mut serde_json::Value| {
            // `get_mut`, not indexing: indexing would add the member as null where absent.
            let chains = owner
                .get_mut("filter_chains")
                .and_then(|c| c.as_array_mut());
            for chain in chains.into_iter().flatten() {
                let filters = chain.get_mut("filters").and_then(|f| f.as_array_mut());
                for f in filters.into_iter().flatten() {
                    if f["name"] == "eventwire" && f["config"].is_object() {
                        f["config"]["sidecar"]["secret"] = serde_json::json!({ "value": secret });
                    }
                }
            }
        };
        let services = doc.get_mut("services").and_then(|s| s.as_array_mut());
        for svc in services.into_iter().flatten() {
            add(svc);
            let routes = svc.get_mut("routes").and_then(|r| r.as_array_mut());
            for route in routes.into_iter().flatten() {
                add(route);
            }
        }
        KongConfig {
            yaml: serde_norway::to_string(&doc).unwrap_or_else(|e| panic!("YAML: {e}")),
        }
    }

    fn render(&self, sidecar_port: u16, upstream_port: u16) -> String {
        self.yaml
            .replace(SHIPPED_SIDECAR, &format!("127.0.0.1:{sidecar_port}"))
            .replace(SHIPPED_UPSTREAM, &format!("127.0.0.1:{upstream_port}"))
    }
}

pub struct KongHost {
    pub proc: Proc,
    pub port: u16,
    pub admin_port: u16,
    _dir: tempfile::TempDir,
}

/// Links (copies, if linking fails) `src` into `dir` as `name`.
fn place(src: &Path, dir: &Path, name: &str) {
    let dst = dir.join(name);
    if std::os::unix::fs::symlink(src, &dst).is_err() {
        std::fs::copy(src, &dst)
            .unwrap_or_else(|e| panic!("{} -> {}: {e}", src.display(), dst.display()));
    }
}

impl KongHost {
    /// The built eventwire filter, as Kong loads it: `eventwire.wasm` and
    /// `eventwire.meta.json` side by side in `wasm_filters_path`.
    pub async fn start(cfg: &KongConfig, sidecar_port: u16, upstream_port: u16) -> KongHost {
        let wasm = paths().wasm;
        let meta = repo_root().join("kong/eventwire.meta.json");
        Self::start_with(
            cfg,
            sidecar_port,
            upstream_port,
            &[(&wasm, "eventwire.wasm"), (&meta, "eventwire.meta.json")],
        )
        .await
    }

    /// With the given files in the filters directory (e.g. a `.wat` fixture).
    pub async fn start_with(
        cfg: &KongConfig,
        sidecar_port: u16,
        upstream_port: u16,
        filters: &[(&Path, &str)],
    ) -> KongHost {
        let dir = tempfile::Builder::new()
            .prefix("eventwire-kong-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let filters_dir = dir.path().join("wasm");
        std::fs::create_dir(&filters_dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
        for (src, name) in filters {
            place(src, &filters_dir, name);
        }
        let file = dir.path().join("kong.yml");
        std::fs::write(&file, cfg.render(sidecar_port, upstream_port))
            .unwrap_or_else(|e| panic!("write: {e}"));
        let port_file: PathBuf = dir.path().join("ports.json");
        let proc = Proc::spawn(
            "kong-host",
            Command::new(paths().kong_host)
                .arg("--config")
                .arg(&file)
                .arg("--kong-conf")
                .arg(repo_root().join("kong/kong.conf"))
                .arg("--filters-path")
                .arg(&filters_dir)
                .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
                .arg("--port-file")
                .arg(&port_file)
                .arg("--debug"),
        );
        let mut ports = None;
        wait_until(
            "kong-host to report its ports",
            Duration::from_secs(60),
            || {
                assert!(
                    !proc.exited(),
                    "kong-host exited; log:\n{}",
                    proc.log_tail()
                );
                let text = std::fs::read_to_string(&port_file).ok();
                ports = text
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| Some((v["proxy"].as_u64()? as u16, v["admin"].as_u64()? as u16)));
                let done = ports.is_some();
                async move { done }
            },
        )
        .await;
        let Some((port, admin_port)) = ports else {
            panic!("kong-host not ready; log:\n{}", proc.log_tail());
        };
        KongHost {
            proc,
            port,
            admin_port,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every metric the filters defined (`pw.<filter>.<name>`).
    pub async fn metrics(&self) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin_port);
        match reqwest::get(&url).await {
            Ok(r) => r.json().await.unwrap_or_else(|e| panic!("metrics: {e}")),
            Err(e) => panic!("kong-host admin: {e}"),
        }
    }

    /// One of the eventwire filter's counters (`pw.eventwire.<name>`, or the sum of its
    /// per-rule `pw.eventwire.<name>.rule.<rule>`), 0 if undefined.
    pub async fn counter(&self, name: &str) -> u64 {
        let whole = format!("pw.eventwire.{name}");
        let per_rule = format!("{whole}.rule.");
        let metrics = self.metrics().await;
        let all = metrics.as_object().into_iter().flatten();
        all.filter(|(k, _)| **k == whole || k.starts_with(&per_rule))
            .filter_map(|(_, v)| v.as_u64())
            .sum()
    }

    /// One rule's counter (`pw.eventwire.<name>.rule.<rule>`), `None` if undefined.
    pub async fn rule_counter(&self, name: &str, rule: &str) -> Option<u64> {
        self.metrics().await[format!("pw.eventwire.{name}.rule.{rule}")].as_u64()
    }

    /// The host's log (nginx error.log style) so far.
    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}
