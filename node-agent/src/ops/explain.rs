//! `ambient-agent explain --from <pod ip | ns/name | node> --to <ip:port>`: the path of one new
//! TCP connection through this node, hop by hop, from what the kernel holds now (SPEC §1–3):
//! is the source enrolled, which nft rule marks its packet with which mark, which ip rule and
//! table route it, which tunnel (VNI, port, remote) and where it lands in the ztunnel netns
//! (TPROXY rule, rule 20000, table 100, the listener); ztunnel's own decision from its admin
//! port (`/debug/route`); and for each step the drift from the agent's desired state.
//!
//! The walk is a model of the kernel's evaluation for the first packet of the connection (no
//! connmark yet), made from the observed rules, routes and nft rule comments: the rule that
//! decides is named by its comment as the kernel holds it. `--trace` checks the model against
//! the kernel's own account ([`super::probe`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use ambient_net::consts::{self, mark, port, zt_mark};
use ambient_net::model::RouteKind;
use ambient_net::nft::{chain, RuleTag, SetElem};
use serde::Serialize;
use serde_json::Value;

use super::desired::Desired;
use super::drift::{self, elem_subject, Drift};
use super::kernel::{self, route_text, rule_text, Kernel, Lookup, NsKernel, TABLE_LOCAL};
use super::probe::{self, Trace};
use super::{http_get, OpsError};
use crate::store::PodRecord;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The source: a pod IP, an enrolled pod's `namespace/name`, or `node` (host sockets).
    #[arg(long)]
    pub from: String,
    /// The destination, `<ip>:<port>`.
    #[arg(long)]
    pub to: SocketAddrV4,
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
    /// The agent's state directory.
    #[arg(long, default_value = "/var/run/ambient/state")]
    pub state_dir: PathBuf,
}

/// Who opens the connection.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    pub ip: Ipv4Addr,
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
    pub to: SocketAddrV4,
    /// One line: where the connection goes on this node.
    pub verdict: String,
    pub steps: Vec<Step>,
    /// ztunnel's `/debug/route` answer, when the path reaches its outbound listener.
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
    let src = resolve(&d, &k, &args.from)?;
    let mut w = Walk {
        d: &d,
        k: &k,
        drift: all,
        used: Vec::new(),
        steps: Vec::new(),
    };
    let (verdict, listener) = walk(&mut w, &src, args.to);
    let ztunnel = match (listener, &zt_netns) {
        (Some(port::OUTBOUND), Some(ns)) => Some(ask_ztunnel(ns, src.ip, args.to)),
        _ => None,
    };
    let other_drift = w
        .drift
        .iter()
        .filter(|x| !w.used.contains(&x.subject))
        .count();
    let trace = if args.trace {
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
            src: src.ip,
            dst: args.to,
            ztunnel_netns: zt_netns.clone(),
            node: &k.node,
            ztunnel: k.ztunnel.as_ref(),
        })?)
    } else {
        None
    };
    let steps = std::mem::take(&mut w.steps);
    Ok(Explanation {
        from: src,
        to: args.to,
        verdict,
        steps,
        ztunnel,
        other_drift,
        trace,
    })
}

fn resolve(d: &Desired, k: &Kernel, from: &str) -> Result<Source, OpsError> {
    let named = |ip, kind, pod: Option<&PodRecord>| Source {
        ip,
        kind,
        pod: pod.map(|p| format!("{}/{}", p.namespace, p.name)),
        record: pod.cloned(),
    };
    if from == "node" {
        // Host sockets: the source address is chosen by the route (see the output steps).
        return Ok(named(Ipv4Addr::UNSPECIFIED, "node", None));
    }
    if let Ok(ip) = from.parse::<Ipv4Addr>() {
        if let Some(p) = d.pod_by_ip(ip) {
            return Ok(named(ip, "ambient pod", Some(p)));
        }
        if d.ztunnel_ip() == Some(ip) {
            return Ok(Source {
                pod: d
                    .state
                    .ztunnel
                    .as_ref()
                    .map(|z| format!("{}/{}", z.namespace, z.name)),
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
    if let Some(p) = d.pod_by_name(ns, name) {
        let ip = p
            .v4()
            .next()
            .ok_or_else(|| OpsError::Usage(format!("{from} has no IPv4 address")))?;
        return Ok(named(ip, "ambient pod", Some(p)));
    }
    if let Some(z) = d
        .state
        .ztunnel
        .as_ref()
        .filter(|z| z.namespace == ns && z.name == name)
    {
        return Ok(Source {
            pod: Some(from.to_string()),
            ..named(
                v4(z.endpoint.ip).unwrap_or(Ipv4Addr::UNSPECIFIED),
                "ztunnel",
                None,
            )
        });
    }
    Err(OpsError::Usage(format!(
        "{from} is not a pod the agent enrolled on this node; give its IP"
    )))
}

/// The IPv4 address of `ip` (explain walks the IPv4 path only, for now).
fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// The comment without its `[ambient i/n fingerprint]` tag.
pub(super) fn text_of(comment: &str) -> &str {
    match (RuleTag::parse(comment), comment.rfind(" [ambient ")) {
        (Some(_), Some(i)) => &comment[..i],
        _ => comment,
    }
}

/// `inet ambient-node prerouting rule 10/10 (handle 14) "..."` for the rule of `chain` whose
/// comment contains `text`.
fn nft_rule_line(k: &NsKernel, table: &str, chain: &str, text: &str) -> Option<String> {
    k.nft_rule(chain, text).map(|(i, r, n)| {
        format!(
            "{table} {chain} rule {i}/{n} (handle {}) \"{}\"",
            r.handle.unwrap_or_default(),
            text_of(r.comment.as_deref().unwrap_or_default())
        )
    })
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
fn walk(w: &mut Walk<'_>, src: &Source, to: SocketAddrV4) -> (String, Option<u16>) {
    let k = w.k;
    let dst = *to.ip();
    let inet = format!("inet {}", consts::NODE_NFT_TABLE);
    let pre_chain = format!("chain inet {}", chain::PREROUTING);
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
            let addr = SetElem::Addr(src.ip.into());
            let iif = SetElem::DevAddr(dev.clone(), src.ip.into());
            let t = k.node.nft.as_ref();
            let in_set = t.is_some_and(|t| t.pods_v4().contains(&src.ip));
            let in_iif = t.is_some_and(|t| {
                t.set_dev_addrs(consts::POD_IIF_SET)
                    .contains(&(dev.clone(), src.ip.into()))
            });
            let yes = |b: bool| if b { "yes" } else { "NO" };
            w.step(
                "node",
                "enrolled",
                format!(
                    "{} in @{}: {}; \"{dev}\" . {} in @{}: {}",
                    src.ip,
                    consts::POD_SET,
                    yes(in_set),
                    src.ip,
                    consts::POD_IIF_SET,
                    yes(in_iif)
                ),
                None,
                in_set && in_iif,
                &[
                    elem_subject(consts::POD_SET, &addr),
                    elem_subject(consts::POD_IIF_SET, &iif),
                ],
            );
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
            if in_iif {
                mark = mark::CAPTURE;
                let line = nft_rule_line(&k.node, &inet, chain::PREROUTING, "capture outbound");
                w.step(
                    "node",
                    "nft",
                    format!(
                        "{}: mark {}",
                        line.clone()
                            .unwrap_or_else(|| "the capture rule is MISSING".into()),
                        mark_text(mark)
                    ),
                    Some(mark),
                    line.is_some(),
                    std::slice::from_ref(&pre_chain),
                );
                if line.is_none() {
                    mark = 0;
                }
            } else if in_set {
                let line = nft_rule_line(&k.node, &inet, chain::PREROUTING, "spoofed, drop");
                w.step(
                    "node",
                    "nft",
                    format!(
                        "{}: DROPPED (its address is enrolled but not from this device)",
                        line.unwrap_or_default()
                    ),
                    None,
                    false,
                    std::slice::from_ref(&pre_chain),
                );
                return ("dropped as spoofed on this node".into(), None);
            } else {
                w.step(
                    "node",
                    "nft",
                    "no rule of the prerouting chain marks it: NOT captured".into(),
                    Some(0),
                    false,
                    std::slice::from_ref(&pre_chain),
                );
            }
            if mark == mark::CAPTURE {
                if let Some(line) =
                    nft_rule_line(&k.node, &inet, chain::NAT_PREROUTING, "identity DNAT")
                {
                    w.step(
                        "node",
                        "nat",
                        format!("{line}: the destination stays {dst} (a later DNAT, kube-proxy's, is skipped; ztunnel picks the endpoint)"),
                        Some(mark),
                        true,
                        &[format!("chain inet {}", chain::NAT_PREROUTING)],
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
            let line = nft_rule_line(&k.node, &inet, chain::PREROUTING, "from ztunnel itself");
            w.step(
                "node",
                "nft",
                format!(
                    "{}: mark {} (its own connections are never captured again)",
                    line.clone().unwrap_or_else(|| "the rule is MISSING".into()),
                    mark_text(mark)
                ),
                Some(mark),
                line.is_some(),
                std::slice::from_ref(&pre_chain),
            );
        }
        "node" => {
            // A host socket: the first lookup (no mark) picks the route and so the source.
            let first = k.node.lookup(0, dst);
            let chosen = first.route.as_ref().and_then(|(_, v)| v.src).and_then(v4);
            if src_ip.is_unspecified() {
                src_ip = chosen.unwrap_or(Ipv4Addr::UNSPECIFIED);
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
            let gw_rule = k
                .node
                .nft
                .as_ref()
                .and_then(|t| t.chains.get(chain::OUTPUT))
                .is_some_and(|c| !c.rules.is_empty());
            let is_gw =
                w.d.nft
                    .rules
                    .as_ref()
                    .is_some_and(|r| r.node_gateways.contains(&IpAddr::V4(src_ip)));
            if gw_rule && is_gw {
                mark = mark::OWN;
                let line = nft_rule_line(&k.node, &inet, chain::OUTPUT, "node gateway address")
                    .unwrap_or_default();
                w.step(
                    "node",
                    "nft",
                    format!(
                        "{line}: mark {} (node → pod, e.g. kubelet probes, is not captured)",
                        mark_text(mark)
                    ),
                    Some(mark),
                    true,
                    &[format!("chain inet {}", chain::OUTPUT)],
                );
            } else {
                w.step(
                    "node",
                    "nft",
                    format!("no output rule marks a packet from {src_ip}"),
                    Some(0),
                    true,
                    &[format!("chain inet {}", chain::OUTPUT)],
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
                "nft",
                "no rule of the prerouting chain marks a new connection from it".into(),
                Some(0),
                true,
                std::slice::from_ref(&pre_chain),
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
        &consts::rule::ALL.map(|p| format!("rule {p}")),
    );
    // A missing or wrong route of the agent's for this destination sends it elsewhere: that
    // drift belongs to this step whichever table the walk ended in.
    let mut route_subjects = lookup_subjects(&l, "");
    route_subjects.extend(consts::table::ALL.map(|t| format!("route table {t} {dst}/32")));
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
    // Into a tunnel: the device, then the encapsulated packet's own route.
    let have = k.node.tunnels.get(end.name).cloned().flatten();
    let remote = have.as_ref().and_then(|h| h.remote).and_then(v4);
    w.step(
        "node",
        "tunnel",
        match &have {
            Some(h) => format!("{} {}", end.name, drift::tunnel_have(h)),
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
                "the encapsulated packet to {r}:{} keeps mark {}: {}{}",
                have.as_ref().and_then(|h| h.port).unwrap_or_default(),
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
    let zt_table = format!("ip {}", consts::ZTUNNEL_NFT_TABLE);
    let line = nft_rule_line(zk, &zt_table, chain::PREROUTING, text);
    w.step(
        "ztunnel",
        "tproxy",
        format!(
            "{}: to 127.0.0.1:{listener}, mark {}/{:#x}",
            line.clone()
                .unwrap_or_else(|| format!("the TPROXY rule \"{text}\" is MISSING")),
            mark_text(zt_mark::TPROXY),
            zt_mark::MASK
        ),
        Some(zt_mark::TPROXY),
        line.is_some(),
        &[format!("chain ztunnel ip {}", chain::PREROUTING)],
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
    let up = listening
        .iter()
        .any(|(a, p)| *p == listener && (a.is_loopback() || a.is_unspecified()));
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
        .map(|r| format!("{prefix}rule {}", r.priority))
        .collect();
    if let Some((k, _)) = &l.route {
        s.push(format!(
            "{prefix}route table {} {}/{}",
            k.table, k.dst, k.prefix_len
        ));
    }
    s
}

fn ask_ztunnel(netns: &std::path::Path, src: Ipv4Addr, dst: SocketAddrV4) -> Value {
    match http_get(
        netns,
        port::ADMIN,
        &format!("/debug/route?src={src}&dst={dst}"),
    ) {
        Ok((200, body)) => serde_json::from_str(&body)
            .unwrap_or_else(|e| serde_json::json!({"error": format!("not JSON: {e}")})),
        Ok((code, body)) => serde_json::json!({"error": format!("HTTP {code}: {}", body.trim())}),
        Err(e) => serde_json::json!({"error": e.to_string()}),
    }
}

/// One line of ztunnel's decision.
pub fn ztunnel_summary(v: &Value) -> String {
    if let Some(e) = v["error"].as_str() {
        return format!("ztunnel's admin port did not answer: {e}");
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
}
