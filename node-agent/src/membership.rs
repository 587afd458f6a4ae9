//! Which pods are captured: one question ([`Membership::verdict`]) with two sources of
//! answers. Standalone mode reads a JSON config; Kubernetes mode reads the agent's watch cache
//! of namespaces and pods (never the API server itself, so a CNI ADD does not wait on it).
//! Either way the answer feeds the same desired state in [`crate::node::Node`].

use ambient_net::proto::PodInfo;

use crate::config::Config;
use crate::kube::cache::SharedCache;

/// Why a pod is or is not captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ztunnel,
    Enroll,
    Excluded,
    NotAmbient,
    OptedOut,
    /// Kubernetes mode: a hostNetwork pod shares the node's addresses; never captured.
    HostNetwork,
    /// Kubernetes mode: the pod has (or will get) an Istio sidecar.
    Sidecar,
    /// Kubernetes mode: the watch cache has not seen the pod's namespace yet (the agent just
    /// started and has not listed yet, or the namespace is seconds old). CNI ADD fails with
    /// "try again later" so the pod never starts uncaptured by accident; the runtime retries.
    NamespaceUnknown,
}

impl Verdict {
    pub fn reason(self) -> &'static str {
        match self {
            Verdict::Ztunnel => "this is the node's ztunnel pod",
            Verdict::Enroll => "namespace is ambient",
            Verdict::Excluded => "namespace is excluded from the mesh",
            Verdict::NotAmbient => "namespace is not ambient",
            Verdict::OptedOut => "pod opted out of redirection",
            Verdict::HostNetwork => "pod uses the host network",
            Verdict::Sidecar => "pod has an Istio sidecar",
            Verdict::NamespaceUnknown => {
                "the pod's namespace is not in the agent's watch cache yet; try again"
            }
        }
    }
}

/// Where membership comes from.
pub enum Membership {
    /// `--config agent.json`.
    Standalone(Config),
    /// `--kube`: the watch cache the Kubernetes watchers keep current.
    Kube(SharedCache),
}

impl Membership {
    /// The verdict for a pod the CNI plugin reports. Never blocks on the network.
    pub fn verdict(&self, pod: &PodInfo) -> Verdict {
        match self {
            Membership::Standalone(c) => c.verdict(pod),
            Membership::Kube(cache) => cache
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .verdict_for_cni(&pod.namespace, &pod.name, &pod.uid),
        }
    }

    pub fn is_kube(&self) -> bool {
        matches!(self, Membership::Kube(_))
    }

    /// Kubernetes mode: have both initial lists arrived?
    pub fn synced(&self) -> bool {
        match self {
            Membership::Standalone(_) => true,
            Membership::Kube(cache) => cache.read().unwrap_or_else(|e| e.into_inner()).synced(),
        }
    }
}
