//! 15001: connections captured from this node's pods.
//!
//! The original destination is the accepted socket's local address (TPROXY). The source
//! workload is found by the client's IP and must be on this node (we hold its certificate).
//! [`route`] decides where the connection goes; the handler then tunnels it over HBONE (from
//! the pooled connection of that source/destination pair), hands it to a local pod directly, or
//! passes it through as plain TCP. Upstream sockets are bound to the client's IP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambient_net::consts::port;
use tokio::net::{TcpListener, TcpStream};

use super::h2::{relay_h2, relay_tcp, ConnectRequest, Early, Relayed};
use super::limits::Permit;
use super::pool::PoolKey;
use super::{ConnLog, Error, Inputs};
use crate::config::{Protocol, WaypointRef};
use crate::identity::Identity;
use crate::rbac;
use crate::socket;
use crate::state::{State, Workload};

/// Where an outbound connection goes.
#[derive(Debug, Clone)]
pub enum Route {
    /// HTTP/2 CONNECT to `tunnel` (a pod's or a waypoint's 15008) with `:authority`, verifying
    /// that the server is one of `identities`.
    Hbone {
        tunnel: SocketAddr,
        authority: SocketAddr,
        identities: Vec<Identity>,
        workload: Arc<Workload>,
        service: Option<String>,
        waypoint: bool,
    },
    /// A mesh pod on this node: authorized and connected here, no tunnel.
    Local {
        target: SocketAddr,
        workload: Arc<Workload>,
        service: Option<String>,
    },
    /// Plain TCP to `target`.
    Passthrough {
        target: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<String>,
    },
}

impl Route {
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Hbone { waypoint: true, .. } => "waypoint",
            Route::Hbone { .. } => "hbone",
            Route::Local { .. } => "local",
            Route::Passthrough { .. } => "passthrough",
        }
    }
}

/// Decides the route of a connection from `src` to `dst`. `rng` picks service endpoints.
pub fn route(
    state: &State,
    src: &Workload,
    dst: SocketAddr,
    rng: &mut fastrand::Rng,
) -> Result<Route, Error> {
    if dst.port() == port::INBOUND_HBONE {
        if let Some(wl) = state.workload_by_ip(dst.ip()) {
            if wl.protocol == Protocol::Hbone {
                // The client speaks HBONE itself (a waypoint carrying a request to an
                // endpoint): tunnelling it again would wrap mTLS in mTLS and end at a pod that
                // has no 15008. It goes as is; the destination's ztunnel terminates it and
                // checks the client's own certificate.
                return Ok(Route::Passthrough {
                    target: dst,
                    workload: Some(wl.clone()),
                    service: None,
                });
            }
        }
    }
    if let Some(svc) = state.service_by_vip(dst.ip()) {
        let key = svc.key();
        if let Some(wp) = &svc.waypoint {
            if !state.is_waypoint_of(src, wp) {
                return via_waypoint(state, wp, dst, Some(key), rng);
            }
        }
        if !svc.ports.is_empty() && !svc.ports.contains_key(&dst.port()) {
            // A port the service does not define: not ours to balance.
            return Ok(Route::Passthrough {
                target: dst,
                workload: None,
                service: Some(key),
            });
        }
        // Within the dialed VIP's family: a v6 VIP reaches an endpoint's v6 address (the
        // client's source, spoofed upstream, is of that family too).
        let ep = pick_endpoint_like(state.endpoints(svc), dst.ip(), rng)
            .ok_or_else(|| Error::NoHealthyEndpoint(key.clone()))?;
        let target = svc.endpoint_target(ep, dst.port(), dst.is_ipv4());
        let extra = &svc.subject_alt_names;
        return to_workload(state, src, ep, target, Some(key), extra, rng);
    }
    if let Some(wl) = state.workload_by_ip(dst.ip()) {
        return to_workload(state, src, wl, dst, None, &[], rng);
    }
    Ok(Route::Passthrough {
        target: dst,
        workload: None,
        service: None,
    })
}

/// To the waypoint `wp` with the original `authority`: a waypoint workload's address, or a
/// healthy endpoint of a waypoint service (by capacity, as any service's), each verified by its
/// own identity.
fn via_waypoint(
    state: &State,
    wp: &WaypointRef,
    authority: SocketAddr,
    service: Option<String>,
    rng: &mut fastrand::Rng,
) -> Result<Route, Error> {
    // The tunnel in the connection's family when the waypoint has an address of it (the
    // tunnel's source is the client's address), else in any: the waypoint reads the client
    // from `forwarded` and its certificate either way.
    let like = authority.ip();
    let (wl, ip) = match state.waypoint_service(wp) {
        Some(svc) => {
            let eps = state.endpoints(svc);
            let ep = pick_endpoint_like(eps, like, rng)
                .or_else(|| pick_endpoint(eps, rng))
                .ok_or_else(|| Error::NoHealthyEndpoint(svc.key()))?;
            (ep, ep.ip_like(like).unwrap_or(ep.workload_ips[0]))
        }
        None => {
            let wl = state
                .workload_by_ip(wp.address)
                .ok_or(Error::UnknownWaypoint(wp.address))?;
            (wl, wl.ip_like(like).unwrap_or(wp.address))
        }
    };
    Ok(Route::Hbone {
        tunnel: SocketAddr::new(ip, wp.hbone_mtls_port),
        authority,
        identities: vec![wl.identity.clone()],
        workload: wl.clone(),
        service,
        waypoint: true,
    })
}

fn to_workload(
    state: &State,
    src: &Workload,
    wl: &Arc<Workload>,
    target: SocketAddr,
    service: Option<String>,
    extra_sans: &[Identity],
    rng: &mut fastrand::Rng,
) -> Result<Route, Error> {
    if let Some(wp) = &wl.waypoint {
        if !state.is_waypoint_of(src, wp) {
            return via_waypoint(state, wp, target, service, rng);
        }
    }
    Ok(match wl.protocol {
        Protocol::Hbone if wl.node == state.node => Route::Local {
            target,
            workload: wl.clone(),
            service,
        },
        Protocol::Hbone => {
            let mut identities = vec![wl.identity.clone()];
            identities.extend(extra_sans.iter().filter(|i| **i != wl.identity).cloned());
            Route::Hbone {
                tunnel: SocketAddr::new(target.ip(), port::INBOUND_HBONE),
                authority: target,
                identities,
                workload: wl.clone(),
                service,
                waypoint: false,
            }
        }
        Protocol::Tcp => Route::Passthrough {
            target,
            workload: Some(wl.clone()),
            service,
        },
    })
}

/// Weighted random choice (weight = capacity) among healthy endpoints.
pub fn pick_endpoint<'a>(
    eps: &'a [Arc<Workload>],
    rng: &mut fastrand::Rng,
) -> Option<&'a Arc<Workload>> {
    pick_endpoint_where(eps, |_| true, rng)
}

/// The same among the endpoints that have an address in the family of `like`.
pub fn pick_endpoint_like<'a>(
    eps: &'a [Arc<Workload>],
    like: IpAddr,
    rng: &mut fastrand::Rng,
) -> Option<&'a Arc<Workload>> {
    pick_endpoint_where(eps, |w| w.ip_like(like).is_some(), rng)
}

/// Weighted random choice among the healthy endpoints `eligible` admits.
fn pick_endpoint_where<'a>(
    eps: &'a [Arc<Workload>],
    eligible: impl Fn(&Workload) -> bool,
    rng: &mut fastrand::Rng,
) -> Option<&'a Arc<Workload>> {
    let ok = |w: &&Arc<Workload>| w.healthy() && w.capacity > 0 && eligible(w);
    let total: u64 = eps.iter().filter(ok).map(|w| w.capacity as u64).sum();
    if total == 0 {
        return None;
    }
    let mut n = rng.u64(0..total);
    for w in eps.iter().filter(ok) {
        if n < w.capacity as u64 {
            return Some(w);
        }
        n -= w.capacity as u64;
    }
    None
}

/// Accepts until drain.
pub async fn serve(pi: Arc<Inputs>, listener: TcpListener) {
    let (p, fixed) = (pi.clone(), pi.cfg.outbound_orig_dst);
    super::accept::accept_loop(
        listener,
        pi.drain.clone(),
        "outbound",
        // Under TPROXY the original destination is the socket's local address.
        move |tcp| fixed.or_else(|| socket::orig_dst(tcp).ok()),
        move |tcp, peer, dst| {
            let conn = p.admit(peer.ip()).map(|permit| (tcp, permit));
            handle(p.clone(), conn, peer, dst)
        },
    )
    .await
}

/// One captured connection from `src` to its original destination `dst`, with its place
/// under the source's cap (or why it has none: then it is closed already).
pub async fn handle(
    pi: Arc<Inputs>,
    conn: Result<(TcpStream, Permit), Error>,
    src: SocketAddr,
    dst: SocketAddr,
) {
    let (mut tcp, _permit) = match conn {
        Ok(c) => c,
        Err(e) => {
            let mut log = ConnLog::new("outbound", src, dst);
            log.reporters = &["source"];
            return log.refused(&pi.metrics, &e);
        }
    };
    if dst.port() == port::INBOUND_HBONE {
        let local_hbone = pi
            .state
            .get()
            .local_workload_by_ip(dst.ip())
            .is_some_and(|w| w.protocol == Protocol::Hbone);
        if local_hbone {
            // A client speaking HBONE itself (see [`route`]) to a pod of this node: on a remote
            // node this connection would arrive on that ztunnel's 15008; here it is ours to
            // terminate, as if it had.
            let conn = pi.admit_addr(src.ip()).map(|permit| (tcp, permit));
            super::inbound::serve_dialed(pi, conn, src, dst).await;
            return;
        }
    }
    let mut log = ConnLog::new("outbound", src, dst);
    log.reporters = &["source"];
    let relayed = proxy(&pi, &mut tcp, &mut log).await;
    let (up, down, result) = match relayed {
        Ok(r) => (r.up, r.down, r.result.map_err(|e| e.to_string())),
        Err(e) => {
            log.refusal = e.refusal();
            (0, 0, Err(e.to_string()))
        }
    };
    log.finish(&pi.metrics, up, down, result);
}

async fn proxy(pi: &Inputs, tcp: &mut TcpStream, log: &mut ConnLog) -> Result<Relayed, Error> {
    let (src, dst) = (log.src, log.dst);
    if pi.is_self(dst) {
        return Err(Error::SelfConnect(dst));
    }
    let state = pi.state.get();
    let src_wl = state
        .workload_by_ip(src.ip())
        .ok_or(Error::UnknownSource(src.ip()))?
        .clone();
    if src_wl.node != state.node {
        return Err(Error::NotLocalSource(src.ip()));
    }
    log.src_identity = Some(src_wl.identity.clone());
    log.src_workload = Some(src_wl.clone());
    let mut rng = fastrand::Rng::new();
    let r = route(&state, &src_wl, dst, &mut rng)?;
    log.route = r.kind();
    let spoof = Some(src.ip());
    let timeout = pi.cfg.connect_timeout;
    match r {
        Route::Hbone {
            tunnel,
            authority,
            identities,
            workload,
            service,
            ..
        } => {
            log.dst_identity = Some(workload.identity.clone());
            log.dst_workload = Some(workload);
            log.dst_service = service;
            log.upstream = Some(tunnel);
            log.mtls = true;
            let key = PoolKey {
                src_identity: src_wl.identity.clone(),
                dst_identities: identities,
                dst: tunnel,
                src_ip: spoof,
            };
            let mut headers = http::HeaderMap::new();
            let fwd = super::forwarded_value(src);
            headers.insert(
                "forwarded",
                http::HeaderValue::from_str(&fwd).map_err(|e| Error::BadRequest(e.to_string()))?,
            );
            let req = ConnectRequest { authority, headers };
            let mut early = Early::new(tcp);
            let (stream, _guard) = pi.pool.connect(&key, &req, Some(&mut early)).await?;
            let sent = early.sent();
            log.opened(&pi.metrics);
            Ok(relay_h2(tcp, stream, sent).await)
        }
        Route::Local {
            target,
            workload,
            service,
        } => {
            // Both ends are ours: authorize as the inbound side would, then connect directly.
            log.reporters = &["source", "destination"];
            log.dst_identity = Some(workload.identity.clone());
            log.dst_workload = Some(workload.clone());
            log.dst_service = service;
            log.upstream = Some(target);
            log.mtls = true;
            let conn = rbac::Connection {
                src_identity: Some(&src_wl.identity),
                src_ip: src.ip(),
                dst: target,
            };
            rbac::authorize(state.policies_for(&workload), &conn)?;
            let mut up = socket::connect(spoof, target, pi.cfg.transparent, timeout)
                .await
                .map_err(|e| Error::Connect(target, e))?;
            log.opened(&pi.metrics);
            Ok(relay_tcp(tcp, &mut up).await)
        }
        Route::Passthrough {
            target,
            workload,
            service,
        } => {
            log.dst_workload = workload;
            log.dst_service = service;
            log.upstream = Some(target);
            let mut up = socket::connect(spoof, target, pi.cfg.transparent, timeout)
                .await
                .map_err(|e| Error::Connect(target, e))?;
            log.opened(&pi.metrics);
            Ok(relay_tcp(tcp, &mut up).await)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_local_config;

    const FILE: &str = r#"
workloads:
- name: client
  namespace: demo
  serviceAccount: sleep
  workloadIps: [10.0.0.1]
  protocol: HBONE
  node: node-a
- name: neighbour
  namespace: demo
  serviceAccount: neighbour
  workloadIps: [10.0.0.2]
  protocol: HBONE
  node: node-a
- name: echo-1
  namespace: demo
  serviceAccount: echo
  workloadIps: [10.0.1.1]
  protocol: HBONE
  node: node-b
  services: {demo/echo.demo.svc.cluster.local: {80: 9090}}
- name: echo-2
  namespace: demo
  serviceAccount: echo
  workloadIps: [10.0.1.2]
  protocol: HBONE
  node: node-b
  capacity: 3
  services: {demo/echo.demo.svc.cluster.local: {}}
- name: echo-sick
  namespace: demo
  serviceAccount: echo
  workloadIps: [10.0.1.3]
  protocol: HBONE
  node: node-b
  status: Unhealthy
  services: {demo/echo.demo.svc.cluster.local: {}}
- name: legacy
  namespace: demo
  workloadIps: [10.0.2.1]
  node: node-b
- name: waypoint
  namespace: demo
  serviceAccount: waypoint
  workloadIps: [10.0.3.1]
  protocol: HBONE
  node: node-b
- name: behind-waypoint
  namespace: demo
  serviceAccount: db
  workloadIps: [10.0.3.2]
  protocol: HBONE
  node: node-b
  waypoint: {address: 10.0.3.1}
- name: gw-0
  namespace: demo
  serviceAccount: gw
  workloadIps: [10.0.4.1]
  protocol: HBONE
  node: node-b
  services: {demo/gw.demo.svc.cluster.local: {}}
- name: gw-1
  namespace: demo
  serviceAccount: gw
  workloadIps: [10.0.4.2]
  protocol: HBONE
  node: node-b
  capacity: 3
  services: {demo/gw.demo.svc.cluster.local: {}}
- name: gw-sick
  namespace: demo
  serviceAccount: gw-old
  workloadIps: [10.0.4.3]
  protocol: HBONE
  node: node-b
  status: Unhealthy
  services: {demo/gw.demo.svc.cluster.local: {}}
- name: api-0
  namespace: demo
  serviceAccount: api
  workloadIps: [10.0.5.1]
  protocol: HBONE
  node: node-b
  waypoint: {address: 10.96.0.40}
  services: {demo/api.demo.svc.cluster.local: {}}
services:
- name: gw
  namespace: demo
  hostname: gw.demo.svc.cluster.local
  vips: [10.96.0.40]
  ports: {15008: 15008}
- name: api
  namespace: demo
  hostname: api.demo.svc.cluster.local
  vips: [10.96.0.50]
  ports: {80: 8080}
  waypoint: {address: 10.96.0.40}
- name: dead-gw
  namespace: demo
  hostname: dead-gw.demo.svc.cluster.local
  vips: [10.96.0.60]
  ports: {15008: 15008}
- name: orphan
  namespace: demo
  hostname: orphan.demo.svc.cluster.local
  vips: [10.96.0.70]
  ports: {80: 80}
  waypoint: {address: 10.96.0.60}
- name: echo
  namespace: demo
  hostname: echo.demo.svc.cluster.local
  vips: [10.96.0.10]
  ports: {80: 8080}
  subjectAltNames: [spiffe://cluster.local/ns/demo/sa/echo-alt]
- name: db
  namespace: demo
  hostname: db.demo.svc.cluster.local
  vips: [10.96.0.20]
  ports: {5432: 5432}
  waypoint: {address: 10.0.3.1, hboneMtlsPort: 15009}
- name: empty
  namespace: demo
  hostname: empty.demo.svc.cluster.local
  vips: [10.96.0.30]
  ports: {80: 80}
"#;

    fn setup() -> (State, Arc<Workload>) {
        let st = State::build(
            &parse_local_config(FILE).unwrap(),
            "cluster.local",
            "node-a",
        )
        .unwrap();
        let src = st
            .workload_by_ip("10.0.0.1".parse().unwrap())
            .unwrap()
            .clone();
        (st, src)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "demo", sa)
    }

    #[test]
    fn mesh_pod_on_another_node_goes_over_hbone() {
        let (st, src) = setup();
        let r = route(
            &st,
            &src,
            sa("10.0.1.1:8080"),
            &mut fastrand::Rng::with_seed(1),
        )
        .unwrap();
        match r {
            Route::Hbone {
                tunnel,
                authority,
                identities,
                waypoint,
                service,
                ..
            } => {
                assert_eq!(tunnel, sa("10.0.1.1:15008"));
                assert_eq!(authority, sa("10.0.1.1:8080"));
                assert_eq!(identities, vec![id("echo")]);
                assert!(!waypoint);
                assert_eq!(service, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn service_vip_picks_a_healthy_endpoint_and_maps_the_port() {
        let (st, src) = setup();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen = std::collections::HashMap::new();
        for _ in 0..4000 {
            let r = route(&st, &src, sa("10.96.0.10:80"), &mut rng).unwrap();
            let Route::Hbone {
                authority,
                tunnel,
                identities,
                service,
                ..
            } = r
            else {
                panic!("{r:?}")
            };
            assert_eq!(tunnel, SocketAddr::new(authority.ip(), 15008));
            // echo-1 overrides 80 → 9090; echo-2 uses the service's 80 → 8080.
            match authority.ip().to_string().as_str() {
                "10.0.1.1" => assert_eq!(authority.port(), 9090),
                "10.0.1.2" => assert_eq!(authority.port(), 8080),
                other => panic!("unhealthy or unknown endpoint picked: {other}"),
            }
            assert_eq!(identities, vec![id("echo"), id("echo-alt")]);
            assert_eq!(service.as_deref(), Some("demo/echo.demo.svc.cluster.local"));
            *seen.entry(authority.ip()).or_insert(0) += 1;
        }
        // Capacity 1 vs 3: about a quarter of the picks.
        let one = seen[&"10.0.1.1".parse::<IpAddr>().unwrap()] as f64 / 4000.0;
        assert!((0.2..0.3).contains(&one), "{one}");
    }

    #[test]
    fn service_without_healthy_endpoints_is_an_error() {
        let (st, src) = setup();
        let err = route(&st, &src, sa("10.96.0.30:80"), &mut fastrand::Rng::new()).unwrap_err();
        assert!(matches!(err, Error::NoHealthyEndpoint(_)), "{err}");
    }

    #[test]
    fn undefined_service_port_is_passed_through() {
        let (st, src) = setup();
        let r = route(&st, &src, sa("10.96.0.10:22"), &mut fastrand::Rng::new()).unwrap();
        assert!(
            matches!(r, Route::Passthrough { target, .. } if target == sa("10.96.0.10:22")),
            "{r:?}"
        );
    }

    #[test]
    fn non_mesh_and_unknown_destinations_are_passed_through() {
        let (st, src) = setup();
        let r = route(&st, &src, sa("10.0.2.1:80"), &mut fastrand::Rng::new()).unwrap();
        assert!(
            matches!(&r, Route::Passthrough { target, workload: Some(w), .. }
            if *target == sa("10.0.2.1:80") && w.name == "legacy"),
            "{r:?}"
        );
        let r = route(&st, &src, sa("1.1.1.1:443"), &mut fastrand::Rng::new()).unwrap();
        assert!(
            matches!(r, Route::Passthrough { workload: None, .. }),
            "{r:?}"
        );
    }

    #[test]
    fn same_node_mesh_pod_takes_the_local_path() {
        let (st, src) = setup();
        let r = route(&st, &src, sa("10.0.0.2:80"), &mut fastrand::Rng::new()).unwrap();
        assert!(
            matches!(&r, Route::Local { target, .. } if *target == sa("10.0.0.2:80")),
            "{r:?}"
        );
    }

    #[test]
    fn waypoints_get_the_original_authority() {
        let (st, src) = setup();
        // A service with a waypoint: authority is the VIP.
        let r = route(&st, &src, sa("10.96.0.20:5432"), &mut fastrand::Rng::new()).unwrap();
        match &r {
            Route::Hbone {
                tunnel,
                authority,
                identities,
                waypoint: true,
                ..
            } => {
                assert_eq!(*tunnel, sa("10.0.3.1:15009"));
                assert_eq!(*authority, sa("10.96.0.20:5432"));
                assert_eq!(identities, &vec![id("waypoint")]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.kind(), "waypoint");
        // A workload with a waypoint: authority is the pod.
        let r = route(&st, &src, sa("10.0.3.2:5432"), &mut fastrand::Rng::new()).unwrap();
        assert!(
            matches!(&r, Route::Hbone { tunnel, authority, waypoint: true, .. }
            if *tunnel == sa("10.0.3.1:15008") && *authority == sa("10.0.3.2:5432")),
            "{r:?}"
        );
        // The waypoint itself goes straight to the workload.
        let wp = st
            .workload_by_ip("10.0.3.1".parse().unwrap())
            .unwrap()
            .clone();
        let r = route(&st, &wp, sa("10.0.3.2:5432"), &mut fastrand::Rng::new()).unwrap();
        assert!(
            matches!(&r, Route::Hbone { tunnel, waypoint: false, .. }
            if *tunnel == sa("10.0.3.2:15008")),
            "{r:?}"
        );
    }

    #[test]
    fn a_client_speaking_hbone_itself_is_not_tunnelled_again() {
        let (st, _) = setup();
        let wp = st
            .workload_by_ip("10.0.3.1".parse().unwrap())
            .unwrap()
            .clone();
        // The waypoint's own HBONE to an endpoint's 15008: as is, not HBONE in HBONE, and not
        // back to the waypoint although the endpoint is behind it.
        let r = route(&st, &wp, sa("10.0.3.2:15008"), &mut fastrand::Rng::new()).unwrap();
        assert!(
            matches!(&r, Route::Passthrough { target, workload: Some(w), .. }
            if *target == sa("10.0.3.2:15008") && w.name == "behind-waypoint"),
            "{r:?}"
        );
        // Port 15008 of a workload outside the mesh is just a port.
        let r = route(&st, &wp, sa("10.0.2.1:15008"), &mut fastrand::Rng::new()).unwrap();
        assert_eq!(r.kind(), "passthrough");
        assert!(st.is_waypoint("10.0.3.1".parse().unwrap()));
        assert!(!st.is_waypoint("10.0.3.2".parse().unwrap()));
    }

    #[test]
    fn workloads_behind_a_waypoint_name_its_identity() {
        let (st, _) = setup();
        let behind = st
            .workload_by_ip("10.0.3.2".parse().unwrap())
            .unwrap()
            .clone();
        // Its own waypoint: every port.
        assert_eq!(st.required_waypoints(&behind, 5432), vec![id("waypoint")]);
        assert_eq!(st.required_waypoints(&behind, 1), vec![id("waypoint")]);
        // A service endpoint without a waypoint of its own or of its services: none.
        let echo = st
            .workload_by_ip("10.0.1.1".parse().unwrap())
            .unwrap()
            .clone();
        assert!(st.required_waypoints(&echo, 9090).is_empty());
    }

    #[test]
    fn a_waypoint_service_vip_picks_a_healthy_waypoint_endpoint() {
        let (st, src) = setup();
        let mut rng = fastrand::Rng::with_seed(3);
        let mut seen = std::collections::HashMap::new();
        for _ in 0..2000 {
            // The service's traffic and the workload's own both go to a waypoint pod.
            for dst in ["10.96.0.50:80", "10.0.5.1:8080"] {
                let r = route(&st, &src, sa(dst), &mut rng).unwrap();
                let Route::Hbone {
                    tunnel,
                    authority,
                    identities,
                    workload,
                    waypoint: true,
                    ..
                } = &r
                else {
                    panic!("{r:?}")
                };
                assert_eq!(*authority, sa(dst));
                assert_eq!(tunnel.port(), 15008);
                assert_eq!(identities, &vec![id("gw")]);
                assert_eq!(workload.workload_ips[0], tunnel.ip());
                *seen.entry(tunnel.ip().to_string()).or_insert(0) += 1;
            }
        }
        // Never the unhealthy one; by capacity (1 vs 3).
        assert!(!seen.contains_key("10.0.4.3"), "{seen:?}");
        let one = seen["10.0.4.1"] as f64 / 4000.0;
        assert!((0.2..0.3).contains(&one), "{one}");
        // A waypoint service without healthy endpoints: an error, not a passthrough.
        let err = route(&st, &src, sa("10.96.0.70:80"), &mut rng).unwrap_err();
        assert!(
            matches!(&err, Error::NoHealthyEndpoint(k) if k == "demo/dead-gw.demo.svc.cluster.local"),
            "{err}"
        );
        // A waypoint pod itself goes straight to the workload.
        let gw = st
            .workload_by_ip("10.0.4.2".parse().unwrap())
            .unwrap()
            .clone();
        let r = route(&st, &gw, sa("10.96.0.50:80"), &mut rng).unwrap();
        assert!(
            matches!(&r, Route::Hbone { tunnel, waypoint: false, .. } if *tunnel == sa("10.0.5.1:15008")),
            "{r:?}"
        );
    }

    #[test]
    fn endpoints_of_a_waypoint_service_are_waypoints() {
        let (st, _) = setup();
        for ip in ["10.0.4.1", "10.0.4.2", "10.0.4.3"] {
            assert!(st.is_waypoint(ip.parse().unwrap()), "{ip}");
        }
        // The VIP itself is no pod, and the dead waypoint service has none.
        assert!(!st.is_waypoint("10.96.0.40".parse().unwrap()));
        assert!(!st.is_waypoint("10.0.5.1".parse().unwrap()));
        // Behind it: every endpoint's identity is accepted, nobody else's.
        let api = st
            .workload_by_ip("10.0.5.1".parse().unwrap())
            .unwrap()
            .clone();
        assert_eq!(
            st.required_waypoints(&api, 8080),
            vec![id("gw"), id("gw-old")]
        );
        assert_eq!(
            st.required_waypoints(&api, 1),
            vec![id("gw"), id("gw-old")],
            "its own waypoint: every port"
        );
    }

    #[test]
    fn waypoint_addresses_are_workloads_or_vips() {
        let bad = FILE.replace(
            "waypoint: {address: 10.96.0.40}\n  services: {demo/api",
            "waypoint: {address: 10.9.9.9}\n  services: {demo/api",
        );
        let err = State::build(
            &parse_local_config(&bad).unwrap(),
            "cluster.local",
            "node-a",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(".waypoint.address")
                && err.contains("neither a workload address nor a service VIP"),
            "{err}"
        );
        // A waypoint pod bound to its own waypoint service, a service to its own VIP.
        let own = FILE.replace(
            "  capacity: 3\n  services: {demo/gw.demo.svc.cluster.local: {}}",
            "  capacity: 3\n  waypoint: {address: 10.96.0.40}\n  services: {demo/gw.demo.svc.cluster.local: {}}",
        );
        let err = State::build(
            &parse_local_config(&own).unwrap(),
            "cluster.local",
            "node-a",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot be its own waypoint"), "{err}");
        let own = FILE.replace(
            "  vips: [10.96.0.40]\n  ports: {15008: 15008}",
            "  vips: [10.96.0.40]\n  ports: {15008: 15008}\n  waypoint: {address: 10.96.0.40}",
        );
        let err = State::build(
            &parse_local_config(&own).unwrap(),
            "cluster.local",
            "node-a",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("a service cannot be its own waypoint"),
            "{err}"
        );
    }

    const DUAL: &str = r#"
workloads:
- {name: client, namespace: demo, serviceAccount: sleep, workloadIps: [10.0.0.1, "fd00::1"], protocol: HBONE, node: node-a}
- {name: dual, namespace: demo, serviceAccount: echo, workloadIps: [10.0.1.1, "fd00:1::1"], protocol: HBONE, node: node-b, services: {demo/echo.demo.svc.cluster.local: {}}}
- {name: v4only, namespace: demo, serviceAccount: echo, workloadIps: [10.0.1.2], protocol: HBONE, node: node-b, services: {demo/echo.demo.svc.cluster.local: {}}}
- {name: v6only, namespace: demo, serviceAccount: echo, workloadIps: ["fd00:1::3"], protocol: HBONE, node: node-b, services: {demo/echo.demo.svc.cluster.local: {}}}
- {name: wp, namespace: demo, serviceAccount: wp, workloadIps: [10.0.3.1, "fd00:3::1"], protocol: HBONE, node: node-b}
- {name: db, namespace: demo, serviceAccount: db, workloadIps: [10.0.3.2, "fd00:3::2"], protocol: HBONE, node: node-b, waypoint: {address: 10.0.3.1}}
- {name: v4wp-0, namespace: demo, serviceAccount: gw, workloadIps: [10.0.4.1], protocol: HBONE, node: node-b, services: {demo/gw.demo.svc.cluster.local: {}}}
- {name: api, namespace: demo, serviceAccount: api, workloadIps: ["fd00:5::1"], protocol: HBONE, node: node-b, waypoint: {address: 10.96.0.40}}
services:
- {name: echo, namespace: demo, hostname: echo.demo.svc.cluster.local, vips: [10.96.0.10, "fd00:96::10"], ports: {80: 8080}}
- {name: gw, namespace: demo, hostname: gw.demo.svc.cluster.local, vips: [10.96.0.40], ports: {15008: 15008}}
"#;

    fn dual() -> (State, Arc<Workload>) {
        let st = State::build(
            &parse_local_config(DUAL).unwrap(),
            "cluster.local",
            "node-a",
        )
        .unwrap();
        let src = st
            .workload_by_ip("fd00::1".parse().unwrap())
            .unwrap()
            .clone();
        (st, src)
    }

    #[test]
    fn a_dual_stack_workload_is_indexed_and_reached_by_each_family() {
        let (st, src) = dual();
        // The client is found by either of its addresses.
        assert_eq!(
            st.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap().uid,
            src.uid
        );
        for (dst, tunnel) in [
            ("10.0.1.1:8080", "10.0.1.1:15008"),
            ("[fd00:1::1]:8080", "[fd00:1::1]:15008"),
        ] {
            let r = route(&st, &src, sa(dst), &mut fastrand::Rng::new()).unwrap();
            assert!(
                matches!(&r, Route::Hbone { tunnel: t, authority, workload, waypoint: false, .. }
                if *t == sa(tunnel) && *authority == sa(dst) && workload.name == "dual"),
                "{r:?}"
            );
        }
    }

    #[test]
    fn a_vip_picks_endpoints_of_its_own_family() {
        let (st, src) = dual();
        let mut rng = fastrand::Rng::with_seed(5);
        for (vip, family_v4) in [("[fd00:96::10]:80", false), ("10.96.0.10:80", true)] {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..300 {
                let r = route(&st, &src, sa(vip), &mut rng).unwrap();
                let Route::Hbone {
                    tunnel,
                    authority,
                    workload,
                    ..
                } = &r
                else {
                    panic!("{r:?}")
                };
                assert_eq!(authority.is_ipv4(), family_v4, "{r:?}");
                assert_eq!(tunnel.ip(), authority.ip());
                assert_eq!(authority.port(), 8080);
                seen.insert(workload.name.clone());
            }
            let want: &[&str] = if family_v4 {
                &["dual", "v4only"]
            } else {
                &["dual", "v6only"]
            };
            assert_eq!(seen.iter().map(String::as_str).collect::<Vec<_>>(), want);
        }
        // No endpoint of the family: no healthy endpoint, never a cross-family one.
        let v6only = DUAL.replace(
            "[10.0.1.2], protocol: HBONE, node: node-b, services: {demo/echo",
            "[10.0.1.2], protocol: HBONE, node: node-b, status: Unhealthy, services: {demo/echo",
        );
        let st = State::build(
            &parse_local_config(&v6only).unwrap(),
            "cluster.local",
            "node-a",
        )
        .unwrap();
        let only_dual = st.endpoints(st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap());
        assert!(pick_endpoint_like(only_dual, "10.96.0.10".parse().unwrap(), &mut rng).is_some());
        let none = State::build(
            &parse_local_config(
                &DUAL
                    .replace(
                        "workloadIps: [10.0.1.1, \"fd00:1::1\"]",
                        "workloadIps: [\"fd00:1::1\"]",
                    )
                    .replace(
                        "[10.0.1.2], protocol: HBONE, node: node-b, services",
                        "[10.0.1.2], protocol: HBONE, node: node-b, status: Unhealthy, services",
                    ),
            )
            .unwrap(),
            "cluster.local",
            "node-a",
        )
        .unwrap();
        let err = route(&none, &src, sa("10.96.0.10:80"), &mut rng).unwrap_err();
        assert!(matches!(err, Error::NoHealthyEndpoint(_)), "{err}");
    }

    #[test]
    fn waypoints_are_reached_in_the_connections_family_when_they_can_be() {
        let (st, src) = dual();
        // A dual-stack waypoint workload named by its v4 address: v6 traffic goes to its v6.
        let r = route(&st, &src, sa("[fd00:3::2]:5432"), &mut fastrand::Rng::new()).unwrap();
        assert!(
            matches!(&r, Route::Hbone { tunnel, authority, waypoint: true, .. }
            if *tunnel == sa("[fd00:3::1]:15008") && *authority == sa("[fd00:3::2]:5432")),
            "{r:?}"
        );
        let r = route(&st, &src, sa("10.0.3.2:5432"), &mut fastrand::Rng::new()).unwrap();
        assert!(
            matches!(&r, Route::Hbone { tunnel, waypoint: true, .. } if *tunnel == sa("10.0.3.1:15008")),
            "{r:?}"
        );
        // A v4-only waypoint service still carries v6 traffic (HBONE is only the transport).
        let r = route(&st, &src, sa("[fd00:5::1]:80"), &mut fastrand::Rng::new()).unwrap();
        assert!(
            matches!(&r, Route::Hbone { tunnel, authority, waypoint: true, .. }
            if *tunnel == sa("10.0.4.1:15008") && *authority == sa("[fd00:5::1]:80")),
            "{r:?}"
        );
    }
}
