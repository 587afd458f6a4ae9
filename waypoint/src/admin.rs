//! What the waypoint's side ports (ztunnel's admin server) show: `/config_dump` and
//! `/debug/route` on 15000 (localhost), `/metrics` on 15020, `/healthz/ready` on 15021.
//!
//! `/debug/route?src=<ip>&dst=<ip:port>[&method=GET][&path=/x][&host=h][&header=name:value]…`
//! is the waypoint's decision for one HTTP request, made as [`crate::proxy::http`] makes it
//! but without sending anything: the L7 policies (each with whether it matches) and their
//! verdict, the route rule that matches (or the default: the service itself), its backends
//! with their weights, and each backend's endpoints with their shares. The operators' path
//! explainer asks it when ztunnel's decision is "to the waypoint".

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::{json, Value};

use tokio_util::sync::CancellationToken;
use ztunnel::admin::AdminSource;
use ztunnel::identity::SecretManager;
use ztunnel::metrics::Metrics;
use ztunnel::proxy::pool::Pool;

use crate::authz::{self, Attrs, HttpAttrs};
use crate::config::Config;
use crate::proxy::http::{endpoints, Target};
use crate::proxy::upstream::Upstream;
use crate::route::RequestView;
use crate::state::{Destination, StateHandle, WaypointState};

pub struct WaypointAdmin {
    pub cfg: Arc<Config>,
    pub state: StateHandle,
    pub manager: Arc<SecretManager>,
    pub hbone: Arc<Pool>,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub draining: CancellationToken,
}

impl AdminSource for WaypointAdmin {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.is_cancelled()
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::json!({
            "config": *self.cfg,
            "configFile": self.state.status(),
            "waypoint": self.state.get().dump(),
            "certificates": self.manager.dump(),
            "pool": self.hbone.dump(),
            "upstream": self.upstream.dump(),
            "ready": self.is_ready(),
        })
    }

    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn debug(&self, path: &str, query: Option<&str>) -> Option<Result<Value, String>> {
        (path == "/debug/route")
            .then(|| RouteQuery::parse(query).map(|q| explain(&self.state.get(), &q)))
    }
}

/// One request to explain.
#[derive(Debug, Clone)]
pub struct RouteQuery {
    /// The client (the tunnel's verified source).
    pub src: IpAddr,
    /// The CONNECT's target: a service VIP:port or a workload's address:port.
    pub dst: SocketAddr,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    /// The Host; by default the service's hostname.
    pub host: Option<String>,
    pub headers: HeaderMap,
}

impl RouteQuery {
    /// `src=&dst=` and optionally `method=`, `path=` (with its own `?query`, percent-encoded),
    /// `host=`, and any number of `header=name:value`.
    pub fn parse(q: Option<&str>) -> Result<RouteQuery, String> {
        let (mut src, mut dst, mut host) = (None, None, None);
        let (mut method, mut path) = (Method::GET, "/".to_string());
        let mut headers = HeaderMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned();
            match k {
                "src" => src = Some(v.parse().map_err(|_| format!("src={v}: not an IP"))?),
                "dst" => {
                    dst = Some(
                        v.parse()
                            .map_err(|_| format!("dst={v}: not <ip>:<port> ([<ipv6>]:<port>)"))?,
                    )
                }
                "method" => {
                    method = Method::from_bytes(v.as_bytes())
                        .map_err(|_| format!("method={v}: not an HTTP method"))?
                }
                "path" if v.starts_with('/') => path = v,
                "path" => return Err(format!("path={v}: must start with /")),
                "host" => host = Some(v),
                "header" => {
                    let (n, val) = v
                        .split_once(':')
                        .ok_or_else(|| format!("header={v}: want name:value"))?;
                    let n = HeaderName::from_bytes(n.trim().as_bytes())
                        .map_err(|_| format!("header={v}: bad name"))?;
                    let val = HeaderValue::from_str(val.trim())
                        .map_err(|_| format!("header={v}: bad value"))?;
                    headers.append(n, val);
                }
                _ => {
                    return Err(format!(
                        "{pair:?}: want src=<ip>&dst=<ip:port>[&method=][&path=][&host=][&header=name:value]"
                    ))
                }
            }
        }
        let (Some(src), Some(dst)) = (src, dst) else {
            return Err("want src=<ip>&dst=<ip:port>".into());
        };
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path, None),
        };
        Ok(RouteQuery {
            src,
            dst,
            method,
            path,
            query,
            host,
            headers,
        })
    }
}

/// A target's endpoints with their shares (by capacity, as the waypoint picks them).
fn endpoint_list(st: &WaypointState, target: &Target, v4: bool) -> Vec<Value> {
    let eps = endpoints(st, target, v4);
    let total: u64 = eps.iter().map(|(w, _)| u64::from(w.capacity)).sum();
    eps.iter()
        .map(|(w, e)| {
            json!({
                "workload": format!("{}/{}", w.namespace, w.name), "uid": w.uid,
                "node": w.node, "target": e.addr, "hbone": e.hbone,
                "identities": e.identities,
                "share": if total > 0 { f64::from(w.capacity) / total as f64 } else { 0.0 },
            })
        })
        .collect()
}

/// The waypoint's decision for one HTTP request (see the module's doc).
pub fn explain(st: &WaypointState, q: &RouteQuery) -> Value {
    let mut out = json!({
        "waypoint": format!("{}/{}", st.me.namespace, st.me.name), "src": q.src, "dst": q.dst,
        "request": {"method": q.method.as_str(), "path": q.path, "query": q.query},
    });
    let dest = match st.destination(q.dst) {
        Ok(d) => d,
        Err(e) => {
            out["decision"] = "refused".into();
            out["reason"] = format!("{e} (the CONNECT is answered 400)").into();
            return out;
        }
    };
    let src_wl = st.mesh.workload_by_ip(q.src);
    // The tunnel's peer identity is the client workload's (its ztunnel presents that
    // certificate).
    let principal = src_wl.map(|w| w.identity.clone());
    out["principal"] = json!(principal);
    let (ns, name, host) = match &dest {
        Destination::Service(s, _) => (s.namespace.as_str(), s.name.as_str(), s.hostname.clone()),
        Destination::Workload(w, _) => (w.namespace.as_str(), "", q.dst.to_string()),
    };
    let host = q.host.clone().unwrap_or(host);
    out["destination"] = match &dest {
        Destination::Service(s, p) => json!({"service": s.key(), "port": p}),
        Destination::Workload(w, p) => json!({"workload": w.uid, "port": p}),
    };
    let attrs = Attrs {
        principal: principal.as_ref(),
        source_ip: q.src,
        remote_ip: q.src,
        destination_ip: q.dst.ip(),
        destination_port: q.dst.port(),
        http: Some(HttpAttrs {
            host: &host,
            method: q.method.as_str(),
            path: &q.path,
            headers: &q.headers,
        }),
    };
    // Each policy alone: an ALLOW that passes, or a DENY that refuses, matches.
    let policies: Vec<Value> = st
        .policies_for(ns, name)
        .map(|p| {
            let alone = authz::authorize(std::iter::once(p), &attrs);
            let matches = match p.action {
                crate::config::Action::Deny => alone.is_err(),
                _ => alone.is_ok(),
            };
            json!({"policy": p.key(), "action": p.action, "matches": matches})
        })
        .collect();
    out["policies"] = policies.into();
    if let Err(d) = authz::authorize(st.policies_for(ns, name), &attrs) {
        out["decision"] = "denied".into();
        out["reason"] = format!("{d} (answered 403 RBAC: access denied)").into();
        return out;
    }
    let v4 = q.dst.is_ipv4();
    let requested = match &dest {
        Destination::Service(s, p) => Target::Service(s.clone(), *p),
        Destination::Workload(w, p) => Target::Workload(w.clone(), *p),
    };
    let view = RequestView {
        method: &q.method,
        path: &q.path,
        query: q.query.as_deref(),
        headers: &q.headers,
    };
    let chosen = match &dest {
        Destination::Service(s, p) => st.routes.choose(&s.key(), *p, &host, &view),
        Destination::Workload(..) => None,
    };
    out["decision"] = "allowed".into();
    let Some(c) = chosen else {
        out["route"] = json!({
            "rule": null,
            "default": "no route rule matches: the requested service itself, same port",
            "backends": [{
                "service": match &dest { Destination::Service(s, _) => json!(s.key()), Destination::Workload(w, _) => json!(w.uid) },
                "port": dest.port(), "weight": 1, "share": 1.0,
                "endpoints": endpoint_list(st, &requested, v4),
            }],
        });
        return out;
    };
    let total: u64 = c.rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    let backends: Vec<Value> = c
        .rule
        .backends
        .iter()
        .map(|b| {
            json!({
                "service": b.service.key(), "port": b.port, "weight": b.weight,
                "share": if total > 0 { f64::from(b.weight) / total as f64 } else { 0.0 },
                "endpoints": endpoint_list(st, &Target::Service(b.service.clone(), b.port), v4),
            })
        })
        .collect();
    out["route"] = json!({
        "rule": format!("{}#{}", c.rule.route, c.rule.index),
        "matched": c.matched,
        "filters": c.rule.filters,
        "redirect": c.rule.redirect(),
        "backends": backends,
    });
    if c.rule.redirect().is_none() && total == 0 {
        out["decision"] = "no backend".into();
        out["reason"] = "the rule has no backend with a weight (answered 500)".into();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_file;

    const FILE: &str = r#"
waypoint: {name: waypoint, namespace: demo}
workloads:
- {name: waypoint, namespace: demo, serviceAccount: waypoint, workloadIps: [10.0.0.9], protocol: HBONE, node: b}
- {name: client, namespace: demo, serviceAccount: client, workloadIps: [10.0.0.1], protocol: HBONE, node: a}
- {name: r1, namespace: demo, serviceAccount: reviews, workloadIps: [10.0.1.1], protocol: HBONE, node: a, services: {demo/reviews.demo.svc.cluster.local: {}}}
- {name: r2, namespace: demo, serviceAccount: reviews, workloadIps: [10.0.1.2], protocol: HBONE, node: b, services: {demo/reviews-v2.demo.svc.cluster.local: {}}}
services:
- {name: reviews, namespace: demo, hostname: reviews.demo.svc.cluster.local, vips: [10.96.0.20], ports: {80: 8080}, waypoint: {address: 10.0.0.9}}
- {name: reviews-v2, namespace: demo, hostname: reviews-v2.demo.svc.cluster.local, vips: [10.96.0.21], ports: {80: 9080}, waypoint: {address: 10.0.0.9}}
- {name: other, namespace: demo, hostname: other.demo.svc.cluster.local, vips: [10.96.0.30], ports: {80: 80}}
routes:
- name: by-header
  namespace: demo
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: reviews-v2, port: 80}]
  - backendRefs: [{name: reviews, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
policies:
- name: no-admin
  namespace: demo
  targetRefs: [{kind: Service, name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

    fn st() -> WaypointState {
        WaypointState::build(&parse_file(FILE).unwrap(), "cluster.local").unwrap()
    }

    fn ask(q: &str) -> Value {
        explain(&st(), &RouteQuery::parse(Some(q)).unwrap())
    }

    #[test]
    fn the_rule_its_backends_weights_endpoints_and_policies() {
        let v = ask("src=10.0.0.1&dst=10.96.0.20:80&header=x-version:v2");
        assert_eq!(v["decision"], "allowed", "{v:#}");
        assert_eq!(v["principal"], "spiffe://cluster.local/ns/demo/sa/client");
        assert_eq!(v["route"]["rule"], "demo/by-header#0", "{v:#}");
        let b = &v["route"]["backends"][0];
        assert_eq!(b["service"], "demo/reviews-v2.demo.svc.cluster.local");
        assert_eq!(b["endpoints"][0]["target"], "10.0.1.2:9080", "{v:#}");
        assert_eq!(b["endpoints"][0]["hbone"], true);
        assert_eq!(v["policies"][0]["matches"], false);
        // No header: the weighted rule.
        let v = ask("src=10.0.0.1&dst=10.96.0.20:80&path=/x%3Fa%3D1");
        assert_eq!(v["route"]["rule"], "demo/by-header#1", "{v:#}");
        assert_eq!(v["route"]["backends"][0]["share"], 0.9);
        assert_eq!(v["route"]["backends"][1]["weight"], 10);
        assert_eq!(v["request"]["query"], "a=1");
        assert_eq!(
            v["route"]["backends"][0]["endpoints"][0]["target"],
            "10.0.1.1:8080"
        );
        // The L7 policy denies /admin, and says which one.
        let v = ask("src=10.0.0.1&dst=10.96.0.20:80&path=/admin/x&method=POST");
        assert_eq!(v["decision"], "denied", "{v:#}");
        assert_eq!(v["policies"][0]["matches"], true);
        assert!(
            v["reason"].as_str().unwrap().contains("demo/no-admin"),
            "{v:#}"
        );
        // A service without routes: the default, the service itself.
        let v = ask("src=10.0.0.1&dst=10.96.0.21:80");
        assert!(v["route"]["rule"].is_null(), "{v:#}");
        assert_eq!(v["route"]["backends"][0]["endpoints"][0]["share"], 1.0);
        // Not served here: refused like the CONNECT.
        let v = ask("src=10.0.0.1&dst=10.96.0.30:80");
        assert_eq!(v["decision"], "refused", "{v:#}");
    }

    #[test]
    fn bad_queries_are_refused() {
        for q in [
            "",
            "src=10.0.0.1",
            "src=x&dst=10.96.0.20:80",
            "src=10.0.0.1&dst=10.96.0.20:80&path=x",
            "src=10.0.0.1&dst=10.96.0.20:80&header=novalue",
            "src=10.0.0.1&dst=10.96.0.20:80&method=G%20T",
            "src=10.0.0.1&dst=10.96.0.20:80&other=1",
        ] {
            assert!(RouteQuery::parse(Some(q)).is_err(), "{q}");
        }
    }
}
