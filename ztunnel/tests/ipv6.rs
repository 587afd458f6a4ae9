//! IPv6 and dual-stack, end to end through two in-process ztunnels with IPV6_TRANSPARENT
//! sockets (root only; skipped otherwise). Each test runs on a thread of its own that first
//! moves into a network namespace of its own (`unshare(CLONE_NEWNET)`: nothing to clean up,
//! the namespace goes with the thread) and puts the addresses below on its `lo`:
//!
//! | address | what |
//! |---|---|
//! | `fd00:77::1`, `127.77.0.1` | ztunnel A's listeners (node-a) |
//! | `fd00:77::2`, `127.77.0.2` | ztunnel B's side listeners (node-b) |
//! | `fd00:77::11`, `127.77.0.11` | pod `sleep` (node-a, HBONE, dual-stack): the client |
//! | `fd00:77::12` | pod `other` (node-a, HBONE, v6 only): a second client |
//! | `fd00:77::21`, `127.77.0.21` | pod `echo-dual` (node-b, HBONE, dual-stack); B's 15008 on both |
//! | `fd00:77::22` | pod `echo-v6` (node-b, HBONE, v6 only) |
//! | `127.77.0.23` | pod `echo-v4` (node-b, HBONE, v4 only) |
//! | `fd00:77::100`, `127.77.0.100` | service `echo` (dual-stack VIPs), port 80 → 8080 |
//!
//! Every pod runs an echo server on 8080 on each of its addresses.

mod common;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ambient_net::consts::port;
use common::{connect_from, echo_server_on, http_get, init_log, payload, tcp_echo, Echo};
use ztunnel::app::{start, BoundAddrs, Running};
use ztunnel::config::{CertSource, Config};
use ztunnel::identity::Ca;

const ECHO_PORT: u16 = 8080;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `body` (bounded by 60 s) on a new thread in a new network namespace whose `lo` is up
/// and holds `v6` (each a /128, no DAD) and `127/8`. `setup` runs there first (sysctls…).
/// Returns false, having run nothing, when not root or `ip` is missing.
fn in_netns<F, Fut>(v6: &'static [&'static str], setup: &'static [&'static [&str]], body: F) -> bool
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if unsafe { libc::geteuid() } != 0 || !have("ip") {
        eprintln!("skipped: needs root and ip");
        return false;
    }
    let t = std::thread::spawn(move || {
        // Only this thread (and what it starts: the runtime's workers, children) moves.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        run(&["ip", "link", "set", "lo", "up"]);
        for a in v6 {
            run(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "lo",
                "nodad",
            ]);
        }
        wait_for_local_routes(v6);
        for cmd in setup {
            run(cmd);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(60), body())
                .await
                .expect("test timed out");
        });
    });
    if let Err(e) = t.join() {
        std::panic::resume_unwind(e);
    }
    true
}

/// IPv6 installs an address's local route a moment after `ip addr add` returns (from the
/// DAD work, even with `nodad`): wait for every one (up to 5 s), or the first connections are
/// "network unreachable".
fn wait_for_local_routes(v6: &[&str]) {
    for _ in 0..500 {
        let out = Command::new("ip")
            .args(["-6", "route", "show", "table", "local"])
            .output()
            .unwrap();
        let routes = String::from_utf8_lossy(&out.stdout);
        if v6.iter().all(|a| {
            routes
                .lines()
                .any(|l| l.starts_with(&format!("local {a} ")))
        }) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the local routes of {v6:?} did not appear in 5 s");
}

const ADDRS: &[&str] = &[
    "fd00:77::1",
    "fd00:77::2",
    "fd00:77::11",
    "fd00:77::12",
    "fd00:77::21",
    "fd00:77::22",
];

/// The mesh of the table above, with `policies` (YAML) in the file both nodes read.
struct Mesh {
    _dir: tempfile::TempDir,
    ca_dir: PathBuf,
    file: PathBuf,
    echo_dual_v6: Echo,
    echo_dual_v4: Echo,
    echo_v6: Echo,
    echo_v4: Echo,
}

impl Mesh {
    async fn new(policies: &str) -> Mesh {
        init_log();
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        Ca::load_or_create(&ca_dir, "cluster.local").unwrap();
        let file = dir.path().join("mesh.yaml");
        std::fs::write(
            &file,
            format!(
                r#"
workloads:
- {{name: sleep, namespace: demo, serviceAccount: sleep, workloadIps: [127.77.0.11, "fd00:77::11"], protocol: HBONE, node: node-a}}
- {{name: other, namespace: demo, serviceAccount: other, workloadIps: ["fd00:77::12"], protocol: HBONE, node: node-a}}
- {{name: echo-dual, namespace: demo, serviceAccount: echo, workloadIps: [127.77.0.21, "fd00:77::21"], protocol: HBONE, node: node-b, services: {{demo/echo.demo.svc.cluster.local: {{}}}}}}
- {{name: echo-v6, namespace: demo, serviceAccount: echo, workloadIps: ["fd00:77::22"], protocol: HBONE, node: node-b, services: {{demo/echo.demo.svc.cluster.local: {{}}}}}}
- {{name: echo-v4, namespace: demo, serviceAccount: echo, workloadIps: [127.77.0.23], protocol: HBONE, node: node-b, services: {{demo/echo.demo.svc.cluster.local: {{}}}}}}
services:
- {{name: echo, namespace: demo, hostname: echo.demo.svc.cluster.local, vips: [127.77.0.100, "fd00:77::100"], ports: {{80: {ECHO_PORT}}}}}
policies: {policies}
"#
            ),
        )
        .unwrap();
        // The namespace is private: fixed ports are free.
        let echo = |a: &str| echo_server_on(SocketAddr::new(ip(a), ECHO_PORT));
        Mesh {
            echo_dual_v6: echo("fd00:77::21").await,
            echo_dual_v4: echo("127.77.0.21").await,
            echo_v6: echo("fd00:77::22").await,
            echo_v4: echo("127.77.0.23").await,
            _dir: dir,
            ca_dir,
            file,
        }
    }

    /// A ztunnel of `node` with transparent sockets; its three data-plane listeners on both
    /// families (`v4`, `v6`); the side ports on `v4`.
    fn config(&self, node: &str, v4: &str, v6: &str) -> Config {
        let mut cfg = Config::new(self.file.clone(), node, CertSource::Ca(self.ca_dir.clone()))
            .on_loopback(ip(v4));
        let both = vec![SocketAddr::new(ip(v4), 0), SocketAddr::new(ip(v6), 0)];
        cfg.outbound_addrs = both.clone();
        cfg.inbound_plaintext_addrs = both;
        // IPV6_TRANSPARENT + IPV6_FREEBIND upstream, IP(V6)_TRANSPARENT on the listeners.
        cfg.transparent = true;
        cfg.connect_timeout = Duration::from_secs(2);
        cfg.drain_timeout = Duration::from_millis(300);
        cfg
    }

    /// ztunnel A; its outbound listeners take every connection as one to `orig_dst`.
    async fn node_a(&self, orig_dst: SocketAddr) -> Running {
        let mut cfg = self.config("node-a", "127.77.0.1", "fd00:77::1");
        cfg.outbound_orig_dst = Some(orig_dst);
        start(cfg, tokio::runtime::Handle::current()).await.unwrap()
    }

    /// ztunnel B: HBONE on every echo pod address's 15008, one socket each.
    async fn node_b(&self) -> Running {
        let mut cfg = self.config("node-b", "127.77.0.2", "fd00:77::2");
        cfg.inbound_addrs = ["127.77.0.21", "fd00:77::21", "fd00:77::22", "127.77.0.23"]
            .iter()
            .map(|a| SocketAddr::new(ip(a), port::INBOUND_HBONE))
            .collect();
        start(cfg, tokio::runtime::Handle::current()).await.unwrap()
    }
}

/// A's outbound listener in the family of `client`.
fn outbound_for(a: &Running, client: IpAddr) -> SocketAddr {
    BoundAddrs::of_family(&a.addrs.outbound_all, client).unwrap()
}

/// Sends `data` from `client` through A and returns what came back.
async fn through(a: &Running, client: &str, data: &[u8]) -> Vec<u8> {
    let to = outbound_for(a, ip(client));
    let s = connect_from(ip(client), to)
        .await
        .unwrap_or_else(|e| panic!("{client} → {to}: {e}"));
    tcp_echo(s, data).await.unwrap_or_default()
}

fn peers(e: &Echo) -> Vec<IpAddr> {
    e.peers.lock().unwrap().iter().map(|p| p.ip()).collect()
}

/// `tcpdump -U -w <file>` on lo for `filter`, started once it listens.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(dir: &std::path::Path, filter: &str) -> Capture {
        use std::io::BufRead;
        let file = dir.join("wire.pcap");
        let mut child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "-n", "-s", "0", "-w"])
            .arg(&file)
            .arg(filter)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "tcpdump: {line}");
        Capture { child, file }
    }

    /// Stops the capture; the raw bytes of the file.
    fn stop(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(200));
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn hbone_over_v6_spoofs_the_v6_client_and_carries_only_tls() {
    in_netns(ADDRS, &[], || async {
        if !have("tcpdump") {
            eprintln!("skipped the wire check: no tcpdump");
        }
        let m = Mesh::new("[]").await;
        let b = m.node_b().await;
        let a = m.node_a(m.echo_dual_v6.addr).await;
        let cap = have("tcpdump").then(|| Capture::start(m._dir.path(), "tcp port 15008"));
        // A marker a plaintext leak could not hide.
        let marker = b"PLAINTEXT-MARKER-v6-";
        let mut data = Vec::new();
        while data.len() < 2 * 1024 * 1024 {
            data.extend_from_slice(marker);
            data.extend_from_slice(&payload(997));
        }
        let back = through(&a, "fd00:77::11", &data).await;
        assert_eq!(back.len(), data.len());
        assert!(back == data, "bytes differ");
        // The pod saw the v6 client itself (spoofed by B with IPV6_TRANSPARENT).
        assert_eq!(peers(&m.echo_dual_v6), [ip("fd00:77::11")]);
        assert!(peers(&m.echo_dual_v4).is_empty());
        // The tunnel went to the pod's v6 15008, from the client's v6 address.
        let (_, dump) = http_get(a.addrs.admin, "/config_dump").await;
        let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
        let key = &v["pool"]["keys"][0]["key"];
        assert_eq!(key["dst"], "[fd00:77::21]:15008", "{dump}");
        assert_eq!(key["srcIp"], "fd00:77::11", "{dump}");
        if let Some(cap) = cap {
            let wire = cap.stop();
            assert!(
                wire.len() > data.len(),
                "the capture saw {} bytes, less than the payload: not the tunnel",
                wire.len()
            );
            assert!(
                !wire.windows(marker.len()).any(|w| w == marker),
                "plaintext on the wire"
            );
            // TLS 1.3 application data records: 0x17 0x03 0x03.
            assert!(wire.windows(3).any(|w| w == [0x17, 0x03, 0x03]));
        }
        a.shutdown().await;
        b.shutdown().await;
    });
}

#[test]
fn a_dual_stack_pod_is_reached_over_each_family() {
    in_netns(ADDRS, &[], || async {
        let m = Mesh::new("[]").await;
        let b = m.node_b().await;
        for (client, echo, tunnel) in [
            ("127.77.0.11", &m.echo_dual_v4, "127.77.0.21:15008"),
            ("fd00:77::11", &m.echo_dual_v6, "[fd00:77::21]:15008"),
        ] {
            let a = m.node_a(echo.addr).await;
            let data = payload(300_000);
            assert!(through(&a, client, &data).await == data, "{client}");
            assert_eq!(peers(echo), [ip(client)], "{client}");
            let (_, dump) = http_get(a.addrs.admin, "/config_dump").await;
            let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
            assert_eq!(v["pool"]["keys"][0]["key"]["dst"], tunnel, "{dump}");
            assert_eq!(v["pool"]["keys"][0]["key"]["srcIp"], client, "{dump}");
            a.shutdown().await;
        }
        // B's own listeners: 15006 and the side ports of both families are up.
        assert_eq!(b.addrs.inbound_plaintext_all.len(), 2);
        assert_eq!(b.addrs.inbound_all.len(), 4);
        b.shutdown().await;
    });
}

#[test]
fn a_v6_vip_reaches_v6_endpoints_and_a_v4_vip_v4_ones() {
    in_netns(ADDRS, &[], || async {
        let m = Mesh::new("[]").await;
        let b = m.node_b().await;
        let data = payload(10_000);
        let a = m.node_a(sa("[fd00:77::100]:80")).await;
        for _ in 0..16 {
            assert!(through(&a, "fd00:77::11", &data).await == data);
        }
        let (v6, v6only) = (peers(&m.echo_dual_v6), peers(&m.echo_v6));
        assert_eq!(v6.len() + v6only.len(), 16);
        assert!(!v6.is_empty() && !v6only.is_empty(), "{v6:?} {v6only:?}");
        assert!(v6.iter().chain(&v6only).all(|p| *p == ip("fd00:77::11")));
        assert!(peers(&m.echo_v4).is_empty() && peers(&m.echo_dual_v4).is_empty());
        // The explainer agrees (a percent-encoded v6 query).
        let (code, body) = http_get(
            a.addrs.admin,
            "/debug/route?src=fd00:77::11&dst=%5Bfd00:77::100%5D:80",
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["decision"], "allowed", "{v:#}");
        let shares: Vec<(String, f64)> = v["service"]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["workload"].as_str().unwrap().to_string(),
                    e["share"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            shares,
            [
                ("demo/echo-dual".to_string(), 0.5),
                ("demo/echo-v6".to_string(), 0.5),
                ("demo/echo-v4".to_string(), 0.0)
            ]
        );
        a.shutdown().await;
        let a = m.node_a(sa("127.77.0.100:80")).await;
        for _ in 0..16 {
            assert!(through(&a, "127.77.0.11", &data).await == data);
        }
        let (v4, v4only) = (peers(&m.echo_dual_v4), peers(&m.echo_v4));
        assert_eq!(v4.len() + v4only.len(), 16);
        assert!(v4.iter().chain(&v4only).all(|p| *p == ip("127.77.0.11")));
        assert_eq!(peers(&m.echo_dual_v6).len() + peers(&m.echo_v6).len(), 16);
        a.shutdown().await;
        b.shutdown().await;
    });
}

#[test]
fn a_v6_ip_block_allows_one_v6_client_and_denies_another() {
    in_netns(ADDRS, &[], || async {
        let m = Mesh::new(
            r#"
- name: only-sleep-v6
  namespace: demo
  scope: Namespace
  action: Allow
  rules: [{sourceIps: ["fd00:77::11/128"]}]"#,
        )
        .await;
        let b = m.node_b().await;
        let a = m.node_a(m.echo_v6.addr).await;
        assert_eq!(through(&a, "fd00:77::11", b"let me in").await, b"let me in");
        assert_eq!(peers(&m.echo_v6), [ip("fd00:77::11")]);
        // Another v6 client of the same node, outside the block: refused by B (401), the pod
        // never connected.
        assert!(through(&a, "fd00:77::12", b"me too").await.is_empty());
        assert_eq!(peers(&m.echo_v6).len(), 1);
        a.shutdown().await;
        // The block is v6: sleep's own v4 address is not in it.
        let a = m.node_a(m.echo_dual_v4.addr).await;
        assert!(through(&a, "127.77.0.11", b"v4").await.is_empty());
        assert!(peers(&m.echo_dual_v4).is_empty());
        a.shutdown().await;
        b.shutdown().await;
    });
}

#[test]
fn without_ipv6_the_v6_listeners_are_a_warning_not_a_failure() {
    // IPv6 switched off in the namespace: its v6 addresses go, binding one fails.
    in_netns(
        ADDRS,
        &[
            &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
            &["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"],
        ],
        || async {
            init_log();
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("empty.yaml");
            std::fs::write(&file, "workloads: []\n").unwrap();
            let ca = CertSource::Ca(dir.path().join("ca"));
            let cfg = |addrs: &[&str]| {
                let mut cfg =
                    Config::new(file.clone(), "node-a", ca.clone()).on_loopback(ip("127.77.0.1"));
                cfg.outbound_addrs = addrs.iter().map(|a| sa(a)).collect();
                cfg
            };
            // The defaults' shape (v4 + v6): ztunnel starts on v4 alone.
            let z = start(
                cfg(&["127.77.0.1:0", "[fd00:77::1]:0"]),
                tokio::runtime::Handle::current(),
            )
            .await
            .unwrap();
            assert_eq!(z.addrs.outbound_all.len(), 1);
            assert!(z.addrs.outbound.is_ipv4());
            z.shutdown().await;
            // v6 alone: nothing to listen on is an error that names the listener.
            let err = start(cfg(&["[fd00:77::1]:0"]), tokio::runtime::Handle::current())
                .await
                .err()
                .unwrap();
            let err = format!("{err:#}");
            assert!(
                err.contains("outbound listener") && err.contains("[fd00:77::1]:0"),
                "{err}"
            );
            // Any other bind failure stays an error: a v4 address in use.
            let taken = std::net::TcpListener::bind("127.77.0.1:0").unwrap();
            let busy = taken.local_addr().unwrap().to_string();
            assert!(start(
                cfg(&[&busy, "[fd00:77::1]:0"]),
                tokio::runtime::Handle::current()
            )
            .await
            .is_err());
        },
    );
}
