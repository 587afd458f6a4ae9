//! The node redirection, end to end on the lab (SPEC §1–3): real agents, the real CNI chain
//! (ptp + host-local + ambient-cni through libcni), ztunnel-init, and a transparent test
//! listener standing in for ztunnel. Needs root.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ambient_lab::snapshot::{lines_only_in, node_snapshot};
use ambient_lab::state::LabState;
use ambient_lab::tproxy::TproxyRecord;
use ambient_lab::{cni, procs, unique_prefix, Lab, LabOptions};
use ambient_net::netns;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// A lab whose ztunnel netns are prepared but run no proxy: the tests put the transparent
/// test listener there instead.
fn options() -> LabOptions {
    LabOptions::new(LAB).arg("--dataplane").arg("none")
}

fn lab(tag: &str) -> Lab {
    Lab::up(&unique_prefix(tag), options()).expect("lab up")
}

fn bin(name: &str) -> String {
    Path::new(LAB).with_file_name(name).display().to_string()
}

/// The first line `from` receives from `ip:port`.
fn line(lab: &Lab, from: &str, ip: Ipv4Addr, port: u16) -> String {
    lab.connect(from, ip, port)
        .unwrap_or_else(|e| panic!("{from} -> {ip}:{port}: {e:#}"))
}

/// Asserts the connection reached the test listener on `port` with this original destination.
fn captured(lab: &Lab, from: &str, ip: Ipv4Addr, port: u16, listener: u16) {
    let got = line(lab, from, ip, port);
    let r = TproxyRecord::parse_line(&got)
        .unwrap_or_else(|| panic!("{from} -> {ip}:{port} was not captured: {got:?}"));
    assert_eq!(r.port, listener, "{from} -> {ip}:{port}: {got}");
    assert_eq!(r.orig_dst, SocketAddr::new(ip.into(), port), "{got}");
    assert_eq!(r.peer.ip(), IpAddr::V4(lab.pod_ip(from)), "{got}");
}

/// Asserts the connection reached the real server, which saw `client` as the source.
fn direct(lab: &Lab, from: &str, ip: Ipv4Addr, client: Ipv4Addr) {
    let got = line(lab, from, ip, 9080);
    assert!(
        got.starts_with(&format!("server={ip}:9080 client={client}:")),
        "{from} -> {ip}:9080 expected the server to see {client}: {got:?}"
    );
}

#[test]
fn captured_and_not_captured_traffic_follows_the_spec() {
    let lab = lab("cap");
    let _zt_a = lab.tproxy_listen("a-ztunnel").unwrap();
    let _zt_b = lab.tproxy_listen("b-ztunnel").unwrap();
    let (a_app, b_app, b_plain) = (
        lab.pod_ip("a-app"),
        lab.pod_ip("b-app"),
        lab.pod_ip("b-plain"),
    );

    // Outbound: an ambient pod's connection to the other node arrives at ztunnel A's 15001
    // with the original destination; to the Service, with the ClusterIP still as destination.
    captured(&lab, "a-client", b_app, 9080, 15001);
    captured(&lab, "a-client", b_plain, 9080, 15001);
    captured(&lab, "a-client", SERVICE_IP, 80, 15001);
    // Inbound: to a local ambient pod from outside the mesh → 15006; to its port 15008 → 15008.
    captured(&lab, "a-plain", a_app, 9080, 15006);
    captured(&lab, "a-plain", a_app, 15008, 15008);
    // Across the underlay, inbound capture happens on the destination's node.
    captured(&lab, "b-plain", a_app, 9080, 15006);

    // Not captured: non-ambient pods, node → pod (probes), ztunnel's own traffic.
    direct(&lab, "a-plain", b_plain, lab.pod_ip("a-plain"));
    let gw_a = lab.status().node("A").unwrap().gateway;
    direct(&lab, "nodeA", a_app, gw_a);
    direct(&lab, "a-ztunnel", a_app, lab.pod_ip("a-ztunnel"));
}

/// Enroll and remove through the CNI chain touch exactly that pod's set element and route.
#[test]
fn cni_add_check_del_gc_change_only_that_pod() {
    let lab = lab("cni");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let node = state.node("A").unwrap().clone();
    let pod = state.pod("a-app").unwrap().clone();
    let client = cni::ensure_client().unwrap();
    let ip = pod.ip.unwrap();
    let element = format!("{ip}");
    let route = format!("{ip} via 192.168.126.2 dev istioin");
    let enrolled = node_snapshot(&lab, "nodeA");
    assert!(enrolled.contains(&route), "{enrolled}");

    cni::del(&client, &node, &pod).unwrap();
    let removed = node_snapshot(&lab, "nodeA");
    let gone = lines_only_in(&enrolled, &removed);
    assert!(gone.iter().any(|l| l.contains(&route)), "{gone:?}");
    assert!(
        gone.iter().all(|l| l.contains(&element)),
        "DEL changed more than the pod's element and route: {gone:?}"
    );
    assert!(!removed.contains(&route));
    // A second DEL (and one without the netns) succeeds and changes nothing.
    cni::del(&client, &node, &pod).unwrap();
    assert_eq!(node_snapshot(&lab, "nodeA"), removed);

    // ADD again through the whole chain: the pod is back, CHECK passes.
    let result = cni::add(&client, &node, &pod).unwrap();
    let again = cni::parse_result(&result).unwrap().ip;
    let readded = node_snapshot(&lab, "nodeA");
    let route_again = format!("{again} via 192.168.126.2 dev istioin");
    assert!(readded.contains(&route_again), "{readded}");
    let new_lines = lines_only_in(&readded, &removed);
    assert!(
        new_lines.iter().all(|l| l.contains(&again.to_string())),
        "ADD changed more than the pod's element and route: {new_lines:?}"
    );
    let check = lab.cni("check", "a-app").unwrap();
    assert!(
        check.status.success(),
        "CHECK: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // GC with every attachment but this pod's removes exactly this pod.
    let valid: Vec<serde_json::Value> = state
        .pods
        .iter()
        .filter(|p| p.node == "A" && p.id != "a-app")
        .map(|p| serde_json::json!({"containerID": p.container_id, "ifname": p.ifname}))
        .collect();
    let valid = serde_json::to_string(&valid).unwrap();
    let conf_dir = node.cni.conf_dir.display().to_string();
    let out = lab
        .cniclient("A", &["gc", &conf_dir, &node.cni.network, &valid], "")
        .unwrap();
    assert!(
        out.status.success(),
        "GC: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after_gc = node_snapshot(&lab, "nodeA");
    assert!(!after_gc.contains(&route_again), "{after_gc}");
    assert!(after_gc.contains(&format!("{} via 192.168.126.2", lab.pod_ip("a-client"))));
}

/// SIGKILL the agent and start it again: the kernel state is unchanged (not even the tunnel
/// devices are re-created) and a long-lived connection through the node keeps working.
#[test]
fn agent_restart_changes_nothing_and_keeps_connections() {
    let lab = lab("rst");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let agent = state.node("A").unwrap().agent.clone().unwrap();
    let rec = state.process(&agent.process).unwrap().clone();
    let before = node_snapshot(&lab, "nodeA");

    // A long-lived captured connection: ambient pod -> ztunnel A's listener (which echoes).
    let _zt = lab.tproxy_listen("a-ztunnel").unwrap();
    let b_app = SocketAddr::new(lab.pod_ip("b-app").into(), 9080);
    let mut held = lab.hold_connection("a-client", b_app).unwrap();
    assert!(
        held.greeting.starts_with("tproxy port=15001"),
        "{}",
        held.greeting
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rec.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while procs::is_alive(&rec) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!procs::is_alive(&rec), "agent survived SIGKILL");
    assert_eq!(
        node_snapshot(&lab, "nodeA"),
        before,
        "a dead agent changed the kernel"
    );

    let _restarted = lab.spawn("agent-a-restarted", "nodeA", &rec.argv).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = std::os::unix::net::UnixStream::connect(&agent.socket).is_ok();
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "restarted agent never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        node_snapshot(&lab, "nodeA"),
        before,
        "restart changed the kernel state"
    );

    assert_eq!(held.echo(b"still here\n").unwrap(), b"still here\n");
    // New connections are captured too.
    captured(&lab, "a-client", lab.pod_ip("b-app"), 9080, 15001);
}

type BadInput = (&'static str, Vec<(&'static str, String)>, String, i64);

/// Malformed CNI input gets the spec's error code and changes nothing in the kernel.
#[test]
fn malformed_cni_input_is_refused_and_changes_nothing() {
    let lab = lab("bad");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let node = state.node("A").unwrap().clone();
    let pod = state.pod("a-app").unwrap();
    let before = node_snapshot(&lab, "nodeA");
    let sock = node.agent.as_ref().unwrap().socket.display().to_string();
    let good = |version: &str, prev: serde_json::Value| {
        serde_json::json!({"cniVersion": version, "name": "ambient", "type": "ambient-cni",
            "agentSocket": sock, "logFile": "/dev/null", "prevResult": prev})
        .to_string()
    };
    let prev = pod.cni_result.clone().unwrap();
    let netns_path = netns::named_path(&pod.netns).display().to_string();
    // (what, env overrides, stdin, expected CNI error code)
    let cases: Vec<BadInput> = vec![
        ("bad JSON", vec![], "{not json".into(), 6),
        ("unknown version", vec![], good("9.9.9", prev.clone()), 1),
        (
            "missing CNI_CONTAINERID",
            vec![("CNI_CONTAINERID", String::new())],
            good("1.0.0", prev.clone()),
            4,
        ),
        (
            "no prevResult",
            vec![],
            good("1.0.0", serde_json::Value::Null),
            7,
        ),
        (
            "wrong prevResult",
            vec![],
            good("1.0.0", serde_json::json!({"ips": "x"})),
            6,
        ),
    ];
    for (what, overrides, stdin, code) in cases {
        let mut cmd = Command::new(bin("ambient-cni"));
        cmd.env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "bad-input-test")
            .env("CNI_NETNS", &netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env("CNI_ARGS", "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=bad")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        for (k, v) in overrides {
            cmd.env(k, v);
        }
        netns::command_in(&mut cmd, &netns::named_path(&node.netns)).unwrap();
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{what}");
        let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{what}: stdout is not the error JSON ({e}): {:?}",
                out.stdout
            )
        });
        assert_eq!(err["code"], code, "{what}: {err}");
        assert!(
            err["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {err}"
        );
    }
    assert_eq!(
        node_snapshot(&lab, "nodeA"),
        before,
        "bad input changed the kernel"
    );
}

/// `ambient-agent cleanup` removes every rule, route, link and nft object it made, and
/// `ambient-lab down` leaves no netns or process behind.
#[test]
fn cleanup_and_down_leave_nothing() {
    let mut lab = lab("cln");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let agent = state.node("A").unwrap().agent.clone().unwrap();
    let rec = state.process(&agent.process).unwrap().clone();
    procs::stop(&rec, Duration::from_secs(2)).unwrap();
    let out = lab
        .exec(
            "nodeA",
            &[
                &bin("ambient-agent"),
                "cleanup",
                "--state-dir",
                &agent.state_dir.display().to_string(),
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = node_snapshot(&lab, "nodeA");
    for gone in [
        "100:",
        "101:",
        "102:",
        "103:",
        "istioin",
        "istioout",
        "ambient-node",
        "192.168.12",
    ] {
        assert!(!s.contains(gone), "{gone} left after cleanup:\n{s}");
    }
    // The bridge-family table (anti-spoofing on bridge ports) is gone too.
    let ruleset = lab.exec("nodeA", &["nft", "list", "ruleset"]).unwrap();
    let ruleset = String::from_utf8_lossy(&ruleset.stdout);
    assert!(!ruleset.contains("ambient-node"), "{ruleset}");
    // Plain routing still works without the mesh.
    direct(
        &lab,
        "a-client",
        lab.pod_ip("b-plain"),
        lab.pod_ip("a-client"),
    );

    let prefix = lab.prefix().to_string();
    let all: Vec<_> = state.processes.clone();
    lab.down().unwrap();
    let left: Vec<String> = netns::list_named()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(left.is_empty(), "netns left: {left:?}");
    assert!(all.iter().all(|p| !procs::is_alive(p)), "processes left");
    assert!(!Path::new(&format!("/run/ambient-lab/{prefix}")).exists());
}

/// With a bridge-type primary the ztunnel's veth is a bridge port: the agent routes via the
/// bridge and recognises ztunnel's packets by bridge + MAC. Cross-node capture works (traffic
/// between pods of one bridge: `same_bridge.rs`).
#[test]
fn bridge_primary_captures_across_nodes() {
    let lab = Lab::up(&unique_prefix("brg"), options().primary("bridge")).unwrap();
    let _zt_a = lab.tproxy_listen("a-ztunnel").unwrap();
    let _zt_b = lab.tproxy_listen("b-ztunnel").unwrap();
    captured(&lab, "a-client", lab.pod_ip("b-app"), 9080, 15001);
    captured(&lab, "a-client", SERVICE_IP, 80, 15001);
    captured(&lab, "b-plain", lab.pod_ip("a-app"), 9080, 15006);
    direct(
        &lab,
        "a-plain",
        lab.pod_ip("b-plain"),
        lab.pod_ip("a-plain"),
    );
    let gw_a = lab.status().node("A").unwrap().gateway;
    direct(&lab, "nodeA", lab.pod_ip("a-app"), gw_a);
    let routes = lab
        .exec("nodeA", &["ip", "route", "show", "table", "102"])
        .unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(routes.contains("dev cni0"), "{routes}");
}

/// A new ztunnel pod (rolling update: the new one is added before the old one is deleted)
/// re-points the tunnels and tables in place; the old pod's DEL does not undo it.
#[test]
fn new_ztunnel_pod_repoints_tunnels_and_tables() {
    let lab = lab("rpt");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let node = state.node("A").unwrap().clone();
    let agent = node.agent.clone().unwrap();
    let old = state.pod("a-ztunnel").unwrap().clone();
    let client = cni::ensure_client().unwrap();
    let rules_before =
        String::from_utf8(lab.exec("nodeA", &["ip", "rule"]).unwrap().stdout).unwrap();

    // The new ztunnel pod gets its own netns, container and IP.
    let new_netns = format!("{}-a-zt2", lab.prefix());
    netns::create_named(&new_netns).unwrap();
    let mut new = old.clone();
    new.id = "a-zt2".into();
    new.netns = new_netns.clone();
    new.container_id = format!("{}-v2", old.container_id);
    new.k8s_name = "ztunnel-a-v2".into();
    let result = cni::add(&client, &node, &new).unwrap();
    let new_ip = cni::parse_result(&result).unwrap().ip;
    assert_ne!(Some(new_ip), old.ip);
    let out = lab
        .exec(
            "a-zt2",
            &[
                &bin("ztunnel-init"),
                "--tunnel-state",
                &agent.state_dir.join("tunnel.json").display().to_string(),
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The old pod goes away afterwards.
    cni::del(&client, &node, &old).unwrap();

    let link = String::from_utf8(
        lab.exec("nodeA", &["ip", "-d", "link", "show", "istioout"])
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(link.contains(&format!("remote {new_ip}")), "{link}");
    let t101 = String::from_utf8(
        lab.exec("nodeA", &["ip", "route", "show", "table", "101"])
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(t101.contains(&format!("{new_ip} dev")), "{t101}");
    assert!(
        !t101.contains(&format!("{} dev", old.ip.unwrap())),
        "{t101}"
    );
    let rules_after =
        String::from_utf8(lab.exec("nodeA", &["ip", "rule"]).unwrap().stdout).unwrap();
    assert_eq!(rules_after, rules_before, "rules were rebuilt");

    let _zt = lab.tproxy_listen("a-zt2").unwrap();
    captured(&lab, "a-client", lab.pod_ip("b-app"), 9080, 15001);
    cni::del(&client, &node, &new).unwrap();
    netns::delete_named(&new_netns).unwrap();
}
