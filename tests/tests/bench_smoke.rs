//! A smoke run of `ambient-lab bench --quick`: it brings its lab up, prints the table, writes
//! valid JSON with every section and tears the lab down. The targets are not asserted (a
//! benchmark is not a timed test). Needs root.

use std::process::Command;

use ambient_lab::unique_prefix;
use serde_json::Value;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");

#[test]
fn quick_bench_prints_the_table_and_writes_json() {
    let prefix = unique_prefix("tbench");
    let dir = std::env::temp_dir().join(format!("{prefix}-out"));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let out = Command::new(LAB)
        .args(["bench", "--quick", "--prefix", &prefix, "--json"])
        .arg(&json_path)
        .output()
        .expect("run ambient-lab bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for needle in [
        "DATA PLANE",
        "bulk TCP, 1 stream",
        "1 KB req/resp p50",
        "new connection + 1 B echo p50",
        "ztunnel RSS idle",
        "HTTP/1.1 keep-alive GET, 1 KB body",
        "1 client p50, µs",
        "16 clients p99, µs",
        "16 clients requests/s",
        "waypoint CPU ms per 1000 requests, 16 client(s)",
        "waypoint RSS, MB: idle (fresh)",
        "CONTROL PLANE",
        "CNI ADD, whole chain, 10 pods enrolled",
        "ambient-cni share of ADD (P6), 10 pods",
        "agent cold start",
        "ztunnel IP change",
        "TARGETS",
    ] {
        assert!(
            stdout.contains(needle),
            "no {needle:?} in the table:\n{stdout}"
        );
    }
    for id in ["P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(id)
                && (l.ends_with("met") || l.ends_with("NOT MET") || l.ends_with("n/a"))),
            "no verdict for {id}:\n{stdout}"
        );
    }

    let report: Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("the JSON file")).unwrap();
    let num = |ptr: &str| {
        report
            .pointer(ptr)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("no number at {ptr} in {report:#}"))
    };
    for ptr in [
        "/dataplane/oneStream/gbps/meshed/median",
        "/dataplane/oneStream/gbps/unmeshed/median",
        "/dataplane/fourStreams/gbps/meshed/median",
        "/dataplane/oneStream/ztunnelCpuSecondsPerGb/median",
        "/dataplane/reqResp1k/latency/p50Us/meshed/median",
        "/dataplane/reqResp1k/latency/p999Us/unmeshed/median",
        "/dataplane/reqResp1k/addedP50Us/median",
        "/dataplane/connect/latency/p99Us/meshed/median",
        "/dataplane/connect/perSecond/unmeshed/median",
        "/dataplane/rss/idleMb/a/median",
        "/dataplane/rss/openMb/b/median",
        "/dataplane/http1k/levels/0/p50Us/l7/median",
        "/dataplane/http1k/levels/0/p50Us/l4/median",
        "/dataplane/http1k/levels/0/p50Us/unmeshed/median",
        "/dataplane/http1k/levels/0/p99Us/l7/median",
        "/dataplane/http1k/levels/0/requestsPerSecond/l7/median",
        "/dataplane/http1k/levels/1/p50Us/l7/median",
        "/dataplane/http1k/levels/1/p99Us/unmeshed/median",
        "/dataplane/http1k/levels/1/requestsPerSecond/l7/median",
        "/dataplane/http1k/levels/1/requestsPerSecond/l4/median",
        "/dataplane/http1k/levels/1/requestsPerSecond/unmeshed/median",
        "/dataplane/http1k/levels/1/ztunnelCpuMsPer1000/l7/median",
        "/dataplane/http1k/waypoint/rssIdleMb/median",
        "/dataplane/http1k/waypoint/rssLoadMb/median",
        "/dataplane/http1k/waypoint/cpuMsPer1000/median",
        "/controlplane/levels/0/chainAddMs/p50/median",
        "/controlplane/levels/0/chainDelMs/p99/median",
        "/controlplane/levels/0/pluginAddMs/p99/median",
        "/controlplane/coldStart/restartS/median",
        "/controlplane/coldStart/flushedS/median",
        "/controlplane/ztunnelIpChange/totalS/median",
    ] {
        let v = num(ptr);
        assert!(v.is_finite() && v > 0.0, "{ptr} = {v}");
    }
    assert_eq!(num("/controlplane/levels/0/pods"), 10.0);
    assert_eq!(num("/dataplane/http1k/levels/0/clients"), 1.0);
    assert_eq!(num("/dataplane/http1k/levels/1/clients"), 16.0);
    // A difference of two medians: present, not necessarily positive.
    assert!(num("/dataplane/http1k/addedP50L7OverL4Us/median").is_finite());
    assert!(report["build"] == "debug" || report["build"] == "release");
    let targets = report["targets"].as_array().expect("targets");
    for id in ["P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9"] {
        assert!(
            targets.iter().any(|t| t["id"] == id),
            "no target {id} in the JSON"
        );
    }
    // The lab is gone.
    assert!(!ambient_lab::paths::state_file(&prefix).exists());
    let left: Vec<_> = ambient_net::netns::list_named()
        .unwrap()
        .into_iter()
        .filter(|n| ambient_lab::paths::owns_netns(&prefix, n))
        .collect();
    assert!(left.is_empty(), "netns left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
