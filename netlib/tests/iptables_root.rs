//! Root tests of the iptables + ipset backend, each in network namespaces of its own
//! (`ipttest-<pid>-<n>`, deleted by a guard even when the test fails): apply, re-apply (no
//! change), single pod elements, repair, cleanup, the ztunnel netns TPROXY rules, and
//! kube-proxy's NAT skipped for captured traffic. Without root, `iptables-restore` or `ipset`
//! they are skipped with a message.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambient_net::consts;
use ambient_net::firewall::{pod_elements, FirewallDriver, FirewallKind};
use ambient_net::iptables::{self, chain, Fam};
use ambient_net::model::PodSource;
use ambient_net::netns;
use ambient_net::nft::{NodeNft, NodeRules, SynLimit, ZtunnelRules};

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct TestNs {
    name: String,
    path: PathBuf,
}

impl TestNs {
    fn new() -> TestNs {
        let name = format!(
            "ipttest-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let path = netns::create_named(&name).expect("create netns");
        TestNs { name, path }
    }

    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        netns::run_in(&self.path, f).expect("enter netns")
    }

    /// `prog args` in the namespace (stdin fed when given); stdout, the run must succeed.
    fn cmd(&self, prog: &str, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(|| {
            let mut c = Command::new(prog);
            c.args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = c.spawn().expect("spawn");
            let mut pipe = child.stdin.take().unwrap();
            pipe.write_all(stdin.unwrap_or_default().as_bytes())
                .unwrap();
            drop(pipe);
            child.wait_with_output().expect("wait")
        });
        assert!(
            out.status.success(),
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `iptables-save` (`ip6tables-save`) without comments or counters lines.
    fn save(&self, f: Fam) -> String {
        self.cmd(&iptables::program(f, "save"), &[], None)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn ipset_save(&self) -> String {
        self.cmd("ipset", &["save"], None)
    }

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

fn can_run() -> bool {
    if !nix_is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    for p in [iptables::program(Fam::V4, "restore"), "ipset".into()] {
        if Command::new(&p).arg("--version").output().is_err() {
            eprintln!("skipped: {p} not installed");
            return false;
        }
    }
    true
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn fw() -> &'static dyn FirewallDriver {
    FirewallKind::Iptables.driver()
}

fn src(ip: &str, veth: &str) -> PodSource {
    PodSource {
        ip: ip.parse().unwrap(),
        veth: veth.into(),
        bridge: None,
    }
}

fn node_rules(zt: Ipv4Addr, gw: Ipv4Addr) -> NodeRules {
    NodeRules {
        ztunnel_veth: "veth-zt".into(),
        ztunnel_bridge: None,
        ztunnel_mac: String::new(),
        bridge_mac: None,
        ztunnel_ip: zt.into(),
        ztunnel_ip6: Some("fd00::2".parse().unwrap()),
        node_gateways: vec![gw.into(), "fd00::1".parse().unwrap()],
        tunnel_port: consts::TUNNEL_PORT,
    }
}

/// Empties one of our IPv4 chains behind the agent's back.
fn flush(ns: &TestNs, table: &str, name: &str) {
    ns.cmd(
        &iptables::program(Fam::V4, "restore"),
        &["--noflush"],
        Some(&format!("*{table}\n-F {name}\nCOMMIT\n")),
    );
}

/// Lines of `b` not in `a`, and of `a` not in `b`.
fn diff(a: &str, b: &str) -> (Vec<String>, Vec<String>) {
    let la: Vec<&str> = a.lines().collect();
    let lb: Vec<&str> = b.lines().collect();
    (
        lb.iter()
            .filter(|l| !la.contains(l))
            .map(|l| l.to_string())
            .collect(),
        la.iter()
            .filter(|l| !lb.contains(l))
            .map(|l| l.to_string())
            .collect(),
    )
}

#[test]
fn node_rules_and_sets_in_a_fresh_netns() {
    if !can_run() {
        return;
    }
    let ns = TestNs::new();
    let desired = NodeNft {
        rules: Some(node_rules(
            Ipv4Addr::new(10, 4, 4, 2),
            Ipv4Addr::new(10, 4, 4, 1),
        )),
        pods: [src("10.4.4.19", "veth-a"), src("fd00::19", "veth-a")].into(),
    };
    assert!(ns.run(|| fw().reconcile_node(&desired)).unwrap());
    assert!(
        !ns.run(|| fw().reconcile_node(&desired)).unwrap(),
        "a second apply changes nothing"
    );
    let (v4, v6, sets) = (ns.save(Fam::V4), ns.save(Fam::V6), ns.ipset_save());
    for (save, gw) in [(&v4, "10.4.4.1/32"), (&v6, "fd00::1/128")] {
        let o = iptables::parse_save(save);
        for (table, hook, ours) in [
            ("mangle", "PREROUTING", chain::PREROUTING),
            ("mangle", "FORWARD", chain::FORWARD),
            ("mangle", "INPUT", chain::INPUT),
            ("mangle", "OUTPUT", chain::OUTPUT),
            ("nat", "PREROUTING", chain::NAT_PREROUTING),
            ("nat", "POSTROUTING", chain::NAT_POSTROUTING),
        ] {
            let first = &o.chain(table, hook).expect(hook)[0];
            assert_eq!(
                iptables::target_of(first),
                Some(ours),
                "{table} {hook}: {save}"
            );
        }
        let pre = o.chain("mangle", chain::PREROUTING).unwrap();
        assert!(pre.iter().any(|r| r.contains("--dport 6081")), "{save}");
        let capture = pre.last().unwrap();
        assert!(
            capture.contains("src,src") && capture.contains("0x100"),
            "{capture}"
        );
        assert!(o
            .chain("mangle", chain::OUTPUT)
            .unwrap()
            .iter()
            .any(|r| r.contains(gw)));
        assert!(o
            .chain("nat", chain::NAT_PREROUTING)
            .unwrap()
            .iter()
            .any(|r| r.contains("-m mark --mark 0x100/0x100") && r.ends_with("-j ACCEPT")));
    }
    for line in [
        "add ztunnel-pods-ips 10.4.4.19",
        "add ztunnel-pods-ips6 fd00::19",
        "add ztunnel-pods-iifs 10.4.4.19,veth-a",
        "add ztunnel-pods-iifs6 fd00::19,veth-a",
    ] {
        assert!(sets.contains(line), "{line} in\n{sets}");
    }
    assert!(
        sets.contains("create ztunnel-pods-ips6 hash:ip family inet6"),
        "{sets}"
    );
    assert!(
        sets.contains("create ztunnel-pods-iifs hash:net,iface family inet"),
        "{sets}"
    );

    // A pod enrolled and removed: only its elements change, no rule does.
    let pod = [src("10.4.4.20", "veth-b"), src("fd00::20", "veth-b")];
    let elems = pod_elements(&pod);
    assert_eq!(
        ns.run(|| fw().missing_pod_elements(&elems)).unwrap().len(),
        4
    );
    ns.run(|| fw().add_pod_elements(&elems)).unwrap();
    let (added, removed) = diff(&sets, &ns.ipset_save());
    let mut added: Vec<String> = added;
    added.sort();
    assert_eq!(
        added,
        [
            "add ztunnel-pods-iifs 10.4.4.20,veth-b",
            "add ztunnel-pods-iifs6 fd00::20,veth-b",
            "add ztunnel-pods-ips 10.4.4.20",
            "add ztunnel-pods-ips6 fd00::20",
        ]
    );
    assert!(removed.is_empty(), "{removed:?}");
    assert!(ns
        .run(|| fw().missing_pod_elements(&elems))
        .unwrap()
        .is_empty());
    assert_eq!(ns.save(Fam::V4), v4);
    ns.run(|| fw().delete_pod_elements(&elems)).unwrap();
    ns.run(|| fw().delete_pod_elements(&elems)).unwrap();
    assert_eq!(ns.ipset_save(), sets);
    assert_eq!(
        (ns.save(Fam::V4), ns.save(Fam::V6)),
        (v4.clone(), v6.clone())
    );

    // Drift is repaired in place: a flushed chain refilled, a jump pushed down by another
    // writer (kube-proxy prepends its own) moved back to the top.
    flush(&ns, "mangle", chain::OUTPUT);
    ns.cmd(
        &iptables::program(Fam::V4, "restore"),
        &["--noflush"],
        Some("*nat\n:KUBE-SERVICES - [0:0]\n-I PREROUTING 1 -j KUBE-SERVICES\nCOMMIT\n"),
    );
    assert!(ns.run(|| fw().reconcile_node(&desired)).unwrap());
    assert!(!ns.run(|| fw().reconcile_node(&desired)).unwrap());
    let o = iptables::parse_save(&ns.save(Fam::V4));
    let pre = o.chain("nat", "PREROUTING").unwrap();
    assert_eq!(iptables::target_of(&pre[0]), Some(chain::NAT_PREROUTING));
    assert_eq!(iptables::target_of(&pre[1]), Some("KUBE-SERVICES"));
    assert_eq!(
        o.chain("mangle", chain::OUTPUT),
        iptables::parse_save(&v4).chain("mangle", chain::OUTPUT)
    );

    // Cleanup removes exactly ours: kube-proxy's chain and jump stay.
    ns.run(|| fw().cleanup_node()).unwrap();
    ns.run(|| fw().cleanup_node()).unwrap();
    for f in Fam::BOTH {
        let s = ns.save(f);
        assert!(!s.contains("AMBIENT") && !s.contains("ambient"), "{s}");
    }
    assert!(ns.save(Fam::V4).contains("-A PREROUTING -j KUBE-SERVICES"));
    assert_eq!(ns.cmd("ipset", &["list", "-n"], None).trim(), "");
}

#[test]
fn ztunnel_tproxy_rules_in_a_fresh_netns() {
    if !can_run() {
        return;
    }
    let ns = TestNs::new();
    let mut desired = ZtunnelRules {
        ztunnel_ip: Ipv4Addr::new(10, 4, 4, 2).into(),
        ztunnel_ip6: Some("fd00::2".parse().unwrap()),
        pod_iface: "eth0".into(),
        syn_limit: Some(SynLimit::DEFAULT),
    };
    assert!(ns.run(|| fw().reconcile_ztunnel(&desired)).unwrap());
    assert!(!ns.run(|| fw().reconcile_ztunnel(&desired)).unwrap());
    let (v4, v6) = (ns.save(Fam::V4), ns.save(Fam::V6));
    assert!(v4.contains("-A PREROUTING -m comment --comment ambient-node -j AMBIENT-PREROUTING"));
    assert!(
        v4.contains("--dport 15008")
            && v4.contains("-j TPROXY --on-port 15008 --on-ip 127.0.0.1 --tproxy-mark 0x400/0xfff"),
        "{v4}"
    );
    assert!(
        v4.contains("-j TPROXY --on-port 15001 --on-ip 127.0.0.1"),
        "{v4}"
    );
    assert!(v4.contains("! -d 10.4.4.2/32"), "{v4}");
    assert!(v4.contains("-j MARK --set-xmark 0x4d3/0xfff"), "{v4}");
    assert!(
        v6.contains("-j TPROXY --on-port 15006 --on-ip ::1 --tproxy-mark 0x400/0xfff"),
        "{v6}"
    );
    // The per-source SYN limit, before conntrack, in both families.
    for (saved, name) in [(&v4, "ztunnel-syn-limit "), (&v6, "ztunnel-syn-limit6 ")] {
        assert!(
            saved.contains("-A PREROUTING -m comment --comment ambient-node -j AMBIENT-SYN-LIMIT"),
            "{saved}"
        );
        assert!(
            saved.contains("-A AMBIENT-SYN-LIMIT -i pistio+ -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m hashlimit --hashlimit-above 1000/sec --hashlimit-burst 2000 --hashlimit-mode srcip --hashlimit-name ")
                && saved.contains(name)
                && saved.contains("-j DROP"),
            "{saved}"
        );
    }
    // No limit: its chains go, the TPROXY chains stay.
    desired.syn_limit = None;
    assert!(ns.run(|| fw().reconcile_ztunnel(&desired)).unwrap());
    assert!(!ns.save(Fam::V4).contains("AMBIENT-SYN-LIMIT"));
    assert!(ns.save(Fam::V6).contains("AMBIENT-PREROUTING"));
    desired.syn_limit = Some(SynLimit::DEFAULT);
    assert!(ns.run(|| fw().reconcile_ztunnel(&desired)).unwrap());
    assert!(!ns.run(|| fw().reconcile_ztunnel(&desired)).unwrap());
    // Without an IPv6 address the v6 chain goes.
    desired.ztunnel_ip6 = None;
    assert!(ns.run(|| fw().reconcile_ztunnel(&desired)).unwrap());
    assert!(!ns.save(Fam::V6).contains("AMBIENT"));
    assert!(ns.save(Fam::V4).contains("AMBIENT-PREROUTING"));
    ns.run(|| fw().cleanup_ztunnel()).unwrap();
    assert!(!ns.save(Fam::V4).contains("AMBIENT"));
}

/// The variant follows kube-proxy's chains, as kube-proxy's iptables-wrapper decides.
#[test]
fn the_iptables_variant_follows_kube_proxy() {
    if !can_run() {
        return;
    }
    let ns = TestNs::new();
    assert_eq!(ns.run(iptables::detect_variant), iptables::Variant::Default);
    let kube = "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n";
    ns.cmd("iptables-legacy-restore", &["--noflush"], Some(kube));
    assert_eq!(ns.run(iptables::detect_variant), iptables::Variant::Legacy);
    // Chains in both: the default, as the wrapper does when nft has any.
    ns.cmd("iptables-nft-restore", &["--noflush"], Some(kube));
    assert_eq!(ns.run(iptables::detect_variant), iptables::Variant::Default);
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

/// kube-proxy coexistence, the original's way: pod 10.244.1.5 ── node (forwards; an
/// iptables kube-proxy-style `KUBE-SERVICES` DNAT 10.96.0.10:80 → 10.244.9.9:9080 and
/// masquerade; our chains) ── server 10.244.9.9 (also owns 10.96.0.10). Captured: the server
/// sees the ClusterIP as destination and the pod as source. Not captured: kube-proxy's NAT.
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
    // kube-proxy first, as on a node where it ran before the agent.
    node.cmd(
        &iptables::program(Fam::V4, "restore"),
        &["--noflush"],
        Some(
            "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.244.9.9:9080\n\
             -A KUBE-POSTROUTING -o vs0 -j MASQUERADE\nCOMMIT\n",
        ),
    );
    let pod_ip = Ipv4Addr::new(10, 244, 1, 5);
    let desired = NodeNft {
        rules: Some(NodeRules {
            ztunnel_ip6: None,
            node_gateways: vec![Ipv4Addr::new(10, 244, 1, 1).into()],
            ..node_rules(Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 1))
        }),
        pods: [src(&pod_ip.to_string(), "vp0")].into(),
    };
    let pod_elems = pod_elements(&[src(&pod_ip.to_string(), "vp0")]);
    assert!(node.run(|| fw().reconcile_node(&desired)).unwrap());

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
    let mut buf = [0u8; 2];

    // Captured: no DNAT, no masquerade.
    let mut c = connect();
    let (port, local, peer) = accept_either(&[&l80, &l9080]);
    assert_eq!(
        (port, local),
        (80, "10.96.0.10:80".parse().unwrap()),
        "ClusterIP kept"
    );
    assert_eq!(peer.ip(), IpAddr::V4(pod_ip), "source not masqueraded");
    c.read_exact(&mut buf).unwrap();
    drop(c);

    // Not captured: kube-proxy's NAT as usual.
    node.run(|| fw().delete_pod_elements(&pod_elems)).unwrap();
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

    // Control: captured again but with our NAT chains flushed, kube-proxy wins; so it is the
    // ACCEPT ahead of KUBE-SERVICES that made the difference above.
    node.run(|| fw().add_pod_elements(&pod_elems)).unwrap();
    for name in [chain::NAT_PREROUTING, chain::NAT_POSTROUTING] {
        flush(&node, "nat", name);
    }
    let mut c = connect();
    let (port, _, peer) = accept_either(&[&l80, &l9080]);
    assert_eq!((port, peer.ip()), (9080, IpAddr::from([10, 244, 9, 1])));
    c.read_exact(&mut buf).unwrap();
    drop(c);
    assert!(
        node.run(|| fw().reconcile_node(&desired)).unwrap(),
        "reconcile restores the NAT rules"
    );
    let c = connect();
    let (port, _, peer) = accept_either(&[&l80, &l9080]);
    assert_eq!((port, peer.ip()), (80, IpAddr::V4(pod_ip)));
    drop(c);
    node.run(|| fw().cleanup_node()).unwrap();
}
