//! Pure tests of the iptables rendering and planning.

use std::net::Ipv4Addr;

use super::*;
use crate::consts;
use crate::nft::NodeRules;

fn rules() -> NodeRules {
    NodeRules {
        ztunnel_veth: "veth-zt".into(),
        ztunnel_bridge: None,
        ztunnel_mac: String::new(),
        bridge_mac: None,
        ztunnel_ip: Ipv4Addr::new(10, 4, 4, 2).into(),
        ztunnel_ip6: Some("fd00::2".parse().unwrap()),
        node_gateways: vec![
            Ipv4Addr::new(10, 4, 4, 1).into(),
            "fd00::1".parse().unwrap(),
        ],
        tunnel_port: consts::TUNNEL_PORT,
    }
}

/// What `iptables-save` would show after `text` was restored onto nothing (rules kept as
/// written; only their comments are compared anyway).
fn saved_after(text: &str) -> Observed {
    let mut save = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("-I ") {
            let (hook, spec) = rest.split_once(" 1 ").unwrap();
            save.push_str(&format!("-A {hook} {spec}\n"));
        } else {
            save.push_str(line);
            save.push('\n');
        }
    }
    parse_save(&save)
}

#[test]
fn marks_and_order_mirror_the_nft_rules() {
    let r = rules();
    let pre = &node_chains(Some(&r), Fam::V4)[0];
    assert_eq!(
        (pre.table, pre.name, pre.hook),
        ("mangle", chain::PREROUTING, "PREROUTING")
    );
    let targets: Vec<&str> = pre.rules.iter().map(|r| r.target.as_str()).collect();
    let pos = |t: &str| targets.iter().position(|x| *x == t).unwrap();
    // Anti-spoofing before the ztunnel-flow (0x040) and capture (0x100) rules.
    assert!(pos("DROP") < pos("MARK --or-mark 0x40"));
    assert!(pos("MARK --or-mark 0x40") < pos("MARK --or-mark 0x100"));
    assert_eq!(targets.last(), Some(&"MARK --or-mark 0x100"));
    assert_eq!(pre.rules[0].matches, "-i istioin");
    assert!(pre
        .rules
        .iter()
        .any(|l| l.matches == "-i veth-zt ! -s 10.4.4.2/32" && l.target == "MARK --or-mark 0x210"));
    let pre6 = &node_chains(Some(&r), Fam::V6)[0];
    assert!(pre6
        .rules
        .iter()
        .any(|l| l.matches == "-i veth-zt ! -s fd00::2/128"));
    assert!(pre6
        .rules
        .iter()
        .any(|l| l.matches.contains("ztunnel-pods-iifs6 src,src")));
    let out6 = &node_chains(Some(&r), Fam::V6)[3];
    assert_eq!(out6.rules.len(), 1);
    assert_eq!(out6.rules[0].matches, "-s fd00::1/128");
    let nat = &node_chains(Some(&r), Fam::V4)[4];
    assert_eq!((nat.table, nat.hook), ("nat", "PREROUTING"));
    assert_eq!(nat.rules[0].matches, "-m mark --mark 0x100/0x100");
    assert_eq!(nat.rules[0].target, "ACCEPT");
}

#[test]
fn a_second_plan_is_empty_and_a_stale_chain_is_refilled() {
    let r = rules();
    let chains = node_chains(Some(&r), Fam::V4);
    let first = plan(&chains, &Observed::default());
    assert!(first.starts_with("*mangle\n:AMBIENT-PREROUTING - [0:0]\n"));
    assert!(
        first.contains("-I PREROUTING 1 -m comment --comment ambient-node -j AMBIENT-PREROUTING\n")
    );
    assert!(first.contains("*nat\n"));
    let observed = saved_after(&first);
    assert_eq!(plan(&chains, &observed), "");
    // Another gateway: only the output chain is declared (flushed) and refilled.
    let mut r2 = r.clone();
    r2.node_gateways.push(Ipv4Addr::new(10, 4, 5, 1).into());
    let second = plan(&node_chains(Some(&r2), Fam::V4), &observed);
    assert!(second.contains(":AMBIENT-OUTPUT - [0:0]\n"));
    assert!(!second.contains(":AMBIENT-PREROUTING"));
    assert!(!second.contains("*nat"));
    assert!(!second.contains("-I "));
}

#[test]
fn a_jump_that_is_not_first_is_moved_back_to_the_top() {
    let chains = node_chains(None, Fam::V4);
    let mut observed = saved_after(&plan(&chains, &Observed::default()));
    let pre = observed
        .tables
        .get_mut("nat")
        .unwrap()
        .chains
        .get_mut("PREROUTING")
        .unwrap();
    pre.insert(
        0,
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into(),
    );
    let text = plan(&chains, &observed);
    assert_eq!(
        text,
        "*nat\n-D PREROUTING -m comment --comment ambient-node -j AMBIENT-NAT-PREROUTING\n\
         -I PREROUTING 1 -m comment --comment ambient-node -j AMBIENT-NAT-PREROUTING\nCOMMIT\n"
    );
}

#[test]
fn cleanup_removes_only_ours() {
    let chains = node_chains(Some(&rules()), Fam::V4);
    let mut observed = saved_after(&plan(&chains, &Observed::default()));
    observed
        .tables
        .get_mut("nat")
        .unwrap()
        .chains
        .entry("PREROUTING".into())
        .or_default()
        .push("-j KUBE-SERVICES".into());
    let ours: Vec<(&str, &str)> = chains.iter().map(|c| (c.table, c.name)).collect();
    let text = plan_cleanup(&ours, &observed);
    assert!(
        text.contains("-D PREROUTING -m comment --comment ambient-node -j AMBIENT-PREROUTING\n")
    );
    assert!(text.contains("-F AMBIENT-NAT-POSTROUTING\n-X AMBIENT-NAT-POSTROUTING"));
    assert!(!text.contains("KUBE-SERVICES"));
    assert_eq!(plan_cleanup(&ours, &Observed::default()), "");
}

#[test]
fn saved_rules_parse() {
    let rule = "-i veth-zt -m comment --comment \"from ztunnel itself: skip, own [ambient 3/9 00000000000000ab]\" -j RETURN";
    assert_eq!(
        comment_of(rule),
        Some("from ztunnel itself: skip, own [ambient 3/9 00000000000000ab]")
    );
    assert_eq!(target_of(rule), Some("RETURN"));
    assert_eq!(
        comment_of("-m comment --comment ambient-node -j X"),
        Some("ambient-node")
    );
    assert_eq!(target_of("-p tcp"), None);
    // iptables-save escapes a quote inside the comment; the tag at the end still reads.
    let escaped = "-p udp -m comment --comment \"the tunnels\\' own UDP: stop [ambient 5/18 2feb4802851a0ba0]\" -j RETURN";
    let tag = comment_of(escaped).and_then(RuleTag::parse).unwrap();
    assert_eq!(
        (tag.index, tag.count, tag.fingerprint),
        (5, 18, 0x2feb4802851a0ba0)
    );
    assert_eq!(comment_of("-p tcp"), None);
}

#[test]
fn pod_elements_map_to_the_ipsets() {
    let p = crate::model::PodSource {
        ip: "10.4.4.19".parse().unwrap(),
        veth: "veth-a".into(),
        bridge: Some("cni0".into()),
    };
    let mapped: Vec<(String, String)> = crate::nft::pod_elements([&p])
        .iter()
        .filter_map(ipset::element)
        .map(|(d, e)| (d.name.to_string(), e))
        .collect();
    assert_eq!(
        mapped,
        vec![
            (consts::POD_SET.to_string(), "10.4.4.19".to_string()),
            (
                consts::POD_IIF_SET.to_string(),
                "10.4.4.19,cni0".to_string()
            ),
        ]
    );
    let want = ipset::desired([&p]);
    let lines = ipset::plan(&want, &Default::default());
    assert_eq!(lines[0], "create ztunnel-pods-ips hash:ip family inet");
    assert!(lines.contains(&"add ztunnel-pods-iifs 10.4.4.19,cni0".to_string()));
    let have = want
        .iter()
        .map(|(d, e)| (d.name.to_string(), e.clone()))
        .collect();
    assert!(ipset::plan(&want, &have).is_empty());
}
