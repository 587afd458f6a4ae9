//! The lab's data plane: one `ztunnel` per ztunnel netns, configured from the topology
//! (pods → workloads with a service account each, the Services → services with their
//! ClusterIPs, and `waypoint: {address}` on the reviews Services and workloads), all sharing
//! one lab CA directory.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambient_net::consts::port;
use ambient_net::netns;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::procs;
use crate::state::{LabState, PodRole};

/// The local config file all ztunnels read (each serves only its own node's workloads).
pub const CONFIG_FILE: &str = "ztunnel-config.yaml";
/// The lab CA's directory under the run dir: the first ztunnel creates the root there.
pub const CA_DIR: &str = "ztunnel-ca";
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The node name ztunnel is told (`--node-name`) and workloads carry.
pub fn node_name(node: &str) -> String {
    format!("node{node}")
}

pub fn config_path(run_dir: &Path) -> PathBuf {
    run_dir.join(CONFIG_FILE)
}

/// ztunnel's local config file, as the lab writes it (YAML: service ports are integer keys).
#[derive(Debug, Clone, Serialize)]
pub struct LocalConfig {
    pub workloads: Vec<Value>,
    pub services: Vec<LocalService>,
    /// In ztunnel's policy schema; tests replace it to change authorization.
    pub policies: Value,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalService {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<String>,
    pub ports: BTreeMap<u16, u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

/// `waypoint:` of a service or workload: the waypoint's workload IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointRef {
    pub address: String,
}

impl WaypointRef {
    fn of(ip: Option<Ipv4Addr>) -> Option<WaypointRef> {
        ip.map(|ip| WaypointRef {
            address: ip.to_string(),
        })
    }
}

/// The local config for the lab's pods and Services, with `policies`.
pub fn render_config(state: &LabState, policies: &Value) -> LocalConfig {
    LocalConfig {
        workloads: render_workloads(state),
        services: render_services(state),
        policies: policies.clone(),
    }
}

/// Every pod but the ztunnels as a workload of ztunnel's schema: its Services (those it is
/// an endpoint of) and its own waypoint, if any.
pub fn render_workloads(state: &LabState) -> Vec<Value> {
    state
        .pods
        .iter()
        .filter(|p| p.role != PodRole::Ztunnel)
        .filter_map(|p| {
            // Every address of the pod (v4 and v6 in a dual lab), the primary first.
            let ips: Vec<String> = p.addresses().iter().map(|ip| ip.to_string()).collect();
            if ips.is_empty() {
                return None;
            }
            let mut w = json!({
                "uid": p.uid,
                "name": p.k8s_name,
                "namespace": p.namespace,
                "serviceAccount": p.service_account(),
                "workloadIps": ips,
                // The waypoint speaks HBONE whether or not its node captures it.
                "protocol": if p.ambient || p.role == PodRole::Waypoint { "HBONE" } else { "TCP" },
                "node": node_name(&p.node),
            });
            let services: serde_json::Map<String, Value> = state
                .services
                .iter()
                .filter(|s| s.endpoints().iter().any(|e| e.pod == p.id))
                .map(|s| {
                    let key = format!("{}/{}", s.namespace, hostname(&s.name, &s.namespace));
                    (key, json!({}))
                })
                .collect();
            if !services.is_empty() {
                w["services"] = Value::Object(services);
            }
            if let Some(wp) = WaypointRef::of(p.waypoint) {
                w["waypoint"] = json!(wp);
            }
            Some(w)
        })
        .collect()
}

/// The lab's Services in ztunnel's schema.
pub fn render_services(state: &LabState) -> Vec<LocalService> {
    state
        .services
        .iter()
        .map(|s| LocalService {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: hostname(&s.name, &s.namespace),
            // Both ClusterIPs of a dual-stack Service.
            vips: s.vips().iter().map(|ip| ip.to_string()).collect(),
            ports: [(s.port, s.target_port)].into(),
            waypoint: WaypointRef::of(s.waypoint),
        })
        .collect()
}

/// `<name>.<namespace>.svc.cluster.local`.
pub fn hostname(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{TRUST_DOMAIN}")
}

/// Writes the config atomically (ztunnel polls it and reloads on change).
pub fn write_config(run_dir: &Path, config: &LocalConfig) -> Result<PathBuf> {
    let path = config_path(run_dir);
    write_yaml_atomically(&path, config)?;
    Ok(path)
}

/// `value` as YAML at `path`, replaced in one step (temp file + rename), so a proxy polling
/// the file never reads it half-written.
pub fn write_yaml_atomically(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, serde_yaml_ng::to_string(value)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// `ztunnel`'s command line for one node.
pub fn argv(bin: &Path, run_dir: &Path, node: &str) -> Vec<String> {
    vec![
        bin.display().to_string(),
        "--config".into(),
        config_path(run_dir).display().to_string(),
        "--node-name".into(),
        node_name(node),
        "--trust-domain".into(),
        TRUST_DOMAIN.into(),
        "--ca-dir".into(),
        run_dir.join(CA_DIR).display().to_string(),
    ]
}

/// Waits until ztunnel in `netns_name` answers 200 on its readiness endpoint.
pub fn wait_ready(netns_name: &str, child: &mut std::process::Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("ztunnel exited ({status})\n{}", procs::log_tail(log, 15));
        }
        let ok = netns::run_in(&netns::named_path(netns_name), ready_once)?;
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("ztunnel not ready after 15s\n{}", procs::log_tail(log, 15));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// One `GET /healthz/ready` on the readiness port; true on 200.
pub fn ready_once() -> bool {
    http_get(port::READINESS, "/healthz/ready")
        .map(|(code, _)| code == 200)
        .unwrap_or(false)
}

/// A plain HTTP/1.0 GET to 127.0.0.1:`port` in the calling thread's netns.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service;
    use crate::up::planned_state;
    use std::net::IpAddr;

    /// The lab's config as ztunnel itself parses and indexes it: the reviews Services and
    /// workloads behind the waypoint, the waypoint a plain HBONE workload of its own.
    #[test]
    fn ztunnel_accepts_the_lab_config_with_the_waypoint() {
        let state = planned_state("unit").unwrap();
        let wp_ip = state.waypoint.as_ref().unwrap().ip;
        assert_eq!(wp_ip, Ipv4Addr::new(10, 244, 2, 7));
        let yaml = serde_yaml_ng::to_string(&render_config(&state, &json!([]))).unwrap();
        let cfg =
            ::ztunnel::config::parse_local_config(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        for node in ["nodeA", "nodeB"] {
            let st = ::ztunnel::state::State::build(&cfg, TRUST_DOMAIN, node)
                .unwrap_or_else(|e| panic!("{node}: {e}\n{yaml}"));
            assert!(st.is_waypoint(IpAddr::V4(wp_ip)));
            for (vip, endpoints) in [
                (service::REVIEWS_IP, 2),
                (service::REVIEWS_V1_IP, 1),
                (service::REVIEWS_V2_IP, 1),
            ] {
                let svc = st.service_by_vip(IpAddr::V4(vip)).expect("reviews VIP");
                assert_eq!(
                    svc.waypoint.as_ref().map(|w| w.address),
                    Some(IpAddr::V4(wp_ip)),
                    "{vip}"
                );
                assert_eq!(svc.ports.get(&80), Some(&8080));
                assert_eq!(st.endpoints(svc).len(), endpoints, "{vip}");
            }
            let app = st.service_by_vip(IpAddr::V4(service::CLUSTER_IP)).unwrap();
            assert!(app.waypoint.is_none());
            let v1_ip = state.pod("a-reviews-v1").unwrap().ip.unwrap();
            let v1 = st.workload_by_ip(IpAddr::V4(v1_ip)).unwrap();
            assert_eq!(v1.service_account, "reviews");
            assert_eq!(v1.waypoint.as_ref().unwrap().address, IpAddr::V4(wp_ip));
            // Behind the waypoint on 8080: only the waypoint's identity may connect.
            let ids = st.required_waypoints(v1, 8080);
            assert_eq!(ids.len(), 1);
            assert_eq!(
                ids[0].to_string(),
                "spiffe://cluster.local/ns/demo/sa/waypoint"
            );
            let wp = st.workload_by_ip(IpAddr::V4(wp_ip)).unwrap();
            assert_eq!(wp.service_account, "waypoint");
            assert_eq!(wp.protocol, ::ztunnel::config::Protocol::Hbone);
            assert!(wp.waypoint.is_none());
            let b_app = state.pod("b-app").unwrap().ip.unwrap();
            assert!(st
                .workload_by_ip(IpAddr::V4(b_app))
                .unwrap()
                .waypoint
                .is_none());
        }
    }

    /// A dual lab's config: ztunnel indexes every pod by both addresses and every Service by
    /// both ClusterIPs; an ipv6 lab's by its v6 ones (and has no waypoint).
    #[test]
    fn ztunnel_accepts_dual_and_v6_lab_configs() {
        use crate::topology::IpFamily;
        for family in [IpFamily::Dual, IpFamily::Ipv6] {
            let state = crate::up::planned_state_for("unit", family).unwrap();
            let yaml = serde_yaml_ng::to_string(&render_config(&state, &json!([]))).unwrap();
            let cfg = ::ztunnel::config::parse_local_config(&yaml)
                .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            let st = ::ztunnel::state::State::build(&cfg, TRUST_DOMAIN, "nodeA")
                .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            let b_app = state.pod("b-app").unwrap();
            assert_eq!(b_app.addresses().len(), usize::from(family.has_v4()) + 1);
            for ip in b_app.addresses() {
                let w = st
                    .workload_by_ip(ip)
                    .unwrap_or_else(|| panic!("{ip}\n{yaml}"));
                assert_eq!(w.service_account, "app");
            }
            let v6 = IpAddr::V6(service::REVIEWS_IP6);
            let svc = st.service_by_vip(v6).expect("v6 reviews VIP");
            assert_eq!(st.endpoints(svc).len(), 2);
            assert_eq!(
                st.service_by_vip(IpAddr::V4(service::REVIEWS_IP)).is_some(),
                family.has_v4()
            );
            assert_eq!(svc.waypoint.is_some(), family.has_v4(), "{family:?}");
        }
    }

    #[test]
    fn workloads_list_every_service_they_serve() {
        let state = planned_state("unit").unwrap();
        let w = render_workloads(&state);
        let find = |name: &str| w.iter().find(|x| x["name"] == name).unwrap().clone();
        let v1 = find("reviews-v1-a");
        let keys: Vec<&String> = v1["services"].as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "demo/reviews-v1.demo.svc.cluster.local",
                "demo/reviews.demo.svc.cluster.local"
            ]
        );
        assert_eq!(find("app-b")["services"].as_object().unwrap().len(), 1);
        assert!(find("app-a").get("services").is_none());
        assert!(w.iter().all(|x| x["name"] != "ztunnel-a"));
        // 11 pods but the 2 ztunnels.
        assert_eq!(w.len(), 9);
    }
}
