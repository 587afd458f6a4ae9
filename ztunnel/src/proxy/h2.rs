//! HTTP/2 settings of HBONE and the relays between a TCP socket and a CONNECT stream (or
//! another TCP socket).
//!
//! The relays move `Bytes` without copying them in user space: a TCP read lands in a buffer
//! that is frozen and handed to h2 as is; h2 data frames are written to the socket as they
//! come. Flow control gives the backpressure: capacity is released to the peer only once the
//! data has been written out. Read buffers are taken when the socket is readable, start small
//! and grow while reads fill them, so an idle connection holds none and a bulk one makes few
//! syscalls.

use std::io;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use futures::future::poll_fn;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;

/// Per-stream flow-control window.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest frame we accept.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams a server lets one connection carry at once.
pub const SERVER_MAX_STREAMS: u32 = 1000;

const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;

/// How glibc manages the data plane's memory, set once at start (before threads exist).
///
/// Reads (up to [`MAX_READ`]) and frames (up to [`MAX_FRAME`]) are allocated and freed at a
/// high rate. By default glibc serves allocations above its mmap threshold with new mappings
/// and gives free memory at the top of a heap back above its trim threshold (both 128 KiB,
/// adjusted only by freeing a mapping), so each buffer was zero-filled pages faulted in anew:
/// page faults and page clearing took about an eighth of ztunnel's CPU in a bulk transfer
/// (`ambient-lab bench`: one stream ~4.5 -> ~6 Gbit/s once gone). Allocations up to 4 MiB now
/// come from the heap and up to 8 MiB of free heap is kept while busy; a background thread
/// gives free pages back every [`TRIM_EVERY`] (`malloc_trim`), so what a burst of traffic
/// allocated does not stay resident: with 1000 open connections after bulk transfers RSS grew
/// run after run (~24 -> ~40 MB with the default policy), and stays near ~20 MB this way.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's allocation thresholds.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        }
        let trimmer = std::thread::Builder::new()
            .name("ztunnel-trim".into())
            .stack_size(64 * 1024)
            .spawn(|| loop {
                std::thread::sleep(TRIM_EVERY);
                // SAFETY: malloc_trim is thread-safe and only returns free pages.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        if let Err(e) = trimmer {
            tracing::warn!("no memory trimming thread: {e}");
        }
    }
}

/// How often free heap memory is given back to the kernel.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_READ * 4)
        .enable_push(false);
    b
}

pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_READ * 4)
        .max_concurrent_streams(SERVER_MAX_STREAMS);
    b
}

/// One CONNECT tunnel: our sending half and the peer's.
pub struct H2Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

/// What a CONNECT asks for: `:authority` and extra headers (`forwarded`, …).
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub authority: std::net::SocketAddr,
    pub headers: http::HeaderMap,
}

impl ConnectRequest {
    /// `:authority` as `ip:port` or `[ipv6]:port` (RFC 3986 §3.2.2), without an IPv6 scope id.
    pub fn authority_text(&self) -> String {
        std::net::SocketAddr::new(self.authority.ip(), self.authority.port()).to_string()
    }

    pub fn build(&self) -> http::Request<()> {
        let mut req = http::Request::new(());
        *req.method_mut() = http::Method::CONNECT;
        *req.uri_mut() = http::Uri::builder()
            .authority(self.authority_text())
            .build()
            .expect("a socket address is a valid authority");
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Bytes moved by a relay, counted even when it ends in an error.
#[derive(Debug)]
pub struct Relayed {
    /// From the local TCP socket to the tunnel (or from `a` to `b`).
    pub up: u64,
    /// From the tunnel (or `b`) to the local TCP socket (or `a`).
    pub down: u64,
    pub result: io::Result<()>,
}

pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 i/o"));
    }
    io::Error::other(e)
}

/// A read buffer that grows while reads fill it. It is taken only once the socket is
/// readable and given up after a read that did not fill it, so a connection waiting for data
/// holds no buffer (1000 idle connections held 16 KiB each, both ways), while a bulk transfer
/// keeps reusing one.
struct Growing {
    buf: BytesMut,
    want: usize,
}

impl Growing {
    fn new() -> Self {
        Growing {
            buf: BytesMut::new(),
            want: MIN_READ,
        }
    }

    /// Reads once; `None` at EOF.
    async fn read(&mut self, r: &mut ReadHalf<'_>) -> io::Result<Option<Bytes>> {
        loop {
            r.as_ref().readable().await?;
            self.buf.reserve(self.want);
            let room = self.buf.capacity() - self.buf.len();
            // try_read: readiness is given up only at EAGAIN. poll_read also gives it up after
            // a short read, taken as "drained"; a relay once stalled that way for good with
            // 6 MB queued on its upstream socket (the peer then blocked, its window closed,
            // and no new data came to raise readiness again), ~1 transfer in 10 under load.
            let n = match r.as_ref().try_read_buf(&mut self.buf) {
                Ok(n) => n,
                // Drained: wait for the next data without holding a buffer.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.buf = BytesMut::new();
                    continue;
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
            let data = self.buf.split().freeze();
            if n >= room {
                if self.want < MAX_READ {
                    self.want *= 2;
                }
            } else {
                // Not a bulk transfer (or its end): let the rest of the buffer go.
                self.buf = BytesMut::new();
            }
            return Ok(Some(data));
        }
    }
}

async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(h2_io(e)),
            None => return Err(io::ErrorKind::BrokenPipe.into()),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, false).map_err(h2_io)?;
    }
    Ok(())
}

/// TCP → tunnel until EOF, then END_STREAM.
async fn tcp_to_h2(
    r: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    count: &mut u64,
) -> io::Result<()> {
    let mut buf = Growing::new();
    while let Some(data) = buf.read(r).await? {
        *count += data.len() as u64;
        send_all(send, data).await?;
    }
    send.send_data(Bytes::new(), true).map_err(h2_io)
}

/// Tunnel → TCP until END_STREAM, then shut the socket's write side.
async fn h2_to_tcp<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    w: &mut W,
    count: &mut u64,
) -> io::Result<()> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let n = chunk.len();
        w.write_all(&chunk).await?;
        *count += n as u64;
        // Only now may the peer send more.
        let _ = recv.flow_control().release_capacity(n);
    }
    w.shutdown().await
}

/// What the TCP side already sent into the stream before the relay started (see [`Early`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub bytes: u64,
    /// END_STREAM went out too: the TCP side had half-closed.
    pub eof: bool,
}

/// Relays both ways between a TCP connection and a tunnel stream until both directions are
/// done (half-closes are passed on) or one fails (then both stop). `sent` is what went into the
/// stream before (counted in `up`).
pub async fn relay_h2(tcp: &mut TcpStream, stream: H2Stream, sent: Sent) -> Relayed {
    let H2Stream { mut send, mut recv } = stream;
    let (mut r, mut w) = tcp.split();
    let (mut up, mut down) = (sent.bytes, 0u64);
    let upstream = async {
        if sent.eof {
            return Ok(());
        }
        tcp_to_h2(&mut r, &mut send, &mut up).await
    };
    let result = futures::future::try_join(upstream, h2_to_tcp(&mut recv, &mut w, &mut down))
        .await
        .map(|_| ());
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
    }
    Relayed { up, down, result }
}

/// Most client bytes sent on a CONNECT stream before its response.
pub const EARLY_MAX: u64 = 64 * 1024;

/// The client's first bytes, sent on a CONNECT stream while its response is on the way
/// ("optimistic data"). Waiting for the 200 before reading the client cost a whole round trip
/// through both ztunnels on every connection whose client speaks first (`ambient-lab bench`:
/// connect + 1 byte echo ~650 µs, about twice the request/response time). HTTP/2 keeps a
/// stream's data apart from everything else, so a refused CONNECT only discards it: the peer
/// writes nothing to a pod before it has authorized the stream and connected. At most
/// [`EARLY_MAX`] bytes go out before the response, and they are kept until it arrives so a
/// retry on another connection (the first one died under the CONNECT) sends them again.
pub struct Early<'a> {
    tcp: &'a mut TcpStream,
    buf: Growing,
    kept: Vec<Bytes>,
    sent: Sent,
}

impl<'a> Early<'a> {
    pub fn new(tcp: &'a mut TcpStream) -> Self {
        Early {
            tcp,
            buf: Growing::new(),
            kept: Vec::new(),
            sent: Sent::default(),
        }
    }

    /// What went out, for [`relay_h2`].
    pub fn sent(&self) -> Sent {
        self.sent
    }

    /// Whether more may be read before the response.
    pub fn wants_more(&self) -> bool {
        !self.sent.eof && self.sent.bytes < EARLY_MAX
    }

    /// Sends what an earlier attempt sent on a stream that failed.
    pub fn replay(&self, send: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
        for d in &self.kept {
            send.send_data(d.clone(), false)?;
        }
        if self.sent.eof {
            send.send_data(Bytes::new(), true)?;
        }
        Ok(())
    }

    /// Reads the client once and sends what came (or END_STREAM at EOF). Cancel-safe: nothing
    /// is read until the socket is readable.
    pub async fn forward_more(&mut self, send: &mut SendStream<Bytes>) -> Result<(), EarlyError> {
        let (mut r, _) = self.tcp.split();
        match self.buf.read(&mut r).await.map_err(EarlyError::Client)? {
            Some(data) => {
                self.sent.bytes += data.len() as u64;
                self.kept.push(data.clone());
                // Within the peer's initial window; h2 buffers anything beyond it.
                send.send_data(data, false).map_err(EarlyError::Stream)
            }
            None => {
                self.sent.eof = true;
                send.send_data(Bytes::new(), true)
                    .map_err(EarlyError::Stream)
            }
        }
    }
}

/// Why forwarding early data failed.
#[derive(Debug)]
pub enum EarlyError {
    /// Reading the client socket.
    Client(io::Error),
    /// The stream refused the data.
    Stream(h2::Error),
}

/// A CONNECT stream as a byte stream (`AsyncRead` + `AsyncWrite`), for running a protocol
/// inside a tunnel: the waypoint serves HTTP on the streams it accepts and speaks HTTP on the
/// streams it opens. Received data is handed out as it comes and its flow-control capacity
/// released once read; writes wait for send capacity, so both directions keep h2's
/// backpressure. Shutting down the write side sends END_STREAM.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read (see [`H2Io::fill`]).
    pending: BytesMut,
    /// The peer's END_STREAM was seen.
    eof: bool,
}

impl H2Io {
    pub fn new(stream: H2Stream) -> H2Io {
        H2Io {
            send: stream.send,
            recv: stream.recv,
            pending: BytesMut::new(),
            eof: false,
        }
    }

    /// Waits for the next data frame and appends it to what [`H2Io::pending`] shows, without
    /// consuming it (protocol detection peeks this way). False at END_STREAM.
    pub async fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        match self.recv.data().await {
            Some(Ok(d)) => {
                let _ = self.recv.flow_control().release_capacity(d.len());
                self.pending.extend_from_slice(&d);
                Ok(true)
            }
            Some(Err(e)) => Err(h2_io(e)),
            None => {
                self.eof = true;
                Ok(false)
            }
        }
    }

    /// What [`H2Io::fill`] received and nobody has read yet.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Resets the stream (the peer sees the tunnel fail rather than end).
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

impl tokio::io::AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(d)) => {
                    let _ = this.recv.flow_control().release_capacity(d.len());
                    if d.len() <= buf.remaining() {
                        buf.put_slice(&d);
                        return Poll::Ready(Ok(()));
                    }
                    this.pending.extend_from_slice(&d);
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => this.eof = true,
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(buf.len());
        loop {
            match std::task::ready!(send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let n = cap.min(buf.len());
                    send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames out on its connection task; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // Already ended or reset: nothing more to say.
            Err(e) if e.is_reset() || e.is_go_away() => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(h2_io(e))),
        }
    }
}

async fn copy_half<W>(r: &mut ReadHalf<'_>, w: &mut W, count: &mut u64) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut buf = Growing::new();
    while let Some(data) = buf.read(r).await? {
        w.write_all(&data).await?;
        *count += data.len() as u64;
    }
    w.shutdown().await
}

/// Relays both ways between two TCP connections (passthrough).
pub async fn relay_tcp(a: &mut TcpStream, b: &mut TcpStream) -> Relayed {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let (mut up, mut down) = (0u64, 0u64);
    let result = futures::future::try_join(
        copy_half(&mut ar, &mut bw, &mut up),
        copy_half(&mut br, &mut aw, &mut down),
    )
    .await
    .map(|_| ());
    Relayed { up, down, result }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn tcp_relay_counts_and_half_closes() {
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let relay = tokio::spawn(async move { relay_tcp(&mut a, &mut b).await });
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&p2).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"bye");
        let r = relay.await.unwrap();
        r.result.unwrap();
        assert_eq!((r.up, r.down), (3_000_000, 3));
    }

    #[test]
    fn connect_authority_of_both_families() {
        let build = |a: &str| {
            let req = ConnectRequest {
                authority: a.parse().unwrap(),
                headers: http::HeaderMap::new(),
            }
            .build();
            assert_eq!(req.method(), http::Method::CONNECT);
            req.uri().authority().unwrap().as_str().to_string()
        };
        assert_eq!(build("10.0.0.1:80"), "10.0.0.1:80");
        assert_eq!(build("[fd00::1]:8080"), "[fd00::1]:8080");
        assert_eq!(build("[::1]:15008"), "[::1]:15008");
        // A scope id is local to this host: never sent.
        assert_eq!(build("[fe80::1%2]:80"), "[fe80::1]:80");
        // What the inbound side parses back.
        let back: std::net::SocketAddr = build("[fd00::1]:8080").parse().unwrap();
        assert_eq!(back, "[fd00::1]:8080".parse().unwrap());
    }

    #[tokio::test]
    async fn h2_relay_over_a_plain_connection() {
        // An h2 connection over plain TCP: client CONNECT stream ↔ server echo.
        let (c_io, s_io) = pair().await;
        let server = tokio::spawn(async move {
            let mut conn = server_builder().handshake::<_, Bytes>(s_io).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            assert_eq!(req.method(), http::Method::CONNECT);
            assert_eq!(req.uri().authority().unwrap().as_str(), "10.0.0.1:80");
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let mut recv = req.into_body();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            // Echo everything back.
            let mut send = send;
            let mut total = 0;
            while let Some(d) = recv.data().await {
                let d = d.unwrap();
                total += d.len();
                let _ = recv.flow_control().release_capacity(d.len());
                send_all(&mut send, d).await.unwrap();
            }
            send.send_data(Bytes::new(), true).unwrap();
            total
        });
        let (sender, conn) = client_builder().handshake::<_, Bytes>(c_io).await.unwrap();
        tokio::spawn(conn);
        let mut sender = sender.ready().await.unwrap();
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (resp, send) = sender.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let stream = H2Stream {
            send,
            recv: resp.into_body(),
        };
        let (mut app, mut local) = pair().await;
        let relay =
            tokio::spawn(async move { relay_h2(&mut local, stream, Sent::default()).await });
        let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let p2 = payload.clone();
        let (mut ar, mut aw) = app.split();
        let write = async {
            aw.write_all(&p2).await.unwrap();
            aw.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let read = ar.read_to_end(&mut back);
        let (_, n) = tokio::join!(write, read);
        assert_eq!(n.unwrap(), payload.len());
        assert_eq!(back, payload);
        let r = relay.await.unwrap();
        r.result.unwrap();
        assert_eq!((r.up, r.down), (5_000_000, 5_000_000));
        assert_eq!(server.await.unwrap(), 5_000_000);
    }
}
