//! The agent's desired kernel state, from its state directory: the same inputs (ztunnel
//! endpoint, enrolled pods, tunnel choice) through the same model functions
//! ([`model::node_desired`], [`model::ztunnel_desired`], [`NodeNft`]) the agent reconciles
//! with, so a difference from the kernel is exactly what its next reconcile changes.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use ambient_net::firewall::FirewallKind;

use ambient_net::model::{NetDesired, TunnelChoice, TunnelKind};
use ambient_net::nft::NodeNft;

use super::OpsError;
use crate::store::{AgentState, PodRecord, Store};

/// The ztunnel pod's own interface (the CNI's `CNI_IFNAME` for it; `eth0` everywhere here).
const ZTUNNEL_POD_IFACE: &str = "eth0";

pub struct Desired {
    pub state: AgentState,
    pub choice: TunnelChoice,
    /// The node's links, rules, routes and sysctls.
    pub net: NetDesired,
    /// The node's nft tables.
    pub nft: NodeNft,
    /// The ztunnel netns' links, rules and routes, when a ztunnel is known.
    pub ztunnel: Option<NetDesired>,
}

impl Desired {
    /// Loads `state_dir` (snapshot plus journal, as a restarted agent would).
    pub fn load(state_dir: &Path) -> Result<Desired, OpsError> {
        let state = Store::new(state_dir).load().map_err(|e| OpsError::State {
            dir: state_dir.display().to_string(),
            msg: format!("{e:#}"),
        })?;
        Ok(Self::of(state))
    }

    pub fn of(state: AgentState) -> Desired {
        let choice = state.tunnel.unwrap_or(TunnelChoice {
            kind: TunnelKind::Vxlan,
            port: ambient_net::consts::TUNNEL_PORT,
        });
        // The agent's own functions: what it would reconcile to (router-advertised devices
        // are not known here: their accept_ra is not compared).
        let net = crate::node::net_desired(&state, choice, &BTreeSet::new());
        let nft = crate::node::nft_desired(&state, choice);
        let ztunnel = state
            .ztunnel
            .as_ref()
            .map(|z| crate::node::ztunnel_net_desired(&z.endpoint, choice, ZTUNNEL_POD_IFACE));
        Desired {
            state,
            choice,
            net,
            nft,
            ztunnel,
        }
    }

    /// The ztunnel pod's netns, when a ztunnel is known.
    pub fn ztunnel_netns(&self) -> Option<std::path::PathBuf> {
        self.state
            .ztunnel
            .as_ref()
            .map(|z| std::path::PathBuf::from(&z.endpoint.netns))
    }

    /// The packet filter the agent programs (recorded at its first start; nftables before
    /// the choice was recorded).
    pub fn firewall(&self) -> FirewallKind {
        self.state.firewall.unwrap_or(FirewallKind::Nftables)
    }

    /// The enrolled pod holding `ip`.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodRecord> {
        self.state.pods.values().find(|p| p.ips.contains(&ip))
    }

    /// The enrolled pod `namespace/name`.
    pub fn pod_by_name(&self, namespace: &str, name: &str) -> Option<&PodRecord> {
        self.state
            .pods
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// Whether `ip` is one of the ztunnel pod's addresses.
    pub fn is_ztunnel_ip(&self, ip: IpAddr) -> bool {
        self.state.ztunnel.as_ref().is_some_and(|z| {
            let ips = z.endpoint.ips();
            ips.v4.map(IpAddr::V4) == Some(ip) || ips.v6.map(IpAddr::V6) == Some(ip)
        })
    }
}
