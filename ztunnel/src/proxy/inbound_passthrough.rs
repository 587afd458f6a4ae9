//! 15006: plaintext from clients outside the mesh to a pod of this node. The original
//! destination is the socket's local address (TPROXY); the connection is authorized without an
//! identity and connected to the pod from the client's own IP. A port behind a waypoint refuses
//! plaintext, as 15008 refuses a tunnel that is not the waypoint's.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::h2::{relay_tcp, Relayed};
use super::limits::Permit;
use super::{ConnLog, Error, Inputs};
use crate::rbac;
use crate::socket;

pub async fn serve(pi: Arc<Inputs>, listener: TcpListener) {
    let (p, fixed) = (pi.clone(), pi.cfg.inbound_plaintext_orig_dst);
    super::accept::accept_loop(
        listener,
        pi.drain.clone(),
        "inbound plaintext",
        // Under TPROXY the original destination is the socket's local address.
        move |tcp| fixed.or_else(|| socket::orig_dst(tcp).ok()),
        move |tcp, peer, dst| {
            let conn = p.admit(peer.ip()).map(|permit| (tcp, permit));
            handle(p.clone(), conn, peer, dst)
        },
    )
    .await
}

/// One connection with its place under the source's cap (or why it has none: then it is
/// closed already).
pub async fn handle(
    pi: Arc<Inputs>,
    conn: Result<(TcpStream, Permit), Error>,
    src: SocketAddr,
    dst: SocketAddr,
) {
    let mut log = ConnLog::new("inbound_plaintext", src, dst);
    log.reporters = &["destination"];
    log.route = "passthrough";
    let (mut tcp, _permit) = match conn {
        Ok(c) => c,
        Err(e) => return log.refused(&pi.metrics, &e),
    };
    let (received, sent, result) = match proxy(&pi, &mut tcp, &mut log).await {
        Ok(r) => (r.up, r.down, r.result.map_err(|e| e.to_string())),
        Err(e) => {
            log.refusal = e.refusal();
            (0, 0, Err(e.to_string()))
        }
    };
    log.finish(&pi.metrics, received, sent, result);
}

async fn proxy(pi: &Inputs, tcp: &mut TcpStream, log: &mut ConnLog) -> Result<Relayed, Error> {
    let (src, dst) = (log.src, log.dst);
    let state = pi.state.get();
    let wl = state
        .local_workload_by_ip(dst.ip())
        .ok_or(Error::NotLocalDestination(dst))?
        .clone();
    log.src_workload = state.workload_by_ip(src.ip()).cloned();
    log.dst_identity = Some(wl.identity.clone());
    log.dst_workload = Some(wl.clone());
    log.upstream = Some(dst);
    let conn = rbac::Connection {
        src_identity: None,
        src_ip: src.ip(),
        dst,
    };
    // Plaintext to a port behind a waypoint would skip its L7 policy.
    state.check_waypoint(&wl, dst.port(), None)?;
    rbac::authorize(state.policies_for(&wl), &conn)?;
    drop(state);
    let mut up = socket::connect(
        Some(src.ip()),
        dst,
        pi.cfg.transparent,
        pi.cfg.connect_timeout,
    )
    .await
    .map_err(|e| Error::Connect(dst, e))?;
    log.opened(&pi.metrics);
    Ok(relay_tcp(tcp, &mut up).await)
}
