//! Drift: every place where the kernel differs from the agent's desired state, each with what
//! will repair it. The node's objects are the agent's (its next reconcile, at start and every
//! `--resync` seconds, converges them in place); the ztunnel netns' are ztunnel-init's, which
//! runs when the ztunnel pod starts.

use std::net::IpAddr;

use ambient_net::consts::{self, table};
use ambient_net::firewall::FirewallKind;
use ambient_net::iptables::{self, ipset, ChainRules, Fam};
use ambient_net::model::{self, RuleSpec, TunnelAction, TunnelSpec};
use ambient_net::nft::{self, ChainSpec, ObservedTable, SetElem, ZtunnelRules};
use serde::Serialize;

use super::desired::Desired;
use super::kernel::{route_text, rule_text, IptKernel, Kernel, NsKernel};

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// What differs: `rule 101`, `route table 100 10.244.1.3/32`, `tunnel istioout`,
    /// `set ztunnel-pods-ips 10.244.1.3`, `chain inet prerouting`, `sysctl <key>`; a path
    /// step names the drift of its objects by these.
    pub subject: String,
    pub kernel: String,
    pub desired: String,
    /// Who repairs it, and how.
    pub fix: String,
}

const AGENT_FIX: &str = "the agent's next reconcile (at start and every --resync, 30 s by default) puts it back in place";
const ZTUNNEL_FIX: &str =
    "ztunnel-init sets the ztunnel netns up when the ztunnel pod starts: restart the ztunnel pod";

/// How a policy rule is named in drift subjects: `rule 101`, `rule -6 101` (both families
/// have a rule of each priority).
pub fn rule_subject(prefix: &str, r: &RuleSpec) -> String {
    format!(
        "{prefix}rule {}{}",
        if r.v6 { "-6 " } else { "" },
        r.priority
    )
}

/// How an iptables chain of ours is named in drift subjects.
pub fn ipt_chain_subject(prefix: &str, f: Fam, table: &str, chain: &str) -> String {
    let tool = match f {
        Fam::V4 => "iptables",
        Fam::V6 => "ip6tables",
    };
    format!("{prefix}chain {tool} {table} {chain}")
}

/// Every drift of the node and the ztunnel netns.
pub fn compare(d: &Desired, k: &Kernel) -> Vec<Drift> {
    let mut out = Vec::new();
    ns_drift(&mut out, &d.net, &k.node, &table::ALL, AGENT_FIX, "");
    match k.firewall {
        FirewallKind::Nftables => nft_drift(&mut out, d, k),
        FirewallKind::Iptables => ipt_drift(&mut out, d, k),
    }
    sysctl_drift(&mut out, &d.net.sysctls, "", AGENT_FIX);
    if let (Some(want), Some(z)) = (&d.ztunnel, &d.state.ztunnel) {
        match &k.ztunnel {
            None => out.push(Drift {
                subject: "ztunnel netns".into(),
                kernel: format!("{} is missing", z.endpoint.netns),
                desired: "the ztunnel pod's netns".into(),
                fix: "the agent stops capture when the ztunnel pod's CNI DEL arrives; until then captured traffic has nowhere to go: restart the ztunnel pod".into(),
            }),
            Some(zk) => {
                let tables = [
                    consts::zt_rule::TABLE_LOCAL,
                    consts::zt_rule::TABLE_OUTBOUND,
                    consts::zt_rule::TABLE_INBOUND,
                ];
                ns_drift(&mut out, want, zk, &tables, ZTUNNEL_FIX, "ztunnel ");
                let rules = ZtunnelRules {
                    ztunnel_ip: z.endpoint.ip,
                    ztunnel_ip6: z.endpoint.ip6,
                    pod_iface: "eth0".into(),
                    // The per-source SYN limit is ztunnel-init's to choose (its flags): not
                    // the agent's desired state, so only the TPROXY chain is compared.
                    syn_limit: None,
                };
                let own = rules.own_ips();
                match k.zt_firewall {
                    FirewallKind::Nftables => {
                        if own.v4.is_some() {
                            for c in nft::ztunnel_chains(&rules) {
                                chain_drift(&mut out, &c, zk.nft.as_ref(), "ztunnel ip", ZTUNNEL_FIX);
                            }
                        }
                        if own.v6.is_some() {
                            for c in nft::ztunnel_chains6(&rules) {
                                chain_drift(&mut out, &c, zk.nft6.as_ref(), "ztunnel ip6", ZTUNNEL_FIX);
                            }
                        }
                    }
                    FirewallKind::Iptables => {
                        for f in Fam::BOTH {
                            if let Some(c) = iptables::ztunnel_chain(&rules, f) {
                                ipt_chain_drift(&mut out, &c, zk.ipt.as_ref(), f, "ztunnel ", ZTUNNEL_FIX);
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

fn ns_drift(
    out: &mut Vec<Drift>,
    want: &model::NetDesired,
    k: &NsKernel,
    tables: &[u32],
    fix: &str,
    prefix: &str,
) {
    let (add, del) = model::diff_rules(&want.rules, &k.rules);
    for r in add {
        out.push(Drift {
            subject: rule_subject(prefix, &r),
            kernel: "missing".into(),
            desired: rule_text(&r),
            fix: fix.into(),
        });
    }
    for r in del {
        out.push(Drift {
            subject: rule_subject(prefix, &r),
            kernel: rule_text(&r),
            desired: "not there (stale or duplicate)".into(),
            fix: fix.into(),
        });
    }
    let owned: model::Routes = k
        .routes
        .iter()
        .filter(|(key, _)| tables.contains(&key.table))
        .map(|(a, b)| (*a, b.clone()))
        .collect();
    let (put, del) = model::diff_routes(&want.routes, &owned);
    for (key, v) in put {
        out.push(Drift {
            subject: format!(
                "{prefix}route table {} {}/{}",
                key.table, key.dst, key.prefix_len
            ),
            kernel: owned
                .get(&key)
                .map(|o| route_text(&key, o))
                .unwrap_or_else(|| "missing".into()),
            desired: route_text(&key, &v),
            fix: fix.into(),
        });
    }
    for key in del {
        out.push(Drift {
            subject: format!(
                "{prefix}route table {} {}/{}",
                key.table, key.dst, key.prefix_len
            ),
            kernel: owned
                .get(&key)
                .map(|o| route_text(&key, o))
                .unwrap_or_default(),
            desired: "not there (stale)".into(),
            fix: fix.into(),
        });
    }
    for t in &want.tunnels {
        let have = k.tunnels.get(t.end.name).cloned().flatten();
        let (kernel, action) = match &have {
            None => ("missing".to_string(), "created"),
            Some(h) => match model::tunnel_action(t, h) {
                TunnelAction::Keep => continue,
                TunnelAction::SetMtu => (tunnel_have(h), "changes the MTU in place"),
                TunnelAction::SetRemote => (tunnel_have(h), "re-points the remote in place"),
                TunnelAction::Recreate => (tunnel_have(h), "re-creates the device"),
            },
        };
        out.push(Drift {
            subject: format!("{prefix}tunnel {}", t.end.name),
            kernel,
            desired: tunnel_want(t),
            fix: if fix == AGENT_FIX {
                format!("the agent's next reconcile {action}")
            } else {
                fix.into()
            },
        });
    }
}

pub fn tunnel_want(t: &TunnelSpec) -> String {
    format!(
        "{} VNI {} port {} remote {} mtu {}",
        format!("{:?}", t.kind).to_lowercase(),
        t.end.vni,
        t.port,
        t.remote,
        t.mtu
    )
}

pub fn tunnel_have(h: &model::TunnelObserved) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    format!(
        "{} VNI {} port {} remote {} mtu {}",
        opt(h.kind.map(|k| format!("{k:?}").to_lowercase())),
        opt(h.vni.map(|v| v.to_string())),
        opt(h.port.map(|v| v.to_string())),
        opt(h.remote.map(|v| v.to_string())),
        opt(h.mtu.map(|v| v.to_string())),
    )
}

fn has_elem(t: Option<&ObservedTable>, set: &str, e: &SetElem) -> bool {
    let Some(s) = t.and_then(|t| t.sets.get(set)) else {
        return false;
    };
    match e {
        SetElem::Addr(ip) => s.elems.contains(ip),
        SetElem::DevAddr(dev, ip) => s.dev_elems.contains(&(dev.clone(), *ip)),
    }
}

/// How a set element is named in drift subjects: `set <name> <element>`.
pub fn elem_subject(set: &str, e: &SetElem) -> String {
    match e {
        SetElem::Addr(ip) => format!("set {set} {ip}"),
        SetElem::DevAddr(dev, ip) => format!("set {set} \"{dev}\" . {ip}"),
    }
}

fn nft_drift(out: &mut Vec<Drift>, d: &Desired, k: &Kernel) {
    let pods: Vec<_> = d.nft.pods.iter().cloned().collect();
    let want = nft::pod_elements(&pods);
    for e in &want {
        let t = match e.family() {
            "bridge" => k.node.nft_bridge.as_ref(),
            _ => k.node.nft.as_ref(),
        };
        if !has_elem(t, e.set_name(), &e.elem) {
            out.push(Drift {
                subject: elem_subject(e.set_name(), &e.elem),
                kernel: "missing".into(),
                desired: format!("{e}"),
                fix: AGENT_FIX.into(),
            });
        }
    }
    // Stale addresses: recorded in the kernel, not by the agent.
    let t = k.node.nft.as_ref();
    let want: Vec<IpAddr> = d.nft.pods.iter().map(|p| p.ip).collect();
    let have = t
        .map(|t| t.pods_v4())
        .unwrap_or_default()
        .into_iter()
        .map(IpAddr::V4);
    let have6 = t
        .map(|t| t.pods_v6())
        .unwrap_or_default()
        .into_iter()
        .map(IpAddr::V6);
    for ip in have.chain(have6) {
        if !want.contains(&ip) {
            let set = Fam::of(ip).pod_set();
            out.push(Drift {
                subject: elem_subject(set, &SetElem::Addr(ip)),
                kernel: format!("{ip} in inet {} {set}", consts::NODE_NFT_TABLE),
                desired: "not there (no enrolled pod has it)".into(),
                fix: AGENT_FIX.into(),
            });
        }
    }
    for c in nft::node_chains(d.nft.rules.as_ref()) {
        chain_drift(out, &c, k.node.nft.as_ref(), "inet", AGENT_FIX);
    }
    for c in nft::bridge_chains(d.nft.rules.as_ref()) {
        chain_drift(out, &c, k.node.nft_bridge.as_ref(), "bridge", AGENT_FIX);
    }
}

/// The iptables backend's drift: ipset members (named like the nft elements they stand for)
/// and our chains of both families with their jumps.
fn ipt_drift(out: &mut Vec<Drift>, d: &Desired, k: &Kernel) {
    let have = k.node.ipt.as_ref();
    let pods: Vec<_> = d.nft.pods.iter().cloned().collect();
    let mut wanted = std::collections::BTreeSet::new();
    for e in nft::pod_elements(&pods) {
        let Some((def, member)) = ipset::element(&e) else {
            continue;
        };
        wanted.insert((def.name.to_string(), member.clone()));
        if !have.is_some_and(|h| h.has(def.name, &member)) {
            out.push(Drift {
                subject: elem_subject(e.set_name(), &e.elem),
                kernel: "missing".into(),
                desired: format!("{member} in ipset {}", def.name),
                fix: AGENT_FIX.into(),
            });
        }
    }
    for (set, members) in have.map(|h| &h.sets).into_iter().flatten() {
        for m in members {
            if !wanted.contains(&(set.clone(), m.clone())) {
                out.push(Drift {
                    subject: format!("ipset {set} {m}"),
                    kernel: format!("{m} in ipset {set}"),
                    desired: "not there (no enrolled pod has it)".into(),
                    fix: AGENT_FIX.into(),
                });
            }
        }
    }
    for f in Fam::BOTH {
        // No ip6tables here: the agent skips IPv6 too.
        if f == Fam::V6 && have.is_some_and(|h| h.v6.is_none()) {
            continue;
        }
        for c in iptables::node_chains(d.nft.rules.as_ref(), f) {
            ipt_chain_drift(out, &c, have, f, "", AGENT_FIX);
        }
    }
}

fn ipt_chain_drift(
    out: &mut Vec<Drift>,
    c: &ChainRules,
    have: Option<&IptKernel>,
    f: Fam,
    prefix: &str,
    fix: &str,
) {
    let saved = have.and_then(|h| h.of(f));
    let rules = saved.and_then(|o| o.chain(c.table, c.name));
    let kernel = match rules {
        None => Some("missing".to_string()),
        Some(r) if !iptables::chain_current(c, Some(r)) => {
            Some(format!("{} rules, not the desired ones", r.len()))
        }
        Some(_) => None,
    };
    if let Some(kernel) = kernel {
        out.push(Drift {
            subject: ipt_chain_subject(prefix, f, c.table, c.name),
            kernel,
            desired: format!(
                "{} rules, fingerprint {:016x}",
                c.rules.len(),
                c.fingerprint()
            ),
            fix: fix.into(),
        });
    }
    if !iptables::jump_current(c, saved.and_then(|o| o.chain(c.table, c.hook))) {
        out.push(Drift {
            subject: ipt_chain_subject(prefix, f, c.table, c.hook),
            kernel: format!("its first rule does not jump to {}", c.name),
            desired: format!("-A {} {} first", c.hook, c.jump()),
            fix: fix.into(),
        });
    }
}

fn chain_drift(
    out: &mut Vec<Drift>,
    c: &ChainSpec,
    t: Option<&ObservedTable>,
    family: &str,
    fix: &str,
) {
    let have = t.and_then(|t| t.chains.get(c.name));
    let kernel = match have {
        None => "missing".to_string(),
        Some(h) if !h.same_base(c) => format!(
            "{} hook {} priority {}",
            h.chain_type.as_deref().unwrap_or("?"),
            h.hook.as_deref().unwrap_or("?"),
            h.prio.unwrap_or_default()
        ),
        Some(h) if !h.same_rules(c) => format!("{} rules, not the desired ones", h.rules.len()),
        Some(_) => return,
    };
    out.push(Drift {
        subject: format!("chain {family} {}", c.name),
        kernel,
        desired: format!(
            "{} rules, fingerprint {:016x}",
            c.rules.len(),
            c.fingerprint()
        ),
        fix: fix.into(),
    });
}

fn sysctl_drift(
    out: &mut Vec<Drift>,
    want: &[ambient_net::sysctl::Sysctl],
    prefix: &str,
    fix: &str,
) {
    for s in want {
        let have = ambient_net::sysctl::read(&s.key).ok().flatten();
        // A device that does not exist has no sysctl: its absence is someone else's drift.
        let Some(have) = have else { continue };
        if have.trim() != s.value {
            out.push(Drift {
                subject: format!("{prefix}sysctl {}", s.key),
                kernel: have.trim().to_string(),
                desired: s.value.clone(),
                fix: fix.into(),
            });
        }
    }
}

/// The drift of the ztunnel netns' sysctls, read inside it.
pub fn ztunnel_sysctl_drift(d: &Desired, k: &Kernel) -> Vec<Drift> {
    let (Some(want), Some(path)) = (&d.ztunnel, &k.ztunnel_netns) else {
        return Vec::new();
    };
    let want = want.sysctls.clone();
    ambient_net::netns::run_in(path, move || {
        let mut out = Vec::new();
        sysctl_drift(&mut out, &want, "ztunnel ", ZTUNNEL_FIX);
        out
    })
    .unwrap_or_default()
}
