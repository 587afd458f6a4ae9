//! Sockets of the data plane.
//!
//! Listeners set IP_TRANSPARENT so TPROXY can hand them connections for any address; the
//! original destination of such a connection is its local address. Upstream sockets set
//! IP_TRANSPARENT + IP_FREEBIND and bind to the original client's IP, so the peer sees the
//! client, not ztunnel (SPEC §3).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Connections the kernel queues for `accept` on a data-plane listener (clamped to
/// `net.core.somaxconn`, 4096 by default). A flood from one pod fills a short queue faster
/// than ztunnel accepts (and refuses) its connections, and then the SYNs of every other pod
/// are dropped too: each costs that pod a 1 s retransmission. 1024 overflowed under
/// `ambient-lab flood`.
pub const LISTEN_BACKLOG: i32 = 65_535;

/// A bound, listening socket (not yet registered with a runtime). An IPv6 address gets an
/// IPv6-only socket: each family has a socket of its own (its own IP_TRANSPARENT or
/// IPV6_TRANSPARENT, and native addresses: no v4-mapped `::ffff:a.b.c.d` to unwrap), so `[::]`
/// and `0.0.0.0` on one port coexist.
pub fn listen(addr: SocketAddr, transparent: bool) -> io::Result<std::net::TcpListener> {
    open_listener(addr, transparent)
        .map_err(|(step, e)| io::Error::new(e.kind(), format!("{step} {addr}: {e}")))
}

/// [`listen`], with the failed step and the OS error as it came.
fn open_listener(
    addr: SocketAddr,
    transparent: bool,
) -> Result<std::net::TcpListener, (&'static str, io::Error)> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| ("socket for", e))?;
    s.set_reuse_address(true)
        .map_err(|e| ("SO_REUSEADDR on", e))?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(|e| ("IPV6_V6ONLY on", e))?;
    }
    if transparent {
        let opt = if addr.is_ipv4() {
            "IP_TRANSPARENT on"
        } else {
            "IPV6_TRANSPARENT on"
        };
        set_transparent(&s, addr.ip()).map_err(|e| (opt, e))?;
    }
    s.bind(&addr.into()).map_err(|e| ("bind", e))?;
    s.listen(LISTEN_BACKLOG).map_err(|e| ("listen on", e))?;
    s.set_nonblocking(true).map_err(|e| ("O_NONBLOCK on", e))?;
    Ok(s.into())
}

/// Is this the error of an IPv6 socket on a host (netns) without IPv6: the family compiled
/// out or disabled (`ipv6.disable=1`), or the address not available?
pub fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// One listener's sockets, one per address. An IPv6 address that cannot be bound because the
/// host has no IPv6 ([`no_ipv6`]) is a warning as long as another address of the listener is
/// bound (the default `0.0.0.0` + `[::]` on a v4-only host); any other failure is an error.
pub fn listen_all(
    addrs: &[SocketAddr],
    transparent: bool,
    what: &str,
) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(addrs.len());
    let mut skipped = Vec::new();
    for &addr in addrs {
        match open_listener(addr, transparent) {
            Ok(l) => out.push(l),
            Err((step, e)) => {
                let err = io::Error::new(e.kind(), format!("{what} listener: {step} {addr}: {e}"));
                if addr.is_ipv6() && no_ipv6(&e) {
                    skipped.push((addr, err));
                } else {
                    return Err(err);
                }
            }
        }
    }
    if out.is_empty() {
        let detail = match skipped.first() {
            Some((_, e)) => e.to_string(),
            None => format!("{what} listener: no address to listen on"),
        };
        return Err(io::Error::new(io::ErrorKind::AddrNotAvailable, detail));
    }
    for (addr, e) in skipped {
        tracing::warn!(listener = what, %addr, error = %e,
            "no IPv6 in this network namespace: not listening on this address (IPv4 only)");
    }
    Ok(out)
}

/// Registers a listener with the current runtime.
pub fn to_tokio(l: std::net::TcpListener) -> io::Result<TcpListener> {
    TcpListener::from_std(l)
}

fn set_transparent(s: &Socket, ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(_) => s.set_ip_transparent_v4(true),
        IpAddr::V6(_) => s.set_ip_transparent_v6(true),
    }
}

fn set_freebind(s: &Socket, ip: IpAddr) -> io::Result<()> {
    match ip {
        IpAddr::V4(_) => s.set_freebind_v4(true),
        IpAddr::V6(_) => s.set_freebind_v6(true),
    }
}

/// Connects to `dst`, from `src` when given (spoofing it with IP_TRANSPARENT when
/// `transparent`), with TCP_NODELAY, within `timeout`.
pub async fn connect(
    src: Option<IpAddr>,
    dst: SocketAddr,
    transparent: bool,
    timeout: Duration,
) -> io::Result<TcpStream> {
    // Non-blocking from socket() on: two fcntl calls fewer per upstream connection.
    let ty = Type::STREAM.nonblocking();
    let s = Socket::new(Domain::for_address(dst), ty, Some(Protocol::TCP))?;
    s.set_tcp_nodelay(true)?;
    if let Some(src) = src.filter(|s| s.is_ipv4() == dst.is_ipv4()) {
        if transparent {
            // IP_TRANSPARENT + IP_FREEBIND, or their IPV6_ twins: the pod's address is not ours.
            set_transparent(&s, src)
                .and_then(|()| set_freebind(&s, src))
                .map_err(|e| io::Error::new(e.kind(), format!("transparent source {src}: {e}")))?;
        }
        s.bind(&SocketAddr::new(src, 0).into())
            .map_err(|e| io::Error::new(e.kind(), format!("bind to source {src}: {e}")))?;
    }
    let std: std::net::TcpStream = s.into();
    let sock = TcpSocket::from_std_stream(std);
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {dst} timed out"),
        )),
    }
}

/// A read buffer under a TLS stream. rustls asks the socket for a few KiB at a time; this
/// serves those small reads from one large read, so a bulk transfer costs a syscall per
/// `READ_BUF` bytes instead of one per 4 KiB. Writes pass straight through (vectored).
pub struct BufIo<T> {
    inner: T,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

const READ_BUF: usize = 64 * 1024;

impl<T> BufIo<T> {
    pub fn new(inner: T) -> Self {
        BufIo {
            inner,
            buf: vec![0; READ_BUF].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BufIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos == me.end {
            // Large caller buffer: no point in copying through ours.
            if out.remaining() >= me.buf.len() {
                return Pin::new(&mut me.inner).poll_read(cx, out);
            }
            let mut rb = ReadBuf::new(&mut me.buf);
            ready!(Pin::new(&mut me.inner).poll_read(cx, &mut rb))?;
            me.pos = 0;
            me.end = rb.filled().len();
            if me.end == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        let n = out.remaining().min(me.end - me.pos);
        out.put_slice(&me.buf[me.pos..me.pos + n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BufIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The original destination of an accepted TPROXY connection.
pub fn orig_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    s.local_addr()
}

/// The addresses of this network namespace's interfaces (to refuse connections to ourselves).
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = vec![
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from([0, 0, 0, 0]),
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ];
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            if let Some(v4) = sa.as_sockaddr_in() {
                out.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                out.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_binds_to_the_given_source() {
        let l = to_tokio(listen("127.0.0.1:0".parse().unwrap(), false).unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let src: IpAddr = "127.0.0.77".parse().unwrap();
        let c = connect(Some(src), addr, false, Duration::from_secs(2))
            .await
            .unwrap();
        let (accepted, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), src);
        assert_eq!(orig_dst(&accepted).unwrap(), addr);
        assert!(c.nodelay().unwrap());
    }

    #[tokio::test]
    async fn connect_to_a_dead_port_fails() {
        let l = listen("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert!(connect(None, addr, false, Duration::from_secs(2))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn bufio_serves_small_reads_from_one_large_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let d2 = data.clone();
        tokio::spawn(async move {
            b.write_all(&d2).await.unwrap();
        });
        let mut r = BufIo::new(a);
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        while got.len() < data.len() {
            let n = r.read(&mut small).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn v4_and_v6_wildcards_share_a_port_one_socket_each() {
        let v4 = listen("0.0.0.0:0".parse().unwrap(), false).unwrap();
        let port = v4.local_addr().unwrap().port();
        // IPV6_V6ONLY: `[::]` on the same port does not clash with the v4 socket.
        let v6 = listen(
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
            false,
        )
        .unwrap();
        assert_eq!(v6.local_addr().unwrap().port(), port);
        let both = listen_all(
            &["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()],
            false,
            "test",
        )
        .unwrap();
        assert_eq!(both.len(), 2);
        assert!(both[1].local_addr().unwrap().is_ipv6());
        // Anything but "no IPv6 here" stays an error: the port is taken.
        let taken = SocketAddr::new("0.0.0.0".parse().unwrap(), port);
        let err = listen_all(&[taken], false, "outbound")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("outbound listener: bind 0.0.0.0:"), "{err}");
        assert!(no_ipv6(&io::Error::from_raw_os_error(libc::EAFNOSUPPORT)));
        assert!(!no_ipv6(&io::Error::from_raw_os_error(libc::EADDRINUSE)));
    }

    #[tokio::test]
    async fn connect_binds_to_a_v6_source() {
        let l = to_tokio(listen("[::1]:0".parse().unwrap(), false).unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let src: IpAddr = "::1".parse().unwrap();
        let _c = connect(Some(src), addr, false, Duration::from_secs(2))
            .await
            .unwrap();
        let (_, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), src);
    }

    #[test]
    fn local_addresses_include_loopback() {
        assert!(local_addresses().contains(&IpAddr::from([127, 0, 0, 1])));
    }
}
