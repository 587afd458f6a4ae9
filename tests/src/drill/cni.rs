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
use std::sync::Barrier;
use std::time::{Duration, Instant};

use ambient_net::netns;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::{kernel_state, DrillNet, Latency, Pod};
use crate::cni;
use crate::harness::LabOptions;

pub const DEFAULT_PREFIX: &str = "drill";
/// The drill's network, apart from the lab's and the bench's (10.248.0.0/20).
const NETWORK: &str = "drill";
const CIDR: &str = "10.249.0.0/20";
const GATEWAY: &str = "10.249.0.1";
/// One CNI call, however loaded the node: far above any healthy latency.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

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
    super::on_lab(&args.prefix, LabOptions::new(lab_bin), |_, state| {
        let node = state.node("A").context("no node A")?.clone();
        let net = DrillNet::new(
            state,
            node,
            super::cniclient(state)?,
            NETWORK,
            &super::NetSpec::ptp_v4(CIDR, GATEWAY),
            CALL_TIMEOUT,
        )?;
        netns::run_in(&netns::named_path(&net.node.netns), || rounds(&net, args))?
    })
}

fn rounds(net: &DrillNet, args: &CniArgs) -> Result<CniDrillReport> {
    let (mut adds, mut dels, mut add_burst, mut del_burst) = (vec![], vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let pods: Vec<Pod> = (0..args.concurrency)
            .map(|i| Pod {
                netns: format!("{}-dp{i}", net.prefix),
                container_id: format!("{}-drill-{round}-{i}", net.prefix),
                name: format!("drill-{round}-{i}"),
            })
            .collect();
        let made: Result<()> = pods.iter().try_for_each(|p| net.make_netns(&p.netns));
        let result = made.and_then(|()| one_round(net, round, &pods));
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
fn one_round(net: &DrillNet, round: usize, pods: &[Pod]) -> Result<(Vec<f64>, Vec<f64>, f64, f64)> {
    let before = kernel_state()?;
    let (add_ms, add_s, results) = burst(net, "add", pods)?;
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
    let (del_ms, del_s, _) = burst(net, "del", pods)?;
    let after = kernel_state()?;
    let mut leaked = after.minus(&before);
    leaked.extend(net.leases()?.into_iter().map(|ip| format!("lease {ip}")));
    let missing = before.minus(&after);
    if !leaked.is_empty() || !missing.is_empty() {
        bail!("round {round}: after the DELs, leaked {leaked:?}, missing {missing:?}");
    }
    Ok((add_ms, del_ms, add_s, del_s))
}

/// Runs `op` for every pod at once (threads released together): each call's ms, the
/// burst's seconds, each call's stdout. Fails naming every failed call.
fn burst(net: &DrillNet, op: &str, pods: &[Pod]) -> Result<(Vec<f64>, f64, Vec<String>)> {
    let barrier = Barrier::new(pods.len() + 1);
    let t = Instant::now();
    let outcomes: Vec<Result<(f64, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .map(|p| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    net.call(op, p)
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
