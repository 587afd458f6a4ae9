//! The `ztunnel` binary: CLI, CA creation, readiness, certificate rotation under an open
//! tunnel, and graceful drain on SIGTERM.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use ambient_net::consts::port;
use common::*;
use ztunnel::identity::Ca;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn dump(addr: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(addr, "/config_dump").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_rotates_certificates_and_drains_on_sigterm() {
    let net = 30;
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let echo = echo_server(ip(net, 21)).await;
    let config = dir.path().join("local.yaml");
    std::fs::write(
        &config,
        format!(
            "workloads:\n\
             - {{name: sleep, namespace: demo, serviceAccount: sleep, workloadIps: [{}], protocol: HBONE, node: node-a}}\n\
             - {{name: echo, namespace: demo, serviceAccount: echo, workloadIps: [{}], protocol: HBONE, node: node-b}}\n",
            ip(net, 11),
            ip(net, 21)
        ),
    )
    .unwrap();
    let side = |p: u16| SocketAddr::new(ip(net, 2), p).to_string();
    let hbone = SocketAddr::new(ip(net, 21), port::INBOUND_HBONE);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
    cmd.args([
        "--config",
        config.to_str().unwrap(),
        "--node-name",
        "node-b",
    ])
    .args(["--ca-dir", ca_dir.to_str().unwrap(), "--no-transparent"])
    .args(["--cert-lifetime", "4s", "--drain-timeout", "10s"])
    .args(["--inbound-addr", &hbone.to_string()])
    .args(["--outbound-addr", &side(port::OUTBOUND)])
    .args(["--inbound-plaintext-addr", &side(port::INBOUND_PLAINTEXT)])
    .args(["--admin-addr", &side(port::ADMIN)])
    .args(["--metrics-addr", &side(port::METRICS)])
    .args(["--readiness-addr", &side(port::READINESS)])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = Child(cmd.spawn().unwrap());
    let ready: SocketAddr = side(port::READINESS).parse().unwrap();
    let admin: SocketAddr = side(port::ADMIN).parse().unwrap();
    let t0 = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(ready).await.is_ok()
            && http_get(ready, "/healthz/ready").await.0 == 200
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The CA was created where we said; a test client uses the same root.
    assert!(ca_dir.join("root-cert.pem").exists() && ca_dir.join("root-key.pem").exists());
    let ca = Ca::from_pem(
        &std::fs::read_to_string(ca_dir.join("root-cert.pem")).unwrap(),
        &std::fs::read_to_string(ca_dir.join("root-key.pem")).unwrap(),
        "cluster.local",
    )
    .unwrap();
    let m = MeshClient { net, ca };
    let first = dump(admin).await["certificates"][0]["certificate"]["serial"].clone();
    assert!(first.is_string());

    let mut c = m.client().await;
    let (status, open) = connect(&mut c, echo.addr, None).await;
    assert_eq!(status, 200);
    let open = open.unwrap();

    // 4 s lifetime: rotated within a few seconds; the open tunnel is unaffected, new ones work.
    let t0 = Instant::now();
    loop {
        let now = dump(admin).await["certificates"][0]["certificate"]["serial"].clone();
        if now != first {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(8), "no rotation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c2 = m.client().await;
    let (status, fresh) = connect(&mut c2, echo.addr, None).await;
    assert_eq!(status, 200);
    assert_eq!(echo_through(fresh.unwrap(), b"new cert").await, b"new cert");

    // SIGTERM: not ready any more, no new connections, the open stream keeps working and the
    // process exits 0 once it ends.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    while http_get(ready, "/healthz/ready").await.0 != 503 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still ready while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        tokio::net::TcpStream::connect(hbone).await.is_err(),
        "still accepting while draining"
    );
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "exited with a connection open"
    );
    let data = payload(1024 * 1024);
    assert!(echo_through(open, &data).await == data);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "did not exit after the last connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    let mut log = String::new();
    use std::io::Read;
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("created a new CA root"), "{log}");
    assert!(log.contains("drained"), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

struct MeshClient {
    net: u8,
    ca: Ca,
}

impl MeshClient {
    async fn client(&self) -> h2::client::SendRequest<bytes::Bytes> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.root_der().clone()).unwrap();
        hbone_client(
            std::sync::Arc::new(roots),
            self.net,
            &self.ca,
            &id("sleep"),
            &id("echo"),
            SocketAddr::new(ip(self.net, 21), port::INBOUND_HBONE),
            SystemTime::now() - Duration::from_secs(5),
            Duration::from_secs(600),
        )
        .await
        .unwrap()
    }
}
