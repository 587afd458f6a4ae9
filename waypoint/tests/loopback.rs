//! The waypoint between real ztunnels on loopback, no root needed:
//!
//! | host (127.79.N.x) | what |
//! |---|---|
//! | .9 | the waypoint (`demo/waypoint`): HBONE, admin, metrics |
//! | .11 | the client `sleep`: this test speaks HBONE as its ztunnel would |
//! | .21 | `reviews-v1`: an HTTP server; ztunnel `node-b1` on .21:15008 |
//! | .22 | `reviews-v2`: an HTTP server; ztunnel `node-b2` on .22:15008 |
//! | .100 / .101 / .102 | service VIPs `reviews`, `reviews-v1`, `reviews-v2` (port 80) |
//!
//! Requests go client → waypoint (CONNECT `<vip>:80`) → route → HBONE to the endpoint's
//! ztunnel (CONNECT `<pod ip>:<port>`, the waypoint's certificate) → the pod.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use serde_json::Value;
use tokio::net::TcpListener;
use ztunnel::config::CertSource;
use ztunnel::identity::{Ca, Identity};
use ztunnel::proxy::h2::{ConnectRequest, H2Io};

thread_local! {
    /// Each test's own 127.79.<net>.0/24 (tests run in parallel; ports like 15008 are fixed).
    static NET: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

fn ip(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 79, NET.with(|n| n.get()), host))
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "demo", sa)
}

/// An HTTP/1.1 + HTTP/2 server answering JSON about the request; `?delay_ms=`, `?status=`.
async fn http_server(addr: IpAddr, name: &'static str) -> SocketAddr {
    let l = TcpListener::bind(SocketAddr::new(addr, 0)).await.unwrap();
    let local = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: Request<hyper::body::Incoming>| async move {
                        let q: HashMap<String, String> = req
                            .uri()
                            .query()
                            .unwrap_or("")
                            .split('&')
                            .filter_map(|p| p.split_once('='))
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect();
                        if let Some(ms) = q.get("delay_ms").and_then(|v| v.parse().ok()) {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let status = q
                            .get("status")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(200u16);
                        let headers: serde_json::Map<String, Value> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), Value::from(v.to_str().unwrap_or(""))))
                            .collect();
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let json = serde_json::json!({
                            "pod": name, "method": parts.method.as_str(),
                            "path": parts.uri.path_and_query().map(|p| p.to_string()),
                            "authority": parts.uri.authority().map(|a| a.to_string()),
                            "version": format!("{:?}", parts.version),
                            "headers": headers, "peer": peer.to_string(), "bodyBytes": body.len(),
                        });
                        let mut resp =
                            hyper::Response::new(Full::new(Bytes::from(json.to_string())));
                        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    local
}

/// A TCP echo server.
async fn echo_server(addr: IpAddr) -> SocketAddr {
    let l = TcpListener::bind(SocketAddr::new(addr, 0)).await.unwrap();
    let local = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            });
        }
    });
    local
}

struct Lab {
    _dir: tempfile::TempDir,
    ca: Ca,
    file: PathBuf,
    waypoint: waypoint::app::Running,
    _ztunnels: Vec<ztunnel::app::Running>,
    v1: SocketAddr,
    v2: SocketAddr,
    echo: SocketAddr,
}

fn mesh_yaml(v1: SocketAddr, v2: SocketAddr, echo: SocketAddr) -> String {
    format!(
        r#"
workloads:
- {{name: waypoint, namespace: demo, serviceAccount: waypoint, workloadIps: [{w}], protocol: HBONE, node: node-w}}
- {{name: sleep, namespace: demo, serviceAccount: sleep, workloadIps: [{c}], protocol: HBONE, node: node-a}}
- name: reviews-v1
  namespace: demo
  serviceAccount: reviews
  workloadIps: [{r1}]
  protocol: HBONE
  node: node-b1
  waypoint: {{address: {w}}}
  services: {{demo/reviews.demo.svc.cluster.local: {{80: {p1}}}, demo/reviews-v1.demo.svc.cluster.local: {{80: {p1}}}, demo/db.demo.svc.cluster.local: {{5432: {pe}}}, demo/raw.demo.svc.cluster.local: {{7: {pe}}}, demo/flaky.demo.svc.cluster.local: {{80: {p1}}}}}
- {{name: gone, namespace: demo, serviceAccount: reviews, workloadIps: [{dead}], protocol: HBONE, node: node-gone, services: {{demo/flaky.demo.svc.cluster.local: {{80: 8080}}}}}}
- name: reviews-v2
  namespace: demo
  serviceAccount: reviews
  workloadIps: [{r2}]
  protocol: HBONE
  node: node-b2
  waypoint: {{address: {w}}}
  services: {{demo/reviews.demo.svc.cluster.local: {{80: {p2}}}, demo/reviews-v2.demo.svc.cluster.local: {{80: {p2}}}}}
services:
- {{name: reviews, namespace: demo, hostname: reviews.demo.svc.cluster.local, vips: [{vip}], ports: {{80: 8080}}, waypoint: {{address: {w}}}}}
- {{name: reviews-v1, namespace: demo, hostname: reviews-v1.demo.svc.cluster.local, vips: [{vip1}], ports: {{80: 8080}}, waypoint: {{address: {w}}}}}
- {{name: reviews-v2, namespace: demo, hostname: reviews-v2.demo.svc.cluster.local, vips: [{vip2}], ports: {{80: 8080}}, waypoint: {{address: {w}}}}}
- {{name: db, namespace: demo, hostname: db.demo.svc.cluster.local, vips: [{vip3}], ports: {{5432: 5432}}, appProtocols: {{5432: tcp}}, waypoint: {{address: {w}}}}}
- {{name: raw, namespace: demo, hostname: raw.demo.svc.cluster.local, vips: [{vip4}], ports: {{7: 7}}, waypoint: {{address: {w}}}}}
- {{name: flaky, namespace: demo, hostname: flaky.demo.svc.cluster.local, vips: [{vip5}], ports: {{80: 8080}}, waypoint: {{address: {w}}}}}
"#,
        w = ip(9),
        c = ip(11),
        r1 = ip(21),
        r2 = ip(22),
        p1 = v1.port(),
        p2 = v2.port(),
        vip = ip(100),
        vip1 = ip(101),
        vip2 = ip(102),
        vip3 = ip(103),
        vip4 = ip(104),
        vip5 = ip(105),
        pe = echo.port(),
        dead = ip(29),
    )
}

impl Lab {
    async fn new(net: u8, routes: &str, policies: &str) -> Lab {
        NET.with(|n| n.set(net));
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (ca, _) = Ca::load_or_create(&ca_dir, "cluster.local").unwrap();
        let v1 = http_server(ip(21), "reviews-v1").await;
        let v2 = http_server(ip(22), "reviews-v2").await;
        let echo = echo_server(ip(21)).await;
        let mesh = mesh_yaml(v1, v2, echo);
        let zfile = dir.path().join("ztunnel.yaml");
        std::fs::write(&zfile, &mesh).unwrap();
        let mut ztunnels = Vec::new();
        for (node, host) in [("node-b1", 21), ("node-b2", 22)] {
            let mut cfg =
                ztunnel::config::Config::new(zfile.clone(), node, CertSource::Ca(ca_dir.clone()))
                    .on_loopback(ip(host));
            cfg.inbound_addrs = vec![SocketAddr::new(ip(host), 15008)];
            ztunnels.push(
                ztunnel::app::start(cfg, tokio::runtime::Handle::current())
                    .await
                    .unwrap(),
            );
        }
        let file = dir.path().join("waypoint.yaml");
        std::fs::write(
            &file,
            format!(
                "waypoint: {{name: waypoint, namespace: demo}}\n{mesh}\n{routes}\n{policies}\n"
            ),
        )
        .unwrap();
        let mut cfg =
            waypoint::config::Config::for_tests(file.clone(), CertSource::Ca(ca_dir), ip(9));
        cfg.config_poll = Duration::from_millis(25);
        cfg.connect_timeout = Duration::from_secs(2);
        let waypoint = waypoint::app::start(cfg, tokio::runtime::Handle::current())
            .await
            .unwrap();
        Lab {
            _dir: dir,
            ca,
            file,
            waypoint,
            _ztunnels: ztunnels,
            v1,
            v2,
            echo,
        }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        r.add(self.ca.root_der().clone()).unwrap();
        Arc::new(r)
    }

    /// An HBONE tunnel from `client` to `to` (expecting `server`) with `:authority`.
    async fn tunnel(
        &self,
        client: &str,
        server: &str,
        to: SocketAddr,
        authority: SocketAddr,
    ) -> Result<H2Io, Result<StatusCode, String>> {
        let cert = self
            .ca
            .mint_workload_cert(
                &id(client),
                SystemTime::now() - Duration::from_secs(5),
                Duration::from_secs(600),
            )
            .unwrap();
        let sender =
            ztunnel::client::connect(self.roots(), cert.certified.clone(), vec![id(server)], to)
                .await
                .map_err(Err)?;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "forwarded",
            format!("for=\"{}:40000\"", ip(11)).parse().unwrap(),
        );
        let stream = ztunnel::client::open(&sender, &ConnectRequest { authority, headers }).await?;
        Ok(H2Io::new(stream))
    }

    /// An HTTP/1.1 client on a tunnel to the waypoint for `vip:80`, as `sleep`.
    async fn h1(&self, vip: u8) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let io = self
            .tunnel(
                "sleep",
                "waypoint",
                self.waypoint.addrs.hbone,
                SocketAddr::new(ip(vip), 80),
            )
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    fn write(&self, routes: &str, policies: &str) {
        let text = format!(
            "waypoint: {{name: waypoint, namespace: demo}}\n{}\n{routes}\n{policies}\n",
            mesh_yaml(self.v1, self.v2, self.echo)
        );
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    async fn wait_generation(&self, gen: u64) {
        for _ in 0..200 {
            if self.waypoint.state.status().generation >= gen {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no reload: {:?}", self.waypoint.state.status());
    }
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    json: Value,
}

async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    send.ready().await.unwrap();
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "reviews");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = send
        .send_request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())),
    }
}

const ROUTES: &str = r#"
routes:
- name: reviews
  namespace: demo
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: reviews.example, statusCode: 301}}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2api}}}
    - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-added, value: by-route}]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-resp, value: set}]}}
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 200ms}
    backendRefs: [{name: reviews-v1, port: 80}]
  - backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
"#;

const POLICIES: &str = r#"
policies:
- name: no-admin
  namespace: demo
  targetRefs: [{kind: Service, name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

#[tokio::test(flavor = "current_thread")]
async fn http_through_the_waypoint() {
    let lab = Lab::new(1, ROUTES, POLICIES).await;
    let mut c = lab.h1(100).await;

    // Weighted split over one keep-alive connection: Binomial(400, 0.1), mean 40, sd 6.
    let mut v2 = 0;
    for _ in 0..400 {
        let a = get(&mut c, "GET", "/reviews", &[]).await;
        assert_eq!(a.status, 200, "{}", a.json);
        if a.json["pod"] == "reviews-v2" {
            v2 += 1;
        }
        // The endpoint sees the waypoint (its ztunnel connects from the waypoint's address)
        // and the client in x-forwarded-for.
        assert_eq!(
            a.json["peer"].as_str().unwrap().split(':').next().unwrap(),
            ip(9).to_string()
        );
        assert_eq!(a.json["headers"]["x-forwarded-for"], ip(11).to_string());
        assert_eq!(a.json["headers"]["x-forwarded-proto"], "http");
    }
    assert!((16..=70).contains(&v2), "v2 got {v2} of 400");

    // A header match goes to v2 only.
    for _ in 0..20 {
        let a = get(&mut c, "GET", "/reviews", &[("x-version", "v2")]).await;
        assert_eq!(a.json["pod"], "reviews-v2");
    }
    // Rewrite + added request header + response header.
    let a = get(&mut c, "GET", "/api/items?x=1", &[]).await;
    assert_eq!(a.json["pod"], "reviews-v1");
    assert_eq!(a.json["path"], "/v2api/items?x=1");
    assert_eq!(a.json["headers"]["x-added"], "by-route");
    assert_eq!(a.headers["x-resp"], "set");
    // Redirect.
    let a = get(&mut c, "GET", "/old/page?q=2", &[]).await;
    assert_eq!(a.status, 301);
    assert_eq!(a.headers["location"], "http://reviews.example/old/page?q=2");
    // Timeout.
    let a = get(&mut c, "GET", "/slow?delay_ms=1500", &[]).await;
    assert_eq!(a.status, 504);
    // L7 DENY on a path; other paths fine.
    let a = get(&mut c, "GET", "/admin/users", &[]).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.json, "RBAC: access denied");
    assert_eq!(get(&mut c, "GET", "/reviews", &[]).await.status, 200);

    // A policy change applies without a restart, on the same connection: only GET allowed.
    lab.write(
        ROUTES,
        "policies:\n- {name: get-only, namespace: demo, targetRefs: [{kind: Service, name: reviews}], rules: [{to: [{operation: {methods: [GET]}}]}]}\n",
    );
    lab.wait_generation(2).await;
    assert_eq!(get(&mut c, "GET", "/admin/x", &[]).await.status, 200);
    assert_eq!(get(&mut c, "POST", "/reviews", &[]).await.status, 403);
    // A bad file is refused and the last good state stays.
    std::fs::write(&lab.file, "routes: [{name: broken}]\n").unwrap();
    for _ in 0..100 {
        if lab.waypoint.state.status().last_error.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(lab.waypoint.state.status().last_error.is_some());
    assert_eq!(get(&mut c, "POST", "/reviews", &[]).await.status, 403);

    // Metrics with Istio's names, reported by the waypoint.
    let text = lab.waypoint.metrics.encode();
    for want in [
        "istio_requests_total{reporter=\"waypoint\"",
        "response_code=\"403\"",
        "response_code=\"504\"",
        "destination_service=\"reviews-v2.demo.svc.cluster.local\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/sleep\"",
        "destination_principal=\"spiffe://cluster.local/ns/demo/sa/reviews\"",
        "istio_request_duration_milliseconds_bucket",
    ] {
        assert!(text.contains(want), "{want} missing in\n{text}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn http2_clients_and_refusals() {
    let lab = Lab::new(2, ROUTES, "").await;
    // HTTP/2 prior knowledge inside the tunnel.
    let io = lab
        .tunnel(
            "sleep",
            "waypoint",
            lab.waypoint.addrs.hbone,
            SocketAddr::new(ip(100), 80),
        )
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        let req = Request::builder()
            .uri("http://reviews/h2")
            .header("x-version", "v2")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["version"], "HTTP/2.0");
        assert_eq!(v["authority"], "reviews");
        seen.insert(v["pod"].as_str().unwrap().to_string());
    }
    assert_eq!(seen, ["reviews-v2".to_string()].into());

    // Not an open proxy: an authority the waypoint does not serve.
    let e = lab
        .tunnel(
            "sleep",
            "waypoint",
            lab.waypoint.addrs.hbone,
            SocketAddr::new(ip(11), 80),
        )
        .await
        .err()
        .unwrap();
    assert_eq!(e, Ok(StatusCode::BAD_REQUEST));
    // The bypass: straight to reviews-v1's ztunnel as the client, not as the waypoint.
    let e = lab
        .tunnel("sleep", "reviews", SocketAddr::new(ip(21), 15008), lab.v1)
        .await
        .err()
        .unwrap();
    assert_eq!(e, Ok(StatusCode::UNAUTHORIZED));
    // As the waypoint it is accepted.
    assert!(lab
        .tunnel(
            "waypoint",
            "reviews",
            SocketAddr::new(ip(21), 15008),
            lab.v1
        )
        .await
        .is_ok());
}

#[tokio::test(flavor = "current_thread")]
async fn tcp_relays_retries_and_empty_bodies() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lab = Lab::new(
        3,
        "",
        r#"
policies:
- name: l7-deny-on-raw
  namespace: demo
  targetRefs: [{kind: Service, name: raw}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/secret*"]}}], from: [{source: {principals: ["cluster.local/ns/demo/sa/blocked"]}}]}]
"#,
    )
    .await;
    // A port declared `tcp`: relayed at L4 to the endpoint, whatever the bytes.
    let mut io = lab
        .tunnel(
            "sleep",
            "waypoint",
            lab.waypoint.addrs.hbone,
            SocketAddr::new(ip(103), 5432),
        )
        .await
        .unwrap();
    io.write_all(b"GET / HTTP/1.1\r\n\r\nnot parsed")
        .await
        .unwrap();
    io.shutdown().await.unwrap();
    let mut back = Vec::new();
    io.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"GET / HTTP/1.1\r\n\r\nnot parsed");
    // Bytes that are not HTTP on an undeclared port: detected, relayed at L4.
    let mut io = lab
        .tunnel(
            "sleep",
            "waypoint",
            lab.waypoint.addrs.hbone,
            SocketAddr::new(ip(104), 7),
        )
        .await
        .unwrap();
    io.write_all(b"\x00\x01binary").await.unwrap();
    io.shutdown().await.unwrap();
    let mut back = Vec::new();
    io.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"\x00\x01binary");
    // At L4 a DENY that needs a path is judged without it: `blocked` is refused outright.
    let mut io = lab
        .tunnel(
            "blocked",
            "waypoint",
            lab.waypoint.addrs.hbone,
            SocketAddr::new(ip(104), 7),
        )
        .await
        .unwrap();
    io.write_all(b"\x00\x01binary").await.unwrap();
    let _ = io.shutdown().await;
    let mut back = Vec::new();
    let r = io.read_to_end(&mut back).await;
    assert!(r.is_err() || back.is_empty(), "{r:?} {back:?}");
    let text = lab.waypoint.metrics.encode();
    assert!(
        text.contains("istio_tcp_connections_opened_total{reporter=\"waypoint\""),
        "{text}"
    );

    // One endpoint of `flaky` is down (nothing at its 15008): connect failures are retried on
    // the other, so every request succeeds.
    let mut c = lab.h1(105).await;
    for _ in 0..20 {
        let a = get(&mut c, "GET", "/f", &[]).await;
        assert_eq!(a.status, 200, "{}", a.json);
        assert_eq!(a.json["pod"], "reviews-v1");
    }
    // Bodies that are empty from the start (HEAD) end cleanly: the upstream connection is
    // reused and nothing is flagged as cut.
    let mut c = lab.h1(101).await;
    let first = get(&mut c, "GET", "/a", &[]).await.json["peer"].clone();
    for _ in 0..5 {
        assert_eq!(get(&mut c, "HEAD", "/h", &[]).await.status, 200);
    }
    assert_eq!(get(&mut c, "GET", "/b", &[]).await.json["peer"], first);
    let text = lab.waypoint.metrics.encode();
    assert!(!text.contains("response_flags=\"DC\""), "{text}");
    assert!(text.contains("response_flags=\"-\""), "{text}");
}
