//! `explain --trace`: one real connection from the source's netns, traced by the kernel.
//!
//! A socket is made in the source's netns and bound first, so its source port is known; then a
//! table of our own ([`TraceRule`]) sets `meta nftrace` on exactly that 5-tuple in the node's
//! netns and in the ztunnel netns (the flag does not survive the tunnel's encapsulation), a
//! [`TraceSocket`] listens in each, the connection is made (or fails, bounded), and the trace
//! tables are removed. Events come over netlink (`NFNLGRP_NFTRACE`), not from
//! `nft monitor trace`: rule handles are matched to the comments of the product's tables.
//! iptables here is `iptables-nft` (Debian's default): its rules are nf_tables rules of the
//! `ip`/`ip6` `mangle` and `nat` tables, traced the same way; their comments come from
//! `iptables-save` by position (nft's JSON does not show iptables-nft's comment match).
//! `iptables-legacy` has no nftrace (its TRACE target logs to the kernel log): --trace says so.
//!
//! [`arriving`] is the other node's half: no probe, the same trace tables for the connection
//! as it arrives (the HBONE connection ztunnel opens from the client's address, any source
//! port), collected for a while.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambient_net::consts;
use ambient_net::iptables::{self, Fam, Variant};
use ambient_net::nft::trace::{TraceEvent, TraceKind, TraceRule, TraceSocket};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage};
use serde::Serialize;

use super::explain::Step;
use super::kernel::NsKernel;
use super::OpsError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Events are collected until this long passes without one.
const QUIET: Duration = Duration::from_millis(300);

pub struct Probe<'a> {
    /// `None`: the node's own netns (host sockets).
    pub source_netns: Option<PathBuf>,
    /// Unspecified for the node: the kernel picks the source address.
    pub src: IpAddr,
    pub dst: SocketAddr,
    pub ztunnel_netns: Option<PathBuf>,
    pub node: &'a NsKernel,
    pub ztunnel: Option<&'a NsKernel>,
}

/// One rule (or chain policy) the first packet hit.
#[derive(Debug, Clone, Serialize)]
pub struct Hit {
    pub family: &'static str,
    pub table: String,
    pub chain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
    /// The rule's comment, for the product's tables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// `rule`, `policy`, `return`.
    pub kind: &'static str,
    pub verdict: String,
    pub mark: u32,
    /// The one-line form ([`hit_line`]).
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    pub src: String,
    pub sport: u16,
    /// `connected`, `refused`, `timed out`, ...
    pub connect: String,
    /// The first packet's hits in the node's netns, in order.
    pub node: Vec<Hit>,
    /// The same packet's hits in the ztunnel netns, after the tunnel.
    pub ztunnel: Vec<Hit>,
    /// The packet mark when it left the node's ambient-node prerouting (or output) chain
    /// (with iptables: our `AMBIENT-*` mangle chains).
    pub node_mark: Option<u32>,
    /// What the trace could not see, said plainly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The ztunnel netns' trace table, removed from inside that netns however the probe ends.
struct ZtRule {
    netns: PathBuf,
    rule: Option<TraceRule>,
}

impl Drop for ZtRule {
    fn drop(&mut self) {
        if let Some(r) = self.rule.take() {
            let _ = ambient_net::netns::run_in(&self.netns, move || r.remove());
        }
    }
}

fn family_name(f: u8) -> &'static str {
    match f {
        1 => "inet",
        2 => "ip",
        7 => "bridge",
        10 => "ip6",
        _ => "?",
    }
}

/// A socket in `netns` bound to `src:0`, and its port.
fn bound_socket(netns: Option<&PathBuf>, src: IpAddr) -> Result<(OwnedFd, u16), OpsError> {
    let make = move || -> nix::Result<(OwnedFd, u16)> {
        let fam = if src.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket::socket(
            fam,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::bind(
            fd.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(src, 0)),
        )?;
        let local: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
        let port = match (local.as_sockaddr_in(), local.as_sockaddr_in6()) {
            (Some(a), _) => a.port(),
            (_, Some(a)) => a.port(),
            _ => 0,
        };
        Ok((fd, port))
    };
    let r = match netns {
        Some(p) => ambient_net::netns::run_in(p, make)
            .map_err(|e| OpsError::io(format!("enter {}", p.display()), e))?,
        None => make(),
    };
    r.map_err(|e| OpsError::io(format!("bind a probe socket to {src}"), e.into()))
}

/// Connects, bounded by [`CONNECT_TIMEOUT`]; the outcome in words.
fn connect(fd: &OwnedFd, dst: SocketAddr) -> String {
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        Ok(()) => return "connected".into(),
        Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return format!("failed: {e}"),
    }
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, CONNECT_TIMEOUT.as_millis() as libc::c_int) };
    if n == 0 {
        return "timed out".into();
    }
    match socket::getsockopt(fd, socket::sockopt::SocketError) {
        Ok(0) => "connected".into(),
        Ok(e) if e == libc::ECONNREFUSED => "refused".into(),
        Ok(e) => format!("failed: {}", std::io::Error::from_raw_os_error(e)),
        Err(e) => format!("failed: {e}"),
    }
}

/// The trace tables for one flow in the node's netns and (when known) the ztunnel netns, with
/// a trace socket in each; removed when dropped.
struct Tracing {
    node_ts: TraceSocket,
    node_rule: Option<TraceRule>,
    zt: Option<(TraceSocket, ZtRule)>,
}

impl Tracing {
    fn set(p: &Probe<'_>, saddr: Option<IpAddr>, sport: Option<u16>) -> Result<Tracing, OpsError> {
        let node_ts = TraceSocket::open().map_err(|e| OpsError::io("join NFNLGRP_NFTRACE", e))?;
        let node_rule = TraceRule::add(saddr, sport, p.dst.ip(), p.dst.port())?;
        let mut zt = None;
        if let Some(ns) = &p.ztunnel_netns {
            let (dip, dport) = (p.dst.ip(), p.dst.port());
            let (ts, rule) = ambient_net::netns::run_in(ns, move || -> Result<_, OpsError> {
                let ts =
                    TraceSocket::open().map_err(|e| OpsError::io("join NFNLGRP_NFTRACE", e))?;
                Ok((ts, TraceRule::add(saddr, sport, dip, dport)?))
            })
            .map_err(|e| OpsError::io(format!("enter {}", ns.display()), e))??;
            zt = Some((
                ts,
                ZtRule {
                    netns: ns.clone(),
                    rule: Some(rule),
                },
            ));
        }
        Ok(Tracing {
            node_ts,
            node_rule: Some(node_rule),
            zt,
        })
    }

    /// Both netns' events: the node's until `quiet` passes without one (or `deadline`),
    /// then what the ztunnel netns' socket holds; the trace tables are removed.
    fn finish(
        mut self,
        quiet: Duration,
        deadline: Instant,
    ) -> Result<(Vec<TraceEvent>, Vec<TraceEvent>), OpsError> {
        let read = |e| OpsError::io("read trace events", e);
        let node = self.node_ts.collect(quiet, deadline).map_err(read)?;
        let zt = match &self.zt {
            Some((ts, _)) => ts.collect(QUIET, Instant::now() + QUIET).map_err(read)?,
            None => Vec::new(),
        };
        if let Some(r) = self.node_rule.take() {
            r.remove()?;
        }
        Ok((node, zt))
    }
}

pub fn run(p: &Probe<'_>) -> Result<Trace, OpsError> {
    let (fd, sport) = bound_socket(p.source_netns.as_ref(), p.src)?;
    let saddr = (!p.src.is_unspecified()).then_some(p.src);
    let tracing = Tracing::set(p, saddr, Some(sport))?;
    let outcome = connect(&fd, p.dst);
    let (node_events, zt_events) = tracing.finish(QUIET, Instant::now() + CONNECT_TIMEOUT)?;
    drop(fd);
    let want = |e: &TraceEvent| e.sport == Some(sport) && saddr.is_none_or(|s| e.src == Some(s));
    Ok(trace_of(
        p,
        saddr,
        sport,
        outcome,
        &node_events,
        &zt_events,
        want,
    ))
}

/// The destination node's half of a probe another node sends: the same trace tables for the
/// flow to `p.dst` from `p.src` (any source port: ztunnel's HBONE connection, or the packet
/// itself), `tracing` on stderr once they are set, events collected for `wait`.
pub fn arriving(p: &Probe<'_>, wait: Duration) -> Result<Trace, OpsError> {
    let saddr = (!p.src.is_unspecified()).then_some(p.src);
    let tracing = Tracing::set(p, saddr, None)?;
    let mut err = std::io::stderr();
    let _ = writeln!(err, "tracing");
    let _ = err.flush();
    // The whole window: the probe starts on the other node after `tracing`.
    let (node_events, zt_events) = tracing.finish(wait, Instant::now() + wait)?;
    let sport = node_events
        .iter()
        .chain(&zt_events)
        .find(|e| e.dst == Some(p.dst.ip()) && e.dport == Some(p.dst.port()))
        .and_then(|e| e.sport)
        .unwrap_or_default();
    let want = |e: &TraceEvent| saddr.is_none_or(|s| e.src == Some(s));
    let mut t = trace_of(
        p,
        saddr,
        sport,
        "seen arriving".into(),
        &node_events,
        &zt_events,
        want,
    );
    if node_events.is_empty() {
        t.connect = format!("nothing arrived within {} s", wait.as_secs());
    }
    Ok(t)
}

fn trace_of(
    p: &Probe<'_>,
    saddr: Option<IpAddr>,
    sport: u16,
    connect: String,
    node_events: &[TraceEvent],
    zt_events: &[TraceEvent],
    flow: impl Fn(&TraceEvent) -> bool + Copy,
) -> Trace {
    let want = |e: &TraceEvent| {
        e.dst == Some(p.dst.ip())
            && e.dport == Some(p.dst.port())
            && flow(e)
            && !e.table.starts_with("ambient-trace-")
    };
    // With iptables the rules are those of the `mangle`/`nat` tables iptables-nft made.
    let ipt_comments = |events: &[TraceEvent], netns: Option<&PathBuf>, k: &NsKernel| {
        let tables: std::collections::BTreeSet<(u8, String)> = events
            .iter()
            .filter(|e| e.table == "mangle" || e.table == "nat")
            .map(|e| (e.family, e.table.clone()))
            .collect();
        let read = move || {
            tables
                .iter()
                .map(|(f, t)| ((*f, t.clone()), nft_handles(family_name(*f), t)))
                .collect::<Vec<_>>()
        };
        let handles = match netns {
            Some(ns) => ambient_net::netns::run_in(ns, read).unwrap_or_default(),
            None => read(),
        };
        ipt_comment_map(&handles, k)
    };
    let node_ipt = ipt_comments(node_events, None, p.node);
    let zt_ipt = match p.ztunnel {
        Some(zk) => ipt_comments(zt_events, p.ztunnel_netns.as_ref(), zk),
        None => BTreeMap::new(),
    };
    let node = first_packet(node_events, want, p.node, &node_ipt);
    let ztunnel = match p.ztunnel {
        Some(zk) => first_packet(zt_events, want, zk, &zt_ipt),
        None => Vec::new(),
    };
    // nftables: the last hit of the inet table. iptables-nft: the mark the packet carries
    // when it reaches nat prerouting, after mangle's chains (ours among them).
    let node_mark = node
        .iter()
        .rev()
        .find(|h| h.table == consts::NODE_NFT_TABLE && h.family == "inet")
        .or_else(|| node.iter().find(|h| h.table == "nat"))
        .map(|h| h.mark);
    let note = (p.node.ipt.is_some() && iptables::variant() == Variant::Legacy).then(|| {
        "iptables-legacy: its rules are not nf_tables rules and emit no trace events (its TRACE target logs to the kernel log instead): --trace needs nftables or iptables-nft".to_string()
    });
    Trace {
        src: saddr.map_or("the node".into(), |s| s.to_string()),
        sport,
        connect,
        node,
        ztunnel,
        node_mark,
        note,
    }
}

/// An nf_tables table's rule handles by chain, in each chain's order.
type ChainHandles = BTreeMap<String, Vec<u64>>;

/// The rule handles of each chain of an nf_tables table, in the chain's order, from
/// `nft -j list table` (iptables-nft's comments are not in nft's JSON, only their position
/// matches `iptables-save`'s).
fn nft_handles(family: &str, table: &str) -> ChainHandles {
    let out = std::process::Command::new(ambient_net::nft::nft_program())
        .args(["-j", "list", "table", family, table])
        .output();
    let Ok(out) = out else {
        return BTreeMap::new();
    };
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut m = ChainHandles::new();
    for i in doc["nftables"].as_array().into_iter().flatten() {
        let r = &i["rule"];
        if let (Some(c), Some(h)) = (r["chain"].as_str(), r["handle"].as_u64()) {
            m.entry(c.to_string()).or_default().push(h);
        }
    }
    m
}

/// `(chain, handle) → comment` for iptables-nft's tables: the n-th nft rule of a chain is
/// the n-th `-A` line of `iptables-save` (when both agree on the count).
fn ipt_comment_map(
    handles: &[((u8, String), ChainHandles)],
    k: &NsKernel,
) -> BTreeMap<(String, u64), String> {
    let mut out = BTreeMap::new();
    let Some(ipt) = k.ipt.as_ref() else {
        return out;
    };
    for ((family, table), chains) in handles {
        let fam = if *family == 10 { Fam::V6 } else { Fam::V4 };
        let Some(saved) = ipt.of(fam) else { continue };
        for (chain, hs) in chains {
            let Some(rules) = saved.chain(table, chain) else {
                continue;
            };
            if rules.len() != hs.len() {
                continue;
            }
            for (h, r) in hs.iter().zip(rules) {
                if let Some(c) = super::kernel::ipt_comment(r) {
                    out.insert((chain.clone(), *h), c);
                }
            }
        }
    }
    out
}

/// The events of the first packet of trace id `id` that `want`s. The kernel copies the
/// packet's headers into the first event of each base chain only (the later ones of that
/// chain, a jumped-to chain's rules, the policy, carry none), and an id is reused by later
/// packets: a base chain seen a second time starts another packet. The rule-type events
/// without a rule (a chain's end, followed by its policy or the caller's next rule) are left
/// out.
fn packet_events(
    events: &[TraceEvent],
    id: u32,
    want: impl Fn(&TraceEvent) -> bool,
) -> Vec<&TraceEvent> {
    let mut seen = std::collections::BTreeSet::new();
    let mut ours = false;
    let mut out = Vec::new();
    for e in events.iter().filter(|e| e.id == id) {
        if e.dst.is_some() {
            if !want(e) {
                ours = false;
                continue;
            }
            if !seen.insert((e.family, e.table.clone(), e.chain.clone())) {
                break;
            }
            ours = true;
        }
        let chain_end = e.kind == TraceKind::Rule && e.rule_handle.is_none();
        if ours && !chain_end && !e.table.starts_with("ambient-trace-") {
            out.push(e);
        }
    }
    out
}

/// The hits of the first traced packet (the SYN): the events of its trace id, in order.
fn first_packet(
    events: &[TraceEvent],
    want: impl Fn(&TraceEvent) -> bool,
    k: &NsKernel,
    ipt: &BTreeMap<(String, u64), String>,
) -> Vec<Hit> {
    let Some(id) = events.iter().find(|e| want(e)).map(|e| e.id) else {
        return Vec::new();
    };
    packet_events(events, id, want)
        .into_iter()
        .map(|e| Hit {
            family: family_name(e.family),
            table: e.table.clone(),
            chain: e.chain.clone(),
            handle: e.rule_handle,
            comment: match (
                e.rule_handle,
                e.table == consts::NODE_NFT_TABLE || e.table == consts::ZTUNNEL_NFT_TABLE,
            ) {
                (Some(h), true) => k
                    .comment_of(e.family, &e.chain, h)
                    .map(|c| super::explain::text_of(&c).to_string()),
                (Some(h), false) => ipt
                    .get(&(e.chain.clone(), h))
                    .map(|c| super::explain::text_of(c).to_string()),
                _ => None,
            },
            kind: match e.kind {
                TraceKind::Rule => "rule",
                TraceKind::Policy => "policy",
                TraceKind::Return => "return",
                TraceKind::Other => "?",
            },
            verdict: e
                .verdict
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_default(),
            mark: e.mark.unwrap_or_default(),
            text: String::new(),
        })
        .map(|mut h| {
            h.text = hit_line(&h);
            h
        })
        .collect()
}

/// One hit as a line: the table, chain, rule (or the chain's end) and verdict, and the mark.
fn hit_line(h: &Hit) -> String {
    let what = match (&h.comment, h.handle, h.kind) {
        (Some(c), Some(n), _) => format!("rule handle {n} \"{c}\""),
        (None, Some(n), _) => format!("rule handle {n}"),
        // The end of a jumped-to chain: back to the rule after the jump.
        (_, None, "return") => "end of the chain, back to its caller".to_string(),
        (_, None, "policy") => "no rule decided: the chain's policy".to_string(),
        (_, None, _) => "no rule matched".to_string(),
    };
    let verdict = if h.verdict.is_empty() {
        String::new()
    } else {
        format!(" → {}", h.verdict)
    };
    format!(
        "{} {} {}: {what}{verdict}, mark {:#05x}",
        h.family, h.table, h.chain, h.mark
    )
}

/// The trace beside the explanation: the rules hit, and whether the marks agree.
pub fn render(t: &Trace, steps: &[Step]) -> String {
    let mut s = format!("trace: probe {}:{} → {}\n", t.src, t.sport, t.connect);
    if let Some(n) = &t.note {
        s += &format!("  note: {n}\n");
    }
    for (ns, hits) in [("node", &t.node), ("ztunnel", &t.ztunnel)] {
        if hits.is_empty() && ns == "ztunnel" {
            continue;
        }
        if hits.is_empty() {
            s += "  node     (no trace events: did the packet reach this node's netns?)\n";
        }
        for h in hits.iter() {
            s += &format!("  {ns:<8} {}\n", hit_line(h));
        }
    }
    let explained = steps
        .iter()
        .filter(|st| st.netns == "node" && (st.hop == "nft" || st.hop == "iptables"))
        .filter_map(|st| st.mark)
        .next_back();
    s += &match (explained, t.node_mark) {
        (Some(a), Some(b)) if a == b => format!("trace agrees: mark {a:#05x}\n"),
        (Some(0), None) => "trace agrees: no rule of ambient-node marks it\n".into(),
        (a, b) => format!(
            "trace DIFFERS: explained mark {}, traced {}\n",
            a.map_or("none".into(), |m| format!("{m:#05x}")),
            b.map_or("none".into(), |m| format!("{m:#05x}"))
        ),
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambient_net::nft::trace::Verdict;

    fn ev(chain: &str, handle: Option<u64>, kind: TraceKind, headers: Option<u16>) -> TraceEvent {
        TraceEvent {
            family: 1,
            table: "ambient-node".into(),
            chain: chain.into(),
            rule_handle: handle,
            kind,
            verdict: Some(Verdict::Continue),
            id: 7,
            mark: Some(0x100),
            iif: None,
            oif: None,
            src: headers.map(|_| "10.244.1.4".parse().unwrap()),
            dst: headers.map(|_| "10.244.2.3".parse().unwrap()),
            protocol: headers.map(|_| 6),
            sport: headers,
            dport: headers.map(|_| 9080),
        }
    }

    #[test]
    fn one_packet_of_a_reused_trace_id() {
        let events = vec![
            ev("prerouting", Some(23), TraceKind::Rule, Some(40000)),
            // No headers: the same chain's later events.
            ev("AMBIENT-PREROUTING", Some(30), TraceKind::Rule, None),
            ev("prerouting", None, TraceKind::Rule, None),
            ev("prerouting", None, TraceKind::Policy, None),
            ev("forward", None, TraceKind::Policy, Some(40000)),
            // Another flow's packet with the same id, then ours again: a later packet.
            ev("prerouting", Some(9), TraceKind::Rule, Some(1)),
            ev("prerouting", None, TraceKind::Policy, None),
            ev("prerouting", Some(21), TraceKind::Rule, Some(40000)),
        ];
        let got: Vec<(String, Option<u64>)> = packet_events(&events, 7, |e| e.sport == Some(40000))
            .into_iter()
            .map(|e| (e.chain.clone(), e.rule_handle))
            .collect();
        assert_eq!(
            got,
            [
                ("prerouting".to_string(), Some(23)),
                ("AMBIENT-PREROUTING".to_string(), Some(30)),
                ("prerouting".to_string(), None),
                ("forward".to_string(), None),
            ]
        );
    }
}
