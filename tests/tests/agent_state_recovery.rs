//! The agent's state directory damaged under a running node (issue 13): `state.json` cut in
//! half, overwritten with garbage, or the whole directory deleted while the agent is dead. The
//! restarted agent must start, say what it found, rebuild its records from the runtime's CNI
//! cache and the kernel, and converge without flushing: the node's kernel state is exactly as
//! before, a held connection through the path is not cut, and a CNI DEL afterwards removes
//! exactly that pod's route and elements (its record was rebuilt with the runtime's container
//! id). Needs root.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ambient_lab::snapshot::{lines_only_in, node_snapshot};
use ambient_lab::state::{LabState, ProcessRecord};
use ambient_lab::{cni, procs, unique_prefix, Lab, LabOptions};
use ambient_net::netns;

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");
/// How long a restarted agent may take to serve (it answers in well under a second).
const START_TIMEOUT: Duration = Duration::from_secs(15);

fn sigkill(rec: &ProcessRecord) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rec.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while procs::is_alive(rec) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!procs::is_alive(rec), "agent survived SIGKILL");
}

/// Waits for the agent's "serving" line (after its first reconcile); returns its log.
fn wait_serving(log: &Path, rec: &ProcessRecord) -> String {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("serving") {
            return text;
        }
        assert!(procs::is_alive(rec), "the restarted agent exited:\n{text}");
        assert!(
            Instant::now() < deadline,
            "the restarted agent did not serve within {START_TIMEOUT:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    TruncatedToHalf,
    Garbage,
    DirDeleted,
    /// The directory deleted and a-app's netns not found (its cached sandbox path made stale,
    /// the netns scan pointed nowhere): a-app is rebuilt from the kernel alone.
    DirDeletedNetnsUnknown,
}

impl Damage {
    fn apply(self, state_dir: &Path) {
        let snapshot = state_dir.join("state.json");
        match self {
            Damage::TruncatedToHalf => {
                let bytes = std::fs::read(&snapshot).unwrap();
                assert!(
                    bytes.len() > 100,
                    "a state with pods: {} bytes",
                    bytes.len()
                );
                std::fs::write(&snapshot, &bytes[..bytes.len() / 2]).unwrap();
            }
            Damage::Garbage => {
                let junk: Vec<u8> = (0..4096u32)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect();
                std::fs::write(&snapshot, junk).unwrap();
            }
            Damage::DirDeleted | Damage::DirDeletedNetnsUnknown => {
                std::fs::remove_dir_all(state_dir).unwrap()
            }
        }
    }

    /// What the agent's log must say it found.
    fn reported(self) -> &'static str {
        match self {
            Damage::TruncatedToHalf | Damage::Garbage => "the saved state is damaged: moved aside",
            Damage::DirDeleted | Damage::DirDeletedNetnsUnknown => "no saved state: rebuilding",
        }
    }
}

#[test]
fn damaged_state_dir_is_rebuilt_without_flushing() {
    let lab = Lab::up(
        &unique_prefix("rcv"),
        LabOptions::new(LAB).arg("--dataplane").arg("none"),
    )
    .expect("lab up");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let node = state.node("A").unwrap().clone();
    let agent = node.agent.clone().unwrap();
    let mut rec = state.process(&agent.process).unwrap().clone();
    assert!(
        rec.argv.iter().any(|a| a == "--cni-cache-dir"),
        "the lab's agent is given the lab's CNI cache: {:?}",
        rec.argv
    );
    let before = node_snapshot(&lab, "nodeA");
    let enrolled: Vec<&str> = state
        .pods
        .iter()
        .filter(|p| p.node == "A")
        .map(|p| p.id.as_str())
        .collect();

    // A long-lived captured connection: a-client -> b-app, captured to ztunnel A's test
    // listener, which echoes.
    let _zt = lab.tproxy_listen("a-ztunnel").unwrap();
    let b_app = SocketAddr::new(lab.pod_ip("b-app").into(), 9080);
    let mut held = lab.hold_connection("a-client", b_app).unwrap();
    assert!(
        held.greeting.starts_with("tproxy port=15001"),
        "{}",
        held.greeting
    );

    // a-app's entry in the runtime's CNI cache.
    let app = state.pod("a-app").unwrap().clone();
    let app_cache = std::fs::read_dir(node.cni.cache_dir.join("results"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains(&app.container_id))
        .expect("a-app's libcni cache entry");
    let app_cached = std::fs::read_to_string(&app_cache).unwrap();

    let mut restarted = Vec::new();
    let mut argv = rec.argv.clone();
    let damages = [
        Damage::TruncatedToHalf,
        Damage::Garbage,
        Damage::DirDeleted,
        Damage::DirDeletedNetnsUnknown,
    ];
    for (i, damage) in damages.into_iter().enumerate() {
        sigkill(&rec);
        damage.apply(&agent.state_dir);
        if damage == Damage::DirDeletedNetnsUnknown {
            let sandbox = netns::named_path(&app.netns).display().to_string();
            assert!(app_cached.contains(&sandbox), "{app_cached}");
            let stale = app_cached.replace(&sandbox, "/run/netns/gone-by-now");
            std::fs::write(&app_cache, stale).unwrap();
            let nowhere = ["--netns-dirs", "/nonexistent", "--proc-netns", "false"];
            argv.extend(nowhere.map(String::from));
        }
        let started = Instant::now();
        let spawned = lab
            .spawn(&format!("agent-a-recover{i}"), "nodeA", &argv)
            .unwrap();
        rec = spawned.rec.clone();
        let log = wait_serving(&rec.log, &rec);
        let took = started.elapsed();
        restarted.push(spawned);
        eprintln!("{damage:?}: serving after {} ms", took.as_millis());

        assert!(log.contains(damage.reported()), "{damage:?}:\n{log}");
        let rebuilt = log
            .lines()
            .find(|l| l.contains("rebuilt the state from the runtime"))
            .unwrap_or_else(|| panic!("{damage:?}: no rebuild line:\n{log}"));
        eprintln!("{damage:?}: {rebuilt}");
        // Every enrolled pod of node A but the ztunnel (and the opted-out waypoint, if any)
        // has a record again; none failed.
        assert!(rebuilt.contains("ztunnel=true"), "{rebuilt}");
        assert!(rebuilt.contains("failed=0"), "{damage:?}:\n{log}");
        let from_kernel = match damage {
            Damage::DirDeletedNetnsUnknown => "from_kernel=1",
            _ => "from_kernel=0",
        };
        assert!(rebuilt.contains(from_kernel), "{damage:?}:\n{log}");
        assert!(!log.contains("not rebuilt"), "{damage:?}:\n{log}");
        // The first reconcile after the rebuild found nothing to change.
        assert!(!log.contains("reconciled node state"), "{damage:?}:\n{log}");
        if matches!(damage, Damage::TruncatedToHalf | Damage::Garbage) {
            let aside = std::fs::read_dir(&agent.state_dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("state.json.corrupt-")
                });
            assert!(aside, "{damage:?}: the damaged snapshot was kept aside");
        }
        assert!(
            agent.state_dir.join("state.json").exists(),
            "{damage:?}: the rebuilt state is saved"
        );
        assert!(
            agent.state_dir.join("tunnel.json").exists(),
            "{damage:?}: ztunnel-init's tunnel.json is written again"
        );

        let after = node_snapshot(&lab, "nodeA");
        assert!(
            after == before,
            "{damage:?}: the restart changed the kernel state\nlost: {:?}\nadded: {:?}",
            lines_only_in(&before, &after),
            lines_only_in(&after, &before)
        );
        let msg = format!("still here {i}\n");
        let echoed = held.echo(msg.as_bytes()).unwrap();
        assert_eq!(echoed, msg.as_bytes(), "{damage:?}: the held connection");
    }

    std::fs::write(&app_cache, &app_cached).unwrap();
    // The rebuilt record of a-app (from the kernel alone, last) has the runtime's container
    // id: its CNI DEL removes exactly its route and elements.
    let pod = app;
    let ip = pod.ip.unwrap().to_string();
    let client = cni::ensure_client().unwrap();
    cni::del(&client, &node, &pod).unwrap();
    let removed = node_snapshot(&lab, "nodeA");
    let gone = lines_only_in(&before, &removed);
    assert!(
        gone.iter().any(|l| l.contains(&format!("{ip} via"))),
        "DEL removed a-app's route: {gone:?}"
    );
    assert!(
        gone.iter()
            .any(|l| (l.contains("element") || l.starts_with("ipset: add")) && l.contains(&ip)),
        "DEL removed a-app's elements: {gone:?}"
    );
    assert!(
        gone.iter().all(|l| l.contains(&ip)),
        "DEL removed more than a-app's route and elements: {gone:?}"
    );
    assert_eq!(lines_only_in(&removed, &before), Vec::<String>::new());
    eprintln!(
        "node A pods {enrolled:?}; DEL of a-app removed {} lines",
        gone.len()
    );
    drop(restarted);
}
