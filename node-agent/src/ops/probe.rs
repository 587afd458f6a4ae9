//! `explain --trace`: one real connection from the source's netns, traced by the kernel.
//!
//! A socket is made in the source's netns and bound first, so its source port is known; then a
//! table of our own ([`TraceRule`]) sets `meta nftrace` on exactly that 5-tuple in the node's
//! netns and in the ztunnel netns (the flag does not survive the tunnel's encapsulation), a
//! [`TraceSocket`] listens in each, the connection is made (or fails, bounded), and the trace
//! tables are removed. Events come over netlink (`NFNLGRP_NFTRACE`), not from
//! `nft monitor trace`: rule handles are matched to the comments of the product's tables.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambient_net::consts;
use ambient_net::nft::trace::{TraceEvent, TraceKind, TraceRule, TraceSocket};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn};
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
    pub src: Ipv4Addr,
    pub dst: SocketAddrV4,
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
    /// The packet mark when it left the node's ambient-node prerouting (or output) chain.
    pub node_mark: Option<u32>,
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
fn bound_socket(netns: Option<&PathBuf>, src: Ipv4Addr) -> Result<(OwnedFd, u16), OpsError> {
    let make = move || -> nix::Result<(OwnedFd, u16)> {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
        let local: SockaddrIn = socket::getsockname(fd.as_raw_fd())?;
        Ok((fd, local.port()))
    };
    let r = match netns {
        Some(p) => ambient_net::netns::run_in(p, make)
            .map_err(|e| OpsError::io(format!("enter {}", p.display()), e))?,
        None => make(),
    };
    r.map_err(|e| OpsError::io(format!("bind a probe socket to {src}"), e.into()))
}

/// Connects, bounded by [`CONNECT_TIMEOUT`]; the outcome in words.
fn connect(fd: &OwnedFd, dst: SocketAddrV4) -> String {
    match socket::connect(fd.as_raw_fd(), &SockaddrIn::from(dst)) {
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

pub fn run(p: &Probe<'_>) -> Result<Trace, OpsError> {
    let (fd, sport) = bound_socket(p.source_netns.as_ref(), p.src)?;
    let saddr = (!p.src.is_unspecified()).then_some(p.src);
    let node_ts = TraceSocket::open().map_err(|e| OpsError::io("join NFNLGRP_NFTRACE", e))?;
    let node_rule = TraceRule::add(saddr, sport, *p.dst.ip(), p.dst.port())?;
    let mut zt = None;
    if let Some(ns) = &p.ztunnel_netns {
        let (dip, dport) = (*p.dst.ip(), p.dst.port());
        let (ts, rule) = ambient_net::netns::run_in(ns, move || -> Result<_, OpsError> {
            let ts = TraceSocket::open().map_err(|e| OpsError::io("join NFNLGRP_NFTRACE", e))?;
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
    let outcome = connect(&fd, p.dst);
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let node_events = node_ts
        .collect(QUIET, deadline)
        .map_err(|e| OpsError::io("read trace events", e))?;
    let zt_events = match &zt {
        Some((ts, _)) => ts
            .collect(QUIET, deadline)
            .map_err(|e| OpsError::io("read trace events", e))?,
        None => Vec::new(),
    };
    drop(fd);
    node_rule.remove()?;
    drop(zt);
    let want = |e: &TraceEvent| {
        e.dst == Some(*p.dst.ip())
            && e.dport == Some(p.dst.port())
            && e.sport == Some(sport)
            && saddr.is_none_or(|s| e.src == Some(s))
            && !e.table.starts_with("ambient-trace-")
    };
    let node = first_packet(&node_events, want, p.node);
    let ztunnel = match p.ztunnel {
        Some(zk) => first_packet(&zt_events, want, zk),
        None => Vec::new(),
    };
    let node_mark = node
        .iter()
        .rev()
        .find(|h| h.table == consts::NODE_NFT_TABLE && h.family == "inet")
        .map(|h| h.mark);
    Ok(Trace {
        src: saddr.map_or("the node".into(), |s| s.to_string()),
        sport,
        connect: outcome,
        node,
        ztunnel,
        node_mark,
    })
}

/// The hits of the first traced packet (the SYN): the events of its trace id, in order.
fn first_packet(
    events: &[TraceEvent],
    want: impl Fn(&TraceEvent) -> bool,
    k: &NsKernel,
) -> Vec<Hit> {
    let Some(id) = events.iter().find(|e| want(e)).map(|e| e.id) else {
        return Vec::new();
    };
    events
        .iter()
        .filter(|e| e.id == id && want(e))
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
        })
        .collect()
}

fn hit_line(h: &Hit) -> String {
    let what = match (&h.comment, h.handle) {
        (Some(c), Some(n)) => format!("rule handle {n} \"{c}\""),
        (None, Some(n)) => format!("rule handle {n}"),
        // No rule matched: the chain's end.
        (_, None) => "no rule matched".to_string(),
    };
    format!(
        "{} {} {}: {what} → {}, mark {:#05x}",
        h.family, h.table, h.chain, h.verdict, h.mark
    )
}

/// The trace beside the explanation: the rules hit, and whether the marks agree.
pub fn render(t: &Trace, steps: &[Step]) -> String {
    let mut s = format!("trace: probe {}:{} → {}\n", t.src, t.sport, t.connect);
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
        .filter(|st| st.netns == "node" && st.hop == "nft")
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
