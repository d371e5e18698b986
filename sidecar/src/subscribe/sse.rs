//! The Server-Sent Events writer: `event: cloudevent` with the cursor as `id` (so an
//! EventSource resumes by itself), `: ping` comments, and a last `event: error`.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::mpsc;

use super::pump::{Outgoing, end_message};
use crate::metrics::PushCounter;

pub fn serve_sse(
    rx: mpsc::Receiver<Outgoing>,
    ping_every: Duration,
    frames: PushCounter,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = futures_util::stream::unfold(Some((rx, frames)), |state| async move {
        let (mut rx, frames) = state?;
        let event = match rx.recv().await? {
            Outgoing::Event(e) => {
                // Counted when handed to the connection: an SSE body has no per-frame result.
                frames.inc();
                let event = SseEvent::default()
                    .id(e.cursor)
                    .event("cloudevent")
                    .data(e.frame);
                (event, Some((rx, frames)))
            }
            Outgoing::End(end) => {
                tracing::info!(reason = end_message(&end), "ending SSE subscriber");
                (
                    SseEvent::default().event("error").data(end_message(&end)),
                    None,
                )
            }
        };
        Some((Ok(event.0), event.1))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(ping_every).text("ping"))
}
