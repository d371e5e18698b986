//! The WebSocket writer: one text frame per event, pings, and a close frame that tells a
//! slow or shut-down subscriber where to resume.

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use tokio::sync::mpsc;

use super::pump::{Outgoing, WRITE_TIMEOUT, end_message};
use crate::metrics::PushCounter;
use crate::subscription::End;

/// WebSocket close code for a subscriber that fell too far behind (4000-4999 are private
/// use; 4008 mirrors 1008 "policy violation").
pub const SLOW_CONSUMER_CLOSE: u16 = 4008;
/// WebSocket close code for a subscriber whose token expired (mirrors HTTP 401).
pub const TOKEN_EXPIRED_CLOSE: u16 = 4401;
/// Close reasons must fit a control frame (123 bytes).
const MAX_CLOSE_REASON: usize = 123;

fn close_frame(end: &End) -> CloseFrame {
    let code = match end {
        End::SlowConsumer { .. } | End::ReplayTooLong { .. } => SLOW_CONSUMER_CLOSE,
        End::ShuttingDown { .. } => 1001,
        End::TokenExpired { .. } => TOKEN_EXPIRED_CLOSE,
    };
    let mut reason = end_message(end);
    if reason.len() > MAX_CLOSE_REASON {
        // Many partitions: the cursor does not fit; the last frame carries it anyway.
        reason = match end {
            End::SlowConsumer { limit, .. } => format!(
                "slow consumer: fell more than {limit} behind; reconnect with from=<last cursor>"
            ),
            End::ReplayTooLong { limit, .. } => format!(
                "slow replay: not caught up after {} s; reconnect with from=<last cursor>",
                limit.as_secs()
            ),
            End::ShuttingDown { .. } => {
                "sidecar shutting down; reconnect with from=<last cursor>".into()
            }
            End::TokenExpired { .. } => {
                "token expired; reconnect with a new token and from=<last cursor>".into()
            }
        };
    }
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

pub async fn serve_websocket(
    mut socket: WebSocket,
    mut rx: mpsc::Receiver<Outgoing>,
    ping_every: Duration,
    frames: PushCounter,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Outgoing::Event(event)) => {
                    if !send(&mut socket, Message::Text(event.frame.into())).await {
                        return;
                    }
                    frames.inc();
                }
                Some(Outgoing::End(end)) => {
                    tracing::info!(reason = end_message(&end), "closing subscriber");
                    let _ = send(&mut socket, Message::Close(Some(close_frame(&end)))).await;
                    return;
                }
                None => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                // Pongs and anything else a client says prove it is alive.
                Some(Ok(_)) => last_heard = Instant::now(),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > ping_every * 3 {
                    tracing::info!("closing subscriber that stopped answering pings");
                    return;
                }
                if !send(&mut socket, Message::Ping(Default::default())).await {
                    return;
                }
            }
        }
    }
}

async fn send(socket: &mut WebSocket, message: Message) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, socket.send(message)).await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::Cursor;
    use crate::subscription::Behind;

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let short = End::SlowConsumer {
            limit: Behind::Events(1024),
            cursor: "0:16,1:8,2:4".parse().unwrap(),
        };
        let frame = close_frame(&short);
        assert_eq!(frame.code, SLOW_CONSUMER_CLOSE);
        assert_eq!(
            frame.reason.as_str(),
            "slow consumer: fell more than 1024 events behind; reconnect with from=0:16,1:8,2:4"
        );
        let long = End::SlowConsumer {
            limit: Behind::Events(1024),
            cursor: Cursor::new((0..50).map(|p| (p, 1_000_000))),
        };
        let frame = close_frame(&long);
        assert!(frame.reason.len() <= MAX_CLOSE_REASON);
        assert!(frame.reason.ends_with("from=<last cursor>"));
        for end in [
            End::SlowConsumer {
                limit: Behind::Bytes(64 << 20),
                cursor: Cursor::new((0..50).map(|p| (p, 1_000_000))),
            },
            End::ReplayTooLong {
                limit: Duration::from_secs(300),
                cursor: Cursor::new((0..50).map(|p| (p, 1_000_000))),
            },
        ] {
            let frame = close_frame(&end);
            assert_eq!(frame.code, SLOW_CONSUMER_CLOSE);
            assert!(frame.reason.len() <= MAX_CLOSE_REASON, "{}", frame.reason);
        }
        let replay = End::ReplayTooLong {
            limit: Duration::from_secs(300),
            cursor: "0:4".parse().unwrap(),
        };
        assert_eq!(
            end_message(&replay),
            "slow replay: not caught up after 300 s; reconnect with from=0:4"
        );
    }
}
