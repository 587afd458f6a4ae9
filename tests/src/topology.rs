//! The lab's shape (two nodes; four pods on each, plus pods placed on one node only) and the plumbing the lab does itself:
//! namespaces, their sysctls, loopback, and the `ul0` underlay between the nodes. Pod
//! networking is the CNI chain's job (see [`crate::cni`]).
//!
//! Address plan (`--ip-family ipv4|ipv6|dual`; ipv4 is the default and the only family of
//! older labs):
//!
//! | | IPv4 | IPv6 |
//! |---|---|---|
//! | underlay `ul0` | 172.31.0.{1,2}/24 | fd00:172:31::{1,2}/64 (ipv6); in dual the underlay stays IPv4 and the v6 pod routes go via fixed link-locals fe80::a / fe80::b |
//! | pod network A / B | 10.244.{1,2}.0/24, gateway .1 | fd00:10:244:{1,2}::/64, gateway ::1 |
//! | Services | 10.96.0.0/12 | fd00:10:96::/112 |

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ambient_net::netns;
use ambient_net::nl::Netlink;
use anyhow::{Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth};
use netlink_packet_route::route::RouteScope;
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use serde::{Deserialize, Serialize};

use crate::state::PodRole;

/// The underlay link's name in both nodes.
pub const UNDERLAY_DEV: &str = "ul0";
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
pub const POD_PREFIX_LEN: u8 = 24;
pub const UNDERLAY_PREFIX_LEN6: u8 = 64;
/// One /64 per node, as a real dual-stack cluster hands out (`--node-cidr-mask-size-ipv6`).
pub const POD_PREFIX_LEN6: u8 = 64;
/// The Service CIDR. Nodes have no default route, and a node's own connect() to a
/// ClusterIP needs a route before the nat output hook rewrites it: each node routes this
/// CIDR onto the underlay link (no gateway), standing in for a real node's default route.
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);
/// The IPv6 Service CIDR (a /112, kube-apiserver's largest v6 service range), routed the
/// same way.
pub const SERVICE_CIDR6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0), 112);
/// The port every non-ztunnel pod serves on.
pub const SERVER_PORT: u16 = 9080;
/// The port every serving pod also answers HTTP on (h1 and h2c, see [`crate::serve`]).
pub const HTTP_PORT: u16 = 8080;

/// Which address families the lab's pods, Services and underlay have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// IPv4 only (the lab as it always was).
    #[default]
    Ipv4,
    /// IPv6 only: v6 pods, v6 Services, a v6 underlay.
    Ipv6,
    /// Both: every pod and Service has a v4 and a v6 address (v4 first: the primary), the
    /// underlay is IPv4 and carries the v6 pod routes too.
    Dual,
}

impl IpFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
            IpFamily::Dual => "dual",
        }
    }

    pub fn has_v4(self) -> bool {
        self != IpFamily::Ipv6
    }

    pub fn has_v6(self) -> bool {
        self != IpFamily::Ipv4
    }
}

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
    /// The underlay's v6 address in an ipv6 lab.
    pub underlay_ip6: Ipv6Addr,
    /// A fixed link-local on `ul0` (next to the kernel's EUI-64 one): the next hop of the
    /// peer's v6 pod route in a dual lab, whose underlay has no global v6 address.
    pub underlay_ll: Ipv6Addr,
    pub pod_net6: Ipv6Addr,
    pub gateway6: Ipv6Addr,
}

impl NodePlan {
    pub fn short(&self) -> String {
        format!("node{}", self.name)
    }

    pub fn pod_cidr(&self) -> String {
        format!("{}/{}", self.pod_net, POD_PREFIX_LEN)
    }

    pub fn pod_cidr6(&self) -> String {
        format!("{}/{}", self.pod_net6, POD_PREFIX_LEN6)
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
        underlay_ip6: Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 1),
        underlay_ll: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xa),
        pod_net6: Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0),
        gateway6: Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1),
    },
    NodePlan {
        name: "B",
        letter: "b",
        underlay_ip: Ipv4Addr::new(172, 31, 0, 2),
        pod_net: Ipv4Addr::new(10, 244, 2, 0),
        gateway: Ipv4Addr::new(10, 244, 2, 1),
        underlay_ip6: Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 2),
        underlay_ll: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xb),
        pod_net6: Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 0),
        gateway6: Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 1),
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
///
/// With IPv6 the node forwards v6 too. `forwarding=1` makes an interface ignore router
/// advertisements unless `accept_ra=2`; the lab sends none (no router, static routes
/// only), so it stays at the default. DAD is off on every link the node will have
/// (`accept_dad=0` on all/default, before the underlay, the veths or the bridge exist): the
/// addresses are the lab's own plan and cannot clash, and a tentative gateway address would
/// neither answer neighbour solicitations nor be a usable source for the first second.
pub fn node_sysctls(rp_filter: u8, family: IpFamily) -> Vec<(&'static str, String)> {
    let rpf = rp_filter.to_string();
    let mut v = vec![
        ("net.ipv4.ip_forward", "1".into()),
        ("net.ipv4.conf.all.rp_filter", rpf.clone()),
        ("net.ipv4.conf.default.rp_filter", rpf),
        ("net.ipv4.conf.all.accept_local", "0".into()),
        ("net.ipv4.conf.default.accept_local", "0".into()),
        ("net.ipv4.conf.all.route_localnet", "0".into()),
        ("net.ipv4.conf.default.route_localnet", "0".into()),
    ];
    if family.has_v6() {
        v.extend([
            ("net.ipv6.conf.all.disable_ipv6", "0".into()),
            ("net.ipv6.conf.default.disable_ipv6", "0".into()),
            ("net.ipv6.conf.all.forwarding", "1".into()),
            ("net.ipv6.conf.default.forwarding", "1".into()),
            ("net.ipv6.conf.all.accept_dad", "0".into()),
            ("net.ipv6.conf.default.accept_dad", "0".into()),
        ]);
    }
    v
}

/// Sysctls of an IPv4 lab's pod netns (see [`pod_sysctls_for`]).
pub fn pod_sysctls(rp_filter: u8) -> Vec<(&'static str, String)> {
    pod_sysctls_for(rp_filter, IpFamily::Ipv4)
}

/// Sysctls of a pod netns: no forwarding, the same rp_filter baseline. In an ipv4 lab IPv6
/// is off (this keeps link-local noise out of captures); with IPv6 it is on, without DAD
/// (`eth0` is made in the pod netns and copies `default`), so the pod's address is usable as
/// soon as CNI ADD returns.
pub fn pod_sysctls_for(rp_filter: u8, family: IpFamily) -> Vec<(&'static str, String)> {
    let rpf = rp_filter.to_string();
    let mut v = vec![
        ("net.ipv4.ip_forward", "0".into()),
        ("net.ipv4.conf.all.rp_filter", rpf.clone()),
        ("net.ipv4.conf.default.rp_filter", rpf),
        ("net.ipv4.conf.all.accept_local", "0".into()),
        ("net.ipv4.conf.default.accept_local", "0".into()),
    ];
    if family.has_v6() {
        v.extend([
            ("net.ipv6.conf.all.disable_ipv6", "0".into()),
            ("net.ipv6.conf.default.disable_ipv6", "0".into()),
            ("net.ipv6.conf.all.forwarding", "0".into()),
            ("net.ipv6.conf.all.accept_dad", "0".into()),
            ("net.ipv6.conf.default.accept_dad", "0".into()),
        ]);
    } else {
        v.extend([
            ("net.ipv6.conf.all.disable_ipv6", "1".into()),
            ("net.ipv6.conf.default.disable_ipv6", "1".into()),
        ]);
    }
    v
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

/// Addresses `ul0` in `family`, brings it up, routes the peer node's pod networks via the
/// peer over it and the Service CIDRs onto it. ipv4: 172.31.0.x and v4 routes (as always);
/// ipv6: fd00:172:31::x and v6 routes only; dual: the v4 underlay plus a fixed link-local
/// per node as the next hop of the v6 pod route, so both families route between the nodes.
pub async fn configure_underlay(netns_name: &str, node: &NodePlan, family: IpFamily) -> Result<()> {
    let handle = netlink(netns_name)?;
    let index = link_index(&handle, UNDERLAY_DEV).await?;
    let mut addrs: Vec<(IpAddr, u8)> = Vec::new();
    if family.has_v4() {
        addrs.push((node.underlay_ip.into(), UNDERLAY_PREFIX_LEN));
    }
    match family {
        IpFamily::Ipv4 => {}
        IpFamily::Ipv6 => addrs.push((node.underlay_ip6.into(), UNDERLAY_PREFIX_LEN6)),
        IpFamily::Dual => addrs.push((node.underlay_ll.into(), UNDERLAY_PREFIX_LEN6)),
    }
    for (ip, len) in addrs {
        handle
            .address()
            .add(index, ip, len)
            .execute()
            .await
            .with_context(|| format!("address {ip}/{len} on {UNDERLAY_DEV} in {netns_name}"))?;
    }
    set_up(&handle, UNDERLAY_DEV).await?;
    let peer = node.peer();
    if family.has_v4() {
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
        handle.route().add(route).execute().await.with_context(|| {
            format!("route {svc_net}/{svc_len} dev {UNDERLAY_DEV} in {netns_name}")
        })?;
    }
    if family.has_v6() {
        let via = if family == IpFamily::Ipv6 {
            peer.underlay_ip6
        } else {
            peer.underlay_ll
        };
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(peer.pod_net6, POD_PREFIX_LEN6)
            .gateway(via)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(route)
            .execute()
            .await
            .with_context(|| format!("route {} via {via} in {netns_name}", peer.pod_cidr6()))?;
        // As for v4: the node's own connect() to a v6 ClusterIP needs a route before the
        // nat output hook rewrites the destination.
        let (svc_net, svc_len) = SERVICE_CIDR6;
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(svc_net, svc_len)
            .output_interface(index)
            .build();
        handle.route().add(route).execute().await.with_context(|| {
            format!("route {svc_net}/{svc_len} dev {UNDERLAY_DEV} in {netns_name}")
        })?;
    }
    Ok(())
}

/// The IPv6 addresses in the named netns that are still tentative (DAD not done) or failed
/// DAD, as `<addr> dev <index>`.
pub async fn tentative_v6(netns_name: &str) -> Result<Vec<String>> {
    let handle = netlink(netns_name)?;
    let mut dump = handle.address().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = dump
        .try_next()
        .await
        .with_context(|| format!("list addresses in {netns_name}"))?
    {
        if msg.header.family != AddressFamily::Inet6 {
            continue;
        }
        let flags = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                AddressAttribute::Flags(f) => Some(*f),
                _ => None,
            })
            .unwrap_or_else(|| AddressFlags::from_bits_retain(msg.header.flags.bits().into()));
        if flags.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed) {
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            out.push(format!(
                "{} dev {}",
                addr.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
                msg.header.index
            ));
        }
    }
    Ok(out)
}

/// Waits until no v6 address in the named netns is tentative. The lab turns DAD off
/// ([`node_sysctls`], [`pod_sysctls`]), so this normally returns at once; it makes a missed
/// sysctl a clear error instead of a test that races a tentative address.
pub async fn wait_v6_settled(netns_name: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = tentative_v6(netns_name).await?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "IPv6 addresses in {netns_name} still tentative after {timeout:?}: {}",
                left.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
        assert_eq!(NODES[1].pod_cidr6(), "fd00:10:244:2::/64");
        assert_eq!(NODES[1].gateway6.to_string(), "fd00:10:244:2::1");
    }

    #[test]
    fn sysctls_by_family() {
        let get = |v: &[(&str, String)], k: &str| {
            v.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, val)| val.clone())
        };
        // ipv4: as before, nothing about v6 on nodes, v6 off in pods.
        let node4 = node_sysctls(1, IpFamily::Ipv4);
        assert!(node4.iter().all(|(k, _)| !k.starts_with("net.ipv6")));
        assert_eq!(pod_sysctls(1), pod_sysctls_for(1, IpFamily::Ipv4));
        assert_eq!(
            get(&pod_sysctls(1), "net.ipv6.conf.all.disable_ipv6").as_deref(),
            Some("1")
        );
        for family in [IpFamily::Ipv6, IpFamily::Dual] {
            let node = node_sysctls(2, family);
            assert_eq!(
                get(&node, "net.ipv6.conf.all.forwarding").as_deref(),
                Some("1")
            );
            assert_eq!(
                get(&node, "net.ipv6.conf.default.accept_dad").as_deref(),
                Some("0")
            );
            let pod = pod_sysctls_for(2, family);
            assert_eq!(
                get(&pod, "net.ipv6.conf.all.disable_ipv6").as_deref(),
                Some("0")
            );
            assert_eq!(
                get(&pod, "net.ipv6.conf.default.accept_dad").as_deref(),
                Some("0")
            );
            assert_eq!(
                get(&pod, "net.ipv4.conf.all.rp_filter").as_deref(),
                Some("2")
            );
        }
    }
}
