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

/// A pod address attached through `veth` (no bridge).
fn src(ip: &str, veth: &str) -> crate::model::PodSource {
    crate::model::PodSource {
        ip: ip.parse().unwrap(),
        veth: veth.into(),
        bridge: None,
    }
}

/// The node-table elements of these sources.
fn elems(pods: &[crate::model::PodSource]) -> Vec<PodElement> {
    pod_elements(pods)
}

/// Whether the kernel holds every element of `pods`.
fn present(ns: &TestNs, pods: &[crate::model::PodSource]) -> bool {
    let e = elems(pods);
    ns.run(|| missing_pod_elements(&e)).unwrap().is_empty()
}

fn node_desired(zt: [u8; 4]) -> NodeNft {
    NodeNft {
        rules: Some(NodeRules {
            ztunnel_veth: "veth-zt".into(),
            ztunnel_bridge: None,
            ztunnel_mac: String::new(),
            bridge_mac: None,
            ztunnel_ip: Ipv4Addr::from(zt).into(),
            ztunnel_ip6: None,
            node_gateways: vec![Ipv4Addr::new(10, 4, 4, 1).into()],
            tunnel_port: consts::TUNNEL_PORT,
        }),
        pods: [src("10.4.4.19", "veth-a"), src("fd00::19", "veth-a")].into(),
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
        "set ztunnel-pods-iifs {",
        "type ifname . ipv4_addr",
        "elements = { \"veth-a\" . 10.4.4.19 }",
        "type ifname . ipv6_addr",
        "elements = { \"veth-a\" . fd00::19 }",
        "ip saddr @ztunnel-pods-ips iifname . ip saddr != @ztunnel-pods-iifs limit rate 10/minute burst 10 packets log prefix \"ambient-node spoofed pod source: \"",
        "ip saddr @ztunnel-pods-ips iifname . ip saddr != @ztunnel-pods-iifs counter packets 0 bytes 0 drop",
        "meta l4proto tcp iifname . ip saddr @ztunnel-pods-iifs meta mark set meta mark | 0x00000100",
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
        "comment \"TCP from an ambient pod's own device: capture outbound [ambient 12/13 ",
        "dnat ip6 to ip6 daddr",
        "ip6 saddr @ztunnel-pods-ips6 iifname . ip6 saddr != @ztunnel-pods-ports6 counter packets 0 bytes 0 drop",
        "table bridge ambient-node",
        "set ztunnel-pods-ports {",
        "type filter hook prerouting priority filter; policy accept;",
        "iifname \"veth-zt\" return",
        "ip saddr @ztunnel-pods-ips iifname . ip saddr != @ztunnel-pods-ports counter packets 0 bytes 0 drop",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }

    let obs = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(obs.chains.len(), 6);
    assert_eq!(obs.chains[chain::PREROUTING].rule_count(), 13);
    assert_eq!(obs.pods_v4(), d.pods_v4());
    assert_eq!(obs.pods_v6(), d.pods_v6());
    assert_eq!(
        obs.set_dev_addrs(consts::POD_IIF_SET),
        [("veth-a".to_string(), "10.4.4.19".parse().unwrap())].into()
    );
    let bridge = ns.run(observe_node_bridge).unwrap().unwrap();
    assert_eq!(bridge.chains[chain::PREROUTING].rule_count(), 5);
    assert_eq!(bridge.pods_v4(), d.pods_v4());
    assert_eq!(
        bridge.set_dev_addrs(consts::POD_PORT_SET_V6),
        [("veth-a".to_string(), "fd00::19".parse().unwrap())].into()
    );

    // Fast path: add, present, delete twice, delete absent.
    let ab = [src("10.4.4.40", "veth-b"), src("fd00::40", "veth-b")];
    let a = [ab[0].clone()];
    ns.run(|| add_pod_elements(&elems(&ab))).unwrap();
    ns.run(|| add_pod_elements(&elems(&ab))).unwrap();
    assert!(present(&ns, &ab));
    // The same address on another device is not this pod's element.
    assert!(!present(&ns, &[src("10.4.4.40", "veth-c")]));
    ns.run(|| delete_pod_elements(&elems(&ab))).unwrap();
    ns.run(|| delete_pod_elements(&elems(&ab))).unwrap();
    let gone = elems(&ab);
    assert_eq!(ns.run(|| missing_pod_elements(&gone)).unwrap(), gone);
    assert!(present(&ns, &[src("10.4.4.19", "veth-a")]));
    ns.run(|| delete_pod_elements(&[])).unwrap();
    // Elements added behind the agent's back are removed by reconcile, without touching chains.
    ns.run(|| add_pod_elements(&elems(&a))).unwrap();
    let before = ns.run(observe_node).unwrap().unwrap();
    assert!(ns.run(|| reconcile_node(&d)).unwrap());
    let after = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(after.pods_v4(), d.pods_v4());
    assert_eq!(after.chains, before.chains);
    assert!(!present(&ns, &a));

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
    assert_eq!(empty.pods_v4(), d2.pods_v4());
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
    ns.run(|| delete_pod_elements(&elems(&ab))).unwrap();
    assert!(!present(&ns, &a));
    // Adding without a table creates tables and sets only.
    ns.run(|| add_pod_elements(&elems(&a))).unwrap();
    let bare = ns.run(observe_node).unwrap().unwrap();
    assert!(bare.chains.is_empty());
    assert_eq!(bare.pods_v4(), [Ipv4Addr::new(10, 4, 4, 40)].into());
    assert!(present(&ns, &a));
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
        ztunnel_ip: Ipv4Addr::new(10, 4, 4, 18).into(),
        ztunnel_ip6: None,
        pod_iface: "eth0".into(),
        syn_limit: Some(SynLimit::DEFAULT),
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
        "type filter hook prerouting priority raw; policy accept;",
        "iifname { \"pistioin\", \"pistioout\" } tcp flags syn / fin,syn,rst,ack meter ztunnel-syn-limit size 65535 { ip saddr timeout 10s limit rate over 1000/second burst 2000 packets } counter packets 0 bytes 0 drop",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let z2 = ZtunnelRules {
        ztunnel_ip: Ipv4Addr::new(10, 4, 4, 30).into(),
        ztunnel_ip6: None,
        ..z.clone()
    };
    assert!(ns.run(|| reconcile_ztunnel(&z2)).unwrap());
    assert!(!ns.run(|| reconcile_ztunnel(&z2)).unwrap());
    let obs = ns.run(observe_ztunnel).unwrap().unwrap();
    assert_eq!(obs.chains[chain::PREROUTING].rule_count(), 4);
    assert_eq!(obs.chains[chain::SYN_LIMIT].rule_count(), 1);
    // No limit: its chain goes, the TPROXY rules stay.
    let z3 = ZtunnelRules {
        syn_limit: None,
        ..z2.clone()
    };
    assert!(ns.run(|| reconcile_ztunnel(&z3)).unwrap());
    let obs = ns.run(observe_ztunnel).unwrap().unwrap();
    assert!(!obs.chains.contains_key(chain::SYN_LIMIT));
    assert_eq!(obs.chains[chain::PREROUTING].rule_count(), 4);
    assert!(ns.run(|| reconcile_ztunnel(&z2)).unwrap());
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
            bridge_mac: None,
            ztunnel_ip: Ipv4Addr::new(10, 244, 1, 2).into(),
            ztunnel_ip6: None,
            node_gateways: vec![Ipv4Addr::new(10, 244, 1, 1).into()],
            tunnel_port: consts::TUNNEL_PORT,
        }),
        pods: [src(&pod_ip.to_string(), "vp0")].into(),
    };
    let pod_elems = elems(&[src(&pod_ip.to_string(), "vp0")]);
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
    node.run(|| delete_pod_elements(&pod_elems)).unwrap();
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
    node.run(|| add_pod_elements(&pod_elems)).unwrap();
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
    let gone = elems(&[src("10.0.0.1", "veth-a"), src("fd00::1", "veth-a")]);
    ns.run(|| delete_pod_elements(&gone)).unwrap();
    let obs = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(obs.pods_v4(), [Ipv4Addr::new(10, 0, 0, 2)].into());
    assert!(!obs.sets.contains_key(consts::POD_SET_V6));
    assert!(!present(&ns, &[src("fd00::1", "veth-a")]));
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
    let keys = |addrs: &[IpAddr]| -> Vec<Vec<u8>> {
        addrs.iter().map(|a| netlink::addr_key(*a)).collect()
    };
    fn elem<'a>(op: netlink::ElemOp, set: &'a str, keys: &'a [Vec<u8>]) -> netlink::ElemChange<'a> {
        netlink::ElemChange {
            op,
            family: NODE.nfproto,
            table: consts::NODE_NFT_TABLE,
            set,
            keys,
        }
    }
    let change = |op, set, addrs: &[IpAddr]| {
        let k = keys(addrs);
        ns.run(move || netlink::apply(&[elem(op, set, &k)]))
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
    let both = keys(&[b, a]);
    let r = ns.run(|| {
        netlink::apply(&[
            elem(netlink::ElemOp::Delete, s4, &both[..1]),
            elem(netlink::ElemOp::Delete, s4, &both[1..]),
        ])
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
            netlink::apply(&[
                elem(netlink::ElemOp::Add, s4, &both[..1]),
                elem(netlink::ElemOp::Delete, s4, &both[..1]),
            ])
        })
        .unwrap();
    }
    // The inet sets alone are not enough for a pod's elements (the anti-spoofing sets and the
    // bridge table are missing): netlink refuses, the nft fallback creates them.
    let p2 = elems(&[src("10.9.0.2", "veth-2")]);
    ns.run(|| add_pod_elements(&p2)).unwrap();
    assert!(ns.run(observe_node_bridge).unwrap().is_some());
    // Now netlink alone does it, across both tables in one transaction.
    let p3 = elems(&[src("10.9.0.3", "veth-3"), src("fd00::3", "veth-3")]);
    let by_netlink = |ops: &[netlink::ElemOp]| {
        let groups = by_set(&p3);
        ns.run(|| elements_by_netlink(&groups, ops))
    };
    assert!(by_netlink(&[netlink::ElemOp::Add]));
    assert!(present(&ns, &[src("10.9.0.3", "veth-3")]));
    let obs = ns.run(observe_node_bridge).unwrap().unwrap();
    assert!(obs
        .set_dev_addrs(consts::POD_PORT_SET)
        .contains(&("veth-3".to_string(), "10.9.0.3".parse().unwrap())));
    let del = [netlink::ElemOp::Add, netlink::ElemOp::Delete];
    assert!(by_netlink(&del));
    assert!(by_netlink(&del), "deleting twice is fine");
    // The fast paths themselves: add and delete (twice).
    ns.run(|| add_pod_elements(&p3)).unwrap();
    ns.run(|| delete_pod_elements(&p3)).unwrap();
    ns.run(|| delete_pod_elements(&p3)).unwrap();
    let obs = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(obs.pods_v4(), [Ipv4Addr::new(10, 9, 0, 2)].into());
    assert_eq!(
        obs.set_dev_addrs(consts::POD_IIF_SET),
        [("veth-2".to_string(), "10.9.0.2".parse().unwrap())].into()
    );
    ns.run(delete_node_table).unwrap();
    assert_eq!(ns.nft(&["list", "ruleset"]).trim(), "");
}

/// A node running the ruleset from before anti-spoofing (capture by `ip saddr
/// @ztunnel-pods-ips` alone, no `ztunnel-pods-iifs` set, no bridge table) converges in one
/// reconcile: the new sets are created and filled in the transaction that rewrites the chain.
#[test]
fn upgrade_from_the_address_only_ruleset() {
    if !can_run() {
        return;
    }
    let ns = TestNs::new();
    ns.nft_stdin(&format!(
        "table inet {t} {{\n\
         set {s} {{ type ipv4_addr; elements = {{ 10.4.4.19 }} }}\n\
         set {s6} {{ type ipv6_addr; elements = {{ fd00::19 }} }}\n\
         chain prerouting {{ type filter hook prerouting priority mangle; policy accept;\n\
           meta l4proto tcp ip saddr @{s} meta mark set meta mark | 0x100 comment \"TCP from an ambient pod: capture outbound [ambient 1/1 0123456789abcdef]\"\n\
         }}\n}}\n",
        t = consts::NODE_NFT_TABLE,
        s = consts::POD_SET,
        s6 = consts::POD_SET_V6,
    ));
    let d = node_desired([10, 4, 4, 18]);
    let old = ns.run(observe_node).unwrap().unwrap();
    let batch = plan_node(&d, Some(&old));
    let text = to_json(&batch).unwrap();
    let set_at = text
        .find(&format!("\"name\":\"{}\"", consts::POD_IIF_SET))
        .unwrap();
    let flush_at = text.find("\"flush\"").unwrap();
    assert!(
        set_at < flush_at,
        "the new set comes before the chain rewrite"
    );
    assert!(ns.run(|| reconcile_node(&d)).unwrap());
    let now = ns.run(observe_node).unwrap().unwrap();
    assert_eq!(now.chains[chain::PREROUTING].rule_count(), 13);
    assert_eq!(now.pods_v4(), d.pods_v4());
    assert_eq!(
        now.set_dev_addrs(consts::POD_IIF_SET),
        [("veth-a".to_string(), "10.4.4.19".parse().unwrap())].into()
    );
    assert!(ns.run(observe_node_bridge).unwrap().is_some());
    assert!(!ns.run(|| reconcile_node(&d)).unwrap(), "converged");
    ns.run(delete_node_table).unwrap();
    assert_eq!(ns.nft(&["list", "ruleset"]).trim(), "");
}
