//! The CNI plugin's input: the CNI_* environment, the network config on stdin and its
//! prevResult, parsed and validated as ADD, CHECK, DEL and GC do before the agent is
//! contacted. Nothing may panic, every refusal must be a well-formed CNI error, and an
//! accepted prevResult must come back out as ADD's JSON result.
#![no_main]

use ambient_cni::config::{self, NetConf};
use ambient_cni::env::{CniArgs, CniEnv};
use ambient_cni::prev_result::{self, PrevResult};
use ambient_cni::{CniError, EnvMap};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let (env, stdin) = split(data);
    if let Err(e) = CniEnv::from_map(&env) {
        check_error(&e);
    }
    if let Some(args) = env.get("CNI_ARGS") {
        if let Err(e) = CniArgs::parse(args) {
            check_error(&e);
        }
    }
    match NetConf::parse(stdin) {
        Ok(conf) => check_conf(&conf),
        Err(e) => check_error(&e),
    }
    // The lenient readers run on every input, before anything is validated.
    let _ = config::peek_version(stdin);
    let _ = config::peek_logging(stdin);
});

fn check_conf(conf: &NetConf) {
    if let Err(e) = conf.valid_attachments() {
        check_error(&e);
    }
    let Some(prev) = &conf.prev_result else {
        return;
    };
    match PrevResult::decode(prev) {
        Ok(decoded) => {
            let _ = (decoded.addresses(), decoded.gateways());
            let out = prev_result::to_output(prev, conf.cni_version)
                .expect("a decoded prevResult is written back as ADD's result");
            let v: Value = serde_json::from_str(&out).expect("ADD's result is JSON");
            assert_eq!(v["cniVersion"], conf.cni_version.as_str());
        }
        Err(e) => check_error(&e),
    }
}

/// A refusal is answered as the CNI error JSON, with its code and a message.
fn check_error(e: &CniError) {
    assert!(!e.msg().is_empty(), "an error without a message: {e:?}");
    let v: Value = serde_json::from_str(&e.to_json("1.1.0")).expect("error JSON");
    assert_eq!(v["code"].as_u64(), Some(u64::from(e.code())));
}

/// `KEY=VALUE` lines (the environment, read lossily as the binary does), a blank line, then
/// stdin as raw bytes. Without a blank line the whole input is stdin under a valid ADD env.
fn split(data: &[u8]) -> (EnvMap, &[u8]) {
    let Some(at) = data.windows(2).position(|w| w == b"\n\n") else {
        return (add_env(), data);
    };
    let env = String::from_utf8_lossy(&data[..at])
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (env, &data[at + 2..])
}

fn add_env() -> EnvMap {
    [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "0123456789abcdef"),
        ("CNI_NETNS", "/var/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=p",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}
