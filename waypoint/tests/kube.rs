//! `waypoint --kube` against the node agent's in-process fake API server (the real list/watch
//! protocol, resourceVersions, 410 Gone, the status subresource), no root:
//!
//! * the watchers alone ([`waypoint::kube::start`]): binding by the namespace's
//!   `istio.io/use-waypoint`, HTTPRoute `parentRefs` (a bound Service, the waypoint's Gateway,
//!   others' parents left alone), AuthorizationPolicy `targetRefs` (selector and untargeted
//!   policies are ztunnel's), route status written (Accepted / ResolvedRefs, observedGeneration,
//!   our controllerName; a bad route refused with its error, the rest working), updates,
//!   deletes, unbinding, a re-list after 410;
//! * end to end on loopback (127.80.N.x): ztunnel A (the client's node), the waypoint and the
//!   ztunnels of reviews-v1 and reviews-v2, all fed only by the fake server: HTTP from the
//!   client to the reviews VIP goes through the discovered waypoint (the Gateway's Service VIP →
//!   its pod) and is split 90/10 by an HTTPRoute.

#[path = "../../node-agent/tests/common/fake_apiserver.rs"]
mod fake_apiserver;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_apiserver::{endpoint_slice, merge_patch, namespace, pod, service, FakeApiServer, Kind};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use waypoint::kube::{KubeHandle, Who, CONTROLLER_NAME};
use waypoint::state::WaypointState;
use ztunnel::config::CertSource;
use ztunnel::discovery::Params;

const GW: &str = "gateway.networking.k8s.io/gateway-name";

fn params() -> Params {
    Params {
        cluster_domain: "cluster.local".into(),
        excluded_namespaces: ["kube-system".to_string()].into(),
    }
}

fn who() -> Who {
    Who {
        gateway_namespace: "demo".into(),
        gateway_name: "waypoint".into(),
        pod_name: "waypoint-0".into(),
    }
}

fn gateway(class: &str) -> Value {
    json!({
        "kind": "Gateway", "apiVersion": "gateway.networking.k8s.io/v1",
        "metadata": {"name": "waypoint", "namespace": "demo"},
        "spec": {"gatewayClassName": class,
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

fn route(name: &str, parents: Value, rules: Value) -> Value {
    json!({
        "kind": "HTTPRoute", "apiVersion": "gateway.networking.k8s.io/v1",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"parentRefs": parents, "rules": rules},
    })
}

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "kind": "AuthorizationPolicy", "apiVersion": "security.istio.io/v1",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": spec,
    })
}

fn weighted() -> Value {
    json!([{"backendRefs": [
        {"name": "reviews-v1", "port": 80, "weight": 90},
        {"name": "reviews-v2", "port": 80, "weight": 10},
    ]}])
}

/// demo (ambient, bound to the waypoint by its namespace label): the waypoint (pod, Service
/// with its Gateway's label, Gateway), reviews → reviews-v1 / reviews-v2 (one pod each, port 80
/// → `port` on the pods). `ip(h)` gives the addresses.
fn cluster(f: &FakeApiServer, ip: impl Fn(u8) -> String, port: u16) {
    f.put(namespace(
        "demo",
        json!({"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "waypoint"}),
    ));
    f.put(namespace("other", json!({})));
    f.put(pod(
        "demo",
        "sleep",
        "node-a",
        &ip(11),
        json!({"spec": {"serviceAccountName": "sleep"}}),
    ));
    f.put(pod(
        "demo",
        "waypoint-0",
        "node-w",
        &ip(9),
        json!({"metadata": {"labels": {GW: "waypoint"}}, "spec": {"serviceAccountName": "waypoint"}}),
    ));
    let mut wsvc = service(
        "demo",
        "waypoint",
        &ip(90),
        &[("mesh", 15008, json!(15008))],
    );
    merge_patch(
        &mut wsvc,
        &json!({"metadata": {"labels": {GW: "waypoint"}}}),
    );
    f.put(wsvc);
    f.put(endpoint_slice(
        "demo",
        "waypoint-x",
        "waypoint",
        &[("mesh", 15008)],
        &[(&ip(9), true, Some("waypoint-0"))],
    ));
    for (n, h, vip) in [("v1", 21u8, 101u8), ("v2", 22, 102)] {
        let pname = format!("reviews-{n}");
        f.put(pod(
            "demo",
            &pname,
            &format!("node-b{}", &n[1..]),
            &ip(h),
            json!({"spec": {"serviceAccountName": "reviews"}}),
        ));
        f.put(service(
            "demo",
            &pname,
            &ip(vip),
            &[("http", 80, json!(port))],
        ));
        f.put(endpoint_slice(
            "demo",
            &format!("{pname}-x"),
            &pname,
            &[("http", port)],
            &[(&ip(h), true, Some(&pname))],
        ));
    }
    f.put(service(
        "demo",
        "reviews",
        &ip(100),
        &[("http", 80, json!(port))],
    ));
    f.put(endpoint_slice(
        "demo",
        "reviews-x",
        "reviews",
        &[("http", port)],
        &[
            (&ip(21), true, Some("reviews-v1")),
            (&ip(22), true, Some("reviews-v2")),
        ],
    ));
    f.put(gateway("istio-waypoint"));
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: not in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn current(h: &KubeHandle) -> Arc<WaypointState> {
    h.states.borrow().clone().expect("synced")
}

/// Our status entries of a route: parent name → (Accepted, ResolvedRefs, reason, message,
/// observedGeneration).
fn our_status(f: &FakeApiServer, name: &str) -> Vec<(String, String, String, String, i64)> {
    let r = f.get(Kind::HttpRoute, "demo", name).unwrap();
    r["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .map(|p| {
            let c = |t: &str| {
                p["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["type"] == t)
                    .cloned()
                    .unwrap_or_default()
            };
            (
                p["parentRef"]["name"].as_str().unwrap().to_string(),
                format!(
                    "{}/{}",
                    c("Accepted")["status"].as_str().unwrap(),
                    c("ResolvedRefs")["status"].as_str().unwrap()
                ),
                c("Accepted")["reason"].as_str().unwrap().to_string(),
                c("Accepted")["message"].as_str().unwrap().to_string(),
                c("Accepted")["observedGeneration"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_policies_and_status_from_the_api_server() {
    let fake = FakeApiServer::start().await;
    let ip = |h: u8| format!("10.3.0.{h}");
    cluster(&fake, ip, 8080);
    // Someone else's status entry on the route: kept.
    let mut reviews = route(
        "reviews",
        json!([{"group": "", "kind": "Service", "name": "reviews"}]),
        weighted(),
    );
    reviews["status"] = json!({"parents": [{"controllerName": "example.com/other",
        "parentRef": {"name": "elsewhere"}, "conditions": []}]});
    fake.put(reviews);
    fake.put(route(
        "by-gateway",
        json!([{"name": "waypoint"}]),
        json!([{"matches": [{"headers": [{"name": "x-version", "value": "v2"}]}],
                "backendRefs": [{"name": "reviews-v2", "port": 80}]}]),
    ));
    fake.put(route(
        "broken",
        json!([{"group": "", "kind": "Service", "name": "reviews"}]),
        json!([{"backendRefs": [{"name": "nope", "port": 80}]}]),
    ));
    fake.put(route(
        "not-ours",
        json!([{"group": "", "kind": "Service", "name": "elsewhere", "namespace": "other"}]),
        weighted(),
    ));
    fake.put(policy(
        "no-admin",
        json!({"targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}], "action": "DENY",
               "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
    ));
    fake.put(policy(
        "gateway-wide",
        json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
               "rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]}),
    ));
    // ztunnel's: a selector, no targets.
    fake.put(policy(
        "l4",
        json!({"selector": {"matchLabels": {"app": "reviews"}}, "action": "DENY", "rules": [{}]}),
    ));
    fake.put(policy("ns-wide", json!({"action": "DENY", "rules": [{}]})));

    let client = ztunnel::discovery::client(Some(&fake.url())).await.unwrap();
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let mut h = waypoint::kube::start(client, params(), who(), "cluster.local".into(), stop);
    tokio::time::timeout(Duration::from_secs(10), h.states.wait_for(|s| s.is_some()))
        .await
        .expect("first sync within 10 s")
        .unwrap();
    let st = current(&h);
    assert_eq!(
        st.identity().to_string(),
        "spiffe://cluster.local/ns/demo/sa/waypoint"
    );
    // The namespace label bound reviews, -v1, -v2 to the waypoint's Service.
    assert_eq!(st.served.len(), 3, "{:?}", st.served);
    let attached: Vec<&str> = st
        .routes
        .attachments
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert!(
        attached.contains(&"demo/reviews") && attached.contains(&"demo/by-gateway"),
        "{attached:?}"
    );
    assert!(!attached.contains(&"demo/broken") && !attached.contains(&"demo/not-ours"));
    let mut pols: Vec<String> = st.policies.iter().map(|p| p.key()).collect();
    pols.sort();
    assert_eq!(pols, ["demo/gateway-wide", "demo/no-admin"]);

    // Status: written per parent, with our controllerName; the other controller's kept.
    until("statuses", || {
        !our_status(&fake, "reviews").is_empty() && !our_status(&fake, "broken").is_empty()
    })
    .await;
    let s = our_status(&fake, "reviews");
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(
        (s[0].0.as_str(), s[0].1.as_str(), s[0].2.as_str(), s[0].4),
        ("reviews", "True/True", "Accepted", 1)
    );
    let r = fake.get(Kind::HttpRoute, "demo", "reviews").unwrap();
    assert!(
        r["status"]["parents"]
            .to_string()
            .contains("example.com/other"),
        "{r}"
    );
    let s = our_status(&fake, "by-gateway");
    assert_eq!(
        (s[0].0.as_str(), s[0].1.as_str()),
        ("waypoint", "True/True")
    );
    let s = our_status(&fake, "broken");
    assert_eq!(
        (s[0].1.as_str(), s[0].2.as_str()),
        ("False/False", "UnsupportedValue")
    );
    assert!(
        s[0].3.contains("spec.rules[0].backendRefs[0]") && s[0].3.contains("nope"),
        "{}",
        s[0].3
    );
    assert!(our_status(&fake, "not-ours").is_empty());
    let patches = fake.patches().len();

    // An update: applied within a second, observedGeneration follows; the fixed route is
    // accepted. No status write when nothing changed.
    let t0 = Instant::now();
    fake.update(Kind::HttpRoute, "demo", "broken", |o| {
        o["spec"]["rules"][0]["backendRefs"][0]["name"] = json!("reviews-v1");
    });
    until("fixed route", || {
        current(&h)
            .routes
            .attachments
            .iter()
            .any(|(k, _)| k == "demo/broken")
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    until("fixed status", || {
        our_status(&fake, "broken")
            .first()
            .is_some_and(|s| s.1 == "True/True" && s.4 == 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.patches().len(), patches + 1, "{:?}", fake.patches());

    // A policy deleted, a rule field the waypoint does not know (fail closed, noted).
    fake.delete(Kind::AuthorizationPolicy, "demo", "gateway-wide");
    fake.update(Kind::AuthorizationPolicy, "demo", "no-admin", |o| {
        o["spec"]["rules"][0]["to"][0]["operation"]["verbs"] = json!(["GET"]);
    });
    until("policies", || {
        let st = current(&h);
        st.policies.len() == 1
            && serde_json::to_string(&st.policies[0])
                .unwrap()
                .contains("\"rules\":[{")
            && h.status.lock().unwrap()["notes"]
                .to_string()
                .contains("verbs")
    })
    .await;

    // The Gateway of another class: routes naming it are not accepted (NoMatchingParent).
    fake.put(gateway("other-class"));
    until("gateway refused", || {
        our_status(&fake, "by-gateway")
            .first()
            .is_some_and(|s| s.2 == "NoMatchingParent")
    })
    .await;
    fake.put(gateway("istio-waypoint"));

    // A re-list after 410 sees a route deleted during the gap.
    fake.hold_events(true);
    fake.delete(Kind::HttpRoute, "demo", "by-gateway");
    fake.compact();
    fake.expire_watches();
    fake.hold_events(false);
    until("re-listed", || {
        !current(&h)
            .routes
            .attachments
            .iter()
            .any(|(k, _)| k == "demo/by-gateway")
    })
    .await;

    // The namespace unbound: nothing served, our entries removed, the other's kept.
    fake.label_namespace("demo", "istio.io/use-waypoint", None);
    until("unbound", || {
        current(&h).served.is_empty() && our_status(&fake, "reviews").is_empty()
    })
    .await;
    assert!(current(&h).routes.attachments.is_empty());
    let r = fake.get(Kind::HttpRoute, "demo", "reviews").unwrap();
    assert!(
        r["status"]["parents"]
            .to_string()
            .contains("example.com/other"),
        "{r}"
    );
}

// ------------------------------------------------------------------------------------------
// End to end on loopback.

fn lip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 80, net, host))
}

/// An HTTP/1.1 server answering its name to every request (one per connection).
async fn named_server(addr: IpAddr, port: u16, name: &'static str) {
    let l = tokio::net::TcpListener::bind(SocketAddr::new(addr, port))
        .await
        .unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
}

async fn get_via(src: IpAddr, outbound: SocketAddr) -> String {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    let mut s = sock.connect(outbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_through_a_discovered_waypoint_with_a_weighted_route() {
    let net = 1;
    let ip = |h: u8| lip(net, h);
    let port = 18080;
    named_server(ip(21), port, "reviews-v1").await;
    named_server(ip(22), port, "reviews-v2").await;
    let fake = FakeApiServer::start().await;
    cluster(&fake, |h| ip(h).to_string(), port);
    fake.put(route(
        "reviews",
        json!([{"group": "", "kind": "Service", "name": "reviews"}]),
        weighted(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    ztunnel::identity::Ca::load_or_create(&ca_dir, "cluster.local").unwrap();
    let url = fake.url();
    let mut ztunnels = Vec::new();
    for (node, host) in [("node-a", 1u8), ("node-b1", 21), ("node-b2", 22)] {
        let mut cfg =
            ztunnel::config::Config::new_kube(&url, None, node, CertSource::Ca(ca_dir.clone()))
                .on_loopback(ip(host));
        cfg.connect_timeout = Duration::from_secs(2);
        if node == "node-a" {
            cfg.outbound_orig_dst = Some(SocketAddr::new(ip(100), 80));
        } else {
            cfg.inbound_addrs = vec![SocketAddr::new(ip(host), 15008)];
        }
        ztunnels.push(
            ztunnel::app::start(cfg, tokio::runtime::Handle::current())
                .await
                .unwrap(),
        );
    }
    let mut cfg = waypoint::config::Config::for_tests(
        dir.path().join("unused"),
        CertSource::Ca(ca_dir.clone()),
        ip(9),
    );
    cfg.config_file = None;
    cfg.kube = Some(waypoint::config::KubeConfig {
        api_url: Some(url.clone()),
        who: who(),
        cluster_domain: "cluster.local".into(),
        excluded_namespaces: vec!["kube-system".into()],
    });
    cfg.hbone_addrs = vec![SocketAddr::new(ip(9), 15008)];
    cfg.connect_timeout = Duration::from_secs(2);
    let wp = tokio::time::timeout(
        Duration::from_secs(15),
        waypoint::app::start(cfg, tokio::runtime::Handle::current()),
    )
    .await
    .expect("the waypoint syncs within 15 s")
    .unwrap();
    let a = &ztunnels[0];
    until("ztunnel A sees the waypoint binding", || {
        a.state
            .get()
            .service_by_vip(ip(100))
            .is_some_and(|s| s.waypoint.as_ref().is_some_and(|w| w.address == ip(90)))
    })
    .await;
    until("the route is attached", || {
        wp.state
            .get()
            .routes
            .attachments
            .iter()
            .any(|(k, _)| k == "demo/reviews")
    })
    .await;
    for z in &ztunnels {
        until("ztunnels ready", || {
            z.state
                .status()
                .discovery
                .as_ref()
                .is_some_and(|d| d["synced"] == true)
        })
        .await;
    }

    let (mut v1, mut v2) = (0, 0);
    let n = 300;
    for _ in 0..n {
        let answer = get_via(ip(11), a.addrs.outbound).await;
        if answer.ends_with("reviews-v1") {
            v1 += 1;
        } else if answer.ends_with("reviews-v2") {
            v2 += 1;
        } else {
            panic!("unexpected answer: {answer:?}");
        }
    }
    // 90/10 within 4 standard deviations (sd = sqrt(300 * 0.1 * 0.9) ≈ 5.2).
    assert_eq!(v1 + v2, n);
    assert!((10..=51).contains(&v2), "v1 {v1} v2 {v2}");
    // It went through the waypoint: its metrics count the requests.
    let m = wp.metrics.encode();
    let through: u64 = m
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(through, n as u64, "{m}");

    // A route change applies within a second: everything to v2.
    fake.update(Kind::HttpRoute, "demo", "reviews", |o| {
        o["spec"]["rules"] = json!([{"backendRefs": [{"name": "reviews-v2", "port": 80}]}]);
    });
    let t0 = Instant::now();
    loop {
        if get_via(ip(11), a.addrs.outbound)
            .await
            .ends_with("reviews-v2")
            && get_via(ip(11), a.addrs.outbound)
                .await
                .ends_with("reviews-v2")
            && get_via(ip(11), a.addrs.outbound)
                .await
                .ends_with("reviews-v2")
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "route change not applied"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    wp.shutdown().await;
}
