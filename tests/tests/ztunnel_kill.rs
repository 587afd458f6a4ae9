//! Drill: ztunnel SIGKILLed while clients keep opening connections through it (issue 13,
//! "crashes in the middle of a change"). New connections must flow again within a second of
//! the new ztunnel starting, and neither the agent nor the node's kernel state is touched:
//! capture does not depend on ztunnel's process, only on its netns. Needs root.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ambient_lab::serve::parse_greeting;
use ambient_lab::snapshot::node_snapshot;
use ambient_lab::state::LabState;
use ambient_lab::{procs, unique_prefix, ztunnel, Lab, LabOptions};

const LAB: &str = env!("CARGO_BIN_EXE_ambient-lab");
/// Client threads opening connections back to back.
const CLIENTS: usize = 4;

/// One connection attempt: when it started and ended, and whether the server answered.
struct Attempt {
    start: Instant,
    at: Instant,
    ok: bool,
}

/// Opens connections to `to` back to back on `CLIENTS` threads until `stop`.
fn load(to: SocketAddr, stop: &AtomicBool) -> Vec<Attempt> {
    use std::io::{BufRead, BufReader};
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        let ok = TcpStream::connect_timeout(&to, Duration::from_millis(500))
                            .and_then(|c| {
                                c.set_read_timeout(Some(Duration::from_millis(500)))?;
                                let mut line = String::new();
                                BufReader::new(c).read_line(&mut line)?;
                                Ok(parse_greeting(&line).is_some())
                            })
                            .unwrap_or(false);
                        out.push(Attempt {
                            start,
                            at: Instant::now(),
                            ok,
                        });
                        if !ok {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

#[test]
fn a_sigkilled_ztunnel_under_load_carries_new_connections_within_a_second() {
    let lab = Lab::up(&unique_prefix("zkl"), LabOptions::new(LAB)).expect("lab up");
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    let to = SocketAddr::new(IpAddr::V4(lab.pod_ip("b-app")), 9080);
    let zt = state.process("ztunnel-a").unwrap().clone();
    let agent = state.process("agent-a").map(|p| p.pid);
    assert!(agent.is_some(), "no agent-a process in the lab state");
    let kernel_before = node_snapshot(&lab, "nodeA");
    let stop = AtomicBool::new(false);
    let (attempts, killed, restarted, ready, first_new) = std::thread::scope(|s| {
        let loader = s.spawn(|| lab.run_in("a-client", || load(to, &stop)).unwrap());
        std::thread::sleep(Duration::from_secs(1));
        let killed = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(zt.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        while procs::is_alive(&zt) {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The restart a kubelet would make, here at once.
        let restarted = Instant::now();
        let _new = lab
            .spawn("ztunnel-a-killed", "a-ztunnel", &zt.argv)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lab.run_in("a-ztunnel", ztunnel::ready_once).unwrap() {
            assert!(Instant::now() < deadline, "the new ztunnel never got ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        let ready = Instant::now();
        // A new connection now, beside the load's (whose threads may sit in attempts begun
        // while no process held the listeners: TPROXY finds no socket and drops the SYN).
        let first_new = loop {
            let ok = lab
                .run_in("a-client", || {
                    use std::io::{BufRead, BufReader};
                    TcpStream::connect_timeout(&to, Duration::from_millis(500))
                        .and_then(|c| {
                            c.set_read_timeout(Some(Duration::from_millis(500)))?;
                            let mut line = String::new();
                            BufReader::new(c).read_line(&mut line)?;
                            Ok(parse_greeting(&line).is_some())
                        })
                        .unwrap_or(false)
                })
                .unwrap();
            if ok {
                break Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "no new connection after the restart"
            );
        };
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        (loader.join().unwrap(), killed, restarted, ready, first_new)
    });
    let before = attempts.iter().filter(|a| a.at < killed).count();
    assert!(
        before > 10 && attempts.iter().filter(|a| a.at < killed).all(|a| a.ok),
        "the load did not flow before the kill ({before} attempts)"
    );
    // The load flows again too, from attempts begun after the restart.
    let first_ok_after = attempts
        .iter()
        .filter(|a| a.start > restarted && a.ok)
        .map(|a| a.at)
        .min()
        .expect("the load never got through after the restart");
    let recovery = first_new - restarted;
    let startup = ready - restarted;
    let failed = attempts.iter().filter(|a| !a.ok).count();
    let after = attempts
        .iter()
        .filter(|a| a.at > first_ok_after)
        .collect::<Vec<_>>();
    eprintln!(
        "ztunnel SIGKILL under load ({CLIENTS} clients): {} attempts, {failed} failed; new ztunnel ready {startup:?} after its start, a new connection through it {recovery:?} after its start ({:?} after the kill), the load's first success {:?} after the start",
        attempts.len(),
        first_new - killed,
        first_ok_after - restarted
    );
    assert!(
        recovery < Duration::from_secs(1),
        "recovery took {recovery:?}"
    );
    assert!(
        after.iter().filter(|a| a.ok).count() * 10 >= after.len() * 9,
        "connections after recovery keep failing"
    );
    // Neither the agent nor the kernel needed anything.
    let state = LabState::load(lab.prefix()).unwrap().unwrap();
    assert_eq!(
        state.process("agent-a").map(|p| p.pid),
        agent,
        "the agent restarted"
    );
    assert_eq!(
        node_snapshot(&lab, "nodeA"),
        kernel_before,
        "the node's kernel state changed"
    );
}
