//! `ambient-agent explain` / `doctor` and `ambient-lab explain` on a real lab (agents, the CNI
//! chain, ztunnel-init, real ztunnels). Needs root. For each case of the capture matrix that
//! `redirection.rs` proves with a transparent listener, explain must name the same steps
//! (mark, rule, table, tunnel, listener) from the kernel, and `--trace` must show the kernel
//! really applied the same marks and rules. Drift made by hand is named by explain and doctor,
//! and gone after the agent's next reconcile; doctor fails with a named finding when a sysctl is
//! put back or ztunnel stops answering. The same on IPv6 (a dual-stack lab) and on the
//! iptables + ipset backend; the destination node's half (its ztunnel's inbound decision, the
//! probe traced arriving there) and the waypoint's hop.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ambient_lab::explain::{self, ExplainOptions, LabPath};
use ambient_lab::http::HttpRequest;
use ambient_lab::{unique_prefix, Lab, LabOptions};
use serde_json::Value;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");
const SERVICE: &str = "10.96.0.10:80";

fn lab(tag: &str) -> Lab {
    lab_with(tag, LabOptions::new(LAB))
}

fn lab_with(tag: &str, opts: LabOptions) -> Lab {
    Lab::up(&unique_prefix(tag), opts).expect("lab up")
}

fn path(lab: &Lab, from: &str, to: &str, trace: bool) -> LabPath {
    explain::run(&ExplainOptions {
        prefix: lab.prefix().to_string(),
        from: from.into(),
        to: to.into(),
        trace,
    })
    .unwrap_or_else(|e| panic!("explain {from} {to}: {e:#}"))
}

/// The steps of one leg as `(netns, hop, what, mark)`.
fn steps(e: &Value) -> Vec<(String, String, String, Option<u64>)> {
    e["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["netns"].as_str().unwrap_or("").to_string(),
                s["hop"].as_str().unwrap_or("").to_string(),
                s["what"].as_str().unwrap_or("").to_string(),
                s["mark"].as_u64(),
            )
        })
        .collect()
}

/// Asserts a step `hop` in `netns` whose text contains every one of `words`.
fn has(e: &Value, netns: &str, hop: &str, words: &[&str]) {
    let all = steps(e);
    assert!(
        all.iter()
            .any(|(n, h, w, _)| n == netns && h == hop && words.iter().all(|x| w.contains(x))),
        "no {netns} {hop} step with {words:?} in:\n{}",
        serde_json::to_string_pretty(&e["steps"]).unwrap()
    );
}

/// The mark the node's packet-filter step (nft or iptables) gives the packet.
fn nft_mark(e: &Value) -> Option<u64> {
    steps(e)
        .into_iter()
        .filter(|(n, h, _, _)| n == "node" && (h == "nft" || h == "iptables"))
        .find_map(|(_, _, _, m)| m)
}

/// Every step is whole and no step has drift.
fn clean(e: &Value) {
    for s in e["steps"].as_array().unwrap() {
        assert_eq!(s["ok"], true, "broken step {s}");
        assert_eq!(s["drift"].as_array().map(Vec::len), Some(0), "drift {s}");
    }
}

fn verdict(e: &Value) -> String {
    e["verdict"].as_str().unwrap_or("").to_string()
}

/// The trace agrees with the explanation: same final mark in the node's tables, and the rule
/// the explanation names is among the rules the packet hit.
fn trace_agrees(e: &Value, rule: Option<&str>, ztunnel_rule: Option<&str>) {
    let t = &e["trace"];
    assert!(!t.is_null(), "no trace in {e}");
    assert_eq!(
        t["nodeMark"].as_u64(),
        nft_mark(e),
        "traced mark differs: {}",
        serde_json::to_string_pretty(t).unwrap()
    );
    let comments = |ns: &str| -> Vec<String> {
        t[ns]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["comment"].as_str().map(str::to_string))
            .collect()
    };
    if let Some(r) = rule {
        assert!(
            comments("node").iter().any(|c| c.contains(r)),
            "the packet did not hit {r:?}: {}",
            serde_json::to_string_pretty(t).unwrap()
        );
    }
    if let Some(r) = ztunnel_rule {
        assert!(
            comments("ztunnel").iter().any(|c| c.contains(r)),
            "in the ztunnel netns the packet did not hit {r:?}: {}",
            serde_json::to_string_pretty(t).unwrap()
        );
    }
}

/// Every drift subject of a leg's steps.
fn drift_subjects(e: &Value) -> Vec<String> {
    e["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["drift"].as_array().cloned().unwrap_or_default())
        .map(|d| d["subject"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn explain_names_the_capture_matrix_steps_and_the_trace_agrees() {
    let lab = lab_with("expl", LabOptions::new(LAB).waypoint());
    let deadline = Instant::now() + Duration::from_secs(120);

    // ambient → remote pod: node A marks 0x100, rule 101, istioout, TPROXY 15001; ztunnel A
    // tunnels HBONE to b-app:15008; on node B that lands via rule 103, table 100, istioin, 15008.
    let p = path(&lab, "a-client", "b-app:9080", true);
    let (a, b) = (&p.legs[0].explanation, &p.legs[1].explanation);
    assert_eq!(p.legs[1].node, "B");
    assert_eq!(nft_mark(a), Some(0x100));
    has(a, "node", "nft", &["capture outbound"]);
    has(
        a,
        "node",
        "ip rule",
        &["101: from all fwmark 0x100/0x100 lookup 101"],
    );
    has(a, "node", "route", &["table 101", "dev istioout"]);
    has(a, "node", "tunnel", &["istioout", "VNI 1001"]);
    has(a, "ztunnel", "tproxy", &["outbound: tproxy 15001"]);
    has(
        a,
        "ztunnel",
        "syn limit",
        &[
            "ip ztunnel syn-limit rule 1/1",
            "new connections from one source over its rate: drop",
            "SYNs dropped so far",
        ],
    );
    has(
        a,
        "ztunnel",
        "ip rule",
        &["20000", "table 100: local 0.0.0.0/0 dev lo"],
    );
    has(a, "ztunnel", "listener", &["listens on 15001"]);
    assert_eq!(
        a["ztunnel"]["route"]["tunnel"], "10.244.2.3:15008",
        "{}",
        a["ztunnel"]
    );
    assert_eq!(a["ztunnel"]["decision"], "allowed");
    has(b, "node", "ip rule", &["103: from all lookup 100"]);
    has(b, "node", "route", &["table 100", "dev istioin"]);
    has(b, "ztunnel", "tproxy", &["inbound HBONE: tproxy 15008"]);
    assert!(verdict(b).contains("15008"), "{}", verdict(b));
    clean(a);
    clean(b);
    trace_agrees(a, Some("capture outbound"), Some("outbound: tproxy 15001"));
    assert_eq!(a["trace"]["connect"], "connected");
    // The destination side: ztunnel B's decision for the CONNECT, from the client's address.
    let zb = &b["ztunnel"];
    assert_eq!(zb["direction"], "inbound", "{zb}");
    assert_eq!(zb["listener"], 15008);
    assert_eq!(zb["authority"], "10.244.2.3:9080");
    assert_eq!(
        zb["servedIdentity"],
        "spiffe://cluster.local/ns/demo/sa/app"
    );
    assert_eq!(
        zb["expectedPeerIdentity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(zb["decision"], "allowed", "{zb}");
    // ... and the probe traced arriving at node B and in its ztunnel netns.
    assert_eq!(b["trace"]["connect"], "seen arriving", "{}", b["trace"]);
    let zt_hits: Vec<&str> = b["trace"]["ztunnel"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["comment"].as_str())
        .collect();
    assert!(
        zt_hits
            .iter()
            .any(|c| c.contains("inbound HBONE: tproxy 15008")),
        "{}",
        b["trace"]
    );

    // Through the waypoint: ztunnel A sends demo/reviews to it; its rule for `x-version: v2`
    // picks reviews-v2 (on node B), whose ztunnel expects the waypoint's identity.
    let mut req = HttpRequest::get("/");
    req.headers.push(("x-version".into(), "v2".into()));
    let p = explain::run_http(
        &ExplainOptions {
            prefix: lab.prefix().to_string(),
            from: "a-client".into(),
            to: "10.96.0.20:80".into(),
            trace: false,
        },
        &req,
    )
    .unwrap();
    let a = &p.legs[0].explanation;
    assert_eq!(
        a["ztunnel"]["decision"], "to the waypoint",
        "{}",
        a["ztunnel"]
    );
    let wp = p.waypoint.as_ref().expect("the waypoint's decision");
    assert_eq!(wp["decision"], "allowed", "{wp}");
    assert_eq!(wp["route"]["rule"], "demo/reviews#0", "{wp}");
    let backend = &wp["route"]["backends"][0];
    assert!(
        backend["service"].as_str().unwrap().contains("reviews-v2"),
        "{wp}"
    );
    let last = p.legs.last().unwrap();
    assert!(last.reason.starts_with("HBONE from the waypoint"), "{p:?}");
    assert_eq!(last.node, "B");
    let z = &last.explanation["ztunnel"];
    assert_eq!(
        z["expectedPeerIdentity"], "spiffe://cluster.local/ns/demo/sa/waypoint",
        "{z}"
    );
    assert_eq!(z["decision"], "allowed", "{z}");
    has(
        &last.explanation,
        "ztunnel",
        "tproxy",
        &["inbound HBONE: tproxy 15008"],
    );
    // Without the header: the 90/10 rule, two backends with their weights.
    let p = path(&lab, "a-client", "10.96.0.20:80", false);
    let wp = p.waypoint.as_ref().unwrap();
    assert_eq!(wp["route"]["rule"], "demo/reviews#1", "{wp}");
    let weights: Vec<u64> = wp["route"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["weight"].as_u64())
        .collect();
    assert_eq!(weights, [90, 10], "{wp}");
    // reviews-v1 (90%) is on node A: the waypoint's HBONE leaves node B uncaptured, then
    // node A captures it to its ztunnel's 15008.
    let n = p.legs.len();
    assert!(n >= 2, "{p:?}");
    let (leave, arrive) = (&p.legs[n - 2], &p.legs[n - 1]);
    assert_eq!(
        (leave.node.as_str(), arrive.node.as_str()),
        ("B", "A"),
        "{p:?}"
    );
    assert!(
        leave.reason.contains("leaving its node"),
        "{}",
        leave.reason
    );
    assert!(
        verdict(&leave.explanation).starts_with("not captured"),
        "{}",
        verdict(&leave.explanation)
    );
    has(
        &arrive.explanation,
        "ztunnel",
        "tproxy",
        &["inbound HBONE: tproxy 15008"],
    );
    let text = explain::render(&p);
    assert!(
        text.contains("rule demo/reviews#1") && text.contains("weight 90"),
        "{text}"
    );

    // ambient → ClusterIP: captured with the ClusterIP kept (identity DNAT), ztunnel balances.
    let p = path(&lab, "a-client", SERVICE, true);
    let a = &p.legs[0].explanation;
    assert_eq!(nft_mark(a), Some(0x100));
    has(a, "node", "nat", &["identity DNAT", "stays 10.96.0.10"]);
    has(a, "ztunnel", "tproxy", &["15001"]);
    assert_eq!(
        a["ztunnel"]["service"]["key"]
            .as_str()
            .map(|k| k.contains("app")),
        Some(true),
        "{}",
        a["ztunnel"]
    );
    clean(a);
    trace_agrees(a, Some("capture outbound"), Some("outbound: tproxy 15001"));

    // plain → ambient on the same node: not marked, rule 103, table 100, istioin, 15006.
    let p = path(&lab, "a-plain", "a-app:9080", true);
    let a = &p.legs[0].explanation;
    assert_eq!(p.legs.len(), 1);
    assert_eq!(nft_mark(a), Some(0));
    has(a, "node", "ip rule", &["103: from all lookup 100"]);
    has(
        a,
        "node",
        "route",
        &["10.244.1.3/32 via 192.168.126.2 dev istioin"],
    );
    has(a, "ztunnel", "tproxy", &["inbound plaintext: tproxy 15006"]);
    has(a, "ztunnel", "listener", &["listens on 15006"]);
    clean(a);
    trace_agrees(a, None, Some("inbound plaintext: tproxy 15006"));

    // plain → ambient across the underlay: node B lets it go, node A captures it inbound.
    let p = path(&lab, "b-plain", "a-app:9080", false);
    assert_eq!(p.legs.len(), 2, "{p:?}");
    assert!(verdict(&p.legs[0].explanation).starts_with("not captured"));
    has(&p.legs[1].explanation, "ztunnel", "tproxy", &["15006"]);

    // plain → plain: nothing captures it on either node.
    let p = path(&lab, "a-plain", "b-plain:9080", true);
    for leg in &p.legs {
        assert!(
            verdict(&leg.explanation).starts_with("not captured"),
            "{}",
            verdict(&leg.explanation)
        );
        clean(&leg.explanation);
    }
    trace_agrees(&p.legs[0].explanation, None, None);
    assert_eq!(p.legs[0].explanation["trace"]["connect"], "connected");

    // node → pod (probes): the gateway source gets 0x220 in output, rule 100 → main.
    let p = path(&lab, "nodeA", "a-app:9080", true);
    let a = &p.legs[0].explanation;
    assert_eq!(nft_mark(a), Some(0x220));
    has(a, "node", "nft", &["from the node gateway address"]);
    has(
        a,
        "node",
        "ip rule",
        &["100: from all fwmark 0x200/0x200 goto 32766"],
    );
    assert!(verdict(a).starts_with("not captured"), "{}", verdict(a));
    trace_agrees(a, Some("from the node gateway address"), None);

    // ztunnel's own connection: 0x220, never captured again.
    let p = path(&lab, "a-ztunnel", "a-app:9080", true);
    let a = &p.legs[0].explanation;
    assert_eq!(nft_mark(a), Some(0x220));
    has(a, "node", "nft", &["from ztunnel itself"]);
    assert!(verdict(a).starts_with("not captured"), "{}", verdict(a));
    trace_agrees(a, Some("from ztunnel itself"), None);

    // The text form carries the same (what an operator reads).
    let text = explain::render(&path(&lab, "a-client", "b-app:9080", false));
    assert!(
        text.contains("node A (source)") && text.contains("node B (HBONE from ztunnel A)"),
        "{text}"
    );
    assert!(Instant::now() < deadline, "took too long");
    // Probes leave no trace table behind.
    for ns in ["nodeA", "nodeB", "a-ztunnel", "b-ztunnel"] {
        let out = lab.exec(ns, &["nft", "list", "tables"]).unwrap();
        let tables = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!tables.contains("ambient-trace"), "{ns}: {tables}");
    }
}

/// The agent built with this lab binary.
fn agent() -> PathBuf {
    PathBuf::from(LAB).with_file_name("ambient-agent")
}

/// `ambient-agent doctor --json` on node A: (exit ok, findings).
fn doctor(lab: &Lab) -> (bool, Vec<Value>) {
    let n = lab.status().node("A").unwrap();
    let bin_dir = n
        .cni_path
        .split(':')
        .find(|d| std::path::Path::new(d).join("ambient-cni").exists())
        .unwrap_or("/opt/cni/bin")
        .to_string();
    let mut cmd = Command::new(agent());
    cmd.args(["doctor", "--json", "--state-dir"])
        .arg(&n.agent.as_ref().unwrap().state_dir)
        .arg("--cni-conf-dir")
        .arg(&n.cni_conf_dir)
        .args(["--cni-bin-dir", &bin_dir])
        .arg("--cni-cache-dir")
        .arg(n.cni_cache_dir.join("results"));
    ambient_net::netns::command_in(&mut cmd, &lab.netns_path("nodeA")).unwrap();
    let out = cmd.output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(v["healthy"].as_bool(), Some(out.status.success()), "{v}");
    (
        out.status.success(),
        v["findings"].as_array().unwrap().clone(),
    )
}

fn failed(findings: &[Value]) -> Vec<String> {
    findings
        .iter()
        .filter(|f| f["level"] == "fail")
        .map(|f| f["check"].as_str().unwrap_or("").to_string())
        .collect()
}

fn sh(lab: &Lab, ns: &str, argv: &[&str]) {
    let out = lab.exec(ns, argv).unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn drift_is_named_by_explain_and_doctor_and_repaired_by_the_agent() {
    let lab = lab("drif");
    let (ok, f) = doctor(&lab);
    assert!(ok, "a fresh lab is healthy: {f:#?}");
    let app = lab.pod("a-app").clone();
    let ip = app.ip.unwrap().to_string();
    let veth = app.host_veth.clone().unwrap();
    // By hand: the pod's table-100 route, its address set element, the tunnel remote.
    sh(&lab, "nodeA", &["ip", "route", "del", &ip, "table", "100"]);
    let elem = format!("{{ {ip} }}");
    sh(
        &lab,
        "nodeA",
        &[
            "nft",
            "delete",
            "element",
            "inet",
            "ambient-node",
            "ztunnel-pods-ips",
            &elem,
        ],
    );
    sh(
        &lab,
        "nodeA",
        &[
            "ip",
            "link",
            "set",
            "istioout",
            "type",
            "vxlan",
            "remote",
            "10.244.1.250",
        ],
    );

    let p = path(&lab, "a-plain", "a-app:9080", false);
    let e = &p.legs[0].explanation;
    // Without its route the packet falls through to main: not captured, and the step says why.
    assert!(verdict(e).starts_with("not captured"), "{}", verdict(e));
    let drift: Vec<String> = e["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["drift"].as_array().cloned().unwrap_or_default())
        .map(|d| d["subject"].as_str().unwrap().to_string())
        .collect();
    let route = format!("route table 100 {ip}/32");
    assert!(drift.contains(&route), "{drift:?}");
    let p = path(&lab, "a-app", "b-app:9080", false);
    let e = &p.legs[0].explanation;
    let drift: Vec<String> = e["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["drift"].as_array().cloned().unwrap_or_default())
        .map(|d| d["subject"].as_str().unwrap().to_string())
        .collect();
    assert!(
        drift.contains(&format!("set ztunnel-pods-ips {ip}")),
        "{drift:?}"
    );
    assert!(drift.contains(&"tunnel istioout".to_string()), "{drift:?}");
    has(e, "node", "tunnel", &["remote 10.244.1.250"]);

    let (ok, f) = doctor(&lab);
    assert!(!ok);
    let names = failed(&f);
    for want in [
        route.as_str(),
        &format!("set ztunnel-pods-ips {ip}"),
        "tunnel istioout",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "doctor does not name {want}: {names:?}"
        );
    }
    // The agent's next resync (30 s) repairs all three; both then report none.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let (ok, f) = doctor(&lab);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "not repaired: {:?}", failed(&f));
        std::thread::sleep(Duration::from_secs(2));
    }
    let p = path(&lab, "a-plain", "a-app:9080", false);
    clean(&p.legs[0].explanation);
    has(&p.legs[0].explanation, "ztunnel", "tproxy", &["15006"]);

    // rp_filter back on for the pod's veth: a named sysctl finding.
    sh(
        &lab,
        "nodeA",
        &[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{veth}.rp_filter=1"),
        ],
    );
    let (ok, f) = doctor(&lab);
    assert!(!ok);
    let key = format!("net.ipv4.conf.{veth}.rp_filter");
    assert!(failed(&f).contains(&key), "{:?}", failed(&f));
    let p = path(&lab, "a-app", "b-app:9080", false);
    let bad: Vec<&Value> = p.legs[0].explanation["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["hop"] == "rp_filter")
        .collect();
    assert_eq!(bad[0]["ok"], false, "{bad:?}");
    sh(&lab, "nodeA", &["sysctl", "-qw", &format!("{key}=0")]);

    // ztunnel stopped (SIGSTOP: it answers nothing): ztunnel-ready fails; then it goes on.
    let pid = lab
        .status()
        .processes
        .iter()
        .find(|p| {
            p.name.contains("ztunnel") && p.netns.ends_with("a-ztunnel") && !p.name.contains("init")
        })
        .map(|p| p.pid)
        .expect("ztunnel A's process");
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let r = std::panic::catch_unwind(|| doctor(&lab));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let (ok, f) = r.expect("doctor");
    assert!(!ok);
    assert!(
        failed(&f).contains(&"ztunnel-ready".to_string()),
        "{:?}",
        failed(&f)
    );
    let (ok, f) = doctor(&lab);
    assert!(ok, "healthy again: {:?}", failed(&f));
}

#[test]
fn explain_refuses_what_it_cannot_name() {
    let lab = lab("exrf");
    let n = lab.status().node("A").unwrap().clone();
    let to = SocketAddr::from(SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 3), 9080));
    for from in ["demo/nobody", "not-an-ip"] {
        let e = explain::agent_explain(lab.prefix(), &n, from, to, None).unwrap_err();
        assert!(format!("{e:#}").contains(from), "{e:#}");
    }
    // A source the agent does not know cannot be traced without its netns.
    let e = explain::agent_explain(lab.prefix(), &n, "10.244.1.5", to, Some("node".into()));
    let e = e.unwrap_err();
    assert!(format!("{e:#}").contains("--source-netns"), "{e:#}");
}

/// Explain on IPv6 (a dual-stack lab): the v6 set elements, `ip -6 rule` 101/103, the v6
/// routes of tables 101/100, `table ip6 ztunnel`'s TPROXY to [::1], rule 20000 (v6) in the
/// ztunnel netns; the trace of a v6 probe; drift of v6 state named.
#[test]
fn explain_walks_the_ipv6_path() {
    let lab = lab_with("ex6", LabOptions::new(LAB).ip_family("dual"));
    let app6 = lab.pod_ip6("b-app");
    let to = SocketAddr::new(app6.into(), 9080).to_string();
    let p = path(&lab, "a-client", &to, true);
    let (a, b) = (&p.legs[0].explanation, &p.legs[1].explanation);
    let client6 = lab.pod_ip6("a-client").to_string();
    assert_eq!(a["from"]["ip"], client6.as_str());
    has(
        a,
        "node",
        "enrolled",
        &["ztunnel-pods-ips6: yes", "ztunnel-pods-iifs6: yes"],
    );
    assert_eq!(nft_mark(a), Some(0x100));
    has(
        a,
        "node",
        "ip rule",
        &["-6 101: from all fwmark 0x100/0x100 lookup 101"],
    );
    has(a, "node", "route", &["table 101", "dev istioout"]);
    has(a, "node", "tunnel", &["istioout", "IPv6 inner hop"]);
    has(
        a,
        "ztunnel",
        "tproxy",
        &["ip6 ztunnel", "outbound: tproxy 15001", "[::1]:15001"],
    );
    has(
        a,
        "ztunnel",
        "syn limit",
        &["ip6 ztunnel syn-limit rule 1/1", "IPv6"],
    );
    has(
        a,
        "ztunnel",
        "ip rule",
        &["-6 20000", "table 100: local ::/0 dev lo"],
    );
    has(a, "ztunnel", "listener", &["listens on 15001"]);
    assert_eq!(a["ztunnel"]["decision"], "allowed", "{}", a["ztunnel"]);
    assert_eq!(
        a["ztunnel"]["route"]["tunnel"],
        SocketAddr::new(app6.into(), 15008).to_string()
    );
    assert!(
        steps(a).iter().all(|(_, h, _, _)| h != "rp_filter"),
        "IPv6 has no rp_filter"
    );
    clean(a);
    trace_agrees(a, Some("capture outbound"), Some("outbound: tproxy 15001"));
    assert_eq!(a["trace"]["connect"], "connected");
    assert_eq!(p.legs[1].node, "B");
    has(b, "node", "ip rule", &["-6 103: from all lookup 100"]);
    has(b, "node", "route", &["table 100", "dev istioin"]);
    has(
        b,
        "ztunnel",
        "tproxy",
        &["ip6 ztunnel", "inbound HBONE: tproxy 15008"],
    );
    assert_eq!(b["ztunnel"]["decision"], "allowed", "{}", b["ztunnel"]);
    clean(b);

    // v6 drift: a-app's v6 element and its v6 table-100 route, deleted by hand.
    let ip6 = lab.pod_ip6("a-app").to_string();
    sh(
        &lab,
        "nodeA",
        &["ip", "-6", "route", "del", &ip6, "table", "100"],
    );
    let elem = format!("{{ {ip6} }}");
    sh(
        &lab,
        "nodeA",
        &[
            "nft",
            "delete",
            "element",
            "inet",
            "ambient-node",
            "ztunnel-pods-ips6",
            &elem,
        ],
    );
    let to = SocketAddr::new(lab.pod_ip6("a-app").into(), 9080).to_string();
    let e = &path(&lab, "a-plain", &to, false).legs[0].explanation;
    assert!(verdict(e).starts_with("not captured"), "{}", verdict(e));
    let route = format!("route table 100 {ip6}/128");
    assert!(
        drift_subjects(e).contains(&route),
        "{:?}",
        drift_subjects(e)
    );
    let e = &path(
        &lab,
        "a-app",
        &SocketAddr::new(app6.into(), 9080).to_string(),
        false,
    )
    .legs[0]
        .explanation;
    let set = format!("set ztunnel-pods-ips6 {ip6}");
    assert!(drift_subjects(e).contains(&set), "{:?}", drift_subjects(e));
    let (ok, f) = doctor(&lab);
    assert!(!ok);
    for want in [&route, &set] {
        assert!(
            failed(&f).contains(want),
            "doctor does not name {want}: {:?}",
            failed(&f)
        );
    }
}

/// An IPv6-only lab: the v6 underlay under the tunnels too.
#[test]
fn explain_walks_an_ipv6_only_lab() {
    let lab = lab_with("ex6o", LabOptions::new(LAB).ip_family("ipv6"));
    let p = path(&lab, "a-client", "b-app:9080", true);
    let (a, b) = (&p.legs[0].explanation, &p.legs[1].explanation);
    let zt6 = lab.pod_ip6("a-ztunnel");
    has(
        a,
        "node",
        "ip rule",
        &["-6 101: from all fwmark 0x100/0x100 lookup 101"],
    );
    has(a, "node", "tunnel", &["istioout", &format!("remote {zt6}")]);
    has(
        a,
        "node",
        "underlay",
        &[
            &format!("[{zt6}]:6081"),
            "rule -6 101",
            &format!("{zt6}/128"),
        ],
    );
    has(a, "ztunnel", "tproxy", &["ip6 ztunnel", "[::1]:15001"]);
    assert_eq!(a["ztunnel"]["decision"], "allowed", "{}", a["ztunnel"]);
    clean(a);
    trace_agrees(a, Some("capture outbound"), Some("outbound: tproxy 15001"));
    has(b, "node", "ip rule", &["-6 103: from all lookup 100"]);
    has(
        b,
        "ztunnel",
        "tproxy",
        &["ip6 ztunnel", "inbound HBONE: tproxy 15008"],
    );
    assert_eq!(b["ztunnel"]["decision"], "allowed", "{}", b["ztunnel"]);
    clean(b);
}

/// Explain and doctor on the iptables + ipset backend: the AMBIENT-* rule that marks the
/// packet, the ipsets, the TPROXY rule of the ztunnel netns; the trace (iptables-nft's rules
/// are nf_tables rules); a missing ipset member and a missing chain rule are drift.
#[test]
fn explain_and_doctor_on_the_iptables_backend() {
    let lab = lab_with(
        "exip",
        LabOptions::new(LAB).arg("--firewall").arg("iptables"),
    );
    let p = path(&lab, "a-client", "b-app:9080", true);
    let (a, b) = (&p.legs[0].explanation, &p.legs[1].explanation);
    assert_eq!(a["firewall"], "iptables");
    has(
        a,
        "node",
        "enrolled",
        &[
            "in ipset ztunnel-pods-ips: yes",
            "in ipset ztunnel-pods-iifs: yes",
        ],
    );
    has(
        a,
        "node",
        "iptables",
        &["iptables -t mangle AMBIENT-PREROUTING", "capture outbound"],
    );
    assert_eq!(nft_mark(a), Some(0x100));
    has(
        a,
        "node",
        "nat",
        &["AMBIENT-NAT-PREROUTING", "accept before kube-proxy's NAT"],
    );
    // The lab's ztunnel-init keeps its own default backend (nftables) for the ztunnel netns.
    has(a, "ztunnel", "tproxy", &["outbound: tproxy 15001"]);
    clean(a);
    clean(b);
    // The trace: iptables-nft's rules are nf_tables rules, named by their comments.
    trace_agrees(a, Some("capture outbound"), Some("outbound: tproxy 15001"));
    trace_agrees(a, Some("accept before kube-proxy's NAT"), None);
    has(b, "ztunnel", "tproxy", &["inbound HBONE: tproxy 15008"]);
    let (ok, f) = doctor(&lab);
    assert!(ok, "{:?}", failed(&f));

    // By hand: a-app's ipset member, and the capture rule (the chain's last).
    let ip = lab.pod("a-app").ip.unwrap().to_string();
    sh(&lab, "nodeA", &["ipset", "del", "ztunnel-pods-ips", &ip]);
    let out = lab
        .exec(
            "nodeA",
            &["iptables", "-t", "mangle", "-S", "AMBIENT-PREROUTING"],
        )
        .unwrap();
    let n = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .count();
    sh(
        &lab,
        "nodeA",
        &[
            "iptables",
            "-t",
            "mangle",
            "-D",
            "AMBIENT-PREROUTING",
            &n.to_string(),
        ],
    );
    let e = &path(&lab, "a-client", "b-app:9080", false).legs[0].explanation;
    has(e, "node", "iptables", &["the capture rule is MISSING"]);
    let chain = "chain iptables mangle AMBIENT-PREROUTING".to_string();
    assert!(
        drift_subjects(e).contains(&chain),
        "{:?}",
        drift_subjects(e)
    );
    let e = &path(&lab, "a-app", "b-app:9080", false).legs[0].explanation;
    let set = format!("set ztunnel-pods-ips {ip}");
    assert!(drift_subjects(e).contains(&set), "{:?}", drift_subjects(e));
    let (ok, f) = doctor(&lab);
    assert!(!ok);
    for want in [&chain, &set] {
        assert!(
            failed(&f).contains(want),
            "doctor does not name {want}: {:?}",
            failed(&f)
        );
    }
    // The agent's next resync repairs both.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let (ok, f) = doctor(&lab);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "not repaired: {:?}", failed(&f));
        std::thread::sleep(Duration::from_secs(2));
    }
}
