//! The lab's shape (two nodes; four pods on each, plus pods placed on one node only) and the plumbing the lab does itself:
//! namespaces, their sysctls, loopback, and the `ul0` underlay between the nodes. Pod
//! networking is the CNI chain's job (see [`crate::cni`]).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use ambient_net::netns;
use ambient_net::nl::Netlink;
use anyhow::{Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use netlink_packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::state::PodRole;

/// The underlay link's name in both nodes.
pub const UNDERLAY_DEV: &str = "ul0";
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
pub const POD_PREFIX_LEN: u8 = 24;
/// The Service CIDR. Nodes have no default route, and a node's own connect() to a
/// ClusterIP needs a route before the nat output hook rewrites it: each node routes this
/// CIDR onto the underlay link (no gateway), standing in for a real node's default route.
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);
/// The port every non-ztunnel pod serves on.
pub const SERVER_PORT: u16 = 9080;
/// The port every serving pod also answers HTTP on (h1 and h2c, see [`crate::serve`]).
pub const HTTP_PORT: u16 = 8080;

/// One node of the lab.
#[derive(Debug, Clone, Copy)]
pub struct NodePlan {
    /// `A` / `B`: netns `<prefix>-node<name>`.
    pub name: &'static str,
    /// `a` / `b`: pod netns `<prefix>-<letter>-<pod>`.
    pub letter: &'static str,
    pub underlay_ip: Ipv4Addr,
    pub pod_net: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

impl NodePlan {
    pub fn short(&self) -> String {
        format!("node{}", self.name)
    }

    pub fn pod_cidr(&self) -> String {
        format!("{}/{}", self.pod_net, POD_PREFIX_LEN)
    }

    /// The other node.
    pub fn peer(&self) -> &'static NodePlan {
        if self.name == NODES[0].name {
            &NODES[1]
        } else {
            &NODES[0]
        }
    }
}

pub const NODES: [NodePlan; 2] = [
    NodePlan {
        name: "A",
        letter: "a",
        underlay_ip: Ipv4Addr::new(172, 31, 0, 1),
        pod_net: Ipv4Addr::new(10, 244, 1, 0),
        gateway: Ipv4Addr::new(10, 244, 1, 1),
    },
    NodePlan {
        name: "B",
        letter: "b",
        underlay_ip: Ipv4Addr::new(172, 31, 0, 2),
        pod_net: Ipv4Addr::new(10, 244, 2, 0),
        gateway: Ipv4Addr::new(10, 244, 2, 1),
    },
];

/// Which nodes a pod is created on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// One pod per node (`a-app`, `b-app`).
    Every,
    /// Only on the node with this name (`A`/`B`).
    Only(&'static str),
}

/// One pod of the plan: created on every node or on one.
#[derive(Debug, Clone, Copy)]
pub struct PodPlan {
    pub name: &'static str,
    pub role: PodRole,
    pub namespace: &'static str,
    /// Whether the pod is expected to be enrolled (its namespace is ambient).
    pub ambient: bool,
    /// Whether it runs the test servers on [`SERVER_PORT`] and [`HTTP_PORT`].
    pub serves: bool,
    pub placement: Placement,
    /// Its ServiceAccount (the `sa` of its SPIFFE identity).
    pub service_account: &'static str,
    /// What its HTTP server reports as `version`.
    pub version: &'static str,
}

impl PodPlan {
    /// Whether this pod exists on `node`.
    pub fn on(&self, node: &NodePlan) -> bool {
        match self.placement {
            Placement::Every => true,
            Placement::Only(name) => name == node.name,
        }
    }

    /// The pod id on `node`: `<letter>-<name>` (also its netns short name).
    pub fn id(&self, node: &NodePlan) -> String {
        format!("{}-{}", node.letter, self.name)
    }
}

/// In creation order (per node): the ztunnel first, so the agent knows its endpoint before
/// the rest; the pods of one node only after the others, so the first four keep their IPs
/// (`.2`–`.5` of the node's CIDR).
pub const PODS: [PodPlan; 7] = [
    PodPlan {
        name: "ztunnel",
        role: PodRole::Ztunnel,
        namespace: "istio-system",
        ambient: false,
        serves: false,
        placement: Placement::Every,
        service_account: "ztunnel",
        version: "",
    },
    PodPlan {
        name: "app",
        role: PodRole::App,
        namespace: "demo",
        ambient: true,
        serves: true,
        placement: Placement::Every,
        service_account: "app",
        version: "v1",
    },
    PodPlan {
        name: "client",
        role: PodRole::Client,
        namespace: "demo",
        ambient: true,
        serves: true,
        placement: Placement::Every,
        service_account: "client",
        version: "v1",
    },
    PodPlan {
        name: "plain",
        role: PodRole::Plain,
        namespace: "default",
        ambient: false,
        serves: true,
        placement: Placement::Every,
        service_account: "plain",
        version: "v1",
    },
    PodPlan {
        name: "reviews-v1",
        role: PodRole::Reviews,
        namespace: "demo",
        ambient: true,
        serves: true,
        placement: Placement::Only("A"),
        service_account: "reviews",
        version: "v1",
    },
    PodPlan {
        name: "reviews-v2",
        role: PodRole::Reviews,
        namespace: "demo",
        ambient: true,
        serves: true,
        placement: Placement::Only("B"),
        service_account: "reviews",
        version: "v2",
    },
    // The waypoint: an ambient pod like any other; it runs the `waypoint` binary (when the
    // data plane runs), not the test servers.
    PodPlan {
        name: "waypoint",
        role: PodRole::Waypoint,
        namespace: "demo",
        ambient: true,
        serves: false,
        placement: Placement::Only("B"),
        service_account: "waypoint",
        version: "",
    },
];

/// Whether a pod of the plan is enrolled: its `ambient`, except the waypoint, which is opted
/// out unless `waypoint_captured` (Istio's waypoints are not captured: they speak HBONE
/// themselves, and capturing them costs two extra hops through their node's ztunnel; the
/// product handles both).
pub fn enrolled(plan: &PodPlan, waypoint_captured: bool) -> bool {
    plan.ambient && (plan.role != PodRole::Waypoint || waypoint_captured)
}

/// The `<namespace>/<pod name>` of the pods the agent is told to leave out.
pub fn opted_out(waypoint_captured: bool) -> Vec<String> {
    PODS.iter()
        .filter(|p| p.ambient && !enrolled(p, waypoint_captured))
        .flat_map(|p| {
            NODES
                .iter()
                .filter(|n| p.on(n))
                .map(move |n| format!("{}/{}-{}", p.namespace, p.name, n.letter))
        })
        .collect()
}

/// The pods of the plan on `node`, in creation order.
pub fn pods_on(node: &NodePlan) -> impl Iterator<Item = &'static PodPlan> + '_ {
    PODS.iter().filter(move |p| p.on(node))
}

/// A pod's plan by its name (`reviews-v1`).
pub fn plan(name: &str) -> Option<&'static PodPlan> {
    PODS.iter().find(|p| p.name == name)
}

/// The namespaces the agent is told are ambient.
pub const AMBIENT_NAMESPACES: &[&str] = &["demo"];

/// Sysctls of a node netns, set before any link exists (new links copy `conf.default`,
/// and a new netns starts from the root netns' IPv4 conf, so nothing is left implicit).
/// `rp_filter` is the distro-like baseline the agent has to relax where the SPEC says.
pub fn node_sysctls(rp_filter: u8) -> Vec<(&'static str, String)> {
    let rpf = rp_filter.to_string();
    vec![
        ("net.ipv4.ip_forward", "1".into()),
        ("net.ipv4.conf.all.rp_filter", rpf.clone()),
        ("net.ipv4.conf.default.rp_filter", rpf),
        ("net.ipv4.conf.all.accept_local", "0".into()),
        ("net.ipv4.conf.default.accept_local", "0".into()),
        ("net.ipv4.conf.all.route_localnet", "0".into()),
        ("net.ipv4.conf.default.route_localnet", "0".into()),
    ]
}

/// Sysctls of a pod netns: no forwarding, the same rp_filter baseline, IPv6 off (the
/// chain is IPv4 only; this keeps link-local noise out of captures).
pub fn pod_sysctls(rp_filter: u8) -> Vec<(&'static str, String)> {
    let rpf = rp_filter.to_string();
    vec![
        ("net.ipv4.ip_forward", "0".into()),
        ("net.ipv4.conf.all.rp_filter", rpf.clone()),
        ("net.ipv4.conf.default.rp_filter", rpf),
        ("net.ipv4.conf.all.accept_local", "0".into()),
        ("net.ipv4.conf.default.accept_local", "0".into()),
        ("net.ipv6.conf.all.disable_ipv6", "1".into()),
        ("net.ipv6.conf.default.disable_ipv6", "1".into()),
    ]
}

/// An rtnetlink handle inside the named netns.
pub fn netlink(netns_name: &str) -> Result<Handle> {
    let nl = Netlink::in_netns(&netns::named_path(netns_name))
        .with_context(|| format!("netlink in netns {netns_name}"))?;
    Ok(nl.handle().clone())
}

pub async fn link_index(handle: &Handle, name: &str) -> Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .with_context(|| format!("look up link {name}"))?
        .with_context(|| format!("no link {name}"))?;
    Ok(link.header.index)
}

pub async fn set_up(handle: &Handle, name: &str) -> Result<()> {
    let index = link_index(handle, name).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .with_context(|| format!("set {name} up"))
}

/// Brings loopback up in a fresh netns.
pub async fn loopback_up(netns_name: &str) -> Result<()> {
    let handle = netlink(netns_name)?;
    set_up(&handle, "lo")
        .await
        .with_context(|| format!("loopback in netns {netns_name}"))
}

/// Creates the veth `ul0` in `ns_a` with its peer `ul0` moved into `ns_b`.
pub async fn create_underlay(ns_a: &str, ns_b: &str) -> Result<()> {
    let handle = netlink(ns_a)?;
    let peer_ns =
        File::open(netns::named_path(ns_b)).with_context(|| format!("open netns {ns_b}"))?;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(UNDERLAY_DEV)
        .setns_by_fd(peer_ns.as_raw_fd())
        .build();
    let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(UNDERLAY_DEV)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    handle
        .link()
        .add(veth)
        .execute()
        .await
        .with_context(|| format!("create veth {UNDERLAY_DEV} in {ns_a} with its peer in {ns_b}"))?;
    drop(peer_ns);
    Ok(())
}

/// Addresses `ul0`, brings it up, routes the peer node's pod CIDR via the peer over it
/// and the Service CIDR onto it.
pub async fn configure_underlay(netns_name: &str, node: &NodePlan) -> Result<()> {
    let handle = netlink(netns_name)?;
    let index = link_index(&handle, UNDERLAY_DEV).await?;
    handle
        .address()
        .add(index, IpAddr::V4(node.underlay_ip), UNDERLAY_PREFIX_LEN)
        .execute()
        .await
        .with_context(|| format!("address {} on {UNDERLAY_DEV}", node.underlay_ip))?;
    set_up(&handle, UNDERLAY_DEV).await?;
    let peer = node.peer();
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(peer.pod_net, POD_PREFIX_LEN)
        .gateway(peer.underlay_ip)
        .output_interface(index)
        .build();
    handle.route().add(route).execute().await.with_context(|| {
        format!(
            "route {} via {} in {netns_name}",
            peer.pod_cidr(),
            peer.underlay_ip
        )
    })?;
    let (svc_net, svc_len) = SERVICE_CIDR;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(svc_net, svc_len)
        .scope(RouteScope::Link)
        .output_interface(index)
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .with_context(|| format!("route {svc_net}/{svc_len} dev {UNDERLAY_DEV} in {netns_name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_consistent() {
        assert_eq!(NODES[0].peer().name, "B");
        assert_eq!(NODES[1].peer().name, "A");
        assert_eq!(NODES[0].pod_cidr(), "10.244.1.0/24");
        assert_eq!(PODS[0].role, PodRole::Ztunnel);
        assert!(PODS
            .iter()
            .filter(|p| p.ambient)
            .all(|p| AMBIENT_NAMESPACES.contains(&p.namespace)));
        // The pods of both nodes come first: their IPs do not move.
        let first_single = PODS
            .iter()
            .position(|p| p.placement != Placement::Every)
            .unwrap();
        assert!(PODS[first_single..]
            .iter()
            .all(|p| p.placement != Placement::Every));
        let a: Vec<String> = pods_on(&NODES[0]).map(|p| p.id(&NODES[0])).collect();
        let b: Vec<String> = pods_on(&NODES[1]).map(|p| p.id(&NODES[1])).collect();
        assert_eq!(
            a,
            ["a-ztunnel", "a-app", "a-client", "a-plain", "a-reviews-v1"]
        );
        assert_eq!(
            b,
            [
                "b-ztunnel",
                "b-app",
                "b-client",
                "b-plain",
                "b-reviews-v2",
                "b-waypoint"
            ]
        );
        assert_eq!(plan("reviews-v2").unwrap().version, "v2");
        assert_eq!(plan("reviews-v1").unwrap().service_account, "reviews");
    }
}
