//! Upstream HTTP: requests carried to endpoints, each over an HBONE CONNECT stream to
//! `<endpoint ip>:15008` with `:authority <endpoint ip>:<target port>` (opened through
//! ztunnel's HBONE pool with the waypoint's certificate, the endpoint's identity verified).
//!
//! HTTP/1.1 connections are kept alive and reused: a connection goes back to its endpoint's
//! idle list when the response it carried has been read to the end. HTTP/2 connections carry
//! many requests at once: one per endpoint, opened again when it closes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use ztunnel::identity::Identity;
use ztunnel::proxy::h2::{ConnectRequest, H2Io};
use ztunnel::proxy::pool::{Pool, PoolKey, StreamGuard};

use super::body::Body;

/// The HTTP version spoken to an endpoint: the one the client spoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

/// Where one attempt goes.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `<endpoint ip>:<target port>`.
    pub addr: SocketAddr,
    /// In the mesh (HBONE); otherwise plain TCP to `addr`.
    pub hbone: bool,
    /// Who the endpoint may be (its workload's identity and the service's extra SANs).
    pub identities: Vec<Identity>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent: safe to try again.
    #[error("upstream connect error: {0}")]
    Connect(String),
    /// The request went out (maybe partly) and no response came: a reset or a closed
    /// connection.
    #[error("upstream reset before headers: {0}")]
    Reset(hyper::Error),
}

/// A stream to an endpoint: an HBONE tunnel (holding its slot in the HBONE pool) or TCP.
pub enum Io {
    Hbone(Box<H2Io>, StreamGuard),
    Tcp(TcpStream),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Hbone(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Hbone(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Hbone(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Hbone(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An idle HTTP/1.1 connection and since when.
type IdleH1 = (http1::SendRequest<Body>, Instant);

/// Most idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

pub struct Upstream {
    hbone: Arc<Pool>,
    me: Identity,
    /// The waypoint's own addresses: upstream connections leave from the one of the
    /// endpoint's family, so an endpoint's ztunnel sees the waypoint's workload address.
    my_ips: Vec<IpAddr>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    h1: Mutex<HashMap<SocketAddr, Vec<IdleH1>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

/// A connection ready for one request.
pub enum Conn {
    Http1(Lease),
    Http2(http2::SendRequest<Body>),
}

impl Conn {
    /// Sends the request and waits for the response's head. An HTTP/1.1 response comes with
    /// its connection's lease, to release when its body is done.
    pub async fn send(
        self,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Option<Lease>), UpstreamError> {
        match self {
            Conn::Http1(mut lease) => {
                let resp = lease
                    .sender
                    .send_request(req)
                    .await
                    .map_err(UpstreamError::Reset)?;
                Ok((resp, Some(lease)))
            }
            Conn::Http2(mut s) => {
                let resp = s.send_request(req).await.map_err(UpstreamError::Reset)?;
                Ok((resp, None))
            }
        }
    }
}

/// An HTTP/1.1 connection lent to one request; [`Lease::release`] gives it back once the
/// response has been read to its end (dropping it instead closes the connection).
pub struct Lease {
    up: Arc<Upstream>,
    addr: SocketAddr,
    sender: http1::SendRequest<Body>,
}

impl Lease {
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.up.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(self.addr).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push((self.sender, Instant::now()));
        }
    }
}

impl Upstream {
    pub fn new(
        hbone: Arc<Pool>,
        me: Identity,
        my_ips: Vec<IpAddr>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Upstream {
        Upstream {
            hbone,
            me,
            my_ips,
            connect_timeout,
            idle_timeout,
            h1: Mutex::default(),
            h2: Mutex::default(),
        }
    }

    /// A byte stream to `ep` (HBONE, or TCP for an endpoint outside the mesh).
    pub async fn open(&self, ep: &Endpoint) -> Result<Io, UpstreamError> {
        let src_ip = self
            .my_ips
            .iter()
            .find(|ip| ip.is_ipv4() == ep.addr.is_ipv4())
            .copied();
        if !ep.hbone {
            let tcp = ztunnel::socket::connect(src_ip, ep.addr, false, self.connect_timeout)
                .await
                .map_err(|e| UpstreamError::Connect(format!("{}: {e}", ep.addr)))?;
            return Ok(Io::Tcp(tcp));
        }
        let key = PoolKey {
            src_identity: self.me.clone(),
            dst_identities: ep.identities.clone(),
            dst: SocketAddr::new(ep.addr.ip(), ambient_net::consts::port::INBOUND_HBONE),
            src_ip,
        };
        let req = ConnectRequest {
            authority: ep.addr,
            headers: http::HeaderMap::new(),
        };
        let (stream, guard) = self
            .hbone
            .connect(&key, &req, None)
            .await
            .map_err(|e| UpstreamError::Connect(format!("{}: {e}", key.dst)))?;
        Ok(Io::Hbone(Box::new(H2Io::new(stream)), guard))
    }

    fn idle_h1(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some((s, since)) = list.pop() {
            if !s.is_closed() && s.is_ready() && since.elapsed() < self.idle_timeout {
                return Some(s);
            }
        }
        None
    }

    /// A connection to `ep` for one request: an idle HTTP/1.1 one, the endpoint's HTTP/2 one,
    /// or a new one. Nothing of the request is consumed, so a failure here can always be
    /// retried.
    pub async fn connect(
        self: &Arc<Self>,
        ep: &Endpoint,
        proto: Proto,
    ) -> Result<Conn, UpstreamError> {
        match proto {
            Proto::Http1 => {
                if let Some(sender) = self.idle_h1(ep.addr) {
                    return Ok(Conn::Http1(self.lease(ep.addr, sender)));
                }
                let io = self.open(ep).await?;
                let (sender, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                let addr = ep.addr;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
                    }
                });
                Ok(Conn::Http1(self.lease(ep.addr, sender)))
            }
            Proto::Http2 => {
                let existing = {
                    let conns = self.h2.lock().unwrap_or_else(|e| e.into_inner());
                    conns.get(&ep.addr).filter(|s| !s.is_closed()).cloned()
                };
                let mut sender = match existing {
                    Some(s) => s,
                    None => {
                        let io = self.open(ep).await?;
                        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                            .handshake(TokioIo::new(io))
                            .await
                            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                        let addr = ep.addr;
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
                            }
                        });
                        self.h2
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(ep.addr, sender.clone());
                        sender
                    }
                };
                sender
                    .ready()
                    .await
                    .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                Ok(Conn::Http2(sender))
            }
        }
    }

    fn lease(self: &Arc<Self>, addr: SocketAddr, sender: http1::SendRequest<Body>) -> Lease {
        Lease {
            up: self.clone(),
            addr,
            sender,
        }
    }

    /// Drops idle and closed connections (called now and then).
    pub fn reap(&self) {
        let mut idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        for list in idle.values_mut() {
            list.retain(|(s, since)| !s.is_closed() && since.elapsed() < self.idle_timeout);
        }
        idle.retain(|_, l| !l.is_empty());
        drop(idle);
        self.h2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| !s.is_closed());
    }

    pub fn dump(&self) -> serde_json::Value {
        let idle = self.h1.lock().unwrap_or_else(|e| e.into_inner());
        let h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "http1Idle": idle.iter().map(|(a, l)| (a.to_string(), l.len())).collect::<HashMap<_, _>>(),
            "http2": h2.keys().map(|a| a.to_string()).collect::<Vec<_>>(),
        })
    }
}
