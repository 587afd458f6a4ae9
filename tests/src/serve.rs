//! `ambient-lab serve`: the pods' test servers.
//!
//! - On `--port` (9080): each connection first gets one line naming both ends as the server
//!   sees them, then an echo of whatever arrives until EOF, so the same server answers
//!   one-shot probes and long-lived streams.
//! - On `--http-port` (8080), when given: HTTP/1.1 (keep-alive, chunked) and HTTP/2 with
//!   prior knowledge (h2c) on the same port. Every answer is an [`EchoReply`] in JSON saying
//!   what the server saw (see [`Query`] for the behaviours chosen by query parameters); an
//!   HTTP/1.1 upgrade to `echo` is answered 101 and then echoes raw bytes until EOF.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// The greeting for a connection: `server=<local ip:port> client=<peer ip:port>`.
pub fn greeting(local: SocketAddr, peer: SocketAddr) -> String {
    format!("server={local} client={peer}\n")
}

/// Parses a greeting back into (server, client).
pub fn parse_greeting(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut server = None;
    let mut client = None;
    for field in line.split_whitespace() {
        if let Some(v) = field.strip_prefix("server=") {
            server = v.parse().ok();
        } else if let Some(v) = field.strip_prefix("client=") {
            client = v.parse().ok();
        }
    }
    Some((server?, client?))
}

/// What `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The greeting + echo server's port.
    pub port: u16,
    /// The HTTP server's port (none: no HTTP server).
    pub http_port: Option<u16>,
    /// Reported as `pod` in every HTTP answer (the lab passes the pod id, `a-reviews-v1`).
    pub name: String,
    /// Reported as `version` (`v1`, `v2`, ...).
    pub version: String,
    /// Also listen on `[::]` (v6 only, so v4 peers keep their plain addresses in the
    /// greeting): the lab's ipv6 and dual pods.
    pub ipv6: bool,
}

/// The listeners of one port: 0.0.0.0 and, with `ipv6`, `[::]` with IPV6_V6ONLY (Linux'
/// default `bindv6only=0` would otherwise make the second bind clash with the first).
async fn bind_all(port: u16, ipv6: bool) -> Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    let mut addrs = vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
    if ipv6 {
        addrs.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
    for ip in addrs {
        let addr = SocketAddr::new(ip, port);
        let socket = if ip.is_ipv6() {
            let s = tokio::net::TcpSocket::new_v6()?;
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6V6Only, &true)
                .with_context(|| format!("IPV6_V6ONLY for {addr}"))?;
            s
        } else {
            tokio::net::TcpSocket::new_v4()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr).with_context(|| format!("bind {addr}"))?;
        out.push(
            socket
                .listen(1024)
                .with_context(|| format!("listen {addr}"))?,
        );
    }
    Ok(out)
}

pub fn run(opts: &ServeOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async {
        let mut http = Vec::new();
        if let Some(port) = opts.http_port {
            let ctx = HttpContext::new(&opts.name, &opts.version);
            for listener in bind_all(port, opts.ipv6).await? {
                eprintln!("serve: HTTP (h1, h2c) on {}", listener.local_addr()?);
                http.push(tokio::spawn(serve_http(listener, ctx.clone())));
            }
        }
        let mut echo = Vec::new();
        for listener in bind_all(opts.port, opts.ipv6).await? {
            eprintln!("serve: listening on {}", listener.local_addr()?);
            echo.push(tokio::spawn(serve(listener)));
        }
        // The accept loops only end on a panic; the first to end ends the server.
        let (done, _, rest) = futures::future::select_all(echo).await;
        rest.iter().for_each(|h| h.abort());
        http.iter().for_each(|h| h.abort());
        done.context("echo server task")?
    })
}

async fn serve(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("serve: accept: {e}");
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = handle(stream, peer).await {
                eprintln!("serve: {peer}: {e}");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr()?;
    stream.write_all(greeting(local, peer).as_bytes()).await?;
    let (mut rd, mut wr) = stream.split();
    tokio::io::copy(&mut rd, &mut wr).await?;
    wr.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// The HTTP server.

/// The JSON body of every HTTP answer (camelCase): what the server saw of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EchoReply {
    /// The serving pod (`--name`).
    pub pod: String,
    /// `--version`.
    pub version: String,
    pub method: String,
    /// Path and query as received: `/x?y=1`.
    pub path: String,
    /// Request headers: lowercase names, repeated headers joined with `", "`.
    pub headers: BTreeMap<String, String>,
    /// The TCP peer as the server saw it (`ip:port`).
    pub peer: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: String,
    /// Bytes of request body received.
    pub body_bytes: u64,
    /// FNV-1a 64 of the request body, 16 lowercase hex digits.
    pub body_fnv64: String,
    /// Set on a 400 (a bad query parameter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl EchoReply {
    /// The peer as an address (`None` when it does not parse).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.parse().ok()
    }
}

/// The behaviours a request selects with query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// `status=503`: answer with this status (the body is still the JSON).
    pub status: Option<u16>,
    /// `delay_ms=N`: wait N ms (after reading the request body) before answering.
    pub delay_ms: Option<u64>,
    /// `bytes=N`: answer with N bytes of [`pattern`] instead of JSON, streamed, with their
    /// FNV-1a 64 in the response header [`BODY_FNV_HEADER`].
    pub bytes: Option<u64>,
    /// `set_header=name:value` (repeatable, percent-decoded): extra response headers.
    pub set_headers: Vec<(String, String)>,
}

/// The response header that carries the FNV-1a 64 (hex) of a `?bytes=N` body.
pub const BODY_FNV_HEADER: &str = "x-body-fnv64";

/// Parses the query string (without `?`). Unknown parameters are ignored (a test may add
/// its own to tell requests apart); malformed known ones are errors.
pub fn parse_query(q: &str) -> Result<Query, String> {
    let mut out = Query::default();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k);
        let v = percent_decode(v);
        let num = |what: &str| -> Result<u64, String> {
            v.parse()
                .map_err(|_| format!("{what}={v:?}: not a non-negative integer"))
        };
        match k.as_str() {
            "status" => {
                let code = num("status")?;
                if !(100..=999).contains(&code) || (100..200).contains(&code) {
                    return Err(format!("status={code}: use 200-999"));
                }
                out.status = Some(code as u16);
            }
            "delay_ms" => out.delay_ms = Some(num("delay_ms")?),
            "bytes" => out.bytes = Some(num("bytes")?),
            "set_header" => {
                let (name, value) = v
                    .split_once(':')
                    .ok_or_else(|| format!("set_header={v:?}: use name:value"))?;
                let name = name.trim().to_ascii_lowercase();
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("set_header: bad header name {name:?}"))?;
                HeaderValue::from_str(value.trim())
                    .map_err(|_| format!("set_header: bad header value {value:?}"))?;
                out.set_headers.push((name, value.trim().to_string()));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// `%XX` and `+` decoding (lossy on invalid UTF-8).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// FNV-1a 64, streaming.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(pub u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// 16 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }

    pub fn of(data: &[u8]) -> Fnv64 {
        let mut h = Fnv64::default();
        h.update(data);
        h
    }
}

/// The deterministic body pattern of `?bytes=N` (and of the harness's generated request
/// bodies): byte `i` is `i % 251`, so a lost or repeated block of any power-of-two size shows.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    let mut v = (offset % 251) as u8;
    for b in buf {
        *b = v;
        v = if v == 250 { 0 } else { v + 1 };
    }
}

/// FNV-1a 64 of the first `n` bytes of [`pattern`].
pub fn pattern_fnv64(n: u64) -> Fnv64 {
    let mut h = Fnv64::default();
    let mut buf = vec![0u8; PATTERN_CHUNK];
    let mut off = 0u64;
    while off < n {
        let len = (n - off).min(PATTERN_CHUNK as u64) as usize;
        pattern(off, &mut buf[..len]);
        h.update(&buf[..len]);
        off += len as u64;
    }
    h
}

/// Chunk size of generated bodies.
pub const PATTERN_CHUNK: usize = 64 << 10;

/// A body of `n` pattern bytes, generated chunk by chunk (never held whole).
pub fn pattern_body(n: u64) -> BoxBody<Bytes, std::io::Error> {
    let chunks = futures::stream::unfold(0u64, move |off| async move {
        if off >= n {
            return None;
        }
        let len = (n - off).min(PATTERN_CHUNK as u64) as usize;
        let mut buf = vec![0u8; len];
        pattern(off, &mut buf);
        Some((
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(buf))),
            off + len as u64,
        ))
    });
    StreamBody::new(chunks).boxed()
}

/// Who the HTTP server says it is.
#[derive(Debug, Clone)]
pub struct HttpContext {
    pub name: String,
    pub version: String,
}

impl HttpContext {
    pub fn new(name: &str, version: &str) -> Arc<HttpContext> {
        Arc::new(HttpContext {
            name: name.to_string(),
            version: version.to_string(),
        })
    }
}

/// Accepts HTTP connections on `listener` forever (h1 and h2c, upgrades allowed).
pub async fn serve_http(listener: TcpListener, ctx: Arc<HttpContext>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("serve: http accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let svc = hyper::service::service_fn(move |req| answer(req, ctx.clone(), peer));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("serve: http {peer}: {e}");
            }
        });
    }
}

type RespBody = BoxBody<Bytes, std::io::Error>;

fn full(data: impl Into<Bytes>) -> RespBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// The request headers as [`EchoReply::headers`] has them.
pub fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_ascii_lowercase())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    out
}

fn wants_echo_upgrade(req: &Request<Incoming>) -> bool {
    let has_token = |name: http::header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    req.version() == http::Version::HTTP_11
        && has_token(http::header::CONNECTION, "upgrade")
        && has_token(http::header::UPGRADE, "echo")
}

async fn answer(
    mut req: Request<Incoming>,
    ctx: Arc<HttpContext>,
    peer: SocketAddr,
) -> Result<Response<RespBody>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut reply = EchoReply {
        pod: ctx.name.clone(),
        version: ctx.version.clone(),
        method: req.method().as_str().to_string(),
        path,
        headers: header_map(req.headers()),
        peer: peer.to_string(),
        protocol: format!("{:?}", req.version()),
        body_bytes: 0,
        body_fnv64: Fnv64::default().hex(),
        error: None,
    };
    if wants_echo_upgrade(&req) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            match upgrade.await {
                Ok(up) => {
                    let (mut rd, mut wr) = tokio::io::split(TokioIo::new(up));
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    let _ = wr.shutdown().await;
                }
                Err(e) => eprintln!("serve: upgrade from {peer}: {e}"),
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, "echo")
            .body(full(Bytes::new()))
            .expect("static response");
        return Ok(resp);
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    // The body, streamed: counted and hashed, never kept.
    let mut body = req.into_body();
    let mut hash = Fnv64::default();
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(data) = f.data_ref() {
                    hash.update(data);
                    reply.body_bytes += data.len() as u64;
                }
            }
            Err(e) => {
                body_error = Some(format!("reading the request body: {e}"));
                break;
            }
        }
    }
    reply.body_fnv64 = hash.hex();
    let query = match (query, body_error) {
        (Ok(q), None) => q,
        (Err(e), _) | (_, Some(e)) => {
            reply.error = Some(e);
            return Ok(json_response(StatusCode::BAD_REQUEST, &reply, &[]));
        }
    };
    if let Some(ms) = query.delay_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = query
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    if let Some(n) = query.bytes {
        let fnv = tokio::task::spawn_blocking(move || pattern_fnv64(n))
            .await
            .unwrap_or_default();
        let mut resp = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .header(http::header::CONTENT_LENGTH, n)
            .header(BODY_FNV_HEADER, fnv.hex());
        for (k, v) in &query.set_headers {
            resp = resp.header(k.as_str(), v.as_str());
        }
        return Ok(resp
            .body(pattern_body(n))
            .unwrap_or_else(|_| Response::new(full("bad response\n"))));
    }
    Ok(json_response(status, &reply, &query.set_headers))
}

fn json_response(
    status: StatusCode,
    reply: &EchoReply,
    extra: &[(String, String)],
) -> Response<RespBody> {
    let mut body = serde_json::to_vec(reply).unwrap_or_default();
    body.push(b'\n');
    let mut resp = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json");
    for (k, v) in extra {
        resp = resp.header(k.as_str(), v.as_str());
    }
    resp.body(full(body))
        .unwrap_or_else(|_| Response::new(full("bad response\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trip() {
        let s: SocketAddr = "10.244.2.3:9080".parse().unwrap();
        let c: SocketAddr = "10.244.1.4:41234".parse().unwrap();
        let line = greeting(s, c);
        assert_eq!(line, "server=10.244.2.3:9080 client=10.244.1.4:41234\n");
        assert_eq!(parse_greeting(&line), Some((s, c)));
        assert_eq!(parse_greeting("hello"), None);
    }

    #[test]
    fn query_parameters() {
        assert_eq!(parse_query("").unwrap(), Query::default());
        let q = parse_query("status=503&delay_ms=20&bytes=1000&set_header=x-a:b%20c&x=1").unwrap();
        assert_eq!(q.status, Some(503));
        assert_eq!(q.delay_ms, Some(20));
        assert_eq!(q.bytes, Some(1000));
        assert_eq!(q.set_headers, [("x-a".to_string(), "b c".to_string())]);
        let q = parse_query("set_header=X-One:1&set_header=x-two%3A2").unwrap();
        assert_eq!(
            q.set_headers,
            [("x-one".into(), "1".into()), ("x-two".into(), "2".into())]
        );
        for bad in [
            "status=abc",
            "status=99",
            "status=101",
            "delay_ms=-1",
            "bytes=1e3",
            "set_header=novalue",
            "set_header=bad%20name:1",
        ] {
            assert!(parse_query(bad).is_err(), "{bad} must be refused");
        }
        assert_eq!(percent_decode("a%2Fb+c%zz%4"), "a/b c%zz%4");
    }

    #[test]
    fn reply_json_shape() {
        let r = EchoReply {
            pod: "a-reviews-v1".into(),
            version: "v1".into(),
            method: "GET".into(),
            path: "/x?y=1".into(),
            headers: [("x-a".to_string(), "1, 2".to_string())].into(),
            peer: "10.244.2.7:40000".into(),
            protocol: "HTTP/1.1".into(),
            body_bytes: 0,
            body_fnv64: Fnv64::default().hex(),
            error: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = vec![
            "pod",
            "version",
            "method",
            "path",
            "headers",
            "peer",
            "protocol",
            "bodyBytes",
            "bodyFnv64",
        ];
        want.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(v["headers"]["x-a"], "1, 2");
        assert_eq!(v["bodyFnv64"], "cbf29ce484222325");
        assert_eq!(r.peer_addr(), Some("10.244.2.7:40000".parse().unwrap()));
        let back: EchoReply = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn headers_lowercased_and_joined() {
        let mut h = HeaderMap::new();
        h.append("X-Multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        h.append("Host", HeaderValue::from_static("reviews"));
        let m = header_map(&h);
        assert_eq!(m["x-multi"], "a, b");
        assert_eq!(m["host"], "reviews");
    }

    #[test]
    fn fnv_and_pattern() {
        assert_eq!(Fnv64::of(b"").hex(), "cbf29ce484222325");
        assert_eq!(Fnv64::of(b"a").hex(), "af63dc4c8601ec8c");
        assert_eq!(Fnv64::of(b"foobar").hex(), "85944171f73967e8");
        let n = PATTERN_CHUNK as u64 * 2 + 1234;
        let mut all = vec![0u8; n as usize];
        pattern(0, &mut all);
        assert_eq!(all[250], 250);
        assert_eq!(all[251], 0);
        let mut tail = vec![0u8; 1000];
        pattern(n - 1000, &mut tail);
        assert_eq!(&all[(n - 1000) as usize..], &tail[..]);
        assert_eq!(pattern_fnv64(n).hex(), Fnv64::of(&all).hex());
    }

    /// The HTTP server over h1 (keep-alive, content-length and chunked bodies, every query
    /// behaviour, the upgrade) and h2c, with hyper's clients.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_server_over_h1_and_h2c() {
        use crate::http::{h2c_on, http1_on, upgrade_echo, HttpRequest};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_http(listener, HttpContext::new("a-reviews-v1", "v1")));

        let big = 300_000u64;
        let reqs = [
            HttpRequest::get("/x?y=1")
                .header("x-multi", "a")
                .header("x-multi", "b"),
            HttpRequest::post("/post", b"hello".to_vec()),
            HttpRequest::post_pattern("/chunked", big),
            HttpRequest::get("/s?status=503&set_header=x-test:yes"),
            HttpRequest::get(&format!("/b?bytes={big}")),
            HttpRequest::get("/bad?status=nope"),
        ];
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let client_port = stream.local_addr().unwrap().port();
        let r = http1_on(stream, addr, &reqs).await.unwrap();
        assert_eq!(r.len(), reqs.len());
        let e: Vec<_> = r.iter().map(|x| x.echo().ok()).collect();
        let first = e[0].as_ref().unwrap();
        assert_eq!(r[0].status, 200);
        assert_eq!(r[0].version, "HTTP/1.1");
        assert_eq!(first.pod, "a-reviews-v1");
        assert_eq!(first.version, "v1");
        assert_eq!(first.method, "GET");
        assert_eq!(first.path, "/x?y=1");
        assert_eq!(first.protocol, "HTTP/1.1");
        assert_eq!(first.headers["x-multi"], "a, b");
        assert_eq!(first.headers["host"], addr.to_string());
        assert_eq!(first.peer_addr().unwrap().port(), client_port);
        // Keep-alive: every request came over the same connection.
        for x in e.iter().flatten() {
            assert_eq!(x.peer, first.peer, "a new connection was opened");
        }
        let post = e[1].as_ref().unwrap();
        assert_eq!(post.method, "POST");
        assert_eq!(post.body_bytes, 5);
        assert_eq!(post.body_fnv64, Fnv64::of(b"hello").hex());
        let chunked = e[2].as_ref().unwrap();
        assert_eq!(chunked.body_bytes, big);
        assert_eq!(chunked.body_fnv64, pattern_fnv64(big).hex());
        assert_eq!(chunked.headers["transfer-encoding"], "chunked");
        assert_eq!(r[3].status, 503);
        assert_eq!(r[3].header("x-test"), Some("yes"));
        assert_eq!(
            e[3].as_ref().unwrap().path,
            "/s?status=503&set_header=x-test:yes"
        );
        assert_eq!(r[4].status, 200);
        assert_eq!(r[4].body_len, big);
        assert_eq!(
            r[4].header(BODY_FNV_HEADER),
            Some(pattern_fnv64(big).hex().as_str())
        );
        assert_eq!(r[4].body_fnv64, pattern_fnv64(big).hex());
        assert_eq!(r[5].status, 400);
        assert!(e[5]
            .as_ref()
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .contains("status"));

        // h2c: concurrent streams on one connection; the delayed one does not hold up the rest.
        let reqs = [
            HttpRequest::get("/slow?delay_ms=300"),
            HttpRequest::post_pattern("/up", big),
            HttpRequest::get("/fast").authority("reviews.demo.svc.cluster.local"),
        ];
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let r = h2c_on(stream, addr, &reqs).await.unwrap();
        let e: Vec<EchoReply> = r.iter().map(|x| x.echo().unwrap()).collect();
        assert!(r.iter().all(|x| x.status == 200 && x.version == "HTTP/2.0"));
        assert!(e
            .iter()
            .all(|x| x.protocol == "HTTP/2.0" && x.peer == e[0].peer));
        assert_eq!(e[0].path, "/slow?delay_ms=300");
        assert!(r[0].elapsed >= Duration::from_millis(300));
        assert!(
            r[2].elapsed < Duration::from_millis(300),
            "{:?}",
            r[2].elapsed
        );
        assert_eq!(e[1].body_fnv64, pattern_fnv64(big).hex());
        assert_eq!(
            e[2].headers.get("host"),
            None,
            "h2 has :authority, not host"
        );

        // Upgrade: 101, then raw echo until EOF.
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8).collect();
        let p = payload.clone();
        let (status, echoed) = tokio::task::spawn_blocking(move || {
            upgrade_echo(addr, "/echo", None, &p, Duration::from_secs(5))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(status, 101);
        assert!(
            echoed == payload,
            "echo differs ({} bytes back)",
            echoed.len()
        );
    }
}
