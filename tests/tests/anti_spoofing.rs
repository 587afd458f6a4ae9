//! Anti-spoofing on the lab: a pod that sends with a neighbour's enrolled address as source
//! must not be captured (and so handed to ztunnel) as that neighbour; the node drops such
//! packets and counts them. On ptp (the inet table checks `iifname . ip saddr`) and on a
//! bridge primary (the bridge table checks the port). Needs root.
//!
//! The spoofed packets are TCP SYNs written on a raw socket inside the sending pod. A SYN that
//! is captured reaches the ztunnel netns on `pistioout`, where the test counts it with an nft
//! counter of its own before ztunnel's TPROXY. Each run first sends a SYN with the pod's *own*
//! address through the same raw socket and checks it is counted: the detection works, so a
//! captured spoofed SYN would have been counted too.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use ambient_lab::tproxy::TproxyRecord;
use ambient_lab::{unique_prefix, Lab, LabOptions};

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");
/// The port the spoofed SYNs go to (the pods' servers listen there).
const PORT: u16 = 9080;
/// The test's own table in the ztunnel netns: counts SYNs arriving from the tunnel.
const COUNT_TABLE: &str = "spooftest";

fn lab(tag: &str, primary: Option<&str>) -> Lab {
    let mut opts = LabOptions::new(LAB).arg("--dataplane").arg("none");
    if let Some(p) = primary {
        opts = opts.primary(p);
    }
    Lab::up(&unique_prefix(tag), opts).expect("lab up")
}

fn run(lab: &Lab, short: &str, argv: &[&str]) -> String {
    let out = lab.exec(short, argv).expect("exec");
    assert!(
        out.status.success(),
        "{argv:?} in {short}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 + TCP SYN from `src:sport` to `dst:dport`, checksums filled in.
fn syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let sum = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = libc::IPPROTO_TCP as u8;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// Sends `count` SYNs with source `src` (any address: a raw socket with the IP header
/// included) from inside the pod `from` to `dst:PORT`.
fn send_syns(lab: &Lab, from: &str, src: Ipv4Addr, dst: Ipv4Addr, count: u16) {
    lab.run_in(from, move || {
        // SAFETY: socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        for i in 0..count {
            let pkt = syn(src, dst, 40000 + i, PORT);
            // SAFETY: pkt and to outlive the call.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert_eq!(
                n,
                pkt.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
    })
    .unwrap();
}

/// A counter per source address for SYNs to `PORT` arriving on `pistioout` in the ztunnel
/// netns: what reaches ztunnel's outbound (15001) TPROXY, i.e. what the node captured.
fn count_captured(lab: &Lab, ztunnel: &str, sources: &[Ipv4Addr]) {
    let t = COUNT_TABLE;
    run(lab, ztunnel, &["nft", "add", "table", "ip", t]);
    run(
        lab,
        ztunnel,
        &[
            "nft",
            "add chain ip spooftest pre { type filter hook prerouting priority -300; }",
        ],
    );
    for s in sources {
        let rule = format!(
            "add rule ip {t} pre iifname \"pistioout\" ip saddr {s} tcp dport {PORT} tcp flags syn counter comment \"from {s}\""
        );
        run(lab, ztunnel, &["nft", &rule]);
    }
}

/// Packets counted by the rule of table `family name` chain `chain` whose comment contains
/// `comment`.
fn counter(lab: &Lab, ns: &str, family: &str, table: &str, chain: &str, comment: &str) -> u64 {
    let text = run(lab, ns, &["nft", "list", "chain", family, table, chain]);
    let line = text
        .lines()
        .find(|l| l.contains(comment))
        .unwrap_or_else(|| panic!("no rule {comment:?} in\n{text}"));
    let after = line
        .split("counter packets ")
        .nth(1)
        .unwrap_or_else(|| panic!("no counter in {line}"));
    after.split_whitespace().next().unwrap().parse().unwrap()
}

fn captured_from(lab: &Lab, ztunnel: &str, src: Ipv4Addr) -> u64 {
    counter(
        lab,
        ztunnel,
        "ip",
        COUNT_TABLE,
        "pre",
        &format!("from {src}\""),
    )
}

/// What the node dropped as spoofed: the inet table's drop rule plus the bridge table's.
fn dropped(lab: &Lab, node: &str) -> (u64, u64) {
    let rule = "spoofed, drop";
    (
        counter(lab, node, "inet", "ambient-node", "prerouting", rule),
        counter(lab, node, "bridge", "ambient-node", "prerouting", rule),
    )
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection opened the way ztunnel opens its onward ones: from inside the ztunnel netns,
/// IP_TRANSPARENT, bound to a pod's address. Returns the server's greeting.
fn connect_as(lab: &Lab, ztunnel: &str, src: Ipv4Addr, dst: Ipv4Addr) -> String {
    use nix::sys::socket::{
        bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    lab.run_in(ztunnel, move || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        setsockopt(&fd, sockopt::IpTransparent, &true).unwrap();
        let [a, b, c, d] = src.octets();
        bind(fd.as_raw_fd(), &SockaddrIn::new(a, b, c, d, 0)).unwrap();
        let [a, b, c, d] = dst.octets();
        connect(fd.as_raw_fd(), &SockaddrIn::new(a, b, c, d, PORT))
            .unwrap_or_else(|e| panic!("connect {src} -> {dst}:{PORT}: {e}"));
        let stream = TcpStream::from(fd);
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line.trim_end().to_string()
    })
    .unwrap()
}

fn spoofing_a_neighbour_is_dropped_not_captured(
    lab: &Lab,
    bridge: bool,
) -> ambient_lab::harness::TproxyListener {
    let listener = lab.tproxy_listen("a-ztunnel").unwrap();
    let (client, app, plain) = (
        lab.pod_ip("a-client"),
        lab.pod_ip("a-app"),
        lab.pod_ip("a-plain"),
    );
    let (b_app, b_plain) = (lab.pod_ip("b-app"), lab.pod_ip("b-plain"));
    count_captured(lab, "a-ztunnel", &[client, app, plain]);

    // a-client's own traffic is captured: a real connection, and a raw SYN with its own
    // address (the control for the detection below).
    let got = lab.connect("a-client", b_app, PORT).unwrap();
    let r = TproxyRecord::parse_line(&got).unwrap_or_else(|| panic!("not captured: {got}"));
    assert_eq!((r.port, r.peer.ip()), (15001, IpAddr::V4(client)), "{got}");
    let before = dropped(lab, "nodeA");
    send_syns(lab, "a-client", client, b_app, 1);
    wait_for("a-client's own SYN at ztunnel", || {
        captured_from(lab, "a-ztunnel", client) >= 1
    });
    assert_eq!(dropped(lab, "nodeA"), before, "own address dropped");

    // a-client claims a-app's (enrolled) address: dropped by the node, never at ztunnel.
    send_syns(lab, "a-client", app, b_app, 3);
    wait_for("the node to drop the spoofed SYNs", || {
        let (inet, br) = dropped(lab, "nodeA");
        inet + br >= before.0 + before.1 + 3
    });
    let (inet, br) = dropped(lab, "nodeA");
    if bridge {
        // The bridge table drops it at the port; routing never sees it.
        assert_eq!((inet, br), (before.0, before.1 + 3));
    } else {
        assert_eq!((inet, br), (before.0 + 3, before.1));
    }
    // Something sent after the spoofed SYNs and captured has arrived, so they would have too.
    send_syns(lab, "a-client", client, b_app, 1);
    wait_for("a second own SYN at ztunnel", || {
        captured_from(lab, "a-ztunnel", client) >= 2
    });
    assert_eq!(
        captured_from(lab, "a-ztunnel", app),
        0,
        "a-client's SYNs claiming a-app's address were captured as a-app"
    );

    // A non-ambient pod claiming an enrolled address is spoofing too.
    send_syns(lab, "a-plain", app, b_plain, 1);
    wait_for("the spoofed SYN from a-plain to be dropped", || {
        let (i, b) = dropped(lab, "nodeA");
        i + b > inet + br
    });
    let after_plain = dropped(lab, "nodeA");
    // Non-ambient pods with their own addresses are untouched: not captured, not dropped.
    let got = lab.connect("a-plain", b_plain, PORT).unwrap();
    assert!(
        got.starts_with(&format!("server={b_plain}:{PORT} client={plain}:")),
        "{got}"
    );
    send_syns(lab, "a-plain", plain, b_plain, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(dropped(lab, "nodeA"), after_plain);
    assert_eq!(captured_from(lab, "a-ztunnel", plain), 0);

    // The neighbour itself is still captured as itself.
    let got = lab.connect("a-app", b_app, PORT).unwrap();
    let r = TproxyRecord::parse_line(&got).unwrap_or_else(|| panic!("not captured: {got}"));
    assert_eq!(r.peer.ip(), IpAddr::V4(app), "{got}");
    // ztunnel may send with a pod's address (its onward connections): not dropped, the
    // server sees the pod.
    let greeting = connect_as(lab, "a-ztunnel", app, b_plain);
    assert!(
        greeting.starts_with(&format!("server={b_plain}:{PORT} client={app}:")),
        "{greeting}"
    );
    assert_eq!(dropped(lab, "nodeA"), after_plain);

    // The transparent listener never accepted anything from a-app but a-app's own connection.
    let from_app: Vec<SocketAddr> = listener
        .records()
        .unwrap()
        .into_iter()
        .filter(|r| r.peer.ip() == IpAddr::V4(app))
        .map(|r| r.peer)
        .collect();
    assert_eq!(from_app.len(), 1, "{from_app:?}");
    listener
}

#[test]
fn ptp_spoofed_neighbour_address_is_dropped_not_captured() {
    let lab = lab("spf", None);
    let _listener = spoofing_a_neighbour_is_dropped_not_captured(&lab, false);
    // The inet table says what it checks.
    let t = run(
        &lab,
        "nodeA",
        &["nft", "list", "table", "inet", "ambient-node"],
    );
    let veth = lab.pod("a-client").host_veth.clone().unwrap();
    let element = format!("\"{veth}\" . {}", lab.pod_ip("a-client"));
    assert!(t.contains(&element), "{element} not in\n{t}");
}

#[test]
fn bridge_spoofed_neighbour_address_is_dropped_not_captured() {
    let lab = lab("spb", Some("bridge"));
    let _listener = spoofing_a_neighbour_is_dropped_not_captured(&lab, true);
    // Pods of one bridge still resolve each other (ARP passes the bridge table), and a
    // non-ambient pod's connection to an ambient pod of its bridge is captured inbound
    // (same-bridge capture), as itself.
    let got = lab.connect("a-plain", lab.pod_ip("a-app"), PORT).unwrap();
    let r = TproxyRecord::parse_line(&got).unwrap_or_else(|| panic!("not captured: {got}"));
    assert_eq!(r.port, 15006, "{got}");
    assert_eq!(r.peer.ip(), IpAddr::V4(lab.pod_ip("a-plain")), "{got}");
    let inet = run(
        &lab,
        "nodeA",
        &["nft", "list", "table", "inet", "ambient-node"],
    );
    assert!(
        inet.contains(&format!("\"cni0\" . {}", lab.pod_ip("a-client"))),
        "{inet}"
    );
    let br = run(
        &lab,
        "nodeA",
        &["nft", "list", "table", "bridge", "ambient-node"],
    );
    let veth = lab.pod("a-client").host_veth.clone().unwrap();
    assert!(
        br.contains(&format!("\"{veth}\" . {}", lab.pod_ip("a-client"))),
        "{br}"
    );
}
