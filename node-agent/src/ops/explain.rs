//! `ambient-agent explain --from <pod ip | ns/name | node> --to <ip:port>`: the path of one new
//! TCP connection through this node, hop by hop, from what the kernel holds now (SPEC §1–3):
//! is the source enrolled, which nft rule marks its packet with which mark, which ip rule and
//! table route it, which tunnel (VNI, port, remote) and where it lands in the ztunnel netns
//! (TPROXY rule, rule 20000, table 100, the listener); ztunnel's own decision from its admin
//! port (`/debug/route`); and for each step the drift from the agent's desired state.
//!
//! The walk is a model of the kernel's evaluation for the first packet of the connection (no
//! connmark yet), made from the observed rules, routes and packet-filter rule comments: the
//! rule that decides is named by its comment as the kernel holds it. Either family (the v6
//! sets, `ip -6 rule`, the v6 routes of the same tables, `table ip6 ztunnel`), and either
//! backend (the nft tables, or the iptables chains and ipsets). `--trace` checks the model
//! against the kernel's own account ([`super::probe`]). For a connection arriving at a pod of
//! this node, ztunnel's inbound decision comes from `/debug/inbound`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use ambient_net::consts::{self, mark, port, zt_mark};
use ambient_net::firewall::FirewallKind;
use ambient_net::iptables::{self, Fam};
use ambient_net::model::RouteKind;
use ambient_net::nft::{chain, RuleTag, SetElem};
use serde::Serialize;
use serde_json::Value;

use super::desired::Desired;
use super::drift::{self, elem_subject, ipt_chain_subject, Drift};
use super::kernel::{self, route_text, rule_text, Kernel, Lookup, NsKernel, TABLE_LOCAL};
use super::probe::{self, Trace};
use super::{http_get, OpsError};
use crate::store::PodRecord;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The source: a pod IP, an enrolled pod's `namespace/name`, or `node` (host sockets).
    #[arg(long)]
    pub from: String,
    /// The destination, `<ip>:<port>` or `[<ipv6>]:<port>`.
    #[arg(long)]
    pub to: SocketAddr,
    /// For a connection to a pod's 15008 (HBONE from another node): the CONNECT's target
    /// inside the tunnel, for ztunnel's inbound decision.
    #[arg(long)]
    pub authority: Option<SocketAddr>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Also send one real probe connection from the source's netns with nftrace set and show
    /// the rules it really hit (nf_tables trace events over netlink).
    #[arg(long)]
    pub trace: bool,
    /// The source pod's netns for --trace, when the agent does not know the pod (a pod outside
    /// the mesh).
    #[arg(long)]
    pub source_netns: Option<PathBuf>,
    /// With --trace: send no probe; trace this connection's packets arriving at this node
    /// (another node's probe, through the underlay and the tunnel into the ztunnel netns) for
    /// up to this many seconds. `tracing` is written to stderr once the trace is set.
    #[arg(long, requires = "trace", value_parser = clap::value_parser!(u64).range(1..=60))]
    pub trace_wait: Option<u64>,
    /// The agent's state directory.
    #[arg(long, default_value = "/var/run/ambient/state")]
    pub state_dir: PathBuf,
}

/// Who opens the connection.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    pub ip: IpAddr,
    /// `ambient pod`, `ztunnel`, `node`, `not enrolled here`.
    pub kind: &'static str,
    /// `namespace/name` when the agent knows it.
    pub pod: Option<String>,
    #[serde(skip)]
    record: Option<PodRecord>,
}

/// One hop of the path.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `node` or `ztunnel`.
    pub netns: &'static str,
    pub hop: &'static str,
    pub what: String,
    /// The packet mark after this step, when the step sets or reads one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark: Option<u32>,
    /// False when this step breaks the path (a missing device, nothing listening, a drop).
    pub ok: bool,
    pub drift: Vec<Drift>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub from: Source,
    pub to: SocketAddr,
    /// `nftables` or `iptables`: the backend whose rules the steps name.
    pub firewall: FirewallKind,
    /// One line: where the connection goes on this node.
    pub verdict: String,
    pub steps: Vec<Step>,
    /// ztunnel's answer when the path reaches one of its listeners: `/debug/route` for
    /// 15001, `/debug/inbound` for 15008 and 15006.
    pub ztunnel: Option<Value>,
    /// Drift elsewhere on the node (not on this path): `doctor` lists it.
    pub other_drift: usize,
    pub trace: Option<Trace>,
}

struct Walk<'a> {
    d: &'a Desired,
    k: &'a Kernel,
    drift: Vec<Drift>,
    used: Vec<String>,
    steps: Vec<Step>,
}

impl Walk<'_> {
    fn step(
        &mut self,
        netns: &'static str,
        hop: &'static str,
        what: String,
        mark: Option<u32>,
        ok: bool,
        subjects: &[String],
    ) {
        let drift: Vec<Drift> = self
            .drift
            .iter()
            .filter(|x| subjects.contains(&x.subject))
            .cloned()
            .collect();
        self.used.extend(subjects.iter().cloned());
        self.steps.push(Step {
            netns,
            hop,
            what,
            mark,
            ok,
            drift,
        });
    }
}

/// Runs the command; the exit status is 0 unless the explanation could not be made.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let e = explain(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", render(&e));
    }
    Ok(())
}

pub async fn explain(args: &Args) -> Result<Explanation, OpsError> {
    let (d, k) = super::desired_and_kernel(&args.state_dir).await?;
    let zt_netns = d.ztunnel_netns();
    let mut all = drift::compare(&d, &k);
    all.extend(drift::ztunnel_sysctl_drift(&d, &k));
    let src = resolve(&d, &k, &args.from, args.to)?;
    if src.ip.is_ipv4() != args.to.is_ipv4() {
        return Err(OpsError::Usage(format!(
            "--from {} and --to {} are of different families",
            src.ip, args.to
        )));
    }
    let mut w = Walk {
        d: &d,
        k: &k,
        drift: all,
        used: Vec::new(),
        steps: Vec::new(),
    };
    let (verdict, listener) = walk(&mut w, &src, args.to);
    let ztunnel = match (listener, &zt_netns) {
        (Some(port::OUTBOUND), Some(ns)) => Some(ask_ztunnel(
            ns,
            &format!("/debug/route?src={}&dst={}", src.ip, enc(args.to)),
        )),
        (Some(_), Some(ns)) => {
            let mut q = format!("/debug/inbound?src={}&dst={}", src.ip, enc(args.to));
            if let Some(a) = args.authority {
                q += &format!("&authority={}", enc(a));
            }
            Some(ask_ztunnel(ns, &q))
        }
        _ => None,
    };
    let other_drift = w
        .drift
        .iter()
        .filter(|x| !w.used.contains(&x.subject))
        .count();
    let trace = if args.trace {
        let base = probe::Probe {
            source_netns: None,
            src: src.ip,
            dst: args.to,
            ztunnel_netns: zt_netns.clone(),
            node: &k.node,
            ztunnel: k.ztunnel.as_ref(),
        };
        if let Some(secs) = args.trace_wait {
            Some(probe::arriving(
                &base,
                std::time::Duration::from_secs(secs),
            )?)
        } else {
            let netns = match (&args.source_netns, &src.record, src.kind) {
                (Some(p), _, _) => Some(p.clone()),
                (None, Some(r), _) => Some(PathBuf::from(&r.netns)),
                (None, None, "ztunnel") => zt_netns.clone(),
                (None, None, "node") => None,
                _ => {
                    return Err(OpsError::Usage(format!(
                        "--trace: the agent does not know {}'s netns; give --source-netns",
                        src.ip
                    )))
                }
            };
            Some(probe::run(&probe::Probe {
                source_netns: netns,
                ..base
            })?)
        }
    } else {
        None
    };
    let steps = std::mem::take(&mut w.steps);
    Ok(Explanation {
        from: src,
        to: args.to,
        firewall: k.firewall,
        verdict,
        steps,
        ztunnel,
        other_drift,
        trace,
    })
}

/// An address for a query string: brackets and colons percent-encoded.
fn enc(a: SocketAddr) -> String {
    a.to_string()
        .replace('[', "%5B")
        .replace(']', "%5D")
        .replace(':', "%3A")
}

fn resolve(d: &Desired, k: &Kernel, from: &str, to: SocketAddr) -> Result<Source, OpsError> {
    let named = |ip, kind, pod: Option<&PodRecord>| Source {
        ip,
        kind,
        pod: pod.map(|p| format!("{}/{}", p.namespace, p.name)),
        record: pod.cloned(),
    };
    let any: IpAddr = if to.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    if from == "node" {
        // Host sockets: the source address is chosen by the route (see the output steps).
        return Ok(named(any, "node", None));
    }
    let ztunnel_name = || {
        d.state
            .ztunnel
            .as_ref()
            .map(|z| format!("{}/{}", z.namespace, z.name))
    };
    if let Ok(ip) = from.parse::<IpAddr>() {
        if let Some(p) = d.pod_by_ip(ip) {
            return Ok(named(ip, "ambient pod", Some(p)));
        }
        if d.is_ztunnel_ip(ip) {
            return Ok(Source {
                pod: ztunnel_name(),
                ..named(ip, "ztunnel", None)
            });
        }
        if k.node
            .route_in(TABLE_LOCAL, ip)
            .is_some_and(|(k, _)| k.kind == RouteKind::Local)
        {
            return Ok(named(ip, "node", None));
        }
        return Ok(named(ip, "not enrolled here", None));
    }
    let Some((ns, name)) = from.split_once('/') else {
        return Err(OpsError::Usage(format!(
            "--from {from:?}: want a pod IP, namespace/name or node"
        )));
    };
    // A pod by name: its address of the destination's family.
    let of_family = |ips: &[IpAddr]| ips.iter().copied().find(|a| a.is_ipv4() == to.is_ipv4());
    if let Some(p) = d.pod_by_name(ns, name) {
        let ip = of_family(&p.ips)
            .ok_or_else(|| OpsError::Usage(format!("{from} has no address of {to}'s family")))?;
        return Ok(named(ip, "ambient pod", Some(p)));
    }
    if let Some(z) = d
        .state
        .ztunnel
        .as_ref()
        .filter(|z| z.namespace == ns && z.name == name)
    {
        let ips = z.endpoint.ips();
        let all: Vec<IpAddr> = ips
            .v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(ips.v6.map(IpAddr::V6))
            .collect();
        return Ok(Source {
            pod: Some(from.to_string()),
            ..named(of_family(&all).unwrap_or(any), "ztunnel", None)
        });
    }
    Err(OpsError::Usage(format!(
        "{from} is not a pod the agent enrolled on this node; give its IP"
    )))
}

/// Where a rule of the path lives, in either backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// The node's prerouting marks.
    Prerouting,
    /// The node's NAT bypass for captured connections.
    NatPrerouting,
    /// The node's output marks (host sockets).
    Output,
    /// The ztunnel netns' TPROXY rules.
    Ztunnel,
    /// The ztunnel netns' per-source SYN limit (before conntrack).
    ZtunnelSynLimit,
}

/// What the walk needs to know of the packet's family and the node's backend.
#[derive(Debug, Clone, Copy)]
struct Filter {
    fw: FirewallKind,
    fam: Fam,
}

impl Filter {
    /// The step naming the packet filter's marking rule.
    fn hop(&self) -> &'static str {
        match self.fw {
            FirewallKind::Nftables => "nft",
            FirewallKind::Iptables => "iptables",
        }
    }

    fn v6(&self) -> bool {
        self.fam == Fam::V6
    }

    /// The host prefix length of the family (route subjects name `<ip>/32`, `<ip>/128`).
    fn host_len(&self) -> u8 {
        if self.v6() {
            128
        } else {
            32
        }
    }

    /// The rule of `hook` whose comment contains `text` (nft) or `ipt_text` (iptables), as
    /// one line naming its table, chain and position.
    fn rule_line(&self, k: &NsKernel, hook: Hook, text: &str, ipt_text: &str) -> Option<String> {
        match self.fw {
            FirewallKind::Nftables => {
                let node = format!("inet {}", consts::NODE_NFT_TABLE);
                let (table, chain) = match hook {
                    Hook::Prerouting => (node, chain::PREROUTING),
                    Hook::NatPrerouting => (node, chain::NAT_PREROUTING),
                    Hook::Output => (node, chain::OUTPUT),
                    Hook::Ztunnel | Hook::ZtunnelSynLimit => (
                        format!(
                            "{} {}",
                            if self.v6() { "ip6" } else { "ip" },
                            consts::ZTUNNEL_NFT_TABLE
                        ),
                        if hook == Hook::Ztunnel {
                            chain::PREROUTING
                        } else {
                            chain::SYN_LIMIT
                        },
                    ),
                };
                let zt = matches!(hook, Hook::Ztunnel | Hook::ZtunnelSynLimit);
                k.nft_rule(self.v6() && zt, self.v6(), chain, text)
                    .map(|(i, r, n)| {
                        format!(
                            "{table} {chain} rule {i}/{n} (handle {}) \"{}\"",
                            r.handle.unwrap_or_default(),
                            text_of(r.comment.as_deref().unwrap_or_default())
                        )
                    })
            }
            FirewallKind::Iptables => {
                let (table, chain) = self.ipt_chain(hook);
                k.ipt_rule(self.fam, table, chain, ipt_text)
                    .map(|(i, r, n)| {
                        format!(
                            "{} -t {table} {chain} rule {i}/{n} \"{}\"",
                            self.tool(),
                            text_of(&kernel::ipt_comment(r).unwrap_or_default())
                        )
                    })
            }
        }
    }

    fn tool(&self) -> &'static str {
        match self.fam {
            Fam::V4 => "iptables",
            Fam::V6 => "ip6tables",
        }
    }

    fn ipt_chain(&self, hook: Hook) -> (&'static str, &'static str) {
        match hook {
            Hook::Prerouting | Hook::Ztunnel => ("mangle", iptables::chain::PREROUTING),
            Hook::ZtunnelSynLimit => ("raw", iptables::chain::SYN_LIMIT),
            Hook::NatPrerouting => ("nat", iptables::chain::NAT_PREROUTING),
            Hook::Output => ("mangle", iptables::chain::OUTPUT),
        }
    }

    /// The ztunnel netns's nft table of this family.
    fn zt_table<'k>(&self, k: &'k NsKernel) -> Option<&'k ambient_net::nft::ObservedTable> {
        if self.v6() && k.nft6.is_some() {
            k.nft6.as_ref()
        } else {
            k.nft.as_ref()
        }
    }

    /// The drift subjects of `hook`'s chain (with iptables also the built-in chain's jump).
    fn chain_subjects(&self, hook: Hook) -> Vec<String> {
        match self.fw {
            FirewallKind::Nftables => vec![match hook {
                Hook::Prerouting => format!("chain inet {}", chain::PREROUTING),
                Hook::NatPrerouting => format!("chain inet {}", chain::NAT_PREROUTING),
                Hook::Output => format!("chain inet {}", chain::OUTPUT),
                Hook::Ztunnel => format!(
                    "chain ztunnel {} {}",
                    if self.v6() { "ip6" } else { "ip" },
                    chain::PREROUTING
                ),
                Hook::ZtunnelSynLimit => format!(
                    "chain ztunnel {} {}",
                    if self.v6() { "ip6" } else { "ip" },
                    chain::SYN_LIMIT
                ),
            }],
            FirewallKind::Iptables => {
                let prefix = if matches!(hook, Hook::Ztunnel | Hook::ZtunnelSynLimit) {
                    "ztunnel "
                } else {
                    ""
                };
                let (table, chain) = self.ipt_chain(hook);
                let builtin = chain
                    .trim_start_matches("AMBIENT-NAT-")
                    .trim_start_matches("AMBIENT-");
                vec![
                    ipt_chain_subject(prefix, self.fam, table, chain),
                    ipt_chain_subject(prefix, self.fam, table, builtin),
                ]
            }
        }
    }

    /// Whether `ip` is in the enrolled set and `dev . ip` in the device set, and the step's
    /// text saying so.
    fn enrolled(&self, k: &NsKernel, ip: IpAddr, dev: &str) -> (bool, bool, String) {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        let (set, iif) = (self.fam.pod_set(), self.fam.iif_set());
        match self.fw {
            FirewallKind::Nftables => {
                let t = k.nft.as_ref();
                let in_set = t.is_some_and(|t| match ip {
                    IpAddr::V4(a) => t.pods_v4().contains(&a),
                    IpAddr::V6(a) => t.pods_v6().contains(&a),
                });
                let in_iif =
                    t.is_some_and(|t| t.set_dev_addrs(iif).contains(&(dev.to_string(), ip)));
                let text = format!(
                    "{ip} in @{set}: {}; \"{dev}\" . {ip} in @{iif}: {}",
                    yes(in_set),
                    yes(in_iif)
                );
                (in_set, in_iif, text)
            }
            FirewallKind::Iptables => {
                let h = k.ipt.as_ref();
                let in_set = h.is_some_and(|h| h.has(set, &ip.to_string()));
                let in_iif = h.is_some_and(|h| h.has(iif, &format!("{ip},{dev}")));
                let text = format!(
                    "{ip} in ipset {set}: {}; {ip},{dev} in ipset {iif}: {}",
                    yes(in_set),
                    yes(in_iif)
                );
                (in_set, in_iif, text)
            }
        }
    }

    /// The drift subject of a policy rule of this family.
    fn rule_subject(&self, prefix: &str, priority: u32) -> String {
        format!(
            "{prefix}rule {}{priority}",
            if self.v6() { "-6 " } else { "" }
        )
    }
}

/// The comment without its `[ambient i/n fingerprint]` tag.
pub(super) fn text_of(comment: &str) -> &str {
    match (RuleTag::parse(comment), comment.rfind(" [ambient ")) {
        (Some(_), Some(i)) => &comment[..i],
        _ => comment,
    }
}

fn mark_text(m: u32) -> String {
    format!("{m:#05x}")
}

fn sysctl(key: &str) -> Option<u32> {
    ambient_net::sysctl::read(key)
        .ok()
        .flatten()
        .and_then(|v| v.trim().parse().ok())
}

/// The path; returns the verdict and the ztunnel listener it ends at, if any.
fn walk(w: &mut Walk<'_>, src: &Source, to: SocketAddr) -> (String, Option<u16>) {
    let k = w.k;
    let dst = to.ip();
    let f = Filter {
        fw: k.firewall,
        fam: Fam::of(dst),
    };
    let pre_chain = f.chain_subjects(Hook::Prerouting);
    let mut mark = 0u32;
    let mut src_ip = src.ip;
    match src.kind {
        "ambient pod" => {
            let p = src
                .record
                .as_ref()
                .expect("an ambient source has its record");
            let dev = p.host_bridge.clone().unwrap_or_else(|| p.host_veth.clone());
            let link = k
                .node
                .links
                .iter()
                .find(|(_, n)| **n == p.host_veth)
                .map(|(i, _)| *i);
            w.step(
                "node",
                "source",
                format!(
                    "{} is {}/{}, enrolled by the agent; host veth {}{}",
                    src.ip,
                    p.namespace,
                    p.name,
                    p.host_veth,
                    match link {
                        Some(i) => format!(" (link #{i})"),
                        None => " MISSING from the node".into(),
                    }
                ),
                None,
                link.is_some(),
                &[],
            );
            let (in_set, in_iif, text) = f.enrolled(&k.node, src.ip, &dev);
            w.step(
                "node",
                "enrolled",
                text,
                None,
                in_set && in_iif,
                &[
                    elem_subject(f.fam.pod_set(), &SetElem::Addr(src.ip)),
                    elem_subject(f.fam.iif_set(), &SetElem::DevAddr(dev.clone(), src.ip)),
                ],
            );
            // rp_filter is IPv4's: IPv6 has no reverse-path sysctl to break the replies.
            if !f.v6() {
                let all_key = "net.ipv4.conf.all.rp_filter".to_string();
                let dev_key = format!("net.ipv4.conf.{}.rp_filter", p.host_veth);
                let (a, v) = (sysctl(&all_key), sysctl(&dev_key));
                let eff = a.max(v);
                w.step(
                    "node",
                    "rp_filter",
                    format!(
                        "conf.all {}, conf.{} {}: effective {}{}",
                        a.map_or("?".into(), |x| x.to_string()),
                        p.host_veth,
                        v.map_or("?".into(), |x| x.to_string()),
                        eff.map_or("?".into(), |x| x.to_string()),
                        if eff == Some(1) {
                            " (strict: replies the pod gets via ztunnel's spoofed sockets are dropped)"
                        } else {
                            ""
                        }
                    ),
                    None,
                    eff != Some(1),
                    &[format!("sysctl {all_key}"), format!("sysctl {dev_key}")],
                );
            }
            if in_iif {
                mark = mark::CAPTURE;
                let line = f.rule_line(
                    &k.node,
                    Hook::Prerouting,
                    "capture outbound",
                    "capture outbound",
                );
                if line.is_none() {
                    mark = 0;
                }
                w.step(
                    "node",
                    f.hop(),
                    match &line {
                        Some(l) => format!("{l}: mark {}", mark_text(mark)),
                        None => {
                            "the capture rule is MISSING: the packet is not marked, not captured"
                                .into()
                        }
                    },
                    Some(mark),
                    line.is_some(),
                    &pre_chain,
                );
            } else if in_set {
                let line = f.rule_line(&k.node, Hook::Prerouting, "spoofed, drop", "spoofed, drop");
                w.step(
                    "node",
                    f.hop(),
                    format!(
                        "{}: DROPPED (its address is enrolled but not from this device)",
                        line.unwrap_or_default()
                    ),
                    None,
                    false,
                    &pre_chain,
                );
                return ("dropped as spoofed on this node".into(), None);
            } else {
                w.step(
                    "node",
                    f.hop(),
                    "no rule of the prerouting chain marks it: NOT captured".into(),
                    Some(0),
                    false,
                    &pre_chain,
                );
            }
            if mark == mark::CAPTURE {
                let line = f.rule_line(
                    &k.node,
                    Hook::NatPrerouting,
                    "identity DNAT",
                    "accept before kube-proxy's NAT",
                );
                if let Some(line) = line {
                    w.step(
                        "node",
                        "nat",
                        format!("{line}: the destination stays {dst} (a later DNAT, kube-proxy's, is skipped; ztunnel picks the endpoint)"),
                        Some(mark),
                        true,
                        &f.chain_subjects(Hook::NatPrerouting),
                    );
                }
            }
        }
        "ztunnel" => {
            let veth =
                w.d.state
                    .ztunnel
                    .as_ref()
                    .map(|z| z.endpoint.host_veth.clone())
                    .unwrap_or_default();
            w.step(
                "node",
                "source",
                format!(
                    "{} is the ztunnel pod {} itself, host veth {veth}",
                    src.ip,
                    src.pod.clone().unwrap_or_default()
                ),
                None,
                true,
                &[],
            );
            mark = mark::OWN;
            let line = f.rule_line(
                &k.node,
                Hook::Prerouting,
                "from ztunnel itself",
                "from ztunnel itself",
            );
            w.step(
                "node",
                f.hop(),
                format!(
                    "{}: mark {} (its own connections are never captured again)",
                    line.clone().unwrap_or_else(|| "the rule is MISSING".into()),
                    mark_text(mark)
                ),
                Some(mark),
                line.is_some(),
                &pre_chain,
            );
        }
        "node" => {
            // A host socket: the first lookup (no mark) picks the route and so the source.
            let first = k.node.lookup(0, dst);
            let chosen = first
                .route
                .as_ref()
                .and_then(|(_, v)| v.src)
                .filter(|s| s.is_ipv4() == dst.is_ipv4());
            if src_ip.is_unspecified() {
                src_ip = chosen.unwrap_or(src_ip);
            }
            w.step(
                "node",
                "source",
                format!(
                    "the node itself (host sockets); the first lookup {}, so the source is {}",
                    lookup_text(&first),
                    if src_ip.is_unspecified() {
                        "the device's address".to_string()
                    } else {
                        src_ip.to_string()
                    }
                ),
                None,
                true,
                &lookup_subjects(&first, ""),
            );
            let gw_rule = match f.fw {
                FirewallKind::Nftables => k
                    .node
                    .nft
                    .as_ref()
                    .and_then(|t| t.chains.get(chain::OUTPUT))
                    .is_some_and(|c| !c.rules.is_empty()),
                FirewallKind::Iptables => f
                    .rule_line(&k.node, Hook::Output, "", "node gateway address")
                    .is_some(),
            };
            let is_gw =
                w.d.nft
                    .rules
                    .as_ref()
                    .is_some_and(|r| r.node_gateways.contains(&src_ip));
            if gw_rule && is_gw {
                mark = mark::OWN;
                let line = f
                    .rule_line(
                        &k.node,
                        Hook::Output,
                        "node gateway address",
                        "node gateway address",
                    )
                    .unwrap_or_default();
                w.step(
                    "node",
                    f.hop(),
                    format!(
                        "{line}: mark {} (node → pod, e.g. kubelet probes, is not captured)",
                        mark_text(mark)
                    ),
                    Some(mark),
                    true,
                    &f.chain_subjects(Hook::Output),
                );
            } else {
                w.step(
                    "node",
                    f.hop(),
                    format!("no output rule marks a packet from {src_ip}"),
                    Some(0),
                    true,
                    &f.chain_subjects(Hook::Output),
                );
            }
        }
        _ => {
            let via = k.node.lookup(0, src.ip);
            let from = match &via.route {
                Some((_, v)) if via.table == kernel::TABLE_MAIN => {
                    format!("reached via {} (main table)", v.dev)
                }
                _ => "no route back to it".into(),
            };
            w.step(
                "node",
                "source",
                format!(
                    "{} is not a pod the agent enrolled on this node ({from})",
                    src.ip
                ),
                None,
                true,
                &[],
            );
            w.step(
                "node",
                f.hop(),
                "no rule of the prerouting chain marks a new connection from it".into(),
                Some(0),
                true,
                &pre_chain,
            );
        }
    }
    // Policy routing with the mark.
    let l = k.node.lookup(mark, dst);
    w.step(
        "node",
        "ip rule",
        match &l.rule {
            Some(r) => rule_text(r),
            None => format!(
                "no rule of the agent's applies: the kernel's {} table",
                if l.table == TABLE_LOCAL {
                    "local"
                } else {
                    "main"
                }
            ),
        },
        Some(mark),
        true,
        &consts::rule::ALL.map(|p| f.rule_subject("", p)),
    );
    // A missing or wrong route of the agent's for this destination sends it elsewhere: that
    // drift belongs to this step whichever table the walk ended in.
    let mut route_subjects = lookup_subjects(&l, "");
    route_subjects
        .extend(consts::table::ALL.map(|t| format!("route table {t} {dst}/{}", f.host_len())));
    let Some((rk, rv)) = l.route.clone() else {
        w.step(
            "node",
            "route",
            format!("table {}: no route to {dst}: unreachable", l.table),
            None,
            false,
            &route_subjects,
        );
        return (format!("no route to {dst} on this node"), None);
    };
    w.step(
        "node",
        "route",
        format!("table {}: {}", l.table, route_text(&rk, &rv)),
        None,
        true,
        &route_subjects,
    );
    let tunnel = [consts::ISTIOOUT, consts::ISTIOIN]
        .into_iter()
        .find(|t| t.name == rv.dev);
    let Some(end) = tunnel else {
        let verdict = if rk.kind == RouteKind::Local {
            format!("delivered to the node itself ({dst})")
        } else {
            format!("not captured: leaves by {} to {dst} directly", rv.dev)
        };
        return (verdict, None);
    };
    // Into a tunnel: the device, then the encapsulated packet's own route (the underlay's
    // family, which may differ from the packet's: v6 pods over a v4 underlay).
    let have = k.node.tunnels.get(end.name).cloned().flatten();
    let remote = have.as_ref().and_then(|h| h.remote);
    w.step(
        "node",
        "tunnel",
        match &have {
            Some(h) => format!(
                "{} {}{}",
                end.name,
                drift::tunnel_have(h),
                rv.gateway
                    .map(|g| format!(
                        "; the {} inner hop {g} is ztunnel's end",
                        if f.v6() { "IPv6" } else { "IPv4" }
                    ))
                    .unwrap_or_default()
            ),
            None => format!("{} is MISSING", end.name),
        },
        Some(mark),
        have.is_some(),
        &[format!("tunnel {}", end.name)],
    );
    if let Some(r) = remote {
        let ul = k.node.lookup(mark, r);
        // The encapsulated packet must leave by the ztunnel's veth, not by a tunnel again.
        let circular = ul.route.as_ref().is_some_and(|(_, v)| {
            [consts::ISTIOIN.name, consts::ISTIOOUT.name].contains(&v.dev.as_str())
        });
        w.step(
            "node",
            "underlay",
            format!(
                "the encapsulated packet to {} keeps mark {}: {}{}",
                SocketAddr::new(r, have.as_ref().and_then(|h| h.port).unwrap_or_default()),
                mark_text(mark),
                lookup_text(&ul),
                if circular {
                    " (back into a tunnel: circular route, dropped)"
                } else {
                    ""
                }
            ),
            Some(mark),
            ul.route.is_some() && !circular,
            &lookup_subjects(&ul, ""),
        );
    }
    // In the ztunnel netns.
    let Some(zk) = k.ztunnel.as_ref() else {
        w.step(
            "ztunnel",
            "netns",
            "the ztunnel netns is not known or gone".into(),
            None,
            false,
            &["ztunnel netns".into()],
        );
        return ("captured, but there is no ztunnel netns".into(), None);
    };
    let (peer, listener, text) = if end.name == consts::ISTIOOUT.name {
        (consts::PISTIOOUT, port::OUTBOUND, "outbound: tproxy 15001")
    } else if to.port() == port::INBOUND_HBONE {
        (
            consts::PISTIOIN,
            port::INBOUND_HBONE,
            "inbound HBONE: tproxy 15008",
        )
    } else {
        (
            consts::PISTIOIN,
            port::INBOUND_PLAINTEXT,
            "inbound plaintext: tproxy 15006",
        )
    };
    let zhave = zk.tunnels.get(peer.name).cloned().flatten();
    w.step(
        "ztunnel",
        "tunnel",
        match &zhave {
            Some(h) => format!("arrives on {} {}", peer.name, drift::tunnel_have(h)),
            None => format!("{} is MISSING", peer.name),
        },
        None,
        zhave.is_some(),
        &[format!("ztunnel tunnel {}", peer.name)],
    );
    // ztunnel-init's backend, which may not be the agent's.
    let fz = Filter {
        fw: k.zt_firewall,
        ..f
    };
    // Before conntrack and TPROXY: a source over its rate of new connections loses its SYNs.
    let limit_text = consts::syn_limit::TEXT;
    let limit = fz.rule_line(zk, Hook::ZtunnelSynLimit, limit_text, limit_text);
    let dropped = (fz.fw == FirewallKind::Nftables)
        .then(|| Some(fz.zt_table(zk)?.chains.get(chain::SYN_LIMIT)?.packets()))
        .flatten();
    w.step(
        "ztunnel",
        "syn limit",
        match (&limit, dropped) {
            (Some(l), Some(n)) => format!("{l}: {n} SYNs dropped so far (all sources)"),
            (Some(l), None) => l.clone(),
            (None, _) => "no per-source limit on new connections \
                          (ztunnel-init --new-connections-per-source=0)"
                .into(),
        },
        None,
        true,
        &[],
    );
    let line = fz.rule_line(zk, Hook::Ztunnel, text, text);
    let lo: IpAddr = if f.v6() {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    w.step(
        "ztunnel",
        "tproxy",
        format!(
            "{}: to {}, mark {}/{:#x}",
            line.clone()
                .unwrap_or_else(|| format!("the TPROXY rule \"{text}\" is MISSING")),
            SocketAddr::new(lo, listener),
            mark_text(zt_mark::TPROXY),
            zt_mark::MASK
        ),
        Some(zt_mark::TPROXY),
        line.is_some(),
        &fz.chain_subjects(Hook::Ztunnel),
    );
    let zl = zk.lookup(zt_mark::TPROXY, dst);
    w.step(
        "ztunnel",
        "ip rule",
        lookup_text(&zl),
        Some(zt_mark::TPROXY),
        zl.route
            .as_ref()
            .is_some_and(|(k, _)| k.kind == RouteKind::Local),
        &lookup_subjects(&zl, "ztunnel "),
    );
    let listening = k
        .ztunnel_netns
        .as_ref()
        .and_then(|p| ambient_net::netns::run_in(p, kernel::listening_ports).ok())
        .and_then(Result::ok)
        .unwrap_or_default();
    // A v4 TPROXY needs a v4 (or dual-stack ::) socket, a v6 one a v6 socket.
    let up = listening.iter().any(|(a, p)| {
        *p == listener && (a.is_loopback() || a.is_unspecified()) && (a.is_ipv6() || !f.v6())
    });
    w.step(
        "ztunnel",
        "listener",
        if up {
            format!("ztunnel listens on {listener}")
        } else {
            format!(
                "nothing listens on {listener}: the connection is refused (is ztunnel running?)"
            )
        },
        None,
        up,
        &[],
    );
    let what = match listener {
        port::OUTBOUND => "captured outbound: ztunnel's 15001",
        port::INBOUND_HBONE => "captured inbound HBONE: ztunnel's 15008",
        _ => "captured inbound plaintext: ztunnel's 15006",
    };
    (what.to_string(), Some(listener))
}

fn lookup_text(l: &Lookup) -> String {
    let rule = match &l.rule {
        Some(r) => format!("rule {}", rule_text(r)),
        None if l.table == TABLE_LOCAL => "the local table".into(),
        None => "the main table".into(),
    };
    match &l.route {
        Some((k, v)) => format!("{rule} → table {}: {}", l.table, route_text(k, v)),
        None => format!("{rule} → no route"),
    }
}

fn lookup_subjects(l: &Lookup, prefix: &str) -> Vec<String> {
    let mut s: Vec<String> = l
        .rule
        .iter()
        .map(|r| drift::rule_subject(prefix, r))
        .collect();
    if let Some((k, _)) = &l.route {
        s.push(format!(
            "{prefix}route table {} {}/{}",
            k.table, k.dst, k.prefix_len
        ));
    }
    s
}

/// `GET path` on ztunnel's admin port: its JSON, or `{"error": …}`.
fn ask_ztunnel(netns: &std::path::Path, path: &str) -> Value {
    match http_get(netns, port::ADMIN, path) {
        Ok((200, body)) => serde_json::from_str(&body)
            .unwrap_or_else(|e| serde_json::json!({"error": format!("not JSON: {e}")})),
        Ok((code, body)) => serde_json::json!({"error": format!("HTTP {code}: {}", body.trim())}),
        Err(e) => serde_json::json!({"error": e.to_string()}),
    }
}

/// One line of ztunnel's inbound decision (`/debug/inbound`).
fn inbound_summary(v: &Value) -> String {
    let mut s = format!(
        "decision {}, inbound {} on {}",
        v["decision"].as_str().unwrap_or("?"),
        if v["listener"] == port::INBOUND_HBONE {
            "HBONE"
        } else {
            "plaintext"
        },
        v["listener"]
    );
    if let Some(a) = v["authority"].as_str() {
        s += &format!(" CONNECT {a}");
    }
    if let (Some(ns), Some(n)) = (
        v["destination"]["namespace"].as_str(),
        v["destination"]["name"].as_str(),
    ) {
        s += &format!(" to {ns}/{n}");
    }
    if let Some(id) = v["servedIdentity"].as_str() {
        s += &format!(", presents {id}");
    }
    match v["expectedPeerIdentity"].as_str() {
        Some(id) => s += &format!(", expects peer {id}"),
        None if v["servedIdentity"].is_string() => s += ", any mesh peer identity",
        None => s += ", no peer identity (plaintext)",
    }
    let pols: Vec<String> = v["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} {}{}",
                p["action"].as_str().unwrap_or("?"),
                p["policy"].as_str().unwrap_or("?"),
                if p["matches"] == true {
                    " (matches)"
                } else {
                    ""
                }
            )
        })
        .collect();
    if !pols.is_empty() {
        s += &format!(", policies {}", pols.join(", "));
    }
    if let Some(reason) = v["reason"].as_str() {
        s += &format!(" ({reason})");
    }
    s
}

/// One line of ztunnel's decision.
pub fn ztunnel_summary(v: &Value) -> String {
    if let Some(e) = v["error"].as_str() {
        return format!("ztunnel's admin port did not answer: {e}");
    }
    if v["direction"] == "inbound" {
        return inbound_summary(v);
    }
    let mut s = format!("decision {}", v["decision"].as_str().unwrap_or("?"));
    let r = &v["route"];
    if let Some(kind) = r["kind"].as_str() {
        s += &format!(", route {kind}");
    }
    for (key, name) in [
        ("tunnel", "tunnel"),
        ("authority", "authority"),
        ("target", "target"),
    ] {
        if let Some(x) = r[key].as_str() {
            s += &format!(" {name} {x}");
        }
    }
    if let Some(ids) = r["expectedIdentities"].as_array() {
        let ids: Vec<&str> = ids.iter().filter_map(Value::as_str).collect();
        if !ids.is_empty() {
            s += &format!(", expects {}", ids.join(" or "));
        }
    }
    if let Some(eps) = v["service"]["endpoints"].as_array() {
        let e: Vec<String> = eps
            .iter()
            .map(|e| {
                format!(
                    "{} {:.0}%",
                    e["target"].as_str().unwrap_or("?"),
                    e["share"].as_f64().unwrap_or(0.0) * 100.0
                )
            })
            .collect();
        s += &format!(
            ", service {} endpoints {}",
            v["service"]["key"].as_str().unwrap_or("?"),
            e.join(", ")
        );
    }
    if let Some(wp) = r["waypoint"]["name"].as_str() {
        s += &format!(
            ", waypoint {}/{wp}",
            r["waypoint"]["namespace"].as_str().unwrap_or("")
        );
    }
    if let Some(reason) = v["reason"].as_str() {
        s += &format!(" ({reason})");
    }
    s
}

/// The human form.
pub fn render(e: &Explanation) -> String {
    let from = match (&e.from.pod, e.from.kind) {
        (_, "node") if e.from.ip.is_unspecified() => "the node".to_string(),
        (Some(p), k) => format!("{} ({p}, {k})", e.from.ip),
        (None, k) => format!("{} ({k})", e.from.ip),
    };
    let mut s = format!("explain {from} → {} (from the kernel now)\n", e.to);
    let mut n = 0;
    let mut drift = 0;
    for st in &e.steps {
        n += 1;
        s += &format!(
            "{n:>3}  {:<8} {:<10} {}{}\n",
            st.netns,
            st.hop,
            st.what,
            if st.ok { "" } else { "   <-- BROKEN" }
        );
        for d in &st.drift {
            drift += 1;
            s += &format!(
                "       DRIFT {}: kernel: {}; the agent wants: {}; {}\n",
                d.subject, d.kernel, d.desired, d.fix
            );
        }
    }
    if let Some(z) = &e.ztunnel {
        n += 1;
        s += &format!(
            "{n:>3}  {:<8} {:<10} {}\n",
            "ztunnel",
            "decision",
            ztunnel_summary(z)
        );
    }
    s += &format!("path: {}\n", e.verdict);
    s += &match (drift, e.other_drift) {
        (0, 0) => "drift: none\n".to_string(),
        (0, o) => {
            format!("drift: none on this path ({o} elsewhere on the node: ambient-agent doctor)\n")
        }
        (d, o) => format!("drift: {d} on this path, {o} elsewhere\n"),
    };
    if let Some(t) = &e.trace {
        s += &probe::render(t, &e.steps);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_lose_their_tag() {
        assert_eq!(
            text_of("UDP is not captured [ambient 9/10 fc23db03cae024cb]"),
            "UDP is not captured"
        );
        assert_eq!(text_of("someone else's"), "someone else's");
    }

    #[test]
    fn ztunnel_answers_in_one_line() {
        let v = serde_json::json!({
            "decision": "allowed",
            "route": {"kind": "hbone", "tunnel": "10.244.2.3:15008", "authority": "10.244.2.3:9080",
                      "expectedIdentities": ["spiffe://cluster.local/ns/demo/sa/app"]},
        });
        assert_eq!(
            ztunnel_summary(&v),
            "decision allowed, route hbone tunnel 10.244.2.3:15008 authority 10.244.2.3:9080, expects spiffe://cluster.local/ns/demo/sa/app"
        );
        assert!(ztunnel_summary(&serde_json::json!({"error": "refused"})).contains("refused"));
    }

    #[test]
    fn the_inbound_decision_in_one_line() {
        let v = serde_json::json!({
            "direction": "inbound", "listener": 15008, "decision": "allowed",
            "authority": "10.244.2.3:9080", "destination": {"namespace": "demo", "name": "app-b"},
            "servedIdentity": "spiffe://cluster.local/ns/demo/sa/app",
            "expectedPeerIdentity": "spiffe://cluster.local/ns/demo/sa/client",
            "policies": [{"policy": "demo/deny-x", "action": "Deny", "matches": false}],
        });
        assert_eq!(
            ztunnel_summary(&v),
            "decision allowed, inbound HBONE on 15008 CONNECT 10.244.2.3:9080 to demo/app-b, presents spiffe://cluster.local/ns/demo/sa/app, expects peer spiffe://cluster.local/ns/demo/sa/client, policies Deny demo/deny-x"
        );
        let v = serde_json::json!({"direction": "inbound", "listener": 15006, "decision": "denied", "reason": "x"});
        assert_eq!(
            ztunnel_summary(&v),
            "decision denied, inbound plaintext on 15006, no peer identity (plaintext) (x)"
        );
    }

    #[test]
    fn query_addresses_are_encoded() {
        assert_eq!(
            enc("[fd00::1]:80".parse().unwrap()),
            "%5Bfd00%3A%3A1%5D%3A80"
        );
        assert_eq!(enc("10.0.0.1:80".parse().unwrap()), "10.0.0.1%3A80");
    }
}
