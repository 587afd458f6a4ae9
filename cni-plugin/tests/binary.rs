//! The binary as a runtime execs it: env vars, config on stdin, result on stdout, logs in
//! the log file only.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;

use serde_json::{json, Value};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(env: &[(&str, &str)], stdin: &[u8]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambient-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn conf(dir: &Path, extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "k8s",
        "type": "ambient-cni",
        "agentSocket": dir.join("agent.sock"),
        "logFile": dir.join("log/cni.log"),
        "capabilities": {"portMappings": true},
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string().into_bytes()
}

fn pod_env(cmd: &str) -> Vec<(&str, &str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/abc123"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

fn prev() -> Value {
    json!({"cniVersion": "1.0.0", "ips": [{"address": "10.244.0.9/24", "gateway": "10.244.0.1"}], "extra": {"a": 1}})
}

#[test]
fn version_command() {
    let r = run(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"0.4.0"}"#);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
}

#[test]
fn add_with_agent_down_prints_only_the_error_and_logs_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(
        &pod_env("ADD"),
        &conf(dir.path(), json!({"prevResult": prev()})),
    );
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout.lines().count(), 1, "{:?}", r.stdout);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["code"], 11);
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(r.stderr, "");
    let log = std::fs::read_to_string(dir.path().join("log/cni.log")).unwrap();
    assert!(log.contains("ERROR") && log.contains("abc123"), "{log}");
}

#[test]
fn add_with_agent_prints_prev_result() {
    let dir = tempfile::tempdir().unwrap();
    let listener = UnixListener::bind(dir.path().join("agent.sock")).unwrap();
    let agent = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        (&s).write_all(b"{\"result\":\"ok\",\"enrolled\":true,\"reason\":\"ambient\"}\n")
            .unwrap();
        line
    });
    let r = run(
        &pod_env("ADD"),
        &conf(dir.path(), json!({"prevResult": prev()})),
    );
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    assert_eq!(serde_json::from_str::<Value>(&r.stdout).unwrap(), prev());
    let sent: Value = serde_json::from_str(&agent.join().unwrap()).unwrap();
    assert_eq!(sent["op"], "add");
    assert_eq!(sent["pod"]["name"], "web");
    let log = std::fs::read_to_string(dir.path().join("log/cni.log")).unwrap();
    assert!(log.contains("enrolled"), "{log}");
}

#[test]
fn del_without_netns_and_agent_succeeds_silently() {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<_> = pod_env("DEL")
        .into_iter()
        .filter(|(k, _)| *k != "CNI_NETNS")
        .collect();
    let r = run(&env, &conf(dir.path(), json!({})));
    assert_eq!(r.code, 0);
    assert_eq!(r.stdout, "");
}

#[test]
fn no_command_is_code_4() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(&[], &conf(dir.path(), json!({})));
    assert_eq!(r.code, 1);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["code"], 4);
    assert!(v["msg"].as_str().unwrap().contains("CNI_COMMAND"));
}
