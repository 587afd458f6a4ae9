//! Drift: every place where the kernel differs from the agent's desired state, each with what
//! will repair it. The node's objects are the agent's (its next reconcile, at start and every
//! `--resync` seconds, converges them in place); the ztunnel netns' are ztunnel-init's, which
//! runs when the ztunnel pod starts.

use std::net::IpAddr;

use ambient_net::consts::{self, table};
use ambient_net::model::{self, TunnelAction, TunnelSpec};
use ambient_net::nft::{self, ChainSpec, ObservedTable, SetElem, ZtunnelRules};
use serde::Serialize;

use super::desired::Desired;
use super::kernel::{route_text, rule_text, Kernel, NsKernel};

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

/// Every drift of the node and the ztunnel netns.
pub fn compare(d: &Desired, k: &Kernel) -> Vec<Drift> {
    let mut out = Vec::new();
    ns_drift(&mut out, &d.net, &k.node, &table::ALL, AGENT_FIX, "");
    nft_drift(&mut out, d, k);
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
                };
                for c in nft::ztunnel_chains(&rules) {
                    chain_drift(&mut out, &c, zk.nft.as_ref(), "ztunnel ip", ZTUNNEL_FIX);
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
            subject: format!("{prefix}rule {}", r.priority),
            kernel: "missing".into(),
            desired: rule_text(&r),
            fix: fix.into(),
        });
    }
    for r in del {
        out.push(Drift {
            subject: format!("{prefix}rule {}", r.priority),
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
    let want_v4 = d.nft.pods_v4();
    for ip in k.node.nft.as_ref().map(|t| t.pods_v4()).unwrap_or_default() {
        if !want_v4.contains(&ip) {
            out.push(Drift {
                subject: elem_subject(consts::POD_SET, &SetElem::Addr(IpAddr::V4(ip))),
                kernel: format!(
                    "{ip} in inet {} {}",
                    consts::NODE_NFT_TABLE,
                    consts::POD_SET
                ),
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
