//! `ambient-lab drill cni`: CNI ADD and DEL at kubelet's concurrency (issue 13, "Load").
//!
//! A lab of its own; in node A, like a runtime on a node, `concurrency` pods are ADDed all at
//! once through the real chain (the libcni client → ptp + host-local → ambient-cni → the
//! agent), then DELeted all at once, `rounds` times. Every call must succeed. While the pods
//! are up, the agent's kernel state holds each of them (its address in the node's nft sets,
//! its route in table 100); after the DELs the node is exactly as before the round: the same
//! set elements, table-100 routes, links and no host-local lease left (0 leaked).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use ambient_net::consts::{table, NODE_NFT_TABLE};
use ambient_net::netns;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::stats::percentile_sorted;
use crate::cni;
use crate::harness::{Lab, LabOptions};
use crate::procs;
use crate::state::{LabState, NodeState};
use crate::topology;

pub const DEFAULT_PREFIX: &str = "drill";
/// The drill's network, apart from the lab's and the bench's (10.248.0.0/20).
const NETWORK: &str = "drill";
const CIDR: &str = "10.249.0.0/20";
const GATEWAY: &str = "10.249.0.1";
/// An ambient namespace: the agent enrolls the pods, so every ADD and DEL changes the kernel.
const NAMESPACE: &str = "demo";
/// One CNI call, however loaded the node: far above any healthy latency.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The drills.
#[derive(clap::Subcommand)]
pub enum DrillCmd {
    /// CNI ADD/DEL at kubelet's concurrency through the real chain, on a lab of its own.
    Cni(CniArgs),
}

#[derive(clap::Args)]
pub struct CniArgs {
    /// The drill lab's prefix ([a-z0-9], ≤16).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Pods ADDed (then DELeted) at once.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Rounds of `concurrency` ADDs then `concurrency` DELs.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Runs a drill, prints its report (a table, then the JSON on one line), fails when it failed.
pub fn run(cmd: DrillCmd) -> Result<()> {
    match cmd {
        DrillCmd::Cni(args) => {
            let exe = std::env::current_exe().context("locate ambient-lab")?;
            let report = cni_drill(&exe, &args)?;
            let text = serde_json::to_string(&report)?;
            println!("{}{text}", report.table());
            if let Some(path) = &args.json {
                std::fs::write(path, &text).with_context(|| format!("write {}", path.display()))?;
            }
            Ok(())
        }
    }
}

/// Latencies of one kind of call over every round, in milliseconds.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    pub calls: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(samples: &[f64]) -> Latency {
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

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CniDrillReport {
    pub concurrency: usize,
    pub rounds: usize,
    pub add: Latency,
    pub del: Latency,
    /// Wall time of each round's burst of ADDs and of DELs, in seconds.
    pub add_burst_s: Vec<f64>,
    pub del_burst_s: Vec<f64>,
    /// Failed calls (the drill stops at the first round with one, so 0 in a report).
    pub failed: usize,
    /// Set elements, table-100 routes, links and leases left after a round's DELs.
    pub leaked: usize,
}

impl CniDrillReport {
    pub fn table(&self) -> String {
        let row = |name: &str, l: &Latency, burst: &[f64]| {
            let worst = burst.iter().copied().fold(0.0, f64::max);
            format!(
                "{name:<4} {:>6} {:>9.1} {:>9.1} {:>9.1} {worst:>14.2}\n",
                l.calls, l.p50_ms, l.p99_ms, l.max_ms
            )
        };
        format!(
            "CNI drill: {} rounds of {} ADDs at once, then {} DELs at once\n\
             call  calls    p50 ms    p99 ms    max ms  worst burst s\n{}{}\
             failed calls: {}, leaked kernel state: {}\n",
            self.rounds,
            self.concurrency,
            self.concurrency,
            row("ADD", &self.add, &self.add_burst_s),
            row("DEL", &self.del, &self.del_burst_s),
            self.failed,
            self.leaked
        )
    }
}

/// Brings a lab up, runs the rounds in node A, tears the lab down.
pub fn cni_drill(lab_bin: &Path, args: &CniArgs) -> Result<CniDrillReport> {
    if args.concurrency == 0 || args.rounds == 0 {
        bail!("--concurrency and --rounds must be at least 1");
    }
    if args.concurrency > 1000 {
        bail!("--concurrency above 1000 does not fit the drill's /20");
    }
    eprintln!("drill: bringing up lab {}", args.prefix);
    let mut lab = Lab::up(&args.prefix, LabOptions::new(lab_bin))?;
    let result = (|| {
        let state = LabState::load(lab.prefix())?.context("no lab state")?;
        let node = state.node("A").context("no node A")?.clone();
        let cniclient = state.cniclient.clone().context("no libcni client")?;
        let drill = Drill::new(&state, node, cniclient)?;
        netns::run_in(&netns::named_path(&drill.node.netns), || drill.rounds(args))?
    })();
    eprintln!("drill: tearing the lab down");
    let down = lab.down();
    let report = result?;
    down?;
    Ok(report)
}

struct Drill {
    prefix: String,
    node: NodeState,
    cniclient: PathBuf,
    conf_dir: PathBuf,
    /// host-local's leases of the drill network.
    leases: PathBuf,
    rp_filter: u8,
}

struct Pod {
    netns: String,
    container_id: String,
    name: String,
}

/// What the agent programs for pods, as the node's kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KernelState {
    /// `<family> <table> <set>: <element JSON>` of every set of the node's tables.
    set_elements: BTreeSet<String>,
    /// Table 100, both families.
    routes: BTreeSet<String>,
    links: BTreeSet<String>,
}

impl KernelState {
    /// Things in `self` that `other` lacks.
    fn minus(&self, other: &KernelState) -> Vec<String> {
        let d = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
            a.difference(b).cloned().collect()
        };
        let mut v = d(&self.set_elements, &other.set_elements);
        v.extend(d(&self.routes, &other.routes));
        v.extend(d(&self.links, &other.links));
        v
    }
}

impl Drill {
    fn new(state: &LabState, node: NodeState, cniclient: PathBuf) -> Result<Drill> {
        let agent = node.agent.clone().context("node A has no agent")?;
        let cni_dir = node.cni.conf_dir.parent().context("cni dir")?.to_path_buf();
        let conf_dir = cni_dir.join("drill.d");
        let ipam_dir = cni_dir.join("drill-ipam");
        std::fs::create_dir_all(&conf_dir)?;
        std::fs::create_dir_all(&ipam_dir)?;
        let conflist = json!({
            "cniVersion": cni::CNI_VERSION, "name": NETWORK,
            "plugins": [{
                "type": "ptp", "ipMasq": false, "mtu": cni::POD_MTU,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": CIDR, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                },
            }, {
                "type": "ambient-cni",
                "agentSocket": agent.socket,
                "logFile": node.cni.log_file.clone().unwrap_or_else(|| cni_dir.join("drill-cni.log")),
            }],
        });
        std::fs::write(
            conf_dir.join("30-drill.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        Ok(Drill {
            prefix: state.prefix.clone(),
            leases: ipam_dir.join(NETWORK),
            rp_filter: state.options.rp_filter,
            node,
            cniclient,
            conf_dir,
        })
    }

    fn rounds(&self, args: &CniArgs) -> Result<CniDrillReport> {
        let (mut adds, mut dels, mut add_burst, mut del_burst) = (vec![], vec![], vec![], vec![]);
        for round in 0..args.rounds {
            let pods: Vec<Pod> = (0..args.concurrency)
                .map(|i| Pod {
                    netns: format!("{}-dp{i}", self.prefix),
                    container_id: format!("{}-drill-{round}-{i}", self.prefix),
                    name: format!("drill-{round}-{i}"),
                })
                .collect();
            self.make_netns(&pods)?;
            let result = self.round(round, &pods);
            for p in &pods {
                let _ = netns::delete_named(&p.netns);
            }
            let (a, d, ta, td) = result?;
            eprintln!(
                "drill: round {}/{}: {} ADDs in {ta:.2} s, {} DELs in {td:.2} s, nothing leaked",
                round + 1,
                args.rounds,
                a.len(),
                d.len()
            );
            adds.extend(a);
            dels.extend(d);
            add_burst.push(ta);
            del_burst.push(td);
        }
        Ok(CniDrillReport {
            concurrency: args.concurrency,
            rounds: args.rounds,
            add: Latency::of(&adds),
            del: Latency::of(&dels),
            add_burst_s: add_burst,
            del_burst_s: del_burst,
            failed: 0,
            leaked: 0,
        })
    }

    /// One round: every ADD at once, the kernel checked, every DEL at once, the kernel
    /// compared with the state before. (ADD ms, DEL ms, ADD burst s, DEL burst s).
    fn round(&self, round: usize, pods: &[Pod]) -> Result<(Vec<f64>, Vec<f64>, f64, f64)> {
        let before = kernel_state()?;
        let (add_ms, add_s, results) = self.burst("add", pods)?;
        let during = kernel_state()?;
        for (pod, out) in pods.iter().zip(&results) {
            let v: Value = serde_json::from_str(out)
                .with_context(|| format!("ADD of {} printed no result: {out:?}", pod.name))?;
            let ip = cni::parse_result(&v)?.ip.to_string();
            let held = |set: &BTreeSet<String>, pat: &str| set.iter().any(|e| e.contains(pat));
            if !held(&during.set_elements, &format!("\"{ip}\"")) {
                bail!(
                    "round {round}: {} ({ip}) is in no nft set after its ADD",
                    pod.name
                );
            }
            if !held(&during.routes, &format!("{ip} ")) {
                bail!("round {round}: {} ({ip}) has no table-100 route", pod.name);
            }
        }
        let (del_ms, del_s, _) = self.burst("del", pods)?;
        let after = kernel_state()?;
        let mut leaked = after.minus(&before);
        leaked.extend(self.leases()?.into_iter().map(|ip| format!("lease {ip}")));
        let missing = before.minus(&after);
        if !leaked.is_empty() || !missing.is_empty() {
            bail!("round {round}: after the DELs, leaked {leaked:?}, missing {missing:?}");
        }
        Ok((add_ms, del_ms, add_s, del_s))
    }

    /// Runs `op` for every pod at once (threads released together): each call's ms, the
    /// burst's seconds, each call's stdout. Fails naming every failed call.
    fn burst(&self, op: &str, pods: &[Pod]) -> Result<(Vec<f64>, f64, Vec<String>)> {
        let barrier = Barrier::new(pods.len() + 1);
        let t = Instant::now();
        let outcomes: Vec<Result<(f64, String)>> = std::thread::scope(|s| {
            let handles: Vec<_> = pods
                .iter()
                .map(|p| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        self.call(op, p)
                    })
                })
                .collect();
            barrier.wait();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("CNI call thread panicked")))
                })
                .collect()
        });
        let secs = t.elapsed().as_secs_f64();
        let failures: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().err().map(|e| format!("{e:#}")))
            .collect();
        if !failures.is_empty() {
            bail!(
                "{} of {} {op}s failed: {}",
                failures.len(),
                pods.len(),
                failures.join("; ")
            );
        }
        let (ms, outs) = outcomes.into_iter().filter_map(Result::ok).unzip();
        Ok((ms, secs, outs))
    }

    /// One libcni client call on the drill network: (ms, stdout).
    fn call(&self, op: &str, pod: &Pod) -> Result<(f64, String)> {
        let mut cmd = Command::new(&self.cniclient);
        cmd.arg(op)
            .arg(&self.conf_dir)
            .arg(NETWORK)
            .arg(netns::named_path(&pod.netns))
            .arg(&pod.container_id)
            .arg("eth0")
            .env("CNI_PATH", &self.node.cni.cni_path)
            .env("CNI_CACHE_DIR", &self.node.cni.cache_dir)
            .env(
                "CNI_ARGS",
                cni::cni_args(NAMESPACE, &pod.name, &pod.container_id, &pod.name),
            );
        let t = Instant::now();
        let out = procs::run_capture(&mut cmd, None, CALL_TIMEOUT)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = match cni::parse_cni_error(&stderr) {
                Some(e) => format!("code {}: {} {}", e.code, e.msg, e.details),
                None => stderr.trim().to_string(),
            };
            bail!("CNI {op} of {} failed after {ms:.0} ms: {why}", pod.name);
        }
        Ok((ms, String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// Creates the pods' netns, recorded in the lab state first so that `down` removes any
    /// the drill leaves behind.
    fn make_netns(&self, pods: &[Pod]) -> Result<()> {
        let mut st = LabState::load(&self.prefix)?.context("no lab state")?;
        for p in pods {
            if !st.netns.contains(&p.netns) {
                st.netns.push(p.netns.clone());
            }
        }
        st.save()?;
        let sysctls = topology::pod_sysctls(self.rp_filter);
        let pairs: Vec<(&str, &str)> = sysctls.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for p in pods {
            netns::create_named(&p.netns).with_context(|| format!("create netns {}", p.netns))?;
            crate::sysctl::set_in(&p.netns, &pairs)?;
        }
        Ok(())
    }

    /// Addresses host-local still has leased on the drill network.
    fn leases(&self) -> Result<Vec<String>> {
        let Ok(dir) = std::fs::read_dir(&self.leases) else {
            return Ok(Vec::new());
        };
        let mut v = Vec::new();
        for e in dir {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.parse::<std::net::IpAddr>().is_ok() {
                v.push(name);
            }
        }
        Ok(v)
    }
}

/// The calling thread's netns: every element of every set of the node's nft tables, the
/// routes of table 100 (v4 and v6) and the link names.
fn kernel_state() -> Result<KernelState> {
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
