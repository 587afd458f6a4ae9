//! Tests against the real kernel and nft. Each runs in network namespaces of its own
//! (`nfttest-<pid>-<n>`, deleted by a guard even when the test fails); without root or nft
//! they are skipped with a message.

use super::*;
use crate::consts;
use crate::netns;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A named netns deleted on drop.
struct TestNs {
    name: String,
    path: PathBuf,
}

impl TestNs {
    fn new() -> TestNs {
        let name = format!(
            "nfttest-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let path = netns::create_named(&name).expect("create netns");
        TestNs { name, path }
    }

    /// Runs `f` inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        netns::run_in(&self.path, f).expect("enter netns")
    }

    /// `nft <args>` in the namespace, stdout on success.
    fn nft(&self, args: &[&str]) -> String {
        self.run(|| exec::run(args, None).and_then(|o| o.into_result("test")))
            .unwrap_or_else(|e| panic!("nft {args:?}: {e}"))
    }

    fn nft_stdin(&self, script: &str) {
        self.run(|| exec::run(&["-f", "-"], Some(script)).and_then(|o| o.into_result("test")))
            .unwrap_or_else(|e| panic!("nft -f: {e}\n{script}"));
    }

    /// `ip -n <ns> <args>`.
    fn ip(&self, args: &str) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args.split_whitespace())
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if let Err(e) = netns::delete_named(&self.name) {
            eprintln!("deleting netns {}: {e}", self.name);
        }
    }
}

/// Root and nft available; otherwise the test is skipped (reported on stderr).
fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    if !nft_program().exists() && Command::new(nft_program()).arg("-v").output().is_err() {
        eprintln!("skipped: nft not installed");
        return false;
    }
    true
}

fn node_desired(zt: [u8; 4]) -> NodeNft {
    NodeNft {
        rules: Some(NodeRules {
            ztunnel_veth: "veth-zt".into(),
            ztunnel_bridge: None,
            ztunnel_mac: String::new(),
            ztunnel_ip: zt.into(),
            node_gateways: vec![Ipv4Addr::new(10, 4, 4, 1)],
            tunnel_port: consts::TUNNEL_PORT,
        }),
        pods_v4: [Ipv4Addr::new(10, 4, 4, 19)].into(),
        pods_v6: ["fd00::19".parse().unwrap()].into(),
    }
}

#[test]
fn node_table_in_a_fresh_netns() {
    if !can_run() {
        return;
    }
    let ns = TestNs::new();
    let d = node_desired([10, 4, 4, 18]);
    assert_eq!(ns.run(observe_node).unwrap(), None);
    assert!(
        ns.run(|| reconcile_node(&d)).unwrap(),
        "first reconcile changes"
    );
    assert!(
        !ns.run(|| reconcile_node(&d)).unwrap(),
        "second reconcile is a no-op"
    );

    let text = ns.nft(&["list", "ruleset"]);
    for want in [
        "table inet ambient-node",
        "set ztunnel-pods-ips {",
        "type ipv4_addr",
        "elements = { 10.4.4.19 }",
        "type ipv6_addr",
        "type filter hook prerouting priority mangle; policy accept;",
        "iifname { \"istioin\", \"istioout\" } meta mark set meta mark | 0x00000200 return",
        "udp dport 6081 return",
        "ct mark & 0x00000220 == 0x00000220 meta mark set meta mark | 0x00000200 return",
        "ct mark & 0x00000210 == 0x00000210 meta mark set meta mark | 0x00000040 return",
        "iifname \"veth-zt\" ip saddr != 10.4.4.18 meta mark set meta mark | 0x00000210 return",
        "iifname \"veth-zt\" meta mark set meta mark | 0x00000220 return",
        "meta l4proto udp meta mark set meta mark | 0x00000220 return",
        "meta l4proto tcp ip saddr @ztunnel-pods-ips meta mark set meta mark | 0x00000100",
        "type filter hook forward priority mangle; policy accept;",
        "type filter hook input priority mangle; policy accept;",
        "meta mark & 0x00000220 == 0x00000220 ct mark set ct mark | 0x00000220",
        "meta mark & 0x00000210 == 0x00000210 ct mark set ct mark | 0x00000210",
        "type route hook output priority mangle; policy accept;",
        "ip saddr 10.4.4.1 meta mark set meta mark | 0x00000220",
        "type nat hook prerouting priority dstnat - 10; policy accept;",
        "dnat ip to ip daddr",
        "type nat hook postrouting priority srcnat - 10; policy accept;",
        "snat ip to ip saddr",
        "comment \"TCP from an ambient pod: capture outbound [ambient 8/8 ",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }

    let obs = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(obs.chains.len(), 6);
    assert_eq!(obs.chains[chain::PREROUTING].rule_count(), 8);
    assert_eq!(obs.pods_v4(), d.pods_v4);
    assert_eq!(obs.pods_v6(), d.pods_v6);

    // Fast path: add, present, delete twice, delete absent.
    let (a, b) = (
        Ipv4Addr::new(10, 4, 4, 40),
        "fd00::40".parse::<Ipv6Addr>().unwrap(),
    );
    ns.run(|| add_pod_elements(&[a], &[b])).unwrap();
    ns.run(|| add_pod_elements(&[a], &[b])).unwrap();
    assert!(ns.run(|| pod_element_present(a.into())).unwrap());
    assert!(ns.run(|| pod_element_present(b.into())).unwrap());
    ns.run(|| delete_pod_elements(&[a], &[b])).unwrap();
    ns.run(|| delete_pod_elements(&[a], &[b])).unwrap();
    assert!(!ns.run(|| pod_element_present(a.into())).unwrap());
    assert!(!ns.run(|| pod_element_present(b.into())).unwrap());
    assert!(ns
        .run(|| pod_element_present(Ipv4Addr::new(10, 4, 4, 19).into()))
        .unwrap());
    ns.run(|| delete_pod_elements(&[], &[])).unwrap();
    // Elements added behind the agent's back are removed by reconcile, without touching chains.
    ns.run(|| add_pod_elements(&[a], &[])).unwrap();
    let before = ns.run(observe_node).unwrap().unwrap();
    assert!(ns.run(|| reconcile_node(&d)).unwrap());
    let after = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(after.pods_v4(), d.pods_v4);
    assert_eq!(after.chains, before.chains);

    // A different ztunnel IP rewrites the prerouting chain and nothing else.
    let d2 = node_desired([10, 4, 4, 30]);
    assert!(ns.run(|| reconcile_node(&d2)).unwrap());
    let changed = ns.run(observe_node).unwrap().unwrap();
    for (name, c) in &changed.chains {
        if name == chain::PREROUTING {
            assert_ne!(c.handles(), after.chains[name].handles());
        } else {
            assert_eq!(
                c.handles(),
                after.chains[name].handles(),
                "{name} untouched"
            );
        }
    }
    assert_eq!(changed.sets, after.sets);
    assert!(ns
        .nft(&[
            "list",
            "chain",
            "inet",
            consts::NODE_NFT_TABLE,
            chain::PREROUTING
        ])
        .contains("ip saddr != 10.4.4.30"));
    assert!(!ns.run(|| reconcile_node(&d2)).unwrap());

    // No ztunnel: chains stay, empty; pods stay.
    let none = NodeNft {
        rules: None,
        ..d2.clone()
    };
    assert!(ns.run(|| reconcile_node(&none)).unwrap());
    let empty = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(empty.chains.len(), 6);
    assert!(empty.chains.values().all(|c| c.rules.is_empty()));
    assert_eq!(empty.pods_v4(), d2.pods_v4);
    assert!(!ns.run(|| reconcile_node(&none)).unwrap());

    // Damage repaired in place: a foreign rule, a chain at the wrong priority, a stray chain.
    assert!(ns.run(|| reconcile_node(&d2)).unwrap());
    ns.nft_stdin(&format!(
        "add rule inet {t} {c} meta l4proto icmp accept\n\
         delete chain inet {t} {n}\n\
         add chain inet {t} {n} {{ type nat hook prerouting priority dstnat; }}\n\
         add chain inet {t} stray {{ type filter hook input priority 0; }}\n",
        t = consts::NODE_NFT_TABLE,
        c = chain::FORWARD,
        n = chain::NAT_PREROUTING,
    ));
    assert!(ns.run(|| reconcile_node(&d2)).unwrap());
    let fixed = ns.run(observe_node).unwrap().unwrap();
    assert!(is_empty(&plan_node(&d2, Some(&fixed))));
    assert!(!fixed.chains.contains_key("stray"));
    assert_eq!(fixed.chains[chain::NAT_PREROUTING].prio, Some(-110));

    ns.run(delete_node_table).unwrap();
    ns.run(delete_node_table).unwrap();
    assert_eq!(ns.nft(&["list", "ruleset"]).trim(), "");
    assert_eq!(ns.run(observe_node).unwrap(), None);
    // Deleting from a missing table is fine; CHECK says absent.
    ns.run(|| delete_pod_elements(&[a], &[b])).unwrap();
    assert!(!ns.run(|| pod_element_present(a.into())).unwrap());
    // Adding without a table creates table and sets only.
    ns.run(|| add_pod_elements(&[a], &[])).unwrap();
    let bare = ns.run(observe_node).unwrap().unwrap();
    assert!(bare.chains.is_empty());
    assert_eq!(bare.pods_v4(), [a].into());
    // A later reconcile completes it.
    assert!(ns.run(|| reconcile_node(&d2)).unwrap());
    assert!(!ns.run(|| reconcile_node(&d2)).unwrap());
    ns.run(delete_node_table).unwrap();
}

#[test]
fn ztunnel_table_in_a_fresh_netns() {
    if !can_run() {
        return;
    }
    let ns = TestNs::new();
    let z = ZtunnelRules {
        ztunnel_ip: Ipv4Addr::new(10, 4, 4, 18),
        pod_iface: "eth0".into(),
    };
    assert!(ns.run(|| reconcile_ztunnel(&z)).unwrap());
    assert!(!ns.run(|| reconcile_ztunnel(&z)).unwrap());
    let text = ns.nft(&["list", "ruleset"]);
    for want in [
        "table ip ztunnel",
        "type filter hook prerouting priority mangle; policy accept;",
        "iifname \"pistioin\" tcp dport 15008 tproxy to 127.0.0.1:15008 meta mark set meta mark & 0xfffff400 | 0x00000400 accept",
        "iifname \"pistioout\" meta l4proto tcp tproxy to 127.0.0.1:15001 meta mark set meta mark & 0xfffff400 | 0x00000400 accept",
        "iifname \"pistioin\" meta l4proto tcp tproxy to 127.0.0.1:15006 meta mark set meta mark & 0xfffff400 | 0x00000400 accept",
        "iifname \"eth0\" meta l4proto tcp ip daddr != 10.4.4.18 meta mark set meta mark & 0xfffff4d3 | 0x000004d3",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let z2 = ZtunnelRules {
        ztunnel_ip: Ipv4Addr::new(10, 4, 4, 30),
        ..z.clone()
    };
    assert!(ns.run(|| reconcile_ztunnel(&z2)).unwrap());
    assert!(!ns.run(|| reconcile_ztunnel(&z2)).unwrap());
    let obs = ns.run(observe_ztunnel).unwrap().unwrap();
    assert_eq!(obs.chains[chain::PREROUTING].rule_count(), 4);
    assert!(ns
        .nft(&["list", "ruleset"])
        .contains("ip daddr != 10.4.4.30"));
    ns.run(delete_ztunnel_table).unwrap();
    ns.run(delete_ztunnel_table).unwrap();
    assert_eq!(ns.nft(&["list", "ruleset"]).trim(), "");
}

#[test]
fn reports_nft_errors_with_stderr() {
    if !can_run() {
        return;
    }
    let ns = TestNs::new();
    let mut b = nftables::batch::Batch::new();
    b.delete(NfListObject::Chain(NODE.chain_ref("nope")));
    let err = ns.run(|| apply(&b.to_nftables())).unwrap_err();
    match err {
        NftError::Failed { stderr, .. } => {
            assert!(stderr.contains("No such file or directory"), "{stderr}")
        }
        e => panic!("{e}"),
    }
}

/// Waits for a connection on either listener: (which port accepted, local, peer).
fn accept_either(listeners: &[&TcpListener]) -> (u16, SocketAddr, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for l in listeners {
            match l.accept() {
                Ok((mut s, peer)) => {
                    let local = s.local_addr().unwrap();
                    let _ = s.write_all(b"ok");
                    return (l.local_addr().unwrap().port(), local, peer);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        assert!(Instant::now() < deadline, "no connection arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// kube-proxy coexistence, end to end over three namespaces:
/// pod 10.244.1.5 ── node (forwards; kube-proxy-style DNAT 10.96.0.10:80 → 10.244.9.9:9080
/// and masquerade; our table) ── server 10.244.9.9 (also owns 10.96.0.10).
/// Captured (pod in the set): the server sees the ClusterIP as destination and the pod as
/// source. Not captured: kube-proxy's DNAT and masquerade apply as usual.
#[test]
fn captured_traffic_skips_kube_proxy_nat() {
    if !can_run() {
        return;
    }
    let (pod, node, srv) = (TestNs::new(), TestNs::new(), TestNs::new());
    node.ip(&format!(
        "link add vp0 type veth peer name eth0 netns {}",
        pod.name
    ));
    node.ip(&format!(
        "link add vs0 type veth peer name eth0 netns {}",
        srv.name
    ));
    for (ns, cmds) in [
        (
            &pod,
            vec![
                "addr add 10.244.1.5/24 dev eth0",
                "link set eth0 up",
                "link set lo up",
                "route add default via 10.244.1.1",
            ],
        ),
        (
            &node,
            vec![
                "addr add 10.244.1.1/24 dev vp0",
                "link set vp0 up",
                "addr add 10.244.9.1/24 dev vs0",
                "link set vs0 up",
                "link set lo up",
                "route add 10.96.0.10/32 via 10.244.9.9",
            ],
        ),
        (
            &srv,
            vec![
                "addr add 10.244.9.9/24 dev eth0",
                "link set eth0 up",
                "link set lo up",
                "addr add 10.96.0.10/32 dev lo",
                "route add default via 10.244.9.1",
            ],
        ),
    ] {
        for c in cmds {
            ns.ip(c);
        }
    }
    node.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
        .unwrap();
    assert_eq!(
        node.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))
            .unwrap()
            .trim(),
        "1"
    );
    node.nft_stdin(
        "table ip kube-proxy {\n\
         chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n\
           ip daddr 10.96.0.10 tcp dport 80 dnat to 10.244.9.9:9080\n}\n\
         chain postrouting { type nat hook postrouting priority srcnat; policy accept;\n\
           oifname \"vs0\" masquerade\n}\n\
         }\n",
    );
    let pod_ip = Ipv4Addr::new(10, 244, 1, 5);
    let desired = NodeNft {
        rules: Some(NodeRules {
            ztunnel_veth: "veth-zt".into(),
            ztunnel_bridge: None,
            ztunnel_mac: String::new(),
            ztunnel_ip: Ipv4Addr::new(10, 244, 1, 2),
            node_gateways: vec![Ipv4Addr::new(10, 244, 1, 1)],
            tunnel_port: consts::TUNNEL_PORT,
        }),
        pods_v4: [pod_ip].into(),
        pods_v6: BTreeSet::new(),
    };
    assert!(node.run(|| reconcile_node(&desired)).unwrap());

    let (l80, l9080) = srv.run(|| {
        let l = |p: u16| {
            let l = TcpListener::bind(("0.0.0.0", p)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        };
        (l(80), l(9080))
    });
    let connect = || {
        pod.run(|| {
            let s = TcpStream::connect_timeout(
                &"10.96.0.10:80".parse().unwrap(),
                Duration::from_secs(5),
            )
            .expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        })
    };

    // Captured: no DNAT, no masquerade.
    let mut c = connect();
    let (port, local, peer) = accept_either(&[&l80, &l9080]);
    assert_eq!(
        (port, local),
        (80, "10.96.0.10:80".parse().unwrap()),
        "ClusterIP kept"
    );
    assert_eq!(peer.ip(), IpAddr::V4(pod_ip), "source not masqueraded");
    let mut buf = [0u8; 2];
    c.read_exact(&mut buf).unwrap();
    drop(c);

    // Not captured: kube-proxy's NAT as usual.
    node.run(|| delete_pod_elements(&[pod_ip], &[])).unwrap();
    let mut c = connect();
    let (port, local, peer) = accept_either(&[&l80, &l9080]);
    assert_eq!(
        (port, local),
        (9080, "10.244.9.9:9080".parse().unwrap()),
        "kube-proxy DNAT"
    );
    assert_eq!(peer.ip(), IpAddr::from([10, 244, 9, 1]), "masqueraded");
    c.read_exact(&mut buf).unwrap();
    drop(c);

    // Control: captured again but without our NAT chains' rules, kube-proxy wins; so it is
    // the identity NAT that made the difference above.
    node.run(|| add_pod_elements(&[pod_ip], &[])).unwrap();
    for name in [chain::NAT_PREROUTING, chain::NAT_POSTROUTING] {
        node.nft(&["flush", "chain", "inet", consts::NODE_NFT_TABLE, name]);
    }
    let mut c = connect();
    let (port, _, peer) = accept_either(&[&l80, &l9080]);
    assert_eq!((port, peer.ip()), (9080, IpAddr::from([10, 244, 9, 1])));
    c.read_exact(&mut buf).unwrap();
    drop(c);
    assert!(
        node.run(|| reconcile_node(&desired)).unwrap(),
        "reconcile restores the NAT rules"
    );
    let c = connect();
    let (port, _, peer) = accept_either(&[&l80, &l9080]);
    assert_eq!((port, peer.ip()), (80, IpAddr::V4(pod_ip)));
    drop(c);
}

#[test]
fn loads_alongside_kube_proxy_tables() {
    if !can_run() {
        return;
    }
    let ns = TestNs::new();
    ns.nft_stdin(
        "table ip kube-proxy {\n\
         chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n\
           ip daddr 10.96.0.10 tcp dport 80 dnat to 10.244.9.9:9080\n}\n\
         }\n",
    );
    assert!(ns
        .run(|| reconcile_node(&node_desired([10, 4, 4, 18])))
        .unwrap());
    ns.run(delete_node_table).unwrap();
    assert!(ns.nft(&["list", "ruleset"]).contains("table ip kube-proxy"));
}

#[test]
fn delete_elements_when_one_set_is_missing() {
    if !can_run() {
        return;
    }
    let ns = TestNs::new();
    ns.nft_stdin(&format!(
        "add table inet {t}\nadd set inet {t} {s} {{ type ipv4_addr; }}\nadd element inet {t} {s} {{ 10.0.0.1, 10.0.0.2 }}\n",
        t = consts::NODE_NFT_TABLE,
        s = consts::POD_SET,
    ));
    let v6: Ipv6Addr = "fd00::1".parse().unwrap();
    ns.run(|| delete_pod_elements(&[Ipv4Addr::new(10, 0, 0, 1)], &[v6]))
        .unwrap();
    let obs = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(obs.pods_v4(), [Ipv4Addr::new(10, 0, 0, 2)].into());
    assert!(!obs.sets.contains_key(consts::POD_SET_V6));
    assert!(!ns.run(|| pod_element_present(v6.into())).unwrap());
}

#[test]
fn pod_elements_over_netlink_without_nft() {
    if !can_run() {
        return;
    }
    let ns = TestNs::new();
    let (t, s4, s6) = (consts::NODE_NFT_TABLE, consts::POD_SET, consts::POD_SET_V6);
    let a: IpAddr = Ipv4Addr::new(10, 9, 0, 1).into();
    let b: IpAddr = Ipv4Addr::new(10, 9, 0, 2).into();
    let c: IpAddr = "fd00::9".parse::<Ipv6Addr>().unwrap().into();
    let change = |op, set, addrs: &[IpAddr]| {
        let addrs = addrs.to_vec();
        ns.run(move || {
            netlink::apply(
                NFPROTO_INET,
                t,
                &[netlink::ElemChange {
                    op,
                    set,
                    addrs: &addrs,
                }],
            )
        })
    };
    // No table: the kernel says ENOENT, nothing is created.
    assert!(matches!(
        change(netlink::ElemOp::Add, s4, &[a]),
        Err(netlink::BatchError::Kernel(libc::ENOENT))
    ));
    assert_eq!(ns.nft(&["list", "ruleset"]).trim(), "");
    ns.nft_stdin(&format!(
        "add table inet {t}\nadd set inet {t} {s4} {{ type ipv4_addr; }}\nadd set inet {t} {s6} {{ type ipv6_addr; }}\n"
    ));
    change(netlink::ElemOp::Add, s4, &[a, b]).unwrap();
    change(netlink::ElemOp::Add, s4, &[a]).unwrap();
    change(netlink::ElemOp::Add, s6, &[c]).unwrap();
    let obs = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(
        obs.pods_v4(),
        [Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 0, 2)].into()
    );
    assert_eq!(obs.pods_v6().len(), 1);
    change(netlink::ElemOp::Delete, s4, &[a]).unwrap();
    // Deleting an absent element fails and rolls back the whole batch.
    let both = [b, a];
    let r = ns.run(|| {
        netlink::apply(
            NFPROTO_INET,
            t,
            &[
                netlink::ElemChange {
                    op: netlink::ElemOp::Delete,
                    set: s4,
                    addrs: &both[..1],
                },
                netlink::ElemChange {
                    op: netlink::ElemOp::Delete,
                    set: s4,
                    addrs: &both[1..],
                },
            ],
        )
    });
    assert!(
        matches!(r, Err(netlink::BatchError::Kernel(libc::ENOENT))),
        "{r:?}"
    );
    let obs = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(obs.pods_v4(), [Ipv4Addr::new(10, 9, 0, 2)].into());
    // Add then delete in one transaction (the DEL fast path): fine whether or not it was there.
    for _ in 0..2 {
        ns.run(|| {
            netlink::apply(
                NFPROTO_INET,
                t,
                &[
                    netlink::ElemChange {
                        op: netlink::ElemOp::Add,
                        set: s4,
                        addrs: &both[..1],
                    },
                    netlink::ElemChange {
                        op: netlink::ElemOp::Delete,
                        set: s4,
                        addrs: &both[..1],
                    },
                ],
            )
        })
        .unwrap();
    }
    ns.run(|| add_pod_elements(&[Ipv4Addr::new(10, 9, 0, 2)], &[]))
        .unwrap();
    // The fast paths themselves: add and delete (twice) without falling back.
    ns.run(|| add_pod_elements(&[Ipv4Addr::new(10, 9, 0, 3)], &[]))
        .unwrap();
    ns.run(|| delete_pod_elements(&[Ipv4Addr::new(10, 9, 0, 3)], &[]))
        .unwrap();
    ns.run(|| delete_pod_elements(&[Ipv4Addr::new(10, 9, 0, 3)], &[]))
        .unwrap();
    let obs = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(obs.pods_v4(), [Ipv4Addr::new(10, 9, 0, 2)].into());
}
