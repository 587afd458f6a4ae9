//! The node side the lab drives but does not implement: one `ambient-agent` per node
//! (started before any pod), and `ztunnel-init` in each ztunnel pod netns.
//!
//! Contract (owned by the agent / ztunnel-init):
//! `ambient-agent run --config <file.json> --socket <path> --state-dir <dir>
//!  --health-addr <ip:port> --tunnel auto|geneve|vxlan`, which writes
//! `<state-dir>/tunnel.json`; `ztunnel-init --tunnel-state <state-dir>/tunnel.json`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ambient_net::netns;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::procs;
use crate::topology::AMBIENT_NAMESPACES;

/// The agent's health endpoint inside its node netns (each node has its own loopback).
pub const HEALTH_ADDR: &str = "127.0.0.1:15120";
pub const TUNNEL_STATE_FILE: &str = "tunnel.json";
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's config file content; `opt_out` are `<namespace>/<pod name>` of pods in an
/// ambient namespace that stay out (the waypoint).
pub fn config(opt_out: &[String]) -> Value {
    json!({
        "ambientNamespaces": AMBIENT_NAMESPACES,
        "excludedNamespaces": ["kube-system"],
        "optOutPods": opt_out,
        "ztunnel": {"namespace": "istio-system", "podNamePrefix": "ztunnel"},
    })
}

/// The agent's argv.
pub fn argv(
    bin: &Path,
    config: &Path,
    socket: &Path,
    state_dir: &Path,
    tunnel: &str,
) -> Vec<String> {
    vec![
        bin.display().to_string(),
        "run".into(),
        "--config".into(),
        config.display().to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--state-dir".into(),
        state_dir.display().to_string(),
        "--health-addr".into(),
        HEALTH_ADDR.into(),
        "--tunnel".into(),
        tunnel.into(),
    ]
}

/// Waits until the agent answers `GET /ready` with 200 or its socket appears; fails early
/// when the agent exits.
pub fn wait_ready(node_netns: &str, socket: &Path, child: &mut Child, log: &Path) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "ambient-agent in {node_netns} exited ({status}) before it was ready\n{}",
                procs::log_tail(log, 20)
            );
        }
        // The socket is not probed with a connection: an empty request would only make
        // the agent log an error.
        if health_ready(node_netns) || is_socket(socket) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "ambient-agent in {node_netns} not ready after {READY_TIMEOUT:?}: no socket {} and GET http://{HEALTH_ADDR}/ready is not 200\n{}",
                socket.display(),
                procs::log_tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// `GET /ready` on the agent's health address inside the node netns answers 200.
fn health_ready(node_netns: &str) -> bool {
    let addr: SocketAddr = HEALTH_ADDR.parse().expect("valid health address");
    netns::run_in(
        &netns::named_path(node_netns),
        || -> std::io::Result<bool> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(b"GET /ready HTTP/1.0\r\nHost: agent\r\n\r\n")?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf)?;
            let head = String::from_utf8_lossy(&buf[..n]);
            Ok(head
                .split_whitespace()
                .nth(1)
                .is_some_and(|code| code == "200"))
        },
    )
    .ok()
    .and_then(|r| r.ok())
    .unwrap_or(false)
}

/// Runs `ztunnel-init` in the ztunnel pod netns and requires exit 0. `firewall` is its
/// `--firewall` (the lab's choice, so an iptables lab programs the ztunnel netns with
/// iptables too; auto picks nftables here).
pub fn run_ztunnel_init(
    bin: &Path,
    pod_netns: &str,
    tunnel_state: &Path,
    firewall: &str,
    log: &Path,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tunnel_state.exists() {
        if Instant::now() >= deadline {
            bail!(
                "the agent did not write {} (needed by ztunnel-init)",
                tunnel_state.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut cmd = Command::new(bin);
    cmd.arg("--tunnel-state")
        .arg(tunnel_state)
        .args(["--firewall", firewall]);
    netns::command_in(&mut cmd, &netns::named_path(pod_netns))?;
    let out = procs::run_capture(&mut cmd, None, INIT_TIMEOUT)
        .with_context(|| format!("ztunnel-init in {pod_netns}"))?;
    let mut text = out.stdout.clone();
    text.extend_from_slice(&out.stderr);
    std::fs::write(log, &text).with_context(|| format!("write {}", log.display()))?;
    if !out.status.success() {
        bail!(
            "ztunnel-init in {pod_netns} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&text).trim()
        );
    }
    Ok(())
}
