//! The libcni client against a `--no-agent` lab: CHECK, repeated DEL, GC of stale
//! attachments from libcni's cache, and CNI error codes on stderr. Needs root.

use std::process::Output;

use ambient_lab::cni::parse_cni_error;
use ambient_lab::{unique_prefix, Lab, LabOptions};
use serde_json::Value;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");

fn ok(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Interface names in a lab netns, from the thread's own view of /proc.
fn links(lab: &Lab, short: &str) -> Vec<String> {
    lab.run_in(short, || {
        std::fs::read_to_string("/proc/thread-self/net/dev")
            .unwrap()
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(|n| n.trim().to_string())
            .collect()
    })
    .unwrap()
}

#[test]
fn check_del_gc_and_error_codes() {
    let lab = Lab::up(&unique_prefix("tcni"), LabOptions::new(LAB).no_agent()).expect("lab up");
    let plain = lab.pod("a-plain").clone();
    let plain_veth = plain.host_veth.clone().expect("host veth");
    assert!(links(&lab, "nodeA").contains(&plain_veth));

    ok("CHECK a-app", &lab.cni("check", "a-app").unwrap());

    // GC keeping every node-A attachment but a-plain's: a-plain is DELeted from the cache.
    let valid: Vec<Value> = lab
        .status()
        .pods
        .iter()
        .filter(|p| p.node == "A" && p.id != "a-plain")
        .map(|p| serde_json::json!({"containerID": p.container_id, "ifname": "eth0"}))
        .collect();
    let node = lab.status().node("A").unwrap().clone();
    let conf_dir = node.cni_conf_dir.display().to_string();
    let out = lab
        .cniclient(
            "A",
            &["gc", &conf_dir, "ambient", &Value::from(valid).to_string()],
            "",
        )
        .unwrap();
    let report: Value = serde_json::from_str(&ok("GC", &out)).unwrap();
    let deleted = report["deletedStale"].as_array().unwrap();
    assert_eq!(deleted.len(), 1, "{report}");
    assert_eq!(deleted[0]["containerID"], plain.container_id.as_str());
    // cniVersion 1.0.0: the plugins themselves get no GC (as libcni 1.2 does it).
    assert_eq!(report["pluginsCalled"], serde_json::json!([]));
    // The stale DEL carries no netns (libcni 1.1.2 does not cache it), so ptp leaves the
    // veth alone but host-local releases the address.
    let conflist: Value = serde_json::from_slice(&std::fs::read(&node.conflist).unwrap()).unwrap();
    let leases = std::path::Path::new(conflist["plugins"][0]["ipam"]["dataDir"].as_str().unwrap())
        .join("ambient");
    let lease = leases.join(plain.ip.unwrap().to_string());
    assert!(!lease.exists(), "{} still leased", lease.display());
    assert!(leases.join(lab.pod_ip("a-app").to_string()).exists());

    // DEL of something already gone succeeds, twice.
    ok("DEL again", &lab.cni("del", "a-plain").unwrap());
    ok("DEL again", &lab.cni("del", "a-plain").unwrap());

    // A plugin's error reaches stderr with its CNI code: ptp 1.1.1 speaks up to 1.0.0.
    let dir = lab.status().run_dir.join("cni-1.1.0");
    std::fs::create_dir_all(&dir).unwrap();
    let mut conf = conflist.clone();
    conf["cniVersion"] = "1.1.0".into();
    std::fs::write(dir.join("10-new.conflist"), conf.to_string()).unwrap();
    let netns = lab.netns_path("a-plain").display().to_string();
    let dir = dir.display().to_string();
    let out = lab
        .cniclient(
            "A",
            &["add", &dir, "ambient", &netns, "tcni-version", "eth0"],
            "IgnoreUnknown=1",
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = parse_cni_error(&String::from_utf8_lossy(&out.stderr)).expect("cni-error line");
    assert_eq!(err.code, 1, "incompatible CNI version: {err:?}");
}
