//! The CNI load drill's short form (issue 13, "Load"): `ambient-lab drill cni` with 2 rounds
//! of 50 ADDs at once then 50 DELs at once through the real chain, on a lab of its own.
//! Every call succeeds and nothing is left in the kernel (the drill fails otherwise); the
//! report counts every call. Needs root.

use std::process::Command;
use std::time::Duration;

use ambient_lab::procs;
use ambient_lab::unique_prefix;
use serde_json::Value;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");

#[test]
fn fifty_adds_then_fifty_dels_at_once_twice() {
    let prefix = unique_prefix("tdrl");
    let json = std::env::temp_dir().join(format!("{prefix}-drill.json"));
    let mut cmd = Command::new(LAB);
    cmd.args(["drill", "cni", "--prefix", &prefix])
        .args(["--concurrency", "50", "--rounds", "2", "--json"])
        .arg(&json);
    // Bounded: a hang is killed and fails the test.
    let out = procs::run_capture(&mut cmd, None, Duration::from_secs(300)).expect("drill ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "drill failed: {stderr}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(report["add"]["calls"], 100, "{report}");
    assert_eq!(report["del"]["calls"], 100, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["leaked"], 0, "{report}");
    for op in ["add", "del"] {
        let (p50, p99, max) = (
            report[op]["p50Ms"].as_f64().unwrap(),
            report[op]["p99Ms"].as_f64().unwrap(),
            report[op]["maxMs"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{op}: {report}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed calls: 0"));
    let left = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(left, 0, "the drill left network namespaces behind");
}
