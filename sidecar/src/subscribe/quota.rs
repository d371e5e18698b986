//! Subscriptions per token: a leaked or shared token cannot take the whole push side. Counted
//! by the token's principal (a JWT's `sub`, a static token's line); a place is held for as long
//! as its subscription runs.

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
}
