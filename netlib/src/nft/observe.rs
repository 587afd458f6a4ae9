//! What the kernel holds, read from `nft -j list ...`.
//!
//! The output is parsed as plain JSON rather than with the `nftables` crate's typed schema:
//! only chains, rule handles and comments and set elements are needed, and a rule someone
//! else added with an expression the crate does not model must not make observation fail.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::Value;

use super::render::{ChainSpec, RuleTag};
use super::NftError;
use nftables::types::{NfChainType, NfHook};

/// One table as the kernel has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedTable {
    /// Every chain of the table, by name.
    pub chains: BTreeMap<String, ObservedChain>,
    /// Every set of the table, by name.
    pub sets: BTreeMap<String, ObservedSet>,
}

/// The node table (inet `ambient-node`).
pub type ObservedNode = ObservedTable;
/// The ztunnel netns table (ip `ztunnel`).
pub type ObservedZtunnel = ObservedTable;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedChain {
    pub name: String,
    pub handle: Option<u64>,
    /// `filter`, `nat`, `route`; `None` for a regular (non-base) chain.
    pub chain_type: Option<String>,
    pub hook: Option<String>,
    pub prio: Option<i64>,
    pub policy: Option<String>,
    /// The rules in chain order.
    pub rules: Vec<ObservedRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedRule {
    pub handle: Option<u64>,
    pub comment: Option<String>,
    /// The `[ambient i/n fingerprint]` tag of the comment, when it has one.
    pub tag: Option<RuleTag>,
    /// Packets its (first) counter has counted, when it has one.
    pub packets: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedSet {
    /// `ipv4_addr`, `ipv6_addr`, ... (concatenations joined with " . ").
    pub set_type: String,
    pub elems: BTreeSet<IpAddr>,
    /// `ifname . address` elements (the anti-spoofing sets).
    pub dev_elems: BTreeSet<(String, IpAddr)>,
    /// Elements that are neither (ranges, prefixes, ...), as nft printed them.
    pub other_elems: Vec<String>,
}

impl ObservedChain {
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn handles(&self) -> Vec<u64> {
        self.rules.iter().filter_map(|r| r.handle).collect()
    }

    /// The fingerprint each rule's comment carries (`None` for an untagged rule).
    pub fn fingerprints(&self) -> Vec<Option<u64>> {
        self.rules
            .iter()
            .map(|r| r.tag.map(|t| t.fingerprint))
            .collect()
    }

    /// Same type, hook, priority and policy as `spec` (these cannot be changed in place).
    pub fn same_base(&self, spec: &ChainSpec) -> bool {
        self.chain_type.as_deref() == Some(chain_type_name(spec.kind))
            && self.hook.as_deref() == Some(hook_name(spec.hook))
            && self.prio == Some(i64::from(spec.prio))
            && self.policy.as_deref().unwrap_or("accept") == "accept"
    }

    /// Packets the rules' counters have counted, summed.
    pub fn packets(&self) -> u64 {
        self.rules.iter().filter_map(|r| r.packets).sum()
    }

    /// The rules are exactly the ones `spec` renders: same count, and rule i's tag says
    /// "i of n" with the chain's current fingerprint.
    pub fn same_rules(&self, spec: &ChainSpec) -> bool {
        let n = spec.rules.len();
        if self.rules.len() != n {
            return false;
        }
        let fingerprint = spec.fingerprint();
        self.rules.iter().enumerate().all(|(i, r)| {
            r.tag
                == Some(RuleTag {
                    index: i + 1,
                    count: n,
                    fingerprint,
                })
        })
    }
}

impl ObservedTable {
    /// The IPv4 elements of the set `name` (empty when the set is missing).
    pub fn set_v4(&self, name: &str) -> BTreeSet<Ipv4Addr> {
        self.sets
            .get(name)
            .map(|s| {
                s.elems
                    .iter()
                    .filter_map(|a| match a {
                        IpAddr::V4(a) => Some(*a),
                        IpAddr::V6(_) => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The IPv6 elements of the set `name` (empty when the set is missing).
    pub fn set_v6(&self, name: &str) -> BTreeSet<Ipv6Addr> {
        self.sets
            .get(name)
            .map(|s| {
                s.elems
                    .iter()
                    .filter_map(|a| match a {
                        IpAddr::V6(a) => Some(*a),
                        IpAddr::V4(_) => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The `ifname . address` elements of the set `name` (empty when the set is missing).
    pub fn set_dev_addrs(&self, name: &str) -> BTreeSet<(String, IpAddr)> {
        self.sets
            .get(name)
            .map(|s| s.dev_elems.clone())
            .unwrap_or_default()
    }

    /// The recorded ambient pod IPv4 addresses (node table).
    pub fn pods_v4(&self) -> BTreeSet<Ipv4Addr> {
        self.set_v4(crate::consts::POD_SET)
    }

    /// The recorded ambient pod IPv6 addresses (node table).
    pub fn pods_v6(&self) -> BTreeSet<Ipv6Addr> {
        self.set_v6(crate::consts::POD_SET_V6)
    }
}

pub(crate) fn chain_type_name(t: NfChainType) -> &'static str {
    match t {
        NfChainType::Filter => "filter",
        NfChainType::Route => "route",
        NfChainType::NAT => "nat",
    }
}

pub(crate) fn hook_name(h: NfHook) -> &'static str {
    match h {
        NfHook::Ingress => "ingress",
        NfHook::Prerouting => "prerouting",
        NfHook::Forward => "forward",
        NfHook::Input => "input",
        NfHook::Output => "output",
        NfHook::Postrouting => "postrouting",
        NfHook::Egress => "egress",
    }
}

fn bad(what: &str) -> NftError {
    NftError::BadJson(what.to_string())
}

/// Parses the output of `nft -j list table ...` (or `list set ...`) for table `table`.
pub fn parse_table(json: &str, table: &str) -> Result<ObservedTable, NftError> {
    let doc: Value =
        serde_json::from_str(json).map_err(|e| NftError::BadJson(format!("nft output: {e}")))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("nft output has no \"nftables\" array"))?;
    let mut out = ObservedTable::default();
    for item in items {
        let Some(obj) = item.as_object() else {
            continue;
        };
        for (kind, body) in obj {
            if body.get("table").and_then(Value::as_str) != Some(table) {
                continue;
            }
            match kind.as_str() {
                "chain" => {
                    let c = parse_chain(body)?;
                    let entry = out.chains.entry(c.name.clone()).or_default();
                    let rules = std::mem::take(&mut entry.rules);
                    *entry = ObservedChain { rules, ..c };
                }
                "rule" => {
                    let chain = body
                        .get("chain")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad("rule without a chain"))?;
                    let comment = body.get("comment").and_then(Value::as_str);
                    let entry =
                        out.chains
                            .entry(chain.to_string())
                            .or_insert_with(|| ObservedChain {
                                name: chain.to_string(),
                                ..ObservedChain::default()
                            });
                    entry.rules.push(ObservedRule {
                        handle: body.get("handle").and_then(Value::as_u64),
                        comment: comment.map(str::to_string),
                        tag: comment.and_then(RuleTag::parse),
                        packets: body.get("expr").and_then(Value::as_array).and_then(|e| {
                            e.iter()
                                .find_map(|x| x.get("counter")?.get("packets")?.as_u64())
                        }),
                    });
                }
                "set" => {
                    let (name, set) = parse_set(body)?;
                    out.sets.insert(name, set);
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

fn parse_chain(body: &Value) -> Result<ObservedChain, NftError> {
    let s = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
    Ok(ObservedChain {
        name: s("name").ok_or_else(|| bad("chain without a name"))?,
        handle: body.get("handle").and_then(Value::as_u64),
        chain_type: s("type"),
        hook: s("hook"),
        prio: body.get("prio").and_then(Value::as_i64),
        policy: s("policy"),
        rules: Vec::new(),
    })
}

fn parse_set(body: &Value) -> Result<(String, ObservedSet), NftError> {
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("set without a name"))?
        .to_string();
    let set_type = match body.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" . "),
        _ => String::new(),
    };
    let mut set = ObservedSet {
        set_type,
        ..ObservedSet::default()
    };
    let elems: &[Value] = match body.get("elem") {
        Some(Value::Array(a)) => a,
        Some(v) => std::slice::from_ref(v),
        None => &[],
    };
    for e in elems {
        // A plain element is a string; one with a comment/counter/timeout is {"elem": {"val": ..}}.
        let val = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
        if let Some(ip) = val.as_str().and_then(|v| v.parse::<IpAddr>().ok()) {
            set.elems.insert(ip);
        } else if let Some(pair) = dev_addr(val) {
            set.dev_elems.insert(pair);
        } else {
            set.other_elems.push(val.to_string());
        }
    }
    Ok((name, set))
}

/// `{"concat": ["veth1", "10.0.0.1"]}` (an `ifname . address` element).
fn dev_addr(val: &Value) -> Option<(String, IpAddr)> {
    match val.get("concat")?.as_array()?.as_slice() {
        [Value::String(dev), Value::String(ip)] => Some((dev.clone(), ip.parse().ok()?)),
        _ => None,
    }
}
