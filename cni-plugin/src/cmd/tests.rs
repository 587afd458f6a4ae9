//! Command-level tests: env as a map, stdin as bytes, a fake agent on a unix socket in a
//! temporary directory.

use std::io::{self, BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ambient_net::proto::{Attachment, PodInfo, Reply, Request};
use serde_json::{json, Value};
use tempfile::TempDir;

use super::*;

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Accepts one connection, or gives up after a few seconds (so a test whose code under test
/// never connects fails instead of hanging).
fn accept_within(listener: &UnixListener, limit: Duration) -> Option<UnixStream> {
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return Some(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < limit => {
                thread::sleep(Duration::from_millis(2))
            }
            Err(_) => return None,
        }
    }
}

/// A fake agent that answers `replies.len()` connections in order, then stops.
struct FakeAgent {
    handle: thread::JoinHandle<Vec<Request>>,
}

impl FakeAgent {
    fn start(socket: &Path, replies: Vec<Reply>) -> Self {
        let listener = UnixListener::bind(socket).unwrap();
        let handle = thread::spawn(move || {
            let mut seen = Vec::new();
            for reply in replies {
                let Some(stream) = accept_within(&listener, Duration::from_secs(10)) else {
                    break;
                };
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                seen.push(serde_json::from_str::<Request>(&line).unwrap());
                let mut out = serde_json::to_string(&reply).unwrap();
                out.push('\n');
                (&stream).write_all(out.as_bytes()).unwrap();
            }
            seen
        });
        FakeAgent { handle }
    }

    fn requests(self) -> Vec<Request> {
        self.handle.join().unwrap()
    }
}

struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn agent(&self, replies: Vec<Reply>) -> FakeAgent {
        FakeAgent::start(&self.socket(), replies)
    }

    /// A config pointing at this fixture's socket, with `extra` merged in.
    fn conf(&self, version: &str, extra: Value) -> Vec<u8> {
        let mut c = json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "type": "ambient-cni",
            "agentSocket": self.socket(),
            "timeoutMs": 2000,
        });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                c.insert(k.clone(), v.clone());
            }
        }
        c.to_string().into_bytes()
    }
}

fn env(cmd: &str, extra: &[(&str, &str)]) -> EnvMap {
    let mut m: EnvMap = [
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "ctr-0123"),
        ("CNI_NETNS", "/var/run/netns/cni-0123"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-7;K8S_POD_UID=uid-42;K8S_POD_INFRA_CONTAINER_ID=ctr-0123",
        ),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        m.insert(k.to_string(), v.to_string());
    }
    m
}

fn env_without(cmd: &str, drop: &str) -> EnvMap {
    let mut m = env(cmd, &[]);
    m.remove(drop);
    m
}

fn prev_1_0() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth9f2", "mac": "0a:58:0a:f4:01:01"},
            {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/cni-0123"}
        ],
        "ips": [
            {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
            {"address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 1}
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
        "x-primary-vendor": {"keep": ["me", 1, true, null]}
    })
}

fn prev_0_3_1() -> Value {
    json!({
        "cniVersion": "0.3.1",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-0123"}],
        "ips": [
            {"version": "4", "address": "10.88.0.7/16", "gateway": "10.88.0.1", "interface": 0},
            {"version": "6", "address": "fd88::7/64", "interface": 0}
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.88.0.1"}],
        "dns": {},
        "unknownTopLevel": 7
    })
}

fn parse_stdout(out: &Output) -> Value {
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {:?}", out.stdout))
}

fn assert_error(out: &Output, code: u64) -> Value {
    assert_eq!(out.exit_code, 1, "{:?}", out.stdout);
    let v = parse_stdout(out);
    assert_eq!(v["code"], code, "{v}");
    assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(v["cniVersion"].is_string(), "{v}");
    v
}

fn assert_silent_success(out: &Output) {
    assert_eq!(out.exit_code, 0, "{:?}", out.stdout);
    assert_eq!(out.stdout, "");
}

fn ok(enrolled: bool, reason: &str) -> Reply {
    Reply::ok(enrolled, reason)
}

/// Captures what `f` logs (at every level) as text.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

// ---------------------------------------------------------------- VERSION

#[test]
fn version_echoes_every_supported_version() {
    for v in VERSIONS {
        let out = execute(
            &env("VERSION", &[]),
            json!({"cniVersion": v}).to_string().as_bytes(),
        );
        assert_eq!(out.exit_code, 0);
        let got = parse_stdout(&out);
        assert_eq!(
            got,
            json!({"cniVersion": v, "supportedVersions": VERSIONS}),
            "{v}"
        );
    }
}

#[test]
fn version_without_a_usable_request_answers_in_1_1_0() {
    for stdin in [&b""[..], b"{}", br#"{"cniVersion":"2.0.0"}"#, b"garbage"] {
        let out = execute(
            &[("CNI_COMMAND".to_string(), "VERSION".to_string())].into(),
            stdin,
        );
        assert_eq!(out.exit_code, 0);
        assert_eq!(parse_stdout(&out)["cniVersion"], "1.1.0");
    }
}

// ---------------------------------------------------------------- input errors

#[test]
fn bad_json_is_code_6() {
    let f = Fixture::new();
    for stdin in [&b"{not json"[..], b"", b"[]", b"null"] {
        let out = execute(&env("ADD", &[]), stdin);
        let v = assert_error(&out, 6);
        assert_eq!(v["cniVersion"], "1.1.0");
    }
    drop(f);
}

#[test]
fn missing_env_is_code_4_and_names_the_variable() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0", json!({"prevResult": prev_1_0()}));
    let cases = [
        ("ADD", "CNI_COMMAND"),
        ("ADD", "CNI_CONTAINERID"),
        ("ADD", "CNI_NETNS"),
        ("ADD", "CNI_IFNAME"),
        ("CHECK", "CNI_CONTAINERID"),
        ("CHECK", "CNI_NETNS"),
        ("CHECK", "CNI_IFNAME"),
        ("DEL", "CNI_CONTAINERID"),
        ("DEL", "CNI_IFNAME"),
    ];
    for (cmd, var) in cases {
        let out = execute(&env_without(cmd, var), &conf);
        let v = assert_error(&out, 4);
        assert!(v["msg"].as_str().unwrap().contains(var), "{cmd} {var}: {v}");
        // Errors are written in the request's version.
        assert_eq!(v["cniVersion"], "1.0.0");
    }
}

#[test]
fn unknown_command_is_code_4() {
    let f = Fixture::new();
    let out = execute(&env("FROB", &[]), &f.conf("1.0.0", json!({})));
    let v = assert_error(&out, 4);
    assert!(v["msg"].as_str().unwrap().contains("FROB"));
}

#[test]
fn malformed_cni_args_is_code_4() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0", json!({"prevResult": prev_1_0()}));
    let out = execute(
        &env("ADD", &[("CNI_ARGS", "K8S_POD_NAMESPACE=x;oops")]),
        &conf,
    );
    assert_error(&out, 4);
}

#[test]
fn unknown_version_is_code_1() {
    let f = Fixture::new();
    for cmd in ["ADD", "DEL", "CHECK", "STATUS", "GC"] {
        let out = execute(
            &env(cmd, &[]),
            &f.conf("0.2.0", json!({"prevResult": prev_1_0()})),
        );
        let v = assert_error(&out, 1);
        assert_eq!(v["cniVersion"], "1.1.0", "an unknown version is not echoed");
    }
}

#[test]
fn missing_name_or_type_is_code_7() {
    let f = Fixture::new();
    for drop_key in ["name", "type", "cniVersion"] {
        let mut c: Value = serde_json::from_slice(&f.conf("1.0.0", json!({}))).unwrap();
        c.as_object_mut().unwrap().remove(drop_key);
        let out = execute(&env("DEL", &[]), c.to_string().as_bytes());
        assert_error(&out, 7);
    }
}

// ---------------------------------------------------------------- ADD

#[test]
fn add_without_prev_result_is_code_7() {
    let f = Fixture::new();
    for extra in [json!({}), json!({"prevResult": null})] {
        let out = execute(&env("ADD", &[]), &f.conf("1.0.0", extra));
        let v = assert_error(&out, 7);
        assert!(v["msg"].as_str().unwrap().contains("chained"), "{v}");
        assert_eq!(v["cniVersion"], "1.0.0");
    }
}

#[test]
fn add_with_wrong_prev_result_is_code_6() {
    let f = Fixture::new();
    for prev in [
        json!("10.0.0.1/24"),
        json!([1]),
        json!({"ips": "10.0.0.1/24"}),
        json!({"ips": [{"address": "10.0.0.300/24"}]}),
        json!({"ips": [{"address": "10.0.0.3"}]}),
        // An interface index past the end of `interfaces`: a decode error, not "agent
        // unavailable" (no agent runs in this fixture: the input is judged first).
        json!({"interfaces": [{"name": "eth0"}], "ips": [{"address": "10.0.0.3/24", "interface": 3}]}),
        json!({"ips": [{"address": "10.0.0.3/24", "interface": 0}]}),
    ] {
        let out = execute(
            &env("ADD", &[]),
            &f.conf("1.0.0", json!({"prevResult": prev})),
        );
        let v = assert_error(&out, 6);
        assert!(v["msg"].as_str().unwrap().contains("prevResult"), "{v}");
    }
}

#[test]
fn add_prints_prev_result_unchanged_1_0_shape() {
    let f = Fixture::new();
    let agent = f.agent(vec![ok(true, "namespace is ambient")]);
    let prev = prev_1_0();
    let out = execute(
        &env("ADD", &[]),
        &f.conf("1.0.0", json!({"prevResult": prev})),
    );
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    assert!(out.stdout.ends_with('\n'));
    assert_eq!(parse_stdout(&out), prev);
    assert_eq!(agent.requests().len(), 1);
}

#[test]
fn add_prints_prev_result_unchanged_0_3_1_shape() {
    let f = Fixture::new();
    let agent = f.agent(vec![ok(false, "namespace not ambient")]);
    let prev = prev_0_3_1();
    let out = execute(
        &env("ADD", &[]),
        &f.conf("0.3.1", json!({"prevResult": prev})),
    );
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    assert_eq!(parse_stdout(&out), prev);
    let reqs = agent.requests();
    let Request::Add { pod } = &reqs[0] else {
        panic!("{reqs:?}")
    };
    assert_eq!(
        pod.ips,
        vec![
            "10.88.0.7".parse::<IpAddr>().unwrap(),
            "fd88::7".parse().unwrap()
        ]
    );
    assert_eq!(pod.gateways, vec!["10.88.0.1".parse::<IpAddr>().unwrap()]);
}

#[test]
fn add_echoes_the_request_version_for_every_version() {
    let f = Fixture::new();
    let agent = f.agent(VERSIONS.iter().map(|_| ok(true, "")).collect());
    for v in VERSIONS {
        // prevResult claims another version; the output must carry the request's.
        let out = execute(
            &env("ADD", &[]),
            &f.conf(v, json!({"prevResult": prev_1_0()})),
        );
        assert_eq!(out.exit_code, 0, "{v}: {}", out.stdout);
        let got = parse_stdout(&out);
        assert_eq!(got["cniVersion"], v);
        assert_eq!(got["ips"], prev_1_0()["ips"]);
    }
    assert_eq!(agent.requests().len(), VERSIONS.len());
}

#[test]
fn add_sends_the_pod_to_the_agent() {
    let f = Fixture::new();
    let agent = f.agent(vec![ok(true, "namespace is ambient")]);
    let (out, logs) = capture_logs(|| {
        execute(
            &env("ADD", &[]),
            &f.conf("1.1.0", json!({"prevResult": prev_1_0()})),
        )
    });
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    let reqs = agent.requests();
    assert_eq!(
        reqs,
        vec![Request::Add {
            pod: PodInfo {
                container_id: "ctr-0123".into(),
                if_name: "eth0".into(),
                netns: "/var/run/netns/cni-0123".into(),
                namespace: "shop".into(),
                name: "web-7".into(),
                uid: "uid-42".into(),
                ips: vec![
                    "10.244.1.5".parse().unwrap(),
                    "fd00:10:244:1::5".parse().unwrap()
                ],
                gateways: vec![
                    "10.244.1.1".parse().unwrap(),
                    "fd00:10:244:1::1".parse().unwrap()
                ],
            }
        }]
    );
    // The verdict is logged with the pod's identity.
    assert!(logs.contains("enrolled"), "{logs}");
    assert!(logs.contains("namespace is ambient"), "{logs}");
    assert!(logs.contains("shop/web-7"), "{logs}");
    assert!(logs.contains("ctr-0123"), "{logs}");
}

#[test]
fn add_without_k8s_args_still_asks_the_agent() {
    let f = Fixture::new();
    let agent = f.agent(vec![ok(false, "no pod identity")]);
    let mut e = env("ADD", &[]);
    e.remove("CNI_ARGS");
    let out = execute(&e, &f.conf("1.0.0", json!({"prevResult": prev_1_0()})));
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    let reqs = agent.requests();
    let Request::Add { pod } = &reqs[0] else {
        panic!("{reqs:?}")
    };
    assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("", ""));
}

#[test]
fn add_with_agent_down_is_code_11() {
    let f = Fixture::new();
    // No socket at all.
    let out = execute(
        &env("ADD", &[]),
        &f.conf("1.0.0", json!({"prevResult": prev_1_0()})),
    );
    let v = assert_error(&out, 11);
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(v["details"].as_str().unwrap().contains("agent.sock"), "{v}");

    // A socket file with nobody listening (agent died): connection refused.
    let listener = UnixListener::bind(f.socket()).unwrap();
    drop(listener);
    let out = execute(
        &env("ADD", &[]),
        &f.conf("1.0.0", json!({"prevResult": prev_1_0()})),
    );
    assert_error(&out, 11);
}

#[test]
fn add_with_hung_agent_times_out_with_code_11() {
    let f = Fixture::new();
    let listener = UnixListener::bind(f.socket()).unwrap();
    let hold = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        thread::sleep(Duration::from_millis(1500));
        drop(s);
    });
    let start = Instant::now();
    let out = execute(
        &env("ADD", &[]),
        &f.conf("1.0.0", json!({"prevResult": prev_1_0(), "timeoutMs": 200})),
    );
    assert_error(&out, 11);
    assert!(start.elapsed() < Duration::from_millis(1200));
    hold.join().unwrap();
}

#[test]
fn add_with_agent_down_and_fail_open_succeeds_and_warns() {
    let f = Fixture::new();
    let prev = prev_1_0();
    let (out, logs) = capture_logs(|| {
        execute(
            &env("ADD", &[]),
            &f.conf("1.0.0", json!({"prevResult": prev, "failOpen": true})),
        )
    });
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    assert_eq!(parse_stdout(&out), prev);
    let warn = logs
        .lines()
        .find(|l| l.contains("WARN"))
        .unwrap_or_else(|| panic!("no WARN line in {logs}"));
    assert!(warn.contains("NOT captured"), "{warn}");
    assert!(warn.contains("shop/web-7"), "{warn}");
}

#[test]
fn add_agent_error_replies() {
    let f = Fixture::new();
    let agent = f.agent(vec![
        Reply::error("ztunnel not ready", true),
        Reply::error("cannot program nft", false),
        Reply::error("still failing", false),
    ]);
    let conf = f.conf("1.0.0", json!({"prevResult": prev_1_0()}));
    let v = assert_error(&execute(&env("ADD", &[]), &conf), 11);
    assert_eq!(v["details"], "ztunnel not ready");
    let v = assert_error(&execute(&env("ADD", &[]), &conf), 5);
    assert_eq!(v["details"], "cannot program nft");
    // failOpen does not override an answer from the agent.
    let conf = f.conf("1.0.0", json!({"prevResult": prev_1_0(), "failOpen": true}));
    assert_error(&execute(&env("ADD", &[]), &conf), 5);
    assert_eq!(agent.requests().len(), 3);
}

/// A listener that must not be connected to: non-blocking, checked after the call.
fn assert_never_contacted(f: &Fixture, run: impl FnOnce()) {
    let listener = UnixListener::bind(f.socket()).unwrap();
    listener.set_nonblocking(true).unwrap();
    run();
    match listener.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        other => panic!("the agent was contacted: {other:?}"),
    }
}

#[test]
fn excluded_namespace_is_never_blocked() {
    let f = Fixture::new();
    let args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1";
    let prev = prev_1_0();
    // Agent down, no failOpen: still succeeds.
    let out = execute(
        &env("ADD", &[("CNI_ARGS", args)]),
        &f.conf("1.0.0", json!({"prevResult": prev})),
    );
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    assert_eq!(parse_stdout(&out), prev);
    // Agent up: not even asked, for ADD and CHECK.
    assert_never_contacted(&f, || {
        let out = execute(
            &env("ADD", &[("CNI_ARGS", args)]),
            &f.conf("1.0.0", json!({"prevResult": prev})),
        );
        assert_eq!(out.exit_code, 0);
        let out = execute(
            &env("CHECK", &[("CNI_ARGS", args)]),
            &f.conf("1.0.0", json!({"prevResult": prev})),
        );
        assert_silent_success(&out);
    });
}

#[test]
fn excluded_namespaces_option_replaces_the_default() {
    let f = Fixture::new();
    let conf = f.conf(
        "1.0.0",
        json!({"prevResult": prev_1_0(), "excludedNamespaces": ["shop"]}),
    );
    let out = execute(&env("ADD", &[]), &conf);
    assert_eq!(out.exit_code, 0, "{}", out.stdout);
    // kube-system is no longer excluded: with the agent down it fails.
    let out = execute(
        &env("ADD", &[("CNI_ARGS", "K8S_POD_NAMESPACE=kube-system")]),
        &conf,
    );
    assert_error(&out, 11);
}

// ---------------------------------------------------------------- DEL

#[test]
fn del_with_agent_down_succeeds_silently() {
    let f = Fixture::new();
    let (out, logs) = capture_logs(|| execute(&env("DEL", &[]), &f.conf("1.0.0", json!({}))));
    assert_silent_success(&out);
    assert!(
        logs.contains("WARN") && logs.contains("unavailable"),
        "{logs}"
    );
}

#[test]
fn del_without_netns_and_repeated_succeeds() {
    let f = Fixture::new();
    let agent = f.agent(vec![
        ok(false, "removed"),
        ok(false, "unknown pod"),
        Reply::error("nft busy", true),
    ]);
    let e = env_without("DEL", "CNI_NETNS");
    // prevResult may be garbage on DEL: it is not read.
    let conf = f.conf("1.0.0", json!({"prevResult": {"ips": "broken"}}));
    for _ in 0..3 {
        assert_silent_success(&execute(&e, &conf));
    }
    let expected = Request::Del {
        container_id: "ctr-0123".into(),
        if_name: "eth0".into(),
    };
    assert_eq!(
        agent.requests(),
        vec![expected.clone(), expected.clone(), expected]
    );
    // And once more with the agent gone for good.
    assert_silent_success(&execute(&e, &conf));
}

#[test]
fn del_works_for_old_versions() {
    let f = Fixture::new();
    for v in VERSIONS {
        assert_silent_success(&execute(&env("DEL", &[]), &f.conf(v, json!({}))));
    }
}

// ---------------------------------------------------------------- CHECK

#[test]
fn check_before_0_4_0_is_code_1() {
    let f = Fixture::new();
    for v in ["0.3.0", "0.3.1"] {
        let out = execute(
            &env("CHECK", &[]),
            &f.conf(v, json!({"prevResult": prev_0_3_1()})),
        );
        let v_out = assert_error(&out, 1);
        assert_eq!(v_out["cniVersion"], v);
    }
}

#[test]
fn check_requires_prev_result() {
    let f = Fixture::new();
    let out = execute(&env("CHECK", &[]), &f.conf("1.0.0", json!({})));
    assert_error(&out, 7);
    let out = execute(
        &env("CHECK", &[]),
        &f.conf("1.0.0", json!({"prevResult": {"ips": [{"address": "x"}]}})),
    );
    assert_error(&out, 6);
}

#[test]
fn check_asks_the_agent() {
    let f = Fixture::new();
    let agent = f.agent(vec![
        ok(true, "in set"),
        Reply::error("pod not in set", false),
        Reply::error("agent starting", true),
    ]);
    let conf = f.conf("0.4.0", json!({"prevResult": prev_1_0()}));
    assert_silent_success(&execute(&env("CHECK", &[]), &conf));
    let v = assert_error(&execute(&env("CHECK", &[]), &conf), 5);
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_error(&execute(&env("CHECK", &[]), &conf), 11);
    let reqs = agent.requests();
    assert_eq!(
        reqs[0],
        Request::Check {
            container_id: "ctr-0123".into(),
            if_name: "eth0".into()
        }
    );
    // Agent gone: 11, or success under failOpen.
    assert_error(&execute(&env("CHECK", &[]), &conf), 11);
    let conf = f.conf("1.0.0", json!({"prevResult": prev_1_0(), "failOpen": true}));
    assert_silent_success(&execute(&env("CHECK", &[]), &conf));
}

// ---------------------------------------------------------------- STATUS

#[test]
fn status_with_agent_down_is_code_50() {
    let f = Fixture::new();
    let v = assert_error(
        &execute(&env("STATUS", &[]), &f.conf("1.1.0", json!({}))),
        50,
    );
    assert_eq!(v["cniVersion"], "1.1.0");
}

#[test]
fn status_with_agent_up_or_not_ready() {
    let f = Fixture::new();
    let agent = f.agent(vec![
        ok(false, "ready"),
        Reply::error("no ztunnel yet", true),
    ]);
    let conf = f.conf("1.1.0", json!({}));
    // STATUS needs no container env.
    let e: EnvMap = [("CNI_COMMAND".to_string(), "STATUS".to_string())].into();
    assert_silent_success(&execute(&e, &conf));
    let v = assert_error(&execute(&e, &conf), 50);
    assert_eq!(v["details"], "no ztunnel yet");
    assert_eq!(agent.requests(), vec![Request::Status, Request::Status]);
}

#[test]
fn status_and_gc_need_1_1_0() {
    let f = Fixture::new();
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
        for cmd in ["STATUS", "GC"] {
            let out = execute(&env(cmd, &[]), &f.conf(v, json!({})));
            assert_eq!(assert_error(&out, 1)["cniVersion"], v);
        }
    }
}

#[test]
fn status_with_agent_down_and_fail_open_succeeds() {
    let f = Fixture::new();
    let (out, logs) = capture_logs(|| {
        execute(
            &env("STATUS", &[]),
            &f.conf("1.1.0", json!({"failOpen": true})),
        )
    });
    assert_silent_success(&out);
    assert!(
        logs.contains("WARN") && logs.contains("NOT be captured"),
        "{logs}"
    );
}

// ---------------------------------------------------------------- GC

#[test]
fn gc_sends_the_union_of_both_attachment_keys() {
    let f = Fixture::new();
    let agent = f.agent(vec![ok(false, "dropped 2"), ok(false, "dropped 0")]);
    let e: EnvMap = [("CNI_COMMAND".to_string(), "GC".to_string())].into();
    let conf = f.conf(
        "1.1.0",
        json!({
            "cni.dev/valid-attachments": [
                {"containerID": "a1", "ifname": "eth0"},
                {"containerID": "b2", "ifname": "eth0"}
            ],
            "cni.dev/attachments": [
                {"containerID": "a1", "ifname": "eth0"},
                {"containerID": "c3", "ifname": "net1"}
            ]
        }),
    );
    assert_silent_success(&execute(&e, &conf));
    // Only the legacy key.
    let conf_legacy = f.conf(
        "1.1.0",
        json!({"cni.dev/attachments": [{"containerID": "z9", "ifname": "eth0"}]}),
    );
    assert_silent_success(&execute(&e, &conf_legacy));
    let att = |c: &str, i: &str| Attachment {
        container_id: c.into(),
        if_name: i.into(),
    };
    assert_eq!(
        agent.requests(),
        vec![
            Request::Gc {
                valid: vec![att("a1", "eth0"), att("b2", "eth0"), att("c3", "net1")]
            },
            Request::Gc {
                valid: vec![att("z9", "eth0")]
            },
        ]
    );
}

#[test]
fn gc_without_attachments_sends_an_empty_list_and_warns() {
    let f = Fixture::new();
    let agent = f.agent(vec![ok(false, "")]);
    let (out, logs) = capture_logs(|| execute(&env("GC", &[]), &f.conf("1.1.0", json!({}))));
    assert_silent_success(&out);
    assert!(logs.contains("WARN"), "{logs}");
    assert_eq!(agent.requests(), vec![Request::Gc { valid: vec![] }]);
}

#[test]
fn gc_errors() {
    let f = Fixture::new();
    let conf = f.conf("1.1.0", json!({"cni.dev/valid-attachments": []}));
    assert_error(&execute(&env("GC", &[]), &conf), 11);
    let bad = f.conf(
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"ifname": "eth0"}]}),
    );
    assert_error(&execute(&env("GC", &[]), &bad), 7);
    let agent = f.agent(vec![
        Reply::error("busy", true),
        Reply::error("broken", false),
    ]);
    assert_error(&execute(&env("GC", &[]), &conf), 11);
    assert_error(&execute(&env("GC", &[]), &conf), 5);
    agent.requests();
}

// ---------------------------------------------------------------- robustness

#[test]
fn odd_inputs_never_panic_and_always_answer_in_cni_terms() {
    let f = Fixture::new();
    let stdins: Vec<Vec<u8>> = vec![
        vec![],
        b"\xff\xfe\x00".to_vec(),
        b"{\"cniVersion\":\"1.0.0\"}".to_vec(),
        b"{\"cniVersion\":null,\"name\":null,\"type\":null}".to_vec(),
        b"{\"cniVersion\":\"1.0.0\",\"name\":\"n\",\"type\":\"t\",\"prevResult\":{\"ips\":[null,1,\"x\"]}}".to_vec(),
        b"{\"cniVersion\":\"1.0.0\",\"name\":\"n\",\"type\":\"t\",\"prevResult\":{\"ips\":[{\"address\":\"\xc3\xa9/24\"}]}}".to_vec(),
        b"{\"cniVersion\":\"1.1.0\",\"name\":\"n\",\"type\":\"t\",\"cni.dev/valid-attachments\":{}}".to_vec(),
        b"{\"cniVersion\":\"1.1.0\",\"name\":\"n\",\"type\":\"t\",\"timeoutMs\":18446744073709551615}".to_vec(),
        f.conf("1.0.0", json!({"prevResult": {"ips": [{"address": "1.2.3.4/99999999999999999999"}]}})),
        b"9".repeat(10_000),
        b"[".repeat(10_000),
    ];
    for cmd in ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "", "add"] {
        for stdin in &stdins {
            let out = execute(&env(cmd, &[("CNI_ARGS", "A=1;;B==")]), stdin);
            if out.exit_code == 0 {
                assert!(out.stdout.is_empty() || parse_stdout(&out).is_object());
            } else {
                assert_eq!(out.exit_code, 1);
                let v = parse_stdout(&out);
                assert!(v["code"].as_u64().is_some(), "{cmd}: {v}");
            }
        }
    }
}

#[test]
fn run_writes_logs_to_the_log_file_not_stdout() {
    let f = Fixture::new();
    let log = f.dir.path().join("logs/ambient-cni.log");
    let conf = f.conf(
        "1.0.0",
        json!({"prevResult": prev_1_0(), "logFile": log, "failOpen": true}),
    );
    let out = crate::run(&env("ADD", &[]), &conf);
    assert_eq!(out.exit_code, 0);
    assert_eq!(parse_stdout(&out), prev_1_0());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("NOT captured"), "{text}");
    assert!(text.contains("ctr-0123"), "{text}");
}
