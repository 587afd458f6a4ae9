//! nftables: render the SPEC's rules (§2 node, §3 ztunnel netns) with the `nftables` crate and
//! reconcile them in place, one atomic `nft -j -f -` transaction per change.
//!
//! * Never flush-and-rebuild a table (SPEC §6): a chain whose rules differ is flushed and
//!   refilled *in the same batch* (one kernel transaction, so no packet sees it empty); set
//!   elements are added/deleted one by one, the set is never flushed.
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

#[cfg(test)]
mod root_tests;
#[cfg(test)]
mod tests;

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
pub use render::{node_chains, rule_comment, ztunnel_chains, ChainSpec, RuleSpec, RuleTag};

use crate::consts::{NODE_NFT_TABLE, POD_SET, POD_SET_V6, ZTUNNEL_NFT_TABLE};

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
}

/// nftables hook priorities (the kernel's named values).
pub mod prio {
    /// `mangle`: after conntrack, before any NAT.
    pub const MANGLE: i32 = -150;
    /// `dstnat` (kube-proxy's NAT prerouting priority).
    pub const DSTNAT: i32 = -100;
    /// `srcnat` (kube-proxy's NAT postrouting priority).
    pub const SRCNAT: i32 = 100;
    /// Our NAT chains run this much before kube-proxy's.
    pub const NAT_BYPASS_OFFSET: i32 = -10;
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
    pub ztunnel_ip: Ipv4Addr,
    /// The node's addresses toward pods (`src` of table-100 routes); node → pod traffic from
    /// these is not captured.
    pub node_gateways: Vec<Ipv4Addr>,
    /// UDP port of the tunnels ([`crate::consts::TUNNEL_PORT`] by default).
    pub tunnel_port: u16,
}

/// The whole desired node table. `rules: None`: no ztunnel known yet; table, sets and chains
/// exist (pods stay recorded) but the chains are empty, so nothing is captured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeNft {
    pub rules: Option<NodeRules>,
    pub pods_v4: BTreeSet<Ipv4Addr>,
    pub pods_v6: BTreeSet<Ipv6Addr>,
}

/// The ztunnel netns rules (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZtunnelRules {
    pub ztunnel_ip: Ipv4Addr,
    /// The pod's own interface, normally `eth0`.
    pub pod_iface: String,
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
    /// Checks what nft would otherwise refuse with a less helpful message.
    pub fn validate(&self) -> Result<(), NftError> {
        validate_ifname("ztunnel_veth", &self.ztunnel_veth)?;
        if let Some(b) = &self.ztunnel_bridge {
            validate_ifname("ztunnel_bridge", b)?;
            let octets: Vec<_> = self.ztunnel_mac.split(':').collect();
            if octets.len() != 6
                || !octets
                    .iter()
                    .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
            {
                return Err(NftError::Invalid(format!(
                    "ztunnel_mac {:?} is not a MAC address",
                    self.ztunnel_mac
                )));
            }
        }
        Ok(())
    }
}

impl ZtunnelRules {
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

#[derive(Debug, Clone, Copy)]
struct TableId {
    family: NfFamily,
    family_name: &'static str,
    name: &'static str,
}

const NODE: TableId = TableId {
    family: NfFamily::INet,
    family_name: "inet",
    name: NODE_NFT_TABLE,
};

const ZTUNNEL: TableId = TableId {
    family: NfFamily::IP,
    family_name: "ip",
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

    fn set(self, name: &'static str, ty: SetType) -> Set<'static> {
        Set {
            family: self.family,
            table: self.name.into(),
            name: name.into(),
            set_type: SetTypeValue::Single(ty),
            ..Set::default()
        }
    }

    fn elements(
        self,
        set: &'static str,
        ips: impl IntoIterator<Item = IpAddr>,
    ) -> Element<'static> {
        Element {
            family: self.family,
            table: self.name.into(),
            name: set.into(),
            elem: ips
                .into_iter()
                .map(|ip| Expression::String(ip.to_string().into()))
                .collect::<Vec<_>>()
                .into(),
        }
    }
}

/// The node's two pod sets.
const POD_SETS: [(&str, SetType); 2] = [
    (POD_SET, SetType::Ipv4Addr),
    (POD_SET_V6, SetType::Ipv6Addr),
];

// ---- planning (pure) -----------------------------------------------------------------------

/// A desired named set and its elements.
struct DesiredSet {
    name: &'static str,
    ty: SetType,
    elems: BTreeSet<IpAddr>,
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
            b.add(NfListObject::Set(Box::new(t.set(s.name, s.ty))));
        }
        let empty = BTreeSet::new();
        let current = have.map(|h| &h.elems).unwrap_or(&empty);
        let missing: Vec<IpAddr> = s.elems.difference(current).copied().collect();
        let extra: Vec<IpAddr> = current.difference(&s.elems).copied().collect();
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

/// The batch that turns `observed` (`None`: no table) into `desired`; empty when they match.
pub fn plan_node(desired: &NodeNft, observed: Option<&ObservedNode>) -> Nftables<'static> {
    let sets = [
        DesiredSet {
            name: POD_SETS[0].0,
            ty: POD_SETS[0].1,
            elems: desired.pods_v4.iter().map(|a| IpAddr::V4(*a)).collect(),
        },
        DesiredSet {
            name: POD_SETS[1].0,
            ty: POD_SETS[1].1,
            elems: desired.pods_v6.iter().map(|a| IpAddr::V6(*a)).collect(),
        },
    ];
    plan_table(NODE, &sets, &node_chains(desired.rules.as_ref()), observed)
}

/// The batch that turns `observed` into the ztunnel netns table; empty when they match.
pub fn plan_ztunnel(
    desired: &ZtunnelRules,
    observed: Option<&ObservedZtunnel>,
) -> Nftables<'static> {
    plan_table(ZTUNNEL, &[], &ztunnel_chains(desired), observed)
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

/// Reads the ztunnel netns table (`None` when it does not exist).
pub fn observe_ztunnel() -> Result<Option<ObservedZtunnel>, NftError> {
    observe(ZTUNNEL)
}

/// Attempts per reconcile: a concurrent change (a CNI DEL removing an element the plan
/// deletes too) fails the whole transaction; observe and plan again.
const ATTEMPTS: usize = 3;

fn reconcile(
    t: TableId,
    plan: impl Fn(Option<&ObservedTable>) -> Nftables<'static>,
) -> Result<bool, NftError> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let observed = observe(t)?;
        let batch = plan(observed.as_ref());
        if is_empty(&batch) {
            // (After a failed attempt, someone else made it current; a failed transaction
            // changed nothing.)
            return Ok(false);
        }
        match apply(&batch) {
            Ok(()) => return Ok(true),
            Err(e @ NftError::Failed { .. }) => {
                tracing::debug!(table = t.name, error = %e, "nft reconcile raced, retrying");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| NftError::Invalid("reconcile gave up".into())))
}

/// Brings the node table to `desired` in place; `Ok(true)` when something changed.
pub fn reconcile_node(desired: &NodeNft) -> Result<bool, NftError> {
    if let Some(r) = &desired.rules {
        r.validate()?;
    }
    reconcile(NODE, |o| plan_node(desired, o))
}

/// Brings the ztunnel netns table to `desired` in place; `Ok(true)` when something changed.
pub fn reconcile_ztunnel(desired: &ZtunnelRules) -> Result<bool, NftError> {
    desired.validate()?;
    reconcile(ZTUNNEL, |o| plan_ztunnel(desired, o))
}

fn pod_element_batches(v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Vec<(&'static str, Vec<IpAddr>)> {
    let v4: Vec<IpAddr> = v4.iter().map(|a| IpAddr::V4(*a)).collect();
    let v6: Vec<IpAddr> = v6.iter().map(|a| IpAddr::V6(*a)).collect();
    [(POD_SET, v4), (POD_SET_V6, v6)]
        .into_iter()
        .filter(|(_, ips)| !ips.is_empty())
        .collect()
}

/// nf_tables' family number of the node table (`NFPROTO_INET`).
const NFPROTO_INET: u8 = 1;

/// The pod-set changes as one netlink transaction (no `nft` process); `false` when it could not
/// be applied that way (table or set missing, or netlink refused), so the caller uses `nft`.
fn elements_by_netlink(todo: &[(&'static str, Vec<IpAddr>)], ops: &[netlink::ElemOp]) -> bool {
    let changes: Vec<netlink::ElemChange<'_>> = todo
        .iter()
        .flat_map(|(set, ips)| {
            ops.iter().map(move |op| netlink::ElemChange {
                op: *op,
                set,
                addrs: ips,
            })
        })
        .collect();
    match netlink::apply(NFPROTO_INET, NODE.name, &changes) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "pod set change over netlink failed; using nft");
            false
        }
    }
}

/// CNI ADD fast path: records pod addresses, one transaction touching only the pod sets
/// (over netlink; with `nft` when the table or a set is missing, which creates the table and
/// sets — chains stay to the agent's reconcile).
pub fn add_pod_elements(v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Result<(), NftError> {
    let todo = pod_element_batches(v4, v6);
    if todo.is_empty() {
        return Ok(());
    }
    if elements_by_netlink(&todo, &[netlink::ElemOp::Add]) {
        return Ok(());
    }
    let mut b = Batch::new();
    b.add(NfListObject::Table(NODE.table()));
    for (name, ty) in POD_SETS {
        b.add(NfListObject::Set(Box::new(NODE.set(name, ty))));
    }
    for (set, ips) in todo {
        b.add(NfListObject::Element(NODE.elements(set, ips)));
    }
    apply(&b.to_nftables())
}

/// CNI DEL fast path: removes pod addresses; absent addresses, sets or table are fine.
///
/// nft 1.0.6 has no `destroy`; each element is added then deleted in the same transaction,
/// which succeeds whether or not it was there and never shows it to a packet. Over netlink
/// first; with `nft` when the table or a set is missing.
pub fn delete_pod_elements(v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Result<(), NftError> {
    let todo = pod_element_batches(v4, v6);
    if todo.is_empty() {
        return Ok(());
    }
    if elements_by_netlink(&todo, &[netlink::ElemOp::Add, netlink::ElemOp::Delete]) {
        return Ok(());
    }
    let batch = |sets: &[(&'static str, Vec<IpAddr>)]| {
        let mut b = Batch::new();
        for (set, ips) in sets {
            b.add(NfListObject::Element(
                NODE.elements(set, ips.iter().copied()),
            ));
            b.delete(NfListObject::Element(
                NODE.elements(set, ips.iter().copied()),
            ));
        }
        b.to_nftables()
    };
    match apply(&batch(&todo)) {
        Ok(()) => Ok(()),
        Err(first @ NftError::Failed { .. }) => {
            // The table or one of the sets is missing: only touch the sets that exist.
            let Some(observed) = observe_node()? else {
                return Ok(());
            };
            let present: Vec<_> = todo
                .into_iter()
                .filter(|(set, _)| observed.sets.contains_key(*set))
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

/// CNI CHECK: is `ip` recorded in the pod set of its family?
pub fn pod_element_present(ip: IpAddr) -> Result<bool, NftError> {
    let set = match ip {
        IpAddr::V4(_) => POD_SET,
        IpAddr::V6(_) => POD_SET_V6,
    };
    let out = exec::run(
        &["-j", "list", "set", NODE.family_name, NODE.name, set],
        None,
    )?;
    if out.is_absent() {
        return Ok(false);
    }
    let json = out.into_result(&format!("list set {set}"))?;
    let t = observe::parse_table(&json, NODE.name)?;
    Ok(t.sets.get(set).is_some_and(|s| s.elems.contains(&ip)))
}

/// Deletes a whole table if present (`add table; delete table` in one transaction).
fn delete_table(t: TableId) -> Result<(), NftError> {
    let mut b = Batch::new();
    b.add(NfListObject::Table(t.table()));
    b.delete(NfListObject::Table(t.table()));
    apply(&b.to_nftables())
}

/// Cleanup: removes the node table; absent is fine.
pub fn delete_node_table() -> Result<(), NftError> {
    delete_table(NODE)
}

/// Cleanup: removes the ztunnel netns table; absent is fine.
pub fn delete_ztunnel_table() -> Result<(), NftError> {
    delete_table(ZTUNNEL)
}
