//! IPv6 and dual-stack on the lab (issue 11 part 1): the capture matrix of `redirection.rs` in
//! each family, with ptp and bridge primaries, and the HBONE path with the real ztunnel over
//! IPv6 (the client address the server sees, only TLS on the underlay, a policy by v6 block).
//! Needs root.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ambient_lab::serve::parse_greeting;
use ambient_lab::state::LabState;
use ambient_lab::tproxy::TproxyRecord;
use ambient_lab::{unique_prefix, ztunnel, Lab, LabOptions};
use serde_json::json;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");
/// The `demo/app` Service's IPv6 ClusterIP.
const SERVICE_IP6: Ipv6Addr = ambient_lab::service::CLUSTER_IP6;

/// A lab whose ztunnel netns run the transparent test listener instead of ztunnel.
fn listener_lab(tag: &str, family: &str, primary: &str) -> Lab {
    let opts = LabOptions::new(LAB)
        .ip_family(family)
        .primary(primary)
        .arg("--dataplane")
        .arg("none");
    Lab::up(&unique_prefix(tag), opts).expect("lab up")
}

/// Asserts the connection reached the test listener on `listener` with this original
/// destination, from `from`'s own address of the destination's family.
fn captured(lab: &Lab, from: &str, ip: IpAddr, port: u16, listener: u16) {
    let got = lab
        .connect(from, ip, port)
        .unwrap_or_else(|e| panic!("{from} -> {ip}:{port}: {e:#}"));
    let r = TproxyRecord::parse_line(&got)
        .unwrap_or_else(|| panic!("{from} -> {ip}:{port} was not captured: {got:?}"));
    assert_eq!(r.port, listener, "{from} -> {ip}:{port}: {got}");
    assert_eq!(r.orig_dst, SocketAddr::new(ip, port), "{got}");
    assert_eq!(r.peer.ip(), own(lab, from, ip), "{got}");
}

/// Asserts the connection reached the real server, which saw `from`'s own address.
fn direct(lab: &Lab, from: &str, ip: IpAddr) {
    let got = lab
        .connect(from, ip, 9080)
        .unwrap_or_else(|e| panic!("{from} -> {ip}: {e:#}"));
    let (server, client) = parse_greeting(&got)
        .unwrap_or_else(|| panic!("{from} -> {ip}:9080 did not reach the server: {got:?}"));
    assert_eq!(server, SocketAddr::new(ip, 9080), "{got}");
    assert_eq!(client.ip(), own(lab, from, ip), "{got}");
}

/// `pod`'s address of `like`'s family.
fn own(lab: &Lab, pod: &str, like: IpAddr) -> IpAddr {
    lab.pod_ips(pod)
        .into_iter()
        .find(|a| a.is_ipv6() == like.is_ipv6())
        .unwrap_or_else(|| panic!("{pod} has no address of the family of {like}"))
}

fn v6(lab: &Lab, pod: &str) -> IpAddr {
    lab.pod_ip6(pod).into()
}

/// The matrix of `redirection.rs`, over IPv6 (the test listeners run in both ztunnel netns).
fn ipv6_matrix(lab: &Lab) {
    let (a_app, b_app, b_plain) = (v6(lab, "a-app"), v6(lab, "b-app"), v6(lab, "b-plain"));
    // Outbound, to another node, to a pod of the same node, to the v6 ClusterIP (whose
    // kube-proxy-style DNAT the identity NAT skips: the VIP stays the destination).
    captured(lab, "a-client", b_app, 9080, 15001);
    captured(lab, "a-client", b_plain, 9080, 15001);
    captured(lab, "a-client", a_app, 9080, 15001);
    captured(lab, "a-client", SERVICE_IP6.into(), 80, 15001);
    // Inbound from outside the mesh: 15006; to the pod's 15008: 15008; across the underlay on
    // the destination's node.
    captured(lab, "a-plain", a_app, 9080, 15006);
    captured(lab, "a-plain", a_app, 15008, 15008);
    captured(lab, "b-plain", a_app, 9080, 15006);
    // Not captured: plain pods, node → pod, ztunnel's own.
    direct(lab, "a-plain", b_plain);
    direct(lab, "a-ztunnel", a_app);
}

#[test]
fn dual_stack_pods_are_captured_over_each_family_with_ptp() {
    let lab = listener_lab("v6dp", "dual", "ptp");
    let _zt_a = lab.tproxy_listen("a-ztunnel").unwrap();
    let _zt_b = lab.tproxy_listen("b-ztunnel").unwrap();
    ipv6_matrix(&lab);
    // The same pods over IPv4, in the same lab.
    captured(&lab, "a-client", lab.pod_ip("b-app").into(), 9080, 15001);
    captured(&lab, "a-plain", lab.pod_ip("a-app").into(), 9080, 15006);
    direct(&lab, "a-plain", lab.pod_ip("b-plain").into());
}

#[test]
fn dual_stack_pods_are_captured_with_a_bridge_too() {
    let lab = listener_lab("v6db", "dual", "bridge");
    let _zt_a = lab.tproxy_listen("a-ztunnel").unwrap();
    let _zt_b = lab.tproxy_listen("b-ztunnel").unwrap();
    ipv6_matrix(&lab);
}

#[test]
fn an_ipv6_only_lab_captures_with_an_ipv6_underlay() {
    let lab = listener_lab("v6o", "ipv6", "ptp");
    let _zt_a = lab.tproxy_listen("a-ztunnel").unwrap();
    let _zt_b = lab.tproxy_listen("b-ztunnel").unwrap();
    ipv6_matrix(&lab);
    // The tunnels' underlay is the ztunnel's IPv6 address.
    let out = lab
        .exec("nodeA", &["ip", "-d", "link", "show", "istioout"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let zt = lab.pod_ip6("a-ztunnel");
    assert!(text.contains(&format!("remote {zt}")), "{text}");
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The client address the server saw, or an error when the connection was refused.
fn client_seen(lab: &Lab, from: &str, ip: IpAddr, port: u16) -> Result<SocketAddr, String> {
    let line = lab.connect(from, ip, port).map_err(|e| format!("{e:#}"))?;
    parse_greeting(&line)
        .map(|(_, client)| client)
        .ok_or_else(|| format!("no greeting: {line:?}"))
}

/// The real data plane over IPv6: ztunnel A → HBONE to `[b-app v6]:15008` → ztunnel B → the
/// pod, which sees the client's own v6 address; the underlay carries only TLS; a policy by v6
/// address block admits one client and refuses another. In a dual-stack lab (v4 underlay) and
/// an IPv6-only one (v6 underlay and tunnels).
#[test]
fn hbone_over_ipv6_keeps_the_client_address_and_only_tls_crosses_the_underlay() {
    hbone_over_ipv6("dual");
}

#[test]
fn hbone_on_an_ipv6_only_lab() {
    hbone_over_ipv6("ipv6");
}

fn hbone_over_ipv6(family: &str) {
    let lab = Lab::up(
        &unique_prefix("v6hb"),
        LabOptions::new(LAB).ip_family(family),
    )
    .expect("lab up");
    let (client, app) = (v6(&lab, "a-client"), v6(&lab, "b-app"));

    let capture = lab.capture("nodeA", "ul0").unwrap();
    let secret = b"AMBIENT-V6-PLAINTEXT-MARKER-5be2";
    for (ip, port) in [(app, 9080), (SERVICE_IP6.into(), 80)] {
        let (greeting, echoed) = lab.exchange("a-client", ip, port, secret).unwrap();
        let (_, seen) = parse_greeting(&greeting).unwrap_or_else(|| panic!("{greeting:?}"));
        assert_eq!(
            seen.ip(),
            client,
            "the server must see the client's v6 pod address"
        );
        assert_eq!(echoed, secret);
    }
    let (raw, text) = capture.stop().unwrap();
    assert!(
        !raw.windows(secret.len()).any(|w| w == secret),
        "the payload crossed the underlay in clear"
    );
    assert!(
        text.contains(&format!("{app}.15008")),
        "no HBONE to [{app}]:15008:\n{text}"
    );
    assert!(
        !text.contains(&format!("{app}.9080")),
        "plain 9080 on the underlay:\n{text}"
    );

    // A bulk transfer over v6 arrives intact both ways.
    let (sent, got, total) = lab
        .echo_transfer("a-client", SocketAddr::new(app, 9080), 8 << 20)
        .unwrap();
    assert_eq!((total, sent), (8 << 20, got));

    // Policy by v6 address block: allow a-client's /128 only; a-app (same namespace, other
    // address) is refused, and so is a-client over IPv4 (a v6 block never matches v4).
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let policies = json!([{
        "name": "only-a-client-v6", "namespace": "demo", "scope": "Namespace", "action": "Allow",
        "rules": [{"sourceIps": [format!("{client}/128")]}]
    }]);
    ztunnel::write_config(&state.run_dir, &ztunnel::render_config(&state, &policies)).unwrap();
    eventually("the v6 block refuses a-app", || {
        client_seen(&lab, "a-app", app, 9080).is_err()
    });
    assert_eq!(
        client_seen(&lab, "a-client", app, 9080).map(|c| c.ip()),
        Ok(client)
    );
    if family == "dual" {
        assert!(client_seen(&lab, "a-client", lab.pod_ip("b-app").into(), 9080).is_err());
    }
}

/// The node's count of packets its IPv6 anti-spoofing rules dropped: the inet table's (by
/// input device) plus the bridge table's (by bridge port: with a bridge primary the spoofed
/// frame is dropped there, before routing).
fn v6_spoof_drops(lab: &Lab, node: &str) -> u64 {
    ["inet", "bridge"]
        .iter()
        .map(|family| {
            let out = lab
                .exec(
                    node,
                    &["nft", "list", "chain", family, "ambient-node", "prerouting"],
                )
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let line = text
                .lines()
                .find(|l| l.contains("IPv6 pod address from a device not its own: spoofed, drop"))
                .unwrap_or_else(|| panic!("no IPv6 anti-spoofing rule in {family}:\n{text}"));
            let after = line.split("counter packets ").nth(1).unwrap();
            after
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

/// Connects from `from` bound to `src` (an address of its interface) to `dst`:9080 within 2 s.
fn connect_from(lab: &Lab, from: &str, src: IpAddr, dst: IpAddr) -> Result<String, String> {
    use std::io::{BufRead, BufReader};
    lab.run_in(from, move || -> Result<String, String> {
        let sock = std::net::TcpListener::bind(SocketAddr::new(src, 0)).map_err(|e| e.to_string());
        drop(sock?);
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet6,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| e.to_string())?;
        let timeout = nix::sys::time::TimeVal::new(2, 0);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SendTimeout, &timeout)
            .map_err(|e| e.to_string())?;
        let to = |a: IpAddr, port: u16| match SocketAddr::new(a, port) {
            SocketAddr::V6(v6) => nix::sys::socket::SockaddrIn6::from(v6),
            SocketAddr::V4(_) => unreachable!("IPv6 only"),
        };
        use std::os::fd::AsRawFd;
        nix::sys::socket::bind(fd.as_raw_fd(), &to(src, 0)).map_err(|e| e.to_string())?;
        nix::sys::socket::connect(fd.as_raw_fd(), &to(dst, 9080)).map_err(|e| e.to_string())?;
        let stream = std::net::TcpStream::from(fd);
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim_end().to_string())
    })
    .map_err(|e| format!("{e:#}"))?
}

/// A pod that sends with an enrolled neighbour's IPv6 address is dropped at the node, not
/// captured as that neighbour; its own address is captured as before (ptp and bridge).
#[test]
fn a_neighbours_ipv6_address_is_dropped_not_captured() {
    for primary in ["ptp", "bridge"] {
        let lab = listener_lab("v6sp", "dual", primary);
        let _zt_a = lab.tproxy_listen("a-ztunnel").unwrap();
        let (own, neighbour, dst) = (v6(&lab, "a-app"), v6(&lab, "a-client"), v6(&lab, "b-app"));
        let got = connect_from(&lab, "a-app", own, dst).unwrap();
        assert!(
            TproxyRecord::parse_line(&got).is_some(),
            "{primary}: a-app's own v6 address is captured: {got:?}"
        );
        // a-app takes a-client's address on its interface (root in its netns can).
        let add = lab
            .exec(
                "a-app",
                &[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{neighbour}/128"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )
            .unwrap();
        assert!(add.status.success(), "{add:?}");
        let before = v6_spoof_drops(&lab, "nodeA");
        let spoofed = connect_from(&lab, "a-app", neighbour, dst);
        assert!(
            spoofed.is_err(),
            "{primary}: the spoofed connection got through: {spoofed:?}"
        );
        assert!(
            v6_spoof_drops(&lab, "nodeA") > before,
            "{primary}: the node did not count the spoofed SYNs as dropped"
        );
        drop(_zt_a);
    }
}

/// L7 over IPv6: a request to the reviews Service's v6 ClusterIP goes through the waypoint
/// (reached at its v6 address) and on to a v6 endpoint address; the route by header holds.
#[test]
fn http_through_the_waypoint_over_ipv6() {
    use ambient_lab::http::HttpRequest;
    let lab = Lab::up(
        &unique_prefix("v6wp"),
        LabOptions::new(LAB).ip_family("dual").waypoint(),
    )
    .expect("lab up");
    let vip = SocketAddr::new(ambient_lab::service::REVIEWS_IP6.into(), 80);
    let reqs = [
        HttpRequest::get("/").header("x-version", "v2"),
        HttpRequest::get("/v6"),
    ];
    let answers = lab.http1("a-client", vip, &reqs).unwrap();
    assert_eq!(answers.len(), 2);
    let v2 = answers[0].echo().unwrap();
    assert_eq!(v2.pod, "b-reviews-v2", "{v2:?}");
    for a in &answers {
        assert_eq!(a.status, 200);
        let e = a.echo().unwrap();
        // The endpoint saw the waypoint, over IPv6.
        assert_eq!(
            e.peer.parse::<SocketAddr>().unwrap().ip(),
            v6(&lab, "b-waypoint")
        );
    }
    let log = lab.waypoint_access_log();
    assert!(
        log.iter()
            .any(|l| l.contains("authority=[fd00:10:96::20]") && l.contains("code=200")),
        "{log:?}"
    );
}
