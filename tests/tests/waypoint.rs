//! The L7 path on the lab (needs root): an ambient client's HTTP to the reviews Services goes
//! client → node A capture → ztunnel A → HBONE → node B capture → ztunnel B (relays it to the
//! waypoint pod untouched) → waypoint (routes, authorizes) → HBONE with the waypoint's identity
//! → the endpoint's ztunnel → reviews-v1 (node A) or reviews-v2 (node B), each asserted the
//! way an operator checks it: the answers, the waypoint's metrics and access log, the
//! destination ztunnel's view of the peer.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use ambient_lab::http::{HttpRequest, HttpResponse};
use ambient_lab::serve::pattern_fnv64;
use ambient_lab::service::{REVIEWS_IP, REVIEWS_V1_IP};
use ambient_lab::state::LabState;
use ambient_lab::{unique_prefix, ztunnel as labzt, Lab, LabOptions};
use serde_json::{json, Value};
use ztunnel::identity::{Ca, Identity};
use ztunnel::proxy::h2::ConnectRequest;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");
const REVIEWS: (Ipv4Addr, u16) = (REVIEWS_IP, 80);

fn lab(tag: &str) -> Lab {
    Lab::up(&unique_prefix(tag), LabOptions::new(LAB).waypoint()).expect("lab up")
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of the samples of `name` whose labels contain all of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn identity(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
}

fn pod_of(r: &HttpResponse) -> String {
    r.echo().expect("the test server's JSON").pod
}

/// Replaces the waypoint's routes and policies and waits until it has loaded them.
fn configure(lab: &Lab, routes: Value, policies: Value) {
    let before = generation(lab);
    lab.set_waypoint_config(&routes, &policies).unwrap();
    eventually("the waypoint reloaded its config", || {
        generation(lab) > before
    });
    let (_, dump) = lab.waypoint_admin("/config_dump").unwrap();
    let dump: Value = serde_json::from_str(&dump).unwrap();
    assert!(
        dump["configFile"]["lastError"].is_null(),
        "{}",
        dump["configFile"]
    );
}

fn generation(lab: &Lab) -> u64 {
    let (_, dump) = lab.waypoint_admin("/config_dump").unwrap();
    serde_json::from_str::<Value>(&dump).unwrap()["configFile"]["generation"]
        .as_u64()
        .unwrap()
}

#[test]
fn requests_to_the_clusterip_go_through_the_waypoint() {
    let lab = lab("wp1");
    // Like Istio's, the lab's waypoint is not captured: it speaks HBONE itself.
    assert!(!lab.pod("b-waypoint").ambient);
    assert!(!in_pod_set(&lab, lab.waypoint_ip()));
    assert!(in_pod_set(&lab, lab.pod_ip("b-reviews-v2")));
    let (client, wp) = (lab.pod_ip("a-client"), lab.waypoint_ip());
    let reqs: Vec<HttpRequest> = (0..20)
        .map(|i| HttpRequest::get(&format!("/r/{i}")))
        .collect();
    let answers = lab.http1("a-client", REVIEWS, &reqs).unwrap();
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.text());
        let e = a.echo().unwrap();
        // The endpoint sees the waypoint as its peer, the client in x-forwarded-for.
        assert!(e.peer.starts_with(&format!("{wp}:")), "{e:?}");
        assert_eq!(e.headers["x-forwarded-for"], client.to_string());
        assert_eq!(e.headers["x-forwarded-proto"], "http");
        assert!(e.pod == "a-reviews-v1" || e.pod == "b-reviews-v2", "{e:?}");
    }
    // v2 for sure (the split may give it none of 20: 0.9^20 = 12%).
    let a = lab
        .http1(
            "a-client",
            REVIEWS,
            &[HttpRequest::get("/r/v2").header("x-version", "v2")],
        )
        .unwrap();
    assert_eq!(pod_of(&a[0]), "b-reviews-v2");
    // A direct request to a pod behind the waypoint goes through it too.
    let v1_pod = lab.pod_ip("a-reviews-v1");
    let a = lab.http_get("a-client", (v1_pod, 8080), "/direct").unwrap();
    assert_eq!(pod_of(&a), "a-reviews-v1");

    // The waypoint's access log has each request, with the client's identity.
    let mut lines = Vec::new();
    eventually("22 access-log lines", || {
        lines = lab.waypoint_access_log();
        lines
            .iter()
            .filter(|l| l.contains("path=/r/") || l.contains("path=/direct"))
            .count()
            >= 22
    });
    let line = lines.iter().find(|l| l.contains("path=/r/0")).unwrap();
    for want in [
        "method=GET",
        "code=200",
        &format!("src.identity={}", identity("client")),
        &format!("dst.identity={}", identity("reviews")),
        "upstream=10.244.",
        "route=demo/reviews#1",
    ] {
        assert!(line.contains(want), "{want} not in {line}");
    }
    // Its metrics count them, reported by the waypoint.
    let m = lab.waypoint_metrics().unwrap();
    let n = sample(
        &m,
        "istio_requests_total",
        &[
            "reporter=\"waypoint\"",
            "response_code=\"200\"",
            &format!("source_principal=\"{}\"", identity("client")),
        ],
    );
    assert!(n >= 22.0, "{n}\n{m}");
    assert!(
        m.contains("istio_request_duration_milliseconds_bucket{"),
        "{m}"
    );
    // The destination ztunnels see the waypoint's identity, not the client's.
    let peer_is_waypoint = |zt: &str| {
        let text = lab
            .run_in(zt, || {
                labzt::http_get(ambient_net::consts::port::METRICS, "/metrics")
            })
            .unwrap()
            .unwrap()
            .1;
        sample(
            &text,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"destination\"",
                &format!("source_principal=\"{}\"", identity("waypoint")),
                "destination_workload=\"reviews-v",
            ],
        )
    };
    let (a, b) = (peer_is_waypoint("a-ztunnel"), peer_is_waypoint("b-ztunnel"));
    assert!(a >= 1.0 && b >= 1.0, "ztunnel A {a}, ztunnel B {b}");
}

/// The waypoint pod enrolled like any ambient pod: its node's ztunnel relays the client's
/// tunnel to it untouched and passes its own HBONE on (or terminates it for a pod of its
/// node); the result is the same.
#[test]
fn a_captured_waypoint_works_the_same() {
    let lab = Lab::up(
        &unique_prefix("wpc"),
        LabOptions::new(LAB).waypoint().arg("--waypoint-captured"),
    )
    .expect("lab up");
    assert!(lab.pod("b-waypoint").ambient, "the waypoint is enrolled");
    let reqs: Vec<HttpRequest> = (0..40).map(|_| HttpRequest::get("/c")).collect();
    let answers = lab.http1("a-client", REVIEWS, &reqs).unwrap();
    let pods: std::collections::BTreeSet<String> = answers.iter().map(pod_of).collect();
    assert!(answers.iter().all(|a| a.status == 200));
    // Both endpoints: the one on the waypoint's node (ztunnel B terminates the waypoint's
    // tunnel in-process) and the one on node A (ztunnel B passes it on).
    let v2 = lab
        .http1(
            "a-client",
            REVIEWS,
            &[HttpRequest::get("/c").header("x-version", "v2")],
        )
        .unwrap();
    assert_eq!(pod_of(&v2[0]), "b-reviews-v2");
    assert!(pods.contains("a-reviews-v1"), "{pods:?}");
    assert!(
        in_pod_set(&lab, lab.waypoint_ip()),
        "node B captures the waypoint"
    );
}

/// Whether node B's pod set holds `ip`.
fn in_pod_set(lab: &Lab, ip: Ipv4Addr) -> bool {
    let out = lab
        .exec(
            "nodeB",
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
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).contains(&ip.to_string())
}

#[test]
fn routes_split_match_filter_redirect_rewrite_and_time_out() {
    let lab = lab("wp2");
    configure(
        &lab,
        json!([{
            "name": "reviews", "namespace": "demo",
            "parentRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
            "rules": [
                {"matches": [{"headers": [{"name": "x-version", "value": "v2"}]}],
                 "backendRefs": [{"name": "reviews-v2", "port": 80}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                 "filters": [{"type": "RequestRedirect", "requestRedirect": {"hostname": "reviews.example.com", "statusCode": 301}}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                 "filters": [
                    {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v1/api"}}},
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "x-route", "value": "api"}], "remove": ["x-drop-me"]}},
                    {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-served-by", "value": "waypoint"}]}}],
                 "backendRefs": [{"name": "reviews-v1", "port": 80}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
                 "timeouts": {"request": "300ms"},
                 "backendRefs": [{"name": "reviews-v1", "port": 80}]},
                {"backendRefs": [{"name": "reviews-v1", "port": 80, "weight": 90},
                                 {"name": "reviews-v2", "port": 80, "weight": 10}]}
            ]
        }]),
        json!([]),
    );
    // 90/10 over 1000 requests: v2 ~ Binomial(1000, 0.1), mean 100, sd 9.5; ±5 sd.
    let reqs: Vec<HttpRequest> = (0..1000).map(|_| HttpRequest::get("/split")).collect();
    let answers = lab.http1("a-client", REVIEWS, &reqs).unwrap();
    assert!(answers.iter().all(|a| a.status == 200));
    let v2 = answers
        .iter()
        .filter(|a| pod_of(a) == "b-reviews-v2")
        .count();
    assert!((53..=147).contains(&v2), "v2 answered {v2} of 1000");

    // A header match goes to v2 only.
    let reqs: Vec<HttpRequest> = (0..50)
        .map(|_| HttpRequest::get("/split").header("x-version", "v2"))
        .collect();
    let answers = lab.http1("a-client", REVIEWS, &reqs).unwrap();
    assert!(answers.iter().all(|a| pod_of(a) == "b-reviews-v2"));

    // Filters: the path rewritten, a header added and one removed, a response header set.
    let r = lab
        .http1(
            "a-client",
            REVIEWS,
            &[HttpRequest::get("/api/items?page=2").header("x-drop-me", "1")],
        )
        .unwrap()
        .remove(0);
    let e = r.echo().unwrap();
    assert_eq!(
        (e.pod.as_str(), e.path.as_str()),
        ("a-reviews-v1", "/v1/api/items?page=2")
    );
    assert_eq!(e.headers["x-route"], "api");
    assert!(!e.headers.contains_key("x-drop-me"), "{e:?}");
    assert_eq!(r.header("x-served-by"), Some("waypoint"));

    // A redirect: 301 and where to, nothing reaches a pod.
    let r = lab.http_get("a-client", REVIEWS, "/old/page?q=1").unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("http://reviews.example.com/old/page?q=1")
    );

    // A request timeout: 504 after ~300 ms although the pod would answer after 3 s.
    let start = Instant::now();
    let r = lab
        .http_get("a-client", REVIEWS, "/slow?delay_ms=3000")
        .unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let m = lab.waypoint_metrics().unwrap();
    assert!(
        sample(
            &m,
            "istio_requests_total",
            &["response_code=\"504\"", "response_flags=\"UT\""]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, "istio_requests_total", &["response_code=\"301\""]) >= 1.0,
        "{m}"
    );
}

#[test]
fn l7_policies_deny_a_path_allow_a_method_and_change_without_a_restart() {
    let lab = lab("wp3");
    let pid = lab.waypoint().pid;
    configure(
        &lab,
        lab_default_routes(),
        json!([{
            "name": "no-admin", "namespace": "demo",
            "targetRefs": [{"kind": "Service", "name": "reviews"}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]
        }]),
    );
    let answers = lab
        .http1(
            "a-client",
            REVIEWS,
            &[
                HttpRequest::get("/admin/users"),
                HttpRequest::get("/reviews"),
                HttpRequest::get("/admin"),
            ],
        )
        .unwrap();
    assert_eq!(answers[0].status, 403);
    assert_eq!(answers[0].text(), "RBAC: access denied");
    assert_eq!(answers[1].status, 200);
    assert_eq!(answers[2].status, 403);

    // An ALLOW on a method: only GET (from the client) is admitted, on the same waypoint.
    configure(
        &lab,
        lab_default_routes(),
        json!([{
            "name": "readers", "namespace": "demo",
            "targetRefs": [{"kind": "Service", "name": "reviews"}],
            "rules": [{
                "from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}],
                "to": [{"operation": {"methods": ["GET"]}}]
            }]
        }]),
    );
    let answers = lab
        .http1(
            "a-client",
            REVIEWS,
            &[
                HttpRequest::get("/admin/users"),
                HttpRequest::post("/reviews", "x"),
                HttpRequest::new("DELETE", "/reviews"),
            ],
        )
        .unwrap();
    let codes: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(codes, [200, 403, 403]);
    // A mesh client of another service account is refused.
    let from_app = lab.http_get("b-app", REVIEWS, "/reviews").unwrap();
    assert_eq!(from_app.status, 403);
    // The same process throughout.
    let mut lab = lab;
    assert_eq!(lab.refresh().unwrap().waypoint.as_ref().unwrap().pid, pid);
    let m = lab.waypoint_metrics().unwrap();
    assert!(
        sample(&m, "istio_requests_total", &["response_code=\"403\""]) >= 5.0,
        "{m}"
    );
}

fn lab_default_routes() -> Value {
    ambient_lab::waypoint::default_routes()
}

#[test]
fn http1_keep_alive_http2_upgrades_and_a_100_mb_body() {
    let lab = lab("wp4");
    // HTTP/2 prior knowledge: concurrent streams of one connection, HTTP/2 to the pod too.
    let reqs: Vec<HttpRequest> = (0..16)
        .map(|i| HttpRequest::get(&format!("/h2/{i}")).header("x-version", "v2"))
        .collect();
    let answers = lab.h2c("a-client", REVIEWS, &reqs).unwrap();
    for a in &answers {
        assert_eq!(a.status, 200);
        let e = a.echo().unwrap();
        assert_eq!(
            (e.pod.as_str(), e.protocol.as_str()),
            ("b-reviews-v2", "HTTP/2.0")
        );
    }
    // HTTP/1.1 keep-alive: one connection to the pod carries many requests (the waypoint
    // reuses its upstream connection: the pod sees one peer port).
    let reqs: Vec<HttpRequest> = (0..30)
        .map(|_| HttpRequest::get("/ka").header("x-version", "v2"))
        .collect();
    let answers = lab.http1("a-client", REVIEWS, &reqs).unwrap();
    let peers: std::collections::BTreeSet<String> =
        answers.iter().map(|a| a.echo().unwrap().peer).collect();
    assert_eq!(peers.len(), 1, "{peers:?}");
    // An upgrade is passed through: after the 101 the bytes are echoed.
    let (code, back) = lab
        .http_upgrade_echo(
            "a-client",
            (REVIEWS_V1_IP, 80),
            "/ws",
            b"raw bytes after the upgrade",
        )
        .unwrap();
    assert_eq!(code, 101);
    assert_eq!(back, b"raw bytes after the upgrade");
    // 100 MB up, streamed through both tunnels, intact.
    const N: u64 = 100 * 1024 * 1024;
    let r = lab
        .http1(
            "a-client",
            (REVIEWS_V1_IP, 80),
            &[HttpRequest::post_pattern("/upload", N)],
        )
        .unwrap()
        .remove(0);
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.echo().unwrap();
    assert_eq!(e.body_bytes, N);
    assert_eq!(e.body_fnv64, pattern_fnv64(N).hex());
    // And 20 MB down.
    let r = lab
        .http1(
            "a-client",
            (REVIEWS_V1_IP, 80),
            &[HttpRequest::get("/download?bytes=20971520")],
        )
        .unwrap()
        .remove(0);
    assert_eq!(r.body_len, 20 * 1024 * 1024);
    assert_eq!(Some(r.body_fnv64.as_str()), r.header("x-body-fnv64"));
    // Request and response sizes are in the histograms.
    let m = lab.waypoint_metrics().unwrap();
    assert!(
        sample(&m, "istio_request_bytes_sum", &[]) >= N as f64,
        "{m}"
    );
}

/// TLS + HTTP/2 from the calling thread's netns to `addr` as `client`, expecting `server`,
/// and one CONNECT for `authority`: its status.
fn connect_status(
    ca: &Ca,
    client: &Identity,
    server: &Identity,
    addr: SocketAddr,
    authority: SocketAddr,
) -> Result<u16, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cert = ca
            .mint_workload_cert(
                client,
                SystemTime::now() - Duration::from_secs(60),
                Duration::from_secs(3600),
            )
            .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root_der().clone()).unwrap();
        let send = ztunnel::client::connect(
            std::sync::Arc::new(roots),
            cert.certified.clone(),
            vec![server.clone()],
            addr,
        )
        .await?;
        let req = ConnectRequest {
            authority,
            headers: http::HeaderMap::new(),
        };
        match tokio::time::timeout(Duration::from_secs(5), ztunnel::client::open(&send, &req)).await
        {
            Err(_) => Err("no answer".into()),
            Ok(Ok(_)) => Ok(200),
            Ok(Err(Ok(status))) => Ok(status.as_u16()),
            Ok(Err(Err(e))) => Err(e),
        }
    })
}

#[test]
fn a_direct_hbone_connect_that_bypasses_the_waypoint_is_refused() {
    let lab = lab("wp5");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let (ca, _) =
        Ca::load_or_create(&state.run_dir.join(labzt::CA_DIR), labzt::TRUST_DOMAIN).unwrap();
    let v2 = lab.pod_ip("b-reviews-v2");
    let hbone = SocketAddr::new(v2.into(), 15008);
    let target = SocketAddr::new(v2.into(), 8080);
    let id = |sa: &str| Identity::new(labzt::TRUST_DOMAIN, "demo", sa);
    let ca = &ca;
    // A mesh client speaking HBONE itself to the pod behind the waypoint: its node passes the
    // connection through (no HBONE in HBONE), ztunnel B refuses it (401).
    let r = lab
        .run_in("a-client", move || {
            connect_status(ca, &id("client"), &id("reviews"), hbone, target)
        })
        .unwrap();
    assert_eq!(r, Ok(401));
    // The same from outside the mesh.
    let r = lab
        .run_in("a-plain", move || {
            connect_status(ca, &id("client"), &id("reviews"), hbone, target)
        })
        .unwrap();
    assert_eq!(r, Ok(401));
    // With the waypoint's identity the same CONNECT is admitted (the control).
    let r = lab
        .run_in("a-plain", move || {
            connect_status(ca, &id("waypoint"), &id("reviews"), hbone, target)
        })
        .unwrap();
    assert_eq!(r, Ok(200));
    // The waypoint is no open proxy: a CONNECT for something it does not serve is 400.
    let wp = SocketAddr::new(lab.waypoint_ip().into(), 15008);
    let elsewhere = SocketAddr::new(lab.pod_ip("b-app").into(), 9080);
    let r = lab
        .run_in("a-plain", move || {
            connect_status(ca, &id("client"), &id("waypoint"), wp, elsewhere)
        })
        .unwrap();
    assert_eq!(r, Ok(400));
    // Plaintext from outside the mesh straight to the pod behind the waypoint: ztunnel B refuses
    // it at 15006 (it would skip the waypoint's L7 policy); a pod no waypoint covers answers.
    let r = lab.http_get("a-plain", target, "/");
    assert!(r.is_err(), "plaintext bypassed the waypoint: {r:?}");
    let app_http = SocketAddr::new(lab.pod_ip("b-app").into(), 8080);
    assert_eq!(lab.http_get("a-plain", app_http, "/").unwrap().status, 200);
}
