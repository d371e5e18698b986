//! Transport: the dispatch client (HTTP/1.1 over TCP or a unix socket, as
//! `ngx_http_proxy_wasm_dispatch.c` writes it; failures mapped to `:dispatch_status` as in
//! `kong_semantics`), and the proxy to the services (buffered for routes with a filter
//! chain, streamed with WebSocket upgrades for the others).

use crate::kong_semantics::{Answer, Dispatch, Resp, Shared, Target};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::timeout;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

fn failed(token: u32, why: &'static str) -> Answer {
    Answer {
        token,
        status: None,
        headers: Vec::new(),
        body: Vec::new(),
        dispatch_status: why,
    }
}

/// Sends one dispatch and reads its answer; every failure is an `Answer` without status.
pub async fn dispatch(shared: &Shared, call: Dispatch) -> Answer {
    let token = call.token;
    let t = call.timeout;
    if call.tls {
        // No TLS stack in this host (assumption in kong_semantics).
        return failed(token, "tls handshake failure");
    }
    let connect_limit = if t.is_zero() {
        shared.conf.socket_connect_timeout
    } else {
        t
    };
    let mut conn: Box<dyn Conn> = match &call.target {
        Target::Addr(a) => match timeout(connect_limit, TcpStream::connect(a)).await {
            Err(_) => return failed(token, "timeout"),
            Ok(Err(_)) => return failed(token, "broken connection"),
            Ok(Ok(s)) => Box::new(s),
        },
        Target::Unix(p) => match timeout(connect_limit, UnixStream::connect(p)).await {
            Err(_) => return failed(token, "timeout"),
            Ok(Err(_)) => return failed(token, "broken connection"),
            Ok(Ok(s)) => Box::new(s),
        },
        Target::Name(host, port) => {
            let addrs = match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(a) => a.collect::<Vec<_>>(),
                Err(_) => Vec::new(),
            };
            let Some(addr) = addrs.first() else {
                return failed(token, "resolver failure");
            };
            match timeout(connect_limit, TcpStream::connect(addr)).await {
                Err(_) => return failed(token, "timeout"),
                Ok(Err(_)) => return failed(token, "broken connection"),
                Ok(Ok(s)) => Box::new(s),
            }
        }
    };
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        call.method, call.path, call.authority
    )
    .into_bytes();
    if !call
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        head.extend_from_slice(format!("Content-Length: {}\r\n", call.body.len()).as_bytes());
    }
    for (n, v) in &call.headers {
        head.extend_from_slice(n.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(&call.body);
    match timeout(t, conn.write_all(&head)).await {
        Err(_) => return failed(token, "timeout"),
        Ok(Err(_)) => return failed(token, "broken connection"),
        Ok(Ok(())) => {}
    }
    // Read until the server closes (Connection: close) or the framing says it is complete.
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16384];
    loop {
        match parse_response(&buf) {
            Parsed::Done(a) => return Answer { token, ..a },
            Parsed::Bad => return failed(token, "reader failure"),
            Parsed::More => {}
        }
        match timeout(t, conn.read(&mut chunk)).await {
            Err(_) => return failed(token, "timeout"),
            Ok(Err(_)) => return failed(token, "broken connection"),
            Ok(Ok(0)) => {
                return match parse_response_at_eof(&buf) {
                    Some(a) => Answer { token, ..a },
                    None => failed(token, "broken connection"),
                };
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

enum Parsed {
    Done(Answer),
    More,
    Bad,
}

/// A response head: its length, status and headers.
type Head = (usize, u16, Vec<(String, Vec<u8>)>);

fn head(buf: &[u8]) -> Result<Option<Head>, ()> {
    let mut hs = [httparse::EMPTY_HEADER; 128];
    let mut r = httparse::Response::new(&mut hs);
    match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let headers = r
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect();
            Ok(Some((n, r.code.unwrap_or(0), headers)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(()),
    }
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

fn answer(status: u16, headers: Vec<(String, Vec<u8>)>, body: Vec<u8>) -> Answer {
    Answer {
        token: 0,
        status: Some(status),
        headers,
        body,
        dispatch_status: "ok",
    }
}

/// A chunked body: `Some((body, complete))`, `None` if malformed.
fn dechunk(mut b: &[u8]) -> Option<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return Some((out, false));
        };
        let size_text = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some((out, b.windows(2).any(|w| w == b"\r\n")));
        }
        if b.len() < size + 2 {
            return Some((out, false));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn parse_response(buf: &[u8]) -> Parsed {
    let (n, status, headers) = match head(buf) {
        Err(()) => return Parsed::Bad,
        Ok(None) => return Parsed::More,
        Ok(Some(h)) => h,
    };
    let rest = &buf[n..];
    if let Some(cl) = header(&headers, "content-length") {
        let Some(len) = std::str::from_utf8(cl)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
        else {
            return Parsed::Bad;
        };
        if rest.len() >= len {
            return Parsed::Done(answer(status, headers, rest[..len].to_vec()));
        }
        return Parsed::More;
    }
    if header(&headers, "transfer-encoding").is_some() {
        return match dechunk(rest) {
            None => Parsed::Bad,
            Some((body, true)) => Parsed::Done(answer(status, headers, body)),
            Some((_, false)) => Parsed::More,
        };
    }
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return Parsed::Done(answer(status, headers, Vec::new()));
    }
    Parsed::More
}

/// At EOF a response without framing ends its body.
fn parse_response_at_eof(buf: &[u8]) -> Option<Answer> {
    let (n, status, headers) = head(buf).ok()??;
    if header(&headers, "content-length").is_some()
        || header(&headers, "transfer-encoding").is_some()
    {
        return None;
    }
    Some(answer(status, headers, buf[n..].to_vec()))
}

/// Headers that are the connection's, not the message's.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Where and how a request goes upstream.
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub path: String,
    pub preserve_host: bool,
    pub client_ip: String,
    pub listen_port: u16,
    pub original_path: String,
}

/// The headers Kong adds towards the upstream (Host, X-Forwarded-*, X-Real-IP).
fn upstream_headers(up: &Upstream, headers: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let client_host = header(headers, "host").map(|h| String::from_utf8_lossy(h).into_owned());
    let mut out: Vec<(String, Vec<u8>)> = headers
        .iter()
        .filter(|(n, _)| {
            !hop_by_hop(n)
                && !n.eq_ignore_ascii_case("host")
                && !n.eq_ignore_ascii_case("content-length")
        })
        .filter(|(n, _)| {
            !n.to_ascii_lowercase().starts_with("x-forwarded-")
                && !n.eq_ignore_ascii_case("x-real-ip")
        })
        .cloned()
        .collect();
    let host = match (&client_host, up.preserve_host) {
        (Some(h), true) => h.clone(),
        _ if up.port == 80 => up.host.clone(),
        _ => format!("{}:{}", up.host, up.port),
    };
    out.insert(0, ("host".into(), host.into_bytes()));
    let xff = match header(headers, "x-forwarded-for") {
        Some(prev) => format!("{}, {}", String::from_utf8_lossy(prev), up.client_ip),
        None => up.client_ip.clone(),
    };
    let fwd_host = client_host
        .as_deref()
        .map(|h| h.split(':').next().unwrap_or(h).to_string())
        .unwrap_or_default();
    let path_only = up
        .original_path
        .split('?')
        .next()
        .unwrap_or("/")
        .to_string();
    for (n, v) in [
        ("x-forwarded-for", xff),
        ("x-forwarded-proto", "http".to_string()),
        ("x-forwarded-host", fwd_host),
        ("x-forwarded-port", up.listen_port.to_string()),
        ("x-forwarded-path", path_only),
        ("x-real-ip", up.client_ip.clone()),
    ] {
        out.push((n.to_string(), v.into_bytes()));
    }
    out
}

fn build_request<B>(
    method: &str,
    up: &Upstream,
    headers: Vec<(String, Vec<u8>)>,
    body: B,
) -> Option<Request<B>> {
    let mut b = Request::builder().method(method).uri(up.path.as_str());
    for (n, v) in headers {
        b = b.header(n, v);
    }
    b.body(body).ok()
}

/// Routes with a filter chain: the whole (possibly changed) request, buffered answer.
pub async fn proxy_buffered(
    up: &Upstream,
    method: &str,
    headers: &[(String, Vec<u8>)],
    body: Vec<u8>,
) -> Resp {
    let mut hs = upstream_headers(up, headers);
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        hs.push(("content-length".into(), body.len().to_string().into_bytes()));
    }
    let Some(req) = build_request(method, up, hs, Full::new(Bytes::from(body))) else {
        return bad_gateway();
    };
    let Ok(stream) = TcpStream::connect((up.host.as_str(), up.port)).await else {
        return bad_gateway();
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return bad_gateway();
    };
    tokio::spawn(conn);
    let Ok(resp) = sender.send_request(req).await else {
        return bad_gateway();
    };
    let (parts, body) = resp.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return bad_gateway();
    };
    Resp {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .filter(|(n, _)| !hop_by_hop(n.as_str()) && n.as_str() != "content-length")
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: body.to_vec(),
    }
}

pub fn bad_gateway() -> Resp {
    crate::kong_semantics::kong_error(
        502,
        "An invalid response was received from the upstream server",
    )
}

pub fn to_response(resp: Resp) -> Response<Body> {
    let mut b = Response::builder().status(resp.status);
    for (n, v) in &resp.headers {
        if n.starts_with(':') || hop_by_hop(n) || n.eq_ignore_ascii_case("content-length") {
            continue;
        }
        b = b.header(n.as_str(), v.as_slice());
    }
    b.body(full(resp.body))
        .unwrap_or_else(|_| Response::new(full(Bytes::from_static(b"bad response\n"))))
}

/// Routes without a filter chain: streamed both ways, WebSocket upgrades included.
pub async fn proxy_stream(up: &Upstream, mut req: Request<Incoming>) -> Response<Body> {
    let upgrade = req.headers().get("upgrade").cloned();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let method = req.method().as_str().to_string();
    let headers: Vec<(String, Vec<u8>)> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    let mut hs = upstream_headers(up, &headers);
    if let Some(cl) = header(&headers, "content-length") {
        hs.push(("content-length".into(), cl.to_vec()));
    } else if let Some(te) = header(&headers, "transfer-encoding") {
        hs.push(("transfer-encoding".into(), te.to_vec()));
    }
    if let Some(u) = &upgrade {
        hs.push(("connection".into(), b"upgrade".to_vec()));
        hs.push(("upgrade".into(), u.as_bytes().to_vec()));
    }
    let body = req.into_body();
    let Some(out) = build_request(&method, up, hs, body) else {
        return to_response(bad_gateway());
    };
    let Ok(stream) = TcpStream::connect((up.host.as_str(), up.port)).await else {
        return to_response(bad_gateway());
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return to_response(bad_gateway());
    };
    tokio::spawn(conn.with_upgrades());
    let Ok(mut resp) = sender.send_request(out).await else {
        return to_response(bad_gateway());
    };
    if resp.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
            });
        }
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, full(Bytes::new()));
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove("connection");
    parts.headers.remove("keep-alive");
    Response::from_parts(parts, body.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_by_their_framing() {
        let done = |b: &[u8]| match parse_response(b) {
            Parsed::Done(a) => (a.status, a.body),
            Parsed::More => panic!("incomplete: {}", String::from_utf8_lossy(b)),
            Parsed::Bad => panic!("bad: {}", String::from_utf8_lossy(b)),
        };
        assert_eq!(
            done(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}"),
            (Some(202), b"{}".to_vec())
        );
        assert_eq!(
            done(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            (Some(200), b"abc".to_vec())
        );
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab"),
            Parsed::More
        ));
        assert!(matches!(parse_response(b"garbage\r\n\r\n"), Parsed::Bad));
        let eof = parse_response_at_eof(b"HTTP/1.1 200 OK\r\n\r\nuntil close");
        assert_eq!(eof.map(|a| a.body), Some(b"until close".to_vec()));
    }
}
