//! The lab's data plane: one `ztunnel` per ztunnel netns, configured from the topology
//! (pods → workloads with a service account each, the Service → a service with the
//! ClusterIP), all sharing one lab CA directory.

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
use crate::state::LabState;

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
}

/// The local config for the lab's pods and Service, with `policies`.
pub fn render_config(state: &LabState, policies: &Value) -> LocalConfig {
    let workloads = state
        .pods
        .iter()
        .filter(|p| p.name != "ztunnel")
        .filter_map(|p| {
            let ip = p.ip?;
            let mut w = json!({
                "uid": p.uid,
                "name": p.k8s_name,
                "namespace": p.namespace,
                "serviceAccount": p.name,
                "workloadIps": [ip.to_string()],
                "protocol": if p.ambient { "HBONE" } else { "TCP" },
                "node": node_name(&p.node),
            });
            for s in state.services.iter().filter(|s| s.backend_pod == p.id) {
                let key = format!("{}/{}", s.namespace, hostname(&s.name, &s.namespace));
                w["services"] = json!({ key: {} });
            }
            Some(w)
        })
        .collect();
    let services = state
        .services
        .iter()
        .map(|s| LocalService {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            hostname: hostname(&s.name, &s.namespace),
            vips: vec![s.cluster_ip.to_string()],
            ports: [(s.port, s.target_port)].into(),
        })
        .collect();
    LocalConfig {
        workloads,
        services,
        policies: policies.clone(),
    }
}

fn hostname(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{TRUST_DOMAIN}")
}

/// Writes the config atomically (ztunnel polls it and reloads on change).
pub fn write_config(run_dir: &Path, config: &LocalConfig) -> Result<PathBuf> {
    let path = config_path(run_dir);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_yaml_ng::to_string(config)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(path)
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
