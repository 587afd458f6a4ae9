//! Standalone membership configuration: which namespaces are ambient, which are never
//! touched, which pods opted out, and how to recognise the ztunnel pod.

use std::collections::BTreeSet;
use std::path::Path;

use ambient_net::consts::membership::DEFAULT_EXCLUDED_NAMESPACES;
use ambient_net::proto::PodInfo;
use serde::{Deserialize, Serialize};

use crate::membership::Verdict;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Namespaces whose pods are captured (the `istio.io/dataplane-mode=ambient` label).
    #[serde(default)]
    pub ambient_namespaces: BTreeSet<String>,
    /// Namespaces never captured, whatever else says.
    #[serde(default = "default_excluded")]
    pub excluded_namespaces: BTreeSet<String>,
    /// `namespace/name` of pods that opted out (`ambient.istio.io/redirection: disabled`).
    #[serde(default)]
    pub opt_out_pods: BTreeSet<String>,
    pub ztunnel: ZtunnelSelector,
}

/// The ztunnel pod of this node: matched by namespace AND name, never by a label alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZtunnelSelector {
    pub namespace: String,
    pub pod_name_prefix: String,
}

fn default_excluded() -> BTreeSet<String> {
    DEFAULT_EXCLUDED_NAMESPACES
        .iter()
        .map(|s| s.to_string())
        .collect()
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("read config {}: {e}", path.display()))?;
        let c: Config = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        if c.ztunnel.namespace.is_empty() || c.ztunnel.pod_name_prefix.is_empty() {
            anyhow::bail!(
                "config {}: ztunnel.namespace and ztunnel.podNamePrefix must be set",
                path.display()
            );
        }
        Ok(c)
    }

    pub fn verdict(&self, pod: &PodInfo) -> Verdict {
        if pod.namespace == self.ztunnel.namespace
            && pod.name.starts_with(&self.ztunnel.pod_name_prefix)
        {
            Verdict::Ztunnel
        } else if self.excluded_namespaces.contains(&pod.namespace) {
            Verdict::Excluded
        } else if !self.ambient_namespaces.contains(&pod.namespace) {
            Verdict::NotAmbient
        } else if self
            .opt_out_pods
            .contains(&format!("{}/{}", pod.namespace, pod.name))
        {
            Verdict::OptedOut
        } else {
            Verdict::Enroll
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> PodInfo {
        PodInfo {
            container_id: "c".into(),
            if_name: "eth0".into(),
            netns: "/x".into(),
            namespace: ns.into(),
            name: name.into(),
            uid: String::new(),
            ips: vec![],
            gateways: vec![],
        }
    }

    fn config() -> Config {
        serde_json::from_str(
            r#"{"ambientNamespaces":["demo","kube-system"],"optOutPods":["demo/legacy"],
                "ztunnel":{"namespace":"istio-system","podNamePrefix":"ztunnel"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn membership_follows_namespace_exclusion_and_opt_out() {
        let c = config();
        assert_eq!(c.verdict(&pod("demo", "app")), Verdict::Enroll);
        assert_eq!(c.verdict(&pod("default", "app")), Verdict::NotAmbient);
        // Excluded wins even when the namespace is also listed as ambient.
        assert_eq!(c.verdict(&pod("kube-system", "dns")), Verdict::Excluded);
        assert_eq!(c.verdict(&pod("demo", "legacy")), Verdict::OptedOut);
    }

    #[test]
    fn ztunnel_is_matched_by_namespace_and_name_not_name_alone() {
        let c = config();
        assert_eq!(
            c.verdict(&pod("istio-system", "ztunnel-x1")),
            Verdict::Ztunnel
        );
        assert_eq!(c.verdict(&pod("demo", "ztunnel-x1")), Verdict::Enroll);
    }

    #[test]
    fn unknown_fields_are_an_error() {
        let e = serde_json::from_str::<Config>(
            r#"{"ambientNamespace":["demo"],"ztunnel":{"namespace":"a","podNamePrefix":"b"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("ambientNamespace"), "{e}");
    }
}
