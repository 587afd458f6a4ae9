//! The lab's state file, `/run/ambient-lab/<prefix>/lab.json`: everything `up` made, written
//! after every step so `down` (from any process) can undo a finished or a half-built lab.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::paths;
use crate::topology::IpFamily;

/// The IPv4 fields that are not `Option` (a node's underlay and gateway, a Service's
/// ClusterIP and endpoints) hold 0.0.0.0 in an ipv6-only lab and are left out of the JSON;
/// their `…6` twins and the address lists carry the v6 plan.
pub mod no_v4 {
    use std::net::Ipv4Addr;

    /// The value of an IPv4 field in an ipv6-only lab.
    pub fn absent() -> Ipv4Addr {
        Ipv4Addr::UNSPECIFIED
    }

    pub fn is_absent(ip: &Ipv4Addr) -> bool {
        ip.is_unspecified()
    }

    /// `Some(ip)` unless it is the ipv6-only placeholder.
    pub fn present(ip: Ipv4Addr) -> Option<Ipv4Addr> {
        (!ip.is_unspecified()).then_some(ip)
    }
}

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// `up` is running (or died while running).
    Building,
    /// `up` finished.
    Ready,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub version: u32,
    pub prefix: String,
    pub run_dir: PathBuf,
    pub phase: Phase,
    pub options: LabOptionsState,
    /// The libcni client that added the pods (DEL uses the same one).
    pub cniclient: Option<PathBuf>,
    /// Every netns created, in creation order.
    pub netns: Vec<String>,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    pub services: Vec<ServiceState>,
    /// The waypoint (node B's `b-waypoint` pod, its config, its process).
    #[serde(default)]
    pub waypoint: Option<WaypointState>,
    /// Every process started and left running, with its start time (`/proc/<pid>/stat`
    /// field 22) so a recycled PID is never signalled.
    pub processes: Vec<ProcessRecord>,
    /// Files and directories written (all under `run_dir`).
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabOptionsState {
    pub primary: String,
    pub dataplane: String,
    pub agent: bool,
    pub tunnel: String,
    pub rp_filter: u8,
    pub cni_plugin: Option<PathBuf>,
    pub agent_bin: Option<PathBuf>,
    pub ztunnel_init_bin: Option<PathBuf>,
    /// Whether the waypoint process was to be started.
    #[serde(default)]
    pub waypoint: bool,
    #[serde(default)]
    pub waypoint_bin: Option<PathBuf>,
    /// `ipv4` (older labs), `ipv6` or `dual`.
    #[serde(default)]
    pub ip_family: IpFamily,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// `A` or `B`.
    pub name: String,
    pub netns: String,
    pub underlay_dev: String,
    /// 0.0.0.0 (and not in the JSON) in an ipv6 lab, as `peer_underlay_ip`, `gateway`.
    #[serde(default = "no_v4::absent", skip_serializing_if = "no_v4::is_absent")]
    pub underlay_ip: Ipv4Addr,
    pub underlay_prefix_len: u8,
    #[serde(default = "no_v4::absent", skip_serializing_if = "no_v4::is_absent")]
    pub peer_underlay_ip: Ipv4Addr,
    /// Empty (and not in the JSON) in an ipv6 lab.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_cidr: String,
    #[serde(default = "no_v4::absent", skip_serializing_if = "no_v4::is_absent")]
    pub gateway: Ipv4Addr,
    /// The v6 address the lab put on the underlay: the ULA in an ipv6 lab, the fixed
    /// link-local (the peer's next hop for v6 pod routes) in a dual one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underlay_ip6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_underlay_ip6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    pub cni: NodeCniState,
    pub agent: Option<AgentState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCniState {
    pub conf_dir: PathBuf,
    pub conflist: PathBuf,
    pub network: String,
    pub cache_dir: PathBuf,
    pub ipam_data_dir: PathBuf,
    /// CNI_PATH, `:`-separated.
    pub cni_path: String,
    /// The ambient-cni plugin's log file (when it is in the chain).
    pub log_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    /// Name of its [`ProcessRecord`].
    pub process: String,
    pub socket: PathBuf,
    pub health_addr: String,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    pub tunnel: String,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodRole {
    Ztunnel,
    App,
    Client,
    Plain,
    /// `reviews-v1` (node A) and `reviews-v2` (node B): the endpoints of the reviews Services.
    Reviews,
    /// The waypoint pod (node B).
    Waypoint,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    /// `<node letter>-<name>`, e.g. `a-app`; also the netns short name.
    pub id: String,
    /// `ztunnel`, `app`, `client`, `plain`, `reviews-v1`, ...
    pub name: String,
    pub role: PodRole,
    /// K8S_POD_NAME: `<name>-<node letter>` (so the ztunnel's starts with `ztunnel`).
    pub k8s_name: String,
    pub namespace: String,
    pub uid: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ifname: String,
    pub ambient: bool,
    /// Set once CNI ADD was attempted: DEL must run from then on.
    pub cni_added: bool,
    /// The IPv4 address (the primary in ipv4 and dual labs; none in an ipv6 lab).
    pub ip: Option<Ipv4Addr>,
    /// The IPv6 address (ipv6 and dual labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// Every address of the CNI result, the primary first (empty in older state files:
    /// then `ip`).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    pub host_veth: Option<String>,
    pub cni_result: Option<serde_json::Value>,
    /// Name of the server's [`ProcessRecord`].
    pub server: Option<String>,
    pub server_port: Option<u16>,
    /// Its ServiceAccount (empty in older state files: then the pod's `name`).
    #[serde(default)]
    pub service_account: String,
    /// What its HTTP server reports as `version`.
    #[serde(default)]
    pub version: Option<String>,
    /// The port its HTTP server answers on.
    #[serde(default)]
    pub http_port: Option<u16>,
    /// The workload-level waypoint (ztunnel sends every connection to this pod through it).
    #[serde(default)]
    pub waypoint: Option<Ipv4Addr>,
}

impl PodState {
    /// Every address, the primary first (also for state files without `ips`).
    pub fn addresses(&self) -> Vec<IpAddr> {
        if self.ips.is_empty() {
            self.ip.map(IpAddr::V4).into_iter().collect()
        } else {
            self.ips.clone()
        }
    }

    /// The primary address: v4 in ipv4 and dual labs, v6 in an ipv6 lab.
    pub fn primary_ip(&self) -> Option<IpAddr> {
        self.addresses().first().copied()
    }

    /// The ServiceAccount (`name` for state files that predate the field).
    pub fn service_account(&self) -> &str {
        if self.service_account.is_empty() {
            &self.name
        } else {
            &self.service_account
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceState {
    pub name: String,
    pub namespace: String,
    /// The v4 ClusterIP (0.0.0.0, not in the JSON, in an ipv6 lab).
    #[serde(default = "no_v4::absent", skip_serializing_if = "no_v4::is_absent")]
    pub cluster_ip: Ipv4Addr,
    /// The v6 ClusterIP (ipv6 and dual labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip6: Option<Ipv6Addr>,
    /// Every ClusterIP, the primary first, as Kubernetes' `clusterIPs` (empty in older
    /// state files: then `cluster_ip`).
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub target_port: u16,
    /// Pod id of the (first) backend.
    pub backend_pod: String,
    /// Its v4 address (0.0.0.0, not in the JSON, in an ipv6 lab).
    #[serde(default = "no_v4::absent", skip_serializing_if = "no_v4::is_absent")]
    pub backend_ip: Ipv4Addr,
    /// Nodes whose netns carry the DNAT.
    pub nodes: Vec<String>,
    /// Every endpoint, `backend_pod` first (empty in older state files: then `backend_pod`).
    #[serde(default)]
    pub endpoints: Vec<EndpointState>,
    /// The waypoint ztunnel sends this Service's traffic to.
    #[serde(default)]
    pub waypoint: Option<Ipv4Addr>,
}

impl ServiceState {
    /// The endpoints, also for state files without `endpoints`.
    pub fn endpoints(&self) -> Vec<EndpointState> {
        if self.endpoints.is_empty() {
            vec![EndpointState {
                pod: self.backend_pod.clone(),
                ip: self.backend_ip,
                ip6: None,
            }]
        } else {
            self.endpoints.clone()
        }
    }

    /// Every ClusterIP, the primary first (also for state files without `cluster_ips`).
    pub fn vips(&self) -> Vec<IpAddr> {
        if self.cluster_ips.is_empty() {
            vec![IpAddr::V4(self.cluster_ip)]
        } else {
            self.cluster_ips.clone()
        }
    }

    /// `<name>.<namespace>.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointState {
    /// Pod id.
    pub pod: String,
    /// Its v4 address (0.0.0.0, not in the JSON, in an ipv6 lab).
    #[serde(default = "no_v4::absent", skip_serializing_if = "no_v4::is_absent")]
    pub ip: Ipv4Addr,
    /// Its v6 address (ipv6 and dual labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
}

/// The waypoint: its pod, identity, config file and process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointState {
    /// Pod id (`b-waypoint`).
    pub pod: String,
    /// The Kubernetes name and namespace of its pod (`waypoint-b`, `demo`): how its config
    /// names its own workload entry.
    pub k8s_name: String,
    pub namespace: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub service_account: String,
    /// `spiffe://cluster.local/ns/demo/sa/waypoint`.
    pub identity: String,
    /// `<run dir>/waypoint-config.yaml`.
    pub config: PathBuf,
    /// Its stderr (the log, access lines with target `access`).
    pub log: PathBuf,
    /// Name of its [`ProcessRecord`] (recorded only once it was started).
    pub process: String,
    pub hbone_addr: String,
    pub metrics_addr: String,
    pub admin_addr: String,
    pub readiness_addr: String,
    /// `<namespace>/<name>` of the Services whose waypoint it is.
    pub services: Vec<String>,
    /// Pod ids of the workloads whose own waypoint it is.
    pub workloads: Vec<String>,
    /// Why it was not started, when it was not (`--no-waypoint`, no data plane).
    #[serde(default)]
    pub not_started: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRecord {
    pub name: String,
    pub pid: i32,
    pub start_time: u64,
    pub netns: String,
    pub argv: Vec<String>,
    pub log: PathBuf,
}

impl LabState {
    pub fn new(prefix: &str, options: LabOptionsState) -> Self {
        Self {
            version: STATE_VERSION,
            prefix: prefix.to_string(),
            run_dir: paths::run_dir(prefix),
            phase: Phase::Building,
            options,
            cniclient: None,
            netns: Vec::new(),
            nodes: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            waypoint: None,
            processes: Vec::new(),
            files: Vec::new(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.run_dir.join(paths::STATE_FILE)
    }

    /// Writes the state atomically (temp file + rename).
    pub fn save(&self) -> Result<()> {
        let path = self.path();
        let tmp = path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(self).context("encode lab state")?;
        std::fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))
    }

    /// Reads the state of the lab with this prefix; `None` when there is none.
    pub fn load(prefix: &str) -> Result<Option<Self>> {
        Self::load_from(&paths::state_file(prefix))
    }

    pub fn load_from(path: &Path) -> Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .with_context(|| format!("parse {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod(&self, id: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.id == id)
    }

    pub fn pod_mut(&mut self, id: &str) -> Option<&mut PodState> {
        self.pods.iter_mut().find(|p| p.id == id)
    }

    pub fn process(&self, name: &str) -> Option<&ProcessRecord> {
        self.processes.iter().find(|p| p.name == name)
    }

    pub fn add_file(&mut self, path: &Path) {
        if !self.files.iter().any(|f| f == path) {
            self.files.push(path.to_path_buf());
        }
    }
}
