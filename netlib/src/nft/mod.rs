//! nftables: render the SPEC's rules (§2 node, §3 ztunnel netns) with the `nftables` crate and
//! reconcile them in place, one atomic `nft -j -f -` transaction per change.
//!
//! * Never flush-and-rebuild a table (SPEC §6): a chain whose rules differ is flushed and
//!   refilled *in the same batch* (one kernel transaction, so no packet sees it empty); set
//!   elements are added/deleted one by one, the set is never flushed.
//! * The node has two tables named `ambient-node`: family inet (capture, anti-spoofing by
//!   input device) and family bridge (anti-spoofing by bridge port). Both are planned from one
//!   [`NodeNft`] and changed in one transaction; a plan puts new sets and their elements before
//!   the rules that use them.
//! * Whether a chain is current is read from its rule comments, which end in
//!   `[ambient <i>/<n> <fingerprint>]` (see [`RuleTag`], [`ChainSpec::fingerprint`]); nft's
//!   normalized JSON expressions are never compared.
//! * Everything runs `nft` from the calling thread, so inside [`crate::netns::run_in`] it
//!   works on that namespace.
//!
//! Facts checked against nft 1.0.6 (Debian 12) and kernel 6.18:
//! * nft 1.0.6 has no `destroy` command (added in 1.0.8). "Delete if present" is done
//!   atomically instead with `add X; delete X` in one batch (`add` is idempotent), for set
//!   elements and tables alike.
//! * A base chain's type/hook/priority cannot be changed by `add chain` (EOPNOTSUPP); a chain
//!   whose base differs is flushed, deleted and re-added in one batch.
//! * `tproxy` JSON `{"family": "ip", "addr": "127.0.0.1", "port": N}` is accepted in an ip table.
//! * Identity NAT `dnat ip to ip daddr` / `snat ip to ip saddr` is accepted in an inet table,
//!   and does skip a kube-proxy-style DNAT and masquerade (root test
//!   `captured_traffic_skips_kube_proxy_nat`, with a control run without it).

mod exec;
pub mod netlink;
mod observe;
mod render;
pub mod trace;

#[cfg(test)]
mod root_tests;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nftables::batch::Batch;
use nftables::expr::Expression;
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject, Set, SetType, SetTypeValue, Table,
};
use nftables::types::NfFamily;

pub use exec::{nft_program, NFT_ENV};
pub use nftables;
pub use nftables::schema::Nftables;
pub use observe::{
    ObservedChain, ObservedNode, ObservedRule, ObservedSet, ObservedTable, ObservedZtunnel,
};
pub use render::{
    bridge_chains, node_chains, rule_comment, ztunnel_chains, ztunnel_chains6, ChainSpec, RuleSpec,
    RuleTag,
};

use crate::consts::{
    NODE_NFT_TABLE, POD_IIF_SET, POD_IIF_SET_V6, POD_PORT_SET, POD_PORT_SET_V6, POD_SET,
    POD_SET_V6, ZTUNNEL_NFT_TABLE,
};
use crate::model::{DualAddr, PodSource};

/// Chain names (ours; the SPEC names only the hooks).
pub mod chain {
    pub const PREROUTING: &str = "prerouting";
    pub const FORWARD: &str = "forward";
    pub const INPUT: &str = "input";
    pub const OUTPUT: &str = "output";
    /// kube-proxy coexistence: identity DNAT for captured traffic.
    pub const NAT_PREROUTING: &str = "nat-prerouting";
    /// kube-proxy coexistence: identity SNAT for captured traffic.
    pub const NAT_POSTROUTING: &str = "nat-postrouting";
    /// The ztunnel netns's per-source SYN limit, before conntrack.
    pub const SYN_LIMIT: &str = "syn-limit";
}

/// nftables hook priorities (the kernel's named values).
pub mod prio {
    /// `raw`: before conntrack.
    pub const RAW: i32 = -300;
    /// `mangle`: after conntrack, before any NAT.
    pub const MANGLE: i32 = -150;
    /// `dstnat` (kube-proxy's NAT prerouting priority).
    pub const DSTNAT: i32 = -100;
    /// `srcnat` (kube-proxy's NAT postrouting priority).
    pub const SRCNAT: i32 = 100;
    /// Our NAT chains run this much before kube-proxy's.
    pub const NAT_BYPASS_OFFSET: i32 = -10;
    /// `filter` in the bridge family.
    pub const BRIDGE_FILTER: i32 = -200;
}

/// The node's capture rules (everything but the pod set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRules {
    /// The ztunnel pod's host-side veth.
    pub ztunnel_veth: String,
    /// The bridge that veth is a port of (bridge-type primary CNIs): routing then sees the
    /// bridge as the input device, so "from ztunnel" also matches on [`Self::ztunnel_mac`].
    pub ztunnel_bridge: Option<String>,
    /// The ztunnel pod interface's MAC, `aa:bb:cc:dd:ee:ff`; used only with a bridge.
    pub ztunnel_mac: String,
    /// The MAC of [`Self::ztunnel_bridge`] itself. When known, TCP frames on the bridge from or
    /// to an enrolled pod that the bridge would switch to another port are readdressed to it
    /// (`ether daddr set`, `meta pkttype set host`), so they go up to the IP layer and are
    /// captured like any other pod-to-pod connection ([`bridge_chains`]).
    pub bridge_mac: Option<String>,
    /// The ztunnel's address (IPv4 when it has one) ...
    pub ztunnel_ip: IpAddr,
    /// ... and its IPv6 one when `ztunnel_ip` is IPv4 (dual-stack).
    pub ztunnel_ip6: Option<Ipv6Addr>,
    /// The node's addresses toward pods (`src` of table-100 routes), both families; node →
    /// pod traffic from these is not captured.
    pub node_gateways: Vec<IpAddr>,
    /// UDP port of the tunnels ([`crate::consts::TUNNEL_PORT`] by default).
    pub tunnel_port: u16,
}

/// The whole desired node tables (inet and bridge). `rules: None`: no ztunnel known yet;
/// tables, sets and chains exist (pods stay recorded) but the chains are empty, so nothing is
/// captured (or dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeNft {
    pub rules: Option<NodeRules>,
    /// Every enrolled pod address with the devices it may come from: every set of both tables
    /// is derived from these ([`pod_elements`]).
    pub pods: BTreeSet<PodSource>,
}

impl NodeNft {
    /// The enrolled IPv4 addresses ([`POD_SET`]).
    pub fn pods_v4(&self) -> BTreeSet<Ipv4Addr> {
        self.pods
            .iter()
            .filter_map(|p| match p.ip {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// The enrolled IPv6 addresses ([`POD_SET_V6`]).
    pub fn pods_v6(&self) -> BTreeSet<Ipv6Addr> {
        self.pods
            .iter()
            .filter_map(|p| match p.ip {
                IpAddr::V6(a) => Some(a),
                IpAddr::V4(_) => None,
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), NftError> {
        if let Some(r) = &self.rules {
            r.validate()?;
        }
        self.pods.iter().try_for_each(validate_source)
    }
}

fn validate_source(p: &PodSource) -> Result<(), NftError> {
    validate_ifname("pod host veth", &p.veth)?;
    if let Some(b) = &p.bridge {
        validate_ifname("pod bridge", b)?;
    }
    Ok(())
}

/// The ztunnel netns rules (SPEC §3): `table ip ztunnel` for its IPv4 address, `table ip6
/// ztunnel` for its IPv6 one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelRules {
    /// The ztunnel pod's address (IPv4 when it has one) ...
    pub ztunnel_ip: IpAddr,
    /// ... and its IPv6 one when `ztunnel_ip` is IPv4.
    pub ztunnel_ip6: Option<Ipv6Addr>,
    /// The pod's own interface, normally `eth0`.
    pub pod_iface: String,
    /// New connections per source into the listeners (`consts::syn_limit`); `None`: no limit.
    pub syn_limit: Option<SynLimit>,
}

/// A per-source rate of new connections (SYNs) beyond which they are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl SynLimit {
    pub const DEFAULT: SynLimit = SynLimit {
        per_second: crate::consts::syn_limit::PER_SECOND,
        burst: crate::consts::syn_limit::BURST,
    };

    /// `per_second` 0 means no limit.
    pub fn new(per_second: u32, burst: u32) -> Option<SynLimit> {
        (per_second > 0).then_some(SynLimit { per_second, burst })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(
        "the nft binary was not found (tried {program}): nftables' `nft` is a runtime dependency \
         of ambient-node (Debian: apt-get install nftables; or set {NFT_ENV}=/path/to/nft)"
    )]
    Missing { program: String },
    #[error("nft {action} failed (exit {code:?}): {stderr}")]
    Failed {
        action: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("bad nftables JSON: {0}")]
    BadJson(String),
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl NodeRules {
    /// The ztunnel's addresses, IPv4 first.
    pub fn ztunnel_ips(&self) -> Vec<IpAddr> {
        let d = DualAddr::new(self.ztunnel_ip, self.ztunnel_ip6);
        d.v4.map(IpAddr::V4)
            .into_iter()
            .chain(d.v6.map(IpAddr::V6))
            .collect()
    }

    /// Checks what nft would otherwise refuse with a less helpful message.
    pub fn validate(&self) -> Result<(), NftError> {
        validate_ifname("ztunnel_veth", &self.ztunnel_veth)?;
        if let Some(b) = &self.ztunnel_bridge {
            validate_ifname("ztunnel_bridge", b)?;
            validate_mac("ztunnel_mac", &self.ztunnel_mac)?;
            if let Some(m) = &self.bridge_mac {
                validate_mac("bridge_mac", m)?;
            }
        }
        Ok(())
    }
}

/// `aa:bb:cc:dd:ee:ff`
fn validate_mac(what: &str, mac: &str) -> Result<(), NftError> {
    let octets: Vec<_> = mac.split(':').collect();
    if octets.len() != 6
        || !octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(NftError::Invalid(format!(
            "{what} {mac:?} is not a MAC address"
        )));
    }
    Ok(())
}

impl ZtunnelRules {
    /// The pod's addresses by family.
    pub fn own_ips(&self) -> DualAddr {
        DualAddr::new(self.ztunnel_ip, self.ztunnel_ip6)
    }

    pub fn validate(&self) -> Result<(), NftError> {
        validate_ifname("pod_iface", &self.pod_iface)
    }
}

/// Linux interface names: 1..=15 bytes, no '/', ':', whitespace or NUL.
fn validate_ifname(what: &str, name: &str) -> Result<(), NftError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(NftError::Invalid(format!(
            "{what} {name:?} is not a valid interface name"
        )))
    }
}

// ---- tables --------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TableId {
    family: NfFamily,
    family_name: &'static str,
    /// nf_tables' number of the family (`NFPROTO_*`), for netlink.
    nfproto: u8,
    name: &'static str,
}

const NODE: TableId = TableId {
    family: NfFamily::INet,
    family_name: "inet",
    nfproto: 1,
    name: NODE_NFT_TABLE,
};

/// The node's bridge-family table: anti-spoofing on bridge ports.
const BRIDGE: TableId = TableId {
    family: NfFamily::Bridge,
    family_name: "bridge",
    nfproto: 7,
    name: NODE_NFT_TABLE,
};

const ZTUNNEL: TableId = TableId {
    family: NfFamily::IP,
    family_name: "ip",
    nfproto: 2,
    name: ZTUNNEL_NFT_TABLE,
};

/// The ztunnel netns' IPv6 twin of [`ZTUNNEL`] (TPROXY is per family: `tproxy ip6`).
const ZTUNNEL6: TableId = TableId {
    family: NfFamily::IP6,
    family_name: "ip6",
    nfproto: 10,
    name: ZTUNNEL_NFT_TABLE,
};

impl TableId {
    fn table(self) -> Table<'static> {
        Table {
            family: self.family,
            name: self.name.into(),
            handle: None,
        }
    }

    fn chain_ref(self, name: &str) -> Chain<'static> {
        Chain {
            family: self.family,
            table: self.name.into(),
            name: name.to_string().into(),
            ..Chain::default()
        }
    }

    fn set(self, name: &'static str, ty: SetTypeValue<'static>) -> Set<'static> {
        Set {
            family: self.family,
            table: self.name.into(),
            name: name.into(),
            set_type: ty,
            ..Set::default()
        }
    }

    fn elements<'e>(
        self,
        set: &'static str,
        elems: impl IntoIterator<Item = &'e SetElem>,
    ) -> Element<'static> {
        Element {
            family: self.family,
            table: self.name.into(),
            name: set.into(),
            elem: elems
                .into_iter()
                .map(SetElem::expr)
                .collect::<Vec<_>>()
                .into(),
        }
    }
}

// ---- the node's sets -----------------------------------------------------------------------

/// One element of a node set: an address, or `ifname . address`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetElem {
    Addr(IpAddr),
    DevAddr(String, IpAddr),
}

impl SetElem {
    fn expr(&self) -> Expression<'static> {
        let addr = |ip: &IpAddr| Expression::String(ip.to_string().into());
        match self {
            SetElem::Addr(ip) => addr(ip),
            SetElem::DevAddr(dev, ip) => {
                Expression::Named(nftables::expr::NamedExpression::Concat(vec![
                    Expression::String(dev.clone().into()),
                    addr(ip),
                ]))
            }
        }
    }

    /// The nf_tables key bytes; `None` for an invalid interface name.
    fn key(&self) -> Option<Vec<u8>> {
        match self {
            SetElem::Addr(ip) => Some(netlink::addr_key(*ip)),
            SetElem::DevAddr(dev, ip) => netlink::dev_addr_key(dev, *ip),
        }
    }
}

/// Which device a node set pairs with the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetKey {
    /// The address alone.
    Addr,
    /// `<input device in the IP layer> . <address>` ([`PodSource::routed_dev`]).
    RoutedDev,
    /// `<host veth, i.e. the bridge port> . <address>`.
    Port,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SetDef {
    table: TableId,
    name: &'static str,
    v6: bool,
    key: SetKey,
}

impl SetDef {
    const fn new(table: TableId, name: &'static str, v6: bool, key: SetKey) -> SetDef {
        SetDef {
            table,
            name,
            v6,
            key,
        }
    }

    fn set_type(&self) -> SetTypeValue<'static> {
        let addr = if self.v6 {
            SetType::Ipv6Addr
        } else {
            SetType::Ipv4Addr
        };
        match self.key {
            SetKey::Addr => SetTypeValue::Single(addr),
            SetKey::RoutedDev | SetKey::Port => {
                SetTypeValue::Concatenated(Cow::Owned(vec![SetType::Ifname, addr]))
            }
        }
    }

    /// This set's element for `p`, if `p` is of its address family.
    fn elem(&self, p: &PodSource) -> Option<SetElem> {
        if p.ip.is_ipv6() != self.v6 {
            return None;
        }
        Some(match self.key {
            SetKey::Addr => SetElem::Addr(p.ip),
            SetKey::RoutedDev => SetElem::DevAddr(p.routed_dev().to_string(), p.ip),
            SetKey::Port => SetElem::DevAddr(p.veth.clone(), p.ip),
        })
    }
}

/// Every set of the node tables, in the order a batch creates them.
const NODE_SETS: [SetDef; 8] = [
    SetDef::new(NODE, POD_SET, false, SetKey::Addr),
    SetDef::new(NODE, POD_SET_V6, true, SetKey::Addr),
    SetDef::new(NODE, POD_IIF_SET, false, SetKey::RoutedDev),
    SetDef::new(NODE, POD_IIF_SET_V6, true, SetKey::RoutedDev),
    SetDef::new(BRIDGE, POD_SET, false, SetKey::Addr),
    SetDef::new(BRIDGE, POD_SET_V6, true, SetKey::Addr),
    SetDef::new(BRIDGE, POD_PORT_SET, false, SetKey::Port),
    SetDef::new(BRIDGE, POD_PORT_SET_V6, true, SetKey::Port),
];

/// One element of one node set: a pod's share of the node tables.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodElement {
    /// Index into [`NODE_SETS`].
    set: usize,
    pub elem: SetElem,
}

impl PodElement {
    fn def(&self) -> &'static SetDef {
        &NODE_SETS[self.set]
    }

    /// The nft family of its table (`inet`, `bridge`).
    pub fn family(&self) -> &'static str {
        self.def().table.family_name
    }

    /// Its set's name.
    pub fn set_name(&self) -> &'static str {
        self.def().name
    }
}

impl std::fmt::Display for PodElement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.elem {
            SetElem::Addr(ip) => ip.to_string(),
            SetElem::DevAddr(dev, ip) => format!("\"{dev}\" . {ip}"),
        };
        write!(
            f,
            "{what} in {} {} {}",
            self.family(),
            NODE_NFT_TABLE,
            self.set_name()
        )
    }
}

/// Every element the node tables hold for these pod sources (sorted, without duplicates): the
/// address in each table's address set, `routed device . address` in the inet table's
/// [`POD_IIF_SET`], `host veth . address` in the bridge table's [`POD_PORT_SET`] (v6 twins
/// alike).
pub fn pod_elements<'a>(pods: impl IntoIterator<Item = &'a PodSource>) -> Vec<PodElement> {
    let mut out = BTreeSet::new();
    for p in pods {
        for (set, def) in NODE_SETS.iter().enumerate() {
            if let Some(elem) = def.elem(p) {
                out.insert(PodElement { set, elem });
            }
        }
    }
    out.into_iter().collect()
}

/// The elements of an observed set, addresses and `ifname . address` pairs alike.
fn observed_elems(s: &ObservedSet) -> BTreeSet<SetElem> {
    s.elems
        .iter()
        .map(|ip| SetElem::Addr(*ip))
        .chain(
            s.dev_elems
                .iter()
                .map(|(d, ip)| SetElem::DevAddr(d.clone(), *ip)),
        )
        .collect()
}

// ---- planning (pure) -----------------------------------------------------------------------

/// A desired named set and its elements.
struct DesiredSet {
    name: &'static str,
    ty: SetTypeValue<'static>,
    elems: BTreeSet<SetElem>,
}

fn plan_table(
    t: TableId,
    sets: &[DesiredSet],
    chains: &[ChainSpec],
    observed: Option<&ObservedTable>,
) -> Nftables<'static> {
    let mut b = Batch::new();
    if observed.is_none() {
        b.add(NfListObject::Table(t.table()));
    }
    for s in sets {
        let have = observed.and_then(|o| o.sets.get(s.name));
        if have.is_none() {
            b.add(NfListObject::Set(Box::new(t.set(s.name, s.ty.clone()))));
        }
        let current = have.map(observed_elems).unwrap_or_default();
        let missing: Vec<&SetElem> = s.elems.difference(&current).collect();
        let extra: Vec<&SetElem> = current.difference(&s.elems).collect();
        if !missing.is_empty() {
            b.add(NfListObject::Element(t.elements(s.name, missing)));
        }
        if !extra.is_empty() {
            b.delete(NfListObject::Element(t.elements(s.name, extra)));
        }
    }
    // Chains of ours that are no longer desired keep hooking packets: remove them.
    if let Some(o) = observed {
        for name in o.chains.keys() {
            if !chains.iter().any(|c| c.name == name) {
                b.add_cmd(NfCmd::Flush(FlushObject::Chain(t.chain_ref(name))));
                b.delete(NfListObject::Chain(t.chain_ref(name)));
            }
        }
    }
    for spec in chains {
        let have = observed.and_then(|o| o.chains.get(spec.name));
        let refill = match have {
            None => {
                b.add(NfListObject::Chain(spec.chain(t.family, t.name)));
                true
            }
            Some(c) if !c.same_base(spec) => {
                // type/hook/priority cannot change in place: replace the chain, same batch.
                b.add_cmd(NfCmd::Flush(FlushObject::Chain(t.chain_ref(spec.name))));
                b.delete(NfListObject::Chain(t.chain_ref(spec.name)));
                b.add(NfListObject::Chain(spec.chain(t.family, t.name)));
                true
            }
            Some(c) if !c.same_rules(spec) => {
                if !c.rules.is_empty() {
                    b.add_cmd(NfCmd::Flush(FlushObject::Chain(t.chain_ref(spec.name))));
                }
                true
            }
            Some(_) => false,
        };
        if refill {
            for r in spec.rules(t.family, t.name) {
                b.add(NfListObject::Rule(r));
            }
        }
    }
    b.to_nftables()
}

/// The desired sets of node table `t`, with their elements.
fn node_sets(t: TableId, desired: &NodeNft) -> Vec<DesiredSet> {
    NODE_SETS
        .iter()
        .filter(|d| d.table == t)
        .map(|d| DesiredSet {
            name: d.name,
            ty: d.set_type(),
            elems: desired.pods.iter().filter_map(|p| d.elem(p)).collect(),
        })
        .collect()
}

/// The batch that turns `observed` (`None`: no table) into the inet node table of `desired`;
/// empty when they match.
pub fn plan_node(desired: &NodeNft, observed: Option<&ObservedNode>) -> Nftables<'static> {
    let chains = node_chains(desired.rules.as_ref());
    plan_table(NODE, &node_sets(NODE, desired), &chains, observed)
}

/// The same for the node's bridge table (anti-spoofing on bridge ports).
pub fn plan_node_bridge(desired: &NodeNft, observed: Option<&ObservedTable>) -> Nftables<'static> {
    let chains = bridge_chains(desired.rules.as_ref());
    plan_table(BRIDGE, &node_sets(BRIDGE, desired), &chains, observed)
}

/// The batch that turns `observed` into the ztunnel netns' IPv4 table; empty when they match.
pub fn plan_ztunnel(
    desired: &ZtunnelRules,
    observed: Option<&ObservedZtunnel>,
) -> Nftables<'static> {
    plan_family_table(
        ZTUNNEL,
        desired.own_ips().v4.is_some(),
        || ztunnel_chains(desired),
        observed,
    )
}

/// The same for the IPv6 table: present only when the pod has an IPv6 address.
pub fn plan_ztunnel6(
    desired: &ZtunnelRules,
    observed: Option<&ObservedZtunnel>,
) -> Nftables<'static> {
    plan_family_table(
        ZTUNNEL6,
        desired.own_ips().v6.is_some(),
        || ztunnel_chains6(desired),
        observed,
    )
}

/// A table that exists only when `wanted`: planned as usual, or deleted if present.
fn plan_family_table(
    t: TableId,
    wanted: bool,
    chains: impl FnOnce() -> Vec<ChainSpec>,
    observed: Option<&ObservedTable>,
) -> Nftables<'static> {
    if wanted {
        return plan_table(t, &[], &chains(), observed);
    }
    let mut b = Batch::new();
    if observed.is_some() {
        b.delete(NfListObject::Table(t.table()));
    }
    b.to_nftables()
}

/// True when the batch holds no command.
pub fn is_empty(batch: &Nftables<'_>) -> bool {
    batch.objects.is_empty()
}

/// The JSON `nft -j -f -` is given for `batch`.
pub fn to_json(batch: &Nftables<'_>) -> Result<String, NftError> {
    serde_json::to_string(batch).map_err(|e| NftError::BadJson(e.to_string()))
}

// ---- kernel --------------------------------------------------------------------------------

/// Applies `batch` as one nft transaction (all or nothing). An empty batch runs nothing.
pub fn apply(batch: &Nftables<'_>) -> Result<(), NftError> {
    if is_empty(batch) {
        return Ok(());
    }
    let json = to_json(batch)?;
    tracing::debug!(commands = batch.objects.len(), "nft apply");
    exec::run(&["-j", "-f", "-"], Some(&json))?.into_result("apply batch")?;
    Ok(())
}

fn observe(t: TableId) -> Result<Option<ObservedTable>, NftError> {
    let out = exec::run(&["-j", "list", "table", t.family_name, t.name], None)?;
    if out.is_absent() {
        return Ok(None);
    }
    let json = out.into_result(&format!("list table {} {}", t.family_name, t.name))?;
    observe::parse_table(&json, t.name).map(Some)
}

/// Reads the node table (`None` when it does not exist).
pub fn observe_node() -> Result<Option<ObservedNode>, NftError> {
    observe(NODE)
}

/// Reads the node's bridge table (`None` when it does not exist).
pub fn observe_node_bridge() -> Result<Option<ObservedTable>, NftError> {
    observe(BRIDGE)
}

/// Reads the ztunnel netns' IPv4 table (`None` when it does not exist).
pub fn observe_ztunnel() -> Result<Option<ObservedZtunnel>, NftError> {
    observe(ZTUNNEL)
}

/// Reads the ztunnel netns' IPv6 table (`None` when it does not exist).
pub fn observe_ztunnel6() -> Result<Option<ObservedZtunnel>, NftError> {
    observe(ZTUNNEL6)
}

/// SYNs the ztunnel netns's per-source limit has dropped (both families), from its rules'
/// counters; 0 when it has no limit.
pub fn syn_limit_drops() -> Result<u64, NftError> {
    let mut n = 0;
    for t in [observe_ztunnel()?, observe_ztunnel6()?]
        .into_iter()
        .flatten()
    {
        if let Some(c) = t.chains.get(chain::SYN_LIMIT) {
            n += c.packets();
        }
    }
    Ok(n)
}

/// Attempts per reconcile: a concurrent change (a CNI DEL removing an element the plan
/// deletes too) fails the whole transaction; observe and plan again.
const ATTEMPTS: usize = 3;

/// A table and how to plan it from what is observed.
type TablePlan<'a> = (
    TableId,
    &'a dyn Fn(Option<&ObservedTable>) -> Nftables<'static>,
);

/// Observes every table, plans each and applies all the changes as one transaction.
fn reconcile(tables: &[TablePlan<'_>]) -> Result<bool, NftError> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let mut objects = Vec::new();
        for (t, plan) in tables {
            let observed = observe(*t)?;
            objects.extend(plan(observed.as_ref()).objects.iter().cloned());
        }
        let batch = Nftables {
            objects: Cow::Owned(objects),
        };
        if is_empty(&batch) {
            // (After a failed attempt, someone else made it current; a failed transaction
            // changed nothing.)
            return Ok(false);
        }
        match apply(&batch) {
            Ok(()) => return Ok(true),
            Err(e @ NftError::Failed { .. }) => {
                tracing::debug!(table = tables[0].0.name, error = %e, "nft reconcile raced, retrying");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| NftError::Invalid("reconcile gave up".into())))
}

/// Brings both node tables (inet and bridge) to `desired` in place, in one transaction;
/// `Ok(true)` when something changed.
pub fn reconcile_node(desired: &NodeNft) -> Result<bool, NftError> {
    desired.validate()?;
    reconcile(&[
        (NODE, &|o| plan_node(desired, o)),
        (BRIDGE, &|o| plan_node_bridge(desired, o)),
    ])
}

/// Brings the ztunnel netns table to `desired` in place; `Ok(true)` when something changed.
pub fn reconcile_ztunnel(desired: &ZtunnelRules) -> Result<bool, NftError> {
    desired.validate()?;
    reconcile(&[
        (ZTUNNEL, &|o| plan_ztunnel(desired, o)),
        (ZTUNNEL6, &|o| plan_ztunnel6(desired, o)),
    ])
}

/// The elements grouped by set, in [`NODE_SETS`] order, each set's elements sorted.
fn by_set(elems: &[PodElement]) -> Vec<(usize, Vec<&SetElem>)> {
    let mut out: Vec<(usize, Vec<&SetElem>)> = Vec::new();
    let mut sorted: Vec<&PodElement> = elems.iter().collect();
    sorted.sort();
    sorted.dedup();
    for e in sorted {
        match out.last_mut() {
            Some((set, v)) if *set == e.set => v.push(&e.elem),
            _ => out.push((e.set, vec![&e.elem])),
        }
    }
    out
}

fn validate_elements(elems: &[PodElement]) -> Result<(), NftError> {
    for e in elems {
        if let SetElem::DevAddr(dev, _) = &e.elem {
            validate_ifname("pod device", dev)?;
        }
    }
    Ok(())
}

/// The pod-set changes as one netlink transaction (no `nft` process); `false` when it could not
/// be applied that way (a table or set missing, or netlink refused), so the caller uses `nft`.
fn elements_by_netlink(groups: &[(usize, Vec<&SetElem>)], ops: &[netlink::ElemOp]) -> bool {
    let keys: Option<Vec<(usize, Vec<Vec<u8>>)>> = groups
        .iter()
        .map(|(set, elems)| {
            let keys = elems.iter().map(|e| e.key()).collect::<Option<Vec<_>>>()?;
            Some((*set, keys))
        })
        .collect();
    let Some(keys) = keys else {
        return false;
    };
    let changes: Vec<netlink::ElemChange<'_>> = ops
        .iter()
        .flat_map(|op| {
            keys.iter().map(move |(set, keys)| {
                let def = &NODE_SETS[*set];
                netlink::ElemChange {
                    op: *op,
                    family: def.table.nfproto,
                    table: def.table.name,
                    set: def.name,
                    keys,
                }
            })
        })
        .collect();
    match netlink::apply(&changes) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "pod set change over netlink failed; using nft");
            false
        }
    }
}

/// CNI ADD fast path: records a pod's elements ([`pod_elements`]) in one transaction touching
/// only the pod sets of both node tables (over netlink; with `nft` when a table or a set is
/// missing, which creates the tables and sets — chains stay to the agent's reconcile).
pub fn add_pod_elements(elems: &[PodElement]) -> Result<(), NftError> {
    validate_elements(elems)?;
    let groups = by_set(elems);
    if groups.is_empty() {
        return Ok(());
    }
    if elements_by_netlink(&groups, &[netlink::ElemOp::Add]) {
        return Ok(());
    }
    let mut b = Batch::new();
    for t in [NODE, BRIDGE] {
        b.add(NfListObject::Table(t.table()));
    }
    for def in &NODE_SETS {
        b.add(NfListObject::Set(Box::new(
            def.table.set(def.name, def.set_type()),
        )));
    }
    for (set, elems) in groups {
        let def = &NODE_SETS[set];
        b.add(NfListObject::Element(def.table.elements(def.name, elems)));
    }
    apply(&b.to_nftables())
}

/// CNI DEL fast path: removes a pod's elements; absent elements, sets or tables are fine.
///
/// nft 1.0.6 has no `destroy`; each element is added then deleted in the same transaction,
/// which succeeds whether or not it was there and never shows it to a packet. Over netlink
/// first; with `nft` when a table or a set is missing.
pub fn delete_pod_elements(elems: &[PodElement]) -> Result<(), NftError> {
    validate_elements(elems)?;
    let groups = by_set(elems);
    if groups.is_empty() {
        return Ok(());
    }
    if elements_by_netlink(&groups, &[netlink::ElemOp::Add, netlink::ElemOp::Delete]) {
        return Ok(());
    }
    let batch = |groups: &[(usize, Vec<&SetElem>)]| {
        let mut b = Batch::new();
        for (set, elems) in groups {
            let def = &NODE_SETS[*set];
            b.add(NfListObject::Element(
                def.table.elements(def.name, elems.iter().copied()),
            ));
            b.delete(NfListObject::Element(
                def.table.elements(def.name, elems.iter().copied()),
            ));
        }
        b.to_nftables()
    };
    match apply(&batch(&groups)) {
        Ok(()) => Ok(()),
        Err(first @ NftError::Failed { .. }) => {
            // A table or one of the sets is missing: only touch the sets that exist.
            let observed = [observe(NODE)?, observe(BRIDGE)?];
            let present: Vec<_> = groups
                .into_iter()
                .filter(|(set, _)| {
                    let def = &NODE_SETS[*set];
                    let i = usize::from(def.table == BRIDGE);
                    observed[i]
                        .as_ref()
                        .is_some_and(|o| o.sets.contains_key(def.name))
                })
                .collect();
            if present.is_empty() {
                return Ok(());
            }
            apply(&batch(&present)).map_err(|e| match e {
                NftError::Failed { .. } => first,
                e => e,
            })
        }
        Err(e) => Err(e),
    }
}

/// CNI CHECK: which of these elements the kernel does not hold (a missing table or set
/// counts as missing elements).
pub fn missing_pod_elements(elems: &[PodElement]) -> Result<Vec<PodElement>, NftError> {
    let mut missing = Vec::new();
    for (set, want) in by_set(elems) {
        let def = &NODE_SETS[set];
        let t = def.table;
        let out = exec::run(
            &["-j", "list", "set", t.family_name, t.name, def.name],
            None,
        )?;
        let have = if out.is_absent() {
            BTreeSet::new()
        } else {
            let json = out.into_result(&format!("list set {} {}", t.family_name, def.name))?;
            let parsed = observe::parse_table(&json, t.name)?;
            parsed
                .sets
                .get(def.name)
                .map(observed_elems)
                .unwrap_or_default()
        };
        missing.extend(
            want.into_iter()
                .filter(|e| !have.contains(*e))
                .map(|e| PodElement {
                    set,
                    elem: e.clone(),
                }),
        );
    }
    Ok(missing)
}

/// Deletes whole tables if present (`add table; delete table` in one transaction).
fn delete_tables(ts: &[TableId]) -> Result<(), NftError> {
    let mut b = Batch::new();
    for t in ts {
        b.add(NfListObject::Table(t.table()));
        b.delete(NfListObject::Table(t.table()));
    }
    apply(&b.to_nftables())
}

/// Cleanup: removes both node tables (inet and bridge); absent is fine.
pub fn delete_node_table() -> Result<(), NftError> {
    delete_tables(&[NODE, BRIDGE])
}

/// Cleanup: removes the ztunnel netns tables (ip and ip6); absent is fine.
pub fn delete_ztunnel_table() -> Result<(), NftError> {
    delete_tables(&[ZTUNNEL, ZTUNNEL6])
}
