//! The server side every listener of the system shares (ztunnel's three, the waypoint's
//! HBONE one): the accept loop, and an HBONE connection's TLS + HTTP/2 set-up and its CONNECT
//! streams.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::Request;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::h2::server_builder;
use super::Error;
use crate::drain::Drain;
use crate::identity::Identity;
use crate::socket::BufIo;

/// Accepts on `listener` until drain starts. Each connection (TCP_NODELAY set) for which
/// `dst` names a destination is handled on a task drain waits for; a failed accept is logged
/// as `what` and retried shortly.
pub async fn accept_loop<D, F, Fut>(
    listener: TcpListener,
    drain: Drain,
    what: &'static str,
    dst: D,
    handle: F,
) where
    D: Fn(&TcpStream) -> Option<SocketAddr>,
    F: Fn(TcpStream, SocketAddr, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let stop = drain.signal();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "{what} accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let Some(d) = dst(&tcp) else { continue };
        drain.spawn(handle(tcp, peer, d));
    }
}

type Conn = h2::server::Connection<TlsStream<BufIo<TcpStream>>, Bytes>;

/// An HBONE connection past its handshakes: the peer's verified identity, and its streams.
pub struct Tunnel {
    pub peer_identity: Identity,
    conn: Conn,
}

/// TLS with `cfg` (the client certificate is checked by `cfg`'s verifier), ALPN h2, the
/// peer's SPIFFE identity, then the HTTP/2 handshake (the client's preface and SETTINGS), all
/// within `timeout` from the accept: a client that opens connections and then stalls (half-open
/// TLS, or TLS without HTTP/2) holds a socket and a task for at most that long.
pub async fn accept_hbone(
    tcp: TcpStream,
    cfg: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<Tunnel, Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let tls = tokio::time::timeout_at(deadline, TlsAcceptor::from(cfg).accept(BufIo::new(tcp)))
        .await
        .map_err(|_| Error::Timeout("TLS handshake"))?
        .map_err(Error::Tls)?;
    let (_, conn) = tls.get_ref();
    if conn.alpn_protocol() != Some(crate::tls::ALPN_H2) {
        return Err(Error::BadRequest("ALPN h2 not negotiated".into()));
    }
    let peer_identity = crate::tls::peer_identity(conn)
        .ok_or_else(|| Error::Tls(std::io::Error::other("no peer identity")))?;
    let conn = tokio::time::timeout_at(deadline, server_builder().handshake::<_, Bytes>(tls))
        .await
        .map_err(|_| Error::Timeout("HTTP/2 handshake"))?
        .map_err(Error::H2)?;
    Ok(Tunnel {
        peer_identity,
        conn,
    })
}

impl Tunnel {
    /// Hands every CONNECT stream to `on_stream` on a task drain waits for, until the peer
    /// closes; when drain starts, GOAWAY lets the open streams finish.
    pub async fn serve_streams<F, Fut>(mut self, drain: &Drain, peer: SocketAddr, on_stream: F)
    where
        F: Fn(Request<RecvStream>, SendResponse<Bytes>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = drain.signal();
        let mut draining = false;
        loop {
            tokio::select! {
                next = self.conn.accept() => match next {
                    Some(Ok((req, respond))) => {
                        drain.spawn(on_stream(req, respond));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "HBONE connection ended");
                        return;
                    }
                    None => return,
                },
                _ = stop.cancelled(), if !draining => {
                    draining = true;
                    self.conn.graceful_shutdown();
                }
            }
        }
    }
}
