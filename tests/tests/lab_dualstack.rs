//! The lab with IPv6 (`up --ip-family dual|ipv6`), for both primaries: every pod gets an
//! address of each family of the lab from host-local, `status --json` lists them, plain pods
//! reach plain pods on the other node over each family, a v6 ClusterIP reaches its endpoint
//! through the kube-proxy-style DNAT in `table ip6 kube-proxy`, and `down` leaves nothing.
//! The plain-topology checks run with `--no-agent`; one test brings a dual lab up with the
//! agent, ztunnel-init and ztunnel as before. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ambient_lab::serve::parse_greeting;
use ambient_lab::topology::IpFamily;
use ambient_lab::tproxy::TproxyRecord;
use ambient_lab::{paths, service, unique_prefix, Lab, LabOptions};
use ambient_net::netns;
use serde_json::Value;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");
/// The checks of one lab (the lab's own `up` is bounded by its step timeouts).
const CHECKS_LIMIT: Duration = Duration::from_secs(90);

fn up(tag: &str, primary: &str, family: &str) -> Lab {
    let opts = LabOptions::new(LAB)
        .no_agent()
        .primary(primary)
        .ip_family(family);
    Lab::up(&unique_prefix(tag), opts).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs `checks` on `lab` within [`CHECKS_LIMIT`], then tears the lab down and checks that
/// nothing of it is left. A hang or a panic still removes the lab.
fn bounded(lab: Lab, checks: impl FnOnce(&Lab) + Send + 'static) {
    let prefix = lab.prefix().to_string();
    let lab = Arc::new(lab);
    let worker = lab.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = catch_unwind(AssertUnwindSafe(|| checks(&worker)));
        drop(worker);
        let _ = tx.send(r);
    });
    match rx.recv_timeout(CHECKS_LIMIT) {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => {
            drop(lab);
            resume_unwind(panic);
        }
        Err(_) => {
            if let Ok(mut l) = Lab::attach(&prefix, std::path::Path::new(LAB)) {
                let _ = l.down();
            }
            panic!("lab {prefix}: checks did not finish within {CHECKS_LIMIT:?}");
        }
    }
    let mut lab = Arc::try_unwrap(lab).unwrap_or_else(|_| panic!("lab still shared"));
    lab.down().expect("down");
    let left: Vec<String> = netns::list_named()
        .unwrap()
        .into_iter()
        .filter(|n| paths::owns_netns(&prefix, n))
        .collect();
    assert!(left.is_empty(), "netns left: {left:?}");
    assert!(!paths::run_dir(&prefix).exists(), "run dir left");
}

/// `status --json` as raw JSON: what a tool reading it sees.
fn raw_status(lab: &Lab) -> Value {
    let out = std::process::Command::new(LAB)
        .args(["status", "--prefix", lab.prefix(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Connects from `from` to `ip:port` and returns (server, client) of the greeting.
fn greet(lab: &Lab, from: &str, ip: IpAddr, port: u16) -> (SocketAddr, SocketAddr) {
    let line = lab
        .connect(from, ip, port)
        .unwrap_or_else(|e| panic!("{from} -> {ip}:{port}: {e:#}"));
    parse_greeting(&line).unwrap_or_else(|| panic!("unexpected greeting {line:?}"))
}

fn exec_stdout(lab: &Lab, short: &str, argv: &[&str]) -> String {
    let out = lab.exec(short, argv).unwrap();
    assert!(out.status.success(), "{short}: {argv:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every pod has exactly the addresses of `family`, in its node's ranges, listed in
/// `status --json` (primary first) and present, not tentative, on its eth0.
fn check_addresses(lab: &Lab, family: IpFamily) {
    let st = lab.status();
    assert_eq!(st.ip_family, family);
    let raw = raw_status(lab);
    assert_eq!(raw["ipFamily"], family.as_str());
    assert_eq!(st.pods.len(), 11);
    for p in &st.pods {
        let node = st.node(&p.node).unwrap();
        let mut want: Vec<IpAddr> = Vec::new();
        match (family.has_v4(), p.ip) {
            (true, Some(v4)) => {
                assert!(v4.to_string().starts_with(&node.pod_cidr[..9]), "{v4}");
                want.push(v4.into());
            }
            (false, None) => {}
            (has, got) => panic!("pod {}: v4 expected {has}, got {got:?}", p.id),
        }
        match (family.has_v6(), p.ip6) {
            (true, Some(v6)) => {
                let cidr6 = node.pod_cidr6.as_deref().unwrap();
                let net = cidr6.trim_end_matches(":/64");
                assert!(v6.to_string().starts_with(net), "{v6} in {cidr6}");
                want.push(v6.into());
            }
            (false, None) => {}
            (has, got) => panic!("pod {}: v6 expected {has}, got {got:?}", p.id),
        }
        assert_eq!(p.ips, want, "pod {}", p.id);
        let raw_pod = raw["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == p.id.as_str())
            .unwrap();
        let raw_ips: Vec<String> = want.iter().map(IpAddr::to_string).collect();
        assert_eq!(raw_pod["ips"], serde_json::json!(raw_ips), "pod {}", p.id);

        let addrs = exec_stdout(lab, &p.id, &["ip", "-o", "addr", "show", "dev", "eth0"]);
        for ip in &want {
            assert!(
                addrs.contains(&format!(" {ip}/")),
                "{}: {ip}: {addrs}",
                p.id
            );
        }
        assert!(!addrs.contains("tentative"), "{}: {addrs}", p.id);
        if !family.has_v4() {
            assert!(
                !addrs.contains(" inet "),
                "v4 in a v6 lab: {}: {addrs}",
                p.id
            );
        }
    }
}

/// Plain → plain across the nodes over every family of the lab: greeting (both ends as
/// the server saw them), an HTTP GET and a 1 MiB echo, plus same-node plain → pod.
fn check_plain_paths(lab: &Lab) {
    for (from, to) in [("a-plain", "b-plain"), ("b-plain", "a-plain")] {
        for (src, dst) in lab.pod_ips(from).into_iter().zip(lab.pod_ips(to)) {
            let (server, client) = greet(lab, from, dst, 9080);
            assert_eq!(server, SocketAddr::new(dst, 9080));
            assert_eq!(client.ip(), src, "{from} -> {dst}: no NAT on the path");
            let resp = lab
                .http_get(from, SocketAddr::new(dst, 8080), "/")
                .unwrap_or_else(|e| panic!("{from} -> {dst}:8080: {e:#}"));
            assert_eq!(resp.status, 200);
            let echo = resp.echo().unwrap();
            assert_eq!(echo.pod, to);
            assert_eq!(echo.peer_addr().map(|a| a.ip()), Some(src));
            let (sent, back, n) = lab
                .echo_transfer(from, SocketAddr::new(dst, 9080), 1 << 20)
                .unwrap();
            assert_eq!((n, back), (1 << 20, sent), "{from} -> {dst} echo");
        }
    }
    for dst in lab.pod_ips("a-app") {
        let (server, _) = greet(lab, "a-plain", dst, 9080);
        assert_eq!(server.ip(), dst);
    }
}

/// The v6 ClusterIPs: `table ip6 kube-proxy` on both nodes, and a connection to one reaches
/// its endpoint from the client's own address.
fn check_v6_services(lab: &Lab) {
    for node in ["nodeA", "nodeB"] {
        let table = exec_stdout(lab, node, &["nft", "list", "table", "ip6", "kube-proxy"]);
        assert!(
            table.contains("ip6 daddr fd00:10:96::10 tcp dport 80 dnat to"),
            "{table}"
        );
    }
    let app = lab.service("app");
    assert_eq!(app.cluster_ip6, Some(service::CLUSTER_IP6));
    assert!(app.cluster_ips.contains(&IpAddr::V6(service::CLUSTER_IP6)));
    let b_app6 = IpAddr::V6(lab.pod_ip6("b-app"));
    for from in ["a-plain", "b-plain"] {
        let (server, client) = greet(lab, from, service::CLUSTER_IP6.into(), 80);
        assert_eq!(server, SocketAddr::new(b_app6, 9080), "{from}");
        assert_eq!(client.ip(), IpAddr::V6(lab.pod_ip6(from)));
    }
    let resp = lab
        .http_get("a-plain", (service::REVIEWS_IP6, 80), "/")
        .unwrap();
    let pod = resp.echo().unwrap().pod;
    assert!(
        ["a-reviews-v1", "b-reviews-v2"].contains(&pod.as_str()),
        "{pod}"
    );
}

/// The test transparent listener in a ztunnel netns listens on both families of a dual lab
/// (what a v6 TPROXY rule hands connections to): reached directly here, as ztunnel-init's
/// v6 rules are not the lab's.
fn check_tproxy_listener(lab: &Lab) {
    let zt = lab.tproxy_listen("a-ztunnel").unwrap();
    for (src, dst) in lab
        .pod_ips("a-plain")
        .into_iter()
        .zip(lab.pod_ips("a-ztunnel"))
    {
        let line = lab.connect("a-plain", dst, 15006).unwrap();
        let rec = TproxyRecord::parse_line(&line).unwrap_or_else(|| panic!("{line:?}"));
        assert_eq!(rec.orig_dst, SocketAddr::new(dst, 15006));
        assert_eq!(rec.peer.ip(), src);
    }
    assert_eq!(zt.records().unwrap().len(), 2);
}

fn dual(primary: &str) {
    let lab = up("tds", primary, "dual");
    bounded(lab, |lab| {
        check_addresses(lab, IpFamily::Dual);
        let raw = raw_status(lab);
        let node_a = &raw["nodes"][0];
        assert_eq!(node_a["underlayIp"], "172.31.0.1");
        assert_eq!(node_a["underlayIp6"], "fe80::a");
        assert_eq!(node_a["podCidr6"], "fd00:10:244:1::/64");
        assert_eq!(
            raw["services"][0]["clusterIps"],
            serde_json::json!(["10.96.0.10", "fd00:10:96::10"])
        );
        // The v6 pod route rides the v4 underlay's link-locals.
        let routes = exec_stdout(
            lab,
            "nodeA",
            &["ip", "-6", "route", "show", "fd00:10:244:2::/64"],
        );
        assert!(routes.contains("via fe80::b dev ul0"), "{routes}");
        check_plain_paths(lab);
        check_v6_services(lab);
        check_tproxy_listener(lab);
        // The v4 ClusterIP as before.
        let (server, _) = greet(lab, "a-plain", service::CLUSTER_IP.into(), 80);
        assert_eq!(server.ip(), IpAddr::V4(lab.pod_ip("b-app")));
        let v4_table = exec_stdout(lab, "nodeB", &["nft", "list", "table", "ip", "kube-proxy"]);
        assert!(!v4_table.contains("fd00"), "{v4_table}");
    });
}

fn v6_only(primary: &str) {
    let lab = up("tds6", primary, "ipv6");
    bounded(lab, |lab| {
        check_addresses(lab, IpFamily::Ipv6);
        let raw = raw_status(lab);
        let node_a = &raw["nodes"][0];
        assert!(node_a.get("underlayIp").is_none(), "{node_a}");
        assert!(node_a.get("gateway").is_none(), "{node_a}");
        assert_eq!(node_a["underlayIp6"], "fd00:172:31::1");
        assert_eq!(node_a["gateway6"], "fd00:10:244:1::1");
        let svc = &raw["services"][0];
        assert!(svc.get("clusterIp").is_none(), "{svc}");
        assert_eq!(svc["clusterIps"], serde_json::json!(["fd00:10:96::10"]));
        assert!(lab.status().waypoint.is_none());
        let ul0 = exec_stdout(lab, "nodeA", &["ip", "-o", "addr", "show", "dev", "ul0"]);
        assert!(
            ul0.contains("fd00:172:31::1/64") && !ul0.contains(" inet "),
            "{ul0}"
        );
        let tables = exec_stdout(lab, "nodeA", &["nft", "list", "tables"]);
        assert!(!tables.contains("table ip kube-proxy"), "{tables}");
        check_plain_paths(lab);
        check_v6_services(lab);
    });
}

#[test]
fn dual_stack_lab_with_ptp() {
    dual("ptp");
}

#[test]
fn dual_stack_lab_with_bridge() {
    dual("bridge");
}

#[test]
fn ipv6_only_lab_with_ptp() {
    v6_only("ptp");
}

#[test]
fn ipv6_only_lab_with_bridge() {
    v6_only("bridge");
}

/// With the agent, ztunnel-init and ztunnel a dual lab comes up as an ipv4 one does: the
/// agents run, both ztunnels are ready, ztunnel's config lists both addresses of every pod
/// and both VIPs of every Service, and v4 traffic between ambient pods is meshed (the server
/// sees the client's own pod IP) as before.
#[test]
fn dual_stack_lab_with_the_agent() {
    let prefix = unique_prefix("tdsa");
    let lab = Lab::up(&prefix, LabOptions::new(LAB).ip_family("dual"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    bounded(lab, |lab| {
        let st = lab.status();
        assert_eq!(st.ip_family, IpFamily::Dual);
        for n in &st.nodes {
            assert!(
                n.agent.as_ref().is_some_and(|a| a.alive),
                "agent {}",
                n.name
            );
        }
        for z in ["ztunnel-a", "ztunnel-b"] {
            assert!(
                st.processes.iter().any(|p| p.name == z && p.alive),
                "{z} not running"
            );
        }
        let config = std::fs::read_to_string(st.run_dir.join("ztunnel-config.yaml")).unwrap();
        let config: Value = serde_yaml_ng::from_str(&config).unwrap();
        let b_app = config["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == "app-b")
            .unwrap();
        let want: Vec<String> = lab.pod_ips("b-app").iter().map(IpAddr::to_string).collect();
        assert_eq!(b_app["workloadIps"], serde_json::json!(want));
        let reviews = config["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "reviews")
            .unwrap();
        assert_eq!(
            reviews["vips"],
            serde_json::json!(["10.96.0.20", "fd00:10:96::20"])
        );
        let (_, client) = greet(lab, "a-client", lab.pod_ip("b-app").into(), 9080);
        assert_eq!(client.ip(), IpAddr::V4(lab.pod_ip("a-client")));
    });
}
