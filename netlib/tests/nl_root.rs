//! Root tests: apply the node's and the ztunnel netns' desired state to a fresh namespace,
//! converge twice (the second run changes nothing), then remove everything.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ambient_net::consts::{rule, table, zt_rule};
use ambient_net::model::{self, DualAddr, PodRoute, TunnelChoice, TunnelKind, ZtunnelEndpoint};
use ambient_net::netns;
use ambient_net::nl::{self, Netlink};

struct Ns(String, PathBuf);
impl Ns {
    fn new(tag: &str) -> Self {
        let name = format!("nltest-{}-{tag}", std::process::id());
        let path = netns::create_named(&name).expect("create netns");
        Ns(name, path)
    }
}
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = netns::delete_named(&self.0);
    }
}

/// A veth pair inside the namespace stands in for the ztunnel pod's host side.
async fn veth(nl: &Netlink, a: &str, b: &str) {
    nl.handle()
        .link()
        .add(rtnetlink::LinkVeth::new(a, b).up().build())
        .execute()
        .await
        .unwrap();
    let idx = nl.link_index(b).await.unwrap();
    nl.handle()
        .link()
        .set(rtnetlink::LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .unwrap();
}

fn vxlan() -> TunnelChoice {
    TunnelChoice {
        kind: TunnelKind::Vxlan,
        port: 6081,
    }
}

#[tokio::test]
async fn node_state_converges_in_place_and_cleans_up() {
    let ns = Ns::new("node");
    let nl = Netlink::in_netns(&ns.1).unwrap();
    veth(&nl, "vethzt", "ztpeer").await;
    // The node's gateway address, `src` of the table-100 routes, must be local.
    let idx = nl.link_index("vethzt").await.unwrap();
    nl.handle()
        .address()
        .add(idx, Ipv4Addr::new(10, 244, 1, 1).into(), 32)
        .execute()
        .await
        .unwrap();
    let zt = ZtunnelEndpoint {
        ip: Ipv4Addr::new(10, 244, 1, 2).into(),
        ip6: None,
        netns: String::new(),
        host_veth: "vethzt".into(),
        bridge: None,
        mac: String::new(),
        bridge_mac: None,
        veth_mtu: 1500,
        node_ip: Ipv4Addr::new(10, 244, 1, 1).into(),
        node_ip6: None,
    };
    let pods: BTreeSet<_> = (5..8)
        .map(|i| PodRoute {
            ip: Ipv4Addr::new(10, 244, 1, i).into(),
            gateway: zt.node_ip,
        })
        .collect();
    let d = model::node_desired(
        Some(&zt),
        vxlan(),
        &pods,
        &BTreeSet::new(),
        &BTreeSet::new(),
    );
    let first = nl.apply(&d, &rule::ALL, &table::ALL).await.unwrap();
    assert_eq!((first.tunnels, first.rules, first.routes), (2, 4, 8));
    let again = nl.apply(&d, &rule::ALL, &table::ALL).await.unwrap();
    assert!(again.is_empty(), "second apply changed {again:?}");
    assert_eq!(nl.observe_routes(&table::ALL).await.unwrap(), d.routes);
    let mut rules = nl.observe_rules(&rule::ALL).await.unwrap();
    rules.sort();
    assert_eq!(rules, d.rules.iter().copied().collect::<Vec<_>>());
    let t = nl.observe_tunnel("istioout").await.unwrap().unwrap();
    assert_eq!(
        (t.vni, t.port, t.remote, t.mtu),
        (Some(1001), Some(6081), Some(zt.ip), Some(1450))
    );

    // The old ztunnel side's MAC, as ARP would have learnt it.
    let neigh = |args: &str| {
        std::process::Command::new("ip")
            .args(["-n", &ns.0, "neigh"])
            .args(args.split_whitespace())
            .output()
            .unwrap()
    };
    assert!(
        neigh("add 192.168.126.2 lladdr 02:00:00:00:00:01 dev istioin")
            .status
            .success()
    );
    let istioin = nl.link_index("istioin").await.unwrap();

    // One pod leaves, the ztunnel moves: only those routes and the tunnels change.
    let moved = ZtunnelEndpoint {
        ip: Ipv4Addr::new(10, 244, 1, 3).into(),
        ..zt.clone()
    };
    let fewer: BTreeSet<_> = pods.iter().skip(1).cloned().collect();
    let d2 = model::node_desired(
        Some(&moved),
        vxlan(),
        &fewer,
        &BTreeSet::new(),
        &BTreeSet::new(),
    );
    let c = nl.apply(&d2, &rule::ALL, &table::ALL).await.unwrap();
    assert_eq!(c.rules, 0, "rules stay in place");
    assert_eq!(c.tunnels, 2);
    assert_eq!(nl.observe_routes(&table::ALL).await.unwrap(), d2.routes);
    // Re-pointed in place: the same device (its routes never went away), the new remote, and
    // nothing left of the old peer's neighbour entries.
    assert_eq!(nl.link_index("istioin").await.unwrap(), istioin);
    let t = nl.observe_tunnel("istioin").await.unwrap().unwrap();
    assert_eq!(t.remote, Some(moved.ip));
    let left = neigh("show dev istioin");
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "{}",
        String::from_utf8_lossy(&left.stdout)
    );
    assert!(nl
        .apply(&d2, &rule::ALL, &table::ALL)
        .await
        .unwrap()
        .is_empty());

    nl::remove_all(&nl, &["istioin", "istioout"], &rule::ALL, &table::ALL)
        .await
        .unwrap();
    assert!(nl.observe_routes(&table::ALL).await.unwrap().is_empty());
    assert!(nl.observe_rules(&rule::ALL).await.unwrap().is_empty());
    assert!(nl.observe_tunnel("istioin").await.unwrap().is_none());
}

#[tokio::test]
async fn ztunnel_netns_state_is_idempotent() {
    let ns = Ns::new("zt");
    let nl = Netlink::in_netns(&ns.1).unwrap();
    veth(&nl, "eth0", "peer0").await;
    // A pod's lo is up (the runtime's loopback plugin): IPv6 local routes need it so.
    let lo = nl.link_index("lo").await.unwrap();
    nl.handle()
        .link()
        .set(rtnetlink::LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .unwrap();
    let node_ip = Ipv4Addr::new(10, 244, 1, 1);
    let node_ip6: Ipv6Addr = "fd00:10:244:1::1".parse().unwrap();
    let d = model::ztunnel_desired(
        vxlan(),
        DualAddr::new(node_ip.into(), Some(node_ip6)),
        "eth0",
        1500,
    );
    assert!(d.rules.iter().any(|r| r.v6));
    let tables = [
        zt_rule::TABLE_LOCAL,
        zt_rule::TABLE_OUTBOUND,
        zt_rule::TABLE_INBOUND,
    ];
    nl.apply(&d, &zt_rule::ALL, &tables).await.unwrap();
    assert!(nl
        .apply(&d, &zt_rule::ALL, &tables)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(nl.observe_routes(&tables).await.unwrap(), d.routes);
    nl::remove_all(&nl, &["pistioin", "pistioout"], &zt_rule::ALL, &tables)
        .await
        .unwrap();
    assert!(nl.observe_routes(&tables).await.unwrap().is_empty());
}

#[tokio::test]
async fn geneve_probe_answers_and_leaves_nothing() {
    let ns = Ns::new("probe");
    let nl = Netlink::in_netns(&ns.1).unwrap();
    // This machine's kernel has no Geneve; elsewhere it does. Either way no link remains.
    let supported = nl.geneve_supported().await.unwrap();
    let kind = nl
        .resolve_tunnel_kind(model::TunnelMode::Auto)
        .await
        .unwrap();
    assert_eq!(kind == TunnelKind::Geneve, supported);
    assert_eq!(nl.link_names().await.unwrap().len(), 1, "only lo");
}

#[tokio::test]
async fn dual_stack_node_state_converges_in_place() {
    let ns = Ns::new("dual");
    let nl = Netlink::in_netns(&ns.1).unwrap();
    veth(&nl, "vethzt", "ztpeer").await;
    let idx = nl.link_index("vethzt").await.unwrap();
    let gw6: Ipv6Addr = "fd00:10:244:1::1".parse().unwrap();
    for (a, len) in [
        (IpAddr::from(Ipv4Addr::new(10, 244, 1, 1)), 32),
        (IpAddr::from(gw6), 128),
    ] {
        let mut req = nl.handle().address().add(idx, a, len);
        req.message_mut()
            .attributes
            .push(netlink_packet_route::address::AddressAttribute::Flags(
                netlink_packet_route::address::AddressFlags::Nodad,
            ));
        req.execute().await.unwrap();
    }
    let zt = ZtunnelEndpoint {
        ip: Ipv4Addr::new(10, 244, 1, 2).into(),
        ip6: Some("fd00:10:244:1::2".parse().unwrap()),
        netns: String::new(),
        host_veth: "vethzt".into(),
        bridge: None,
        mac: String::new(),
        bridge_mac: None,
        veth_mtu: 1500,
        node_ip: Ipv4Addr::new(10, 244, 1, 1).into(),
        node_ip6: Some(gw6),
    };
    let mut pods: BTreeSet<_> = (5..7)
        .map(|i| PodRoute {
            ip: Ipv4Addr::new(10, 244, 1, i).into(),
            gateway: zt.node_ip,
        })
        .collect();
    pods.insert(PodRoute {
        ip: "fd00:10:244:1::5".parse().unwrap(),
        gateway: gw6.into(),
    });
    let none = BTreeSet::new();
    let d = model::node_desired(Some(&zt), vxlan(), &pods, &none, &none);
    let first = nl.apply(&d, &rule::ALL, &table::ALL).await.unwrap();
    assert_eq!((first.tunnels, first.rules), (2, 8));
    let again = nl.apply(&d, &rule::ALL, &table::ALL).await.unwrap();
    assert!(again.is_empty(), "second apply changed {again:?}");
    assert_eq!(nl.observe_routes(&table::ALL).await.unwrap(), d.routes);
    let mut rules = nl.observe_rules(&rule::ALL).await.unwrap();
    rules.sort();
    assert_eq!(rules, d.rules.iter().copied().collect::<Vec<_>>());
    // The tunnels carry their /126 as well as their /30.
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.0, "-6", "addr", "show", "dev", "istioin"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("fd69:7374:696f:126::1/126"))
        .unwrap_or_else(|| panic!("no /126 on istioin: {text}"));
    assert!(!line.contains("tentative"), "{text}");
    nl::remove_all(&nl, &["istioin", "istioout"], &rule::ALL, &table::ALL)
        .await
        .unwrap();
    assert!(nl.observe_routes(&table::ALL).await.unwrap().is_empty());
    assert!(nl.observe_rules(&rule::ALL).await.unwrap().is_empty());
}
