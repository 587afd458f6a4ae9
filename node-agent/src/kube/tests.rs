//! Kubernetes mode end to end without root: the real kube client, watchers and controller
//! against the in-process fake API server (real list/watch protocol), with a recording
//! [`Dataplane`] in place of the kernel. The kernel path is covered by the root tests in
//! `tests/kube_mode.rs`.

#[path = "../../tests/common/fake_apiserver.rs"]
mod fake_apiserver;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambient_net::proto::PodInfo;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use self::fake_apiserver::{namespace, pod, FakeApiServer, Kind};
use super::cache::{Cache, PodFacts, Policy, SharedCache};
use super::dataplane::{Dataplane, Enrolled};
use super::KubeArgs;
use crate::membership::{Membership, Verdict};

const NODE: &str = "node-a";
const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const ANNOTATION: &str = "ambient.istio.io/redirection";

/// The node's side, recorded.
#[derive(Default)]
struct Recorder {
    pods: BTreeMap<(String, String), Enrolled>,
    ztunnel: Option<PodFacts>,
    /// Enrollments of these pod names fail this many more times.
    fail: BTreeMap<String, usize>,
    log: Vec<String>,
}

impl Dataplane for Recorder {
    fn enrolled(&self) -> Vec<Enrolled> {
        self.pods.values().cloned().collect()
    }

    fn ztunnel(&self) -> Option<Enrolled> {
        self.ztunnel.as_ref().map(|z| Enrolled {
            namespace: z.namespace.clone(),
            name: z.name.clone(),
            uid: z.uid.clone(),
            ips: z.ips.clone(),
            fresh: false,
        })
    }

    async fn enroll(&mut self, pod: &PodFacts) -> anyhow::Result<()> {
        if let Some(n) = self.fail.get_mut(&pod.name).filter(|n| **n > 0) {
            *n -= 1;
            anyhow::bail!("injected failure");
        }
        self.log.push(format!("enroll {}", pod.display()));
        self.pods.insert(
            pod.key(),
            Enrolled {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                ips: pod.ips.clone(),
                fresh: false,
            },
        );
        Ok(())
    }

    async fn remove(&mut self, pod: &Enrolled) -> anyhow::Result<()> {
        self.log
            .push(format!("remove {}/{}", pod.namespace, pod.name));
        self.pods.remove(&(pod.namespace.clone(), pod.name.clone()));
        Ok(())
    }

    async fn set_ztunnel(&mut self, pod: Option<&PodFacts>) -> anyhow::Result<()> {
        self.log.push(format!(
            "ztunnel {}",
            pod.map(|p| p.display()).unwrap_or("none".into())
        ));
        self.ztunnel = pod.cloned();
        Ok(())
    }
}

struct Harness {
    fake: FakeApiServer,
    cache: SharedCache,
    dp: Arc<Mutex<Recorder>>,
    ready: Arc<AtomicBool>,
}

fn args(url: &str) -> KubeArgs {
    KubeArgs {
        kube: true,
        node_name: Some(NODE.into()),
        ztunnel_namespace: "istio-system".into(),
        ztunnel_label: ("app".into(), "ztunnel".into()),
        excluded_namespaces: vec!["kube-system".into()],
        kube_api_url: Some(url.into()),
        netns_dirs: vec![],
        proc_netns: false,
        kube_sweep: 1,
    }
}

impl Harness {
    /// A fake API server filled by `setup`, then the agent's watchers and controller.
    async fn start(setup: impl FnOnce(&FakeApiServer)) -> Harness {
        Self::start_with(Recorder::default(), setup).await
    }

    async fn start_with(rec: Recorder, setup: impl FnOnce(&FakeApiServer)) -> Harness {
        let fake = FakeApiServer::start().await;
        setup(&fake);
        let a = args(&fake.url());
        let cache = Cache::shared(a.policy(&BTreeSet::new()).unwrap());
        let client = a.client().await.unwrap();
        let dp = Arc::new(Mutex::new(rec));
        let ready = Arc::new(AtomicBool::new(false));
        super::start(
            client,
            cache.clone(),
            dp.clone(),
            ready.clone(),
            Duration::from_millis(300),
        );
        let h = Harness {
            fake,
            cache,
            dp,
            ready,
        };
        h.until("first pass over a synced cache", |_, _| true).await;
        h
    }

    /// Waits (up to 10 s) until `f(enrolled names, fake)` holds, after the controller is ready.
    async fn until(&self, what: &str, f: impl Fn(&BTreeSet<String>, &FakeApiServer) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let names = self.enrolled().await;
            if self.ready.load(Ordering::Acquire) && f(&names, &self.fake) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for: {what}; enrolled {names:?}; log {:?}; requests {:#?}",
                    self.dp.lock().await.log,
                    self.fake.requests()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn enrolled(&self) -> BTreeSet<String> {
        self.dp
            .lock()
            .await
            .pods
            .keys()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .collect()
    }

    async fn ztunnel(&self) -> Option<String> {
        self.dp.lock().await.ztunnel.as_ref().map(|z| z.display())
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn annotation(fake: &FakeApiServer, ns: &str, name: &str) -> Option<String> {
    fake.get(Kind::Pod, ns, name)?["metadata"]["annotations"][ANNOTATION]
        .as_str()
        .map(str::to_string)
}

fn ambient_ns(name: &str) -> Value {
    namespace(name, json!({AMBIENT.0: AMBIENT.1}))
}

#[tokio::test]
async fn namespace_label_enrolls_and_unlabel_removes_with_annotations() {
    let h = Harness::start(|f| {
        f.put(namespace("demo", json!({})));
        f.put(pod("demo", "a", NODE, "10.1.0.5", json!({})));
        f.put(pod("demo", "b", NODE, "10.1.0.6", json!({})));
        f.put(pod("demo", "elsewhere", "node-b", "10.2.0.5", json!({})));
    })
    .await;
    assert!(h.enrolled().await.is_empty());
    assert!(h.fake.patches().is_empty());
    // Only this node's pods are listed and watched.
    let reqs = h.fake.requests();
    assert!(
        reqs.iter().any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{reqs:#?}"
    );
    assert!(reqs.iter().any(|r| r.contains("watch=true")), "{reqs:#?}");

    h.fake.label_namespace("demo", AMBIENT.0, Some(AMBIENT.1));
    h.until("demo's pods on this node enrolled and annotated", |e, f| {
        *e == set(&["demo/a", "demo/b"])
            && annotation(f, "demo", "a").as_deref() == Some("enabled")
            && annotation(f, "demo", "b").as_deref() == Some("enabled")
    })
    .await;
    assert_eq!(annotation(&h.fake, "demo", "elsewhere"), None);
    let patches = h.fake.patches();
    assert_eq!(patches.len(), 2, "{patches:?}");
    assert_eq!(
        patches[0].2,
        json!({"metadata": {"annotations": {ANNOTATION: "enabled"}}})
    );

    h.fake.label_namespace("demo", AMBIENT.0, None);
    h.until("un-enrolled and the annotation removed", |e, f| {
        e.is_empty() && annotation(f, "demo", "a").is_none() && annotation(f, "demo", "b").is_none()
    })
    .await;
    let patches = h.fake.patches();
    assert_eq!(patches.len(), 4, "{patches:?}");
    assert_eq!(
        patches[3].2,
        json!({"metadata": {"annotations": {ANNOTATION: null}}})
    );

    // A relabel by another value is not ambient either; back to ambient enrolls again.
    h.fake.label_namespace("demo", AMBIENT.0, Some("none"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.enrolled().await.is_empty());
    h.fake.label_namespace("demo", AMBIENT.0, Some(AMBIENT.1));
    h.until("enrolled again", |e, _| *e == set(&["demo/a", "demo/b"]))
        .await;
    // Bookmarks move the watch along without changing anything.
    h.fake.bookmark();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.enrolled().await, set(&["demo/a", "demo/b"]));
}

#[tokio::test]
async fn opt_out_host_network_sidecars_and_excluded_namespaces_are_skipped() {
    let h = Harness::start(|f| {
        f.put(ambient_ns("demo"));
        f.put(ambient_ns("kube-system"));
        f.put(namespace(
            "injected",
            json!({AMBIENT.0: AMBIENT.1, "istio-injection": "enabled"}),
        ));
        f.put(pod("demo", "plain", NODE, "10.1.0.5", json!({})));
        f.put(pod(
            "demo",
            "opted",
            NODE,
            "10.1.0.6",
            json!({"metadata": {"annotations": {ANNOTATION: "disabled"}}}),
        ));
        f.put(pod(
            "demo",
            "host",
            NODE,
            "192.0.2.1",
            json!({"spec": {"hostNetwork": true}}),
        ));
        f.put(pod(
            "demo",
            "proxied",
            NODE,
            "10.1.0.7",
            json!({"spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}]}}),
        ));
        f.put(pod(
            "demo",
            "revved",
            NODE,
            "10.1.0.8",
            json!({"metadata": {"labels": {"istio.io/rev": "canary"}}}),
        ));
        f.put(pod("kube-system", "dns", NODE, "10.1.0.9", json!({})));
        f.put(pod("injected", "app", NODE, "10.1.0.10", json!({})));
        f.put(pod(
            "demo",
            "pending",
            NODE,
            "",
            json!({"status": {"phase": "Pending", "podIP": null, "podIPs": null}}),
        ));
    })
    .await;
    h.until("only the plain pod", |e, f| {
        *e == set(&["demo/plain"]) && annotation(f, "demo", "plain").as_deref() == Some("enabled")
    })
    .await;
    for (ns, name) in [
        ("demo", "host"),
        ("demo", "proxied"),
        ("demo", "revved"),
        ("kube-system", "dns"),
        ("injected", "app"),
        ("demo", "pending"),
    ] {
        assert_eq!(annotation(&h.fake, ns, name), None, "{ns}/{name}");
    }
    assert_eq!(
        annotation(&h.fake, "demo", "opted").as_deref(),
        Some("disabled")
    );

    // Opting out later removes the pod; the user's `disabled` is left as it is.
    h.fake
        .annotate_pod("demo", "plain", ANNOTATION, Some("disabled"));
    h.until("opted out", |e, _| e.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        annotation(&h.fake, "demo", "plain").as_deref(),
        Some("disabled")
    );
    assert_eq!(h.fake.patches().len(), 1, "{:?}", h.fake.patches());

    // Dropping the opt-out enrolls it again; a pending pod is enrolled once it has an IP.
    h.fake.annotate_pod("demo", "plain", ANNOTATION, None);
    h.fake.update(Kind::Pod, "demo", "pending", |p| {
        p["status"] =
            json!({"phase": "Running", "podIP": "10.1.0.11", "podIPs": [{"ip": "10.1.0.11"}]});
    });
    h.until("back in, and the pending pod too", |e, f| {
        *e == set(&["demo/pending", "demo/plain"])
            && annotation(f, "demo", "plain").as_deref() == Some("enabled")
            && annotation(f, "demo", "pending").as_deref() == Some("enabled")
    })
    .await;
}

#[tokio::test]
async fn ztunnel_is_matched_by_namespace_label_and_node_only() {
    let zt = |ns: &str, name: &str, node: &str, ip: &str, label: &str| {
        pod(
            ns,
            name,
            node,
            ip,
            json!({"metadata": {"labels": {"app": label}}}),
        )
    };
    let h = Harness::start(|f| {
        f.put(namespace("istio-system", json!({})));
        f.put(ambient_ns("demo"));
        // The label in another namespace: an ordinary (ambient) pod, never the ztunnel.
        f.put(zt("demo", "ztunnel-impostor", NODE, "10.1.0.66", "ztunnel"));
        // Right namespace, wrong label.
        f.put(zt(
            "istio-system",
            "ztunnel-lookalike",
            NODE,
            "10.1.0.67",
            "other",
        ));
        // Right namespace and label, another node.
        f.put(zt(
            "istio-system",
            "ztunnel-b",
            "node-b",
            "10.2.0.2",
            "ztunnel",
        ));
    })
    .await;
    h.until("the impostor is just a pod", |e, _| {
        *e == set(&["demo/ztunnel-impostor"])
    })
    .await;
    assert_eq!(h.ztunnel().await, None);

    h.fake.put(zt(
        "istio-system",
        "ztunnel-a1",
        NODE,
        "10.1.0.2",
        "ztunnel",
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.ztunnel().await.as_deref() != Some("istio-system/ztunnel-a1") {
        assert!(tokio::time::Instant::now() < deadline, "ztunnel not found");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The ztunnel itself is never enrolled nor annotated.
    assert_eq!(h.enrolled().await, set(&["demo/ztunnel-impostor"]));
    assert_eq!(annotation(&h.fake, "istio-system", "ztunnel-a1"), None);

    // A rollout: the old one terminating, the new one up; then the old one gone.
    h.fake.update(Kind::Pod, "istio-system", "ztunnel-a1", |p| {
        p["metadata"]["deletionTimestamp"] = json!("2024-01-02T00:00:00Z");
    });
    h.fake.put(zt(
        "istio-system",
        "ztunnel-a2",
        NODE,
        "10.1.0.3",
        "ztunnel",
    ));
    h.fake.delete(Kind::Pod, "istio-system", "ztunnel-a1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.ztunnel().await.as_deref() != Some("istio-system/ztunnel-a2") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new ztunnel not used"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.fake.delete(Kind::Pod, "istio-system", "ztunnel-a2");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.ztunnel().await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ztunnel not cleared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !h.dp.lock().await.log.iter().any(|l| l.contains("ztunnel-b")
            || l.contains("lookalike")
            || l.as_str() == "ztunnel demo/ztunnel-impostor")
    );
}

/// Changes the watch never delivered (held back), history compacted, then the server
/// answers 410 Gone in `how`; the agent must re-list and converge on the new state.
async fn gone_then_relist(how: &str) {
    let h = Harness::start(|f| {
        f.put(ambient_ns("demo"));
        f.put(namespace("other", json!({})));
        f.put(pod("demo", "a", NODE, "10.1.0.5", json!({})));
        f.put(pod("demo", "b", NODE, "10.1.0.6", json!({})));
        f.put(pod("other", "c", NODE, "10.1.0.7", json!({})));
    })
    .await;
    h.until("a and b", |e, _| *e == set(&["demo/a", "demo/b"]))
        .await;
    let lists_before = count_lists(&h.fake);

    h.fake.hold_events(true);
    h.fake.delete(Kind::Pod, "demo", "b");
    h.fake.put(pod("demo", "d", NODE, "10.1.0.8", json!({})));
    h.fake.label_namespace("other", AMBIENT.0, Some(AMBIENT.1));
    h.fake
        .annotate_pod("demo", "a", ANNOTATION, Some("disabled"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.enrolled().await,
        set(&["demo/a", "demo/b"]),
        "events are held"
    );
    h.fake.compact();
    match how {
        "error event" => h.fake.expire_watches(),
        "reconnect" => {
            // The client resumes from its last resourceVersion, now compacted away.
            h.fake.close_watches();
            h.fake.hold_events(false);
        }
        "http 410" => {
            h.fake.set_watch_gone_http(true);
            h.fake.close_watches();
            h.fake.hold_events(false);
        }
        _ => unreachable!(),
    }
    h.until("the state after the gap", |e, _| {
        *e == set(&["demo/d", "other/c"])
    })
    .await;
    assert!(
        count_lists(&h.fake) >= lists_before + 2,
        "both kinds re-listed: {:#?}",
        h.fake.requests()
    );
    h.fake.set_watch_gone_http(false);
    h.fake.hold_events(false);
    // And the watches work again after the re-list.
    h.fake.put(pod("demo", "e", NODE, "10.1.0.9", json!({})));
    h.until("a pod added after the re-list", |e, _| {
        *e == set(&["demo/d", "demo/e", "other/c"])
    })
    .await;
}

fn count_lists(f: &FakeApiServer) -> usize {
    f.requests()
        .iter()
        .filter(|r| r.starts_with("GET ") && !r.contains("watch=true"))
        .count()
}

#[tokio::test]
async fn gone_410_as_error_event_relists() {
    gone_then_relist("error event").await;
}

#[tokio::test]
async fn gone_410_on_resume_relists() {
    gone_then_relist("reconnect").await;
}

#[tokio::test]
async fn gone_410_as_http_status_relists() {
    gone_then_relist("http 410").await;
}

#[tokio::test]
async fn stale_and_replaced_pods_are_removed_and_failures_retried() {
    let mut rec = Recorder::default();
    // Enrolled before a restart; the pod was deleted while the agent was down.
    let stale = |ns: &str, name: &str, uid: &str, fresh: bool| Enrolled {
        namespace: ns.into(),
        name: name.into(),
        uid: uid.into(),
        ips: vec!["10.1.0.99".parse().unwrap()],
        fresh,
    };
    rec.pods.insert(
        ("demo".into(), "gone".into()),
        stale("demo", "gone", "u-gone", false),
    );
    // Just enrolled through CNI; its watch event has not arrived: left alone.
    rec.pods.insert(
        ("demo".into(), "new".into()),
        stale("demo", "new", "u-new", true),
    );
    // A StatefulSet-style pod recreated under the same name with a new uid.
    rec.pods.insert(
        ("demo".into(), "db-0".into()),
        stale("demo", "db-0", "u-old", false),
    );
    // The same pod with a new sandbox (new address) whose CNI ADD was missed.
    rec.pods.insert(
        ("demo".into(), "moved".into()),
        stale("demo", "moved", "u-moved", false),
    );
    rec.fail.insert("flaky".into(), 2);
    let h = Harness::start_with(rec, |f| {
        f.put(ambient_ns("demo"));
        f.put(pod("demo", "db-0", NODE, "10.1.0.20", json!({})));
        f.put(pod("demo", "flaky", NODE, "10.1.0.21", json!({})));
        f.put(pod(
            "demo",
            "moved",
            NODE,
            "10.1.0.22",
            json!({"metadata": {"uid": "u-moved"}}),
        ));
    })
    .await;
    h.until(
        "stale gone, db-0 replaced, moved re-enrolled, flaky after retries",
        |e, f| {
            *e == set(&["demo/db-0", "demo/flaky", "demo/moved", "demo/new"])
                && annotation(f, "demo", "flaky").as_deref() == Some("enabled")
        },
    )
    .await;
    let dp = h.dp.lock().await;
    assert_ne!(
        dp.pods[&("demo".to_string(), "db-0".to_string())].uid,
        "u-old"
    );
    assert_eq!(
        dp.pods[&("demo".to_string(), "moved".to_string())].ips,
        ["10.1.0.22".parse::<IpAddr>().unwrap()]
    );
    assert!(
        dp.log.contains(&"remove demo/moved".to_string()),
        "{:?}",
        dp.log
    );
    // The fresh CNI enrollment is not in the cache at all: kept for its grace period.
    assert!(
        !dp.log.contains(&"remove demo/new".to_string()),
        "{:?}",
        dp.log
    );
    assert!(
        dp.log.contains(&"remove demo/db-0".to_string()),
        "{:?}",
        dp.log
    );
    assert!(
        dp.log.contains(&"remove demo/gone".to_string()),
        "{:?}",
        dp.log
    );
    assert_eq!(dp.fail["flaky"], 0);
}

#[tokio::test]
async fn cni_add_is_answered_from_the_cache_without_api_calls() {
    let h = Harness::start(|f| {
        f.put(ambient_ns("demo"));
        f.put(namespace("plain", json!({})));
        f.put(pod(
            "demo",
            "opted",
            NODE,
            "10.1.0.6",
            json!({"metadata": {"annotations": {ANNOTATION: "disabled"}}}),
        ));
        f.put(pod(
            "istio-system",
            "ztunnel-x",
            NODE,
            "10.1.0.2",
            json!({"metadata": {"labels": {"app": "ztunnel"}}}),
        ));
    })
    .await;
    let m = Membership::Kube(h.cache.clone());
    let info = |ns: &str, name: &str| PodInfo {
        container_id: "c".into(),
        if_name: "eth0".into(),
        netns: "/x".into(),
        namespace: ns.into(),
        name: name.into(),
        uid: String::new(),
        ips: vec!["10.1.0.50".parse::<IpAddr>().unwrap()],
        gateways: vec![],
    };
    let before = h.fake.requests().len();
    assert_eq!(m.verdict(&info("demo", "not-yet-watched")), Verdict::Enroll);
    assert_eq!(m.verdict(&info("demo", "opted")), Verdict::OptedOut);
    assert_eq!(m.verdict(&info("plain", "x")), Verdict::NotAmbient);
    assert_eq!(m.verdict(&info("kube-system", "x")), Verdict::Excluded);
    assert_eq!(
        m.verdict(&info("brand-new", "x")),
        Verdict::NamespaceUnknown
    );
    assert_eq!(
        m.verdict(&info("istio-system", "ztunnel-x")),
        Verdict::Ztunnel
    );
    assert_eq!(
        h.fake.requests().len(),
        before,
        "no API call in the CNI path"
    );

    // The namespace arrives: CNI's retry gets an answer, and the watcher enrolls the pod.
    h.fake.put(ambient_ns("brand-new"));
    h.fake
        .put(pod("brand-new", "x", NODE, "10.1.0.50", json!({})));
    h.until("enrolled by the watcher", |e, _| e.contains("brand-new/x"))
        .await;
    assert_eq!(m.verdict(&info("brand-new", "x")), Verdict::Enroll);
}

#[test]
fn policy_needs_a_node_name_and_merges_excluded_namespaces() {
    let mut a = args("http://127.0.0.1:1");
    let p = a
        .policy(&["legacy".to_string()].into_iter().collect())
        .unwrap();
    assert_eq!(p.excluded, set(&["kube-system", "legacy"]));
    assert_eq!(
        p,
        Policy {
            node_name: NODE.into(),
            ztunnel_namespace: "istio-system".into(),
            ztunnel_label: ("app".into(), "ztunnel".into()),
            excluded: set(&["kube-system", "legacy"]),
        }
    );
    a.node_name = None;
    assert!(a.policy(&BTreeSet::new()).is_err());
}

#[tokio::test]
async fn the_watcher_pages_through_long_lists() {
    let fake = FakeApiServer::start().await;
    for i in 0..7 {
        fake.put(pod(
            "demo",
            &format!("p{i}"),
            NODE,
            &format!("10.1.0.{}", 10 + i),
            json!({}),
        ));
    }
    let a = args(&fake.url());
    let cache = Cache::shared(a.policy(&BTreeSet::new()).unwrap());
    let client = a.client().await.unwrap();
    tokio::spawn(super::watch::run(
        kube::Api::<k8s_openapi::api::core::v1::Pod>::all(client),
        kube::runtime::watcher::Config::default().page_size(2),
        cache.clone(),
        Arc::new(tokio::sync::Notify::new()),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.read().unwrap().pods().count() != 7 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:#?}",
            fake.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lists: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.contains("limit=2"))
        .collect();
    assert_eq!(lists.len(), 4, "{lists:#?}");
    assert!(
        lists[1..].iter().all(|r| r.contains("continue=")),
        "{lists:#?}"
    );
}
