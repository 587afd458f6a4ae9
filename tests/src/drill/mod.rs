//! `ambient-lab drill ...`: reliability drills, each on a lab of its own (issue 13).
//!
//! * [`cni`]: CNI ADD and DEL at kubelet's concurrency ("Load").
//! * [`churn`]: pods enrolled and removed while the agent is SIGKILLed at random moments
//!   ("Crashes in the middle of a change").
//!
//! Both drive node A's agent through the real chain (the libcni client → ptp + host-local →
//! ambient-cni → the agent) on a network of their own ([`DrillNet`]).

pub mod churn;
pub mod cni;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ambient_net::consts::{table, NODE_NFT_TABLE};
use ambient_net::netns;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::stats::percentile_sorted;
use crate::cni as lab_cni;
use crate::procs;
use crate::state::{LabState, NodeState};
use crate::topology;

/// The drills.
#[derive(clap::Subcommand)]
pub enum DrillCmd {
    /// CNI ADD/DEL at kubelet's concurrency through the real chain, on a lab of its own.
    Cni(cni::CniArgs),
    /// Pods enrolled and removed through the real chain while the agent is SIGKILLed at
    /// random moments and restarted; the kernel must end exactly as desired.
    Churn(churn::ChurnArgs),
}

/// Runs a drill, prints its report (a table, then the JSON on one line), fails when it failed.
pub fn run(cmd: DrillCmd) -> Result<()> {
    let exe = std::env::current_exe().context("locate ambient-lab")?;
    let (table, text, json_path, verdict) = match cmd {
        DrillCmd::Cni(args) => {
            let report = cni::cni_drill(&exe, &args)?;
            (
                report.table(),
                serde_json::to_string(&report)?,
                args.json,
                Ok(()),
            )
        }
        DrillCmd::Churn(args) => {
            let report = churn::churn_drill(&exe, &args)?;
            (
                report.table(),
                serde_json::to_string(&report)?,
                args.json,
                report.verdict(),
            )
        }
    };
    println!("{table}{text}");
    if let Some(path) = &json_path {
        std::fs::write(path, &text).with_context(|| format!("write {}", path.display()))?;
    }
    verdict
}

/// Latencies of one kind of call, in milliseconds.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    pub calls: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(samples: &[f64]) -> Latency {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Latency {
            calls: sorted.len(),
            p50_ms: percentile_sorted(&sorted, 50.0),
            p99_ms: percentile_sorted(&sorted, 99.0),
            max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// An ambient namespace: the agent enrolls the drill's pods, so every ADD and DEL changes the
/// kernel.
const NAMESPACE: &str = "demo";

/// A drill network's primary plugin and address ranges.
#[derive(Debug, Clone)]
pub struct NetSpec {
    /// `ptp`, or `bridge` (on a bridge of the network's own).
    pub primary: String,
    /// host-local range sets: (subnet, gateway), IPv4 first.
    pub ranges: Vec<(String, String)>,
}

impl NetSpec {
    pub fn ptp_v4(cidr: &str, gateway: &str) -> NetSpec {
        NetSpec {
            primary: "ptp".into(),
            ranges: vec![(cidr.into(), gateway.into())],
        }
    }

    /// The bridge a `bridge` network's pods hang on (≤ 15 bytes).
    pub fn bridge_name(network: &str) -> String {
        format!("{}br", &network[..network.len().min(12)])
    }
}

/// A drill's own CNI network in node A: a conflist of ptp (or bridge) + host-local on its own
/// ranges, chained to ambient-cni and node A's agent, and the libcni client that calls it.
pub struct DrillNet {
    pub prefix: String,
    pub node: NodeState,
    cniclient: PathBuf,
    network: String,
    conf_dir: PathBuf,
    /// host-local's leases of the network.
    leases: PathBuf,
    rp_filter: u8,
    /// One CNI call, however loaded the node.
    call_timeout: Duration,
}

/// A pod sandbox of a drill: its netns and the runtime's ids.
#[derive(Debug, Clone)]
pub struct Pod {
    pub netns: String,
    pub container_id: String,
    pub name: String,
}

/// How one libcni client call ended.
#[derive(Debug, Clone)]
pub struct CallOutcome {
    pub ms: f64,
    /// `None` on success; the CNI error code otherwise (0 when the failure was not a plugin's
    /// CNI error, e.g. the client timed out).
    pub code: Option<u32>,
    pub stdout: String,
    /// Why it failed, for the report.
    pub why: String,
}

impl DrillNet {
    /// Writes the network's conflist (`name`, `spec`) next to node A's.
    pub fn new(
        state: &LabState,
        node: NodeState,
        cniclient: PathBuf,
        name: &str,
        spec: &NetSpec,
        call_timeout: Duration,
    ) -> Result<DrillNet> {
        let agent = node.agent.clone().context("node A has no agent")?;
        let cni_dir = node.cni.conf_dir.parent().context("cni dir")?.to_path_buf();
        let conf_dir = cni_dir.join(format!("{name}.d"));
        let ipam_dir = cni_dir.join(format!("{name}-ipam"));
        std::fs::create_dir_all(&conf_dir)?;
        std::fs::create_dir_all(&ipam_dir)?;
        let ranges: Vec<Value> = spec
            .ranges
            .iter()
            .map(|(subnet, gateway)| json!([{"subnet": subnet, "gateway": gateway}]))
            .collect();
        let routes: Vec<Value> = spec
            .ranges
            .iter()
            .map(|(subnet, _)| match subnet.contains(':') {
                true => json!({"dst": "::/0"}),
                false => json!({"dst": "0.0.0.0/0"}),
            })
            .collect();
        let mut primary = json!({
            "type": spec.primary, "ipMasq": false, "mtu": lab_cni::POD_MTU,
            "ipam": {
                "type": "host-local",
                "ranges": ranges,
                "routes": routes,
                "dataDir": ipam_dir,
            },
        });
        if spec.primary == "bridge" {
            primary["bridge"] = json!(NetSpec::bridge_name(name));
            primary["isGateway"] = json!(true);
        }
        let conflist = json!({
            "cniVersion": lab_cni::CNI_VERSION, "name": name,
            "plugins": [primary, {
                "type": "ambient-cni",
                "agentSocket": agent.socket,
                "logFile": node.cni.log_file.clone().unwrap_or_else(|| cni_dir.join(format!("{name}-cni.log"))),
            }],
        });
        std::fs::write(
            conf_dir.join(format!("30-{name}.conflist")),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        Ok(DrillNet {
            prefix: state.prefix.clone(),
            leases: ipam_dir.join(name),
            rp_filter: state.options.rp_filter,
            network: name.to_string(),
            node,
            cniclient,
            conf_dir,
            call_timeout,
        })
    }

    /// One libcni client call (`add`, `del`) on the network, from the calling thread's netns
    /// (node A's): fails only when the client could not be run.
    pub fn call_outcome(&self, op: &str, pod: &Pod) -> Result<CallOutcome> {
        let mut cmd = Command::new(&self.cniclient);
        cmd.arg(op)
            .arg(&self.conf_dir)
            .arg(&self.network)
            .arg(netns::named_path(&pod.netns))
            .arg(&pod.container_id)
            .arg("eth0")
            .env("CNI_PATH", &self.node.cni.cni_path)
            .env("CNI_CACHE_DIR", &self.node.cni.cache_dir)
            .env(
                "CNI_ARGS",
                lab_cni::cni_args(NAMESPACE, &pod.name, &pod.container_id, &pod.name),
            );
        let t = Instant::now();
        let out = procs::run_capture(&mut cmd, None, self.call_timeout);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let out = match out {
            Ok(o) => o,
            Err(e) if format!("{e:#}").contains("did not finish within") => {
                return Ok(CallOutcome {
                    ms,
                    code: Some(0),
                    stdout: String::new(),
                    why: format!("{e:#}"),
                })
            }
            Err(e) => return Err(e),
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(CallOutcome {
                ms,
                code: None,
                stdout,
                why: String::new(),
            });
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (code, why) = match lab_cni::parse_cni_error(&stderr) {
            Some(e) => (e.code, format!("code {}: {} {}", e.code, e.msg, e.details)),
            None => (0, stderr.trim().to_string()),
        };
        Ok(CallOutcome {
            ms,
            code: Some(code),
            stdout,
            why,
        })
    }

    /// [`DrillNet::call_outcome`] where anything but success is an error: (ms, stdout).
    pub fn call(&self, op: &str, pod: &Pod) -> Result<(f64, String)> {
        let o = self.call_outcome(op, pod)?;
        if o.code.is_some() {
            bail!(
                "CNI {op} of {} failed after {:.0} ms: {}",
                pod.name,
                o.ms,
                o.why
            );
        }
        Ok((o.ms, o.stdout))
    }

    /// Creates a pod's netns with the lab's pod sysctls (not recorded in the lab state:
    /// `down` removes every netns named after the lab's prefix).
    pub fn make_netns(&self, netns_name: &str) -> Result<()> {
        let sysctls = topology::pod_sysctls(self.rp_filter);
        let pairs: Vec<(&str, &str)> = sysctls.iter().map(|(k, v)| (*k, v.as_str())).collect();
        netns::create_named(netns_name).with_context(|| format!("create netns {netns_name}"))?;
        crate::sysctl::set_in(netns_name, &pairs)
    }

    /// Addresses host-local still has leased on the network.
    pub fn leases(&self) -> Result<BTreeSet<String>> {
        let Ok(dir) = std::fs::read_dir(&self.leases) else {
            return Ok(BTreeSet::new());
        };
        let mut v = BTreeSet::new();
        for e in dir {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.parse::<std::net::IpAddr>().is_ok() {
                v.insert(name);
            }
        }
        Ok(v)
    }
}

/// What the agent programs for pods, as the node's kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelState {
    /// `<family> <table> <set>: <element JSON>` of every set of the node's tables.
    pub set_elements: BTreeSet<String>,
    /// Table 100, both families.
    pub routes: BTreeSet<String>,
    pub links: BTreeSet<String>,
}

impl KernelState {
    /// Things in `self` that `other` lacks.
    pub fn minus(&self, other: &KernelState) -> Vec<String> {
        let d = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
            a.difference(b).cloned().collect()
        };
        let mut v = d(&self.set_elements, &other.set_elements);
        v.extend(d(&self.routes, &other.routes));
        v.extend(d(&self.links, &other.links));
        v
    }
}

/// The calling thread's netns: every element of every set of the node's nft tables, the
/// routes of table 100 (v4 and v6) and the link names.
pub fn kernel_state() -> Result<KernelState> {
    let out = capture(Command::new("nft").args(["-j", "list", "ruleset"]))?;
    let v: Value = serde_json::from_str(&out).context("parse nft -j list ruleset")?;
    let mut set_elements = BTreeSet::new();
    for set in v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("set"))
        .filter(|s| s["table"] == NODE_NFT_TABLE)
    {
        let name = format!("{} {} {}", set["family"], set["table"], set["name"]);
        for e in set["elem"].as_array().into_iter().flatten() {
            set_elements.insert(format!("{name}: {e}"));
        }
    }
    let mut routes = BTreeSet::new();
    for family in ["-4", "-6"] {
        let t = table::INBOUND.to_string();
        // A table that was never filled does not exist (v6 on a v4 lab): no routes.
        let out = match capture(Command::new("ip").args([family, "route", "show", "table", &t])) {
            Err(e) if format!("{e:#}").contains("table does not exist") => String::new(),
            r => r?,
        };
        routes.extend(out.lines().map(|l| format!("{family} {}", l.trim())));
    }
    let out = capture(Command::new("ip").args(["-o", "link", "show"]))?;
    let links = out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect();
    Ok(KernelState {
        set_elements,
        routes,
        links,
    })
}

fn capture(cmd: &mut Command) -> Result<String> {
    let out = procs::run_capture(cmd, None, Duration::from_secs(30))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` in node A's netns of the lab `lab_bin` brought up as `prefix` (the lab is torn
/// down afterwards, whatever `f` returned).
pub fn on_lab<T>(
    prefix: &str,
    opts: crate::LabOptions,
    f: impl FnOnce(&crate::Lab, &LabState) -> Result<T>,
) -> Result<T> {
    eprintln!("drill: bringing up lab {prefix}");
    let mut lab = crate::Lab::up(prefix, opts)?;
    let result = LabState::load(lab.prefix())
        .and_then(|s| s.context("no lab state"))
        .and_then(|state| f(&lab, &state));
    eprintln!("drill: tearing the lab down");
    let down = lab.down();
    let report = result?;
    down?;
    Ok(report)
}

/// The libcni client of a lab.
pub fn cniclient(state: &LabState) -> Result<PathBuf> {
    state.cniclient.clone().context("no libcni client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_and_leak_diff() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let l = Latency::of(&samples);
        assert_eq!(
            (l.calls, l.p50_ms, l.p99_ms, l.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let a = KernelState {
            set_elements: set(&["s: \"10.0.0.1\"", "s: \"10.0.0.2\""]),
            routes: set(&["-4 10.0.0.2 dev istioin"]),
            links: set(&["lo"]),
        };
        let b = KernelState {
            set_elements: set(&["s: \"10.0.0.1\""]),
            routes: set(&[]),
            links: set(&["lo"]),
        };
        assert_eq!(
            a.minus(&b),
            vec!["s: \"10.0.0.2\"", "-4 10.0.0.2 dev istioin"]
        );
        assert!(b.minus(&a).is_empty());
    }
}
