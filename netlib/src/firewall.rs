//! The firewall backends behind one trait: nftables (the default, [`crate::nft`]) and
//! iptables + ipset (the original's, [`crate::iptables`]). The agent and ztunnel-init hold a
//! `&dyn FirewallDriver` and never ask which one it is.
//!
//! Both take the same desired state ([`NodeNft`], [`ZtunnelRules`]) and the same pod elements
//! ([`pod_elements`]); a backend ignores the elements of sets it does not have (iptables has
//! no bridge-family table).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::iptables::{self, IptablesError};
use crate::model::PodSource;
use crate::nft::{self, NftError, NodeNft, PodElement, ZtunnelRules};

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error("unknown firewall {0:?} (auto, nftables or iptables)")]
    UnknownMode(String),
}

impl FirewallError {
    /// The backend's binary is not installed.
    pub fn is_missing(&self) -> bool {
        matches!(
            self,
            FirewallError::Nft(NftError::Missing { .. })
                | FirewallError::Iptables(IptablesError::Missing { .. })
        )
    }
}

type Result<T> = std::result::Result<T, FirewallError>;

/// What programs the node's and the ztunnel netns' packet filter.
pub trait FirewallDriver: Send + Sync {
    fn kind(&self) -> FirewallKind;
    /// Brings the node's rules and pod sets to `desired` in place; `Ok(true)` on a change.
    fn reconcile_node(&self, desired: &NodeNft) -> Result<bool>;
    /// CNI ADD: a pod's elements, touching nothing else.
    fn add_pod_elements(&self, elems: &[PodElement]) -> Result<()>;
    /// CNI DEL: a pod's elements; absent ones are fine.
    fn delete_pod_elements(&self, elems: &[PodElement]) -> Result<()>;
    /// CNI CHECK: the elements (of this backend's sets) the kernel does not hold.
    fn missing_pod_elements(&self, elems: &[PodElement]) -> Result<Vec<PodElement>>;
    /// Removes every node rule, chain and set of this backend; absent is fine.
    fn cleanup_node(&self) -> Result<()>;
    /// Brings the ztunnel netns' TPROXY rules to `desired`; `Ok(true)` on a change.
    fn reconcile_ztunnel(&self, desired: &ZtunnelRules) -> Result<bool>;
    fn cleanup_ztunnel(&self) -> Result<()>;
    fn name(&self) -> &'static str {
        self.kind().name()
    }
}

/// Every element the node's sets hold for these pod sources (both backends' input).
pub fn pod_elements<'a>(pods: impl IntoIterator<Item = &'a PodSource>) -> Vec<PodElement> {
    nft::pod_elements(pods)
}

/// A backend, as recorded in the agent's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirewallKind {
    Nftables,
    Iptables,
}

impl FirewallKind {
    pub const ALL: [FirewallKind; 2] = [FirewallKind::Nftables, FirewallKind::Iptables];

    pub fn name(self) -> &'static str {
        match self {
            FirewallKind::Nftables => "nftables",
            FirewallKind::Iptables => "iptables",
        }
    }

    pub fn driver(self) -> &'static dyn FirewallDriver {
        match self {
            FirewallKind::Nftables => &Nftables,
            FirewallKind::Iptables => &Iptables,
        }
    }
}

impl fmt::Display for FirewallKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `--firewall auto|nftables|iptables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirewallMode {
    /// nftables when the `nft` binary runs and the kernel has nf_tables, else iptables.
    Auto,
    Only(FirewallKind),
}

impl FromStr for FirewallMode {
    type Err = FirewallError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(FirewallMode::Auto),
            "nftables" | "nft" => Ok(FirewallMode::Only(FirewallKind::Nftables)),
            "iptables" => Ok(FirewallMode::Only(FirewallKind::Iptables)),
            other => Err(FirewallError::UnknownMode(other.to_string())),
        }
    }
}

impl FirewallMode {
    /// The backend this mode means on this node now.
    pub fn resolve(self) -> FirewallKind {
        match self {
            FirewallMode::Only(k) => k,
            FirewallMode::Auto if nftables_usable() => FirewallKind::Nftables,
            FirewallMode::Auto => FirewallKind::Iptables,
        }
    }

    /// Whether a backend recorded earlier satisfies this mode (auto keeps any).
    pub fn accepts(self, k: FirewallKind) -> bool {
        match self {
            FirewallMode::Auto => true,
            FirewallMode::Only(want) => want == k,
        }
    }
}

/// `nft list tables` succeeds: the binary runs and the kernel has nf_tables.
fn nftables_usable() -> bool {
    std::process::Command::new(nft::nft_program())
        .args(["list", "tables"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether kube-proxy runs in nftables mode here (`table ip kube-proxy` / `ip6 kube-proxy`).
/// The iptables backend's ACCEPT ahead of KUBE-SERVICES cannot stop that table's DNAT (an
/// accept ends only its own chain; only a NAT binding skips later NAT chains), so captured
/// Service traffic would reach ztunnel with the endpoint, not the ClusterIP: use nftables.
pub fn kube_proxy_uses_nftables() -> bool {
    std::process::Command::new(nft::nft_program())
        .args(["list", "tables"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                let l = l.trim();
                l == "table ip kube-proxy" || l == "table ip6 kube-proxy"
            })
        })
}

/// The nftables backend: the functions of [`crate::nft`], unchanged.
pub struct Nftables;

impl FirewallDriver for Nftables {
    fn kind(&self) -> FirewallKind {
        FirewallKind::Nftables
    }
    fn reconcile_node(&self, desired: &NodeNft) -> Result<bool> {
        Ok(nft::reconcile_node(desired)?)
    }
    fn add_pod_elements(&self, elems: &[PodElement]) -> Result<()> {
        Ok(nft::add_pod_elements(elems)?)
    }
    fn delete_pod_elements(&self, elems: &[PodElement]) -> Result<()> {
        Ok(nft::delete_pod_elements(elems)?)
    }
    fn missing_pod_elements(&self, elems: &[PodElement]) -> Result<Vec<PodElement>> {
        Ok(nft::missing_pod_elements(elems)?)
    }
    fn cleanup_node(&self) -> Result<()> {
        Ok(nft::delete_node_table()?)
    }
    fn reconcile_ztunnel(&self, desired: &ZtunnelRules) -> Result<bool> {
        Ok(nft::reconcile_ztunnel(desired)?)
    }
    fn cleanup_ztunnel(&self) -> Result<()> {
        Ok(nft::delete_ztunnel_table()?)
    }
}

/// The iptables + ipset backend ([`crate::iptables`]).
pub struct Iptables;

impl FirewallDriver for Iptables {
    fn kind(&self) -> FirewallKind {
        FirewallKind::Iptables
    }
    fn reconcile_node(&self, desired: &NodeNft) -> Result<bool> {
        Ok(iptables::reconcile_node(desired)?)
    }
    fn add_pod_elements(&self, elems: &[PodElement]) -> Result<()> {
        Ok(iptables::add_pod_elements(elems)?)
    }
    fn delete_pod_elements(&self, elems: &[PodElement]) -> Result<()> {
        Ok(iptables::delete_pod_elements(elems)?)
    }
    fn missing_pod_elements(&self, elems: &[PodElement]) -> Result<Vec<PodElement>> {
        Ok(iptables::missing_pod_elements(elems)?)
    }
    fn cleanup_node(&self) -> Result<()> {
        Ok(iptables::cleanup_node()?)
    }
    fn reconcile_ztunnel(&self, desired: &ZtunnelRules) -> Result<bool> {
        Ok(iptables::reconcile_ztunnel(desired)?)
    }
    fn cleanup_ztunnel(&self) -> Result<()> {
        Ok(iptables::cleanup_ztunnel()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_accept() {
        assert_eq!("auto".parse::<FirewallMode>().unwrap(), FirewallMode::Auto);
        let ipt: FirewallMode = "iptables".parse().unwrap();
        assert_eq!(ipt.resolve(), FirewallKind::Iptables);
        assert!(ipt.accepts(FirewallKind::Iptables));
        assert!(!ipt.accepts(FirewallKind::Nftables));
        assert!(FirewallMode::Auto.accepts(FirewallKind::Iptables));
        assert!("ebtables".parse::<FirewallMode>().is_err());
        assert_eq!(
            serde_json::to_string(&FirewallKind::Iptables).unwrap(),
            "\"iptables\""
        );
        assert_eq!(FirewallKind::Nftables.driver().name(), "nftables");
    }
}
