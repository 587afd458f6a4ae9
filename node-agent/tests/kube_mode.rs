//! `ambient-agent run --kube` end to end, as root: the real agent binary runs in a fresh
//! "node" network namespace against the in-process fake API server (listening inside that
//! namespace), with pods in network namespaces of their own joined to the node by veth
//! pairs. Checks what lands in the kernel (the nft set `ztunnel-pods-ips`, table 100, the
//! tunnels) and what the API server receives (annotation patches, and no request on the CNI
//! ADD path). Every namespace is deleted and the agent killed by guards, even on failure.
//! Without root the tests are skipped with a message. The membership rules in all their
//! cases are tested without root in `src/kube/tests.rs`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ambient_net::netns;
use ambient_net::proto::{PodInfo, Reply, Request};
use common::fake_apiserver::{namespace, pod, FakeApiServer, Kind};
use serde_json::{json, Value};

const AGENT: &str = env!("CARGO_BIN_EXE_ambient-agent");
const NODE: &str = "node-k";
const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");
const ANNOTATION: &str = "ambient.istio.io/redirection";
const GW: &str = "10.213.0.1";

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces, netlink, nftables)");
        return false;
    }
    if Command::new("nft").arg("-v").output().is_err() {
        eprintln!("skipped: nft not installed");
        return false;
    }
    true
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A node netns, pod netns joined to it by veths, a temp dir, the agent: all removed on drop.
struct Lab {
    tag: String,
    node: String,
    netns: Vec<String>,
    tmp: tempfile::TempDir,
    agent: Mutex<Option<Child>>,
    fake: Option<FakeApiServer>,
    veths: usize,
}

/// How a pod's netns can be found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pin {
    /// Named under /run/netns and linked into the agent's `--netns-dirs`.
    ScanDir,
    /// Named under /run/netns only (CNI passes the path; the scan does not see it).
    Named,
    /// Held only by a process in it: found through /proc/<pid>/ns/net.
    ProcOnly,
}

impl Lab {
    fn new() -> Lab {
        let tag = format!(
            "tk{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let node = format!("{tag}n");
        netns::create_named(&node).expect("create node netns");
        let lab = Lab {
            tag,
            node: node.clone(),
            netns: vec![node.clone()],
            tmp: tempfile::tempdir().unwrap(),
            agent: Mutex::new(None),
            fake: None,
            veths: 0,
        };
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        std::fs::create_dir_all(lab.netns_dir()).unwrap();
        lab
    }

    /// Where the agent looks for pod netns (`--netns-dirs`): links to the pods' netns files,
    /// so the agent never looks at other tests' namespaces under /run/netns.
    fn netns_dir(&self) -> PathBuf {
        self.tmp.path().join("netns")
    }

    fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn socket(&self) -> PathBuf {
        self.tmp.path().join("agent.sock")
    }

    fn node_path(&self) -> PathBuf {
        netns::named_path(&self.node)
    }

    /// A pod netns with `eth0` = `ip`/24 (default via the node-side gateway), the host side
    /// of its veth on the node with a /32 route to it (ptp-style), findable as `pin` says
    /// (the process holding a `ProcOnly` netns is returned).
    fn pod_netns(&mut self, ip_addr: &str, pin: Pin) -> (String, Option<Child>) {
        self.veths += 1;
        let name = format!("{}p{}", self.tag, self.veths);
        let path = netns::create_named(&name).expect("create pod netns");
        self.netns.push(name.clone());
        let host = format!("vk{}{}", &self.tag[2..].replace('x', ""), self.veths);
        let host = host[..host.len().min(15)].to_string();
        ip(&[
            "-n", &self.node, "link", "add", &host, "type", "veth", "peer", "name", "eth0",
            "netns", &name,
        ]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&[
            "-n", &name, "route", "add", "default", "via", GW, "dev", "eth0",
        ]);
        ip(&[
            "-n",
            &self.node,
            "addr",
            "add",
            &format!("{GW}/32"),
            "dev",
            &host,
        ]);
        ip(&["-n", &self.node, "link", "set", &host, "up"]);
        ip(&[
            "-n",
            &self.node,
            "route",
            "add",
            &format!("{ip_addr}/32"),
            "dev",
            &host,
        ]);
        match pin {
            Pin::ScanDir => {
                std::os::unix::fs::symlink(&path, self.netns_dir().join(&name)).unwrap();
                return (name, None);
            }
            Pin::Named => return (name, None),
            Pin::ProcOnly => {}
        }
        // Only a process keeps it: unmount the name, keep `sleep` inside.
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        netns::command_in(&mut cmd, &path).unwrap();
        let child = cmd.spawn().expect("spawn sleep in pod netns");
        netns::delete_named(&name).unwrap();
        (name, Some(child))
    }

    /// The fake API server, listening on 127.0.0.1 inside the node netns.
    fn start_fake(&mut self) -> FakeApiServer {
        let l = netns::run_in(&self.node_path(), || {
            std::net::TcpListener::bind("127.0.0.1:0")
        })
        .unwrap()
        .unwrap();
        let fake = FakeApiServer::start_on(l);
        self.fake = Some(fake.clone());
        fake
    }

    fn start_agent(&mut self, fake: &FakeApiServer, proc_netns: bool) {
        let log = std::fs::File::create(self.tmp.path().join("agent.log")).unwrap();
        let mut cmd = Command::new(AGENT);
        cmd.args(["run", "--kube", "--node-name", NODE, "--kube-api-url"])
            .arg(fake.url())
            .arg("--netns-dirs")
            .arg(self.netns_dir())
            .arg(format!("--proc-netns={proc_netns}"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--health-addr", "127.0.0.1:15120", "--kube-sweep", "1"])
            .env("RUST_LOG", "info")
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        netns::command_in(&mut cmd, &self.node_path()).unwrap();
        *self.agent.lock().unwrap() = Some(cmd.spawn().expect("start agent"));
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("agent.log")).unwrap_or_default()
    }

    /// The agent's saved state: `state.json` with the pod changes of `state.journal` applied.
    fn state(&self) -> Value {
        let mut state: Value = std::fs::read(self.state_dir().join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let journal =
            std::fs::read_to_string(self.state_dir().join("state.journal")).unwrap_or_default();
        for line in journal.lines() {
            let Ok(entry) = serde_json::from_str::<Value>(line) else {
                break;
            };
            if let Some(pods) = state.get_mut("pods").and_then(Value::as_object_mut) {
                if let Some(key) = entry["put"]["key"].as_str() {
                    pods.insert(key.to_string(), entry["put"]["pod"].clone());
                } else if let Some(key) = entry["del"]["key"].as_str() {
                    pods.remove(key);
                }
            }
        }
        state
    }

    /// The addresses in the nft set `ztunnel-pods-ips` of table `inet ambient-node`.
    fn pod_set(&self) -> Vec<IpAddr> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node, "nft", "list", "set", "inet"])
            .args(["ambient-node", "ztunnel-pods-ips"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(start) = text.find("elements = {") else {
            return Vec::new();
        };
        let rest = &text[start + "elements = {".len()..];
        let body = &rest[..rest.find('}').unwrap_or(rest.len())];
        let mut v: Vec<IpAddr> = body
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        v.sort();
        v
    }

    /// Polls `f` for up to 20 s; on timeout, panics with the agent's log.
    async fn wait(&self, what: &str, f: impl Fn(&Lab) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f(self) {
            // The agent must not die under us.
            if let Some(c) = self.agent.lock().unwrap().as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("agent exited: {status}\n{}", self.log());
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for: {what}\nstate: {:#}\nnft set: {:?}\nagent log:\n{}",
                    self.state(),
                    self.pod_set(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn cni(&self, req: &Request) -> Reply {
        let mut s = UnixStream::connect(self.socket()).expect("agent socket");
        let mut line = serde_json::to_vec(req).unwrap();
        line.push(b'\n');
        s.write_all(&line).unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    }

    fn stop_agent(&mut self) {
        if let Some(mut c) = self.agent.lock().unwrap().take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_agent();
        for n in &self.netns {
            if let Err(e) = netns::delete_named(n) {
                eprintln!("deleting netns {n}: {e}");
            }
        }
    }
}

/// Kills and reaps a helper process on drop.
struct Reap(Option<Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn annotation(fake: &FakeApiServer, ns: &str, name: &str) -> Option<String> {
    fake.get(Kind::Pod, ns, name)?["metadata"]["annotations"][ANNOTATION]
        .as_str()
        .map(str::to_string)
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = list.iter().map(|s| s.parse().unwrap()).collect();
    v.sort();
    v
}

fn ztunnel_pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    pod(
        ns,
        name,
        node,
        ip,
        json!({"metadata": {"labels": {"app": "ztunnel"}}}),
    )
}

/// Pods that were running before the agent (one of them only findable through /proc), the
/// ztunnel found by namespace + label + node (an `app=ztunnel` pod elsewhere is just a pod),
/// a hostNetwork and an opted-out pod left alone; the namespace labelled, relabelled, a
/// 410 Gone re-list; kernel state and annotation patches checked at each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mode_enrolls_existing_pods_and_follows_labels_in_the_kernel() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    lab.pod_netns("10.213.0.2", Pin::ScanDir);
    lab.pod_netns("10.213.0.5", Pin::ScanDir);
    lab.pod_netns("10.213.0.6", Pin::ScanDir);
    lab.pod_netns("10.213.0.7", Pin::ScanDir);
    let (_, c_proc) = lab.pod_netns("10.213.0.8", Pin::ProcOnly);
    let _c_proc = Reap(c_proc);

    let fake = lab.start_fake();
    fake.put(namespace("istio-system", json!({})));
    fake.put(namespace("demo", json!({})));
    fake.put(ztunnel_pod(
        "istio-system",
        "ztunnel-k1",
        NODE,
        "10.213.0.2",
    ));
    fake.put(ztunnel_pod(
        "istio-system",
        "ztunnel-other",
        "node-x",
        "10.213.0.3",
    ));
    fake.put(pod("demo", "a", NODE, "10.213.0.5", json!({})));
    fake.put(pod(
        "demo",
        "b",
        NODE,
        "10.213.0.6",
        json!({"metadata": {"annotations": {ANNOTATION: "disabled"}}}),
    ));
    fake.put(ztunnel_pod("demo", "impostor", NODE, "10.213.0.7"));
    fake.put(pod("demo", "c", NODE, "10.213.0.8", json!({})));
    fake.put(pod(
        "demo",
        "host",
        NODE,
        "10.213.0.1",
        json!({"spec": {"hostNetwork": true}}),
    ));
    lab.start_agent(&fake, true);

    lab.wait("the ztunnel endpoint (namespace + label + node)", |l| {
        l.state()["ztunnel"]["name"] == "ztunnel-k1"
    })
    .await;
    lab.wait("tunnels toward the ztunnel", |l| {
        ip_out(&["-n", &l.node, "-d", "link", "show", "istioin"]).contains("remote 10.213.0.2")
    })
    .await;
    assert!(lab.pod_set().is_empty(), "nothing is ambient yet");
    assert!(fake.patches().is_empty());

    fake.label_namespace("demo", AMBIENT.0, Some(AMBIENT.1));
    lab.wait("a, the impostor and c (via /proc) enrolled", |l| {
        l.pod_set() == ips(&["10.213.0.5", "10.213.0.7", "10.213.0.8"])
    })
    .await;
    lab.wait("annotations patched", |_| {
        ["a", "impostor", "c"]
            .iter()
            .all(|p| annotation(&fake, "demo", p).as_deref() == Some("enabled"))
    })
    .await;
    let routes = ip_out(&["-n", &lab.node, "route", "show", "table", "100"]);
    assert!(
        routes.contains("10.213.0.5 via 192.168.126.2 dev istioin"),
        "{routes}"
    );
    let state = lab.state();
    assert_eq!(
        state["ztunnel"]["name"], "ztunnel-k1",
        "the impostor is not the ztunnel"
    );
    let pods = state["pods"].as_object().unwrap();
    assert!(
        pods.keys().all(|k| k.starts_with("k8s-watch:")),
        "watcher-owned attachments: {pods:#?}"
    );
    let c = pods.values().find(|p| p["name"] == "c").unwrap();
    assert!(
        c["netns"].as_str().unwrap().starts_with("/proc/"),
        "c found through /proc: {c}"
    );
    assert_eq!(annotation(&fake, "demo", "b").as_deref(), Some("disabled"));
    assert_eq!(annotation(&fake, "demo", "host"), None);
    assert!(fake
        .patches()
        .iter()
        .all(|(_, name, _)| name != "b" && name != "host" && !name.starts_with("ztunnel")));

    // 410 Gone: events missed while the watch was stalled, history compacted; the re-list
    // must bring the opt-out of `a`.
    fake.hold_events(true);
    fake.annotate_pod("demo", "a", ANNOTATION, Some("disabled"));
    fake.compact();
    fake.expire_watches();
    fake.hold_events(false);
    lab.wait("a opted out after the re-list", |l| {
        l.pod_set() == ips(&["10.213.0.7", "10.213.0.8"])
    })
    .await;
    let routes = ip_out(&["-n", &lab.node, "route", "show", "table", "100"]);
    assert!(!routes.contains("10.213.0.5 "), "{routes}");

    // The label goes: everything un-enrolled, annotations removed (a keeps its `disabled`).
    fake.label_namespace("demo", AMBIENT.0, None);
    lab.wait("nothing enrolled", |l| l.pod_set().is_empty())
        .await;
    lab.wait("annotations removed", |_| {
        annotation(&fake, "demo", "impostor").is_none() && annotation(&fake, "demo", "c").is_none()
    })
    .await;
    assert_eq!(annotation(&fake, "demo", "a").as_deref(), Some("disabled"));

    // The ztunnel pod goes: capture stops (tunnels removed).
    fake.delete(Kind::Pod, "istio-system", "ztunnel-k1");
    lab.wait("tunnels removed with the ztunnel", |l| {
        l.state()["ztunnel"].is_null()
            && !ip_out(&["-n", &l.node, "link", "show"]).contains("istioin")
    })
    .await;
    lab.stop_agent();
}

/// CNI ADD in Kubernetes mode: answered from the watch cache with no API request; a pod
/// whose namespace the cache does not know yet is refused with "try again" (fail closed) and
/// enrolled on the runtime's retry; a pod of a namespace labelled ambient later is enrolled
/// by the watcher with the runtime's own container id and netns (which no scan could find);
/// CNI DEL removes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_add_in_kube_mode_uses_the_watch_cache() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new();
    lab.pod_netns("10.213.0.2", Pin::ScanDir);
    // CNI hands the agent these netns paths; the scan cannot see them (and /proc is off).
    let (p1_ns, _) = lab.pod_netns("10.213.0.5", Pin::Named);
    let (p2_ns, _) = lab.pod_netns("10.213.0.6", Pin::Named);
    let (p3_ns, _) = lab.pod_netns("10.213.0.7", Pin::Named);
    let fake = lab.start_fake();
    fake.put(namespace("istio-system", json!({})));
    fake.put(namespace("demo", json!({AMBIENT.0: AMBIENT.1})));
    fake.put(namespace("plain", json!({})));
    fake.put(ztunnel_pod(
        "istio-system",
        "ztunnel-k1",
        NODE,
        "10.213.0.2",
    ));
    fake.put(pod("demo", "p1", NODE, "10.213.0.5", json!({})));
    lab.start_agent(&fake, false);
    lab.wait("ztunnel", |l| l.state()["ztunnel"]["name"] == "ztunnel-k1")
        .await;
    lab.wait("ready: a pass over the synced cache", |l| {
        l.log()
            .contains("first pass over the synced watch cache done")
    })
    .await;

    let p1_uid = fake.get(Kind::Pod, "demo", "p1").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let info = |id: &str, ns: &str, name: &str, uid: &str, netns_name: &str, ip: &str| PodInfo {
        container_id: id.into(),
        if_name: "eth0".into(),
        netns: netns::named_path(netns_name).to_string_lossy().into_owned(),
        namespace: ns.into(),
        name: name.into(),
        uid: uid.into(),
        ips: vec![ip.parse().unwrap()],
        gateways: vec![GW.parse().unwrap()],
    };
    let requests_before = fake.requests().len();
    let r = lab.cni(&Request::Add {
        pod: info("cid-p1", "demo", "p1", &p1_uid, &p1_ns, "10.213.0.5"),
    });
    assert_eq!(r, Reply::ok(true, "enrolled"));
    let r = lab.cni(&Request::Add {
        pod: info("cid-p2a", "later", "p2", "", &p2_ns, "10.213.0.6"),
    });
    match &r {
        Reply::Error { message, retry } => {
            assert!(*retry, "{r:?}");
            assert!(message.contains("not in the agent's watch cache"), "{r:?}");
        }
        _ => panic!("unknown namespace must not be answered {r:?}"),
    }
    let r = lab.cni(&Request::Add {
        pod: info("cid-p3", "plain", "p3", "", &p3_ns, "10.213.0.7"),
    });
    assert_eq!(r, Reply::ok(false, "namespace is not ambient"));
    let during: Vec<String> = fake.requests()[requests_before..]
        .iter()
        .filter(|r| !r.starts_with("PATCH"))
        .cloned()
        .collect();
    assert!(
        during.is_empty(),
        "API requests on the CNI path: {during:?}"
    );
    assert_eq!(lab.pod_set(), ips(&["10.213.0.5"]));
    assert!(
        lab.state()["pods"]["cid-p1/eth0"].is_object(),
        "{}",
        lab.state()
    );

    // The runtime tears the failed sandbox down and retries; meanwhile the namespace and
    // the pod reach the watch cache, and the retry is enrolled.
    let r = lab.cni(&Request::Del {
        container_id: "cid-p2a".into(),
        if_name: "eth0".into(),
    });
    assert_eq!(r, Reply::ok(false, "not enrolled"));
    fake.put(namespace("later", json!({AMBIENT.0: AMBIENT.1})));
    fake.put(pod("later", "p2", NODE, "10.213.0.6", json!({})));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = lab.cni(&Request::Add {
            pod: info("cid-p2b", "later", "p2", "", &p2_ns, "10.213.0.6"),
        });
        if r == Reply::ok(true, "enrolled") {
            break;
        }
        assert!(Instant::now() < deadline, "retry never enrolled: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        lab.state()["pods"]["cid-p2b/eth0"].is_object(),
        "{}",
        lab.state()
    );

    // `plain` becomes ambient: the watcher enrolls p3 with the attachment CNI announced.
    fake.put(pod("plain", "p3", NODE, "10.213.0.7", json!({})));
    fake.label_namespace("plain", AMBIENT.0, Some(AMBIENT.1));
    lab.wait("p3 enrolled by the watcher", |l| {
        l.pod_set() == ips(&["10.213.0.5", "10.213.0.6", "10.213.0.7"])
    })
    .await;
    assert!(
        lab.state()["pods"]["cid-p3/eth0"].is_object(),
        "the runtime's attachment id: {:#}",
        lab.state()
    );
    lab.wait("all three annotated", |_| {
        annotation(&fake, "demo", "p1").as_deref() == Some("enabled")
            && annotation(&fake, "later", "p2").as_deref() == Some("enabled")
            && annotation(&fake, "plain", "p3").as_deref() == Some("enabled")
    })
    .await;

    // The pod is deleted (API object first, then the runtime's CNI DEL): DEL removes it.
    fake.delete(Kind::Pod, "demo", "p1");
    let r = lab.cni(&Request::Del {
        container_id: "cid-p1".into(),
        if_name: "eth0".into(),
    });
    assert_eq!(r, Reply::ok(false, "removed"));
    lab.wait("p1 gone", |l| {
        l.pod_set() == ips(&["10.213.0.6", "10.213.0.7"])
    })
    .await;
    lab.stop_agent();
}
