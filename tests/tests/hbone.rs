//! The whole path on the lab with the real data plane (SPEC §3–4): pod → node capture →
//! ztunnel A → HBONE (mTLS 1.3, HTTP/2 CONNECT) → ztunnel B → pod. Needs root.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ambient_lab::serve::parse_greeting;
use ambient_lab::state::LabState;
use ambient_lab::{procs, unique_prefix, ztunnel, Lab, LabOptions};
use serde_json::json;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn lab(tag: &str) -> Lab {
    Lab::up(&unique_prefix(tag), LabOptions::new(LAB)).expect("lab up")
}

/// The client address the server saw, or an error when the connection was refused.
fn client_seen(lab: &Lab, from: &str, ip: Ipv4Addr, port: u16) -> Result<SocketAddr, String> {
    let line = lab.connect(from, ip, port).map_err(|e| format!("{e:#}"))?;
    parse_greeting(&line)
        .map(|(_, client)| client)
        .ok_or_else(|| format!("no greeting: {line:?}"))
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// ztunnel's Prometheus text in the given ztunnel netns.
fn metrics(lab: &Lab, zt: &str) -> String {
    lab.run_in(zt, || {
        ztunnel::http_get(ambient_net::consts::port::METRICS, "/metrics")
    })
    .unwrap()
    .unwrap()
    .1
}

/// The sum of the samples of `name` whose labels contain all of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn log_of(lab: &Lab, zt: &str) -> String {
    std::fs::read_to_string(lab.status().run_dir.join(format!("{zt}.log"))).unwrap_or_default()
}

#[test]
fn ambient_to_ambient_across_nodes_is_mutual_tls_and_keeps_the_client_ip() {
    let lab = lab("hb");
    let (client, app) = (lab.pod_ip("a-client"), lab.pod_ip("b-app"));

    // Capture the underlay while a known payload crosses it.
    let capture = lab.capture("nodeA", "ul0").unwrap();
    let secret = b"AMBIENT-PLAINTEXT-MARKER-7d1f3c";
    for ip in [app, SERVICE_IP] {
        let port = if ip == SERVICE_IP { 80 } else { 9080 };
        let (greeting, echoed) = lab.exchange("a-client", ip, port, secret).unwrap();
        let (_, seen) = parse_greeting(&greeting).unwrap_or_else(|| panic!("{greeting:?}"));
        assert_eq!(seen.ip(), client, "the server must see the client's pod IP");
        assert_eq!(echoed, secret);
    }
    let (raw, text) = capture.stop().unwrap();
    assert!(
        !raw.windows(secret.len()).any(|w| w == secret),
        "the payload crossed the underlay in clear"
    );
    assert!(
        text.contains(&format!("{app}.15008")),
        "no HBONE to 15008 on the underlay:\n{text}"
    );
    assert!(
        !text.contains(&format!("{app}.9080")),
        "plain 9080 on the underlay:\n{text}"
    );

    // Both ztunnels report it, with the identities and mutual_tls.
    let src = "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"";
    let dst = "destination_principal=\"spiffe://cluster.local/ns/demo/sa/app\"";
    for zt in ["a-ztunnel", "b-ztunnel"] {
        let m = metrics(&lab, zt);
        let opened = sample(
            &m,
            "istio_tcp_connections_opened_total",
            &[src, dst, "connection_security_policy=\"mutual_tls\""],
        );
        assert!(opened >= 2.0, "{zt} metrics:\n{m}");
        let log = log_of(&lab, zt);
        assert!(
            log.lines().any(|l| l.contains("connection complete")
                && l.contains("spiffe://cluster.local/ns/demo/sa/client")
                && l.contains("spiffe://cluster.local/ns/demo/sa/app")
                && l.contains("mutual_tls")),
            "{zt} access log:\n{log}"
        );
    }
    assert!(metrics(&lab, "b-ztunnel").contains("istio_tcp_received_bytes_total"));
}

#[test]
fn bulk_transfers_arrive_intact_both_ways() {
    let lab = lab("blk");
    let app = SocketAddr::new(lab.pod_ip("b-app").into(), 9080);
    const SIZE: usize = 100 << 20;
    // Send 100 MB and read the 100 MB echo back at the same time: both directions at once.
    let (sent, got, total) = lab.echo_transfer("a-client", app, SIZE).unwrap();
    assert_eq!(total, SIZE, "echo length");
    assert_eq!(sent, got, "the echoed bytes differ from the sent ones");
}

#[test]
fn policies_apply_to_new_connections_without_a_restart() {
    let lab = lab("pol");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let write = |policies: serde_json::Value| {
        ztunnel::write_config(&state.run_dir, &ztunnel::render_config(&state, &policies)).unwrap();
    };
    let app = lab.pod_ip("b-app");
    assert!(client_seen(&lab, "a-client", app, 9080).is_ok());

    // A deny policy on the server's namespace refuses the client's principal.
    write(json!([{
        "name": "deny-client", "namespace": "demo", "scope": "Namespace", "action": "Deny",
        "rules": [{"principals": ["cluster.local/ns/demo/sa/client"]}]
    }]));
    eventually("the deny policy refuses a-client", || {
        client_seen(&lab, "a-client", app, 9080).is_err()
    });
    assert!(
        client_seen(&lab, "a-app", app, 9080).is_ok(),
        "deny must not refuse others"
    );

    // An allow policy admits only the named principal.
    write(json!([{
        "name": "only-client", "namespace": "demo", "scope": "Namespace", "action": "Allow",
        "rules": [{"principals": ["cluster.local/ns/demo/sa/client"]}]
    }]));
    eventually("the allow policy admits a-client", || {
        client_seen(&lab, "a-client", app, 9080).is_ok()
    });
    assert!(
        client_seen(&lab, "a-app", app, 9080).is_err(),
        "allow must refuse other principals"
    );
    let pid = state.process("ztunnel-b").unwrap().pid;
    assert!(procs::start_time(pid).is_ok(), "ztunnel B was restarted");
}

#[test]
fn a_restarted_ztunnel_carries_new_connections_within_a_second() {
    let lab = lab("zrs");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let app = lab.pod_ip("b-app");
    assert!(client_seen(&lab, "a-client", app, 9080).is_ok());
    let rec = state.process("ztunnel-a").unwrap().clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rec.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually("ztunnel A is gone", || !procs::is_alive(&rec));
    let start = Instant::now();
    let _new = lab
        .spawn("ztunnel-a-restarted", "a-ztunnel", &rec.argv)
        .unwrap();
    eventually("the new ztunnel is ready", || {
        lab.run_in("a-ztunnel", ztunnel::ready_once).unwrap()
    });
    let ready = start.elapsed();
    let ok = client_seen(&lab, "a-client", app, 9080).is_ok();
    let took = start.elapsed();
    eprintln!("ztunnel A ready {ready:?} after the restart, traffic after {took:?}");
    assert!(ok, "no connection through the restarted ztunnel");
    assert!(took < Duration::from_secs(1), "took {took:?}");
}
