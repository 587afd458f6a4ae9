//! The desired kernel state of a node and of the ztunnel netns, derived from a few inputs, and
//! the diff between desired and observed links, rules and routes. Pure: no I/O here, so the
//! SPEC's tables read straight off the unit tests.
//!
//! IPv6 mirrors IPv4: the same rule priorities, marks and table numbers in the kernel's IPv6
//! policy routing, the tunnels' /126 twins of their /30s, wherever the ztunnel (or a pod) has
//! an IPv6 address. The tunnels' underlay is one family: the ztunnel's IPv4 address when it
//! has one (dual-stack), else its IPv6 one; either carries both inner families.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::consts::{self, mark, rule, table, zt_mark, zt_rule, TunnelEnd};
use crate::sysctl::Sysctl;

/// Which encapsulation the tunnels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelKind {
    Geneve,
    Vxlan,
}

/// The operator's choice: `auto` uses Geneve and falls back to VXLAN (same VNIs and port)
/// only when the kernel refuses Geneve with EOPNOTSUPP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelMode {
    Auto,
    Geneve,
    Vxlan,
}

impl std::str::FromStr for TunnelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "geneve" => Ok(Self::Geneve),
            "vxlan" => Ok(Self::Vxlan),
            _ => Err(format!("tunnel must be auto, geneve or vxlan, not {s:?}")),
        }
    }
}

/// What the node agent decided for the tunnels; ztunnel-init reads it to match the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelChoice {
    pub kind: TunnelKind,
    pub port: u16,
}

/// One tunnel device as it must exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    pub end: TunnelEnd,
    pub kind: TunnelKind,
    pub port: u16,
    /// The underlay address of the other end (IPv4 or IPv6).
    pub remote: IpAddr,
    pub mtu: u32,
    /// Whether the device also carries IPv6: it gets its end's /126 address.
    pub v6: bool,
}

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleAction {
    Lookup(u32),
    Goto(u32),
}

/// A policy-routing rule: `[-6] priority [fwmark mark/mask] lookup|goto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleSpec {
    pub priority: u32,
    pub fwmark: Option<(u32, u32)>,
    pub action: RuleAction,
    /// An IPv6 rule (`ip -6 rule`).
    pub v6: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    Unicast,
    Local,
}

/// The identity of a route within the tables we own: a table holds one route per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub table: u32,
    /// The family of the route is the family of `dst`.
    pub dst: IpAddr,
    pub prefix_len: u8,
    pub kind: RouteKind,
}

/// What the route says, by device name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteValue {
    pub dev: String,
    pub gateway: Option<IpAddr>,
    pub src: Option<IpAddr>,
    /// `scope link` (device routes) rather than universe (routes via a gateway). IPv6 routes
    /// have no scope (the kernel reports universe for all): always false for them.
    pub scope_link: bool,
    pub onlink: bool,
}

pub type Routes = BTreeMap<RouteKey, RouteValue>;

/// Links, rules, routes and sysctls of one namespace. The rules are exactly those with a
/// priority in `owned_priorities`; the routes exactly those in `owned_tables`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDesired {
    pub tunnels: Vec<TunnelSpec>,
    pub rules: BTreeSet<RuleSpec>,
    pub routes: Routes,
    pub sysctls: Vec<Sysctl>,
}

/// The ztunnel pod as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZtunnelEndpoint {
    /// Its address, and the tunnels' remote: IPv4 when it has one, else IPv6.
    pub ip: IpAddr,
    /// Its IPv6 address when [`Self::ip`] is the IPv4 one (dual-stack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// The ztunnel pod's netns path.
    pub netns: String,
    /// The node-side veth of the ztunnel pod.
    pub host_veth: String,
    /// The bridge that veth is a port of, with a bridge-type primary CNI: routes to the
    /// ztunnel then go via the bridge.
    #[serde(default)]
    pub bridge: Option<String>,
    /// The ztunnel pod interface's MAC (matched on the bridge).
    #[serde(default)]
    pub mac: String,
    /// The MAC of [`Self::bridge`]: frames between pods of the bridge that must be captured
    /// are readdressed to it, so they are routed rather than switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_mac: Option<String>,
    /// Its MTU: the tunnels' underlay.
    pub veth_mtu: u32,
    /// The node address on the ztunnel's side (its gateway), of the family of [`Self::ip`].
    pub node_ip: IpAddr,
    /// The node's IPv6 address on the ztunnel's side, with [`Self::ip6`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ip6: Option<Ipv6Addr>,
}

/// At most one address of each family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DualAddr {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl DualAddr {
    /// `primary` and a second IPv6 address (ignored when `primary` is IPv6).
    pub fn new(primary: IpAddr, second: Option<Ipv6Addr>) -> DualAddr {
        match primary {
            IpAddr::V4(a) => DualAddr {
                v4: Some(a),
                v6: second,
            },
            IpAddr::V6(a) => DualAddr {
                v4: None,
                v6: Some(a),
            },
        }
    }

    /// The first address of each family among `ips`.
    pub fn first_of(ips: impl IntoIterator<Item = IpAddr>) -> DualAddr {
        let mut d = DualAddr::default();
        for ip in ips {
            match ip {
                IpAddr::V4(a) if d.v4.is_none() => d.v4 = Some(a),
                IpAddr::V6(a) if d.v6.is_none() => d.v6 = Some(a),
                _ => {}
            }
        }
        d
    }

    /// The one a single-family choice (the tunnels' underlay) takes: IPv4 first.
    pub fn primary(&self) -> Option<IpAddr> {
        self.v4.map(IpAddr::V4).or_else(|| self.v6.map(IpAddr::V6))
    }

    /// The address of the family `v6` says.
    pub fn get(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.v6.map(IpAddr::V6)
        } else {
            self.v4.map(IpAddr::V4)
        }
    }
}

impl ZtunnelEndpoint {
    /// The ztunnel's addresses.
    pub fn ips(&self) -> DualAddr {
        DualAddr::new(self.ip, self.ip6)
    }

    /// The node's addresses toward the ztunnel.
    pub fn node_ips(&self) -> DualAddr {
        DualAddr::new(self.node_ip, self.node_ip6)
    }

    /// The node device that reaches the ztunnel: its veth, or the bridge it is a port of.
    pub fn route_dev(&self) -> &str {
        self.bridge.as_deref().unwrap_or(&self.host_veth)
    }
}

/// One captured pod address and the node's address toward it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRoute {
    pub ip: IpAddr,
    /// The node's gateway address toward this pod, of the same family (`src` of its
    /// table-100 route).
    pub gateway: IpAddr,
}

/// One enrolled pod address and the node devices its packets may come from (anti-spoofing):
/// a packet claiming this address is only captured when it arrives where the pod is attached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodSource {
    pub ip: IpAddr,
    /// The pod's host-side veth (found from inside the pod's netns); with a bridge-type
    /// primary, a port of [`Self::bridge`].
    pub veth: String,
    /// The bridge that veth is a port of, if any.
    pub bridge: Option<String>,
}

impl PodSource {
    /// The input device the pod's packets have in the node's IP layer (`iifname` in the inet
    /// table): the veth, or the bridge when the veth is a bridge port (the bridge table then
    /// checks the port).
    pub fn routed_dev(&self) -> &str {
        self.bridge.as_deref().unwrap_or(&self.veth)
    }
}

/// Tunnel MTU: the underlay's minus the encapsulation.
pub fn tunnel_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(consts::TUNNEL_OVERHEAD)
}

fn tunnel(end: TunnelEnd, choice: TunnelChoice, remote: IpAddr, mtu: u32, v6: bool) -> TunnelSpec {
    TunnelSpec {
        end,
        kind: choice.kind,
        port: choice.port,
        remote,
        mtu,
        v6,
    }
}

/// A device route to `dst` (IPv6 routes have no scope).
fn device_route(dev: &str, dst: IpAddr) -> RouteValue {
    RouteValue {
        dev: dev.into(),
        gateway: None,
        src: None,
        scope_link: dst.is_ipv4(),
        onlink: false,
    }
}

fn via(dev: &str, gateway: IpAddr, src: Option<IpAddr>, onlink: bool) -> RouteValue {
    RouteValue {
        dev: dev.into(),
        gateway: Some(gateway),
        src,
        scope_link: false,
        onlink,
    }
}

fn host_key(table: u32, dst: IpAddr) -> RouteKey {
    RouteKey {
        table,
        dst,
        prefix_len: if dst.is_ipv4() { 32 } else { 128 },
        kind: RouteKind::Unicast,
    }
}

fn unspecified(v6: bool) -> IpAddr {
    if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    }
}

fn default_key(table: u32, kind: RouteKind, v6: bool) -> RouteKey {
    RouteKey {
        table,
        dst: unspecified(v6),
        prefix_len: 0,
        kind,
    }
}

/// The tunnel end's inner address of `v6`'s family.
pub fn tunnel_addr(end: &TunnelEnd, v6: bool) -> IpAddr {
    if v6 {
        end.addr6.into()
    } else {
        end.addr.into()
    }
}

/// The inner address of the tunnel end's peer, of `v6`'s family.
pub fn tunnel_peer(end: &TunnelEnd, v6: bool) -> IpAddr {
    if v6 {
        end.peer6.into()
    } else {
        end.peer.into()
    }
}

/// A pod's table-100 route: `<pod ip> via 192.168.126.2 dev istioin src <node gw ip>` (IPv6:
/// via `istioin`'s /126 peer). `src` makes host sockets pick the gateway address, which the
/// output chain exempts.
pub fn pod_inbound_route(p: &PodRoute) -> (RouteKey, RouteValue) {
    (
        host_key(table::INBOUND, p.ip),
        via(
            consts::ISTIOIN.name,
            tunnel_peer(&consts::ISTIOIN, p.ip.is_ipv6()),
            Some(p.gateway),
            false,
        ),
    )
}

/// The same rules in each family of `families` (false: IPv4, true: IPv6).
fn in_families(rules: &[RuleSpec], families: &[bool]) -> BTreeSet<RuleSpec> {
    families
        .iter()
        .flat_map(|v6| rules.iter().map(move |r| RuleSpec { v6: *v6, ..*r }))
        .collect()
}

/// The families present in `a`: `[false]`, `[true]` or `[false, true]`.
fn families(a: &DualAddr) -> Vec<bool> {
    let mut f = Vec::new();
    if a.v4.is_some() {
        f.push(false);
    }
    if a.v6.is_some() {
        f.push(true);
    }
    f
}

/// The node's desired links, rules, routes and sysctls (SPEC §1–2). Without a ztunnel nothing
/// is captured: no tunnels, rules or routes, only the sysctls that are safe anyway.
///
/// With IPv6 (the ztunnel has an IPv6 address): IPv6 forwarding, the same rules and tables in
/// IPv6, and `accept_ra = 2` on each of `ra_devs` (devices that take router advertisements
/// now: with forwarding on the kernel ignores them unless accept_ra is 2). IPv6 has no
/// rp_filter to relax; what stops a pod sending with another's source address is the
/// anti-spoofing set, for both families alike.
pub fn node_desired(
    ztunnel: Option<&ZtunnelEndpoint>,
    choice: TunnelChoice,
    pods: &BTreeSet<PodRoute>,
    pod_host_devs: &BTreeSet<String>,
    ra_devs: &BTreeSet<String>,
) -> NetDesired {
    let mut d = NetDesired {
        tunnels: Vec::new(),
        rules: BTreeSet::new(),
        routes: Routes::new(),
        sysctls: vec![Sysctl::new("net.ipv4.ip_forward", "1")],
    };
    let Some(zt) = ztunnel else {
        return d;
    };
    let mtu = tunnel_mtu(zt.veth_mtu);
    let ips = zt.ips();
    let fams = families(&ips);
    let v6 = ips.v6.is_some();
    d.tunnels = vec![
        tunnel(consts::ISTIOIN, choice, zt.ip, mtu, v6),
        tunnel(consts::ISTIOOUT, choice, zt.ip, mtu, v6),
    ];
    let rules = [
        RuleSpec {
            priority: rule::SKIP,
            fwmark: Some((mark::SKIP, mark::SKIP)),
            action: RuleAction::Goto(rule::MAIN),
            v6: false,
        },
        RuleSpec {
            priority: rule::CAPTURE,
            fwmark: Some((mark::CAPTURE, mark::CAPTURE)),
            action: RuleAction::Lookup(table::OUTBOUND),
            v6: false,
        },
        RuleSpec {
            priority: rule::RETURN,
            fwmark: Some((mark::RETURN, mark::RETURN)),
            action: RuleAction::Lookup(table::RETURN),
            v6: false,
        },
        RuleSpec {
            priority: rule::INBOUND,
            fwmark: None,
            action: RuleAction::Lookup(table::INBOUND),
            v6: false,
        },
    ];
    d.rules = in_families(&rules, &fams);
    // Each table first routes the ztunnel IP over its veth: the encapsulated packet inherits
    // the capture mark, and without this the tunnel would route into itself.
    let zt_dev = zt.route_dev();
    for fam in &fams {
        let Some(zt_ip) = ips.get(*fam) else { continue };
        for t in table::ALL {
            d.routes
                .insert(host_key(t, zt_ip), device_route(zt_dev, zt_ip));
        }
        d.routes.insert(
            default_key(table::OUTBOUND, RouteKind::Unicast, *fam),
            via(
                consts::ISTIOOUT.name,
                tunnel_peer(&consts::ISTIOOUT, *fam),
                None,
                false,
            ),
        );
        d.routes.insert(
            default_key(table::RETURN, RouteKind::Unicast, *fam),
            via(zt_dev, zt_ip, None, true),
        );
    }
    // A pod address of a family the ztunnel does not have cannot be captured: no route.
    d.routes.extend(
        pods.iter()
            .filter(|p| fams.contains(&p.ip.is_ipv6()) && p.gateway.is_ipv6() == p.ip.is_ipv6())
            .map(pod_inbound_route),
    );
    if v6 {
        d.sysctls
            .push(Sysctl::new("net.ipv6.conf.all.forwarding", "1"));
        for dev in ra_devs {
            d.sysctls.push(Sysctl::conf6(dev, "accept_ra", "2"));
        }
    }
    // Effective rp_filter is max(all, dev): `all` must be 0 for the per-device 0s to count.
    d.sysctls.push(Sysctl::conf("all", "rp_filter", "0"));
    let mut zt_devs = vec![
        zt.host_veth.as_str(),
        consts::ISTIOIN.name,
        consts::ISTIOOUT.name,
    ];
    zt_devs.extend(zt.bridge.as_deref());
    for dev in zt_devs {
        d.sysctls.push(Sysctl::conf(dev, "rp_filter", "0"));
        d.sysctls.push(Sysctl::conf(dev, "accept_local", "1"));
    }
    // Behind a bridge, packets between two of its pods are routed (same-bridge capture) and a
    // captured flow's rest goes back out over the bridge to ztunnel: the node must not send
    // ICMP redirects telling pods to go direct. The kernel ORs `all` with the device.
    if let Some(b) = zt.bridge.as_deref() {
        d.sysctls.push(Sysctl::conf("all", "send_redirects", "0"));
        d.sysctls.push(Sysctl::conf(b, "send_redirects", "0"));
    }
    for dev in pod_host_devs {
        d.sysctls.push(Sysctl::conf(dev, "rp_filter", "0"));
    }
    d
}

/// The ztunnel netns' desired links, rules, routes and sysctls (SPEC §1, §3). `node` holds
/// the node's addresses toward this pod (its gateways): the tunnels' remote is the IPv4 one
/// when there is one; with an IPv6 one, rules, `local ::/0 dev lo` and tables 101/102 exist
/// in IPv6 too.
pub fn ztunnel_desired(
    choice: TunnelChoice,
    node: DualAddr,
    pod_iface: &str,
    pod_iface_mtu: u32,
) -> NetDesired {
    let mtu = tunnel_mtu(pod_iface_mtu);
    let fams = families(&node);
    let v6 = node.v6.is_some();
    let remote = node.primary().unwrap_or(Ipv4Addr::UNSPECIFIED.into());
    let mut d = NetDesired {
        tunnels: vec![
            tunnel(consts::PISTIOIN, choice, remote, mtu, v6),
            tunnel(consts::PISTIOOUT, choice, remote, mtu, v6),
        ],
        rules: in_families(
            &[
                RuleSpec {
                    priority: zt_rule::TPROXY,
                    fwmark: Some((zt_mark::TPROXY, zt_mark::MASK)),
                    action: RuleAction::Lookup(zt_rule::TABLE_LOCAL),
                    v6: false,
                },
                RuleSpec {
                    priority: zt_rule::SPOOF_REPLY,
                    fwmark: Some((zt_mark::SPOOF_REPLY, zt_mark::MASK)),
                    action: RuleAction::Lookup(zt_rule::TABLE_LOCAL),
                    v6: false,
                },
            ],
            &fams,
        ),
        routes: Routes::new(),
        sysctls: Vec::new(),
    };
    for fam in &fams {
        let Some(node_ip) = node.get(*fam) else {
            continue;
        };
        d.routes.insert(
            default_key(zt_rule::TABLE_LOCAL, RouteKind::Local, *fam),
            RouteValue {
                dev: "lo".into(),
                gateway: None,
                src: None,
                scope_link: false,
                onlink: false,
            },
        );
        for (t, end) in [
            (zt_rule::TABLE_OUTBOUND, consts::PISTIOOUT),
            (zt_rule::TABLE_INBOUND, consts::PISTIOIN),
        ] {
            d.routes
                .insert(host_key(t, node_ip), device_route(pod_iface, node_ip));
            d.routes.insert(
                default_key(t, RouteKind::Unicast, *fam),
                via(end.name, tunnel_peer(&end, *fam), None, false),
            );
        }
    }
    for dev in [
        "all",
        "default",
        pod_iface,
        consts::PISTIOIN.name,
        consts::PISTIOOUT.name,
    ] {
        d.sysctls.push(Sysctl::conf(dev, "rp_filter", "0"));
    }
    d
}

/// The changes that take observed rules to desired ones: add first, then delete.
pub fn diff_rules(
    desired: &BTreeSet<RuleSpec>,
    observed: &[RuleSpec],
) -> (Vec<RuleSpec>, Vec<RuleSpec>) {
    let have: BTreeSet<_> = observed.iter().copied().collect();
    let add = desired.difference(&have).copied().collect();
    // Duplicates of a desired rule are extra too: delete all but one.
    let mut seen = BTreeSet::new();
    let del = observed
        .iter()
        .filter(|r| !desired.contains(r) || !seen.insert(**r))
        .copied()
        .collect();
    (add, del)
}

/// The changes that take observed routes to desired ones: routes to (re)place (replace is
/// atomic per key) and keys to delete.
pub fn diff_routes(desired: &Routes, observed: &Routes) -> (Routes, Vec<RouteKey>) {
    let put = desired
        .iter()
        .filter(|(k, v)| observed.get(k) != Some(v))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let del = observed
        .keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect();
    (put, del)
}

/// What must happen to an existing tunnel device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelAction {
    Keep,
    /// Only the MTU differs: change it in place.
    SetMtu,
    /// The remote (a new ztunnel pod IP) differs, maybe the MTU too: both change in place,
    /// so the routes through the device stay (re-creating it drops every route via it, a
    /// table-100 route per pod, and waits for the kernel to release the old device).
    SetRemote,
    /// Kind, VNI or port differ: these cannot be changed on a live device.
    Recreate,
}

/// The observed attributes of a tunnel device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelObserved {
    pub kind: Option<TunnelKind>,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub remote: Option<IpAddr>,
    pub mtu: Option<u32>,
}

pub fn tunnel_action(want: &TunnelSpec, have: &TunnelObserved) -> TunnelAction {
    if have.kind != Some(want.kind)
        || have.vni != Some(want.end.vni)
        || have.port != Some(want.port)
    {
        TunnelAction::Recreate
    } else if have.remote != Some(want.remote) {
        TunnelAction::SetRemote
    } else if have.mtu != Some(want.mtu) {
        TunnelAction::SetMtu
    } else {
        TunnelAction::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
    const VX: TunnelChoice = TunnelChoice {
        kind: TunnelKind::Vxlan,
        port: 6081,
    };

    fn zt() -> ZtunnelEndpoint {
        ZtunnelEndpoint {
            ip: ZT_IP.into(),
            ip6: None,
            netns: "/run/netns/zt".into(),
            host_veth: "vethzt".into(),
            bridge: None,
            mac: String::new(),
            bridge_mac: None,
            veth_mtu: 1500,
            node_ip: GW.into(),
            node_ip6: None,
        }
    }

    fn pods() -> BTreeSet<PodRoute> {
        [PodRoute {
            ip: Ipv4Addr::new(10, 244, 1, 5).into(),
            gateway: GW.into(),
        }]
        .into()
    }

    const ZT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
    const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 1);
    const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5);

    fn dual() -> ZtunnelEndpoint {
        ZtunnelEndpoint {
            ip6: Some(ZT_IP6),
            node_ip6: Some(GW6),
            ..zt()
        }
    }

    fn dual_pods() -> BTreeSet<PodRoute> {
        let mut p = pods();
        p.insert(PodRoute {
            ip: POD6.into(),
            gateway: GW6.into(),
        });
        p
    }

    fn none() -> BTreeSet<String> {
        BTreeSet::new()
    }

    #[test]
    fn node_rules_are_100_to_103_as_in_the_spec() {
        let d = node_desired(Some(&zt()), VX, &pods(), &none(), &none());
        let rules: Vec<_> = d.rules.iter().copied().collect();
        assert_eq!(
            rules,
            vec![
                RuleSpec {
                    priority: 100,
                    fwmark: Some((0x200, 0x200)),
                    action: RuleAction::Goto(32766),
                    v6: false,
                },
                RuleSpec {
                    priority: 101,
                    fwmark: Some((0x100, 0x100)),
                    action: RuleAction::Lookup(101),
                    v6: false,
                },
                RuleSpec {
                    priority: 102,
                    fwmark: Some((0x40, 0x40)),
                    action: RuleAction::Lookup(102),
                    v6: false,
                },
                RuleSpec {
                    priority: 103,
                    fwmark: None,
                    action: RuleAction::Lookup(100),
                    v6: false,
                },
            ]
        );
    }

    #[test]
    fn node_tables_100_101_102_as_in_the_spec() {
        let d = node_desired(Some(&zt()), VX, &pods(), &none(), &none());
        let get = |t, dst: [u8; 4], len| {
            d.routes.get(&RouteKey {
                table: t,
                dst: Ipv4Addr::from(dst).into(),
                prefix_len: len,
                kind: RouteKind::Unicast,
            })
        };
        for t in [100, 101, 102] {
            assert_eq!(
                get(t, [10, 244, 1, 2], 32),
                Some(&device_route("vethzt", ZT_IP.into()))
            );
        }
        assert_eq!(
            get(101, [0, 0, 0, 0], 0),
            Some(&via(
                "istioout",
                Ipv4Addr::new(192, 168, 127, 2).into(),
                None,
                false
            ))
        );
        assert_eq!(
            get(102, [0, 0, 0, 0], 0),
            Some(&via("vethzt", ZT_IP.into(), None, true))
        );
        assert_eq!(
            get(100, [10, 244, 1, 5], 32),
            Some(&via(
                "istioin",
                Ipv4Addr::new(192, 168, 126, 2).into(),
                Some(GW.into()),
                false
            ))
        );
        assert_eq!(d.routes.len(), 6);
    }

    #[test]
    fn node_tunnels_point_at_ztunnel_with_mtu_minus_50() {
        let d = node_desired(Some(&zt()), VX, &pods(), &none(), &none());
        assert_eq!(d.tunnels.len(), 2);
        assert_eq!(
            (d.tunnels[0].end.name, d.tunnels[0].end.vni),
            ("istioin", 1000)
        );
        assert_eq!(
            (d.tunnels[1].end.name, d.tunnels[1].end.vni),
            ("istioout", 1001)
        );
        assert!(d
            .tunnels
            .iter()
            .all(|t| t.remote == IpAddr::V4(ZT_IP) && t.mtu == 1450 && t.port == 6081 && !t.v6));
    }

    #[test]
    fn behind_a_bridge_the_routes_use_the_bridge() {
        let z = ZtunnelEndpoint {
            bridge: Some("cni0".into()),
            ..zt()
        };
        let d = node_desired(Some(&z), VX, &pods(), &none(), &none());
        assert_eq!(
            d.routes.get(&host_key(101, ZT_IP.into())),
            Some(&device_route("cni0", ZT_IP.into()))
        );
        assert_eq!(
            d.routes.get(&default_key(102, RouteKind::Unicast, false)),
            Some(&via("cni0", ZT_IP.into(), None, true))
        );
        assert!(d.sysctls.contains(&Sysctl::conf("cni0", "rp_filter", "0")));
        assert!(d
            .sysctls
            .contains(&Sysctl::conf("cni0", "send_redirects", "0")));
        assert!(d
            .sysctls
            .contains(&Sysctl::conf("all", "send_redirects", "0")));
        let ptp = node_desired(Some(&zt()), VX, &pods(), &none(), &none());
        assert!(!ptp
            .sysctls
            .iter()
            .any(|s| s.key.ends_with("send_redirects")));
    }

    #[test]
    fn a_pod_behind_a_bridge_is_routed_from_the_bridge() {
        let ptp = PodSource {
            ip: Ipv4Addr::new(10, 244, 1, 5).into(),
            veth: "veth1".into(),
            bridge: None,
        };
        assert_eq!(ptp.routed_dev(), "veth1");
        let bridged = PodSource {
            bridge: Some("cni0".into()),
            ..ptp
        };
        assert_eq!(bridged.routed_dev(), "cni0");
    }

    #[test]
    fn without_ztunnel_nothing_is_captured() {
        let d = node_desired(None, VX, &pods(), &none(), &none());
        assert!(d.tunnels.is_empty() && d.rules.is_empty() && d.routes.is_empty());
    }

    #[test]
    fn node_sysctls_relax_rp_filter_where_spoofed_sources_arrive() {
        let devs = ["vethpod1".to_string()].into();
        let d = node_desired(Some(&zt()), VX, &pods(), &devs, &none());
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.vethzt.rp_filter=0",
            "net.ipv4.conf.vethzt.accept_local=1",
            "net.ipv4.conf.istioin.rp_filter=0",
            "net.ipv4.conf.istioout.accept_local=1",
            "net.ipv4.conf.vethpod1.rp_filter=0",
        ] {
            let (k, v) = key.split_once('=').unwrap();
            assert!(d.sysctls.contains(&Sysctl::new(k, v)), "missing {key}");
        }
    }

    #[test]
    fn ztunnel_netns_rules_and_tables_as_in_the_spec() {
        let d = ztunnel_desired(VX, DualAddr::new(GW.into(), None), "eth0", 1500);
        let prios: Vec<_> = d.rules.iter().map(|r| (r.priority, r.fwmark)).collect();
        assert_eq!(
            prios,
            vec![(20000, Some((0x400, 0xfff))), (20003, Some((0x4d3, 0xfff)))]
        );
        assert!(d.rules.iter().all(|r| r.action == RuleAction::Lookup(100)));
        let local = d
            .routes
            .get(&default_key(100, RouteKind::Local, false))
            .unwrap();
        assert_eq!(local.dev, "lo");
        assert_eq!(
            d.routes
                .get(&default_key(101, RouteKind::Unicast, false))
                .unwrap(),
            &via(
                "pistioout",
                Ipv4Addr::new(192, 168, 127, 1).into(),
                None,
                false
            )
        );
        assert_eq!(
            d.routes
                .get(&default_key(102, RouteKind::Unicast, false))
                .unwrap(),
            &via(
                "pistioin",
                Ipv4Addr::new(192, 168, 126, 1).into(),
                None,
                false
            )
        );
        assert_eq!(
            d.routes.get(&host_key(101, GW.into())).unwrap(),
            &device_route("eth0", GW.into())
        );
        assert!(d.tunnels.iter().all(|t| t.remote == IpAddr::V4(GW)));
    }

    #[test]
    fn rule_diff_adds_missing_and_deletes_extra_and_duplicates() {
        let d = node_desired(Some(&zt()), VX, &pods(), &none(), &none());
        let mut observed: Vec<_> = d.rules.iter().copied().collect();
        let r101 = observed.remove(1);
        observed.push(observed[0]);
        let stray = RuleSpec {
            priority: 102,
            fwmark: Some((0x40, 0x40)),
            action: RuleAction::Lookup(7),
            v6: false,
        };
        observed.push(stray);
        let (add, del) = diff_rules(&d.rules, &observed);
        assert_eq!(add, vec![r101]);
        assert_eq!(del, vec![observed[0], stray]);
    }

    #[test]
    fn route_diff_replaces_changed_and_deletes_stale() {
        let d = node_desired(Some(&zt()), VX, &pods(), &none(), &none());
        let mut observed = d.routes.clone();
        assert_eq!(diff_routes(&d.routes, &observed), (Routes::new(), vec![]));
        let stale = host_key(100, Ipv4Addr::new(10, 244, 1, 9).into());
        observed.insert(stale, device_route("x", stale.dst));
        let moved = host_key(101, ZT_IP.into());
        observed.insert(moved, device_route("old", moved.dst));
        let (put, del) = diff_routes(&d.routes, &observed);
        assert_eq!(put.keys().copied().collect::<Vec<_>>(), vec![moved]);
        assert_eq!(del, vec![stale]);
    }

    #[test]
    fn tunnel_changes_that_need_a_new_device() {
        let want = node_desired(Some(&zt()), VX, &pods(), &none(), &none()).tunnels[0].clone();
        let have = TunnelObserved {
            kind: Some(TunnelKind::Vxlan),
            vni: Some(1000),
            port: Some(6081),
            remote: Some(ZT_IP.into()),
            mtu: Some(1450),
        };
        assert_eq!(tunnel_action(&want, &have), TunnelAction::Keep);
        let mtu = TunnelObserved {
            mtu: Some(1400),
            ..have.clone()
        };
        assert_eq!(tunnel_action(&want, &mtu), TunnelAction::SetMtu);
        let moved = TunnelObserved {
            remote: Some(GW.into()),
            ..have.clone()
        };
        assert_eq!(tunnel_action(&want, &moved), TunnelAction::SetRemote);
        let other_port = TunnelObserved {
            port: Some(6082),
            ..have.clone()
        };
        assert_eq!(tunnel_action(&want, &other_port), TunnelAction::Recreate);
        let geneve = TunnelObserved {
            kind: Some(TunnelKind::Geneve),
            ..have
        };
        assert_eq!(tunnel_action(&want, &geneve), TunnelAction::Recreate);
    }

    #[test]
    fn dual_stack_mirrors_rules_and_tables_in_ipv6() {
        let d = node_desired(Some(&dual()), VX, &dual_pods(), &none(), &none());
        let v6: Vec<_> = d
            .rules
            .iter()
            .filter(|r| r.v6)
            .map(|r| r.priority)
            .collect();
        assert_eq!(v6, vec![100, 101, 102, 103]);
        assert_eq!(d.rules.len(), 8);
        let v6_rules: Vec<_> = d.rules.iter().filter(|r| r.v6).copied().collect();
        let v4_rules: Vec<_> = d.rules.iter().filter(|r| !r.v6).copied().collect();
        for (a, b) in v4_rules.iter().zip(&v6_rules) {
            assert_eq!(
                (a.priority, a.fwmark, a.action),
                (b.priority, b.fwmark, b.action)
            );
        }
        let zt6: IpAddr = ZT_IP6.into();
        for t in [100, 101, 102] {
            assert_eq!(
                d.routes.get(&host_key(t, zt6)),
                Some(&device_route("vethzt", zt6))
            );
        }
        let istioout6: IpAddr = "fd69:7374:696f:127::2".parse().unwrap();
        assert_eq!(
            d.routes.get(&default_key(101, RouteKind::Unicast, true)),
            Some(&via("istioout", istioout6, None, false))
        );
        assert_eq!(
            d.routes.get(&default_key(102, RouteKind::Unicast, true)),
            Some(&via("vethzt", zt6, None, true))
        );
        let istioin6: IpAddr = "fd69:7374:696f:126::2".parse().unwrap();
        assert_eq!(
            d.routes.get(&host_key(100, POD6.into())),
            Some(&via("istioin", istioin6, Some(GW6.into()), false))
        );
        assert_eq!(d.routes.len(), 12);
        // IPv6 routes carry no scope; the tunnels get their /126 too.
        assert!(d
            .routes
            .iter()
            .filter(|(k, _)| k.dst.is_ipv6())
            .all(|(_, v)| !v.scope_link));
        assert!(d
            .tunnels
            .iter()
            .all(|t| t.v6 && t.remote == IpAddr::V4(ZT_IP)));
        assert!(d
            .sysctls
            .contains(&Sysctl::new("net.ipv6.conf.all.forwarding", "1")));
    }

    #[test]
    fn forwarding_keeps_router_advertisements_where_they_were_taken() {
        let ra = ["eth0".to_string()].into();
        let d = node_desired(Some(&dual()), VX, &dual_pods(), &none(), &ra);
        assert!(d
            .sysctls
            .contains(&Sysctl::new("net.ipv6.conf.eth0.accept_ra", "2")));
        let v4_only = node_desired(Some(&zt()), VX, &dual_pods(), &none(), &ra);
        assert!(!v4_only
            .sysctls
            .iter()
            .any(|s| s.key.starts_with("net.ipv6")));
        // A v6 pod address without a v6 ztunnel is not routed into istioin.
        assert!(!v4_only.routes.keys().any(|k| k.dst.is_ipv6()));
        assert!(v4_only.rules.iter().all(|r| !r.v6));
    }

    #[test]
    fn an_ipv6_only_ztunnel_is_the_underlay() {
        let z = ZtunnelEndpoint {
            ip: ZT_IP6.into(),
            node_ip: GW6.into(),
            ..zt()
        };
        let d = node_desired(Some(&z), VX, &dual_pods(), &none(), &none());
        assert!(d.rules.iter().all(|r| r.v6) && d.rules.len() == 4);
        assert!(d
            .tunnels
            .iter()
            .all(|t| t.remote == IpAddr::V6(ZT_IP6) && t.v6));
        assert!(!d.routes.keys().any(|k| k.dst.is_ipv4()));
        assert_eq!(
            d.routes.get(&host_key(100, POD6.into())).map(|v| v.src),
            Some(Some(GW6.into()))
        );
    }

    #[test]
    fn ztunnel_netns_in_ipv6_has_rules_20000_20003_and_local_default() {
        let node = DualAddr::new(GW.into(), Some(GW6));
        let d = ztunnel_desired(VX, node, "eth0", 1500);
        let v6: Vec<_> = d
            .rules
            .iter()
            .filter(|r| r.v6)
            .map(|r| (r.priority, r.fwmark, r.action))
            .collect();
        assert_eq!(
            v6,
            vec![
                (20000, Some((0x400, 0xfff)), RuleAction::Lookup(100)),
                (20003, Some((0x4d3, 0xfff)), RuleAction::Lookup(100))
            ]
        );
        let local = d
            .routes
            .get(&default_key(100, RouteKind::Local, true))
            .unwrap();
        assert_eq!(local.dev, "lo");
        let pistioout_peer: IpAddr = "fd69:7374:696f:127::1".parse().unwrap();
        assert_eq!(
            d.routes.get(&default_key(101, RouteKind::Unicast, true)),
            Some(&via("pistioout", pistioout_peer, None, false))
        );
        assert_eq!(
            d.routes.get(&host_key(102, GW6.into())),
            Some(&device_route("eth0", GW6.into()))
        );
        // The underlay stays IPv4 in dual-stack.
        assert!(d.tunnels.iter().all(|t| t.remote == IpAddr::V4(GW) && t.v6));
    }

    #[test]
    fn saved_state_of_an_ipv4_agent_still_loads() {
        let old = r#"{"ip":"10.244.1.2","netns":"/run/netns/zt","hostVeth":"vethzt",
            "vethMtu":1500,"nodeIp":"10.244.1.1"}"#;
        let z: ZtunnelEndpoint = serde_json::from_str(old).unwrap();
        assert_eq!(z.ips(), DualAddr::new(ZT_IP.into(), None));
        assert_eq!(z.node_ips().v4, Some(GW));
    }
}
