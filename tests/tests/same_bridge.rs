//! Two pods on one node's bridge (`--primary bridge`): their TCP is captured like any other
//! pod-to-pod connection. The node's `bridge ambient-node` table readdresses TCP frames from or
//! to an enrolled pod that the bridge would switch to another port to the bridge itself, so
//! they go up to the IP layer and the inet rules capture them (source enrolled → 15001,
//! destination enrolled → 15006/15008). Non-ambient pods, ARP and ztunnel's own frames are
//! switched as before. With the real data plane: a long transfer between two ambient pods of
//! the bridge, and HTTP through the waypoint to an endpoint on its own bridge. Needs root.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ambient_lab::serve::parse_greeting;
use ambient_lab::tproxy::TproxyRecord;
use ambient_lab::{unique_prefix, Lab, LabOptions};

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");

fn lab(tag: &str, dataplane_none: bool) -> Lab {
    let mut opts = LabOptions::new(LAB).primary("bridge");
    if dataplane_none {
        opts = opts.arg("--dataplane").arg("none");
    } else {
        opts = opts.waypoint();
    }
    Lab::up(&unique_prefix(tag), opts).expect("lab up")
}

/// Asserts the connection reached the test listener on `listener` with this original
/// destination and the client's own address as peer.
fn captured(lab: &Lab, from: &str, ip: Ipv4Addr, port: u16, listener: u16) {
    let got = lab
        .connect(from, ip, port)
        .unwrap_or_else(|e| panic!("{from} -> {ip}:{port}: {e:#}"));
    let r = TproxyRecord::parse_line(&got)
        .unwrap_or_else(|| panic!("{from} -> {ip}:{port} was not captured: {got:?}"));
    assert_eq!(r.port, listener, "{from} -> {ip}:{port}: {got}");
    assert_eq!(r.orig_dst, SocketAddr::new(ip.into(), port), "{got}");
    assert_eq!(r.peer.ip(), IpAddr::V4(lab.pod_ip(from)), "{got}");
}

/// The MAC of a device in a lab netns (`ip link`: /sys is not the netns' own under setns).
fn mac_of(lab: &Lab, netns: &str, dev: &str) -> String {
    let out = lab.exec(netns, &["ip", "-o", "link", "show", dev]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "link/ether");
    words
        .next()
        .unwrap_or_else(|| panic!("no MAC for {dev} in {netns}: {text}"))
        .to_string()
}

#[test]
fn same_bridge_tcp_of_ambient_pods_is_captured_and_nothing_else() {
    let lab = lab("sbc", true);
    let zt_b = lab.tproxy_listen("b-ztunnel").unwrap();
    let (b_app, b_client, b_plain, b_waypoint) = (
        lab.pod_ip("b-app"),
        lab.pod_ip("b-client"),
        lab.pod_ip("b-plain"),
        lab.pod_ip("b-waypoint"),
    );

    // ambient → ambient on the same bridge: outbound capture, original destination kept.
    captured(&lab, "b-client", b_app, 9080, 15001);
    // ambient → not ambient on the same bridge: outbound capture too.
    captured(&lab, "b-client", b_plain, 9080, 15001);
    // not ambient → ambient on the same bridge: inbound capture (plaintext, and HBONE's port).
    captured(&lab, "b-plain", b_app, 9080, 15006);
    captured(&lab, "b-plain", b_app, 15008, 15008);
    // The waypoint (not captured) → an endpoint's 15008 on its own bridge: captured by
    // destination into ztunnel B's 15008.
    captured(&lab, "b-waypoint", lab.pod_ip("b-reviews-v2"), 15008, 15008);

    // not ambient → not ambient on the same bridge: untouched, the server sees the client.
    let before = zt_b.records().unwrap().len();
    let got = lab.connect("b-waypoint", b_plain, 9080).unwrap();
    let (_, client) = parse_greeting(&got).unwrap_or_else(|| panic!("not the server: {got:?}"));
    assert_eq!(client.ip(), IpAddr::V4(b_waypoint), "{got}");
    let after = zt_b.records().unwrap();
    assert_eq!(
        after.len(),
        before,
        "the listener saw plain → plain: {after:?}"
    );

    // ARP between pods of the bridge (ambient and not) still resolves to the pods' own MACs:
    // the neighbour cache is emptied, a connection makes the pod resolve its peer again.
    for (from, to, ip) in [
        ("b-client", "b-app", b_app),
        ("b-client", "b-plain", b_plain),
        ("b-plain", "b-client", b_client),
    ] {
        let flush = lab.exec(from, &["ip", "neigh", "flush", "all"]).unwrap();
        assert!(flush.status.success(), "{flush:?}");
        lab.connect(from, ip, 9080)
            .unwrap_or_else(|e| panic!("{from} -> {to}: {e:#}"));
        let neigh = lab
            .exec(from, &["ip", "neigh", "show", &ip.to_string()])
            .unwrap();
        let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
        let mac = mac_of(&lab, to, "eth0");
        assert!(
            neigh.contains(&format!("lladdr {mac}")),
            "{from} → {to} ({mac}): {neigh}"
        );
    }

    // The node shows the two rules, and they count what they readdressed.
    let nft = lab
        .exec(
            "nodeB",
            &[
                "nft",
                "list",
                "chain",
                "bridge",
                "ambient-node",
                "prerouting",
            ],
        )
        .unwrap();
    let nft = String::from_utf8_lossy(&nft.stdout).to_string();
    let bridge_mac = mac_of(&lab, "nodeB", "cni0");
    for field in ["saddr", "daddr"] {
        assert!(
            nft.contains(&format!(
                "meta pkttype other meta l4proto tcp ip {field} @ztunnel-pods-ips ether daddr set {bridge_mac} meta pkttype set host"
            )),
            "{nft}"
        );
    }
    let sysctl = lab
        .exec(
            "nodeB",
            &["sysctl", "-n", "net.ipv4.conf.cni0.send_redirects"],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "0");
}

/// Sends `size` bytes from `from` to the echo server at `to` while reading the echo back:
/// the hashes of what was sent and what came back.
fn echo_transfer(lab: &Lab, from: &str, to: SocketAddr, size: usize) -> (u64, u64) {
    let (sent, got, total) = lab.echo_transfer(from, to, size).unwrap();
    assert_eq!(total, size, "echo length");
    (sent, got)
}

#[test]
fn same_bridge_long_transfer_goes_through_ztunnel_intact() {
    let lab = lab("sbt", false);
    let (client, app) = (lab.pod_ip("b-client"), lab.pod_ip("b-app"));
    // Through the waypoint (b-waypoint, not captured) to b-reviews-v2 on the same bridge: the
    // waypoint's HBONE to the endpoint's 15008 is captured by destination into ztunnel B.
    for from in ["a-client", "b-client"] {
        let out = lab
            .exec(
                from,
                &[
                    "curl",
                    "-s",
                    "-m",
                    "5",
                    "-w",
                    "\n%{http_code}",
                    "http://10.96.0.22/",
                ],
            )
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            body.ends_with("\n200"),
            "{from} → reviews-v2 through the waypoint: {out:?}"
        );
        assert!(body.contains("\"pod\":\"b-reviews-v2\""), "{body}");
        let waypoint = format!("\"peer\":\"{}:", lab.pod_ip("b-waypoint"));
        assert!(body.contains(&waypoint), "not from the waypoint: {body}");
    }

    // The server sees the client's own address (ztunnel connects from it).
    let got = lab.connect("b-client", app, 9080).unwrap();
    let (_, seen) = parse_greeting(&got).unwrap_or_else(|| panic!("no greeting: {got:?}"));
    assert_eq!(seen.ip(), IpAddr::V4(client));

    const SIZE: usize = 50 << 20;
    let to = SocketAddr::new(app.into(), 9080);
    let (sent, got) = echo_transfer(&lab, "b-client", to, SIZE);
    assert_eq!(sent, got, "the echoed bytes differ from the sent ones");
    // With br_netfilter loaded (its sysctls exist per netns), the node's conntrack also sees
    // the frames the bridge switches; without it, it sees only the readdressed ones. Both ways.
    const BRNF: &str = "net.bridge.bridge-nf-call-iptables";
    let brnf = lab.exec("nodeB", &["sysctl", "-n", BRNF]).unwrap();
    if brnf.status.success() {
        let was = String::from_utf8_lossy(&brnf.stdout).trim().to_string();
        let other = if was == "0" { "1" } else { "0" };
        let set = |v: &str| {
            let out = lab
                .exec("nodeB", &["sysctl", "-w", &format!("{BRNF}={v}")])
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        };
        set(other);
        let (sent, got) = echo_transfer(&lab, "b-client", to, SIZE);
        set(&was);
        assert_eq!(sent, got, "{BRNF}={other}: the echoed bytes differ");
    }

    // ztunnel B's access log shows the transfer: b-client → b-app:9080, both bytes counts.
    let log_path = lab.status().run_dir.join("b-ztunnel.log");
    let want_src = format!("src.addr={client}:");
    let want_dst = format!("dst.addr={app}:9080");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let hit = log.lines().any(|l| {
            l.contains("connection complete")
                && l.contains(&want_src)
                && l.contains(&want_dst)
                && l.contains(&format!("bytes_received={SIZE}"))
        });
        if hit {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no access line for the transfer in {}:\n{log}",
            log_path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
