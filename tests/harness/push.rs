//! Clients of the push side (`/v1/subscribe`): WebSocket and SSE readers with bounded waits,
//! and a producer that writes CloudEvents straight to the broker.

use futures_util::{SinkExt, StreamExt};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use std::time::Duration;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `/v1/subscribe?topic=..&<extra>` with the query values URL-encoded.
pub fn subscribe_path(topic: &str, extra: &[(&str, &str)]) -> String {
    let mut path = format!("/v1/subscribe?topic={}", encode(topic));
    for (k, v) in extra {
        path.push_str(&format!("&{k}={}", encode(v)));
    }
    path
}

pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A WebSocket subscriber; `url` is `ws://host:port/v1/subscribe?...`.
pub struct WsClient {
    ws: Ws,
    /// The close frame, once the server closed.
    pub closed: Option<Option<CloseFrame>>,
}

impl WsClient {
    pub async fn connect(url: &str) -> WsClient {
        let (ws, resp) = tokio::time::timeout(
            Duration::from_secs(15),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .unwrap_or_else(|_| panic!("connect {url}: timed out"))
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        WsClient { ws, closed: None }
    }

    /// Connects offering WebSocket `protocols` (a browser's only way to send a token); the
    /// handshake's error (e.g. a 401 problem) is returned, not a panic. The subprotocol the
    /// server selected comes with the client.
    pub async fn connect_offering(
        url: &str,
        protocols: &str,
    ) -> Result<(WsClient, Option<String>), tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.into_client_request()?;
        let value = protocols
            .parse()
            .unwrap_or_else(|e| panic!("protocols {protocols:?}: {e}"));
        req.headers_mut().insert("sec-websocket-protocol", value);
        let (ws, resp) = tokio::time::timeout(
            Duration::from_secs(15),
            tokio_tungstenite::connect_async(req),
        )
        .await
        .unwrap_or_else(|_| panic!("connect {url}: timed out"))?;
        let selected = resp
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        Ok((WsClient { ws, closed: None }, selected))
    }

    /// Connects over a socket with a small receive buffer, so a client that stops reading
    /// pushes back on the server after little data.
    pub async fn connect_small_buffer(url: &str, port: u16) -> WsClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("socket: {e}"));
        socket
            .set_recv_buffer_size(4096)
            .unwrap_or_else(|e| panic!("SO_RCVBUF: {e}"));
        let stream = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let (ws, resp) =
            tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
                .await
                .unwrap_or_else(|e| panic!("handshake {url}: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        WsClient { ws, closed: None }
    }

    /// The next event frame as JSON, or `None` at `deadline` or when the server closed.
    pub async fn next_until(&mut self, deadline: Instant) -> Option<Value> {
        while self.closed.is_none() {
            let msg = match timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) => {
                    self.closed = Some(None);
                    return None;
                }
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    return Some(
                        serde_json::from_str(t.as_str())
                            .unwrap_or_else(|e| panic!("frame is not JSON ({e}): {}", t.as_str())),
                    );
                }
                Message::Close(frame) => self.closed = Some(frame),
                _ => {}
            }
        }
        None
    }

    /// Up to `n` events within `wait`.
    pub async fn take(&mut self, n: usize, wait: Duration) -> Vec<Value> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n {
            match self.next_until(deadline).await {
                Some(v) => out.push(v),
                None => break,
            }
        }
        out
    }

    /// Events that arrive within `quiet` (to prove that nothing more comes).
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        self.take(usize::MAX, quiet).await
    }

    /// The `n` events expected (waiting up to `wait` for them), then whatever else arrives
    /// within `quiet`: for asserting that exactly those came.
    pub async fn take_settled(&mut self, n: usize, wait: Duration, quiet: Duration) -> Vec<Value> {
        let mut got = self.take(n, wait).await;
        got.extend(self.drain(quiet).await);
        got
    }

    pub async fn close(mut self) {
        let _ = self.ws.send(Message::Close(None)).await;
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {}", self.data))
    }
}

/// An SSE subscriber reading a streaming response.
pub struct SseClient {
    resp: reqwest::Response,
    buf: String,
    pub ended: bool,
    /// `: ...` comment lines seen (keep-alive pings).
    pub comments: usize,
}

impl SseClient {
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> SseClient {
        let mut req = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        Self::send(req, url).await
    }

    /// Subscribes with `Authorization: Bearer <token>`.
    pub async fn connect_with_token(url: &str, token: &str) -> SseClient {
        let req = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream")
            .bearer_auth(token);
        Self::send(req, url).await
    }

    async fn send(req: reqwest::RequestBuilder, url: &str) -> SseClient {
        let resp = tokio::time::timeout(Duration::from_secs(15), req.send())
            .await
            .unwrap_or_else(|_| panic!("GET {url}: timed out"))
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(resp.status().as_u16(), 200, "GET {url}");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        SseClient {
            resp,
            buf: String::new(),
            ended: false,
            comments: 0,
        }
    }

    /// The next event (comments skipped), or `None` at `deadline` or the end of the stream.
    pub async fn next_until(&mut self, deadline: Instant) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.parse_one() {
                return Some(event);
            }
            if self.ended {
                return None;
            }
            match timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => return None,
                Ok(Ok(Some(bytes))) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(_) => self.ended = true,
            }
        }
    }

    pub async fn take(&mut self, n: usize, wait: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n {
            match self.next_until(deadline).await {
                Some(e) => out.push(e),
                None => break,
            }
        }
        out
    }

    /// The `n` events expected (waiting up to `wait` for them), then whatever else arrives
    /// within `quiet`: for asserting that exactly those came.
    pub async fn take_settled(
        &mut self,
        n: usize,
        wait: Duration,
        quiet: Duration,
    ) -> Vec<SseEvent> {
        let mut got = self.take(n, wait).await;
        got.extend(self.take(usize::MAX, quiet).await);
        got
    }

    /// Reads until `n` comment lines (pings) have been seen in all, or `deadline`; returns
    /// the events that came meanwhile.
    pub async fn until_comments(&mut self, n: usize, deadline: Instant) -> Vec<SseEvent> {
        let mut events = Vec::new();
        loop {
            while let Some(event) = self.parse_one() {
                events.push(event);
            }
            if self.comments >= n || self.ended {
                return events;
            }
            match timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => return events,
                Ok(Ok(Some(bytes))) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Ok(_) => self.ended = true,
            }
        }
    }

    fn parse_one(&mut self) -> Option<SseEvent> {
        loop {
            let end = self.buf.find("\n\n")?;
            let block: String = self.buf.drain(..end + 2).collect();
            let mut event = SseEvent::default();
            let mut data = Vec::new();
            let mut any = false;
            for line in block.lines().filter(|l| !l.is_empty()) {
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                any = true;
                match field {
                    "id" => event.id = Some(value.to_string()),
                    "event" => event.event = Some(value.to_string()),
                    "data" => data.push(value.to_string()),
                    _ => {}
                }
            }
            if any {
                event.data = data.join("\n");
                return Some(event);
            }
        }
    }
}

/// Writes binary-mode CloudEvents straight to the broker: `(key, id, type, subject)`.
pub async fn produce_events(bootstrap: &str, topic: &str, events: &[(&str, &str, &str, &str)]) {
    produce_padded(bootstrap, topic, events, 0).await;
}

/// Like `produce_events`, returning where each event landed: `(partition, offset)`, in the
/// order given.
pub async fn produce_events_placed(
    bootstrap: &str,
    topic: &str,
    events: &[(&str, &str, &str, &str)],
) -> Vec<(i32, i64)> {
    produce_padded(bootstrap, topic, events, 0).await
}

/// Like `produce_events`, with `pad` filler bytes in each value (to fill socket buffers);
/// where each event landed, `(partition, offset)`, in the order given.
pub async fn produce_padded(
    bootstrap: &str,
    topic: &str,
    events: &[(&str, &str, &str, &str)],
    pad: usize,
) -> Vec<(i32, i64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap_or_else(|e| panic!("producer: {e}"));
    let mut pending = Vec::new();
    for (key, id, ty, subject) in events {
        let headers = OwnedHeaders::new()
            .insert(header("ce_specversion", "1.0"))
            .insert(header("ce_id", id))
            .insert(header("ce_source", "/test"))
            .insert(header("ce_type", ty))
            .insert(header("ce_subject", subject))
            .insert(header("content-type", "application/json"));
        let payload = format!(r#"{{"id":"{id}","pad":"{}"}}"#, "x".repeat(pad));
        let record = FutureRecord::to(topic)
            .key(*key)
            .payload(&payload)
            .headers(headers);
        match producer.send_result(record) {
            Ok(delivery) => pending.push(delivery),
            Err((e, _)) => panic!("enqueue {id}: {e}"),
        }
    }
    let mut placed = Vec::with_capacity(pending.len());
    for delivery in pending {
        match tokio::time::timeout(Duration::from_secs(30), delivery).await {
            Ok(Ok(Ok(delivered))) => placed.push((delivered.partition, delivered.offset)),
            other => panic!("delivery failed: {other:?}"),
        }
    }
    placed
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
