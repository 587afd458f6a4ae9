//! Every name, mark, table, priority and port of the traffic path (SPEC §1), written once.
//! Other modules and crates refer to these; a reader of the SPEC should recognise each name.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The nft set of ambient pod IPs on the node (an ipset of the same name in the original).
pub const POD_SET: &str = "ztunnel-pods-ips";
/// The IPv6 twin of [`POD_SET`] (the SPEC's path mirrored for IPv6: same marks, rule
/// priorities and table numbers in the kernel's IPv6 policy routing).
pub const POD_SET_V6: &str = "ztunnel-pods-ips6";
/// Anti-spoofing: `<device> . <address>` of every enrolled pod address (nft type `ifname .
/// ipv4_addr`), the device being the one the pod's packets have as input device in the node's
/// IP layer (its host veth, or with a bridge-type primary the bridge). Capture requires a match,
/// and an address of [`POD_SET`] arriving on any other device is dropped.
pub const POD_IIF_SET: &str = "ztunnel-pods-iifs";
/// The IPv6 twin of [`POD_IIF_SET`] (`ifname . ipv6_addr`), filled like [`POD_SET_V6`].
pub const POD_IIF_SET_V6: &str = "ztunnel-pods-iifs6";
/// Anti-spoofing on bridge ports (the node's `bridge` family table): `<host veth> . <address>`
/// of every enrolled pod address. With a bridge-type primary, routing sees the bridge as input
/// device for every pod, so which port a frame came in on is checked here.
pub const POD_PORT_SET: &str = "ztunnel-pods-ports";
/// The IPv6 twin of [`POD_PORT_SET`].
pub const POD_PORT_SET_V6: &str = "ztunnel-pods-ports6";
/// Prefix of the (rate-limited) kernel log line for a dropped packet with a spoofed pod source.
pub const SPOOF_LOG_PREFIX: &str = "ambient-node spoofed pod source: ";
/// At most this many of those log lines per minute (burst as many), per rule.
pub const SPOOF_LOG_PER_MINUTE: u32 = 10;
/// The node's nftables tables: family inet (capture) and family bridge (anti-spoofing on bridge
/// ports), both of this name; and the ztunnel netns' table (family ip).
pub const NODE_NFT_TABLE: &str = "ambient-node";
pub const ZTUNNEL_NFT_TABLE: &str = "ztunnel";

/// Node marks (SPEC §1). The low bits are flags; 0x210/0x220 carry the skip bit 0x200.
pub mod mark {
    /// Capture outbound: route by table 101 into `istioout`.
    pub const CAPTURE: u32 = 0x100;
    /// Skip: route by the main table (rule 100 jumps to 32766).
    pub const SKIP: u32 = 0x200;
    /// Skip + "spoofed by ztunnel" (saved in the connmark).
    pub const SPOOFED: u32 = 0x210;
    /// Skip + "ztunnel's or the node's own" (saved in the connmark).
    pub const OWN: u32 = 0x220;
    /// Return the rest of a captured flow to ztunnel over its veth (table 102).
    pub const RETURN: u32 = 0x040;
}

/// Marks inside the ztunnel netns (SPEC §1, §3), matched under [`ZT_MARK_MASK`].
pub mod zt_mark {
    /// Set by TPROXY on captured connections.
    pub const TPROXY: u32 = 0x400;
    /// Replies to ztunnel's spoofed upstream sockets, delivered locally via table 100.
    pub const SPOOF_REPLY: u32 = 0x4d3;
    pub const MASK: u32 = 0xfff;
}

/// Node policy-routing rule priorities (SPEC §1).
pub mod rule {
    /// `fwmark 0x200/0x200 goto 32766`
    pub const SKIP: u32 = 100;
    /// `fwmark 0x100/0x100 lookup 101`
    pub const CAPTURE: u32 = 101;
    /// `fwmark 0x40/0x40 lookup 102`
    pub const RETURN: u32 = 102;
    /// `lookup 100`
    pub const INBOUND: u32 = 103;
    /// The kernel's `from all lookup main` rule, target of rule 100's goto.
    pub const MAIN: u32 = 32766;
    /// Every priority the node agent owns.
    pub const ALL: [u32; 4] = [SKIP, CAPTURE, RETURN, INBOUND];
}

/// Node routing tables (SPEC §1).
pub mod table {
    /// Per-pod routes into `istioin`.
    pub const INBOUND: u32 = 100;
    /// Captured outbound traffic: default via `istioout`.
    pub const OUTBOUND: u32 = 101;
    /// The rest of captured flows: default via the ztunnel veth.
    pub const RETURN: u32 = 102;
    pub const ALL: [u32; 3] = [INBOUND, OUTBOUND, RETURN];
}

/// ztunnel netns rule priorities and tables (SPEC §1, §3).
pub mod zt_rule {
    /// `fwmark 0x400/0xfff lookup 100`
    pub const TPROXY: u32 = 20000;
    /// `fwmark 0x4d3/0xfff lookup 100`
    pub const SPOOF_REPLY: u32 = 20003;
    pub const ALL: [u32; 2] = [TPROXY, SPOOF_REPLY];
    /// `local 0.0.0.0/0 dev lo`
    pub const TABLE_LOCAL: u32 = 100;
    /// `default via 192.168.127.1 dev pistioout`
    pub const TABLE_OUTBOUND: u32 = 101;
    /// `default via 192.168.126.1 dev pistioin`
    pub const TABLE_INBOUND: u32 = 102;
}

/// One end of one tunnel: its device name, VNI, /30 address and /126 IPv6 address; `peer` /
/// `peer6` are the other end's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelEnd {
    pub name: &'static str,
    pub vni: u32,
    pub addr: Ipv4Addr,
    pub peer: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub peer6: Ipv6Addr,
}

pub const TUNNEL_PREFIX_LEN: u8 = 30;
/// The tunnels' IPv6 inner networks: one ULA /126 per tunnel, beside the /30s, in
/// `fd69:7374:696f::/48` ("isti o"), subnet 126 for `istioin`, 127 for `istioout`.
pub const TUNNEL_PREFIX_LEN6: u8 = 126;

const fn ula(subnet: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd69, 0x7374, 0x696f, subnet, 0, 0, 0, host)
}
/// Default UDP port of both tunnels (Geneve's IANA port; VXLAN uses it too here).
pub const TUNNEL_PORT: u16 = 6081;
/// Geneve without options and VXLAN both add 50 bytes to the inner packet.
pub const TUNNEL_OVERHEAD: u32 = 50;

pub const ISTIOIN: TunnelEnd = TunnelEnd {
    name: "istioin",
    vni: 1000,
    addr: Ipv4Addr::new(192, 168, 126, 1),
    peer: Ipv4Addr::new(192, 168, 126, 2),
    addr6: ula(0x126, 1),
    peer6: ula(0x126, 2),
};
pub const ISTIOOUT: TunnelEnd = TunnelEnd {
    name: "istioout",
    vni: 1001,
    addr: Ipv4Addr::new(192, 168, 127, 1),
    peer: Ipv4Addr::new(192, 168, 127, 2),
    addr6: ula(0x127, 1),
    peer6: ula(0x127, 2),
};
pub const PISTIOIN: TunnelEnd = TunnelEnd {
    name: "pistioin",
    vni: 1000,
    addr: Ipv4Addr::new(192, 168, 126, 2),
    peer: Ipv4Addr::new(192, 168, 126, 1),
    addr6: ula(0x126, 2),
    peer6: ula(0x126, 1),
};
pub const PISTIOOUT: TunnelEnd = TunnelEnd {
    name: "pistioout",
    vni: 1001,
    addr: Ipv4Addr::new(192, 168, 127, 2),
    peer: Ipv4Addr::new(192, 168, 127, 1),
    addr6: ula(0x127, 2),
    peer6: ula(0x127, 1),
};

/// ztunnel ports (SPEC §1).
pub mod port {
    pub const OUTBOUND: u16 = 15001;
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    pub const INBOUND_HBONE: u16 = 15008;
    pub const ADMIN: u16 = 15000;
    pub const METRICS: u16 = 15020;
    pub const READINESS: u16 = 15021;
    pub const DNS: u16 = 15053;
}

/// The ztunnel netns's per-source limit on new connections into 15001/15006/15008: a
/// source's SYNs beyond this rate (after a burst) are dropped before conntrack, so one pod's
/// connection flood cannot fill ztunnel's accept queues and take its CPU from everyone else's
/// connections (a dropped SYN is retransmitted by the sender after 1 s: a flooder slows itself).
/// Not in the original; ztunnel-init's `--new-connections-per-source` changes it, 0 turns it off.
pub mod syn_limit {
    /// New connections per second per source address.
    pub const PER_SECOND: u32 = 1000;
    /// Connections a source may open at once beyond the rate.
    pub const BURST: u32 = 2000;
    /// A source's bucket is forgotten after this many idle seconds.
    pub const IDLE_SECONDS: u32 = 10;
    /// The nft meters (one per family table) and the iptables hashlimit names.
    pub const METER: &str = "ztunnel-syn-limit";
    pub const METER_V6: &str = "ztunnel-syn-limit6";
    /// The rule's comment text (the IPv6 one starts with "IPv6 ").
    pub const TEXT: &str = "new connections from one source over its rate: drop";

    /// (meter or hashlimit name, rule text) of a family.
    pub fn names(v6: bool) -> (&'static str, &'static str) {
        match v6 {
            false => (METER, TEXT),
            true => (
                METER_V6,
                "IPv6 new connections from one source over its rate: drop",
            ),
        }
    }
}

/// Membership (SPEC §1).
pub mod membership {
    pub const NAMESPACE_LABEL: &str = "istio.io/dataplane-mode";
    pub const NAMESPACE_LABEL_VALUE: &str = "ambient";
    pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
    pub const REDIRECTION_DISABLED: &str = "disabled";
    pub const REDIRECTION_ENABLED: &str = "enabled";
    pub const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &["kube-system"];
}

/// Where the node agent listens for the CNI plugin by default (root-only).
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambient/agent.sock";
