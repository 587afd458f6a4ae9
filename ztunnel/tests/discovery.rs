//! Kubernetes mode (`--kube`) against the node agent's in-process fake API server (the real
//! list/watch protocol: JSON lists and watch events, resourceVersions, 410 Gone), without
//! root:
//!
//! * discovery alone, into a [`StateHandle`]: pods + namespaces + services + EndpointSlices →
//!   workloads (HBONE vs TCP) and services (VIP → ready endpoints with their target port);
//!   updates (namespace relabelled, opt-out, endpoint not ready, pod and service deleted, new
//!   pod); a re-list after a 410 `ERROR` event and after a watch request answered with HTTP
//!   410, both with changes made while the watch was stalled;
//! * two ztunnels in this process fed only by the fake server carrying a connection over
//!   HBONE through a service VIP; readiness and accepting only after the first sync; a policy
//!   file next to `--kube`; `/config_dump`.

#[path = "../../node-agent/tests/common/fake_apiserver.rs"]
mod fake_apiserver;

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_net::consts::port;
use common::{connect_from, http_get, init_log, payload, tcp_echo, Mesh};
use fake_apiserver::{endpoint_slice, namespace, pod, service, FakeApiServer, Kind};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use ztunnel::config::{CertSource, Config, Protocol};
use ztunnel::discovery::{self, Params};
use ztunnel::proxy::outbound::{route, Route};
use ztunnel::state::{State, StateHandle, Workload};

const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const OPT_OUT: (&str, &str) = ("ambient.istio.io/redirection", "disabled");
const ECHO_KEY: &str = "demo/echo.demo.svc.cluster.local";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(name: &str) -> Value {
    json!({"spec": {"serviceAccountName": name}})
}

/// demo (ambient): sleep on node-a, echo-0/1 on node-b behind service echo (port 80 → the
/// named port `http-alt`, 8080 on the pods); legacy (not ambient): old; kube-system (labelled,
/// but excluded): dns; a hostNetwork pod; default/kubernetes whose endpoint is no pod.
fn cluster(f: &FakeApiServer) {
    f.put(namespace("demo", json!({AMBIENT.0: AMBIENT.1})));
    f.put(namespace("legacy", json!({})));
    f.put(namespace("kube-system", json!({AMBIENT.0: AMBIENT.1})));
    f.put(namespace("default", json!({})));
    f.put(pod("demo", "sleep", "node-a", "10.1.0.1", sa("sleep")));
    f.put(pod("demo", "echo-0", "node-b", "10.1.1.1", sa("echo")));
    f.put(pod("demo", "echo-1", "node-b", "10.1.1.2", sa("echo")));
    f.put(pod("legacy", "old", "node-a", "10.1.0.9", json!({})));
    f.put(pod("kube-system", "dns", "node-a", "10.1.0.53", json!({})));
    f.put(pod(
        "demo",
        "hostnet",
        "node-a",
        "192.0.2.1",
        json!({"spec": {"hostNetwork": true}}),
    ));
    f.put(service(
        "demo",
        "echo",
        "10.96.0.10",
        &[("http", 80, json!("http-alt"))],
    ));
    f.put(endpoint_slice(
        "demo",
        "echo-abcde",
        "echo",
        &[("http", 8080)],
        &[
            ("10.1.1.1", true, Some("echo-0")),
            ("10.1.1.2", true, Some("echo-1")),
        ],
    ));
    f.put(service(
        "default",
        "kubernetes",
        "10.96.0.1",
        &[("https", 443, json!(6443))],
    ));
    f.put(endpoint_slice(
        "default",
        "kubernetes",
        "kubernetes",
        &[("https", 6443)],
        &[("192.0.2.100", true, None)],
    ));
}

fn params() -> Params {
    Params {
        cluster_domain: "cluster.local".into(),
        excluded_namespaces: ["kube-system".to_string()].into(),
    }
}

struct Harness {
    fake: FakeApiServer,
    state: StateHandle,
    stop: CancellationToken,
}

impl Harness {
    async fn start() -> Harness {
        init_log();
        let fake = FakeApiServer::start().await;
        cluster(&fake);
        let state = StateHandle::load_for_discovery(None, "cluster.local", "node-a").unwrap();
        let client = discovery::client(Some(&fake.url())).await.unwrap();
        let stop = CancellationToken::new();
        let mut synced = discovery::start(client, params(), state.clone(), stop.clone());
        tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s))
            .await
            .expect("first sync within 10 s")
            .unwrap();
        Harness { fake, state, stop }
    }

    fn get(&self) -> Arc<State> {
        self.state.get()
    }

    /// Waits (up to 10 s) until `f` holds for the current state.
    async fn until(&self, what: &str, f: impl Fn(&State) -> bool) {
        let t0 = Instant::now();
        while !f(&self.get()) {
            if t0.elapsed() > Duration::from_secs(10) {
                let st = self.get();
                panic!(
                    "{what}: not reached in 10 s; workloads {:#?} services {:#?} status {}",
                    st.workloads,
                    st.services,
                    serde_json::to_string_pretty(&self.state.status()).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn status(&self) -> Value {
        serde_json::to_value(self.state.status()).unwrap()["discovery"].clone()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn workload(st: &State, addr: &str) -> Option<Arc<Workload>> {
    st.workload_by_ip(ip(addr)).cloned()
}

fn protocol(st: &State, addr: &str) -> Option<Protocol> {
    workload(st, addr).map(|w| w.protocol)
}

fn endpoints(st: &State, vip: &str) -> Option<Vec<String>> {
    let svc = st.service_by_vip(ip(vip))?;
    let mut uids: Vec<String> = st.endpoints(svc).iter().map(|w| w.uid.clone()).collect();
    uids.sort();
    Some(uids)
}

/// Where a connection from sleep to `dst` goes.
fn route_from_sleep(st: &State, dst: &str) -> Result<Route, String> {
    let sleep = workload(st, "10.1.0.1").expect("sleep");
    route(
        st,
        &sleep,
        dst.parse().unwrap(),
        &mut fastrand::Rng::with_seed(7),
    )
    .map_err(|e| e.to_string())
}

fn list_requests(f: &FakeApiServer, path: &str) -> usize {
    f.requests()
        .iter()
        .filter(|r| r.starts_with(&format!("GET {path}")) && !r.contains("watch=true"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_namespaces_services_and_slices_become_the_state() {
    let h = Harness::start().await;
    let st = h.get();
    let sleep = workload(&st, "10.1.0.1").unwrap();
    assert_eq!(sleep.uid, "demo/sleep");
    assert_eq!(sleep.protocol, Protocol::Hbone);
    assert_eq!(sleep.node, "node-a");
    assert_eq!(
        sleep.identity.to_string(),
        "spiffe://cluster.local/ns/demo/sa/sleep"
    );
    assert_eq!(protocol(&st, "10.1.1.1"), Some(Protocol::Hbone));
    // Not ambient, excluded, hostNetwork: plain TCP.
    assert_eq!(protocol(&st, "10.1.0.9"), Some(Protocol::Tcp));
    assert_eq!(protocol(&st, "10.1.0.53"), Some(Protocol::Tcp));
    assert_eq!(protocol(&st, "192.0.2.1"), Some(Protocol::Tcp));
    // The service: VIP → the two ready pods, port 80 → 8080 (the named port's number).
    let svc = st.service_by_vip(ip("10.96.0.10")).unwrap();
    assert_eq!(svc.hostname, "echo.demo.svc.cluster.local");
    assert_eq!(
        endpoints(&st, "10.96.0.10").unwrap(),
        ["demo/echo-0", "demo/echo-1"]
    );
    match route_from_sleep(&st, "10.96.0.10:80").unwrap() {
        Route::Hbone {
            tunnel,
            authority,
            identities,
            service,
            ..
        } => {
            assert_eq!(authority.port(), 8080);
            assert_eq!(tunnel, SocketAddr::new(authority.ip(), port::INBOUND_HBONE));
            assert_eq!(
                identities[0].to_string(),
                "spiffe://cluster.local/ns/demo/sa/echo"
            );
            assert_eq!(service.as_deref(), Some(ECHO_KEY));
        }
        r => panic!("{r:?}"),
    }
    // A service whose endpoint is no pod is left to kube-proxy.
    assert!(st.service_by_vip(ip("10.96.0.1")).is_none());
    assert!(matches!(
        route_from_sleep(&st, "10.96.0.1:443").unwrap(),
        Route::Passthrough { .. }
    ));
    // Certificates for this node's workloads only.
    let ids: Vec<String> = st
        .local_identities()
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert!(ids.contains(&"spiffe://cluster.local/ns/demo/sa/sleep".to_string()));
    assert!(!ids.iter().any(|i| i.ends_with("/sa/echo")));
    // The status for the dump.
    let s = h.status();
    assert_eq!(s["synced"], true);
    assert_eq!(s["resources"]["pods"]["count"], 6);
    assert_eq!(s["resources"]["endpointslices"]["listed"], true);
    assert_eq!(s["lastBuild"]["services"], 1);
    assert!(
        s["notes"][0]
            .as_str()
            .unwrap()
            .contains("default/kubernetes"),
        "{s}"
    );
}

/// A dual-stack pod (`status.podIPs` of both families), a v6-only pod, a dual-stack Service
/// (`spec.clusterIPs` v4 + v6) with an IPv4 and an IPv6 EndpointSlice, and a v6-only Service:
/// one workload per pod indexed by each IP, one service per VIP, endpoints of the VIP's family.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_pods_services_and_slices() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let h = Harness::start().await;
        let f = &h.fake;
        let ips = |v: &[&str]| json!(v.iter().map(|i| json!({"ip": i})).collect::<Vec<_>>());
        f.update(Kind::Pod, "demo", "sleep", |p| {
            p["status"]["podIPs"] = ips(&["10.1.0.1", "fd00:10::1"]);
        });
        f.put(pod(
            "demo",
            "dual",
            "node-b",
            "10.1.2.1",
            json!({"spec": {"serviceAccountName": "echo"},
                   "status": {"podIPs": ips(&["10.1.2.1", "fd00:10:2::1"])}}),
        ));
        f.put(pod("demo", "only6", "node-b", "fd00:10:2::2", sa("echo")));
        let mut svc = service("demo", "dual", "10.96.0.60", &[("http", 80, json!(8080))]);
        svc["spec"]["clusterIPs"] = json!(["10.96.0.60", "fd00:96::60"]);
        svc["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
        svc["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
        f.put(svc);
        f.put(endpoint_slice(
            "demo",
            "dual-v4",
            "dual",
            &[("http", 8080)],
            &[("10.1.2.1", true, Some("dual"))],
        ));
        let mut v6 = endpoint_slice(
            "demo",
            "dual-v6",
            "dual",
            &[("http", 8080)],
            &[
                ("fd00:10:2::1", true, Some("dual")),
                ("fd00:10:2::2", true, Some("only6")),
            ],
        );
        v6["addressType"] = json!("IPv6");
        f.put(v6);
        let mut svc6 = service("demo", "v6", "fd00:96::61", &[("http", 80, json!(8080))]);
        svc6["spec"]["ipFamilies"] = json!(["IPv6"]);
        f.put(svc6);
        let mut s6 = endpoint_slice(
            "demo",
            "v6-1",
            "v6",
            &[("http", 8080)],
            &[("fd00:10:2::2", true, Some("only6"))],
        );
        s6["addressType"] = json!("IPv6");
        f.put(s6);
        h.until("dual-stack objects built", |st| {
            endpoints(st, "fd00:96::60").is_some_and(|e| e.len() == 2)
                && endpoints(st, "fd00:96::61").is_some()
                && workload(st, "fd00:10::1").is_some()
        })
        .await;
        let st = h.get();
        // One workload per pod, found by each of its addresses.
        let dual = workload(&st, "fd00:10:2::1").unwrap();
        assert_eq!(dual.uid, "demo/dual");
        assert_eq!(dual.workload_ips, [ip("10.1.2.1"), ip("fd00:10:2::1")]);
        assert_eq!(workload(&st, "10.1.2.1").unwrap().uid, "demo/dual");
        assert_eq!(workload(&st, "fd00:10::1").unwrap().uid, "demo/sleep");
        assert_eq!(protocol(&st, "fd00:10:2::2"), Some(Protocol::Hbone));
        // One service, both VIPs; the endpoints of both slices (the dual pod once).
        let by4 = st.service_by_vip(ip("10.96.0.60")).unwrap();
        let by6 = st.service_by_vip(ip("fd00:96::60")).unwrap();
        assert_eq!(by4.key(), by6.key());
        assert_eq!(by4.vips, [ip("10.96.0.60"), ip("fd00:96::60")]);
        assert_eq!(
            endpoints(&st, "fd00:96::60").unwrap(),
            ["demo/dual", "demo/only6"]
        );
        assert_eq!(endpoints(&st, "fd00:96::61").unwrap(), ["demo/only6"]);
        // Each VIP's connections stay in its family.
        let sleep = workload(&st, "fd00:10::1").unwrap();
        let mut rng = fastrand::Rng::with_seed(11);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            for vip in ["[fd00:96::60]:80", "10.96.0.60:80", "[fd00:96::61]:80"] {
                let dst: SocketAddr = vip.parse().unwrap();
                match route(&st, &sleep, dst, &mut rng).unwrap() {
                    Route::Hbone {
                        tunnel, authority, ..
                    } => {
                        assert_eq!(authority.is_ipv4(), dst.is_ipv4(), "{vip} → {authority}");
                        assert_eq!(authority.port(), 8080);
                        assert_eq!(tunnel, SocketAddr::new(authority.ip(), port::INBOUND_HBONE));
                        seen.insert((vip, authority.ip()));
                    }
                    r => panic!("{vip}: {r:?}"),
                }
            }
        }
        let want: std::collections::BTreeSet<_> = [
            ("10.96.0.60:80", ip("10.1.2.1")),
            ("[fd00:96::60]:80", ip("fd00:10:2::1")),
            ("[fd00:96::60]:80", ip("fd00:10:2::2")),
            ("[fd00:96::61]:80", ip("fd00:10:2::2")),
        ]
        .into();
        assert_eq!(seen, want);
    })
    .await
    .expect("within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_follow_the_api_server() {
    let h = Harness::start().await;
    let f = &h.fake;

    // The namespace loses its label: its pods leave the mesh, the VIP passes through to a pod.
    f.label_namespace("demo", AMBIENT.0, None);
    h.until("demo not ambient", |st| {
        protocol(st, "10.1.1.1") == Some(Protocol::Tcp)
    })
    .await;
    match route_from_sleep(&h.get(), "10.96.0.10:80").unwrap() {
        Route::Passthrough {
            target, service, ..
        } => {
            assert_eq!(target.port(), 8080);
            assert_eq!(service.as_deref(), Some(ECHO_KEY));
        }
        r => panic!("{r:?}"),
    }
    f.label_namespace("demo", AMBIENT.0, Some(AMBIENT.1));
    h.until("demo ambient again", |st| {
        protocol(st, "10.1.1.1") == Some(Protocol::Hbone)
    })
    .await;

    // A pod opts out.
    f.annotate_pod("demo", "echo-1", OPT_OUT.0, Some(OPT_OUT.1));
    h.until("echo-1 opted out", |st| {
        protocol(st, "10.1.1.2") == Some(Protocol::Tcp)
    })
    .await;
    assert_eq!(protocol(&h.get(), "10.1.1.1"), Some(Protocol::Hbone));

    // An endpoint turns not ready: no longer picked.
    f.update(Kind::EndpointSlice, "demo", "echo-abcde", |s| {
        s["endpoints"][1]["conditions"]["ready"] = json!(false);
    });
    h.until("echo-1 not ready", |st| {
        endpoints(st, "10.96.0.10") == Some(vec!["demo/echo-0".to_string()])
    })
    .await;

    // A pod is deleted (and the endpoints controller drops it): gone, the service is empty.
    f.delete(Kind::Pod, "demo", "echo-0");
    f.update(Kind::EndpointSlice, "demo", "echo-abcde", |s| {
        let eps = s["endpoints"].as_array_mut().unwrap();
        eps.remove(0);
    });
    h.until("echo-0 gone", |st| {
        workload(st, "10.1.1.1").is_none() && endpoints(st, "10.96.0.10") == Some(vec![])
    })
    .await;
    let err = route_from_sleep(&h.get(), "10.96.0.10:80").unwrap_err();
    assert!(err.contains("no healthy endpoint"), "{err}");

    // A new pod comes up and becomes ready: it is the endpoint.
    f.put(pod("demo", "echo-2", "node-a", "10.1.0.2", sa("echo")));
    f.update(Kind::EndpointSlice, "demo", "echo-abcde", |s| {
        s["endpoints"].as_array_mut().unwrap().push(json!({
            "addresses": ["10.1.0.2"], "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": "demo", "name": "echo-2"},
        }));
    });
    h.until("echo-2 serves", |st| {
        endpoints(st, "10.96.0.10") == Some(vec!["demo/echo-2".to_string()])
    })
    .await;
    // On this node: the same-node path, and a certificate for it.
    assert!(matches!(
        route_from_sleep(&h.get(), "10.96.0.10:80").unwrap(),
        Route::Local { target, .. } if target == "10.1.0.2:8080".parse().unwrap()
    ));
    assert!(h
        .get()
        .local_identities()
        .iter()
        .any(|i| i.to_string().ends_with("/ns/demo/sa/echo")));

    // The service is deleted: its VIP is no longer known.
    f.delete(Kind::Service, "demo", "echo");
    h.until("service gone", |st| {
        st.service_by_vip(ip("10.96.0.10")).is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_error_event_lists_again_and_sees_what_the_gap_hid() {
    let h = Harness::start().await;
    let f = &h.fake;
    let lists = list_requests(f, "/api/v1/pods");
    // Changes the open watches never see, then history is compacted and the watches expire.
    f.hold_events(true);
    f.delete(Kind::Pod, "legacy", "old");
    f.label_namespace("legacy", AMBIENT.0, Some(AMBIENT.1));
    f.put(pod("legacy", "new", "node-b", "10.1.1.9", json!({})));
    f.compact();
    f.expire_watches();
    f.hold_events(false);
    h.until("the re-list's view", |st| {
        workload(st, "10.1.0.9").is_none() && protocol(st, "10.1.1.9") == Some(Protocol::Hbone)
    })
    .await;
    assert!(list_requests(f, "/api/v1/pods") > lists);
    assert!(h.status()["resources"]["pods"]["lists"].as_u64().unwrap() >= 2);
    // And the watches work again afterwards.
    f.delete(Kind::Pod, "legacy", "new");
    h.until("deleted after the re-list", |st| {
        workload(st, "10.1.1.9").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_request_refused_with_http_410_lists_again() {
    let h = Harness::start().await;
    let f = &h.fake;
    let lists = list_requests(f, "/api/v1/namespaces");
    f.set_watch_gone_http(true);
    f.hold_events(true);
    f.label_namespace("demo", AMBIENT.0, None);
    f.delete(Kind::Pod, "demo", "sleep");
    f.compact();
    // The client resumes from its resourceVersion, which is now too old: HTTP 410.
    f.close_watches();
    h.until("the re-list's view", |st| {
        workload(st, "10.1.0.1").is_none() && protocol(st, "10.1.1.1") == Some(Protocol::Tcp)
    })
    .await;
    assert!(list_requests(f, "/api/v1/namespaces") > lists);
    assert!(
        f.requests().iter().any(|r| r.contains("watch=true")),
        "watched"
    );
    f.set_watch_gone_http(false);
    f.hold_events(false);
    f.label_namespace("demo", AMBIENT.0, Some(AMBIENT.1));
    h.until("watching again", |st| {
        protocol(st, "10.1.1.1") == Some(Protocol::Hbone)
    })
    .await;
}

// ------------------------------------------------------------------------------------------
// Two ztunnels fed by the fake API server.

/// The mesh's pods as the API server has them: sleep (node-a) and echo (node-b, behind the
/// service echo: VIP .100 port 80 → the echo server's port) in the ambient namespace demo.
fn mesh_cluster(f: &FakeApiServer, m: &Mesh) {
    let ip = |h: u8| m.ip(h).to_string();
    f.put(namespace("demo", json!({AMBIENT.0: AMBIENT.1})));
    f.put(pod("demo", "sleep", "node-a", &ip(11), sa("sleep")));
    f.put(pod("demo", "echo", "node-b", &ip(21), sa("echo")));
    f.put(service(
        "demo",
        "echo",
        &ip(100),
        &[("http", 80, json!("echo"))],
    ));
    f.put(endpoint_slice(
        "demo",
        "echo-x1",
        "echo",
        &[("http", m.echo.addr.port())],
        &[(&ip(21), true, Some("echo"))],
    ));
}

fn kube_config(m: &Mesh, url: &str, node: &str, policies: Option<std::path::PathBuf>) -> Config {
    let host = if node == "node-a" { 1 } else { 2 };
    let mut cfg = Config::new_kube(url, policies, node, CertSource::Ca(m.ca_dir.clone()))
        .on_loopback(m.ip(host));
    cfg.config_poll = Duration::from_millis(25);
    cfg.drain_timeout = Duration::from_millis(500);
    cfg.connect_timeout = Duration::from_secs(2);
    cfg
}

fn count(metrics: &str, needles: &[&str]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ztunnels_fed_by_the_api_server_carry_hbone_through_a_vip() {
    let m = Mesh::new(40).await;
    // The API server's port is bound but not served yet: ztunnel must wait for it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let policies = m.dir.path().join("policies.yaml");
    std::fs::write(&policies, "policies: []\n").unwrap();

    let mut cfg_a = kube_config(&m, &url, "node-a", None);
    cfg_a.outbound_orig_dst = Some(SocketAddr::new(m.ip(100), 80));
    let a = ztunnel::app::start(cfg_a, tokio::runtime::Handle::current())
        .await
        .unwrap();
    let mut cfg_b = kube_config(&m, &url, "node-b", Some(policies.clone()));
    cfg_b.inbound_addrs = vec![SocketAddr::new(m.ip(21), port::INBOUND_HBONE)];
    let b = ztunnel::app::start(cfg_b, tokio::runtime::Handle::current())
        .await
        .unwrap();

    // Not ready, not accepting, before the first sync.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(http_get(a.addrs.readiness, "/healthz/ready").await.0, 503);
    let (_, dump) = http_get(a.addrs.admin, "/config_dump").await;
    let v: Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(v["configFile"]["discovery"]["synced"], false);
    assert_eq!(v["ready"], false);
    let early = tokio::spawn({
        let (src, dst) = (m.ip(11), a.addrs.outbound);
        async move {
            let s = connect_from(src, dst).await.unwrap();
            tcp_echo(s, b"queued until synced").await
        }
    });
    // An accepted connection from an unknown source would be closed at once: it waits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!early.is_finished(), "accepted before the first sync");

    // The API server comes up.
    let fake = FakeApiServer::start_on(listener);
    mesh_cluster(&fake, &m);
    let t0 = Instant::now();
    for z in [&a, &b] {
        while http_get(z.addrs.readiness, "/healthz/ready").await.0 != 200 {
            assert!(t0.elapsed() < Duration::from_secs(15), "not ready in 15 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    common::eventually(|| {
        a.state.get().service_by_vip(m.ip(100)).is_some()
            && b.state.get().workload_by_ip(m.ip(21)).is_some()
    })
    .await;
    // The connection made before the sync waited in the backlog and is handled now (carried,
    // or refused if the first list raced the fake's objects and came back empty).
    let back = tokio::time::timeout(Duration::from_secs(10), early)
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default();
    assert!(back.is_empty() || back == b"queued until synced");

    // Through the VIP over HBONE, from the client's own IP, 1 MB intact.
    let data = payload(1024 * 1024);
    let s = connect_from(m.ip(11), a.addrs.outbound).await.unwrap();
    assert!(tcp_echo(s, &data).await.unwrap() == data, "bytes differ");
    assert!(m
        .echo
        .peers
        .lock()
        .unwrap()
        .iter()
        .all(|p| p.ip() == m.ip(11)));
    let (_, text) = http_get(b.addrs.metrics, "/metrics").await;
    let mtls = [
        "reporter=\"destination\"",
        "connection_security_policy=\"mutual_tls\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/sleep\"",
    ];
    let hbone_before = count(&text, &mtls);
    assert!(hbone_before >= 1, "{text}");
    let (_, text) = http_get(a.addrs.metrics, "/metrics").await;
    assert!(
        text.contains("destination_service=\"demo/echo.demo.svc.cluster.local\""),
        "{text}"
    );

    // The dump shows the discovered state and the certificate of node-a's pod.
    let (_, dump) = http_get(a.addrs.admin, "/config_dump").await;
    let v: Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(v["config"]["kube"], true);
    assert_eq!(v["configFile"]["discovery"]["synced"], true);
    assert_eq!(v["services"][0]["endpoints"][0], "demo/echo");
    assert_eq!(
        v["certificates"][0]["identity"],
        "spiffe://cluster.local/ns/demo/sa/sleep"
    );
    assert!(v["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["uid"] == "demo/echo" && w["protocol"] == "HBONE"));

    // Policies stay file-based next to --kube: a deny policy reloaded on B refuses new
    // connections, and the discovered workloads stay.
    let gen = b.state.status().generation;
    std::fs::write(
        &policies,
        "policies:\n- {name: deny-all, namespace: demo, scope: Namespace, action: Deny, rules: [{}]}\n",
    )
    .unwrap();
    common::eventually(|| b.state.get().policies.len() == 1).await;
    assert!(b.state.status().generation > gen);
    assert!(b.state.get().workload_by_ip(m.ip(21)).is_some());
    let s = connect_from(m.ip(11), a.addrs.outbound).await.unwrap();
    assert!(tcp_echo(s, b"denied").await.unwrap_or_default().is_empty());
    std::fs::write(&policies, "policies: []\n").unwrap();
    common::eventually(|| b.state.get().policies.is_empty()).await;

    // The namespace leaves the mesh: the same VIP now passes through as plain TCP.
    fake.label_namespace("demo", AMBIENT.0, None);
    common::eventually(|| {
        a.state
            .get()
            .workload_by_ip(m.ip(21))
            .is_some_and(|w| w.protocol == Protocol::Tcp)
    })
    .await;
    let s = connect_from(m.ip(11), a.addrs.outbound).await.unwrap();
    assert_eq!(tcp_echo(s, b"plain").await.unwrap(), b"plain");
    let (_, text) = http_get(b.addrs.metrics, "/metrics").await;
    assert_eq!(count(&text, &mtls), hbone_before, "no new HBONE connection");
    let (_, text) = http_get(a.addrs.metrics, "/metrics").await;
    assert!(
        count(
            &text,
            &["reporter=\"source\"", "connection_security_policy=\"none\""]
        ) >= 1,
        "{text}"
    );

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_policy_file_with_workloads_is_refused_under_kube() {
    let m = Mesh::new(41).await;
    // Mesh's config files hold workloads and services.
    let cfg = kube_config(&m, "http://127.0.0.1:9", "node-a", Some(m.config_a.clone()));
    let err = ztunnel::app::start(cfg, tokio::runtime::Handle::current())
        .await
        .err()
        .expect("refused");
    let chain = format!("{err:#}");
    assert!(
        chain.contains("workloads: not allowed with --kube"),
        "{chain}"
    );
    let full = ztunnel::state::StateHandle::load_for_discovery(
        Some(&m.config_a),
        "cluster.local",
        "node-a",
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        full.starts_with("workloads: not allowed with --kube"),
        "{full}"
    );
}

/// The waypoint `demo/waypoint`: its Gateway's Service (label `gateway-name`) and one pod.
fn waypoint_objects(f: &FakeApiServer, name: &str, vip: &str, pod_ip: &str) {
    let labels = json!({"metadata": {"labels": {"gateway.networking.k8s.io/gateway-name": name}}});
    f.put(pod(
        "demo",
        &format!("{name}-0"),
        "node-b",
        pod_ip,
        json!({"metadata": {"labels": {"gateway.networking.k8s.io/gateway-name": name}},
               "spec": {"serviceAccountName": name}}),
    ));
    let mut svc = service("demo", name, vip, &[("mesh", 15008, json!(15008))]);
    fake_apiserver::merge_patch(&mut svc, &labels);
    f.put(svc);
    f.put(endpoint_slice(
        "demo",
        &format!("{name}-x"),
        name,
        &[("mesh", 15008)],
        &[(pod_ip, true, Some(&format!("{name}-0")))],
    ));
}

fn waypoint_address(st: &State, what: &str) -> Option<String> {
    let wp = match st.service_by_vip(ip(what)) {
        Some(s) => s.waypoint.clone(),
        None => workload(st, what)?.waypoint.clone(),
    };
    wp.map(|w| w.address.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_waypoint_labels_bind_services_and_pods() {
    let h = Harness::start().await;
    let f = &h.fake;
    waypoint_objects(f, "waypoint", "10.96.0.90", "10.1.1.9");
    waypoint_objects(f, "other", "10.96.0.91", "10.1.1.8");
    // The namespace binds every service and pod of it (not the waypoints themselves).
    f.label_namespace("demo", "istio.io/use-waypoint", Some("waypoint"));
    h.until("namespace bound", |st| {
        waypoint_address(st, "10.96.0.10").as_deref() == Some("10.96.0.90")
            && waypoint_address(st, "10.1.1.1").as_deref() == Some("10.96.0.90")
    })
    .await;
    let st = h.get();
    assert_eq!(waypoint_address(&st, "10.1.1.9"), None, "the waypoint pod");
    assert_eq!(
        waypoint_address(&st, "10.96.0.90"),
        None,
        "the waypoint's Service"
    );
    assert!(st.is_waypoint(ip("10.1.1.9")));
    // ztunnel sends the VIP's traffic to the waypoint's pod, with the VIP as authority.
    match route_from_sleep(&st, "10.96.0.10:80").unwrap() {
        Route::Hbone {
            tunnel,
            authority,
            waypoint: true,
            identities,
            ..
        } => {
            assert_eq!(tunnel, "10.1.1.9:15008".parse::<SocketAddr>().unwrap());
            assert_eq!(authority, "10.96.0.10:80".parse::<SocketAddr>().unwrap());
            assert_eq!(
                identities[0].to_string(),
                "spiffe://cluster.local/ns/demo/sa/waypoint"
            );
        }
        other => panic!("{other:?}"),
    }
    // A service label (another waypoint) and a pod's `none` override the namespace.
    f.update(Kind::Service, "demo", "echo", |o| {
        o["metadata"]["labels"] = json!({"istio.io/use-waypoint": "other"});
    });
    f.update(Kind::Pod, "demo", "echo-0", |o| {
        o["metadata"]["labels"]["istio.io/use-waypoint"] = json!("none");
    });
    h.until("overrides", |st| {
        waypoint_address(st, "10.96.0.10").as_deref() == Some("10.96.0.91")
            && waypoint_address(st, "10.1.1.1").is_none()
            && waypoint_address(st, "10.1.1.2").as_deref() == Some("10.96.0.90")
    })
    .await;
    // The other waypoint's Service goes away: its binding is unresolved (a note), the echo
    // service has no waypoint rather than a broken one.
    f.delete(Kind::Service, "demo", "other");
    h.until("unresolved", |st| {
        waypoint_address(st, "10.96.0.10").is_none()
    })
    .await;
    let notes = h.status()["notes"].to_string();
    assert!(
        notes.contains("waypoint demo/other (istio.io/use-waypoint of service demo/echo)"),
        "{notes}"
    );
    // `none` on the service opts out of the namespace's waypoint too; unlabelling the
    // namespace releases the rest.
    f.update(Kind::Service, "demo", "echo", |o| {
        o["metadata"]["labels"] = json!({"istio.io/use-waypoint": "none"});
    });
    f.label_namespace("demo", "istio.io/use-waypoint", None);
    h.until("released", |st| {
        waypoint_address(st, "10.96.0.10").is_none() && waypoint_address(st, "10.1.1.2").is_none()
    })
    .await;
    assert!(matches!(
        route_from_sleep(&h.get(), "10.96.0.10:80").unwrap(),
        Route::Hbone {
            waypoint: false,
            ..
        }
    ));
}
