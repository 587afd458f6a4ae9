//! 15008: HBONE from ztunnels.
//!
//! TLS 1.3 with the waypoint's certificate, a client certificate of the mesh required, ALPN
//! h2 (ztunnel's TLS configuration). Each CONNECT must name a service VIP:port or a workload
//! address this waypoint serves (anything else 400: never an open proxy). After the 200 the
//! stream's first bytes say what it carries: the HTTP/2 preface, an HTTP/1.1 request line, or
//! something else (relayed at L4). A service port declared `tcp` is never parsed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::config::AppProtocol;
use ztunnel::identity::Identity;
use ztunnel::proxy::accept::{accept_hbone, accept_loop};
use ztunnel::proxy::h2::{H2Io, H2Stream};
use ztunnel::proxy::{forwarded_for, inbound::original_source, Error};

use super::upstream::Proto;
use super::{Downstream, Inputs};
use crate::state::Destination;

pub async fn serve(pi: Arc<Inputs>, listener: TcpListener) {
    let p = pi.clone();
    accept_loop(
        listener,
        pi.drain.clone(),
        "HBONE",
        |tcp| tcp.local_addr().ok(),
        move |tcp, peer, _| {
            let pi = p.clone();
            async move {
                if let Err(e) = serve_connection(pi, tcp, peer).await {
                    tracing::warn!(%peer, error = %e, "HBONE connection refused");
                }
            }
        },
    )
    .await
}

async fn serve_connection(
    pi: Arc<Inputs>,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
) -> Result<(), Error> {
    let me = pi.state.get().identity().clone();
    let cfg = pi
        .tls
        .server_config(&me)
        .map_err(|e| Error::Tls(std::io::Error::other(e)))?;
    let hbone = accept_hbone(tcp, cfg, pi.cfg.connect_timeout).await?;
    let identity = hbone.peer_identity.clone();
    let drain = pi.drain.clone();
    hbone
        .serve_streams(&drain, peer, move |req, respond| {
            serve_stream(pi.clone(), peer, identity.clone(), req, respond)
        })
        .await;
    Ok(())
}

fn refuse(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let _ = respond.send_response(resp, true);
}

/// The CONNECT's checks: a served destination, and the client the tunnel speaks for.
fn admit(
    pi: &Inputs,
    peer: std::net::SocketAddr,
    identity: &Identity,
    req: &Request<RecvStream>,
) -> Result<Downstream, String> {
    if req.method() != http::Method::CONNECT {
        return Err(format!("method {} is not CONNECT", req.method()));
    }
    let authority: std::net::SocketAddr = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or_else(|| format!("authority {:?} is not <ip>:<port>", req.uri().authority()))?;
    let st = pi.state.get();
    let dest = st.destination(authority).map_err(|e| e.to_string())?;
    let forwarded = req
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_for);
    let src_ip = original_source(&st.mesh, forwarded.map(|f| f.ip()), peer.ip(), identity);
    let src = match forwarded {
        Some(f) if f.ip() == src_ip => f,
        _ => peer,
    };
    Ok(Downstream {
        peer,
        src,
        identity: identity.clone(),
        authority,
        dest,
    })
}

async fn serve_stream(
    pi: Arc<Inputs>,
    peer: std::net::SocketAddr,
    identity: Identity,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let down = match admit(&pi, peer, &identity, &req) {
        Ok(d) => d,
        Err(why) => {
            refuse(&mut respond, StatusCode::BAD_REQUEST);
            tracing::warn!(target: "access", code = 400, src.addr = %peer, src.identity = %identity,
                authority = ?req.uri().authority().map(|a| a.to_string()),
                error = %why, "CONNECT refused");
            return;
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut io = H2Io::new(H2Stream {
        send,
        recv: req.into_body(),
    });
    let declared = match &down.dest {
        Destination::Service(svc, port) => svc.app_protocol(*port),
        Destination::Workload(..) => AppProtocol::Http,
    };
    let kind = match declared {
        AppProtocol::Tcp => Detected::Tcp,
        AppProtocol::Http2 => Detected::Http2,
        AppProtocol::Http => detect(&mut io, pi.cfg.protocol_detect_timeout).await,
    };
    let down = Arc::new(down);
    match kind {
        Detected::Http1 => super::http::serve(pi, down, io, Proto::Http1).await,
        Detected::Http2 => super::http::serve(pi, down, io, Proto::Http2).await,
        Detected::Tcp => super::tcp::relay(pi, down, io).await,
    }
}

/// What a tunnel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tcp,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest method token waited for before giving up on HTTP/1.
const MAX_METHOD: usize = 20;

/// Decides from the first bytes; None: not enough yet.
pub fn classify(p: &[u8]) -> Option<Detected> {
    if p.is_empty() {
        return None;
    }
    if p.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(p) {
        return None;
    }
    if p.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    // An HTTP/1.x request line starts with a method token and a space.
    let token = p.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match p.get(token) {
        Some(b' ') if token > 0 => Some(Detected::Http1),
        None if token < MAX_METHOD => None,
        _ => Some(Detected::Tcp),
    }
}

/// Waits (up to `timeout`) for enough of the client's first bytes to classify them; a
/// client that stays silent, or ends, is relayed at L4.
async fn detect(io: &mut H2Io, timeout: Duration) -> Detected {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(d) = classify(io.pending()) {
            return d;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, io.fill()).await {
            Ok(Ok(true)) => {}
            _ => return Detected::Tcp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_decide() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tcp), "TLS");
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Detected::Tcp));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Tcp));
        assert_eq!(classify(b"AAAAAAAAAAAAAAAAAAAAAAAA"), Some(Detected::Tcp));
    }
}
