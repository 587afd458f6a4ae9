//! `/debug/route?src=<ip>&dst=<ip:port>` on the admin port: ztunnel's decision for one
//! connection, from its current state, without making it. The operators' path explainer asks
//! this for the ztunnel step of a path: which route (HBONE to a pod, a Service's endpoints and
//! their shares, a waypoint, the local fast path, passthrough), the identity the tunnel expects,
//! and what the destination's policies would say.

use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};

use ambient_net::consts::port;

use crate::proxy::outbound::{route, Route};
use crate::rbac;
use crate::state::{State, Workload};

/// The `key=value` pairs of a query, each key once and one of `allowed`; values
/// percent-decoded.
fn query_pairs(q: Option<&str>, allowed: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if allowed.contains(&k) && !out.iter().any(|(o, _)| o == k) => {
                out.push((k.to_string(), percent_decode(v)))
            }
            _ => {
                return Err(format!(
                    "{pair:?}: want {}",
                    allowed
                        .iter()
                        .map(|k| format!("{k}=…"))
                        .collect::<Vec<_>>()
                        .join("&")
                ))
            }
        }
    }
    Ok(out)
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn ip_param(pairs: &[(String, String)], key: &str) -> Result<Option<IpAddr>, String> {
    get(pairs, key)
        .map(|v| {
            v.parse::<IpAddr>()
                .map_err(|_| format!("{key}={v}: not an IP"))
        })
        .transpose()
}

fn addr_param(pairs: &[(String, String)], key: &str) -> Result<Option<SocketAddr>, String> {
    get(pairs, key)
        .map(|v| {
            v.parse::<SocketAddr>()
                .map_err(|_| format!("{key}={v}: not <ip>:<port> ([<ipv6>]:<port>)"))
        })
        .transpose()
}

/// Parses the query (`src=10.244.1.4&dst=10.96.0.10:80`, `src=fd00::4&dst=[fd00::10]:80`;
/// the brackets and colons may come percent-encoded).
pub fn parse_query(q: Option<&str>) -> Result<(IpAddr, SocketAddr), String> {
    let pairs = query_pairs(q, &["src", "dst"])?;
    match (ip_param(&pairs, "src")?, addr_param(&pairs, "dst")?) {
        (Some(s), Some(d)) => Ok((s, d)),
        _ => Err("want src=<ip>&dst=<ip:port>".into()),
    }
}

/// One connection arriving at this node's ztunnel (`/debug/inbound`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    /// The client's address as the packet carries it.
    pub src: IpAddr,
    /// The address it dialed: a pod's `ip:15008` is HBONE, anything else plaintext (15006).
    pub dst: SocketAddr,
    /// HBONE: the CONNECT's target inside the tunnel.
    pub authority: Option<SocketAddr>,
}

/// Parses `/debug/inbound`'s query: `src=<ip>&dst=<ip:port>[&authority=<ip:port>]`; HBONE
/// (a `dst` on 15008) needs the authority, the stream's decision depends on it.
pub fn parse_inbound_query(q: Option<&str>) -> Result<Inbound, String> {
    let pairs = query_pairs(q, &["src", "dst", "authority"])?;
    let (Some(src), Some(dst)) = (ip_param(&pairs, "src")?, addr_param(&pairs, "dst")?) else {
        return Err("want src=<ip>&dst=<ip:port>[&authority=<ip:port>]".into());
    };
    let authority = addr_param(&pairs, "authority")?;
    if dst.port() == port::INBOUND_HBONE && authority.is_none() {
        return Err(format!(
            "dst {dst} is HBONE: want authority=<ip:port>, the CONNECT's target"
        ));
    }
    Ok(Inbound {
        src,
        dst,
        authority,
    })
}

/// `%5B`, `%5D`, `%3A` (any `%XX`) decoded; a malformed escape is kept as is (and then fails
/// to parse as an address).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn describe(w: &Workload, node: &str) -> Value {
    json!({
        "uid": w.uid, "name": w.name, "namespace": w.namespace,
        "identity": w.identity, "node": w.node, "onThisNode": w.node == node,
        "protocol": w.protocol,
    })
}

/// The decision for a connection from `src` to `dst` captured on this node.
pub fn explain(state: &State, src: IpAddr, dst: SocketAddr) -> Value {
    let Some(src_wl) = state.workload_by_ip(src) else {
        return json!({
            "src": src, "dst": dst,
            "decision": "refused",
            "reason": format!("{src} is not a workload: 15001 proxies only this node's mesh pods"),
        });
    };
    let mut out = json!({ "src": describe(src_wl, &state.node), "dst": dst });
    if src_wl.node != state.node {
        out["decision"] = "refused".into();
        out["reason"] = format!("{src} is a workload of {}, not of this node", src_wl.node).into();
        return out;
    }
    if let Some(svc) = state.service_by_vip(dst.ip()) {
        // Only the endpoints with an address in the VIP's family are picked.
        let eps = state.endpoints(svc);
        let eligible = |w: &Workload| w.healthy() && w.ip_like(dst.ip()).is_some();
        let total: u64 = eps
            .iter()
            .filter(|w| eligible(w))
            .map(|w| w.capacity as u64)
            .sum();
        let endpoints: Vec<Value> = eps
            .iter()
            .map(|w| {
                let share = if eligible(w) && total > 0 {
                    w.capacity as f64 / total as f64
                } else {
                    0.0
                };
                let target = w
                    .ip_like(dst.ip())
                    .map(|_| svc.endpoint_target(w, dst.port(), dst.is_ipv4()));
                json!({
                    "workload": w.uid, "target": target,
                    "identity": w.identity, "healthy": w.healthy(), "capacity": w.capacity,
                    "share": share,
                })
            })
            .collect();
        out["service"] = json!({
            "key": svc.key(), "ports": svc.ports, "waypoint": svc.waypoint,
            "endpoints": endpoints,
        });
    }
    // An example of the route (a service's endpoint is one pick among the shares above).
    let mut rng = fastrand::Rng::with_seed(0);
    let r = match route(state, src_wl, dst, &mut rng) {
        Ok(r) => r,
        Err(e) => {
            out["decision"] = "refused".into();
            out["reason"] = e.to_string().into();
            return out;
        }
    };
    out["route"] = json!({ "kind": r.kind() });
    let (target, dst_wl) = match &r {
        Route::Hbone {
            tunnel,
            authority,
            identities,
            workload,
            waypoint,
            ..
        } => {
            out["route"]["tunnel"] = json!(tunnel);
            out["route"]["authority"] = json!(authority);
            out["route"]["expectedIdentities"] = json!(identities);
            if *waypoint {
                out["route"]["waypoint"] = describe(workload, &state.node);
                out["decision"] = "to the waypoint".into();
                out["reason"] = "L7 policy and routing are the waypoint's".into();
                return out;
            }
            (*authority, Some(workload.clone()))
        }
        Route::Local {
            target, workload, ..
        } => {
            out["route"]["target"] = json!(target);
            (*target, Some(workload.clone()))
        }
        Route::Passthrough {
            target, workload, ..
        } => {
            out["route"]["target"] = json!(target);
            (*target, workload.clone())
        }
    };
    let Some(wl) = dst_wl.filter(|w| w.protocol == crate::config::Protocol::Hbone) else {
        out["decision"] = "passthrough".into();
        out["reason"] = "the destination is not in the mesh: plain TCP, no policy".into();
        return out;
    };
    out["destination"] = describe(&wl, &state.node);
    let conn = rbac::Connection {
        src_identity: Some(&src_wl.identity),
        src_ip: src,
        dst: target,
    };
    let policies: Vec<Value> = state
        .policies_for(&wl)
        .map(|p| json!({"policy": p.key(), "action": p.action, "matches": p.matches(&conn)}))
        .collect();
    out["policies"] = policies.into();
    let verdict = state
        .check_waypoint(&wl, target.port(), Some(&src_wl.identity))
        .and_then(|()| rbac::authorize(state.policies_for(&wl), &conn));
    match verdict {
        Ok(()) => out["decision"] = "allowed".into(),
        Err(d) => {
            out["decision"] = "denied".into();
            out["reason"] = d.to_string().into();
        }
    }
    out
}

/// The decision for a connection arriving at this node (the destination side of a path): on
/// 15008 the certificate ztunnel presents for the dialed pod, the peer identity it will see
/// (the client workload's), then the CONNECT's checks ([`crate::proxy::inbound::admit`]'s:
/// a local target served under that identity, a required waypoint, the policies); on 15006
/// the plaintext connection's policies, without an identity.
pub fn explain_inbound(state: &State, c: Inbound) -> Value {
    let hbone = c.dst.port() == port::INBOUND_HBONE;
    let listener = if hbone {
        port::INBOUND_HBONE
    } else {
        port::INBOUND_PLAINTEXT
    };
    let mut out = json!({
        "direction": "inbound", "src": c.src, "dst": c.dst, "listener": listener,
        "authority": c.authority,
    });
    let src_wl = state.workload_by_ip(c.src);
    if let Some(w) = src_wl {
        out["source"] = describe(w, &state.node);
    }
    let refuse = |mut out: Value, reason: String| {
        out["decision"] = "refused".into();
        out["reason"] = reason.into();
        out
    };
    let Some(dialed) = state.local_workload_by_ip(c.dst.ip()) else {
        return refuse(
            out,
            format!(
                "{} is not a workload of this node ({}): not a local destination",
                c.dst.ip(),
                state.node
            ),
        );
    };
    if hbone && state.is_waypoint(c.dst.ip()) {
        out["destination"] = describe(dialed, &state.node);
        out["decision"] = "to the local waypoint".into();
        out["reason"] = "relayed as TCP from the client's address: the waypoint terminates HBONE and checks the client itself".into();
        return out;
    }
    let (target, peer) = if hbone {
        out["servedIdentity"] = json!(dialed.identity);
        let peer = src_wl.map(|w| w.identity.clone());
        out["expectedPeerIdentity"] = json!(peer);
        if peer.is_none() {
            out["peerNote"] = "the source is no known workload: any certificate of the mesh CA is accepted, and its identity is what policies see".into();
        }
        (c.authority.unwrap_or(c.dst), peer)
    } else {
        (c.dst, None)
    };
    let Some(wl) = state.local_workload_by_ip(target.ip()) else {
        return refuse(
            out,
            format!("CONNECT {target}: not a workload of this node (answered 400)"),
        );
    };
    out["destination"] = describe(wl, &state.node);
    if hbone && wl.identity != dialed.identity {
        return refuse(
            out,
            format!(
                "CONNECT {target}: not served under the identity this tunnel verified ({}) (answered 400)",
                dialed.identity
            ),
        );
    }
    let conn = rbac::Connection {
        src_identity: peer.as_ref(),
        src_ip: c.src,
        dst: target,
    };
    let policies: Vec<Value> = state
        .policies_for(wl)
        .map(|p| json!({"policy": p.key(), "action": p.action, "matches": p.matches(&conn)}))
        .collect();
    out["policies"] = policies.into();
    let waypoints = state.required_waypoints(wl, target.port());
    out["requiredWaypoints"] = json!(waypoints);
    // As 15008 and 15006 do: the waypoint first (plaintext has no identity), then policies.
    let verdict = state
        .check_waypoint(wl, target.port(), peer.as_ref())
        .and_then(|()| rbac::authorize(state.policies_for(wl), &conn));
    match verdict {
        Ok(()) => {
            out["decision"] = "allowed".into();
            out["upstream"] = json!(target);
        }
        Err(d) => {
            out["decision"] = "denied".into();
            out["reason"] = d.to_string().into();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_local_config;

    const FILE: &str = r#"
workloads:
- {name: client, namespace: demo, serviceAccount: client, workloadIps: [10.0.0.1], protocol: HBONE, node: a}
- {name: app-1, namespace: demo, serviceAccount: app, workloadIps: [10.0.1.1], protocol: HBONE, node: b, services: {demo/app.demo.svc.cluster.local: {}}}
- {name: app-2, namespace: demo, serviceAccount: app, workloadIps: [10.0.1.2], protocol: HBONE, node: b, capacity: 3, services: {demo/app.demo.svc.cluster.local: {}}}
- {name: legacy, namespace: demo, workloadIps: [10.0.2.1], node: b}
- {name: wp, namespace: demo, serviceAccount: wp, workloadIps: [10.0.3.1], protocol: HBONE, node: b}
- {name: db, namespace: demo, serviceAccount: db, workloadIps: [10.0.3.2], protocol: HBONE, node: b, waypoint: {address: 10.0.3.1}}
services:
- {name: app, namespace: demo, hostname: app.demo.svc.cluster.local, vips: [10.96.0.10], ports: {80: 8080}}
policies:
- {name: no-client, namespace: demo, scope: Namespace, action: Deny, rules: [{principals: ["cluster.local/ns/demo/sa/client"], destinationPorts: [9999]}]}
"#;

    fn st() -> State {
        State::build(&parse_local_config(FILE).unwrap(), "cluster.local", "a").unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_service_shows_its_endpoints_shares_and_the_decision() {
        let v = explain(&st(), ip("10.0.0.1"), sa("10.96.0.10:80"));
        assert_eq!(v["route"]["kind"], "hbone", "{v:#}");
        assert_eq!(v["service"]["endpoints"][1]["share"], 0.75, "{v:#}");
        assert_eq!(v["service"]["endpoints"][0]["target"], "10.0.1.1:8080");
        assert_eq!(v["decision"], "allowed");
        assert_eq!(v["policies"][0]["matches"], false);
        // A policy that matches this port denies.
        let v = explain(&st(), ip("10.0.0.1"), sa("10.0.1.1:9999"));
        assert_eq!(v["decision"], "denied", "{v:#}");
        assert!(v["reason"].as_str().unwrap().contains("demo/no-client"));
    }

    #[test]
    fn waypoints_passthrough_and_refusals() {
        let v = explain(&st(), ip("10.0.0.1"), sa("10.0.3.2:5432"));
        assert_eq!(v["route"]["kind"], "waypoint", "{v:#}");
        assert_eq!(v["route"]["tunnel"], "10.0.3.1:15008");
        assert_eq!(
            v["route"]["expectedIdentities"][0],
            "spiffe://cluster.local/ns/demo/sa/wp"
        );
        let v = explain(&st(), ip("10.0.0.1"), sa("10.0.2.1:80"));
        assert_eq!(v["decision"], "passthrough", "{v:#}");
        let v = explain(&st(), ip("10.9.9.9"), sa("10.0.2.1:80"));
        assert_eq!(v["decision"], "refused");
        let v = explain(&st(), ip("10.0.1.1"), sa("10.0.2.1:80"));
        assert_eq!(v["decision"], "refused", "not a workload of this node");
        assert!(parse_query(Some("src=10.0.0.1&dst=10.96.0.10:80")).is_ok());
        assert!(parse_query(Some("src=x&dst=10.96.0.10:80")).is_err());
        assert!(parse_query(None).is_err());
    }

    const DUAL: &str = r#"
workloads:
- {name: client, namespace: demo, serviceAccount: client, workloadIps: [10.0.0.1, "fd00::1"], protocol: HBONE, node: a}
- {name: dual, namespace: demo, serviceAccount: app, workloadIps: [10.0.1.1, "fd00:1::1"], protocol: HBONE, node: b, services: {demo/app.demo.svc.cluster.local: {}}}
- {name: v4only, namespace: demo, serviceAccount: app, workloadIps: [10.0.1.2], protocol: HBONE, node: b, services: {demo/app.demo.svc.cluster.local: {}}}
services:
- {name: app, namespace: demo, hostname: app.demo.svc.cluster.local, vips: [10.96.0.10, "fd00:96::10"], ports: {80: 8080}}
policies:
- {name: v6-block, namespace: demo, scope: Namespace, action: Deny, rules: [{sourceIps: ["fd00::/120"]}]}
"#;

    #[test]
    fn v6_queries_and_a_v6_vip_show_only_v6_endpoints() {
        let st = State::build(&parse_local_config(DUAL).unwrap(), "cluster.local", "a").unwrap();
        // Bracketed, plain or percent-encoded.
        for q in [
            "src=fd00::1&dst=[fd00:96::10]:80",
            "src=fd00%3A%3A1&dst=%5Bfd00%3A96%3A%3A10%5D%3A80",
        ] {
            assert_eq!(
                parse_query(Some(q)).unwrap(),
                (ip("fd00::1"), sa("[fd00:96::10]:80")),
                "{q}"
            );
        }
        assert!(parse_query(Some("src=fd00::1&dst=fd00::10:80")).is_err());
        assert!(parse_query(Some("src=fd00::1&dst=%5Bfd00::10%5D")).is_err());
        assert!(parse_query(Some("src=%zz&dst=[::1]:80")).is_err());
        let v = explain(&st, ip("fd00::1"), sa("[fd00:96::10]:80"));
        assert_eq!(v["route"]["kind"], "hbone", "{v:#}");
        assert_eq!(v["route"]["tunnel"], "[fd00:1::1]:15008", "{v:#}");
        assert_eq!(v["route"]["authority"], "[fd00:1::1]:8080", "{v:#}");
        // The v4-only endpoint has no share of the v6 VIP.
        assert_eq!(v["service"]["endpoints"][0]["share"], 1.0, "{v:#}");
        assert_eq!(v["service"]["endpoints"][1]["share"], 0.0, "{v:#}");
        assert!(v["service"]["endpoints"][1]["target"].is_null(), "{v:#}");
        // The v6 ipBlock denies the v6 client; its v4 address is not in it.
        assert_eq!(v["decision"], "denied", "{v:#}");
        let v = explain(&st, ip("10.0.0.1"), sa("10.96.0.10:80"));
        assert_eq!(v["decision"], "allowed", "{v:#}");
        assert_eq!(v["service"]["endpoints"][1]["share"], 0.5, "{v:#}");
    }

    #[test]
    fn the_destination_side_of_hbone_and_plaintext() {
        // Node b's ztunnel: app-1 is local.
        let st = State::build(&parse_local_config(FILE).unwrap(), "cluster.local", "b").unwrap();
        let q = |q: &str| parse_inbound_query(Some(q)).unwrap();
        let v = explain_inbound(
            &st,
            q("src=10.0.0.1&dst=10.0.1.1:15008&authority=10.0.1.1:8080"),
        );
        assert_eq!(v["listener"], 15008, "{v:#}");
        assert_eq!(v["servedIdentity"], "spiffe://cluster.local/ns/demo/sa/app");
        assert_eq!(
            v["expectedPeerIdentity"],
            "spiffe://cluster.local/ns/demo/sa/client"
        );
        assert_eq!(v["destination"]["name"], "app-1");
        assert_eq!(v["decision"], "allowed", "{v:#}");
        assert_eq!(v["upstream"], "10.0.1.1:8080");
        // The client's identity is denied on 9999.
        let v = explain_inbound(
            &st,
            q("src=10.0.0.1&dst=10.0.1.1:15008&authority=10.0.1.1:9999"),
        );
        assert_eq!(v["decision"], "denied", "{v:#}");
        assert!(v["reason"].as_str().unwrap().contains("demo/no-client"));
        // Plaintext: no identity, so the principal rule does not match: allowed.
        let v = explain_inbound(&st, q("src=10.0.0.1&dst=10.0.1.1:9999"));
        assert_eq!(
            (v["listener"].as_u64(), v["decision"].as_str()),
            (Some(15006), Some("allowed")),
            "{v:#}"
        );
        assert!(v["servedIdentity"].is_null());
        // A CONNECT to a pod of another identity through this tunnel: refused.
        let v = explain_inbound(
            &st,
            q("src=10.0.0.1&dst=10.0.1.1:15008&authority=10.0.3.2:5432"),
        );
        assert_eq!(v["decision"], "refused", "{v:#}");
        assert!(
            v["reason"].as_str().unwrap().contains("not served under"),
            "{v:#}"
        );
        // db is behind the waypoint: only the waypoint's identity may send to it.
        let v = explain_inbound(
            &st,
            q("src=10.0.0.1&dst=10.0.3.2:15008&authority=10.0.3.2:5432"),
        );
        assert_eq!(v["decision"], "denied", "{v:#}");
        assert_eq!(
            v["requiredWaypoints"][0],
            "spiffe://cluster.local/ns/demo/sa/wp"
        );
        let v = explain_inbound(
            &st,
            q("src=10.0.3.1&dst=10.0.3.2:15008&authority=10.0.3.2:5432"),
        );
        assert_eq!(v["decision"], "allowed", "{v:#}");
        // Plaintext has no identity: a port behind the waypoint refuses it (15006 does).
        let v = explain_inbound(&st, q("src=10.0.0.1&dst=10.0.3.2:5432"));
        assert_eq!(v["decision"], "denied", "{v:#}");
        assert!(v["reason"].as_str().unwrap().contains("waypoint"), "{v:#}");
        // The waypoint's own 15008 is relayed to it.
        let v = explain_inbound(
            &st,
            q("src=10.0.0.1&dst=10.0.3.1:15008&authority=10.96.0.10:80"),
        );
        assert_eq!(v["decision"], "to the local waypoint", "{v:#}");
        // Not this node's: refused. On node a, app-1 is remote.
        let a = State::build(&parse_local_config(FILE).unwrap(), "cluster.local", "a").unwrap();
        let v = explain_inbound(
            &a,
            q("src=10.0.0.1&dst=10.0.1.1:15008&authority=10.0.1.1:8080"),
        );
        assert_eq!(v["decision"], "refused", "{v:#}");
        // An unknown source on 15008: any mesh identity, said so.
        let v = explain_inbound(
            &st,
            q("src=10.9.9.9&dst=10.0.1.1:15008&authority=10.0.1.1:8080"),
        );
        assert!(
            v["expectedPeerIdentity"].is_null() && v["peerNote"].is_string(),
            "{v:#}"
        );
        // The query: HBONE needs its authority; keys once, known ones only; v6.
        assert!(parse_inbound_query(Some("src=10.0.0.1&dst=10.0.1.1:15008")).is_err());
        assert!(parse_inbound_query(Some("src=10.0.0.1&dst=10.0.1.1:80&src=10.0.0.2")).is_err());
        assert!(parse_inbound_query(Some("src=10.0.0.1&dst=10.0.1.1:80&x=1")).is_err());
        assert!(parse_inbound_query(Some("src=10.0.0.1&dst=10.0.1.1:80&authority=x")).is_err());
        assert_eq!(
            q("src=fd00::1&dst=%5Bfd00:1::1%5D:15008&authority=[fd00:1::1]:8080").authority,
            Some(sa("[fd00:1::1]:8080"))
        );
    }
}
