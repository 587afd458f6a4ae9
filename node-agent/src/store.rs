//! What the agent must remember across restarts, on disk as JSON, written atomically
//! (write + rename), so a restarted agent adopts the kernel state instead of rebuilding it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ambient_net::model::{TunnelChoice, ZtunnelEndpoint};
use serde::{Deserialize, Serialize};

/// One enrolled pod attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub container_id: String,
    pub if_name: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    pub netns: String,
    pub ips: Vec<IpAddr>,
    /// The node-side device of the pod (its veth, found from the pod's netns).
    pub host_veth: String,
    /// The bridge that veth is a port of (bridge-type primaries): routed traffic of the pod
    /// enters the node through it, so its rp_filter is relaxed too.
    #[serde(default)]
    pub host_bridge: Option<String>,
    /// The node's gateway address toward the pod.
    pub gateway: Ipv4Addr,
}

impl PodRecord {
    pub fn v4(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.ips.iter().filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            _ => None,
        })
    }
}

/// The ztunnel endpoint with the attachment it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZtunnelRecord {
    pub container_id: String,
    pub if_name: String,
    pub namespace: String,
    pub name: String,
    pub endpoint: ZtunnelEndpoint,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    pub tunnel: Option<TunnelChoice>,
    pub ztunnel: Option<ZtunnelRecord>,
    /// By `<containerId>/<ifName>`.
    #[serde(default)]
    pub pods: BTreeMap<String, PodRecord>,
    /// Node-wide sysctls the agent changed, with the value they had before, for cleanup.
    #[serde(default)]
    pub saved_sysctls: BTreeMap<String, String>,
}

pub fn key(container_id: &str, if_name: &str) -> String {
    format!("{container_id}/{if_name}")
}

/// The state directory: `state.json` (everything) and `tunnel.json` (what ztunnel-init reads).
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.into() }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn tunnel_path(&self) -> PathBuf {
        self.dir.join("tunnel.json")
    }

    pub fn load(&self) -> anyhow::Result<AgentState> {
        match std::fs::read_to_string(self.state_path()) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| anyhow::anyhow!("state {}: {e}", self.state_path().display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn save(&self, s: &AgentState) -> anyhow::Result<()> {
        write_atomic(&self.state_path(), &serde_json::to_vec_pretty(s)?)?;
        if let Some(t) = &s.tunnel {
            write_atomic(&self.tunnel_path(), &serde_json::to_vec(t)?)?;
        }
        Ok(())
    }

    pub fn remove(&self) -> anyhow::Result<()> {
        for p in [self.state_path(), self.tunnel_path()] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert_eq!(store.load().unwrap(), AgentState::default());
        let mut s = AgentState {
            tunnel: Some(TunnelChoice {
                kind: ambient_net::model::TunnelKind::Vxlan,
                port: 6081,
            }),
            ..Default::default()
        };
        s.saved_sysctls
            .insert("net.ipv4.conf.all.rp_filter".into(), "1".into());
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        let t: TunnelChoice =
            serde_json::from_slice(&std::fs::read(store.tunnel_path()).unwrap()).unwrap();
        assert_eq!(t.port, 6081);
        store.remove().unwrap();
        store.remove().unwrap();
    }
}
