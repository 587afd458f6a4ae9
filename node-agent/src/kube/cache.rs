//! The watch cache: what the agent knows of the cluster (every namespace, the pods on its
//! node), reduced to the facts membership needs, and the membership decisions made from it.
//! The watchers write it; CNI ADD and the controller only read it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use ambient_net::consts::membership::{
    NAMESPACE_LABEL, NAMESPACE_LABEL_VALUE, REDIRECTION_ANNOTATION, REDIRECTION_DISABLED,
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::membership::Verdict;

/// Namespace label that turns on sidecar injection.
pub const INJECTION_LABEL: &str = "istio-injection";
pub const INJECTION_ENABLED: &str = "enabled";
/// Revision label: sidecar injection by a given control-plane revision (pod or namespace).
pub const REVISION_LABEL: &str = "istio.io/rev";
/// The injected sidecar container's name.
pub const SIDECAR_CONTAINER: &str = "istio-proxy";
/// Set by the injector on every pod it injected.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

pub type SharedCache = Arc<RwLock<Cache>>;

/// What decides membership besides the cluster's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// This node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    /// The ztunnel pod: this namespace AND this label AND this node, never the label alone.
    pub ztunnel_namespace: String,
    pub ztunnel_label: (String, String),
    /// Namespaces never captured.
    pub excluded: BTreeSet<String>,
}

/// The facts of a namespace that membership reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsFacts {
    pub name: String,
    /// `istio.io/dataplane-mode=ambient`.
    pub ambient: bool,
    /// `istio-injection=enabled` or an `istio.io/rev` label: its pods get sidecars.
    pub sidecar_injection: bool,
}

impl NsFacts {
    pub fn from_namespace(ns: &Namespace) -> Option<Self> {
        let name = ns.metadata.name.clone()?;
        let labels = ns.metadata.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        Some(Self {
            name,
            ambient: label(NAMESPACE_LABEL) == Some(NAMESPACE_LABEL_VALUE),
            sidecar_injection: label(INJECTION_LABEL) == Some(INJECTION_ENABLED)
                || label(REVISION_LABEL).is_some(),
        })
    }
}

/// The facts of a pod that membership and enrollment read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub node_name: Option<String>,
    pub host_network: bool,
    /// `status.podIPs` (or `status.podIP`), in the API server's order.
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// The value of `ambient.istio.io/redirection`, if set.
    pub redirection: Option<String>,
    /// An `istio.io/rev` label, an `istio-proxy` container or the injector's status annotation.
    pub sidecar: bool,
    pub phase: Option<String>,
    /// `metadata.deletionTimestamp` is set: the pod is shutting down (still running).
    pub terminating: bool,
    pub created: Option<Time>,
}

impl PodFacts {
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let m = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let annotations = m.annotations.as_ref();
        let labels: BTreeMap<String, String> = m.labels.clone().unwrap_or_default();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|v| v.iter().filter_map(|p| p.ip.parse().ok()).collect())
            .unwrap_or_default();
        if ips.is_empty() {
            if let Some(ip) = status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|s| s.parse().ok())
            {
                ips.push(ip);
            }
        }
        let has_proxy_container = spec.is_some_and(|s| {
            s.containers.iter().any(|c| c.name == SIDECAR_CONTAINER)
                || s.init_containers
                    .iter()
                    .flatten()
                    .any(|c| c.name == SIDECAR_CONTAINER)
        });
        Some(Self {
            namespace: m.namespace.clone()?,
            name: m.name.clone()?,
            uid: m.uid.clone().unwrap_or_default(),
            resource_version: m.resource_version.clone().unwrap_or_default(),
            node_name: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ips,
            redirection: annotations
                .and_then(|a| a.get(REDIRECTION_ANNOTATION))
                .cloned(),
            sidecar: labels.contains_key(REVISION_LABEL)
                || has_proxy_container
                || annotations.is_some_and(|a| a.contains_key(SIDECAR_STATUS_ANNOTATION)),
            labels,
            phase: status.and_then(|s| s.phase.clone()),
            terminating: m.deletion_timestamp.is_some(),
            created: m.creation_timestamp.clone(),
        })
    }

    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod's sandbox is gone for good (its containers ran to completion or failed).
    pub fn finished(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded") | Some("Failed"))
    }
}

/// The pods and ztunnel the node should have, by the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// By (namespace, name).
    pub pods: BTreeMap<(String, String), PodFacts>,
    pub ztunnel: Option<PodFacts>,
}

#[derive(Debug)]
pub struct Cache {
    pub policy: Policy,
    namespaces: BTreeMap<String, NsFacts>,
    pods: BTreeMap<(String, String), PodFacts>,
    namespaces_synced: bool,
    pods_synced: bool,
}

impl Cache {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            namespaces_synced: false,
            pods_synced: false,
        }
    }

    pub fn shared(policy: Policy) -> SharedCache {
        Arc::new(RwLock::new(Self::new(policy)))
    }

    /// Both initial lists have been received: the cache is a complete picture (absence
    /// of a pod or namespace now means it does not exist).
    pub fn synced(&self) -> bool {
        self.namespaces_synced && self.pods_synced
    }

    // ----------------------------------------------------------- writers (the watchers)

    pub fn apply_namespace(&mut self, ns: NsFacts) {
        self.namespaces.insert(ns.name.clone(), ns);
    }

    pub fn delete_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
    }

    /// A complete list (initial list or re-list after 410 Gone) replaces what was known.
    pub fn replace_namespaces(&mut self, all: Vec<NsFacts>) {
        self.namespaces = all.into_iter().map(|n| (n.name.clone(), n)).collect();
        self.namespaces_synced = true;
    }

    pub fn apply_pod(&mut self, pod: PodFacts) {
        self.pods.insert(pod.key(), pod);
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        self.pods.remove(&(namespace.to_string(), name.to_string()));
    }

    pub fn replace_pods(&mut self, all: Vec<PodFacts>) {
        self.pods = all.into_iter().map(|p| (p.key(), p)).collect();
        self.pods_synced = true;
    }

    // ------------------------------------------------------------------------ readers

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodFacts> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodFacts> {
        self.pods.values()
    }

    /// Namespace + label + node: all three, so a pod elsewhere that merely carries the label
    /// is never trusted as the ztunnel (SPEC §6).
    pub fn is_ztunnel(&self, pod: &PodFacts) -> bool {
        let (k, v) = &self.policy.ztunnel_label;
        pod.namespace == self.policy.ztunnel_namespace
            && pod.labels.get(k) == Some(v)
            && pod.node_name.as_deref() == Some(self.policy.node_name.as_str())
    }

    /// The verdict for a pod from the API.
    pub fn verdict(&self, pod: &PodFacts) -> Verdict {
        if self.is_ztunnel(pod) {
            return Verdict::Ztunnel;
        }
        if pod.host_network {
            return Verdict::HostNetwork;
        }
        match self.namespace_verdict(&pod.namespace) {
            Verdict::Enroll if pod.sidecar => Verdict::Sidecar,
            Verdict::Enroll if pod.redirection.as_deref() == Some(REDIRECTION_DISABLED) => {
                Verdict::OptedOut
            }
            v => v,
        }
    }

    /// What the namespace alone says.
    fn namespace_verdict(&self, namespace: &str) -> Verdict {
        if self.policy.excluded.contains(namespace) {
            return Verdict::Excluded;
        }
        match self.namespaces.get(namespace) {
            None => Verdict::NamespaceUnknown,
            Some(ns) if !ns.ambient => Verdict::NotAmbient,
            Some(ns) if ns.sidecar_injection => Verdict::Sidecar,
            Some(_) => Verdict::Enroll,
        }
    }

    /// The verdict for a pod the CNI plugin reports, from the cache alone. When the pod
    /// itself is not in the cache yet (its watch event is still on the way), the namespace
    /// decides; the controller corrects the pod's membership when the event arrives.
    pub fn verdict_for_cni(&self, namespace: &str, name: &str, uid: &str) -> Verdict {
        match self.pod(namespace, name) {
            Some(p) if uid.is_empty() || p.uid.is_empty() || p.uid == uid => self.verdict(p),
            _ => self.namespace_verdict(namespace),
        }
    }

    /// What the node should have: every pod on this node that membership enrolls and that
    /// has an address and a sandbox, and the ztunnel pod (the newest one not shutting down,
    /// if several match during a rollout).
    pub fn desired(&self) -> Desired {
        let node = self.policy.node_name.as_str();
        let on_node = |p: &&PodFacts| p.node_name.as_deref() == Some(node);
        let pods = self
            .pods
            .values()
            .filter(on_node)
            .filter(|p| !p.ips.is_empty() && !p.finished())
            .filter(|p| self.verdict(p) == Verdict::Enroll)
            .map(|p| (p.key(), p.clone()))
            .collect();
        let ztunnel = self
            .pods
            .values()
            .filter(on_node)
            .filter(|p| self.is_ztunnel(p) && !p.finished() && !p.ips.is_empty())
            .max_by(|a, b| {
                (!a.terminating, &a.created, &a.name).cmp(&(!b.terminating, &b.created, &b.name))
            })
            .cloned();
        Desired { pods, ztunnel }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn policy() -> Policy {
        Policy {
            node_name: "node-a".into(),
            ztunnel_namespace: "istio-system".into(),
            ztunnel_label: ("app".into(), "ztunnel".into()),
            excluded: ["kube-system".to_string()].into(),
        }
    }

    fn ns(name: &str, labels: serde_json::Value) -> NsFacts {
        let n: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels}
        }))
        .unwrap();
        NsFacts::from_namespace(&n).unwrap()
    }

    fn pod(v: serde_json::Value) -> PodFacts {
        let mut base = serde_json::json!({
            "metadata": {"name": "app", "namespace": "demo", "uid": "u1"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}]}
        });
        merge(&mut base, v);
        PodFacts::from_pod(&serde_json::from_value(base).unwrap()).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn cache() -> Cache {
        let mut c = Cache::new(policy());
        c.replace_namespaces(vec![
            ns("demo", serde_json::json!({"istio.io/dataplane-mode": "ambient"})),
            ns("plain", serde_json::json!({})),
            ns(
                "injected",
                serde_json::json!({"istio.io/dataplane-mode": "ambient", "istio-injection": "enabled"}),
            ),
            ns(
                "revved",
                serde_json::json!({"istio.io/dataplane-mode": "ambient", "istio.io/rev": "canary"}),
            ),
            ns(
                "kube-system",
                serde_json::json!({"istio.io/dataplane-mode": "ambient"}),
            ),
            ns("istio-system", serde_json::json!({})),
        ]);
        c
    }

    #[test]
    fn pod_facts_read_the_api_object() {
        let p = pod(serde_json::json!({
            "metadata": {"annotations": {"ambient.istio.io/redirection": "disabled"}},
            "status": {"podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}
        }));
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.redirection.as_deref(), Some("disabled"));
        assert!(!p.sidecar && !p.host_network && !p.terminating);
        let native_sidecar = pod(serde_json::json!({
            "spec": {"initContainers": [{"name": "istio-proxy", "restartPolicy": "Always"}]}
        }));
        assert!(native_sidecar.sidecar);
    }

    #[test]
    fn verdicts_follow_labels_annotations_and_policy() {
        let c = cache();
        assert_eq!(c.verdict(&pod(serde_json::json!({}))), Verdict::Enroll);
        let in_ns = |n: &str| pod(serde_json::json!({"metadata": {"namespace": n}}));
        assert_eq!(c.verdict(&in_ns("plain")), Verdict::NotAmbient);
        assert_eq!(c.verdict(&in_ns("injected")), Verdict::Sidecar);
        assert_eq!(c.verdict(&in_ns("revved")), Verdict::Sidecar);
        assert_eq!(c.verdict(&in_ns("kube-system")), Verdict::Excluded);
        assert_eq!(c.verdict(&in_ns("unseen")), Verdict::NamespaceUnknown);
        let opted = pod(serde_json::json!({
            "metadata": {"annotations": {"ambient.istio.io/redirection": "disabled"}}
        }));
        assert_eq!(c.verdict(&opted), Verdict::OptedOut);
        let host = pod(serde_json::json!({"spec": {"hostNetwork": true}}));
        assert_eq!(c.verdict(&host), Verdict::HostNetwork);
        let rev = pod(serde_json::json!({"metadata": {"labels": {"istio.io/rev": "x"}}}));
        assert_eq!(c.verdict(&rev), Verdict::Sidecar);
        let proxy = pod(serde_json::json!({
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]}
        }));
        assert_eq!(c.verdict(&proxy), Verdict::Sidecar);
    }

    #[test]
    fn ztunnel_needs_namespace_label_and_node() {
        let c = cache();
        let zt = |ns: &str, label: bool, node: &str| {
            let labels = if label {
                serde_json::json!({"app": "ztunnel"})
            } else {
                serde_json::json!({"app": "other"})
            };
            pod(serde_json::json!({
                "metadata": {"namespace": ns, "name": "ztunnel-x", "labels": labels},
                "spec": {"nodeName": node}
            }))
        };
        assert_eq!(
            c.verdict(&zt("istio-system", true, "node-a")),
            Verdict::Ztunnel
        );
        // The label alone, in an ambient namespace: an ordinary pod.
        assert_eq!(c.verdict(&zt("demo", true, "node-a")), Verdict::Enroll);
        assert_eq!(
            c.verdict(&zt("istio-system", false, "node-a")),
            Verdict::NotAmbient
        );
        assert!(!c.is_ztunnel(&zt("istio-system", true, "node-b")));
    }

    #[test]
    fn cni_verdict_uses_the_pod_when_known_else_the_namespace() {
        let mut c = cache();
        // Unknown pod: the namespace decides.
        assert_eq!(c.verdict_for_cni("demo", "new", "u9"), Verdict::Enroll);
        assert_eq!(
            c.verdict_for_cni("nowhere", "new", "u9"),
            Verdict::NamespaceUnknown
        );
        c.apply_pod(pod(serde_json::json!({
            "metadata": {"annotations": {"ambient.istio.io/redirection": "disabled"}}
        })));
        assert_eq!(c.verdict_for_cni("demo", "app", "u1"), Verdict::OptedOut);
        // Another pod of the same name (a new uid): the cached one does not apply.
        assert_eq!(c.verdict_for_cni("demo", "app", "u2"), Verdict::Enroll);
    }

    #[test]
    fn desired_state_skips_pods_without_ip_finished_or_elsewhere_and_picks_one_ztunnel() {
        let mut c = cache();
        c.replace_pods(vec![
            pod(serde_json::json!({"metadata": {"name": "a"}})),
            pod(serde_json::json!({"metadata": {"name": "b"}, "status": {"podIP": null, "podIPs": null}})),
            pod(serde_json::json!({"metadata": {"name": "c"}, "status": {"phase": "Succeeded"}})),
            pod(serde_json::json!({"metadata": {"name": "d"}, "spec": {"nodeName": "node-b"}})),
            pod(serde_json::json!({
                "metadata": {"namespace": "istio-system", "name": "ztunnel-old", "labels": {"app": "ztunnel"},
                             "creationTimestamp": "2024-01-01T00:00:00Z", "deletionTimestamp": "2024-01-02T00:00:00Z"},
            })),
            pod(serde_json::json!({
                "metadata": {"namespace": "istio-system", "name": "ztunnel-new", "labels": {"app": "ztunnel"},
                             "creationTimestamp": "2024-01-02T00:00:00Z"},
            })),
        ]);
        let d = c.desired();
        assert_eq!(
            d.pods.keys().map(|k| k.1.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(d.ztunnel.unwrap().name, "ztunnel-new");
    }
}
