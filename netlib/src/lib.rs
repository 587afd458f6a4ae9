//! ambient-net: the network programming shared by ambient-cni, ambient-agent and ztunnel-init.
//!
//! The SPEC's names and numbers live in [`consts`]; [`netns`] enters namespaces;
//! [`nl`] drives links, addresses, rules and routes over rtnetlink; [`nft`] renders and
//! applies the nftables rules in atomic batches; [`sysctl`] reads and writes `/proc/sys/net`;
//! [`proto`] is the wire format between the CNI plugin and the agent; [`firewall`] puts the
//! nftables backend and the [`iptables`] + ipset one behind one trait.

pub mod consts;
mod exec;
pub mod firewall;
pub mod iptables;
pub mod logging;
pub mod model;
pub mod netns;
pub mod nft;
pub mod nl;
pub mod proto;
pub mod sysctl;
