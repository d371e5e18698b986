//! Child processes that are always stopped, and loopback ports held for them.

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A loopback port held for a child process (the sidecar, the broker) for as long as this
/// value lives, across the child's restarts, so that no other process on the machine (another
/// nextest process, its broker or proxy) can ever get it.
///
/// It is a socket bound to `127.0.0.1:0` with `SO_REUSEADDR` that never listens:
/// - Linux never hands a port that a socket is bound to to another `bind` to port 0 (it
///   shares one only when `net.ipv4.ip_autobind_reuse` is set, checked here), so every other
///   harness port, all taken that way, differs from it;
/// - the child binds the port by number, which `SO_REUSEADDR` allows while no socket listens
///   on it (socket(7)); the child must set `SO_REUSEADDR` too, as everything binding through
///   tokio/mio or Rust's std does on Unix (the sidecar and Tansu);
/// - while the child is down nothing listens, so a connection is refused exactly as if the
///   port were free, and a restarted child binds the same port again.
pub struct HeldPort {
    pub port: u16,
    _socket: tokio::net::TcpSocket,
}

impl HeldPort {
    pub fn new() -> HeldPort {
        let autobind_reuse = std::fs::read_to_string("/proc/sys/net/ipv4/ip_autobind_reuse");
        assert!(
            autobind_reuse.as_deref().map_or(true, |v| v.trim() == "0"),
            "net.ipv4.ip_autobind_reuse is set: port 0 binds may share a held port"
        );
        let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("socket: {e}"));
        socket
            .set_reuseaddr(true)
            .unwrap_or_else(|e| panic!("SO_REUSEADDR: {e}"));
        socket
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .unwrap_or_else(|e| panic!("no free loopback port: {e}"));
        let port = socket
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("held port: {e}"));
        HeldPort {
            port,
            _socket: socket,
        }
    }
}

impl Default for HeldPort {
    fn default() -> Self {
        Self::new()
    }
}

/// A started process whose output goes to a log file; stopped on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let dir = tempfile::Builder::new()
            .prefix(&format!("eventwire-{name}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().unwrap_or_else(|e| panic!("log: {e}"));
        // SAFETY: prctl is async-signal-safe; it makes the child die with this process, so
        // a killed test run leaves no broker or proxy behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has ended (without reaping it, so `&self` is enough).
    pub fn exited(&self) -> bool {
        let Some(child) = &self.child else {
            return true;
        };
        // SAFETY: waitid(2) with WNOWAIT only peeks at our own child's state; siginfo_t is
        // plain data that zeroed is valid for.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            rc != 0 || info.si_pid() != 0
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, then SIGKILL after 10 s; returns the exit status code if it exited.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- last lines of {} ----\n{}", self.name, self.log_tail());
        }
        self.stop();
    }
}
