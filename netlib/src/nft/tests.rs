//! Unit tests (no root, no nft): rendering, fingerprints, planning, parsing.

use super::*;
use crate::consts::{self, mark, port, zt_mark};
use crate::model::PodSource;
use nftables::stmt::Statement;
use nftables::types::{NfChainType, NfHook};
use serde_json::{json, Value};

fn rules(zt: [u8; 4]) -> NodeRules {
    NodeRules {
        ztunnel_veth: "veth-zt".into(),
        ztunnel_bridge: None,
        ztunnel_mac: String::new(),
        bridge_mac: None,
        ztunnel_ip: Ipv4Addr::from(zt).into(),
        ztunnel_ip6: None,
        node_gateways: vec![Ipv4Addr::new(10, 4, 4, 1).into()],
        tunnel_port: consts::TUNNEL_PORT,
    }
}

fn src(ip: &str, veth: &str, bridge: Option<&str>) -> PodSource {
    PodSource {
        ip: ip.parse().unwrap(),
        veth: veth.into(),
        bridge: bridge.map(Into::into),
    }
}

fn desired() -> NodeNft {
    NodeNft {
        rules: Some(rules([10, 4, 4, 18])),
        pods: [
            src("10.4.4.19", "veth-19", None),
            src("fd00::19", "veth-19", None),
            src("10.4.4.21", "veth-21", Some("cni0")),
        ]
        .into(),
    }
}

fn chain<'a>(chains: &'a [ChainSpec], name: &str) -> &'a ChainSpec {
    chains.iter().find(|c| c.name == name).unwrap()
}

fn js<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap()
}

/// The `x` of the rule's `meta mark set meta mark | x` (or `ct mark set ct mark | x`).
fn or_bits(r: &RuleSpec, key: &str) -> Option<u64> {
    r.expr.iter().find_map(|s| {
        let v = js(s);
        let m = v.get("mangle")?;
        m.get("key")?.get(key)?;
        m["value"]["|"][1].as_u64()
    })
}

fn last_is(r: &RuleSpec, verdict: &str) -> bool {
    js(r.expr.last().unwrap()).get(verdict).is_some()
}

#[test]
fn node_prerouting_reads_like_the_spec() {
    let d = desired();
    let chains = node_chains(d.rules.as_ref());
    let pre = chain(&chains, chain::PREROUTING);
    assert_eq!(
        (pre.kind, pre.hook, pre.prio),
        (NfChainType::Filter, NfHook::Prerouting, -150)
    );
    assert_eq!(pre.rules.len(), 13);
    let marks: Vec<_> = pre.rules.iter().map(|r| or_bits(r, "meta")).collect();
    let want = [
        Some(mark::SKIP),
        None,
        Some(mark::SKIP),
        Some(mark::SPOOFED),
        Some(mark::OWN),
        None,
        None,
        None,
        None,
        Some(mark::RETURN),
        Some(mark::OWN),
        Some(mark::CAPTURE),
        Some(mark::CAPTURE),
    ];
    assert_eq!(marks, want.map(|m| m.map(u64::from)));
    for (i, r) in pre.rules[..11].iter().enumerate() {
        let verdict = match i {
            5 | 7 => "log",
            6 | 8 => "drop",
            _ => "return",
        };
        assert!(last_is(r, verdict), "{i}: {r:?}");
    }
    assert!(!last_is(&pre.rules[11], "return"));
    assert!(!last_is(&pre.rules[12], "return"));

    let text =
        serde_json::to_string(&pre.rules.iter().map(|r| &r.expr).collect::<Vec<_>>()).unwrap();
    // 1: iifname in {istioin, istioout}
    let r1 = js(&pre.rules[0].expr);
    assert_eq!(
        r1[0]["match"]["right"],
        json!({"set": [consts::ISTIOIN.name, consts::ISTIOOUT.name]})
    );
    // 2: udp dport 6081
    assert_eq!(
        js(&pre.rules[1].expr)[0]["match"]["right"],
        json!(consts::TUNNEL_PORT)
    );
    // 3: ct mark & 0x220 == 0x220
    assert_eq!(
        js(&pre.rules[2].expr)[0]["match"],
        json!({"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 0x220]}, "right": 0x220})
    );
    // 4: from the ztunnel veth, ip saddr != ztunnel ip (spoofed)
    let r4 = js(&pre.rules[3].expr);
    assert_eq!(r4[0]["match"]["op"], "==");
    assert_eq!(r4[0]["match"]["right"], "veth-zt");
    assert_eq!(
        r4[1]["match"],
        json!({"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.4.4.18"})
    );
    // 5: from the ztunnel veth (own)
    assert_eq!(js(&pre.rules[4].expr)[0]["match"]["right"], "veth-zt");
    // 6: the rest of a spoofed flow (ct mark has 0x210) goes back to ztunnel; every packet
    // from ztunnel already returned above, so no "not from ztunnel" match is needed.
    let r10 = js(&pre.rules[9].expr);
    assert_eq!(r10[0]["match"]["right"], json!(0x210));
    // 12, 13: tcp from an enrolled address on its own device, IPv4 and IPv6
    for (i, proto, set) in [
        (11, "ip", consts::POD_IIF_SET),
        (12, "ip6", consts::POD_IIF_SET_V6),
    ] {
        let r = js(&pre.rules[i].expr);
        assert_eq!(r[0]["match"]["right"], "tcp");
        assert_eq!(
            r[1]["match"],
            json!({"op": "==", "left": {"concat": [{"meta": {"key": "iifname"}}, {"payload": {"protocol": proto, "field": "saddr"}}]},
                   "right": format!("@{set}")})
        );
    }
    // OR, never overwrite: every mark set reads the mark it ORs into.
    assert!(!text.contains("\"mangle\":{\"key\":{\"meta\":{\"key\":\"mark\"}},\"value\":5"));
    for r in &pre.rules {
        for s in &r.expr {
            if let Statement::Mangle(m) = s {
                assert_eq!(js(&m.value)["|"][0], json!({"meta": {"key": "mark"}}));
            }
        }
    }
}

/// The anti-spoofing rules: an enrolled address (`@ztunnel-pods-ips`) whose `iifname . ip
/// saddr` is not in `@ztunnel-pods-iifs` is logged (rate-limited) and dropped, after the rules
/// for ztunnel's and the tunnels' packets and before anything that captures or returns to
/// ztunnel.
#[test]
fn spoofed_pod_sources_are_dropped_before_capture() {
    let chains = node_chains(desired().rules.as_ref());
    let pre = chain(&chains, chain::PREROUTING);
    let spoofed = json!([
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": format!("@{}", consts::POD_SET)}},
        {"match": {"op": "!=", "left": {"concat": [{"meta": {"key": "iifname"}}, {"payload": {"protocol": "ip", "field": "saddr"}}]},
                   "right": format!("@{}", consts::POD_IIF_SET)}},
    ]);
    let log = js(&pre.rules[5].expr);
    assert_eq!(
        log.as_array().unwrap()[..2],
        spoofed.as_array().unwrap()[..]
    );
    assert_eq!(
        log[2],
        json!({"limit": {"rate": consts::SPOOF_LOG_PER_MINUTE, "per": "minute", "burst": consts::SPOOF_LOG_PER_MINUTE}})
    );
    assert_eq!(
        log[3],
        json!({"log": {"prefix": consts::SPOOF_LOG_PREFIX, "level": "warn"}})
    );
    let drop = js(&pre.rules[6].expr);
    assert_eq!(
        drop.as_array().unwrap()[..2],
        spoofed.as_array().unwrap()[..]
    );
    assert_eq!(drop[2], json!({"counter": null}));
    assert_eq!(drop[3], json!({"drop": null}));
    // Order: every rule for packets from ztunnel or the tunnels comes first (they carry pod
    // sources legitimately); every rule that captures or hands to ztunnel after.
    let texts: Vec<_> = pre.rules.iter().map(|r| r.text).collect();
    let at = |needle: &str| texts.iter().position(|t| t.contains(needle)).unwrap();
    for before in ["tunnels", "from ztunnel with", "from ztunnel itself"] {
        assert!(at(before) < 5, "{before}");
    }
    for after in ["ztunnel-spoofed flow", "capture outbound"] {
        assert!(at(after) > 8, "{after}");
    }
    // The IPv6 twins: the same checks on the v6 sets.
    let v6 = js(&pre.rules[8].expr);
    assert_eq!(
        v6[0]["match"],
        json!({"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": format!("@{}", consts::POD_SET_V6)})
    );
    assert_eq!(
        v6[1]["match"]["right"],
        format!("@{}", consts::POD_IIF_SET_V6)
    );
    // No other rule of the node table drops anything.
    for c in &chains {
        for (i, r) in c.rules.iter().enumerate() {
            let dropping = r.expr.iter().any(|s| matches!(s, Statement::Drop(_)));
            assert_eq!(
                dropping,
                c.name == chain::PREROUTING && (i == 6 || i == 8),
                "{}",
                r.text
            );
        }
    }
}

/// The bridge table: from the ztunnel's port anything goes (it sends with pod sources); from
/// any other port an enrolled address must be that port's pod's.
/// Same-bridge capture: with the bridge's MAC known, TCP frames the bridge would switch to
/// another port, from or to an enrolled pod, are readdressed to the bridge (after the
/// anti-spoofing rules, so a spoofed frame is dropped first); nothing else is touched.
#[test]
fn bridge_table_sends_ambient_pods_tcp_up_to_the_ip_layer() {
    let mut r = rules([10, 4, 4, 18]);
    r.ztunnel_bridge = Some("cni0".into());
    r.ztunnel_mac = "0a:58:0a:f4:01:02".into();
    // Without the bridge's MAC (state of an older agent): only anti-spoofing.
    assert_eq!(bridge_chains(Some(&r))[0].rules.len(), 5);
    r.bridge_mac = Some("9a:41:f4:81:db:a5".into());
    let c = &bridge_chains(Some(&r))[0];
    assert_eq!(c.rules.len(), 9);
    for (i, field, proto, set) in [
        (5, "saddr", "ip", consts::POD_SET),
        (6, "daddr", "ip", consts::POD_SET),
        (7, "saddr", "ip6", consts::POD_SET_V6),
        (8, "daddr", "ip6", consts::POD_SET_V6),
    ] {
        assert_eq!(
            js(&c.rules[i].expr),
            json!([
                {"match": {"op": "==", "left": {"meta": {"key": "pkttype"}}, "right": "other"}},
                {"match": {"op": "==", "left": {"meta": {"key": "protocol"}}, "right": proto}},
                {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": field}}, "right": format!("@{set}")}},
                {"mangle": {"key": {"payload": {"protocol": "ether", "field": "daddr"}}, "value": "9a:41:f4:81:db:a5"}},
                {"mangle": {"key": {"meta": {"key": "pkttype"}}, "value": "host"}},
            ])
        );
    }
    // The ztunnel's port returns first: its frames are switched as before.
    assert!(last_is(&c.rules[0], "return"));
    let text = serde_json::to_string(&c.rules.iter().map(|r| &r.expr).collect::<Vec<_>>()).unwrap();
    // ARP, ICMPv6 (neighbour discovery) and UDP are never matched: they are switched.
    assert!(
        !text.contains("arp") && !text.contains("icmp") && !text.contains("udp"),
        "{text}"
    );
    // The fingerprint follows the bridge's MAC; a bad MAC is refused before nft sees it.
    let mut other = r.clone();
    other.bridge_mac = Some("9a:41:f4:81:db:a6".into());
    assert_ne!(
        bridge_chains(Some(&other))[0].fingerprint(),
        c.fingerprint()
    );
    other.bridge_mac = Some("9a:41:f4:81:db".into());
    assert!(other.validate().is_err());
    // Without a bridge (ptp) a MAC changes nothing.
    let mut ptp = rules([10, 4, 4, 18]);
    ptp.bridge_mac = Some("9a:41:f4:81:db:a5".into());
    assert_eq!(bridge_chains(Some(&ptp))[0].rules.len(), 5);
}

#[test]
fn bridge_table_checks_the_port() {
    let mut r = rules([10, 4, 4, 18]);
    r.ztunnel_bridge = Some("cni0".into());
    r.ztunnel_mac = "0a:58:0a:f4:01:02".into();
    let chains = bridge_chains(Some(&r));
    assert_eq!(chains.len(), 1);
    let c = &chains[0];
    assert_eq!(
        (c.name, c.kind, c.hook, c.prio),
        (
            chain::PREROUTING,
            NfChainType::Filter,
            NfHook::Prerouting,
            -200
        )
    );
    assert_eq!(c.rules.len(), 5);
    assert_eq!(
        js(&c.rules[0].expr),
        json!([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "veth-zt"}}, {"return": null}])
    );
    for (i, verdict, addrs, ports) in [
        (1, "log", consts::POD_SET, consts::POD_PORT_SET),
        (2, "drop", consts::POD_SET, consts::POD_PORT_SET),
        (3, "log", consts::POD_SET_V6, consts::POD_PORT_SET_V6),
        (4, "drop", consts::POD_SET_V6, consts::POD_PORT_SET_V6),
    ] {
        let e = js(&c.rules[i].expr);
        assert_eq!(e[0]["match"]["right"], format!("@{addrs}"));
        assert_eq!(e[1]["match"]["op"], "!=");
        assert_eq!(e[1]["match"]["right"], format!("@{ports}"));
        assert!(last_is(&c.rules[i], verdict));
    }
    // Only IP payload claiming an enrolled address matches: ARP and other ethertypes never
    // match a rule; neighbour discovery from a pod carries its own address (or ::).
    let text = serde_json::to_string(&c.rules.iter().map(|r| &r.expr).collect::<Vec<_>>()).unwrap();
    assert!(!text.contains("arp") && !text.contains("icmp"), "{text}");
    assert!(bridge_chains(None)[0].rules.is_empty());
    // The fingerprint follows the ztunnel's port.
    let mut other = r.clone();
    other.ztunnel_veth = "veth-zt2".into();
    assert_ne!(
        bridge_chains(Some(&other))[0].fingerprint(),
        c.fingerprint()
    );
}

#[test]
fn pod_elements_per_table_and_family() {
    let d = desired();
    let all = pod_elements(&d.pods);
    let show: Vec<String> = all.iter().map(ToString::to_string).collect();
    let want = [
        "10.4.4.19 in inet ambient-node ztunnel-pods-ips",
        "10.4.4.21 in inet ambient-node ztunnel-pods-ips",
        "fd00::19 in inet ambient-node ztunnel-pods-ips6",
        // With a bridge, routing sees the bridge as input device.
        "\"cni0\" . 10.4.4.21 in inet ambient-node ztunnel-pods-iifs",
        "\"veth-19\" . 10.4.4.19 in inet ambient-node ztunnel-pods-iifs",
        "\"veth-19\" . fd00::19 in inet ambient-node ztunnel-pods-iifs6",
        "10.4.4.19 in bridge ambient-node ztunnel-pods-ips",
        "10.4.4.21 in bridge ambient-node ztunnel-pods-ips",
        "fd00::19 in bridge ambient-node ztunnel-pods-ips6",
        // The bridge table sees the port.
        "\"veth-19\" . 10.4.4.19 in bridge ambient-node ztunnel-pods-ports",
        "\"veth-21\" . 10.4.4.21 in bridge ambient-node ztunnel-pods-ports",
        "\"veth-19\" . fd00::19 in bridge ambient-node ztunnel-pods-ports6",
    ];
    assert_eq!(show, want);
    // One pod's share.
    let one = pod_elements(&[src("10.4.4.21", "veth-21", Some("cni0"))]);
    assert_eq!(one.len(), 4);
    assert!(one.iter().all(|e| e.elem
        != SetElem::DevAddr("veth-21".into(), "10.4.4.21".parse().unwrap())
        || e.family() == "bridge"));
}

#[test]
fn connmark_output_and_nat_chains() {
    let d = desired();
    let chains = node_chains(d.rules.as_ref());
    let names: Vec<_> = chains.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            chain::PREROUTING,
            chain::FORWARD,
            chain::INPUT,
            chain::OUTPUT,
            chain::NAT_PREROUTING,
            chain::NAT_POSTROUTING
        ]
    );
    for name in [chain::FORWARD, chain::INPUT] {
        let c = chain(&chains, name);
        assert_eq!((c.kind, c.prio), (NfChainType::Filter, -150));
        let bits: Vec<_> = c.rules.iter().map(|r| or_bits(r, "ct")).collect();
        assert_eq!(bits, [Some(0x220), Some(0x210)]);
        assert_eq!(
            js(&c.rules[0].expr)[0]["match"]["left"]["&"][0],
            json!({"meta": {"key": "mark"}})
        );
    }
    let out = chain(&chains, chain::OUTPUT);
    assert_eq!(
        (out.kind, out.hook, out.prio),
        (NfChainType::Route, NfHook::Output, -150)
    );
    assert_eq!(out.rules.len(), 1);
    assert_eq!(js(&out.rules[0].expr)[0]["match"]["right"], "10.4.4.1");
    assert_eq!(or_bits(&out.rules[0], "meta"), Some(0x220));

    let dnat = chain(&chains, chain::NAT_PREROUTING);
    assert_eq!(
        (dnat.kind, dnat.hook, dnat.prio),
        (NfChainType::NAT, NfHook::Prerouting, -110)
    );
    let snat = chain(&chains, chain::NAT_POSTROUTING);
    assert_eq!(
        (snat.kind, snat.hook, snat.prio),
        (NfChainType::NAT, NfHook::Postrouting, 90)
    );
    let d = js(&dnat.rules[0].expr);
    assert_eq!(d[1]["match"]["right"], json!(0x100));
    assert_eq!(
        d[2]["dnat"],
        json!({"family": "ip", "addr": {"payload": {"protocol": "ip", "field": "daddr"}}})
    );
    let s = js(&snat.rules[0].expr);
    assert_eq!(
        s[2]["snat"],
        json!({"family": "ip", "addr": {"payload": {"protocol": "ip", "field": "saddr"}}})
    );
}

#[test]
fn no_ztunnel_means_empty_chains() {
    let chains = node_chains(None);
    assert_eq!(chains.len(), 6);
    assert!(chains.iter().all(|c| c.rules.is_empty()));
}

#[test]
fn gateways_are_sorted_and_deduplicated() {
    let mut a = rules([10, 4, 4, 18]);
    a.node_gateways = vec![
        Ipv4Addr::new(10, 4, 4, 1).into(),
        Ipv4Addr::new(10, 4, 5, 1).into(),
    ];
    let mut b = a.clone();
    b.node_gateways = vec![
        Ipv4Addr::new(10, 4, 5, 1).into(),
        Ipv4Addr::new(10, 4, 4, 1).into(),
        Ipv4Addr::new(10, 4, 5, 1).into(),
    ];
    let (ca, cb) = (node_chains(Some(&a)), node_chains(Some(&b)));
    assert_eq!(chain(&ca, chain::OUTPUT).rules.len(), 2);
    assert_eq!(
        chain(&ca, chain::OUTPUT).fingerprint(),
        chain(&cb, chain::OUTPUT).fingerprint()
    );
}

#[test]
fn ztunnel_chain_reads_like_the_spec() {
    let z = ZtunnelRules {
        ztunnel_ip: Ipv4Addr::new(10, 4, 4, 18).into(),
        ztunnel_ip6: None,
        pod_iface: "eth0".into(),
        syn_limit: Some(SynLimit::DEFAULT),
    };
    let chains = ztunnel_chains(&z);
    assert_eq!(chains.len(), 2);
    // Before conntrack: a source's SYNs over its rate, on either tunnel, dropped.
    let l = &chains[1];
    assert_eq!(
        (l.name, l.kind, l.hook, l.prio, l.rules.len()),
        (
            "syn-limit",
            NfChainType::Filter,
            NfHook::Prerouting,
            -300,
            1
        )
    );
    let e: Vec<Value> = l.rules[0].expr.iter().map(js).collect();
    assert_eq!(
        e[0]["match"]["right"],
        json!({"set": ["pistioin", "pistioout"]})
    );
    assert_eq!(e[1]["match"]["right"], json!("syn"));
    assert_eq!(
        e[2],
        json!({"meter": {
            "name": "ztunnel-syn-limit",
            "key": {"elem": {
                "val": {"payload": {"protocol": "ip", "field": "saddr"}},
                "timeout": 10, "expires": null, "comment": null, "counter": null
            }},
            "stmt": {"limit": {"rate": 1000, "per": "second", "burst": 2000, "inv": true}}
        }})
    );
    assert_eq!(e[4], json!({"drop": null}));
    assert_eq!(
        ztunnel_chains(&ZtunnelRules {
            syn_limit: None,
            ..z.clone()
        })
        .len(),
        1
    );
    let c = &chains[0];
    assert_eq!(
        (c.name, c.kind, c.hook, c.prio),
        ("prerouting", NfChainType::Filter, NfHook::Prerouting, -150)
    );
    assert_eq!(c.rules.len(), 4);
    let tproxy: Vec<_> = c
        .rules
        .iter()
        .map(|r| r.expr.iter().map(js).find_map(|v| v.get("tproxy").cloned()))
        .collect();
    let tp = |p: u16| Some(json!({"family": "ip", "addr": "127.0.0.1", "port": p}));
    assert_eq!(
        tproxy,
        [
            tp(port::INBOUND_HBONE),
            tp(port::OUTBOUND),
            tp(port::INBOUND_PLAINTEXT),
            None
        ]
    );
    let ifaces: Vec<_> = c
        .rules
        .iter()
        .map(|r| js(&r.expr[0])["match"]["right"].clone())
        .collect();
    assert_eq!(
        ifaces,
        [
            json!("pistioin"),
            json!("pistioout"),
            json!("pistioin"),
            json!("eth0")
        ]
    );
    assert_eq!(js(&c.rules[0].expr[1])["match"]["right"], json!(15008));
    let marks: Vec<_> = c
        .rules
        .iter()
        .map(|r| {
            let m = r
                .expr
                .iter()
                .map(js)
                .find_map(|v| v.get("mangle").cloned())
                .unwrap();
            assert_eq!(
                m["value"]["|"][0]["&"][1],
                json!(!zt_mark::MASK),
                "mask 0xfffff000"
            );
            m["value"]["|"][1].as_u64().unwrap()
        })
        .collect();
    assert_eq!(marks, [0x400, 0x400, 0x400, 0x4d3]);
    for r in &c.rules[..3] {
        assert!(last_is(r, "accept"));
    }
    assert_eq!(
        js(&c.rules[3].expr[2])["match"],
        json!({"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.4.4.18"})
    );
}

#[test]
fn fingerprints_follow_the_inputs() {
    let fp = |r: &NodeRules| -> Vec<u64> {
        node_chains(Some(r))
            .iter()
            .map(ChainSpec::fingerprint)
            .collect()
    };
    let a = rules([10, 4, 4, 18]);
    assert_eq!(fp(&a), fp(&a.clone()));
    let b = rules([10, 4, 4, 30]);
    let (fa, fb) = (fp(&a), fp(&b));
    assert_ne!(fa[0], fb[0], "prerouting depends on the ztunnel ip");
    assert_eq!(fa[1..], fb[1..], "nothing else does");
    let mut c = a.clone();
    c.tunnel_port = 6082;
    assert_ne!(fp(&c)[0], fa[0]);
    let mut d = a.clone();
    d.ztunnel_veth = "veth-other".into();
    assert_ne!(fp(&d)[0], fa[0]);
    let mut e = a.clone();
    e.node_gateways.push(Ipv4Addr::new(10, 9, 9, 1).into());
    assert_ne!(fp(&e)[3], fa[3]);
    // Same statements in different chains never share a fingerprint.
    assert_ne!(fa[1], fa[2]);
    // Empty chains too.
    let empty: Vec<u64> = node_chains(None)
        .iter()
        .map(ChainSpec::fingerprint)
        .collect();
    assert!(fa.iter().zip(&empty).all(|(x, y)| x != y));
    let z = |ip: [u8; 4]| {
        ztunnel_chains(&ZtunnelRules {
            ztunnel_ip: Ipv4Addr::from(ip).into(),
            ztunnel_ip6: None,
            pod_iface: "eth0".into(),
            syn_limit: Some(SynLimit::DEFAULT),
        })[0]
            .fingerprint()
    };
    assert_ne!(z([10, 0, 0, 1]), z([10, 0, 0, 2]));
}

#[test]
fn comments_carry_the_tag_and_fit_nft() {
    let d = desired();
    let z = ZtunnelRules {
        ztunnel_ip: Ipv4Addr::new(10, 4, 4, 18).into(),
        ztunnel_ip6: None,
        pod_iface: "eth0".into(),
        syn_limit: Some(SynLimit::DEFAULT),
    };
    let all = node_chains(d.rules.as_ref())
        .into_iter()
        .chain(ztunnel_chains(&z));
    for c in all {
        let rendered = c.rules(NfFamily::INet, "t");
        for (i, r) in rendered.iter().enumerate() {
            let comment = r.comment.as_deref().unwrap();
            assert!(comment.len() <= render::COMMENT_MAX, "{comment}");
            let tag = RuleTag::parse(comment).unwrap();
            assert_eq!(
                tag,
                RuleTag {
                    index: i + 1,
                    count: rendered.len(),
                    fingerprint: c.fingerprint()
                }
            );
            assert!(comment.starts_with(c.rules[i].text));
        }
    }
    let t = RuleTag {
        index: 3,
        count: 8,
        fingerprint: 0xdead_beef,
    };
    assert_eq!(rule_comment("x", t), "x [ambient 3/8 00000000deadbeef]");
    let long = rule_comment(&"é".repeat(200), t);
    assert!(long.len() <= render::COMMENT_MAX);
    assert_eq!(RuleTag::parse(&long), Some(t));
    assert_eq!(
        RuleTag::parse("a [ambient 1/2 [ambient 3/8 00000000deadbeef]"),
        Some(t)
    );
    for bad in [
        "",
        "x",
        "x [ambient 1/2 abc]",
        "x [ambient 1/2 00000000deadbeef",
        "x [ambient a/2 00000000deadbeef]",
        "x [ambient 12 00000000deadbeef]",
    ] {
        assert_eq!(RuleTag::parse(bad), None, "{bad}");
    }
}

// ---- an in-memory kernel for planning tests -----------------------------------------------

/// Applies a batch to an observed table the way nft would (for the commands plans use).
fn model_apply(obs: Option<ObservedTable>, batch: &Nftables<'_>) -> Option<ObservedTable> {
    let mut t = obs;
    let mut handle = 1000u64;
    for o in batch.objects.iter() {
        let v = js(o);
        let (cmd, body) = v.as_object().unwrap().iter().next().unwrap();
        let (kind, obj) = body.as_object().unwrap().iter().next().unwrap();
        handle += 1;
        match (cmd.as_str(), kind.as_str()) {
            ("add", "table") => {
                t.get_or_insert_with(ObservedTable::default);
            }
            ("delete", "table") => t = None,
            (_, _) if t.is_none() => panic!("{cmd} {kind} without table"),
            ("add", "set") => {
                let name = obj["name"].as_str().unwrap().to_string();
                t.as_mut()
                    .unwrap()
                    .sets
                    .entry(name)
                    .or_insert_with(|| ObservedSet {
                        set_type: match &obj["type"] {
                            Value::Array(parts) => parts
                                .iter()
                                .map(|p| p.as_str().unwrap())
                                .collect::<Vec<_>>()
                                .join(" . "),
                            t => t.as_str().unwrap().into(),
                        },
                        ..ObservedSet::default()
                    });
            }
            (op, "element") => {
                let set = t
                    .as_mut()
                    .unwrap()
                    .sets
                    .get_mut(obj["name"].as_str().unwrap())
                    .expect("set");
                for e in obj["elem"].as_array().unwrap() {
                    let ty_pair = set.set_type.contains(" . ");
                    if let Some(pair) = e.get("concat") {
                        assert!(ty_pair, "pair into {}", set.set_type);
                        let elem = (
                            pair[0].as_str().unwrap().to_string(),
                            pair[1].as_str().unwrap().parse::<IpAddr>().unwrap(),
                        );
                        if op == "add" {
                            set.dev_elems.insert(elem);
                        } else {
                            assert!(
                                set.dev_elems.remove(&elem),
                                "delete of absent element fails in nft"
                            );
                        }
                        continue;
                    }
                    assert!(!ty_pair, "address into {}", set.set_type);
                    let ip: IpAddr = e.as_str().unwrap().parse().unwrap();
                    if op == "add" {
                        set.elems.insert(ip);
                    } else {
                        assert!(
                            set.elems.remove(&ip),
                            "delete of absent element fails in nft"
                        );
                    }
                }
            }
            ("add", "chain") => {
                let name = obj["name"].as_str().unwrap().to_string();
                let c = ObservedChain {
                    name: name.clone(),
                    handle: Some(handle),
                    chain_type: obj["type"].as_str().map(Into::into),
                    hook: obj["hook"].as_str().map(Into::into),
                    prio: obj["prio"].as_i64(),
                    policy: obj["policy"].as_str().map(Into::into),
                    rules: vec![],
                };
                let chains = &mut t.as_mut().unwrap().chains;
                if let Some(old) = chains.get(&name) {
                    assert_eq!(old.prio, c.prio, "nft cannot change a base chain in place");
                } else {
                    chains.insert(name, c);
                }
            }
            ("flush", "chain") => t
                .as_mut()
                .unwrap()
                .chains
                .get_mut(obj["name"].as_str().unwrap())
                .unwrap()
                .rules
                .clear(),
            ("delete", "chain") => {
                let c = t
                    .as_mut()
                    .unwrap()
                    .chains
                    .remove(obj["name"].as_str().unwrap())
                    .unwrap();
                assert!(
                    c.rules.is_empty(),
                    "nft refuses to delete a non-empty chain"
                );
            }
            ("add", "rule") => {
                let comment = obj["comment"].as_str().map(String::from);
                t.as_mut()
                    .unwrap()
                    .chains
                    .get_mut(obj["chain"].as_str().unwrap())
                    .unwrap()
                    .rules
                    .push(ObservedRule {
                        handle: Some(handle),
                        tag: comment.as_deref().and_then(RuleTag::parse),
                        comment,
                        packets: None,
                    });
            }
            other => panic!("unexpected command {other:?}"),
        }
    }
    t
}

/// (command, object kind, chain/set name) of every command of a batch.
fn commands(b: &Nftables<'_>) -> Vec<(String, String, String)> {
    b.objects
        .iter()
        .map(|o| {
            let v = js(o);
            let (cmd, body) = v.as_object().unwrap().iter().next().unwrap();
            let (kind, obj) = body.as_object().unwrap().iter().next().unwrap();
            let name = obj
                .get("chain")
                .or(obj.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            (cmd.clone(), kind.clone(), name.to_string())
        })
        .collect()
}

fn count(cmds: &[(String, String, String)], cmd: &str, kind: &str) -> usize {
    cmds.iter().filter(|c| c.0 == cmd && c.1 == kind).count()
}

#[test]
fn plan_from_nothing_creates_everything() {
    let d = desired();
    let b = plan_node(&d, None);
    let cmds = commands(&b);
    assert_eq!(
        cmds[0],
        ("add".into(), "table".into(), consts::NODE_NFT_TABLE.into())
    );
    assert_eq!(count(&cmds, "add", "set"), 4);
    assert_eq!(count(&cmds, "add", "chain"), 6);
    assert_eq!(count(&cmds, "add", "rule"), 13 + 2 + 2 + 1 + 2 + 2);
    assert_eq!(count(&cmds, "add", "element"), 4);
    assert_eq!(
        count(&cmds, "flush", "chain") + count(&cmds, "delete", "element"),
        0
    );
    // Set types.
    let v = js(&b);
    let sets: Vec<_> = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["add"].get("set"))
        .collect();
    assert_eq!(sets[0]["name"], consts::POD_SET);
    assert_eq!(sets[0]["type"], "ipv4_addr");
    assert_eq!(sets[0]["family"], "inet");
    assert_eq!(sets[1]["name"], consts::POD_SET_V6);
    assert_eq!(sets[1]["type"], "ipv6_addr");
    assert_eq!(sets[2]["name"], consts::POD_IIF_SET);
    assert_eq!(sets[2]["type"], json!(["ifname", "ipv4_addr"]));
    assert_eq!(sets[3]["name"], consts::POD_IIF_SET_V6);
    assert_eq!(sets[3]["type"], json!(["ifname", "ipv6_addr"]));
    let elems: Vec<_> = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["add"].get("element"))
        .collect();
    assert_eq!(
        elems[2]["elem"],
        json!([{"concat": ["cni0", "10.4.4.21"]}, {"concat": ["veth-19", "10.4.4.19"]}])
    );
    // Sets come before the rule that references one.
    let first_rule = cmds.iter().position(|c| c.1 == "rule").unwrap();
    let last_set = cmds.iter().rposition(|c| c.1 == "set").unwrap();
    assert!(last_set < first_rule);

    let applied = model_apply(None, &b).unwrap();
    assert_eq!(applied.pods_v4(), d.pods_v4());
    assert_eq!(applied.pods_v6(), d.pods_v6());
    assert_eq!(applied.set_dev_addrs(consts::POD_IIF_SET).len(), 2);
    assert!(
        is_empty(&plan_node(&d, Some(&applied))),
        "plan on a matching table is empty"
    );
}

#[test]
fn plan_moves_only_the_differing_elements() {
    let d = desired();
    let mut obs = model_apply(None, &plan_node(&d, None)).unwrap();
    let set = obs.sets.get_mut(consts::POD_SET).unwrap();
    set.elems.remove(&IpAddr::from([10, 4, 4, 19]));
    set.elems.insert(IpAddr::from([10, 4, 4, 99]));
    let b = plan_node(&d, Some(&obs));
    let v = js(&b);
    assert_eq!(
        v,
        json!({"nftables": [
            {"add": {"element": {"family": "inet", "table": consts::NODE_NFT_TABLE, "name": consts::POD_SET, "elem": ["10.4.4.19"]}}},
            {"delete": {"element": {"family": "inet", "table": consts::NODE_NFT_TABLE, "name": consts::POD_SET, "elem": ["10.4.4.99"]}}},
        ]})
    );
    let after = model_apply(Some(obs), &b).unwrap();
    assert!(is_empty(&plan_node(&d, Some(&after))));
}

#[test]
fn changed_ztunnel_ip_refills_only_prerouting() {
    let d = desired();
    let obs = model_apply(None, &plan_node(&d, None)).unwrap();
    let mut d2 = d.clone();
    d2.rules = Some(rules([10, 4, 4, 30]));
    let b = plan_node(&d2, Some(&obs));
    let cmds = commands(&b);
    assert_eq!(
        cmds[0],
        ("flush".into(), "chain".into(), chain::PREROUTING.into())
    );
    assert_eq!(cmds.len(), 1 + 13);
    assert!(cmds[1..]
        .iter()
        .all(|c| c.0 == "add" && c.1 == "rule" && c.2 == chain::PREROUTING));
    let after = model_apply(Some(obs.clone()), &b).unwrap();
    assert!(is_empty(&plan_node(&d2, Some(&after))));
    // The other chains kept their rules (same handles).
    for name in [
        chain::FORWARD,
        chain::INPUT,
        chain::OUTPUT,
        chain::NAT_PREROUTING,
    ] {
        assert_eq!(after.chains[name].handles(), obs.chains[name].handles());
    }
    assert_ne!(
        after.chains[chain::PREROUTING].handles(),
        obs.chains[chain::PREROUTING].handles()
    );
}

#[test]
fn losing_the_ztunnel_empties_the_chains_and_keeps_the_pods() {
    let d = desired();
    let obs = model_apply(None, &plan_node(&d, None)).unwrap();
    let none = NodeNft {
        rules: None,
        ..d.clone()
    };
    let b = plan_node(&none, Some(&obs));
    let cmds = commands(&b);
    assert_eq!(count(&cmds, "flush", "chain"), 6);
    assert_eq!(cmds.len(), 6);
    let after = model_apply(Some(obs), &b).unwrap();
    assert!(after.chains.values().all(|c| c.rules.is_empty()));
    assert_eq!(after.pods_v4(), d.pods_v4());
    assert!(is_empty(&plan_node(&none, Some(&after))));
    // And back.
    let again = plan_node(&d, Some(&after));
    assert_eq!(
        count(&commands(&again), "flush", "chain"),
        0,
        "empty chains need no flush"
    );
    let back = model_apply(Some(after), &again).unwrap();
    assert!(is_empty(&plan_node(&d, Some(&back))));
}

#[test]
fn tampered_rules_are_detected() {
    let d = desired();
    let obs = model_apply(None, &plan_node(&d, None)).unwrap();
    // A rule someone appended, a rule removed, a comment edited, rules swapped.
    type Edit = Box<dyn Fn(&mut ObservedChain)>;
    let edits: Vec<Edit> = vec![
        Box::new(|c| c.rules.push(ObservedRule::default())),
        Box::new(|c| {
            c.rules.pop();
        }),
        Box::new(|c| {
            c.rules[2].comment = Some("x".into());
            c.rules[2].tag = None;
        }),
        Box::new(|c| c.rules.swap(0, 1)),
    ];
    for edit in edits {
        let mut o = obs.clone();
        edit(o.chains.get_mut(chain::PREROUTING).unwrap());
        let cmds = commands(&plan_node(&d, Some(&o)));
        assert_eq!(
            cmds[0],
            ("flush".into(), "chain".into(), chain::PREROUTING.into())
        );
        assert_eq!(cmds.len(), 14);
    }
}

#[test]
fn wrong_base_chain_is_replaced_and_strangers_removed() {
    let d = desired();
    let mut obs = model_apply(None, &plan_node(&d, None)).unwrap();
    obs.chains.get_mut(chain::NAT_PREROUTING).unwrap().prio = Some(-100);
    obs.chains.insert(
        "old".into(),
        ObservedChain {
            name: "old".into(),
            ..Default::default()
        },
    );
    let cmds = commands(&plan_node(&d, Some(&obs)));
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        cmds,
        [
            s("flush", "chain", "old"),
            s("delete", "chain", "old"),
            s("flush", "chain", chain::NAT_PREROUTING),
            s("delete", "chain", chain::NAT_PREROUTING),
            s("add", "chain", chain::NAT_PREROUTING),
            s("add", "rule", chain::NAT_PREROUTING),
            s("add", "rule", chain::NAT_PREROUTING),
        ]
    );
}

#[test]
fn missing_set_or_chain_is_added_alone() {
    let d = desired();
    let mut obs = model_apply(None, &plan_node(&d, None)).unwrap();
    obs.sets.remove(consts::POD_SET_V6);
    obs.chains.remove(chain::OUTPUT);
    let cmds = commands(&plan_node(&d, Some(&obs)));
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        cmds,
        [
            s("add", "set", consts::POD_SET_V6),
            s("add", "element", consts::POD_SET_V6),
            s("add", "chain", chain::OUTPUT),
            s("add", "rule", chain::OUTPUT),
        ]
    );
}

#[test]
fn ztunnel_plan_is_idempotent() {
    let z = ZtunnelRules {
        ztunnel_ip: Ipv4Addr::new(10, 4, 4, 18).into(),
        ztunnel_ip6: None,
        pod_iface: "eth0".into(),
        syn_limit: Some(SynLimit::DEFAULT),
    };
    let b = plan_ztunnel(&z, None);
    let v = js(&b);
    assert_eq!(
        v["nftables"][0],
        json!({"add": {"table": {"family": "ip", "name": consts::ZTUNNEL_NFT_TABLE}}})
    );
    let obs = model_apply(None, &b).unwrap();
    assert!(is_empty(&plan_ztunnel(&z, Some(&obs))));
    let z2 = ZtunnelRules {
        ztunnel_ip: Ipv4Addr::new(10, 4, 4, 30).into(),
        ztunnel_ip6: None,
        ..z
    };
    assert_eq!(commands(&plan_ztunnel(&z2, Some(&obs))).len(), 5);
}

#[test]
fn parses_nft_output() {
    // Shape of `nft -j list table inet ambient-node` (nft 1.0.6).
    let out = json!({"nftables": [
        {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "ambient-node", "handle": 7}},
        {"set": {"family": "inet", "name": "ztunnel-pods-ips", "table": "ambient-node", "type": "ipv4_addr", "handle": 1,
                 "elem": ["10.4.4.19", {"elem": {"val": "10.4.4.21", "comment": "x"}}]}},
        {"set": {"family": "inet", "name": "ztunnel-pods-ips6", "table": "ambient-node", "type": "ipv6_addr", "handle": 2}},
        {"set": {"family": "inet", "name": "one", "table": "ambient-node", "type": ["ipv4_addr", "inet_service"], "handle": 3,
                 "elem": {"concat": ["10.0.0.1", 80]}}},
        {"chain": {"family": "inet", "table": "ambient-node", "name": "prerouting", "handle": 4, "type": "filter",
                   "hook": "prerouting", "prio": -150, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "ambient-node", "name": "helper", "handle": 5}},
        {"rule": {"family": "inet", "table": "ambient-node", "chain": "prerouting", "handle": 9,
                  "comment": "udp [ambient 1/2 00000000000000ff]", "expr": [{"weird": {}}]}},
        {"rule": {"family": "inet", "table": "ambient-node", "chain": "prerouting", "handle": 10, "expr": []}},
        {"rule": {"family": "inet", "table": "other", "chain": "prerouting", "handle": 11, "expr": []}}
    ]});
    let t = observe::parse_table(&out.to_string(), consts::NODE_NFT_TABLE).unwrap();
    assert_eq!(
        t.pods_v4(),
        [Ipv4Addr::new(10, 4, 4, 19), Ipv4Addr::new(10, 4, 4, 21)].into()
    );
    assert!(t.pods_v6().is_empty());
    assert_eq!(t.sets["ztunnel-pods-ips6"].set_type, "ipv6_addr");
    assert_eq!(t.sets["one"].set_type, "ipv4_addr . inet_service");
    assert_eq!(t.sets["one"].other_elems.len(), 1);
    let pre = &t.chains["prerouting"];
    assert_eq!(
        (pre.chain_type.as_deref(), pre.hook.as_deref(), pre.prio),
        (Some("filter"), Some("prerouting"), Some(-150))
    );
    assert_eq!(pre.rule_count(), 2);
    assert_eq!(pre.handles(), [9, 10]);
    assert_eq!(pre.fingerprints(), [Some(0xff), None]);
    assert_eq!(t.chains["helper"].chain_type, None);
    assert_eq!(t.chains.len(), 2);

    for bad in ["", "{", "[]", "{\"nftables\": 3}"] {
        assert!(
            matches!(observe::parse_table(bad, "x"), Err(NftError::BadJson(_))),
            "{bad}"
        );
    }
}

#[test]
fn bad_interface_names_are_refused() {
    for name in ["", "a/b", "a b", "sixteen-chars-xx", "x:y", "..", "tab\t"] {
        let mut r = rules([10, 0, 0, 1]);
        r.ztunnel_veth = name.into();
        assert!(
            matches!(r.validate(), Err(NftError::Invalid(_))),
            "{name:?}"
        );
        let z = ZtunnelRules {
            ztunnel_ip: Ipv4Addr::new(10, 0, 0, 1).into(),
            ztunnel_ip6: None,
            pod_iface: name.into(),
            syn_limit: Some(SynLimit::DEFAULT),
        };
        assert!(z.validate().is_err());
    }
    assert!(rules([10, 0, 0, 1]).validate().is_ok());
    // An odd but valid name is just data in the JSON.
    let mut r = rules([10, 0, 0, 1]);
    r.ztunnel_veth = "we\"ird\\".into();
    assert!(r.validate().is_ok());
    assert!(to_json(&plan_node(
        &NodeNft {
            rules: Some(r),
            ..Default::default()
        },
        None
    ))
    .is_ok());
}

#[test]
fn missing_nft_is_reported() {
    let e = exec::run_with(std::path::Path::new("/nonexistent/nft"), &["-v"], None)
        .err()
        .unwrap();
    assert!(matches!(e, NftError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/nft"));
}

#[test]
fn error_messages_explain() {
    let e = NftError::Missing {
        program: "nft".into(),
    };
    assert!(e.to_string().contains("runtime dependency"));
    let e = NftError::Failed {
        action: "apply batch".into(),
        code: Some(1),
        stderr: "Error: x".into(),
    };
    assert!(e.to_string().contains("Error: x"));
}

#[test]
fn bridge_port_ztunnel_is_matched_by_bridge_and_mac() {
    let mut r = rules([10, 4, 4, 18]);
    r.ztunnel_bridge = Some("cni0".into());
    r.ztunnel_mac = "0a:58:0a:f4:01:02".into();
    r.validate().unwrap();
    let chains = node_chains(Some(&r));
    let pre = &chains[0];
    for i in [3, 4] {
        let m = js(&pre.rules[i].expr);
        assert_eq!(m[0]["match"]["right"], "cni0");
        assert_eq!(
            m[1]["match"],
            json!({"op": "==", "left": {"payload": {"protocol": "ether", "field": "saddr"}}, "right": "0a:58:0a:f4:01:02"})
        );
    }
    r.ztunnel_mac = "nope".into();
    assert!(r.validate().is_err());
}

/// A node upgraded from the ruleset before anti-spoofing (no `ztunnel-pods-iifs*` sets, a
/// prerouting chain with other rules): one batch creates and fills the new sets and only then
/// rewrites the prerouting chain, so no packet sees the new capture rule with an empty set.
#[test]
fn upgrade_from_the_address_only_ruleset_fills_the_new_sets_first() {
    let d = desired();
    let mut old = model_apply(None, &plan_node(&d, None)).unwrap();
    old.sets.remove(consts::POD_IIF_SET);
    old.sets.remove(consts::POD_IIF_SET_V6);
    let pre = old.chains.get_mut(chain::PREROUTING).unwrap();
    pre.rules.truncate(8);
    for (i, r) in pre.rules.iter_mut().enumerate() {
        r.tag = Some(RuleTag {
            index: i + 1,
            count: 8,
            fingerprint: 0x0123_4567_89ab_cdef,
        });
    }
    let b = plan_node(&d, Some(&old));
    let cmds = commands(&b);
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    let pos = |c: (String, String, String)| cmds.iter().position(|x| *x == c).unwrap();
    let flush = pos(s("flush", "chain", chain::PREROUTING));
    assert!(pos(s("add", "set", consts::POD_IIF_SET)) < flush);
    assert!(pos(s("add", "element", consts::POD_IIF_SET)) < flush);
    assert!(pos(s("add", "set", consts::POD_IIF_SET_V6)) < flush);
    // Nothing else changes: the address sets and the other chains are current.
    assert_eq!(count(&cmds, "add", "rule"), 13);
    assert_eq!(count(&cmds, "flush", "chain"), 1);
    assert_eq!(count(&cmds, "delete", "element"), 0);
    let after = model_apply(Some(old), &b).unwrap();
    assert!(is_empty(&plan_node(&d, Some(&after))));
    // The bridge table did not exist before: created whole.
    let bb = plan_node_bridge(&d, None);
    let bcmds = commands(&bb);
    assert_eq!(count(&bcmds, "add", "table"), 1);
    assert_eq!(count(&bcmds, "add", "set"), 4);
    assert_eq!(count(&bcmds, "add", "rule"), 5);
    let bridge = model_apply(None, &bb).unwrap();
    assert_eq!(
        bridge.set_dev_addrs(consts::POD_PORT_SET),
        [
            ("veth-19".to_string(), "10.4.4.19".parse().unwrap()),
            ("veth-21".to_string(), "10.4.4.21".parse().unwrap())
        ]
        .into()
    );
    assert!(is_empty(&plan_node_bridge(&d, Some(&bridge))));
    let js_b = js(&bb);
    assert_eq!(
        js_b["nftables"][0],
        json!({"add": {"table": {"family": "bridge", "name": consts::NODE_NFT_TABLE}}})
    );
}

#[test]
fn parses_concatenated_elements() {
    let out = json!({"nftables": [
        {"set": {"family": "inet", "name": "ztunnel-pods-iifs", "table": "ambient-node", "type": ["ifname", "ipv4_addr"], "handle": 3,
                 "elem": [{"concat": ["veth1", "10.0.0.1"]}, {"elem": {"val": {"concat": ["cni0", "10.0.0.2"]}, "comment": "x"}},
                          {"concat": ["veth1", 80]}]}}
    ]});
    let t = observe::parse_table(&out.to_string(), consts::NODE_NFT_TABLE).unwrap();
    assert_eq!(
        t.set_dev_addrs(consts::POD_IIF_SET),
        [
            ("cni0".to_string(), "10.0.0.2".parse().unwrap()),
            ("veth1".to_string(), "10.0.0.1".parse().unwrap())
        ]
        .into()
    );
    assert_eq!(t.sets[consts::POD_IIF_SET].other_elems.len(), 1);
    assert_eq!(t.sets[consts::POD_IIF_SET].set_type, "ifname . ipv4_addr");
}

#[test]
fn bad_pod_device_names_are_refused() {
    let mut d = desired();
    d.pods.insert(src("10.4.4.30", "sixteen-chars-xx", None));
    assert!(matches!(d.validate(), Err(NftError::Invalid(_))));
    let mut d = desired();
    d.pods.insert(src("10.4.4.30", "veth-30", Some("a/b")));
    assert!(d.validate().is_err());
    assert!(desired().validate().is_ok());
    let bad = pod_elements(&[src("10.4.4.30", "", None)]);
    assert!(matches!(add_pod_elements(&bad), Err(NftError::Invalid(_))));
}
