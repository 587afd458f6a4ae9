//! A loopback "mesh" for the integration tests: two ztunnels (node-a, node-b) in this process,
//! an echo server as the pod of node-b, addresses in 127.77.<net>.0/24 so tests never collide.
//!
//! | host | what |
//! |---|---|
//! | .1 | ztunnel A's listeners (outbound, admin, …) |
//! | .2 | ztunnel B's side listeners |
//! | .11 | pod `sleep` (node-a, HBONE) — the client |
//! | .21 | pod `echo` (node-b, HBONE): echo server on a dynamic port; ztunnel B's 15008 |
//! | .31 | pod `legacy` (node-b, TCP): echo server |
//! | .50 | a client outside the mesh |
//! | .100 | service `echo` VIP, port 80 → the echo port |

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ambient_net::consts::port;
use bytes::Bytes;
use rustls::RootCertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::app::{start, Running};
use ztunnel::config::{CertSource, Config};
use ztunnel::identity::{Ca, Identity};
use ztunnel::proxy::h2::{ConnectRequest, H2Stream};

pub fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 77, net, host))
}

pub fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "demo", sa)
}

/// An echo server that records its peers' addresses.
pub struct Echo {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
}

pub async fn echo_server(addr: IpAddr) -> Echo {
    echo_server_on(SocketAddr::new(addr, 0)).await
}

/// An echo server on `addr` (port 0: any).
pub async fn echo_server_on(addr: SocketAddr) -> Echo {
    let l = TcpListener::bind(addr).await.unwrap();
    let a = l.local_addr().unwrap();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let p = peers.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                return;
            };
            p.lock().unwrap().push(peer);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Echo { addr: a, peers }
}

pub struct Mesh {
    pub net: u8,
    pub dir: tempfile::TempDir,
    pub ca_dir: PathBuf,
    pub ca: Ca,
    pub echo: Echo,
    pub legacy: Echo,
    pub config_a: PathBuf,
    pub config_b: PathBuf,
}

impl Mesh {
    pub async fn new(net: u8) -> Mesh {
        init_log();
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (ca, _) = Ca::load_or_create(&ca_dir, "cluster.local").unwrap();
        let echo = echo_server(ip(net, 21)).await;
        let legacy = echo_server(ip(net, 31)).await;
        let config_a = dir.path().join("a.yaml");
        let config_b = dir.path().join("b.yaml");
        let m = Mesh {
            net,
            dir,
            ca_dir,
            ca,
            echo,
            legacy,
            config_a,
            config_b,
        };
        m.write_config("[]", "echo");
        m
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        ip(self.net, host)
    }

    /// The config both nodes read; `policies` is YAML; `echo_sa` is echo's service account as
    /// node-b sees it (node-a always sees `echo`).
    pub fn write_config(&self, policies: &str, echo_sa_b: &str) {
        let text = |echo_sa: &str| {
            format!(
                r#"
workloads:
- name: sleep
  namespace: demo
  serviceAccount: sleep
  workloadIps: [{sleep}]
  protocol: HBONE
  node: node-a
- name: echo
  namespace: demo
  serviceAccount: {echo_sa}
  workloadIps: [{echo}]
  protocol: HBONE
  node: node-b
  services: {{demo/echo.demo.svc.cluster.local: {{}}}}
- name: legacy
  namespace: demo
  workloadIps: [{legacy}]
  protocol: TCP
  node: node-b
services:
- name: echo
  namespace: demo
  hostname: echo.demo.svc.cluster.local
  vips: [{vip}]
  ports: {{80: {port}}}
policies: {policies}
"#,
                sleep = self.ip(11),
                echo = self.ip(21),
                legacy = self.ip(31),
                vip = self.ip(100),
                port = self.echo.addr.port(),
            )
        };
        std::fs::write(&self.config_a, text("echo")).unwrap();
        std::fs::write(&self.config_b, text(echo_sa_b)).unwrap();
    }

    pub fn config(&self, node: &str) -> Config {
        let (file, host) = if node == "node-a" {
            (&self.config_a, 1)
        } else {
            (&self.config_b, 2)
        };
        let mut cfg = Config::new(file.clone(), node, CertSource::Ca(self.ca_dir.clone()))
            .on_loopback(self.ip(host));
        cfg.config_poll = Duration::from_millis(25);
        cfg.drain_timeout = Duration::from_millis(500);
        cfg.connect_timeout = Duration::from_secs(2);
        cfg
    }

    /// ztunnel A: its outbound listener treats every connection as one to `orig_dst`.
    pub async fn node_a(&self, orig_dst: SocketAddr) -> Running {
        let mut cfg = self.config("node-a");
        cfg.outbound_orig_dst = Some(orig_dst);
        start(cfg, tokio::runtime::Handle::current()).await.unwrap()
    }

    /// ztunnel B: HBONE on the echo pod's IP, port 15008 (where A's tunnels go).
    pub async fn node_b(&self) -> Running {
        let mut cfg = self.config("node-b");
        cfg.inbound_addrs = vec![SocketAddr::new(self.ip(21), port::INBOUND_HBONE)];
        cfg.inbound_plaintext_orig_dst = Some(self.echo.addr);
        start(cfg, tokio::runtime::Handle::current()).await.unwrap()
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        r.add(self.ca.root_der().clone()).unwrap();
        Arc::new(r)
    }

    /// A TLS + HTTP/2 client to `addr` presenting a certificate minted by `ca` for `client`
    /// (valid from `start` for `life`), expecting the server to be `server`.
    pub async fn hbone_client(
        &self,
        ca: &Ca,
        client: &Identity,
        server: &Identity,
        addr: SocketAddr,
        start: SystemTime,
        life: Duration,
    ) -> Result<h2::client::SendRequest<Bytes>, String> {
        hbone_client(
            self.roots(),
            self.net,
            ca,
            client,
            server,
            addr,
            start,
            life,
        )
        .await
    }

    pub async fn default_client(
        &self,
        server: &Identity,
    ) -> Result<h2::client::SendRequest<Bytes>, String> {
        self.hbone_client(
            &self.ca,
            &id("sleep"),
            server,
            SocketAddr::new(self.ip(21), port::INBOUND_HBONE),
            SystemTime::now() - Duration::from_secs(5),
            Duration::from_secs(600),
        )
        .await
    }
}

/// A TLS + HTTP/2 client (see [`Mesh::hbone_client`]); `roots` are the trust anchors.
#[allow(clippy::too_many_arguments)]
pub async fn hbone_client(
    roots: Arc<RootCertStore>,
    net: u8,
    ca: &Ca,
    client: &Identity,
    server: &Identity,
    addr: SocketAddr,
    start: SystemTime,
    life: Duration,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let cert = ca
        .mint_workload_cert(client, start, life)
        .map_err(|e| e.to_string())?;
    let send =
        ztunnel::client::connect(roots, cert.certified.clone(), vec![server.clone()], addr).await?;
    // The server may refuse our certificate only after the handshake completes on our side
    // (TLS 1.3 client auth): make a round trip (a CONNECT to nowhere: 400) before calling this
    // a success.
    let mut ready = send.ready().await.map_err(|e| format!("h2: {e}"))?;
    let probe = ConnectRequest {
        authority: SocketAddr::new(ip(net, 99), 1),
        headers: http::HeaderMap::new(),
    };
    let (resp, _) = ready
        .send_request(probe.build(), true)
        .map_err(|e| format!("h2: {e}"))?;
    resp.await.map_err(|e| format!("h2: {e}"))?;
    Ok(ready)
}

/// Sends a CONNECT; returns the status and, on 200, the stream.
pub async fn connect(
    send: &mut h2::client::SendRequest<Bytes>,
    authority: SocketAddr,
    forwarded: Option<SocketAddr>,
) -> (u16, Option<H2Stream>) {
    let mut headers = http::HeaderMap::new();
    if let Some(f) = forwarded {
        headers.insert("forwarded", format!("for=\"{f}\"").parse().unwrap());
    }
    let req = ConnectRequest { authority, headers }.build();
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, sendstream) = ready.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    if status == 200 {
        (
            status,
            Some(H2Stream {
                send: sendstream,
                recv: resp.into_body(),
            }),
        )
    } else {
        (status, None)
    }
}

/// Writes `data` into a tunnel stream and reads the echo back (concurrently).
pub async fn echo_through(stream: H2Stream, data: &[u8]) -> Vec<u8> {
    let H2Stream { mut send, mut recv } = stream;
    let data = Bytes::copy_from_slice(data);
    let writer = async move {
        for chunk in data.chunks(64 * 1024) {
            send.reserve_capacity(chunk.len());
            let mut left = Bytes::copy_from_slice(chunk);
            while !left.is_empty() {
                let cap = futures::future::poll_fn(|cx| send.poll_capacity(cx))
                    .await
                    .unwrap()
                    .unwrap();
                let c = left.split_to(cap.min(left.len()));
                send.send_data(c, false).unwrap();
                send.reserve_capacity(left.len());
            }
        }
        send.send_data(Bytes::new(), true).unwrap();
    };
    let reader = async move {
        let mut out = Vec::new();
        while let Some(d) = recv.data().await {
            let d = d.unwrap();
            let _ = recv.flow_control().release_capacity(d.len());
            out.extend_from_slice(&d);
        }
        out
    };
    let ((), out) = tokio::join!(writer, reader);
    out
}

/// Writes `data` over TCP and reads until EOF.
pub async fn tcp_echo(mut s: TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut out = Vec::new();
    let read = r.read_to_end(&mut out);
    let (a, b) = tokio::join!(write, read);
    a?;
    b?;
    Ok(out)
}

pub fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

/// A plain HTTP/1.1 GET.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Connects from `src` (any port) to `dst`.
pub async fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = match src {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(dst).await
}

/// Waits until `f` holds (10 ms steps, up to 5 s).
pub async fn eventually(mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 5 s");
}
