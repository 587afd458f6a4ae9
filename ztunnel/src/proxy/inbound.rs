//! 15008: HBONE from other ztunnels.
//!
//! TLS 1.3 with the certificate of the workload that owns the dialed address (the accepted
//! socket's local address: under TPROXY, the pod IP), a client certificate required, ALPN h2.
//! Each CONNECT stream is checked (the authority must be a workload of this node served under
//! the identity we presented: never an open proxy), authorized, and connected to the pod from
//! the original client's IP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};

use super::h2::{relay_h2, H2Stream, Sent};
use super::limits::{Permit, Source};
use super::{forwarded_for, ConnLog, Error, Inputs};
use crate::identity::Identity;
use crate::rbac;
use crate::socket;
use crate::state::{State, Workload};

pub async fn serve(pi: Arc<Inputs>, listener: TcpListener) {
    let p = pi.clone();
    super::accept::accept_loop(
        listener,
        pi.drain.clone(),
        "inbound",
        |tcp| tcp.local_addr().ok(),
        move |tcp, peer, dialed| {
            let conn = p.admit_addr(peer.ip()).map(|permit| (tcp, permit));
            serve_dialed(p.clone(), conn, peer, dialed)
        },
    )
    .await
}

/// One connection to `dialed` (under TPROXY: the pod's `ip:15008`). A waypoint terminates
/// HBONE itself: its connections are passed to it untouched; every other pod's are ours.
///
/// `conn` holds the connection's place under its peer address's cap, counted from the accept
/// on (a stalled handshake holds a socket too), or why it has none: then it is closed already.
pub async fn serve_dialed(
    pi: Arc<Inputs>,
    conn: Result<(TcpStream, Permit), Error>,
    peer: SocketAddr,
    dialed: SocketAddr,
) {
    let (tcp, _permit) = match conn {
        Ok(c) => c,
        Err(e) => return refused(&pi, peer, &e),
    };
    let to_waypoint = {
        let st = pi.state.get();
        st.is_waypoint(dialed.ip()) && st.local_workload_by_ip(dialed.ip()).is_some()
    };
    if to_waypoint {
        to_local_waypoint(&pi, tcp, peer, dialed).await;
    } else if let Err(e) = serve_connection(pi.clone(), tcp, peer, dialed).await {
        refused(&pi, peer, &e);
    }
}

/// A connection to 15008 that ends before its streams: a refusal once per cause (and
/// counted), anything else a warning.
fn refused(pi: &Inputs, peer: SocketAddr, e: &Error) {
    match e.refusal() {
        // A client without the right certificate, that stalls, or over its cap.
        Some(cause) => {
            tracing::debug!(%peer, error = %e, "inbound HBONE connection refused");
            pi.metrics.refused("inbound", cause);
            crate::refusals::warn("inbound", cause, &format_args!("{peer}: {e}"));
        }
        None => tracing::warn!(%peer, error = %e, "inbound HBONE connection refused"),
    }
}

/// HBONE for a waypoint of this node: relayed as TCP from the client's own address, so the
/// waypoint sees the client and verifies its certificate itself.
async fn to_local_waypoint(pi: &Inputs, mut tcp: TcpStream, peer: SocketAddr, dialed: SocketAddr) {
    let mut log = ConnLog::new("inbound", peer, dialed);
    log.route = "waypoint";
    log.upstream = Some(dialed);
    log.dst_workload = pi.state.get().workload_by_ip(dialed.ip()).cloned();
    let up = socket::connect(
        Some(peer.ip()),
        dialed,
        pi.cfg.transparent,
        pi.cfg.connect_timeout,
    )
    .await;
    match up {
        Ok(mut up) => {
            let r = super::h2::relay_tcp(&mut tcp, &mut up).await;
            log.finish(
                &pi.metrics,
                r.up,
                r.down,
                r.result.map_err(|e| e.to_string()),
            );
        }
        Err(e) => log.finish(
            &pi.metrics,
            0,
            0,
            Err(Error::Connect(dialed, e).to_string()),
        ),
    }
}

/// What every stream of one tunnel connection shares.
pub struct Tunnel {
    pub peer: SocketAddr,
    pub peer_identity: Identity,
    pub served: Identity,
}

async fn serve_connection(
    pi: Arc<Inputs>,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> Result<(), Error> {
    let served = {
        let state = pi.state.get();
        state
            .local_workload_by_ip(local.ip())
            .map(|w| w.identity.clone())
            .ok_or(Error::NotLocalDestination(local))?
    };
    let cfg = pi
        .tls
        .server_config(&served)
        .map_err(|e| Error::Tls(std::io::Error::other(e)))?;
    let hbone = super::accept::accept_hbone(tcp, cfg, pi.cfg.connect_timeout).await?;
    let tunnel = Arc::new(Tunnel {
        peer,
        peer_identity: hbone.peer_identity.clone(),
        served,
    });
    let drain = pi.drain.clone();
    hbone
        .serve_streams(&drain, peer, move |req, respond| {
            serve_stream(pi.clone(), tunnel.clone(), req, respond)
        })
        .await;
    Ok(())
}

fn respond_error(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let _ = respond.send_response(resp, true);
}

/// The CONNECT's checks: the destination workload, the target, the client IP to spoof.
/// Pure (no I/O) and generic over the body, so that it can be fuzzed on its own.
pub fn admit<B>(
    state: &State,
    tunnel: &Tunnel,
    req: &Request<B>,
) -> Result<(Arc<Workload>, SocketAddr, SocketAddr), (StatusCode, Error)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, Error::BadRequest(m));
    if req.method() != http::Method::CONNECT {
        return Err(bad(format!("method {} is not CONNECT", req.method())));
    }
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| bad("no :authority".into()))?;
    let target = parse_authority(authority.as_str()).ok_or_else(|| {
        bad(format!(
            "authority {authority} is not <ip>:<port> or [<ipv6>]:<port>"
        ))
    })?;
    let wl = state
        .local_workload_by_ip(target.ip())
        .ok_or((StatusCode::BAD_REQUEST, Error::NotLocalDestination(target)))?;
    if wl.identity != tunnel.served {
        return Err(bad(format!(
            "{target} is not served under the identity this tunnel verified ({})",
            tunnel.served
        )));
    }
    let forwarded = req
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_for);
    let src_ip = original_source(
        state,
        forwarded.map(|f| f.ip()),
        tunnel.peer.ip(),
        &tunnel.peer_identity,
    );
    // The client's address as far as we know it (for the log).
    let src = match forwarded {
        Some(f) if f.ip() == src_ip => f,
        _ => tunnel.peer,
    };
    state
        .check_waypoint(wl, target.port(), Some(&tunnel.peer_identity))
        .map_err(|d| (StatusCode::UNAUTHORIZED, Error::Denied(d)))?;
    let conn = rbac::Connection {
        src_identity: Some(&tunnel.peer_identity),
        src_ip,
        dst: target,
    };
    rbac::authorize(state.policies_for(wl), &conn)
        .map_err(|d| (StatusCode::UNAUTHORIZED, Error::Denied(d)))?;
    Ok((wl.clone(), target, src))
}

/// A CONNECT's `:authority`: `10.0.0.1:80` or `[fd00::1]:80` (a name, an IPv6 address without
/// brackets or a missing port is refused).
pub fn parse_authority(a: &str) -> Option<SocketAddr> {
    a.parse().ok()
}

/// The client address to connect from: the `forwarded` address if it belongs to a workload of
/// the peer's identity, else the tunnel's peer address.
pub fn original_source(
    state: &State,
    forwarded: Option<IpAddr>,
    peer_ip: IpAddr,
    peer_identity: &Identity,
) -> IpAddr {
    match forwarded {
        Some(ip)
            if state
                .workload_by_ip(ip)
                .is_some_and(|w| &w.identity == peer_identity) =>
        {
            ip
        }
        _ => peer_ip,
    }
}

async fn serve_stream(
    pi: Arc<Inputs>,
    tunnel: Arc<Tunnel>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let authority = req
        .uri()
        .authority()
        .and_then(|a| parse_authority(a.as_str()))
        .unwrap_or(tunnel.peer);
    let mut log = ConnLog::new("inbound", tunnel.peer, authority);
    log.reporters = &["destination"];
    log.route = "inbound";
    log.mtls = true;
    log.src_identity = Some(tunnel.peer_identity.clone());
    let state = pi.state.get();
    let (wl, target, src) = match admit(&state, &tunnel, &req) {
        Ok(x) => x,
        Err((status, e)) => {
            respond_error(&mut respond, status);
            log.refusal = e.refusal();
            log.finish(
                &pi.metrics,
                0,
                0,
                Err(format!("{} ({})", e, status.as_u16())),
            );
            return;
        }
    };
    let src_ip = src.ip();
    log.src = src;
    log.src_workload = state.workload_by_ip(src_ip).cloned();
    // The stream's client (a pod of another node) against its cap, until the relay ends.
    let _permit = match pi
        .limits
        .acquire(Source::of(log.src_workload.as_deref(), src_ip))
    {
        Ok(p) => p,
        Err(e) => {
            respond_error(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            log.refusal = e.refusal();
            log.finish(&pi.metrics, 0, 0, Err(format!("{e} (503)")));
            return;
        }
    };
    log.dst_identity = Some(wl.identity.clone());
    log.dst_workload = Some(wl);
    log.upstream = Some(target);
    drop(state);
    let mut up = match socket::connect(
        Some(src_ip),
        target,
        pi.cfg.transparent,
        pi.cfg.connect_timeout,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            respond_error(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            log.finish(
                &pi.metrics,
                0,
                0,
                Err(format!("{} (503)", Error::Connect(target, e))),
            );
            return;
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(e) => {
            log.finish(&pi.metrics, 0, 0, Err(Error::H2(e).to_string()));
            return;
        }
    };
    log.opened(&pi.metrics);
    let stream = H2Stream {
        send,
        recv: req.into_body(),
    };
    let r = relay_h2(&mut up, stream, Sent::default()).await;
    // The TCP side is the pod here: `up` is pod → client (sent), `down` client → pod (received).
    log.finish(
        &pi.metrics,
        r.down,
        r.up,
        r.result.map_err(|e| e.to_string()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_local_config;

    #[test]
    fn authorities_of_both_families() {
        let sa = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(parse_authority("10.0.0.1:80"), sa("10.0.0.1:80"));
        assert_eq!(parse_authority("[fd00::1]:8080"), sa("[fd00::1]:8080"));
        for bad in [
            "fd00::1:8080",
            "[fd00::1]",
            "echo:80",
            "10.0.0.1",
            "[fd00::1]:x",
        ] {
            assert_eq!(parse_authority(bad), None, "{bad}");
        }
    }

    #[test]
    fn forwarded_v6_source_must_belong_to_the_peer_identity() {
        let file = r#"
workloads:
- {name: a, namespace: demo, serviceAccount: sleep, workloadIps: [10.0.0.1, "fd00::1"], protocol: HBONE, node: n1}
- {name: b, namespace: demo, serviceAccount: other, workloadIps: ["fd00::2"], protocol: HBONE, node: n1}
"#;
        let st = State::build(&parse_local_config(file).unwrap(), "cluster.local", "n2").unwrap();
        let sleep = Identity::new("cluster.local", "demo", "sleep");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let peer = ip("fd00:9::9");
        let fwd = forwarded_for(r#"for="[fd00::1]:40000""#).map(|f| f.ip());
        assert_eq!(original_source(&st, fwd, peer, &sleep), ip("fd00::1"));
        let fwd = forwarded_for(r#"for="[fd00::2]:40000""#).map(|f| f.ip());
        assert_eq!(original_source(&st, fwd, peer, &sleep), peer);
    }

    #[test]
    fn forwarded_source_must_belong_to_the_peer_identity() {
        let file = r#"
workloads:
- {name: a, namespace: demo, serviceAccount: sleep, workloadIps: [10.0.0.1], protocol: HBONE, node: n1}
- {name: b, namespace: demo, serviceAccount: other, workloadIps: [10.0.0.2], protocol: HBONE, node: n1}
"#;
        let st = State::build(&parse_local_config(file).unwrap(), "cluster.local", "n2").unwrap();
        let sleep = Identity::new("cluster.local", "demo", "sleep");
        let peer: IpAddr = "192.168.0.9".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            original_source(&st, Some(ip("10.0.0.1")), peer, &sleep),
            ip("10.0.0.1")
        );
        // Claims an address of another identity: ignored.
        assert_eq!(
            original_source(&st, Some(ip("10.0.0.2")), peer, &sleep),
            peer
        );
        // Claims an unknown address: ignored.
        assert_eq!(
            original_source(&st, Some(ip("10.9.9.9")), peer, &sleep),
            peer
        );
        assert_eq!(original_source(&st, None, peer, &sleep), peer);
    }
}
