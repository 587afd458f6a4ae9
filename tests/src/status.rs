//! `ambient-lab status`: the topology as JSON (for tests and tools) or a table (for people).
//! The same types are what the test harness parses.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::procs;
use crate::state::{no_v4, EndpointState, LabState, PodRole};
use crate::topology::IpFamily;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabStatus {
    pub prefix: String,
    pub run_dir: PathBuf,
    pub state_file: PathBuf,
    /// `building` (up running or died) or `ready`.
    pub phase: String,
    pub primary: String,
    pub dataplane: String,
    pub agent: bool,
    pub tunnel: String,
    /// `ipv4`, `ipv6` or `dual` (`up --ip-family`).
    #[serde(default)]
    pub ip_family: IpFamily,
    /// The libcni client the lab drives the chain with.
    pub cniclient: Option<PathBuf>,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    pub ztunnels: Vec<ZtunnelStatus>,
    pub services: Vec<ServiceStatus>,
    /// The waypoint (absent in labs from before it existed).
    #[serde(default)]
    pub waypoint: Option<WaypointStatus>,
    pub processes: Vec<ProcessStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub underlay_dev: String,
    /// 0.0.0.0 (and not in the JSON) in an ipv6 lab, as `gateway`; `pod_cidr` is empty.
    #[serde(default = "no_v4::absent", skip_serializing_if = "no_v4::is_absent")]
    pub underlay_ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_cidr: String,
    #[serde(default = "no_v4::absent", skip_serializing_if = "no_v4::is_absent")]
    pub gateway: Ipv4Addr,
    /// The underlay's v6 address: the ULA in an ipv6 lab, the fixed link-local (the v6 pod
    /// routes' next hop) in a dual one.
    #[serde(default)]
    pub underlay_ip6: Option<Ipv6Addr>,
    #[serde(default)]
    pub pod_cidr6: Option<String>,
    #[serde(default)]
    pub gateway6: Option<Ipv6Addr>,
    pub conflist: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_network: String,
    pub cni_cache_dir: PathBuf,
    /// CNI_PATH as the lab used it.
    pub cni_path: String,
    pub cni_log: Option<PathBuf>,
    pub agent: Option<AgentStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub pid: Option<i32>,
    pub alive: bool,
    pub socket: PathBuf,
    pub health_addr: String,
    pub state_dir: PathBuf,
    pub tunnel: String,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// `a-app`: also the netns short name for `exec` and the harness.
    pub id: String,
    pub name: String,
    pub k8s_name: String,
    pub namespace: String,
    pub node: String,
    pub netns: String,
    /// The IPv4 address (the primary in ipv4 and dual labs; none in an ipv6 lab).
    pub ip: Option<Ipv4Addr>,
    /// The IPv6 address (ipv6 and dual labs).
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    /// Every address the CNI result gave, the primary first.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    pub ambient: bool,
    pub ztunnel: bool,
    pub host_veth: Option<String>,
    pub container_id: String,
    pub uid: String,
    pub server: Option<ServerStatus>,
    #[serde(default)]
    pub service_account: String,
    /// What its HTTP server reports as `version`.
    #[serde(default)]
    pub version: Option<String>,
    /// Its workload-level waypoint.
    #[serde(default)]
    pub waypoint: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerStatus {
    pub pid: i32,
    pub port: u16,
    /// The HTTP server's port (h1 and h2c).
    #[serde(default)]
    pub http_port: Option<u16>,
    pub alive: bool,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZtunnelStatus {
    pub node: String,
    pub pod: String,
    pub netns: String,
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    pub host_veth: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub name: String,
    pub namespace: String,
    /// The v4 ClusterIP (0.0.0.0, not in the JSON, in an ipv6 lab; as `backend_ip`).
    #[serde(default = "no_v4::absent", skip_serializing_if = "no_v4::is_absent")]
    pub cluster_ip: Ipv4Addr,
    /// The v6 ClusterIP (ipv6 and dual labs).
    #[serde(default)]
    pub cluster_ip6: Option<Ipv6Addr>,
    /// Every ClusterIP, the primary first (Kubernetes' `clusterIPs`).
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub target_port: u16,
    pub backend_pod: String,
    #[serde(default = "no_v4::absent", skip_serializing_if = "no_v4::is_absent")]
    pub backend_ip: Ipv4Addr,
    pub nodes: Vec<String>,
    /// `<name>.<namespace>.svc.cluster.local`.
    #[serde(default)]
    pub hostname: String,
    /// Every endpoint (pod id and IP), `backend_pod` first.
    #[serde(default)]
    pub endpoints: Vec<EndpointState>,
    /// The waypoint ztunnel sends its traffic to.
    #[serde(default)]
    pub waypoint: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointStatus {
    /// Pod id (`b-waypoint`).
    pub pod: String,
    pub k8s_name: String,
    pub namespace: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub service_account: String,
    /// `spiffe://cluster.local/ns/demo/sa/waypoint`.
    pub identity: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub hbone_addr: String,
    pub metrics_addr: String,
    pub admin_addr: String,
    pub readiness_addr: String,
    /// Whether its process runs.
    pub running: bool,
    pub pid: Option<i32>,
    /// Why it was not started (`--no-waypoint`, `--dataplane none`, `--no-agent`).
    pub not_started: Option<String>,
    /// `<namespace>/<name>` of the Services it serves.
    pub services: Vec<String>,
    /// Pod ids of the workloads whose own waypoint it is.
    pub workloads: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessStatus {
    pub name: String,
    pub pid: i32,
    pub start_time: u64,
    pub alive: bool,
    pub netns: String,
    pub log: PathBuf,
}

impl LabStatus {
    pub fn from_state(s: &LabState) -> Self {
        let proc_alive = |name: &str| s.process(name).map(|p| (p, procs::is_alive(p)));
        let nodes = s
            .nodes
            .iter()
            .map(|n| NodeStatus {
                name: n.name.clone(),
                netns: n.netns.clone(),
                underlay_dev: n.underlay_dev.clone(),
                underlay_ip: n.underlay_ip,
                pod_cidr: n.pod_cidr.clone(),
                gateway: n.gateway,
                underlay_ip6: n.underlay_ip6,
                pod_cidr6: n.pod_cidr6.clone(),
                gateway6: n.gateway6,
                conflist: n.cni.conflist.clone(),
                cni_conf_dir: n.cni.conf_dir.clone(),
                cni_network: n.cni.network.clone(),
                cni_cache_dir: n.cni.cache_dir.clone(),
                cni_path: n.cni.cni_path.clone(),
                cni_log: n.cni.log_file.clone(),
                agent: n.agent.as_ref().map(|a| {
                    let p = proc_alive(&a.process);
                    AgentStatus {
                        pid: p.map(|(r, _)| r.pid),
                        alive: p.is_some_and(|(_, alive)| alive),
                        socket: a.socket.clone(),
                        health_addr: a.health_addr.clone(),
                        state_dir: a.state_dir.clone(),
                        tunnel: a.tunnel.clone(),
                        log: a.log.clone(),
                    }
                }),
            })
            .collect();
        let pods =
            s.pods
                .iter()
                .map(|p| PodStatus {
                    id: p.id.clone(),
                    name: p.name.clone(),
                    k8s_name: p.k8s_name.clone(),
                    namespace: p.namespace.clone(),
                    node: p.node.clone(),
                    netns: p.netns.clone(),
                    ip: p.ip,
                    ip6: p.ip6,
                    ips: p.addresses(),
                    ambient: p.ambient,
                    ztunnel: p.role == PodRole::Ztunnel,
                    host_veth: p.host_veth.clone(),
                    container_id: p.container_id.clone(),
                    uid: p.uid.clone(),
                    server: p.server.as_deref().and_then(proc_alive).map(|(r, alive)| {
                        ServerStatus {
                            pid: r.pid,
                            port: p.server_port.unwrap_or_default(),
                            http_port: p.http_port,
                            alive,
                            log: r.log.clone(),
                        }
                    }),
                    service_account: p.service_account().to_string(),
                    version: p.version.clone(),
                    waypoint: p.waypoint,
                })
                .collect();
        let ztunnels = s
            .pods
            .iter()
            .filter(|p| p.role == PodRole::Ztunnel)
            .map(|p| ZtunnelStatus {
                node: p.node.clone(),
                pod: p.id.clone(),
                netns: p.netns.clone(),
                ip: p.ip,
                ip6: p.ip6,
                host_veth: p.host_veth.clone(),
            })
            .collect();
        let services = s
            .services
            .iter()
            .map(|v| ServiceStatus {
                name: v.name.clone(),
                namespace: v.namespace.clone(),
                cluster_ip: v.cluster_ip,
                cluster_ip6: v.cluster_ip6,
                cluster_ips: v.vips(),
                port: v.port,
                target_port: v.target_port,
                backend_pod: v.backend_pod.clone(),
                backend_ip: v.backend_ip,
                nodes: v.nodes.clone(),
                hostname: v.hostname(),
                endpoints: v.endpoints(),
                waypoint: v.waypoint,
            })
            .collect();
        let waypoint = s.waypoint.as_ref().map(|w| {
            let p = proc_alive(&w.process);
            WaypointStatus {
                pod: w.pod.clone(),
                k8s_name: w.k8s_name.clone(),
                namespace: w.namespace.clone(),
                node: w.node.clone(),
                netns: s.pod(&w.pod).map(|p| p.netns.clone()).unwrap_or_default(),
                ip: w.ip,
                service_account: w.service_account.clone(),
                identity: w.identity.clone(),
                config: w.config.clone(),
                log: w.log.clone(),
                hbone_addr: w.hbone_addr.clone(),
                metrics_addr: w.metrics_addr.clone(),
                admin_addr: w.admin_addr.clone(),
                readiness_addr: w.readiness_addr.clone(),
                running: p.is_some_and(|(_, alive)| alive),
                pid: p.map(|(r, _)| r.pid),
                not_started: w.not_started.clone(),
                services: w.services.clone(),
                workloads: w.workloads.clone(),
            }
        });
        let processes = s
            .processes
            .iter()
            .map(|p| ProcessStatus {
                name: p.name.clone(),
                pid: p.pid,
                start_time: p.start_time,
                alive: procs::is_alive(p),
                netns: p.netns.clone(),
                log: p.log.clone(),
            })
            .collect();
        Self {
            prefix: s.prefix.clone(),
            run_dir: s.run_dir.clone(),
            state_file: s.path(),
            phase: format!("{:?}", s.phase).to_lowercase(),
            primary: s.options.primary.clone(),
            dataplane: s.options.dataplane.clone(),
            agent: s.options.agent,
            tunnel: s.options.tunnel.clone(),
            ip_family: s.options.ip_family,
            cniclient: s.cniclient.clone(),
            nodes,
            pods,
            ztunnels,
            services,
            waypoint,
            processes,
        }
    }

    pub fn pod(&self, id: &str) -> Option<&PodStatus> {
        self.pods.iter().find(|p| p.id == id)
    }

    pub fn node(&self, name: &str) -> Option<&NodeStatus> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// A readable rendering.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "lab {} ({}): {}, primary {}, dataplane {}, agent {}, tunnel {}\nstate {}",
            self.prefix,
            self.phase,
            self.ip_family.as_str(),
            self.primary,
            self.dataplane,
            if self.agent { "on" } else { "off" },
            self.tunnel,
            self.state_file.display()
        );
        let _ = writeln!(
            out,
            "\nNODE  NETNS              UNDERLAY     POD CIDR         GATEWAY      AGENT"
        );
        for n in &self.nodes {
            let agent = match &n.agent {
                Some(a) => format!(
                    "pid {} {} {} health {}",
                    a.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    if a.alive { "up" } else { "DOWN" },
                    a.socket.display(),
                    a.health_addr
                ),
                None => "-".into(),
            };
            let v4 = |ip: Ipv4Addr| no_v4::present(ip).map(|i| i.to_string());
            let both = |a: Option<String>, b: Option<String>| {
                let v: Vec<String> = a.into_iter().chain(b).collect();
                if v.is_empty() {
                    "-".to_string()
                } else {
                    v.join(",")
                }
            };
            let cidr4 = (!n.pod_cidr.is_empty()).then(|| n.pod_cidr.clone());
            let _ = writeln!(
                out,
                "{:<5} {:<18} {:<12} {:<16} {:<12} {}",
                n.name,
                n.netns,
                both(v4(n.underlay_ip), n.underlay_ip6.map(|i| i.to_string())),
                both(cidr4, n.pod_cidr6.clone()),
                both(v4(n.gateway), n.gateway6.map(|i| i.to_string())),
                agent
            );
        }
        let _ = writeln!(out, "\nPOD          K8S NAMESPACE/NAME       NETNS                IP           AMBIENT  HOST VETH        SERVER");
        for p in &self.pods {
            let server = match &p.server {
                Some(s) => format!(
                    ":{}{} pid {} {}{}",
                    s.port,
                    s.http_port
                        .map(|h| format!(" http :{h}"))
                        .unwrap_or_default(),
                    s.pid,
                    if s.alive { "up" } else { "DOWN" },
                    p.version
                        .as_deref()
                        .map(|v| format!(" {v}"))
                        .unwrap_or_default()
                ),
                None if p.ztunnel => "(ztunnel)".into(),
                None if self.waypoint.as_ref().is_some_and(|w| w.pod == p.id) => {
                    "(waypoint)".into()
                }
                None => "-".into(),
            };
            let _ = writeln!(
                out,
                "{:<12} {:<24} {:<20} {:<12} {:<8} {:<16} {}",
                p.id,
                format!("{}/{}", p.namespace, p.k8s_name),
                p.netns,
                if p.ips.is_empty() {
                    p.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into())
                } else {
                    p.ips
                        .iter()
                        .map(IpAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                },
                if p.ambient { "yes" } else { "no" },
                p.host_veth.as_deref().unwrap_or("-"),
                server
            );
        }
        let _ = writeln!(out, "\nSERVICE          CLUSTER IP      BACKENDS");
        for v in &self.services {
            let eps: Vec<String> = if v.endpoints.is_empty() {
                vec![format!(
                    "{} {}:{}",
                    v.backend_pod, v.backend_ip, v.target_port
                )]
            } else {
                v.endpoints
                    .iter()
                    .map(|e| {
                        let ips: Vec<String> = no_v4::present(e.ip)
                            .map(|i| format!("{i}:{}", v.target_port))
                            .into_iter()
                            .chain(e.ip6.map(|i| format!("[{i}]:{}", v.target_port)))
                            .collect();
                        format!("{} {}", e.pod, ips.join(","))
                    })
                    .collect()
            };
            let vips: Vec<IpAddr> = if v.cluster_ips.is_empty() {
                vec![IpAddr::V4(v.cluster_ip)]
            } else {
                v.cluster_ips.clone()
            };
            let vips: Vec<String> = vips
                .iter()
                .map(|ip| SocketAddr::new(*ip, v.port).to_string())
                .collect();
            let _ = writeln!(
                out,
                "{:<16} {:<15} {} (DNAT on nodes {}){}",
                format!("{}/{}", v.namespace, v.name),
                vips.join(","),
                eps.join(", "),
                v.nodes.join(","),
                v.waypoint
                    .map(|w| format!(", waypoint {w}"))
                    .unwrap_or_default()
            );
        }
        if let Some(w) = &self.waypoint {
            let state = match (&w.pid, w.running, &w.not_started) {
                (Some(pid), true, _) => format!("running, pid {pid}"),
                (Some(pid), false, _) => format!("NOT RUNNING (pid {pid} exited)"),
                (None, _, Some(why)) => format!("not started ({why})"),
                (None, _, None) => "not started".into(),
            };
            let _ = writeln!(
                out,
                "\nWAYPOINT {} ({}/{}) on node {}, {}: {}\n  \
                 identity  {}\n  \
                 hbone     {}   metrics {}   admin {}   readiness {}\n  \
                 config    {}\n  \
                 log       {}\n  \
                 services  {}\n  \
                 workloads {}",
                w.pod,
                w.namespace,
                w.k8s_name,
                w.node,
                w.ip,
                state,
                w.identity,
                w.hbone_addr,
                w.metrics_addr,
                w.admin_addr,
                w.readiness_addr,
                w.config.display(),
                w.log.display(),
                w.services.join(", "),
                w.workloads.join(", ")
            );
        }
        out
    }
}

/// Loads the status of a lab.
pub fn load(prefix: &str) -> Result<LabStatus> {
    let state = LabState::load(prefix)?.with_context(|| {
        format!(
            "no lab with prefix {prefix:?} (no {})",
            crate::paths::state_file(prefix).display()
        )
    })?;
    Ok(LabStatus::from_state(&state))
}
