//! The lab's plain topology (`--no-agent`): two nodes over the underlay, pods made by the
//! real CNI chain through the libcni client, the test servers, the Service DNAT, and a
//! `down` that leaves nothing behind. Needs root (the project's test command runs as root).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use ambient_lab::procs;
use ambient_lab::serve::parse_greeting;
use ambient_lab::state::ProcessRecord;
use ambient_lab::status::LabStatus;
use ambient_lab::{paths, unique_prefix, Lab, LabOptions};
use ambient_net::netns;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");

fn options() -> LabOptions {
    LabOptions::new(LAB).no_agent()
}

/// Connects from `from` to `ip:port` and returns (server, client) from the greeting.
fn greet(lab: &Lab, from: &str, ip: Ipv4Addr, port: u16) -> (SocketAddr, SocketAddr) {
    let line = lab
        .connect(from, ip, port)
        .unwrap_or_else(|e| panic!("{from} -> {ip}:{port}: {e:#}"));
    parse_greeting(&line).unwrap_or_else(|| panic!("unexpected greeting {line:?}"))
}

fn lab_netns(prefix: &str) -> Vec<String> {
    netns::list_named()
        .unwrap()
        .into_iter()
        .filter(|n| paths::owns_netns(prefix, n))
        .collect()
}

fn recorded(status: &LabStatus) -> Vec<ProcessRecord> {
    status
        .processes
        .iter()
        .map(|p| ProcessRecord {
            name: p.name.clone(),
            pid: p.pid,
            start_time: p.start_time,
            netns: p.netns.clone(),
            argv: vec![],
            log: PathBuf::new(),
        })
        .collect()
}

/// Tears the lab down and checks nothing of it is left; `down` again still succeeds.
fn down_leaves_nothing(mut lab: Lab) {
    let prefix = lab.prefix().to_string();
    let procs_before = recorded(lab.status());
    assert!(!procs_before.is_empty());
    lab.down().expect("down");
    assert_eq!(
        lab_netns(&prefix),
        Vec::<String>::new(),
        "netns left behind"
    );
    let alive: Vec<_> = procs_before
        .iter()
        .filter(|p| procs::is_alive(p))
        .map(|p| &p.name)
        .collect();
    assert!(alive.is_empty(), "processes still running: {alive:?}");
    assert!(!paths::run_dir(&prefix).exists(), "run dir left behind");
    let again = std::process::Command::new(LAB)
        .args(["down", "--prefix", &prefix])
        .output()
        .unwrap();
    assert!(again.status.success(), "second down failed: {again:?}");
}

#[test]
fn ptp_pods_reach_across_nodes_and_down_cleans_up() {
    let lab = Lab::up(&unique_prefix("tlab"), options()).expect("lab up");
    let st = lab.status().clone();
    let prefix = lab.prefix().to_string();

    // status lists every pod, each with an IP in its node's CIDR and a host veth.
    assert_eq!(st.phase, "ready");
    assert_eq!(st.primary, "ptp");
    assert!(!st.agent);
    assert_eq!(st.nodes.len(), 2);
    assert_eq!(st.pods.len(), 8);
    for node in ["a", "b"] {
        for pod in ["ztunnel", "app", "client", "plain"] {
            let p = lab.pod(&format!("{node}-{pod}"));
            let ip = p.ip.expect("pod ip");
            let cidr = if node == "a" {
                [10, 244, 1]
            } else {
                [10, 244, 2]
            };
            assert_eq!(ip.octets()[..3], cidr, "{} got {ip}", p.id);
            assert_eq!(p.netns, format!("{prefix}-{node}-{pod}"));
            assert!(
                p.host_veth
                    .as_deref()
                    .is_some_and(|v| v.starts_with("veth")),
                "{p:?}"
            );
            assert_eq!(p.ambient, p.namespace == "demo");
            assert_eq!(p.server.is_some(), pod != "ztunnel");
            assert!(p.server.as_ref().is_none_or(|s| s.alive && s.port == 9080));
        }
    }
    assert_eq!(st.ztunnels.len(), 2);
    assert_eq!(lab.pod("a-ztunnel").namespace, "istio-system");
    assert!(lab.pod("a-ztunnel").k8s_name.starts_with("ztunnel"));
    let ips: std::collections::HashSet<_> = st.pods.iter().filter_map(|p| p.ip).collect();
    assert_eq!(ips.len(), 8, "pod IPs must be distinct");
    assert_eq!(st.services.len(), 1);
    assert_eq!(st.services[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
    assert_eq!(st.services[0].backend_ip, lab.pod_ip("b-app"));

    // A -> B and B -> A: the server sees the real client IP (no masquerade).
    let (server, client) = greet(&lab, "a-client", lab.pod_ip("b-app"), 9080);
    assert_eq!(server, SocketAddr::from((lab.pod_ip("b-app"), 9080)));
    assert_eq!(client.ip(), lab.pod_ip("a-client"));
    let (_, client) = greet(&lab, "b-plain", lab.pod_ip("a-app"), 9080);
    assert_eq!(client.ip(), lab.pod_ip("b-plain"));
    // Same node.
    let (_, client) = greet(&lab, "a-client", lab.pod_ip("a-plain"), 9080);
    assert_eq!(client.ip(), lab.pod_ip("a-client"));
    // The Service from a pod on the other node: DNAT to b-app, client IP kept.
    let (server, client) = greet(&lab, "a-client", Ipv4Addr::new(10, 96, 0, 10), 80);
    assert_eq!(server, SocketAddr::from((lab.pod_ip("b-app"), 9080)));
    assert_eq!(client.ip(), lab.pod_ip("a-client"));
    // The node itself (a kubelet probe) reaches a local pod from its gateway address.
    let (_, client) = greet(&lab, "nodeA", lab.pod_ip("a-app"), 9080);
    assert_eq!(client.ip(), Ipv4Addr::new(10, 244, 1, 1));
    // The server keeps echoing after the greeting.
    let payload = vec![0x5a; 256 * 1024];
    let (_, echoed) = lab
        .exchange("b-client", lab.pod_ip("a-app"), 9080, &payload)
        .expect("echo");
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload);

    down_leaves_nothing(lab);
}

#[test]
fn bridge_primary_works_too() {
    let lab = Lab::up(&unique_prefix("tlab"), options().primary("bridge")).expect("lab up");
    assert_eq!(lab.status().primary, "bridge");
    // The bridge's host side is the pod's veth, never the bridge itself.
    for p in &lab.status().pods {
        let veth = p.host_veth.as_deref().unwrap_or_default();
        assert!(veth.starts_with("veth"), "{}: host veth {veth:?}", p.id);
    }
    let (_, client) = greet(&lab, "b-client", lab.pod_ip("a-app"), 9080);
    assert_eq!(client.ip(), lab.pod_ip("b-client"));
    let (server, _) = greet(&lab, "b-plain", Ipv4Addr::new(10, 96, 0, 10), 80);
    assert_eq!(server.ip(), lab.pod_ip("b-app"));
    down_leaves_nothing(lab);
}

#[test]
fn failing_agent_fails_up_and_leaves_nothing() {
    // Stand-ins named as the lab expects: an agent that exits at once.
    let dir = std::env::temp_dir().join(format!("ambient-lab-fake-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, target) in [
        ("ambient-agent", "/bin/false"),
        ("ambient-cni", "/bin/true"),
        ("ztunnel-init", "/bin/true"),
    ] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link).unwrap();
    }
    let prefix = unique_prefix("tlab");
    let err = Lab::up(
        &prefix,
        LabOptions::new(LAB)
            .arg("--dataplane")
            .arg("none")
            .arg("--bin-dir")
            .arg(dir.display().to_string()),
    )
    .err()
    .expect("up must fail when the agent exits");
    let msg = format!("{err:#}");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        msg.contains("ambient-agent") && msg.contains("exited"),
        "unclear error: {msg}"
    );
    assert_eq!(lab_netns(&prefix), Vec::<String>::new());
    assert!(!paths::run_dir(&prefix).exists());
}

#[test]
fn missing_binaries_are_named() {
    let prefix = unique_prefix("tlab");
    let err = Lab::up(
        &prefix,
        LabOptions::new(LAB).arg("--bin-dir").arg("/nonexistent"),
    )
    .err()
    .expect("up must fail without the agent's binaries");
    let msg = format!("{err:#}");
    assert!(msg.contains("not found at /nonexistent/"), "{msg}");
    assert_eq!(lab_netns(&prefix), Vec::<String>::new());
}
