//! The lab's state file, `/run/ambient-lab/<prefix>/lab.json`: everything `up` made, written
//! after every step so `down` (from any process) can undo a finished or a half-built lab.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::paths;

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// `A` or `B`.
    pub name: String,
    pub netns: String,
    pub underlay_dev: String,
    pub underlay_ip: Ipv4Addr,
    pub underlay_prefix_len: u8,
    pub peer_underlay_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub gateway: Ipv4Addr,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    /// `<node letter>-<name>`, e.g. `a-app`; also the netns short name.
    pub id: String,
    /// `ztunnel`, `app`, `client`, `plain`.
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
    pub ip: Option<Ipv4Addr>,
    pub host_veth: Option<String>,
    pub cni_result: Option<serde_json::Value>,
    /// Name of the server's [`ProcessRecord`].
    pub server: Option<String>,
    pub server_port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceState {
    pub name: String,
    pub namespace: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    /// Pod id of the backend.
    pub backend_pod: String,
    pub backend_ip: Ipv4Addr,
    /// Nodes whose netns carry the DNAT.
    pub nodes: Vec<String>,
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
