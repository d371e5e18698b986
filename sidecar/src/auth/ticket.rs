//! Single-use tickets for clients that cannot send a header: a browser's `EventSource` (SSE)
//! and a WebSocket opened without the token subprotocol. `POST /v1/tickets` with a bearer
//! token returns a ticket; `GET /v1/subscribe?...&ticket=<ticket>` redeems it within
//! [`TICKET_TTL`], once, with the token's access. A ticket in a URL may be logged by
//! whatever sees the URL; being short-lived and single-use is what makes that harmless.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use thiserror::Error;

use super::subscriber::{Access, AccessError};

pub const TICKET_TTL: Duration = Duration::from_secs(30);
/// Unredeemed tickets kept at most; past it new ones are refused until old ones expire.
pub const MAX_TICKETS: usize = 10_000;

#[derive(Debug, Error)]
pub enum TicketError {
    #[error("{MAX_TICKETS} tickets are waiting to be redeemed; try again shortly")]
    TooMany,
    #[error("no randomness for a ticket: {0}")]
    Random(String),
}

#[derive(Default)]
pub struct Tickets {
    issued: Mutex<HashMap<String, (Access, Instant)>>,
}

impl Tickets {
    pub fn issue(&self, access: Access) -> Result<String, TicketError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| TicketError::Random(e.to_string()))?;
        let ticket = URL_SAFE_NO_PAD.encode(bytes);
        let mut issued = self.lock();
        if issued.len() >= MAX_TICKETS {
            let now = Instant::now();
            issued.retain(|_, (_, until)| *until > now);
            if issued.len() >= MAX_TICKETS {
                return Err(TicketError::TooMany);
            }
        }
        issued.insert(ticket.clone(), (access, Instant::now() + TICKET_TTL));
        Ok(ticket)
    }

    /// The access a ticket was issued for; a ticket is good once.
    pub fn redeem(&self, ticket: &str) -> Result<Access, AccessError> {
        match self.lock().remove(ticket) {
            Some((access, until)) if until > Instant::now() => Ok(access),
            _ => Err(AccessError::Ticket),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Access, Instant)>> {
        self.issued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_good_once() {
        let tickets = Tickets::default();
        let t = tickets.issue(Access::open()).unwrap();
        assert_eq!(t.len(), 43, "32 random bytes, base64url");
        assert!(tickets.redeem(&t).is_ok());
        assert_eq!(tickets.redeem(&t).err(), Some(AccessError::Ticket));
        assert_eq!(tickets.redeem("made-up").err(), Some(AccessError::Ticket));
        assert_ne!(tickets.issue(Access::open()).unwrap(), t);
    }
}
