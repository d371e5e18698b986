//! Between a subscription and its connection's writer: events one at a time, and the
//! watch on the subscriber's lag that closes a client which stopped reading.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::fanout::stopped;
use crate::metrics::PushCounter;
use crate::subscription::{Behind, End, Event, Lag, Subscription, cursor_before};

/// A write that cannot complete in this time means the client is gone or stuck (WebSocket:
/// the socket is dropped; SSE: the subscription ends and frees its hub slot, replay and
/// `--max-subscribers` place; the connection goes when its last bytes can be written or the
/// proxy's idle timeout resets it).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a blocked hand-over re-checks the subscriber's lag.
const OVERFLOW_CHECK: Duration = Duration::from_millis(20);
/// How long a subscriber may stay more than its queue behind before it is closed.
const OVER_QUEUE_GRACE: Duration = Duration::from_millis(100);

/// What the pump hands to a connection's writer.
pub enum Outgoing {
    Event(Event),
    End(End),
}

/// Moves events from the subscription to the writer. While the writer is busy the
/// subscriber's lag is watched, so a client that stops reading is detected even though
/// nothing is being taken from the broadcast. At `expires` (the token's) the subscription ends.
pub async fn pump(
    mut sub: Subscription,
    tx: mpsc::Sender<Outgoing>,
    mut shutdown: watch::Receiver<bool>,
    expires: Option<SystemTime>,
    slow_closed: &PushCounter,
) {
    let mut lag = LagWatch::default();
    let expiry = until(expires);
    tokio::pin!(expiry);
    loop {
        let next = tokio::select! {
            next = sub.next() => next,
            () = tx.closed() => return,
            () = stopped(&mut shutdown) => Err(End::ShuttingDown { cursor: sub.cursor().clone() }),
            () = &mut expiry => Err(End::TokenExpired { cursor: sub.cursor().clone() }),
        };
        let event = match next {
            Ok(event) => event,
            Err(end) => {
                if matches!(end, End::SlowConsumer { .. } | End::ReplayTooLong { .. }) {
                    slow_closed.inc();
                }
                let _ = tx.send(Outgoing::End(end)).await;
                return;
            }
        };
        let before = cursor_before(sub.cursor(), &event);
        let overflow = tokio::select! {
            sent = tx.send(Outgoing::Event(event)) => match sent {
                // The writer has the event: resume after it.
                Ok(()) => lag.too_long(&sub).map(|behind| (behind, sub.cursor().clone())),
                Err(_) => return,
            },
            // The event in hand did not reach the writer: resume before it.
            behind = lag.wait_too_long(&sub) => Some((behind, before)),
            () = tokio::time::sleep(WRITE_TIMEOUT) => {
                // The writer has not taken an event for that long (a replay is not watched
                // for lag): the client is stuck. Free everything; the writer goes on its own.
                tracing::info!(cursor = %before, "closing subscriber whose writes stalled");
                slow_closed.inc();
                return;
            }
        };
        if let Some((behind, resume)) = overflow {
            slow_closed.inc();
            let end = sub.slow_consumer(behind, resume);
            // Free the hub's slot before waiting for the writer to take the notice.
            drop(sub);
            let _ = tx.send(Outgoing::End(end)).await;
            return;
        }
    }
}

/// Resolves at `at` (wall clock, like a token's `exp`); never without one.
async fn until(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

/// Since when a subscriber has been more than its queue behind.
#[derive(Default)]
struct LagWatch {
    over_since: Option<Instant>,
}

impl LagWatch {
    /// The limit the subscriber has been over for too long (or far over), if any.
    fn too_long(&mut self, sub: &Subscription) -> Option<Behind> {
        match sub.lag() {
            Lag::Within => {
                self.over_since = None;
                None
            }
            Lag::FarOver(behind) => Some(behind),
            Lag::Over(behind) => {
                let since = self.over_since.get_or_insert_with(Instant::now);
                (since.elapsed() >= OVER_QUEUE_GRACE).then_some(behind)
            }
        }
    }

    async fn wait_too_long(&mut self, sub: &Subscription) -> Behind {
        loop {
            if let Some(behind) = self.too_long(sub) {
                return behind;
            }
            tokio::time::sleep(OVERFLOW_CHECK).await;
        }
    }
}

/// The text a client reads when its subscription ends.
pub fn end_message(end: &End) -> String {
    match end {
        End::SlowConsumer { limit, cursor } => {
            format!("slow consumer: fell more than {limit} behind; reconnect with from={cursor}")
        }
        End::ReplayTooLong { limit, cursor } => format!(
            "slow replay: not caught up after {} s; reconnect with from={cursor}",
            limit.as_secs()
        ),
        End::ShuttingDown { cursor } => {
            format!("sidecar shutting down; reconnect with from={cursor}")
        }
        End::TokenExpired { cursor } => {
            format!("token expired; reconnect with a new token and from={cursor}")
        }
    }
}
