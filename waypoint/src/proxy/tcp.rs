//! A tunnel that does not carry HTTP (a port declared `tcp`, or bytes that are not HTTP):
//! authorized with L4 attributes only (see [`crate::authz`]) and relayed to an endpoint over
//! HBONE, counted in the Istio TCP metrics.

use std::sync::Arc;

use ztunnel::proxy::h2::H2Io;
use ztunnel::proxy::ConnLog;

use super::upstream::Endpoint;
use super::{Downstream, Inputs};
use crate::authz;
use crate::state::Destination;

pub async fn relay(pi: Arc<Inputs>, down: Arc<Downstream>, mut io: H2Io) {
    let st = pi.state.get();
    let mut log = ConnLog::new("waypoint", down.src, down.authority);
    log.reporters = &[crate::metrics::REPORTER];
    log.route = "waypoint-tcp";
    log.mtls = true;
    log.src_identity = Some(down.identity.clone());
    log.src_workload = st.mesh.workload_by_ip(down.src.ip()).cloned();
    let (ns, name) = down.target_names();
    let attrs = down.attrs(None);
    if let Err(denied) = authz::authorize(st.policies_for(ns, name), &attrs) {
        io.reset();
        log.finish(&pi.metrics, 0, 0, Err(denied.to_string()));
        return;
    }
    let mut rng = fastrand::Rng::new();
    let target = match &down.dest {
        Destination::Service(svc, port) => {
            log.dst_service = Some(svc.key());
            // An endpoint with an address of the dialed VIP's family (as ztunnel picks).
            ztunnel::proxy::outbound::pick_endpoint_like(
                st.mesh.endpoints(svc),
                down.authority.ip(),
                &mut rng,
            )
            .map(|ep| {
                let mut ids = vec![ep.identity.clone()];
                ids.extend(svc.subject_alt_names.iter().cloned());
                (
                    ep.clone(),
                    svc.endpoint_target(ep, *port, down.authority.is_ipv4()),
                    ids,
                )
            })
        }
        Destination::Workload(w, port) => Some((
            w.clone(),
            std::net::SocketAddr::new(down.authority.ip(), *port),
            vec![w.identity.clone()],
        )),
    };
    let Some((wl, addr, identities)) = target else {
        io.reset();
        log.finish(&pi.metrics, 0, 0, Err("no healthy upstream".into()));
        return;
    };
    log.dst_identity = Some(wl.identity.clone());
    log.upstream = Some(addr);
    let ep = Endpoint {
        addr,
        hbone: wl.protocol == ztunnel::config::Protocol::Hbone,
        identities,
    };
    log.dst_workload = Some(wl);
    drop(st);
    let mut up = match pi.upstream.open(&ep).await {
        Ok(u) => u,
        Err(e) => {
            io.reset();
            log.finish(&pi.metrics, 0, 0, Err(e.to_string()));
            return;
        }
    };
    log.opened(&pi.metrics);
    match tokio::io::copy_bidirectional(&mut io, &mut up).await {
        Ok((received, sent)) => log.finish(&pi.metrics, received, sent, Ok(())),
        Err(e) => log.finish(&pi.metrics, 0, 0, Err(e.to_string())),
    }
}
