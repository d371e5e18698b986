//! Subscriptions per token and per client address: a leaked or shared token, or one busy
//! client, cannot take the whole push side. Counted by a key (a JWT's `sub`, a static token's
//! line; the client's address); a place is held for as long as its subscription runs.

use std::net::IpAddr;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

pub struct Quota {
    per_token: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One subscription's place; dropping it frees the place.
pub struct Held {
    quota: Arc<Quota>,
    principal: String,
}

impl Quota {
    pub fn new(per_token: usize) -> Arc<Quota> {
        Arc::new(Quota {
            per_token,
            open: Mutex::default(),
        })
    }

    /// A place for `principal` (`None`: open push side, nothing to count), or `Err` with the
    /// limit when it has them all.
    pub fn take(self: &Arc<Self>, principal: Option<&str>) -> Result<Option<Held>, usize> {
        let Some(principal) = principal else {
            return Ok(None);
        };
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(principal.to_string()).or_default();
        if *n >= self.per_token {
            return Err(self.per_token);
        }
        *n += 1;
        Ok(Some(Held {
            quota: self.clone(),
            principal: principal.to_string(),
        }))
    }
}

/// The client's address: the right-most `X-Forwarded-For` entry when the connection comes
/// from a trusted proxy (which appended it), else the connection's own peer.
pub fn client_address(
    peer: Option<IpAddr>,
    forwarded_for: Option<&str>,
    trusted: &[IpAddr],
) -> Option<String> {
    let peer = peer?;
    if trusted.contains(&peer)
        && let Some(last) = forwarded_for
            .and_then(|f| f.rsplit(',').next())
            .map(str::trim)
            .filter(|a| !a.is_empty())
    {
        return Some(last.to_string());
    }
    Some(peer.to_string())
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self
            .quota
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.principal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_per_token_and_freed_on_drop() {
        let q = Quota::new(2);
        let a1 = q.take(Some("a")).unwrap();
        let _a2 = q.take(Some("a")).unwrap();
        assert_eq!(q.take(Some("a")).err(), Some(2));
        assert!(
            q.take(Some("b")).unwrap().is_some(),
            "another token has its own"
        );
        assert!(q.take(None).unwrap().is_none(), "nothing to count");
        drop(a1);
        assert!(q.take(Some("a")).is_ok(), "a place came free");
    }

    #[test]
    fn the_client_is_the_peer_or_what_a_trusted_proxy_appended() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "192.0.2.7".parse().unwrap();
        let trusted = [local];
        let xff = Some("198.51.100.1, 203.0.113.9");
        assert_eq!(
            client_address(Some(local), xff, &trusted).as_deref(),
            Some("203.0.113.9")
        );
        assert_eq!(
            client_address(Some(other), xff, &trusted).as_deref(),
            Some("192.0.2.7"),
            "untrusted peer"
        );
        assert_eq!(
            client_address(Some(local), None, &trusted).as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(client_address(None, xff, &trusted), None);
    }
}
