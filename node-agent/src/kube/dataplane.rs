//! What the Kubernetes controller asks of the node: which pods are enrolled, enroll this pod,
//! remove that one, point at this ztunnel. [`Node`] implements it with the same code path as
//! CNI ADD/DEL; tests implement it with a recorder when the kernel is not the point.

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ambient_net::proto::PodInfo;
use anyhow::{anyhow, bail};
use tracing::debug;

use super::cache::PodFacts;
use crate::node::{Node, WATCH_ATTACHMENT_PREFIX};

/// A CNI-enrolled pod the watch cache does not show yet is left alone this long.
pub const CNI_GRACE: Duration = Duration::from_secs(30);

/// One enrolled pod, as the controller compares it with the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub namespace: String,
    pub name: String,
    /// Empty when the runtime did not pass `K8S_POD_UID`.
    pub uid: String,
    pub ips: Vec<IpAddr>,
    /// Enrolled through CNI moments ago: the pod's watch event may not have arrived yet.
    pub fresh: bool,
}

impl Enrolled {
    /// Is this enrollment of that API pod (same name, and same uid when both are known)?
    pub fn is(&self, pod: &PodFacts) -> bool {
        self.namespace == pod.namespace
            && self.name == pod.name
            && (self.uid.is_empty() || pod.uid.is_empty() || self.uid == pod.uid)
    }
}

pub trait Dataplane: Send + 'static {
    fn enrolled(&self) -> Vec<Enrolled>;
    /// The current ztunnel endpoint's pod.
    fn ztunnel(&self) -> Option<Enrolled>;
    fn enroll(&mut self, pod: &PodFacts) -> impl Future<Output = anyhow::Result<()>> + Send;
    fn remove(&mut self, pod: &Enrolled) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// `None`: no ztunnel on the node (capture stops).
    fn set_ztunnel(
        &mut self,
        pod: Option<&PodFacts>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

impl Node {
    /// The `PodInfo` CNI would have given for an API pod: from the pod's last CNI ADD when
    /// the agent saw one (the runtime's container id and netns), else from a scan of the
    /// node's network namespaces for the pod's IP.
    async fn pod_info_for(&mut self, pod: &PodFacts) -> anyhow::Result<PodInfo> {
        if let Some(seen) = self.cni_seen.get(&pod.key()) {
            let same_uid = seen.uid.is_empty() || pod.uid.is_empty() || seen.uid == pod.uid;
            let same_ip = pod.ips.iter().any(|ip| seen.ips.contains(ip));
            if same_uid && same_ip && Path::new(&seen.netns).exists() {
                debug!(pod = %pod.display(), netns = %seen.netns, "netns from the pod's CNI ADD");
                return Ok(seen.clone());
            }
        }
        let mut index = std::mem::take(&mut self.netns_index);
        let candidates = self.netns_scan.lookup(&mut index, &pod.ips).await;
        self.netns_index = index;
        if candidates.is_empty() {
            bail!(
                "no network namespace on this node has an interface with {:?} (looked in {:?}{})",
                pod.ips,
                self.netns_scan.dirs,
                if self.netns_scan.proc_dir.is_some() {
                    " and /proc"
                } else {
                    ""
                }
            );
        }
        // Keep the namespaces whose interface really is a veth into this node.
        let mut usable = Vec::new();
        for c in candidates {
            let info = PodInfo {
                container_id: format!("{WATCH_ATTACHMENT_PREFIX}{}", pod.uid),
                if_name: c.if_name.clone(),
                netns: c.netns.to_string_lossy().into_owned(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                ips: pod.ips.clone(),
                gateways: Vec::new(),
            };
            match self.pod_host_side(&info).await {
                Ok(_) => usable.push(info),
                Err(e) => debug!(netns = %c.netns.display(), "not the pod's: {e:#}"),
            }
        }
        match usable.len() {
            1 => Ok(usable.remove(0)),
            0 => Err(anyhow!(
                "the interfaces with {:?} are not veths into this node",
                pod.ips
            )),
            _ => Err(anyhow!(
                "{:?} is on a veth into this node in {} network namespaces ({}); not guessing",
                pod.ips,
                usable.len(),
                usable
                    .iter()
                    .map(|u| u.netns.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

impl Dataplane for Node {
    fn enrolled(&self) -> Vec<Enrolled> {
        self.state
            .pods
            .iter()
            .map(|(k, p)| Enrolled {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                ips: p.ips.clone(),
                fresh: self
                    .cni_added
                    .get(k)
                    .is_some_and(|t| t.elapsed() < CNI_GRACE),
            })
            .collect()
    }

    fn ztunnel(&self) -> Option<Enrolled> {
        self.state.ztunnel.as_ref().map(|z| Enrolled {
            namespace: z.namespace.clone(),
            name: z.name.clone(),
            uid: String::new(),
            ips: std::iter::once(z.endpoint.ip)
                .chain(z.endpoint.ip6.map(std::net::IpAddr::V6))
                .collect(),
            fresh: false,
        })
    }

    async fn enroll(&mut self, pod: &PodFacts) -> anyhow::Result<()> {
        let info = self.pod_info_for(pod).await?;
        self.enroll_attachment(info).await?;
        Ok(())
    }

    async fn remove(&mut self, pod: &Enrolled) -> anyhow::Result<()> {
        let keys: Vec<String> = self
            .state
            .pods
            .iter()
            .filter(|(_, r)| r.namespace == pod.namespace && r.name == pod.name && r.uid == pod.uid)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.remove_attachment(&k).await?;
        }
        Ok(())
    }

    async fn set_ztunnel(&mut self, pod: Option<&PodFacts>) -> anyhow::Result<()> {
        match pod {
            Some(p) => {
                let info = self.pod_info_for(p).await?;
                self.set_ztunnel_pod(info).await
            }
            None => self.clear_ztunnel().await,
        }
    }
}
