//! One raw HTTP/1.1 exchange over a TCP socket, for what an HTTP client library will not
//! send (chunked bodies of our choosing, lying lengths, bytes no client allows).

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` (head and body, as bytes) and reads the answer until its framing says it
/// is complete, or EOF. The request is written by a task of its own while the answer is
/// read: a server may answer (413) before the body is in and then close, so the write error
/// that follows is expected. `Err` carries what was read, for the failure message.
pub async fn exchange(port: u16, request: Vec<u8>, limit: Duration) -> Result<Response, String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect {port}: {e}"))?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        for piece in request.chunks(64 * 1024 + 16) {
            if wr.write_all(piece).await.is_err() {
                break;
            }
        }
        wr
    });
    let mut buf = Vec::new();
    // A server may keep the connection open a while after answering (Envoy's delayed
    // close), so the framing, not EOF, ends the read.
    let read = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return parse_response(&buf, true),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(resp) = parse_response(&buf, false) {
                return Some(resp);
            }
        }
    })
    .await;
    writer.abort();
    let shown = || String::from_utf8_lossy(&buf[..buf.len().min(300)]).into_owned();
    match read {
        Ok(Some(resp)) => Ok(resp),
        Ok(None) => Err(format!("not a complete HTTP response: {:?}", shown())),
        Err(_) => Err(format!(
            "no complete answer within {limit:?} (hung?): {:?}",
            shown()
        )),
    }
}

/// The response in `buf`, once complete by its framing (or, without framing, at `eof`).
pub fn parse_response(buf: &[u8], eof: bool) -> Option<Response> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &buf[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        match headers.iter().find(|(n, _)| n == "content-length") {
            Some((_, len)) => rest.get(..len.parse::<usize>().ok()?)?.to_vec(),
            None if eof => rest.to_vec(),
            None => return None,
        }
    };
    Some(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}
