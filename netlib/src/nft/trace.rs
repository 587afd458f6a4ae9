//! nf_tables trace events over netlink: what `nft monitor trace` prints, read directly.
//!
//! A packet whose `meta nftrace` is set makes the kernel multicast one `NFT_MSG_TRACE` message
//! to the `NFNLGRP_NFTRACE` group for every rule that matched it (and for every chain policy
//! and return) in every table it passes, in the network namespace it is in. A
//! [`TraceSocket`] joins that group in the namespace of the calling thread (open it inside
//! [`crate::netns::run_in`] to watch another one) and [`parse_events`] turns the messages into
//! [`TraceEvent`]s. The rule handle is all a trace says about a rule: the caller maps handles to
//! the comments `nft -j list table` gives (see [`super::ObservedChain`]).
//!
//! Layout (linux/netfilter/nf_tables.h): a netlink header, a `nfgenmsg` (the table's family)
//! and `NFTA_TRACE_*` attributes, integers in network byte order; the network and transport
//! headers are copied raw from the packet.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNLGRP_NFTRACE: libc::c_int = 9;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_TRACE: u16 = 17;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
/// Attribute type bits (the rest are NLA_F_NESTED and NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;

const NFTA_TRACE_TABLE: u16 = 1;
const NFTA_TRACE_CHAIN: u16 = 2;
const NFTA_TRACE_RULE_HANDLE: u16 = 3;
const NFTA_TRACE_TYPE: u16 = 4;
const NFTA_TRACE_VERDICT: u16 = 5;
const NFTA_TRACE_ID: u16 = 6;
const NFTA_TRACE_NETWORK_HEADER: u16 = 8;
const NFTA_TRACE_TRANSPORT_HEADER: u16 = 9;
const NFTA_TRACE_IIF: u16 = 10;
const NFTA_TRACE_OIF: u16 = 12;
const NFTA_TRACE_MARK: u16 = 14;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// Why the event was sent (`enum nft_trace_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceKind {
    /// A rule matched (its verdict may be `continue`).
    Rule,
    /// The end of a regular chain was reached.
    Return,
    /// The end of a base chain: its policy applies.
    Policy,
    Other,
}

/// A rule's or policy's verdict (`NF_*` and `NFT_*` codes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Drop,
    Continue,
    Return,
    Jump(String),
    Goto(String),
    Other(i32),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Continue => f.write_str("continue"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
            Verdict::Other(n) => write!(f, "verdict {n}"),
        }
    }
}

/// One trace message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TraceEvent {
    /// The nf_tables family of the table (`NFPROTO_*`: 1 inet, 2 ip, 7 bridge, 10 ip6).
    pub family: u8,
    pub table: String,
    pub chain: String,
    pub rule_handle: Option<u64>,
    pub kind: TraceKind,
    pub verdict: Option<Verdict>,
    /// The same for every event of one packet.
    pub id: u32,
    /// The packet mark after the rule ran.
    pub mark: Option<u32>,
    pub iif: Option<u32>,
    pub oif: Option<u32>,
    /// From the copied IPv4 or IPv6 header and the TCP/UDP header.
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub protocol: Option<u8>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

impl TraceEvent {
    /// Whether the event's packet is the TCP/UDP flow `src:sport → dst:dport`.
    pub fn is_flow(&self, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> bool {
        self.src == Some(src)
            && self.dst == Some(dst)
            && self.sport == Some(sport)
            && self.dport == Some(dport)
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The attributes of one attribute stream, as (type, payload); a malformed tail ends it.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

fn verdict(b: &[u8]) -> Option<Verdict> {
    let mut code = None;
    let mut chain = String::new();
    for (ty, v) in attrs(b) {
        match ty {
            NFTA_VERDICT_CODE => code = be_u32(v).map(|c| c as i32),
            NFTA_VERDICT_CHAIN => chain = cstr(v),
            _ => {}
        }
    }
    Some(match code? {
        0 => Verdict::Drop,
        1 => Verdict::Accept,
        -1 => Verdict::Continue,
        -3 => Verdict::Jump(chain),
        -4 => Verdict::Goto(chain),
        -5 => Verdict::Return,
        n => Verdict::Other(n),
    })
}

/// The trace events in a receive buffer (other messages are skipped, never an error).
pub fn parse_events(buf: &[u8]) -> Vec<TraceEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let msg = &buf[off..off + len];
        if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE && len >= NLMSG_HDRLEN + NFGENMSG_LEN {
            out.push(event(
                msg[NLMSG_HDRLEN],
                &msg[NLMSG_HDRLEN + NFGENMSG_LEN..],
            ));
        }
        off += align4(len);
    }
    out
}

fn event(family: u8, body: &[u8]) -> TraceEvent {
    let mut e = TraceEvent {
        family,
        table: String::new(),
        chain: String::new(),
        rule_handle: None,
        kind: TraceKind::Other,
        verdict: None,
        id: 0,
        mark: None,
        iif: None,
        oif: None,
        src: None,
        dst: None,
        protocol: None,
        sport: None,
        dport: None,
    };
    for (ty, v) in attrs(body) {
        match ty {
            NFTA_TRACE_TABLE => e.table = cstr(v),
            NFTA_TRACE_CHAIN => e.chain = cstr(v),
            NFTA_TRACE_RULE_HANDLE => e.rule_handle = be_u64(v),
            NFTA_TRACE_TYPE => {
                e.kind = match be_u32(v) {
                    Some(1) => TraceKind::Policy,
                    Some(2) => TraceKind::Return,
                    Some(3) => TraceKind::Rule,
                    _ => TraceKind::Other,
                }
            }
            NFTA_TRACE_VERDICT => e.verdict = verdict(v),
            NFTA_TRACE_ID => e.id = be_u32(v).unwrap_or(0),
            NFTA_TRACE_MARK => e.mark = be_u32(v),
            NFTA_TRACE_IIF => e.iif = be_u32(v),
            NFTA_TRACE_OIF => e.oif = be_u32(v),
            NFTA_TRACE_NETWORK_HEADER if v.len() >= 20 && v[0] >> 4 == 4 => {
                e.protocol = Some(v[9]);
                e.src = Some(Ipv4Addr::new(v[12], v[13], v[14], v[15]).into());
                e.dst = Some(Ipv4Addr::new(v[16], v[17], v[18], v[19]).into());
            }
            // IPv6: the fixed header's next header (no extension headers on these flows).
            NFTA_TRACE_NETWORK_HEADER if v.len() >= 40 && v[0] >> 4 == 6 => {
                let addr = |b: &[u8]| -> Option<IpAddr> {
                    let a: [u8; 16] = b.try_into().ok()?;
                    Some(Ipv6Addr::from(a).into())
                };
                e.protocol = Some(v[6]);
                e.src = addr(&v[8..24]);
                e.dst = addr(&v[24..40]);
            }
            NFTA_TRACE_TRANSPORT_HEADER if v.len() >= 4 => {
                e.sport = Some(u16::from_be_bytes([v[0], v[1]]));
                e.dport = Some(u16::from_be_bytes([v[2], v[3]]));
            }
            _ => {}
        }
    }
    e
}

/// A netlink socket subscribed to the trace events of the calling thread's network namespace.
pub struct TraceSocket {
    fd: OwnedFd,
}

impl TraceSocket {
    /// Joins `NFNLGRP_NFTRACE` (needs CAP_NET_ADMIN) in the calling thread's netns.
    pub fn open() -> io::Result<TraceSocket> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl with the family set binds to a kernel-chosen port.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let group = NFNLGRP_NFTRACE;
        // SAFETY: setsockopt with a correctly sized int.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&group as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(TraceSocket { fd })
    }

    /// Every event that arrives until `quiet` passes without one, or `deadline`.
    pub fn collect(&self, quiet: Duration, deadline: Instant) -> io::Result<Vec<TraceEvent>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(out);
            }
            let wait = quiet.min(deadline - now);
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, wait.as_millis().min(60_000) as libc::c_int) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Ok(out);
            }
            loop {
                // SAFETY: buf is writable for its length.
                let got = unsafe {
                    libc::recv(
                        self.fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if got < 0 {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        // ENOBUFS: events were lost; what arrived still counts.
                        _ if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                        _ => return Err(e),
                    }
                }
                out.extend(parse_events(&buf[..got as usize]));
            }
        }
    }
}

/// A table of its own that sets `meta nftrace` on exactly one TCP flow (both hooks where a
/// packet enters nf_tables: prerouting for forwarded and received packets, output for the
/// namespace's own), at priority -300 so every other table's chains see the flag. Removed on
/// drop; like every nft change it applies to the calling thread's netns, so it must be
/// created and dropped on the same thread.
pub struct TraceRule {
    table: String,
}

/// Priority of the trace table's chains: before conntrack (-200) and everything after it.
const TRACE_PRIO: i32 = -300;

impl TraceRule {
    /// The name of the trace table of this process (one per process and netns).
    pub fn table_name() -> String {
        format!("ambient-trace-{}", std::process::id())
    }

    /// Installs the trace table for `src:sport → dst:dport` (TCP); `None` for any source
    /// address (a host socket whose address the kernel picks) or any source port (a
    /// connection another process opens, seen arriving here).
    pub fn add(
        src: Option<IpAddr>,
        sport: Option<u16>,
        dst: IpAddr,
        dport: u16,
    ) -> Result<TraceRule, super::NftError> {
        let table = Self::table_name();
        let fam = |a: &IpAddr| if a.is_ipv4() { "ip" } else { "ip6" };
        let saddr = src
            .map(|s| format!("{} saddr {s} ", fam(&s)))
            .unwrap_or_default();
        let sport = sport.map(|p| format!("tcp sport {p} ")).unwrap_or_default();
        let flow = format!(
            "{saddr}{} daddr {dst} {sport}tcp dport {dport} meta nftrace set 1",
            fam(&dst)
        );
        let text = format!(
            "table inet {table} {{\n\
             chain prerouting {{ type filter hook prerouting priority {TRACE_PRIO}; policy accept; {flow}; }}\n\
             chain output {{ type filter hook output priority {TRACE_PRIO}; policy accept; {flow}; }}\n\
             }}\n"
        );
        super::exec::run(&["-f", "-"], Some(&text))?.into_result("add the trace table")?;
        Ok(TraceRule { table })
    }

    /// Removes the table now, reporting a failure (drop would only ignore it).
    pub fn remove(mut self) -> Result<(), super::NftError> {
        let table = std::mem::take(&mut self.table);
        super::exec::run(&["delete", "table", "inet", &table], None)?
            .into_result("delete the trace table")
            .map(|_| ())
    }
}

impl Drop for TraceRule {
    fn drop(&mut self) {
        if !self.table.is_empty() {
            let _ = super::exec::run(&["delete", "table", "inet", &self.table], None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(out: &mut Vec<u8>, ty: u16, data: &[u8]) {
        out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(data);
        out.resize(align4(out.len()), 0);
    }

    fn message(family: u8, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + NFGENMSG_LEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE).to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn a_rule_event_with_its_packet() {
        let mut body = Vec::new();
        attr(&mut body, NFTA_TRACE_TABLE, b"ambient-node\0");
        attr(&mut body, NFTA_TRACE_CHAIN, b"prerouting\0");
        attr(&mut body, NFTA_TRACE_RULE_HANDLE, &12u64.to_be_bytes());
        attr(&mut body, NFTA_TRACE_TYPE, &3u32.to_be_bytes());
        let mut v = Vec::new();
        attr(&mut v, NFTA_VERDICT_CODE, &(-5i32).to_be_bytes());
        attr(&mut body, NFTA_TRACE_VERDICT | (1 << 15), &v);
        attr(&mut body, NFTA_TRACE_ID, &0xabcdu32.to_be_bytes());
        attr(&mut body, NFTA_TRACE_MARK, &0x100u32.to_be_bytes());
        attr(&mut body, NFTA_TRACE_IIF, &7u32.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 60, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&[10, 244, 1, 4, 10, 244, 2, 3]);
        attr(&mut body, NFTA_TRACE_NETWORK_HEADER, &ip);
        attr(
            &mut body,
            NFTA_TRACE_TRANSPORT_HEADER,
            &[0xc3, 0x50, 0x23, 0x78, 0, 0, 0, 0],
        );
        let mut buf = message(1, &body);
        // Something else in the same buffer is skipped.
        let mut other = message(1, &[]);
        other[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | 3).to_ne_bytes());
        buf.extend_from_slice(&other);
        let ev = parse_events(&buf);
        assert_eq!(ev.len(), 1);
        let e = &ev[0];
        assert_eq!(
            (e.family, e.table.as_str(), e.chain.as_str()),
            (1, "ambient-node", "prerouting")
        );
        assert_eq!(e.rule_handle, Some(12));
        assert_eq!(e.kind, TraceKind::Rule);
        assert_eq!(e.verdict, Some(Verdict::Return));
        assert_eq!(
            (e.id, e.mark, e.iif, e.oif),
            (0xabcd, Some(0x100), Some(7), None)
        );
        assert!(e.is_flow(
            Ipv4Addr::new(10, 244, 1, 4).into(),
            50000,
            Ipv4Addr::new(10, 244, 2, 3).into(),
            9080
        ));
        assert_eq!(e.protocol, Some(6));
    }

    #[test]
    fn an_ipv6_packet_gives_its_addresses() {
        let mut body = Vec::new();
        attr(&mut body, NFTA_TRACE_TABLE, b"ztunnel\0");
        let src: Ipv6Addr = "fd00:10:244:1::4".parse().unwrap();
        let dst: Ipv6Addr = "fd00:10:244:2::3".parse().unwrap();
        let mut ip = vec![0x60, 0, 0, 0, 0, 40, 6, 64];
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        attr(&mut body, NFTA_TRACE_NETWORK_HEADER, &ip);
        attr(
            &mut body,
            NFTA_TRACE_TRANSPORT_HEADER,
            &[0xc3, 0x50, 0x3a, 0xb0, 0, 0, 0, 0],
        );
        let e = &parse_events(&message(10, &body))[0];
        assert_eq!(e.protocol, Some(6));
        assert!(e.is_flow(src.into(), 50000, dst.into(), 15024));
        // A v6 header cut short gives no addresses.
        let mut body = Vec::new();
        attr(&mut body, NFTA_TRACE_NETWORK_HEADER, &ip[..39]);
        let e = &parse_events(&message(10, &body))[0];
        assert_eq!((e.src, e.dst), (None, None));
    }

    #[test]
    fn truncated_input_gives_what_is_whole() {
        let mut body = Vec::new();
        attr(&mut body, NFTA_TRACE_CHAIN, b"output\0");
        let buf = message(2, &body);
        for cut in 0..buf.len() {
            let ev = parse_events(&buf[..cut]);
            assert!(ev.is_empty(), "cut {cut}");
        }
        // An attribute claiming more than the message holds ends the attributes.
        let mut bad = body.clone();
        bad[0..2].copy_from_slice(&200u16.to_ne_bytes());
        let ev = parse_events(&message(2, &bad));
        assert_eq!(ev[0].chain, "");
        let mut v = Vec::new();
        attr(&mut v, NFTA_VERDICT_CODE, &(-3i32).to_be_bytes());
        attr(&mut v, NFTA_VERDICT_CHAIN, b"sub\0");
        assert_eq!(verdict(&v), Some(Verdict::Jump("sub".into())));
        assert_eq!(verdict(&[]), None);
    }
}
