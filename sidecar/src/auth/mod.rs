//! Who may call the sidecar: its proxies on ingest ([`ingest`]: shared secrets, per-topic
//! publish rights) and subscribers on the push side and the status API ([`subscriber`]:
//! JWTs or static tokens, topics and a forced filter per token, single-use [`ticket`]s for
//! clients that cannot send headers).
//!
//! Credentials live in files that are read again when they change, so keys and secrets
//! rotate without a restart; a file that became unreadable or invalid keeps what is in force.

pub mod ingest;
pub mod subscriber;
pub mod ticket;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

pub use ingest::{AuthError, IngestAuth, SecretError};
pub use subscriber::{
    Access, AccessError, SubscriberAuth, SubscriberAuthConfig, SubscriberAuthError,
};
pub use ticket::{TicketError, Tickets};

/// How often a credentials file is looked at for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// A topic name or a prefix ending in `*` (`*` alone: every topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicPattern {
    Exact(String),
    Prefix(String),
}

impl TopicPattern {
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicPattern::Exact(t) => t == topic,
            TopicPattern::Prefix(p) => topic.starts_with(p.as_str()),
        }
    }

    /// `orders` (Kafka's topic rules) or `payment-*`.
    pub fn parse(t: &str) -> Result<TopicPattern, String> {
        match t.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => Ok(TopicPattern::Prefix(prefix.to_string())),
            Some(_) => Err(format!("`{t}`: `*` only at the end")),
            None => eventwire_contract::topic::validate(t)
                .map(|()| TopicPattern::Exact(t.to_string()))
                .map_err(|e| format!("`{t}`: {e}")),
        }
    }
}

/// A value parsed from a file, parsed again when the file changes.
pub struct Watched<T> {
    path: PathBuf,
    parse: fn(&Path) -> Result<T, String>,
    value: RwLock<Arc<T>>,
    seen: RwLock<Option<(SystemTime, u64)>>,
}

impl<T: Send + Sync + 'static> Watched<T> {
    pub fn load(path: &Path, parse: fn(&Path) -> Result<T, String>) -> Result<Self, String> {
        let seen = stamp(path);
        let value = parse(path)?;
        Ok(Watched {
            path: path.to_path_buf(),
            parse,
            value: RwLock::new(Arc::new(value)),
            seen: RwLock::new(seen),
        })
    }

    /// What is in force; a reload meanwhile does not change what the caller holds.
    pub fn get(&self) -> Arc<T> {
        read(&self.value).clone()
    }

    /// Parses the file again if it changed since it was last read.
    pub fn reload(&self) {
        let now = stamp(&self.path);
        if now.is_none() || now == *read(&self.seen) {
            return;
        }
        *write(&self.seen) = now;
        match (self.parse)(&self.path) {
            Ok(value) => {
                tracing::info!(file = %self.path.display(), "credentials reloaded");
                *write(&self.value) = Arc::new(value);
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "credentials not reloaded; the previous ones stay")
            }
        }
    }
}

/// Re-reads every watched file on change until the task is aborted.
pub fn spawn_reloader(reload: Vec<Box<dyn Fn() + Send + Sync>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(RELOAD_EVERY);
        loop {
            every.tick().await;
            reload.iter().for_each(|r| r());
        }
    })
}

pub fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, RFC 9110 11.1).
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

/// Equality whose time depends only on the lengths, not on where the bytes differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn topic_patterns() {
        assert_eq!(
            TopicPattern::parse("*"),
            Ok(TopicPattern::Prefix(String::new()))
        );
        assert!(TopicPattern::parse("*").unwrap().matches("anything"));
        assert!(TopicPattern::parse("a*b").is_err());
        assert!(TopicPattern::parse("bad/topic").is_err());
        assert!(!TopicPattern::parse("orders").unwrap().matches("orders-2"));
    }
}
