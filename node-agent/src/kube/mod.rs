//! Kubernetes mode (`ambient-agent run --kube`): membership and the ztunnel from the API
//! server instead of a config file.
//!
//! * [`watch`] keeps a watch cache ([`cache::Cache`]) of every namespace and of the pods on
//!   this node (kube-runtime watchers: list + watch, resourceVersions, 410 Gone → re-list).
//! * CNI ADD is answered from that cache ([`crate::membership::Membership::Kube`]): no API
//!   call on the pod start path.
//! * [`controller::Controller`] makes the node match the cache: enrolls and removes pods as
//!   labels and annotations change (pods that predate the agent included: their netns is
//!   found by [`netns::NetnsScan`]), follows the ztunnel pod (namespace + label + node), and
//!   annotates enrolled pods. It drives the node through [`dataplane::Dataplane`], which
//!   [`crate::node::Node`] implements with the same code path as CNI ADD/DEL.

pub mod cache;
pub mod controller;
pub mod dataplane;
pub mod netns;
pub mod watch;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ambient_net::consts::membership::DEFAULT_EXCLUDED_NAMESPACES;
use anyhow::{anyhow, Context};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::sync::{Mutex, Notify};

use self::cache::{Policy, SharedCache};
use self::controller::Controller;
use self::dataplane::Dataplane;
use self::netns::NetnsScan;

/// The `run` flags of Kubernetes mode.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Kubernetes mode: membership from namespace labels and pod annotations, the ztunnel from
    /// the API server (in-cluster config, or KUBECONFIG). `--config` becomes optional.
    #[arg(long)]
    pub kube: bool,
    /// This node's name, as in the pods' `spec.nodeName` (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The ztunnel pod's namespace.
    #[arg(long, default_value = "istio-system")]
    pub ztunnel_namespace: String,
    /// The ztunnel pod's label, `key=value`; matched together with the namespace and node.
    #[arg(long, default_value = "app=ztunnel", value_parser = parse_label)]
    pub ztunnel_label: (String, String),
    /// Namespaces never captured, comma-separated (added to `--config`'s, if given).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_EXCLUDED_NAMESPACES.iter().map(|s| s.to_string()))]
    pub excluded_namespaces: Vec<String>,
    /// Talk to the API server at this plain URL without credentials (tests and `kubectl
    /// proxy` only); by default the in-cluster config or KUBECONFIG is used.
    #[arg(long)]
    pub kube_api_url: Option<String>,
    /// Where pod network namespaces are looked for (pods not announced by CNI), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "/var/run/netns,/run/netns"
    )]
    pub netns_dirs: Vec<PathBuf>,
    /// Fall back to /proc/<pid>/ns/net when no netns dir has the pod (needs hostPID).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub proc_netns: bool,
    /// Seconds between the controller's full passes when nothing changes.
    #[arg(long, default_value_t = 10)]
    pub kube_sweep: u64,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

impl KubeArgs {
    pub fn policy(&self, extra_excluded: &BTreeSet<String>) -> anyhow::Result<Policy> {
        let node_name = self
            .node_name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| anyhow!("--kube needs --node-name (or NODE_NAME)"))?;
        Ok(Policy {
            node_name,
            ztunnel_namespace: self.ztunnel_namespace.clone(),
            ztunnel_label: self.ztunnel_label.clone(),
            excluded: self
                .excluded_namespaces
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .chain(extra_excluded.iter().cloned())
                .collect(),
        })
    }

    pub fn netns_scan(&self) -> NetnsScan {
        NetnsScan {
            dirs: self.netns_dirs.clone(),
            proc_dir: self.proc_netns.then(|| PathBuf::from("/proc")),
        }
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        // One rustls crypto provider for the whole process: ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        match &self.kube_api_url {
            Some(url) => {
                let uri: http::Uri = url
                    .parse()
                    .with_context(|| format!("--kube-api-url {url}"))?;
                Ok(Client::try_from(kube::Config::new(uri))?)
            }
            None => Client::try_default()
                .await
                .context("Kubernetes client (in-cluster config or KUBECONFIG)"),
        }
    }
}

/// Starts the two watchers and the controller on the current runtime.
pub fn start<D: Dataplane>(
    client: Client,
    cache: SharedCache,
    dataplane: Arc<Mutex<D>>,
    ready: Arc<AtomicBool>,
    sweep: Duration,
) {
    let changed = Arc::new(Notify::new());
    let node = cache
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .policy
        .node_name
        .clone();
    tokio::spawn(watch::run(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        cache.clone(),
        changed.clone(),
    ));
    tokio::spawn(watch::run(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        cache.clone(),
        changed.clone(),
    ));
    let controller = Controller::new(cache, dataplane, client, changed, ready);
    tokio::spawn(controller.run(sweep));
}
