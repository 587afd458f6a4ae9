//! A corpus of malformed CNI inputs run through the real `ambient-cni` binary (issue 13, "Bad
//! input"): env, config, prevResult of every supported version, GC attachments, oversized and
//! non-UTF-8 stdin. Every case must answer the CNI error JSON with the expected code and a
//! `msg` naming the offending field, and must be refused before anything is contacted:
//!
//! * run with no agent listening, the code is never 11 ("try again"): an input error is not
//!   reported as an unavailable agent;
//! * run again with a fake agent socket that counts connections, the count stays 0.
//!
//! A well-formed control ADD (code 11 without an agent, one connection with the fake socket)
//! shows that both checks would see a plugin that contacts the agent.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

struct Case {
    name: &'static str,
    /// Variables set on top of (or, with an empty value… see `unset`) the valid pod env.
    env: Vec<(&'static str, String)>,
    /// Variables removed from the valid pod env.
    unset: Vec<&'static str>,
    stdin: Stdin,
    code: u64,
    /// A substring `msg` must contain (the offending field).
    field: &'static str,
}

enum Stdin {
    /// A config: the valid one with these keys replaced (null removes a key).
    Conf(Value),
    /// Bytes as they are.
    Raw(Vec<u8>),
}

fn valid_conf(dir: &Path, version: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "ambient-cni",
        "agentSocket": dir.join("agent.sock"),
        "logFile": dir.join("cni.log"),
        "timeoutMs": 300,
        "prevResult": prev_for(version),
    })
}

/// A valid prevResult in the shape of `version` (0.3.x names the IP family).
fn prev_for(version: &str) -> Value {
    let mut ip = json!({"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1});
    if version.starts_with("0.3") {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [{"name": "veth1", "mac": "aa:bb:cc:dd:ee:ff"},
                       {"name": "eth0", "sandbox": "/var/run/netns/p"}],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.96.0.10"]},
    })
}

fn pod_env() -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", "ADD".into()),
        ("CNI_CONTAINERID", "abc123".into()),
        ("CNI_NETNS", "/var/run/netns/abc123".into()),
        ("CNI_IFNAME", "eth0".into()),
        (
            "CNI_ARGS",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web".into(),
        ),
        ("CNI_PATH", "/opt/cni/bin".into()),
    ]
}

/// Builds the stdin of a case: `patch` replaces keys of the valid config at top level, or of
/// its prevResult under `"prevResult.<key>"` (and `"prevResult.ips[0].<key>"`).
fn render(dir: &Path, stdin: &Stdin) -> Vec<u8> {
    match stdin {
        Stdin::Raw(b) => b.clone(),
        Stdin::Conf(patch) => {
            let version = patch
                .get("cniVersion")
                .and_then(Value::as_str)
                .filter(|v| v.len() == 5)
                .unwrap_or("1.0.0");
            let mut c = valid_conf(dir, version);
            for (k, v) in patch.as_object().unwrap() {
                let (target, key) = if let Some(k) = k.strip_prefix("prevResult.ips[0].") {
                    (&mut c["prevResult"]["ips"][0], k)
                } else if let Some(k) = k.strip_prefix("prevResult.") {
                    (&mut c["prevResult"], k)
                } else {
                    (&mut c, k.as_str())
                };
                if v.is_null() {
                    target.as_object_mut().unwrap().remove(key);
                } else {
                    target[key] = v.clone();
                }
            }
            c.to_string().into_bytes()
        }
    }
}

struct Answer {
    exit: i32,
    stdout: String,
}

fn run(env: &[(&str, String)], stdin: Vec<u8>) -> Answer {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambient-cni"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut w = child.stdin.take().unwrap();
    // The plugin stops reading at its limit: a write error here is expected then.
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    Answer {
        exit: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
    }
}

fn c(name: &'static str, stdin: Value, code: u64, field: &'static str) -> Case {
    Case {
        name,
        env: vec![],
        unset: vec![],
        stdin: Stdin::Conf(stdin),
        code,
        field,
    }
}

fn e(name: &'static str, env: &[(&'static str, &str)], code: u64, field: &'static str) -> Case {
    Case {
        name,
        env: env.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        unset: vec![],
        stdin: Stdin::Conf(json!({})),
        code,
        field,
    }
}

fn corpus() -> Vec<Case> {
    let big = "a".repeat(100_000);
    let mut cases = vec![
        // ------------------------------------------------------------------ env
        e("no CNI_COMMAND value", &[("CNI_COMMAND", "")], 4, "CNI_COMMAND"),
        e("unknown command", &[("CNI_COMMAND", "ATTACH")], 4, "CNI_COMMAND"),
        e("lower-case command", &[("CNI_COMMAND", "add")], 4, "CNI_COMMAND"),
        e("empty CNI_CONTAINERID", &[("CNI_CONTAINERID", "")], 4, "CNI_CONTAINERID"),
        e("empty CNI_IFNAME", &[("CNI_IFNAME", "")], 4, "CNI_IFNAME"),
        e("empty CNI_NETNS", &[("CNI_NETNS", "")], 4, "CNI_NETNS"),
        e("CNI_CONTAINERID with a slash", &[("CNI_CONTAINERID", "../etc")], 4, "CNI_CONTAINERID"),
        e("CNI_IFNAME too long", &[("CNI_IFNAME", "eth0123456789012")], 4, "CNI_IFNAME"),
        e("CNI_IFNAME with a colon", &[("CNI_IFNAME", "eth0:1")], 4, "CNI_IFNAME"),
        e("CNI_ARGS pair without =", &[("CNI_ARGS", "K8S_POD_NAMESPACE")], 4, "CNI_ARGS"),
        e("CNI_ARGS empty key", &[("CNI_ARGS", "A=1;=x")], 4, "CNI_ARGS"),
        e("CNI_ARGS on DEL", &[("CNI_COMMAND", "DEL"), ("CNI_ARGS", "nonsense")], 4, "CNI_ARGS"),
        e("DEL with a bad CNI_IFNAME", &[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "a b")], 4, "CNI_IFNAME"),
        Case {
            env: vec![("CNI_CONTAINERID", big.clone())],
            ..e("oversized CNI_CONTAINERID", &[], 4, "CNI_CONTAINERID")
        },
        Case {
            env: vec![("CNI_NETNS", format!("/var/run/netns/{big}"))],
            ..e("oversized CNI_NETNS", &[], 4, "CNI_NETNS")
        },
        Case {
            env: vec![("CNI_ARGS", format!("K8S_POD_NAME={big}"))],
            ..e("oversized CNI_ARGS", &[], 4, "CNI_ARGS")
        },
        Case {
            env: vec![("CNI_IFNAME", big.clone())],
            ..e("oversized CNI_IFNAME", &[], 4, "CNI_IFNAME")
        },
        // --------------------------------------------------------------- config
        c("cniVersion missing", json!({"cniVersion": null}), 7, "cniVersion"),
        c("cniVersion a number", json!({"cniVersion": 1.0}), 7, "cniVersion"),
        c("cniVersion unsupported", json!({"cniVersion": "0.2.0"}), 1, "0.2.0"),
        c("cniVersion from the future", json!({"cniVersion": "2.0.0"}), 1, "2.0.0"),
        c("name missing", json!({"name": null}), 7, "name"),
        c("name empty", json!({"name": ""}), 7, "name"),
        c("type missing", json!({"type": null}), 7, "type"),
        c("type a list", json!({"type": ["ambient-cni"]}), 7, "type"),
        c("agentSocket a number", json!({"agentSocket": 5}), 7, "agentSocket"),
        c("agentSocket empty", json!({"agentSocket": ""}), 7, "agentSocket"),
        c("timeoutMs a string", json!({"timeoutMs": "5000"}), 7, "timeoutMs"),
        c("timeoutMs zero", json!({"timeoutMs": 0}), 7, "timeoutMs"),
        c("timeoutMs negative", json!({"timeoutMs": -1}), 7, "timeoutMs"),
        c("failOpen a string", json!({"failOpen": "true"}), 7, "failOpen"),
        c("excludedNamespaces a string", json!({"excludedNamespaces": "kube-system"}), 7, "excludedNamespaces"),
        c("excludedNamespaces with a number", json!({"excludedNamespaces": ["a", 1]}), 7, "excludedNamespaces"),
        c("logLevel unknown", json!({"logLevel": "loud"}), 7, "logLevel"),
        c("no prevResult (not chained)", json!({"prevResult": null}), 7, "chained"),
        // ------------------------------------------------------ stdin as a whole
        Case {
            stdin: Stdin::Raw(b"not json".to_vec()),
            ..c("stdin not JSON", json!({}), 6, "decode")
        },
        Case {
            stdin: Stdin::Raw(Vec::new()),
            ..c("stdin empty", json!({}), 6, "decode")
        },
        Case {
            stdin: Stdin::Raw(b"[1, 2]".to_vec()),
            ..c("stdin a list", json!({}), 6, "JSON object")
        },
        Case {
            stdin: Stdin::Raw(b"{\"cniVersion\":\"1.0.0\",\"name\":\"k8s\",\"type\":\"ambient-cni\",\"prevResult\":{}".to_vec()),
            ..c("stdin truncated", json!({}), 6, "decode")
        },
        Case {
            stdin: Stdin::Raw(b"{\"cniVersion\":\"1.0.0\",\"name\":\"\xff\xfek8s\",\"type\":\"ambient-cni\"}".to_vec()),
            ..c("stdin not UTF-8", json!({}), 6, "decode")
        },
        Case {
            stdin: Stdin::Raw(
                format!(
                    "{{\"cniVersion\":\"1.0.0\",\"name\":\"k8s\",\"type\":\"ambient-cni\",\"pad\":\"{}\"}}",
                    "x".repeat(5 << 20)
                )
                .into_bytes(),
            ),
            ..c("stdin over the 4 MiB limit", json!({}), 6, "limit")
        },
        // --------------------------------------------- prevResult, per version
        c("0.3.0: ips[].version disagrees", json!({"cniVersion": "0.3.0", "prevResult.ips[0].version": "6"}), 6, "prevResult.ips[0].version"),
        c("0.3.0: ips a map", json!({"cniVersion": "0.3.0", "prevResult.ips": {"address": "10.0.0.1/24"}}), 6, "prevResult.ips"),
        c("0.3.1: address without prefix", json!({"cniVersion": "0.3.1", "prevResult.ips[0].address": "10.244.1.5"}), 6, "prevResult.ips[0].address"),
        c("0.3.1: gateway not an address", json!({"cniVersion": "0.3.1", "prevResult.ips[0].gateway": "10.244.1"}), 6, "prevResult.ips[0].gateway"),
        c("0.3.1: interface index past interfaces", json!({"cniVersion": "0.3.1", "prevResult.ips[0].interface": 2}), 6, "prevResult.ips[0].interface"),
        c("0.4.0: interface index past interfaces", json!({"cniVersion": "0.4.0", "prevResult.ips[0].interface": 7}), 6, "prevResult.ips[0].interface"),
        c("0.4.0: interface index negative", json!({"cniVersion": "0.4.0", "prevResult.ips[0].interface": -1}), 6, "prevResult.ips[0].interface"),
        c("0.4.0: prefix too long", json!({"cniVersion": "0.4.0", "prevResult.ips[0].address": "10.244.1.5/33"}), 6, "prevResult.ips[0].address"),
        c("1.0.0: interface index past an empty interfaces", json!({"cniVersion": "1.0.0", "prevResult.interfaces": []}), 6, "prevResult.ips[0].interface"),
        c("1.0.0: interfaces a map", json!({"cniVersion": "1.0.0", "prevResult.interfaces": {"eth0": {}}}), 6, "prevResult.interfaces"),
        c("1.0.0: interface without a name", json!({"cniVersion": "1.0.0", "prevResult.interfaces": [{"mac": "x"}, {"name": "eth0"}]}), 6, "prevResult.interfaces[0].name"),
        c("1.0.0: interface mac a number", json!({"cniVersion": "1.0.0", "prevResult.interfaces": [{"name": "v", "mac": 1}, {"name": "eth0"}]}), 6, "prevResult.interfaces[0].mac"),
        c("1.0.0: address a number", json!({"cniVersion": "1.0.0", "prevResult.ips[0].address": 167772161}), 6, "prevResult.ips[0].address"),
        c("1.0.0: ips entry a string", json!({"cniVersion": "1.0.0", "prevResult.ips": ["10.0.0.1/24"]}), 6, "prevResult.ips[0]"),
        c("1.0.0: prevResult a list", json!({"cniVersion": "1.0.0", "prevResult": [1]}), 6, "prevResult"),
        c("1.0.0: routes a map", json!({"cniVersion": "1.0.0", "prevResult.routes": {"dst": "0.0.0.0/0"}}), 6, "prevResult.routes"),
        c("1.0.0: route without dst", json!({"cniVersion": "1.0.0", "prevResult.routes": [{"gw": "10.0.0.1"}]}), 6, "prevResult.routes[0].dst"),
        c("1.0.0: route gw not an address", json!({"cniVersion": "1.0.0", "prevResult.routes": [{"dst": "0.0.0.0/0", "gw": "gateway"}]}), 6, "prevResult.routes[0].gw"),
        c("1.0.0: dns a list", json!({"cniVersion": "1.0.0", "prevResult.dns": ["10.96.0.10"]}), 6, "prevResult.dns"),
        c("1.0.0: dns.nameservers a string", json!({"cniVersion": "1.0.0", "prevResult.dns": {"nameservers": "10.96.0.10"}}), 6, "prevResult.dns.nameservers"),
        c("1.1.0: dns.search with a number", json!({"cniVersion": "1.1.0", "prevResult.dns": {"search": ["svc", 1]}}), 6, "prevResult.dns.search"),
        c("1.1.0: dns.domain a list", json!({"cniVersion": "1.1.0", "prevResult.dns": {"domain": ["x"]}}), 6, "prevResult.dns.domain"),
        c("1.1.0: route mtu a string", json!({"cniVersion": "1.1.0", "prevResult.routes": [{"dst": "0.0.0.0/0", "mtu": "1500"}]}), 6, "prevResult.routes[0].mtu"),
        c("1.1.0: route table negative", json!({"cniVersion": "1.1.0", "prevResult.routes": [{"dst": "0.0.0.0/0", "table": -3}]}), 6, "prevResult.routes[0].table"),
        c("1.1.0: interface mtu a string", json!({"cniVersion": "1.1.0", "prevResult.interfaces": [{"name": "v", "mtu": "1500"}, {"name": "eth0"}]}), 6, "prevResult.interfaces[0].mtu"),
        c("1.1.0: interface index past interfaces", json!({"cniVersion": "1.1.0", "prevResult.ips[0].interface": 2}), 6, "prevResult.ips[0].interface"),
    ];
    // The same ADD checks on CHECK, and commands a version does not define.
    cases.push(Case {
        env: vec![("CNI_COMMAND", "CHECK".into())],
        ..c(
            "CHECK: interface index past interfaces",
            json!({"prevResult.ips[0].interface": 5}),
            6,
            "prevResult.ips[0].interface",
        )
    });
    cases.push(Case {
        env: vec![("CNI_COMMAND", "CHECK".into())],
        ..c("CHECK on 0.3.1", json!({"cniVersion": "0.3.1"}), 1, "CHECK")
    });
    cases.push(Case {
        env: vec![("CNI_COMMAND", "STATUS".into())],
        ..c(
            "STATUS on 1.0.0",
            json!({"cniVersion": "1.0.0"}),
            1,
            "STATUS",
        )
    });
    // ------------------------------------------------------------ GC attachments
    let gc = |name, patch: Value, field| Case {
        env: vec![("CNI_COMMAND", "GC".into())],
        unset: vec!["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"],
        ..c(name, patch, 7, field)
    };
    let patch = |v: Value| {
        let mut p = json!({"cniVersion": "1.1.0", "prevResult": null});
        for (k, x) in v.as_object().unwrap() {
            p[k] = x.clone();
        }
        p
    };
    cases.extend([
        gc("GC: valid-attachments a map", patch(json!({"cni.dev/valid-attachments": {"containerID": "a", "ifname": "eth0"}})), "cni.dev/valid-attachments"),
        gc("GC: valid-attachments a string", patch(json!({"cni.dev/valid-attachments": "a/eth0"})), "cni.dev/valid-attachments"),
        gc("GC: entry a string", patch(json!({"cni.dev/valid-attachments": ["a"]})), "cni.dev/valid-attachments[0]"),
        gc("GC: entry without ifname", patch(json!({"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b"}]})), "cni.dev/valid-attachments[1]"),
        gc("GC: entry without containerID", patch(json!({"cni.dev/valid-attachments": [{"ifname": "eth0"}]})), "containerID"),
        gc("GC: containerID a number", patch(json!({"cni.dev/valid-attachments": [{"containerID": 7, "ifname": "eth0"}]})), "containerID"),
        gc("GC: ifname empty", patch(json!({"cni.dev/valid-attachments": [{"containerID": "a", "ifname": ""}]})), "ifname"),
        gc("GC: libcni's key a map", patch(json!({"cni.dev/attachments": {}})), "cni.dev/attachments"),
        Case {
            code: 1,
            ..gc("GC on 1.0.0", json!({"cniVersion": "1.0.0", "prevResult": null}), "GC")
        },
    ]);
    // No CNI_COMMAND at all, and ADD without each of its required variables.
    cases.push(Case {
        unset: vec!["CNI_COMMAND"],
        ..e("no CNI_COMMAND", &[], 4, "CNI_COMMAND")
    });
    for (name, var) in [
        ("ADD without CNI_CONTAINERID", "CNI_CONTAINERID"),
        ("ADD without CNI_IFNAME", "CNI_IFNAME"),
        ("ADD without CNI_NETNS", "CNI_NETNS"),
    ] {
        cases.push(Case {
            unset: vec![var],
            ..e(name, &[], 4, var)
        });
    }
    cases
}

fn env_of(case: &Case) -> Vec<(&'static str, String)> {
    let mut env: Vec<_> = pod_env()
        .into_iter()
        .filter(|(k, _)| !case.unset.contains(k) && !case.env.iter().any(|(o, _)| o == k))
        .collect();
    env.extend(case.env.iter().cloned());
    env
}

/// Runs `case`; returns the error JSON (asserting it is one).
fn check(dir: &Path, case: &Case) -> Value {
    let a = run(&env_of(case), render(dir, &case.stdin));
    assert_eq!(a.exit, 1, "{}: exit {} {}", case.name, a.exit, a.stdout);
    assert_eq!(a.stdout.lines().count(), 1, "{}: {:?}", case.name, a.stdout);
    let v: Value = serde_json::from_str(&a.stdout)
        .unwrap_or_else(|e| panic!("{}: {e}: {:?}", case.name, a.stdout));
    let msg = v["msg"].as_str().unwrap_or_default();
    assert_ne!(
        v["code"], 11,
        "{}: input error answered as try-again: {v}",
        case.name
    );
    assert_eq!(v["code"], case.code, "{}: {v}", case.name);
    assert!(
        msg.contains(case.field),
        "{}: msg does not name {:?}: {v}",
        case.name,
        case.field
    );
    v
}

#[test]
fn corpus_has_at_least_40_cases_with_distinct_names() {
    let cases = corpus();
    eprintln!("{} malformed inputs", cases.len());
    assert!(cases.len() >= 40, "{}", cases.len());
    let mut names: Vec<_> = cases.iter().map(|c| c.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "duplicate case names");
}

#[test]
fn every_malformed_input_is_refused_before_the_agent_is_contacted() {
    let dir = tempfile::tempdir().unwrap();
    let cases = corpus();
    // First with nothing listening on the agent socket.
    for case in &cases {
        check(dir.path(), case);
    }
    // Then with a socket that counts every connection the plugin makes.
    let listener = UnixListener::bind(dir.path().join("agent.sock")).unwrap();
    listener.set_nonblocking(true).unwrap();
    for case in &cases {
        check(dir.path(), case);
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{}: the agent socket was contacted: {other:?}", case.name),
        }
    }
}

/// The control: well-formed input of every version reaches the agent, so the checks above
/// would catch a plugin that contacts it first.
#[test]
fn well_formed_input_does_reach_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let conf = valid_conf(dir.path(), version).to_string().into_bytes();
        // Unknown keys are tolerated (a chained plugin must not fail on the runtime's extras).
        let mut with_extra = valid_conf(dir.path(), version);
        with_extra["capabilities"] = json!({"portMappings": true});
        with_extra["someVendorKey"] = json!([1]);
        for stdin in [conf, with_extra.to_string().into_bytes()] {
            let a = run(&pod_env(), stdin.clone());
            let v: Value = serde_json::from_str(&a.stdout).unwrap();
            assert_eq!(v["code"], 11, "{version}: {v}");
            let listener = UnixListener::bind(dir.path().join("agent.sock")).unwrap();
            listener.set_nonblocking(true).unwrap();
            let a = run(&pod_env(), stdin);
            assert_eq!(a.exit, 1, "{version}");
            assert!(listener.accept().is_ok(), "{version}: agent not contacted");
            drop(listener);
            std::fs::remove_file(dir.path().join("agent.sock")).unwrap();
        }
    }
}
