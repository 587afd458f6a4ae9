//! The lab's plain topology (`--no-agent`): two nodes over the underlay, pods made by the
//! real CNI chain through the libcni client, the test servers, the Service DNAT, and a
//! `down` that leaves nothing behind. Needs root (the project's test command runs as root).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use ambient_lab::http::HttpRequest;
use ambient_lab::procs;
use ambient_lab::serve::parse_greeting;
use ambient_lab::state::ProcessRecord;
use ambient_lab::status::LabStatus;
use ambient_lab::{paths, service, unique_prefix, Lab, LabOptions};
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
    // Four pods on each node, then reviews-v1 on A, reviews-v2 and the waypoint on B.
    let expected: [(&str, &[&str]); 2] = [
        ("a", &["ztunnel", "app", "client", "plain", "reviews-v1"]),
        (
            "b",
            &[
                "ztunnel",
                "app",
                "client",
                "plain",
                "reviews-v2",
                "waypoint",
            ],
        ),
    ];
    assert_eq!(st.pods.len(), 11);
    for (node, pods) in expected {
        for (i, pod) in pods.iter().enumerate() {
            let p = lab.pod(&format!("{node}-{pod}"));
            let ip = p.ip.expect("pod ip");
            let cidr = if node == "a" {
                [10, 244, 1]
            } else {
                [10, 244, 2]
            };
            assert_eq!(ip.octets()[..3], cidr, "{} got {ip}", p.id);
            // Creation order per node: the IPs of the first four did not move.
            assert_eq!(ip.octets()[3], 2 + i as u8, "{} got {ip}", p.id);
            assert_eq!(p.netns, format!("{prefix}-{node}-{pod}"));
            assert!(
                p.host_veth
                    .as_deref()
                    .is_some_and(|v| v.starts_with("veth")),
                "{p:?}"
            );
            // The waypoint is opted out of capture (it speaks HBONE itself).
            assert_eq!(p.ambient, p.namespace == "demo" && *pod != "waypoint");
            let serves = !["ztunnel", "waypoint"].contains(pod);
            assert_eq!(p.server.is_some(), serves, "{}", p.id);
            assert!(p
                .server
                .as_ref()
                .is_none_or(|s| s.alive && s.port == 9080 && s.http_port == Some(8080)));
        }
    }
    // The one-node pods exist only where they are placed.
    for absent in ["b-reviews-v1", "a-reviews-v2", "a-waypoint"] {
        assert!(st.pod(absent).is_none(), "{absent}");
        assert!(!lab.netns_path(absent).exists(), "{absent}");
    }
    let v1 = lab.pod("a-reviews-v1");
    assert_eq!(
        (v1.namespace.as_str(), v1.service_account.as_str()),
        ("demo", "reviews")
    );
    assert_eq!(v1.version.as_deref(), Some("v1"));
    assert_eq!(lab.pod("b-reviews-v2").version.as_deref(), Some("v2"));
    assert_eq!(lab.pod("b-waypoint").service_account, "waypoint");
    assert_eq!(st.ztunnels.len(), 2);
    assert_eq!(lab.pod("a-ztunnel").namespace, "istio-system");
    assert!(lab.pod("a-ztunnel").k8s_name.starts_with("ztunnel"));
    let ips: std::collections::HashSet<_> = st.pods.iter().filter_map(|p| p.ip).collect();
    assert_eq!(ips.len(), 11, "pod IPs must be distinct");
    let names: Vec<String> = st.services.iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["app", "reviews", "reviews-v1", "reviews-v2"]);
    assert_eq!(st.services[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
    assert_eq!(st.services[0].backend_ip, lab.pod_ip("b-app"));
    assert_eq!(st.services[0].waypoint, None);
    let wp = lab.waypoint().clone();
    assert_eq!(wp.pod, "b-waypoint");
    assert_eq!(wp.ip, lab.pod_ip("b-waypoint"));
    assert_eq!(wp.identity, "spiffe://cluster.local/ns/demo/sa/waypoint");
    assert!(!wp.running);
    assert!(wp
        .not_started
        .as_deref()
        .is_some_and(|w| w.contains("--no-agent")));
    assert!(
        wp.config.exists(),
        "the waypoint config is written without the waypoint"
    );
    assert_eq!(wp.workloads, ["a-reviews-v1", "b-reviews-v2"]);
    for (svc, ip, eps) in [
        (
            &st.services[1],
            service::REVIEWS_IP,
            &["a-reviews-v1", "b-reviews-v2"][..],
        ),
        (
            &st.services[2],
            service::REVIEWS_V1_IP,
            &["a-reviews-v1"][..],
        ),
        (
            &st.services[3],
            service::REVIEWS_V2_IP,
            &["b-reviews-v2"][..],
        ),
    ] {
        assert_eq!((svc.cluster_ip, svc.port, svc.target_port), (ip, 80, 8080));
        assert_eq!(svc.waypoint, Some(wp.ip), "{}", svc.name);
        let got: Vec<&str> = svc.endpoints.iter().map(|e| e.pod.as_str()).collect();
        assert_eq!(got, eps);
        assert!(wp.services.contains(&format!("demo/{}", svc.name)));
    }

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

    reviews_answer_http_through_the_dnat(&lab);
    down_leaves_nothing(lab);
}

/// The reviews pods' HTTP servers from plain pods through the kube-proxy DNAT of the reviews
/// ClusterIPs: each per-version Service reaches its pod, `demo/reviews` both, the server sees
/// the client's own IP; HTTP/1.1 keep-alive and h2c.
fn reviews_answer_http_through_the_dnat(lab: &Lab) {
    let (a_plain, b_plain) = (lab.pod_ip("a-plain"), lab.pod_ip("b-plain"));
    for (from, ip, pod, version) in [
        ("a-plain", service::REVIEWS_V1_IP, "a-reviews-v1", "v1"),
        ("a-plain", service::REVIEWS_V2_IP, "b-reviews-v2", "v2"),
        ("b-plain", service::REVIEWS_V1_IP, "a-reviews-v1", "v1"),
    ] {
        let reqs: Vec<HttpRequest> = (0..3)
            .map(|i| HttpRequest::get(&format!("/r?i={i}")))
            .collect();
        let resps = lab.http1(from, (ip, 80), &reqs).expect("http1");
        let peers: Vec<String> = resps
            .iter()
            .map(|r| {
                assert_eq!(r.status, 200, "{}", r.text());
                let e = r.echo().unwrap();
                assert_eq!((e.pod.as_str(), e.version.as_str()), (pod, version));
                assert_eq!(e.protocol, "HTTP/1.1");
                assert_eq!(e.peer_addr().unwrap().ip(), lab.pod_ip(from));
                e.peer
            })
            .collect();
        assert!(
            peers.iter().all(|p| *p == peers[0]),
            "keep-alive: {peers:?}"
        );
    }
    let h2 = lab
        .h2c(
            "b-plain",
            (service::REVIEWS_V2_IP, 80),
            &[
                HttpRequest::get("/a"),
                HttpRequest::post("/b", b"xyz".to_vec()),
            ],
        )
        .expect("h2c");
    for r in &h2 {
        let e = r.echo().unwrap();
        assert_eq!(
            (e.pod.as_str(), e.protocol.as_str()),
            ("b-reviews-v2", "HTTP/2.0")
        );
        assert_eq!(e.peer_addr().unwrap().ip(), b_plain);
    }
    assert_eq!(h2[1].echo().unwrap().body_bytes, 3);
    // demo/reviews: a random endpoint per connection; both answer sooner or later.
    let mut versions = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let r = lab
            .http_get("a-plain", (service::REVIEWS_IP, 80), "/")
            .expect("reviews");
        let e = r.echo().unwrap();
        assert_eq!(e.peer_addr().unwrap().ip(), a_plain);
        versions.insert(e.version);
        if versions.len() == 2 {
            break;
        }
    }
    assert_eq!(versions.into_iter().collect::<Vec<_>>(), ["v1", "v2"]);
    // The 9080 greeting server still runs next to it.
    let (server, _) = greet(lab, "a-plain", lab.pod_ip("b-reviews-v2"), 9080);
    assert_eq!(server.port(), 9080);
    // And the upgrade to the raw echo.
    let (status, echoed) = lab
        .http_upgrade_echo(
            "a-plain",
            (lab.pod_ip("a-reviews-v1"), 8080),
            "/",
            b"raw bytes",
        )
        .expect("upgrade");
    assert_eq!((status, echoed.as_slice()), (101, &b"raw bytes"[..]));
}

/// With the agent (and no data plane): every ambient pod, the one-node ones included, is
/// enrolled on its own node and nowhere else; `--no-waypoint` is accepted, the waypoint
/// is recorded but not started.
#[test]
fn one_node_pods_are_enrolled_on_their_node() {
    let lab = Lab::up(
        &unique_prefix("tlab"),
        LabOptions::new(LAB).arg("--dataplane").arg("none"),
    )
    .expect("lab up");
    let st = lab.status().clone();
    for node in ["A", "B"] {
        let out = lab
            .exec(
                &format!("node{node}"),
                &[
                    "nft",
                    "list",
                    "set",
                    "inet",
                    "ambient-node",
                    "ztunnel-pods-ips",
                ],
            )
            .unwrap();
        let set = String::from_utf8_lossy(&out.stdout);
        for p in &st.pods {
            let ip = p.ip.unwrap().to_string();
            let want = p.ambient && p.node == node;
            assert_eq!(
                set.contains(&format!("{ip},")) || set.contains(&format!("{ip} }}")),
                want,
                "node {node}, pod {} ({ip}):\n{set}",
                p.id
            );
        }
    }
    for id in ["a-reviews-v1", "b-reviews-v2"] {
        assert!(lab.pod(id).ambient, "{id}");
    }
    assert!(!lab.pod("b-waypoint").ambient, "opted out of capture");
    let wp = lab.waypoint();
    assert!(!wp.running);
    assert_eq!(wp.not_started.as_deref(), Some("--dataplane none"));
    let text = std::process::Command::new(LAB)
        .args(["status", "--prefix", lab.prefix()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("WAYPOINT b-waypoint"), "{text}");
    assert!(
        text.contains("spiffe://cluster.local/ns/demo/sa/waypoint"),
        "{text}"
    );
    down_leaves_nothing(lab);
}

/// With the real data plane and the waypoint (needs target/debug/waypoint, as the hbone
/// tests need ztunnel): `up` waits for it, `status` says it runs, and the harness's HTTP and
/// waypoint helpers work through it. The waypoint's own behaviour is tested elsewhere.
#[test]
fn the_waypoint_runs_and_the_harness_reaches_it() {
    let lab = Lab::up(&unique_prefix("tlab"), LabOptions::new(LAB).waypoint()).expect("lab up");
    let wp = lab.waypoint().clone();
    assert!(wp.running && wp.pid.is_some(), "{wp:?}");
    assert_eq!(wp.not_started, None);
    let reviews = (service::REVIEWS_IP, 80);
    let reqs = [
        HttpRequest::get("/one").header("x-version", "v2"),
        HttpRequest::post_pattern("/two", 200_000).header("x-version", "v2"),
    ];
    for resps in [
        lab.http1("a-client", reviews, &reqs).expect("http1"),
        lab.h2c("a-client", reviews, &reqs).expect("h2c"),
    ] {
        for r in &resps {
            let e = r.echo().unwrap();
            assert_eq!(
                (r.status, e.pod.as_str()),
                (200, "b-reviews-v2"),
                "{}",
                r.text()
            );
            // The server's peer is the waypoint: it carried the request.
            assert_eq!(e.peer_addr().unwrap().ip(), wp.ip);
        }
        let up = resps[1].echo().unwrap();
        assert_eq!(up.body_bytes, 200_000);
        assert_eq!(
            up.body_fnv64,
            ambient_lab::serve::pattern_fnv64(200_000).hex()
        );
    }
    let metrics = lab.waypoint_metrics().expect("metrics");
    assert!(metrics.contains("istio_requests_total"), "{metrics}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while lab.waypoint_access_log().len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "access log:\n{}",
            lab.waypoint_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Routes rewritten live: everything to reviews-v1.
    lab.set_waypoint_config(
        &serde_json::json!([{"name": "reviews", "namespace": "demo",
            "parentRefs": [{"kind": "Service", "name": "reviews"}],
            "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 80}]}]}]),
        &serde_json::json!([]),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = lab.http_get("a-client", reviews, "/").unwrap();
        if r.status == 200 && r.echo().unwrap().version == "v1" {
            let v2 = lab
                .http1(
                    "a-client",
                    reviews,
                    &[HttpRequest::get("/").header("x-version", "v2")],
                )
                .unwrap();
            if v2[0].echo().unwrap().version == "v1" {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new routes never applied"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    lab.reset_waypoint_config().unwrap();
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
fn a_missing_waypoint_binary_is_named() {
    // Everything but the waypoint, linked from where cargo built it.
    let dir = std::env::temp_dir().join(format!("ambient-lab-nowp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["ambient-agent", "ambient-cni", "ztunnel-init", "ztunnel"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(std::path::Path::new(LAB).with_file_name(name), &link).unwrap();
    }
    let prefix = unique_prefix("tlab");
    let bin_dir = dir.display().to_string();
    let err = Lab::up(
        &prefix,
        LabOptions::new(LAB)
            .waypoint()
            .arg("--bin-dir")
            .arg(&bin_dir),
    )
    .err()
    .expect("up must fail without the waypoint binary");
    std::fs::remove_dir_all(&dir).unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("waypoint not found at {bin_dir}/waypoint"))
            && msg.contains("--no-waypoint"),
        "{msg}"
    );
    assert_eq!(lab_netns(&prefix), Vec::<String>::new());
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
