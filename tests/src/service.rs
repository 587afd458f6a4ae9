//! The lab's Services, programmed the way kube-proxy's nftables mode would: a DNAT of each
//! ClusterIP to its backend pods (one at random per connection when there are several), in
//! prerouting (pod traffic) and output (node traffic). The output chain says `priority -100`
//! (= dstnat): this nft (1.0.x) rejects the name `dstnat` on the output hook.
//!
//! IPv6 ClusterIPs get the same DNAT in a `table ip6 kube-proxy` (kube-proxy's nftables mode
//! keeps one table per family too), with the same two chains and priorities.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use ambient_net::netns;
use anyhow::{bail, Context, Result};

use crate::procs;

pub const SERVICE_NAME: &str = "app";
pub const SERVICE_NAMESPACE: &str = "demo";
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const SERVICE_PORT: u16 = 80;
/// The nft table (family ip) holding the DNAT.
pub const TABLE: &str = "kube-proxy";

/// The reviews Services (HTTP on the pods' [`crate::topology::HTTP_PORT`], behind the
/// waypoint): `demo/reviews` (both versions) and one per version, named by the HTTPRoute's
/// backendRefs.
pub const REVIEWS: &str = "reviews";
pub const REVIEWS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const REVIEWS_V1: &str = "reviews-v1";
pub const REVIEWS_V1_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
pub const REVIEWS_V2: &str = "reviews-v2";
pub const REVIEWS_V2_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);

/// The v6 ClusterIPs (in `topology::SERVICE_CIDR6`): the v4 ones' last octet as the last
/// group, so `10.96.0.20` and `fd00:10:96::20` are the same Service.
pub const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
pub const REVIEWS_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x20);
pub const REVIEWS_V1_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x21);
pub const REVIEWS_V2_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x22);

/// One Service port of one family as kube-proxy programs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnat {
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// At least one, of `cluster_ip`'s family.
    pub backends: Vec<IpAddr>,
    pub target_port: u16,
}

impl Dnat {
    /// The nft rule: `dnat to <ip>:<port>` (`[<ip>]:<port>` for v6), or with several
    /// backends a random pick (`numgen random mod N map { 0 : ip0, ... }:port`, as
    /// kube-proxy's vmap of endpoints).
    pub fn rule(&self) -> String {
        let Dnat {
            cluster_ip,
            port,
            target_port,
            ..
        } = self;
        let daddr = match cluster_ip {
            IpAddr::V4(_) => "ip daddr",
            IpAddr::V6(_) => "ip6 daddr",
        };
        let to = match self.backends.as_slice() {
            [IpAddr::V6(one)] => format!("[{one}]:{target_port}"),
            [one] => format!("{one}:{target_port}"),
            many => {
                let map: Vec<String> = many
                    .iter()
                    .enumerate()
                    .map(|(i, ip)| format!("{i} : {ip}"))
                    .collect();
                format!(
                    "numgen random mod {} map {{ {} }}:{target_port}",
                    many.len(),
                    map.join(", ")
                )
            }
        };
        format!("{daddr} {cluster_ip} tcp dport {port} dnat to {to}")
    }
}

/// The nft script for one node with one Service.
pub fn render(cluster_ip: Ipv4Addr, port: u16, backend: Ipv4Addr, target_port: u16) -> String {
    render_all(&[Dnat {
        cluster_ip: cluster_ip.into(),
        port,
        backends: vec![backend.into()],
        target_port,
    }])
}

/// The nft script for one node: every Service's rule in both chains, the v4 ones in
/// `table ip kube-proxy`, the v6 ones in `table ip6 kube-proxy` (a table only when it has
/// rules).
pub fn render_all(services: &[Dnat]) -> String {
    let (v4, v6): (Vec<&Dnat>, Vec<&Dnat>) = services.iter().partition(|d| d.cluster_ip.is_ipv4());
    let mut out = String::new();
    for (family, rules) in [("ip", v4), ("ip6", v6)] {
        if !rules.is_empty() {
            out.push_str(&render_table(family, &rules));
        }
    }
    out
}

fn render_table(family: &str, services: &[&Dnat]) -> String {
    let rule = services
        .iter()
        .map(|d| d.rule())
        .collect::<Vec<_>>()
        .join("\n\t\t");
    format!(
        "table {family} {TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\t{rule}\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\t{rule}\n\
         \t}}\n\
         }}\n"
    )
}

/// The same Services the way kube-proxy's iptables mode programs them, for a lab whose agent
/// runs the iptables backend (the original's kube-proxy coexistence, an ACCEPT ahead of
/// `KUBE-SERVICES`, only stops DNAT in the same tables): `iptables-restore --noflush` input per
/// family (`None` when the family has no Service), a `KUBE-SERVICES` chain in nat jumped to
/// from PREROUTING and OUTPUT, one DNAT per ClusterIP port, several backends picked at random
/// (`-m statistic --mode random --probability 1/n`, then 1/(n-1), …, the last unconditional).
pub fn render_iptables(services: &[Dnat]) -> (Option<String>, Option<String>) {
    let family = |v6: bool| {
        let rules: Vec<String> = services
            .iter()
            .filter(|d| d.cluster_ip.is_ipv6() == v6)
            .flat_map(|d| {
                let prefix = if v6 { 128 } else { 32 };
                let n = d.backends.len();
                d.backends.iter().enumerate().map(move |(i, b)| {
                    let to = match b {
                        IpAddr::V6(b) => format!("[{b}]:{}", d.target_port),
                        IpAddr::V4(b) => format!("{b}:{}", d.target_port),
                    };
                    let pick = if i + 1 < n {
                        format!(
                            " -m statistic --mode random --probability {:.5}",
                            1.0 / (n - i) as f64
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        "-A KUBE-SERVICES -d {}/{prefix} -p tcp -m tcp --dport {}{pick} -j DNAT --to-destination {to}",
                        d.cluster_ip, d.port
                    )
                })
            })
            .collect();
        (!rules.is_empty()).then(|| {
            format!(
                "*nat\n:KUBE-SERVICES - [0:0]\n\
                 -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                 -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
                 {}\nCOMMIT\n",
                rules.join("\n")
            )
        })
    };
    (family(false), family(true))
}

/// Loads iptables-restore input (`--noflush`) into the named netns, with `iptables-restore` or
/// `ip6tables-restore`.
pub fn apply_iptables(netns_name: &str, v6: bool, script: &str) -> Result<()> {
    let bin = if v6 {
        "ip6tables-restore"
    } else {
        "iptables-restore"
    };
    let mut cmd = Command::new(bin);
    cmd.args(["-w", "5", "--noflush"]);
    netns::command_in(&mut cmd, &netns::named_path(netns_name))?;
    let out = procs::run_capture(&mut cmd, Some(script.as_bytes()), Duration::from_secs(20))
        .with_context(|| format!("{bin} in netns {netns_name}"))?;
    if !out.status.success() {
        bail!(
            "{bin} --noflush in netns {netns_name} failed ({}): {}\ninput:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Loads `script` with `nft -f -` inside the named netns.
pub fn apply(netns_name: &str, script: &str) -> Result<()> {
    let mut cmd = Command::new("nft");
    cmd.arg("-f").arg("-");
    netns::command_in(&mut cmd, &netns::named_path(netns_name))?;
    let out = procs::run_capture(&mut cmd, Some(script.as_bytes()), Duration::from_secs(20))
        .with_context(|| format!("nft in netns {netns_name}"))?;
    if !out.status.success() {
        bail!(
            "nft -f - in netns {netns_name} failed ({}): {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_mode_services() {
        let d = Dnat {
            cluster_ip: CLUSTER_IP.into(),
            port: 80,
            backends: vec![
                Ipv4Addr::new(10, 244, 1, 6).into(),
                Ipv4Addr::new(10, 244, 2, 6).into(),
            ],
            target_port: 8080,
        };
        let (v4, v6) = render_iptables(&[d]);
        let v4 = v4.unwrap();
        assert!(v6.is_none());
        assert!(v4.starts_with("*nat\n:KUBE-SERVICES - [0:0]\n"), "{v4}");
        assert!(v4.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(v4.contains("-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m statistic --mode random --probability 0.50000 -j DNAT --to-destination 10.244.1.6:8080"), "{v4}");
        assert!(v4.contains("-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.244.2.6:8080\nCOMMIT\n"), "{v4}");
        let d6 = Dnat {
            cluster_ip: CLUSTER_IP6.into(),
            port: 80,
            backends: vec!["fd00:10:244:2::3".parse().unwrap()],
            target_port: 9080,
        };
        let (_, v6) = render_iptables(&[d6]);
        assert!(v6.unwrap().contains("-d fd00:10:96::10/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd00:10:244:2::3]:9080"));
    }

    #[test]
    fn script() {
        let s = render(CLUSTER_IP, 80, Ipv4Addr::new(10, 244, 2, 3), 9080);
        assert!(s.starts_with("table ip kube-proxy {"));
        assert_eq!(
            s.matches("ip daddr 10.96.0.10 tcp dport 80 dnat to 10.244.2.3:9080")
                .count(),
            2
        );
        assert!(s.contains("type nat hook prerouting priority dstnat;"));
        assert!(s.contains("type nat hook output priority -100;"));
    }

    #[test]
    fn several_services_and_backends() {
        let s = render_all(&[
            Dnat {
                cluster_ip: CLUSTER_IP.into(),
                port: 80,
                backends: vec![Ipv4Addr::new(10, 244, 2, 3).into()],
                target_port: 9080,
            },
            Dnat {
                cluster_ip: REVIEWS_IP.into(),
                port: 80,
                backends: vec![
                    Ipv4Addr::new(10, 244, 1, 6).into(),
                    Ipv4Addr::new(10, 244, 2, 6).into(),
                ],
                target_port: 8080,
            },
        ]);
        let multi = "ip daddr 10.96.0.20 tcp dport 80 dnat to numgen random mod 2 \
                     map { 0 : 10.244.1.6, 1 : 10.244.2.6 }:8080";
        assert_eq!(s.matches(multi).count(), 2, "{s}");
        assert_eq!(s.matches("dnat to 10.244.2.3:9080").count(), 2, "{s}");
        assert!(!s.contains("ip6"), "an ipv4 lab has no v6 table: {s}");
    }

    #[test]
    fn v6_services_get_an_ip6_table() {
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let s = render_all(&[
            Dnat {
                cluster_ip: CLUSTER_IP.into(),
                port: 80,
                backends: vec![Ipv4Addr::new(10, 244, 2, 3).into()],
                target_port: 9080,
            },
            Dnat {
                cluster_ip: CLUSTER_IP6.into(),
                port: 80,
                backends: vec![v6("fd00:10:244:2::3")],
                target_port: 9080,
            },
            Dnat {
                cluster_ip: REVIEWS_IP6.into(),
                port: 80,
                backends: vec![v6("fd00:10:244:1::6"), v6("fd00:10:244:2::6")],
                target_port: 8080,
            },
        ]);
        let (t4, t6) = s.split_once("table ip6 kube-proxy {").expect(&s);
        assert!(t4.starts_with("table ip kube-proxy {"), "{s}");
        assert_eq!(t4.matches("dnat to 10.244.2.3:9080").count(), 2, "{s}");
        assert!(!t4.contains("fd00"), "{s}");
        assert_eq!(
            t6.matches("ip6 daddr fd00:10:96::10 tcp dport 80 dnat to [fd00:10:244:2::3]:9080")
                .count(),
            2,
            "{s}"
        );
        let multi = "ip6 daddr fd00:10:96::20 tcp dport 80 dnat to numgen random mod 2 \
                     map { 0 : fd00:10:244:1::6, 1 : fd00:10:244:2::6 }:8080";
        assert_eq!(t6.matches(multi).count(), 2, "{s}");
        assert!(t6.contains("type nat hook output priority -100;"), "{s}");
    }
}
