//! `ambient-lab down`: CNI DEL for every pod (so the plugin and the agent see it), stop the
//! recorded processes, delete the lab's namespaces and its run dir. Idempotent.

use std::time::Duration;

use ambient_net::netns;
use anyhow::{bail, Context, Result};

use crate::cni;
use crate::paths;
use crate::procs;
use crate::state::{LabState, PodRole};

const STOP_GRACE: Duration = Duration::from_secs(2);

/// What a teardown could not do cleanly but worked around.
#[derive(Debug, Default)]
pub struct DownReport {
    pub warnings: Vec<String>,
    /// CNI DELs that failed (the namespaces were deleted anyway).
    pub del_failures: Vec<String>,
}

/// `down` for a prefix, from its state file if there is one.
pub fn down(prefix: &str) -> Result<DownReport> {
    paths::validate_prefix(prefix)?;
    let state = match LabState::load(prefix) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lab[{prefix}] warning: unreadable state ({e:#}); removing by name only");
            None
        }
    };
    teardown(prefix, state.as_ref())
}

/// Undoes `state` (possibly half-built), then removes anything else with the prefix.
pub fn teardown(prefix: &str, state: Option<&LabState>) -> Result<DownReport> {
    let mut report = DownReport::default();
    if let Some(state) = state {
        cni_del_all(state, &mut report);
        // Servers before agents: the reverse of the start order.
        for rec in state.processes.iter().rev() {
            match procs::stop(rec, STOP_GRACE) {
                Ok(true) => eprintln!("lab[{prefix}] stopped {} (pid {})", rec.name, rec.pid),
                Ok(false) => {}
                Err(e) => report.warnings.push(format!("{e:#}")),
            }
        }
        for name in state.netns.iter().rev() {
            if let Err(e) = netns::delete_named(name) {
                report.warnings.push(format!("delete netns {name}: {e}"));
            }
        }
    }
    for name in netns::list_named()?
        .into_iter()
        .filter(|n| paths::owns_netns(prefix, n))
    {
        netns::delete_named(&name).with_context(|| format!("delete netns {name}"))?;
    }
    let run_dir = paths::run_dir(prefix);
    match std::fs::remove_dir_all(&run_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove {}", run_dir.display()));
        }
        _ => {}
    }

    let left: Vec<String> = netns::list_named()?
        .into_iter()
        .filter(|n| paths::owns_netns(prefix, n))
        .collect();
    let alive: Vec<String> = state
        .map(|s| {
            s.processes
                .iter()
                .filter(|p| procs::is_alive(p))
                .map(|p| format!("{} (pid {})", p.name, p.pid))
                .collect()
        })
        .unwrap_or_default();
    for w in &report.warnings {
        eprintln!("lab[{prefix}] warning: {w}");
    }
    if !left.is_empty() || !alive.is_empty() {
        bail!("lab {prefix:?} not fully removed: netns {left:?}, processes {alive:?}");
    }
    Ok(report)
}

/// CNI DEL for every pod whose ADD ran, workloads before the ztunnel, newest first.
fn cni_del_all(state: &LabState, report: &mut DownReport) {
    let Some(client) = state.cniclient.as_ref().filter(|c| c.exists()) else {
        if state.pods.iter().any(|p| p.cni_added) {
            report
                .warnings
                .push("no libcni client recorded: CNI DEL skipped".into());
        }
        return;
    };
    let (ztunnels, workloads): (Vec<_>, Vec<_>) = state
        .pods
        .iter()
        .filter(|p| p.cni_added)
        .partition(|p| p.role == PodRole::Ztunnel);
    for pod in workloads
        .into_iter()
        .rev()
        .chain(ztunnels.into_iter().rev())
    {
        let Some(node) = state.node(&pod.node) else {
            report.warnings.push(format!(
                "pod {}: node {} not recorded, no DEL",
                pod.id, pod.node
            ));
            continue;
        };
        if !netns::named_path(&node.netns).exists() {
            report.warnings.push(format!(
                "pod {}: node netns {} is gone, no DEL",
                pod.id, node.netns
            ));
            continue;
        }
        match cni::del(client, node, pod) {
            Ok(()) => {}
            Err(e) => {
                eprintln!("lab[{}] warning: {e:#}", state.prefix);
                report.del_failures.push(format!("{e:#}"));
            }
        }
    }
}
