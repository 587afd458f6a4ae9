//! `ambient-lab drill churn`: pods enrolled and removed while the agent is SIGKILLed at random
//! moments (issue 13, "Crashes in the middle of a change").
//!
//! A lab of its own. In node A, like kubelet on a node, `concurrency` workers take the pods
//! one by one: a fresh sandbox (netns, container id), CNI ADD through the real chain (the
//! libcni client → ptp + host-local → ambient-cni → the agent), a short life, CNI DEL, the
//! netns removed. An ADD that fails with a retryable code (11) is cleaned up with a DEL and
//! retried in a new sandbox; a DEL that fails is retried; both bounded. Meanwhile the agent is
//! SIGKILLed at random points of the call sequence (from a seeded RNG, printed, so a run can be
//! replayed with `--seed`), and restarted from the lab's own argv after a random pause.
//!
//! A few pods are ADDed before the first kill and kept up through the churn. Afterwards the
//! node's kernel state must be exactly what a healthy agent made for them, the lab's pods and
//! the ztunnel — rules, tables 100–102, tunnels, both nft tables with their set elements, the
//! veths and host-local's leases: 0 leaked, 0 missing — and, once they are DELeted too, exactly
//! the state before the drill. Every call either succeeded or failed with code 11, and a
//! captured connection held from a-client to b-app through the ztunnels all along still echoes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ambient_net::consts::{POD_IIF_SET, POD_IIF_SET_V6};
use ambient_net::netns;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::{kernel_state, CallOutcome, DrillNet, Latency, NetSpec, Pod};
use crate::harness::{HeldConnection, Lab, LabOptions, Spawned};
use crate::snapshot::{lines_only_in, node_snapshot};
use crate::state::{LabState, ProcessRecord};
use crate::{cni, procs, topology};

pub const DEFAULT_PREFIX: &str = "churn";
/// The drill's network (its own lab, so the CNI drill's range is free here).
const NETWORK: &str = "churn";
const CIDR: &str = "10.249.0.0/20";
const GATEWAY: &str = "10.249.0.1";
/// Its IPv6 range with `--ip-family dual`.
const CIDR6: &str = "fd24:9::/112";
const GATEWAY6: &str = "fd24:9::1";
/// One CNI call: far above any healthy latency, even with the agent restarting.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// CNI's "try again later": the only failure kubelet is expected to see from ambient-cni.
const RETRYABLE: u32 = 11;
/// Sandboxes tried per pod, and DELs per sandbox, before the drill gives up on it.
const MAX_ADD_ATTEMPTS: u32 = 40;
const MAX_DEL_ATTEMPTS: u32 = 40;
/// How long a restarted agent may take to say "serving".
const SERVE_TIMEOUT: Duration = Duration::from_secs(20);
/// A start-up kill lands this soon (at most) after the agent's start.
const STARTUP_KILL_MAX_MS: u64 = 200;
/// The agent's process record in the lab state (node A).
const AGENT_PROCESS: &str = "agent-a";

#[derive(clap::Args)]
pub struct ChurnArgs {
    /// The drill lab's prefix ([a-z0-9], ≤16).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Pods enrolled and removed during the churn.
    #[arg(long, default_value_t = 200)]
    pub pods: usize,
    /// Pods in flight at once (each ADDed, then DELeted).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// SIGKILLs of the agent during the churn.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// The RNG seed (kill points, pauses, pod lifetimes); random when not given, and printed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// The drill network's families: ipv4, or dual (an IPv4 and an IPv6 address per pod; the
    /// lab comes up dual-stack).
    #[arg(long, default_value = "ipv4", value_parser = ["ipv4", "dual"])]
    pub ip_family: String,
    /// The drill network's primary plugin: ptp, or bridge (its pods on one bridge of its own;
    /// the lab comes up on bridge primaries too).
    #[arg(long, default_value = "ptp", value_parser = ["ptp", "bridge"])]
    pub primary: String,
    /// The node's firewall backend: nftables, or iptables (+ ipset).
    #[arg(long, default_value = "nftables", value_parser = ["nftables", "iptables"])]
    pub firewall: String,
    /// Pods ADDed before the churn and kept up through it (DELeted at the end).
    #[arg(long, default_value_t = 4)]
    pub keep: usize,
    /// Longest pause between a kill and the restart, in ms (each one random below it).
    #[arg(long, default_value_t = 300)]
    pub max_downtime_ms: u64,
    /// Of the kills, how many also SIGKILL the restarted agent again within
    /// `STARTUP_KILL_MAX_MS` of its start (mid-recovery: reading its state, replaying the
    /// journal, the first reconcile) before it is restarted for good.
    #[arg(long, default_value_t = 5)]
    pub startup_kills: usize,
    /// Retry a failed ADD in the same sandbox (the same container id, as some runtimes do)
    /// instead of a new one, as kubelet does.
    #[arg(long)]
    pub same_sandbox: bool,
    /// How long the kernel may take to converge once the last call returned, in seconds.
    #[arg(long, default_value_t = 45)]
    pub settle: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Failures of one kind of call, by CNI code (0: not a CNI error, e.g. a timeout).
pub type ByCode = BTreeMap<u32, usize>;

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChurnReport {
    pub seed: u64,
    pub ip_family: String,
    pub primary: String,
    pub firewall: String,
    pub pods: usize,
    pub concurrency: usize,
    pub keep: usize,
    /// SIGKILLs of the agent, and of them those that hit it with CNI calls in flight.
    pub kills: usize,
    pub kills_mid_call: usize,
    /// Restarted agents SIGKILLed again during their start-up.
    pub startup_kills: usize,
    /// From each kill to the restarted agent's "serving" line, in ms.
    pub restart: Option<Latency>,
    /// Every CNI call made (ADD and DEL, retries included).
    pub calls: usize,
    /// Successful calls' latencies.
    pub add: Option<Latency>,
    pub del: Option<Latency>,
    /// Failed calls by code: retried when retryable (11), drill failures otherwise.
    pub add_failed: ByCode,
    pub del_failed: ByCode,
    /// Both together: the retries kubelet would make, by the code that caused them.
    pub retries_by_code: ByCode,
    /// Calls that failed with a code other than 11 (each one a drill failure).
    pub non_retryable: usize,
    /// Pods the bounded retries gave up on (drill failures).
    pub gave_up: usize,
    /// Successful ADDs whose pod was not in the kernel right after (drill failures).
    pub not_applied: usize,
    /// Lines of the node's state (and veths, leases) present that should not be, and absent
    /// that should be, after the churn and after the kept pods' DEL.
    pub leaked: usize,
    pub missing: usize,
    /// Seconds from the last call to a look that found the kernel as desired (the first look
    /// follows the last restart, and takes a while itself).
    pub converged_after_s: Option<f64>,
    /// Lines off at the first look after the churn (the agent's pass 3 s after a restart
    /// forgets pods whose DEL it missed and whose veth went after its start).
    pub first_look_off: usize,
    /// The held captured connection echoed after every restart and at the end.
    pub connection_kept: bool,
    pub connection_echoes: usize,
    pub wall_s: f64,
    /// What went wrong, for a human (empty when the drill passed).
    pub problems: Vec<String>,
}

impl ChurnReport {
    /// Ok when every criterion held.
    pub fn verdict(&self) -> Result<()> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            bail!(
                "churn drill failed (seed {}): {}",
                self.seed,
                self.problems.join("; ")
            )
        }
    }

    pub fn table(&self) -> String {
        let row = |name: &str, l: &Option<Latency>, failed: Option<&ByCode>| match l {
            Some(l) => format!(
                "{name:<8} {:>6} {:>9.1} {:>9.1} {:>9.1}  {}\n",
                l.calls,
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                failed.map(codes).unwrap_or_default()
            ),
            None => format!("{name:<8} {:>6}\n", 0),
        };
        format!(
            "churn drill (seed {}, {} on {}, {}): {} pods, {} at a time, {} kept up; {} agent SIGKILLs ({} mid-call, {} more during start-up)\n\
             what      count    p50 ms    p99 ms    max ms  failed by code\n{}{}{}\
             calls: {}, non-retryable: {}, gave up: {}, ADD not applied: {}\n\
             kernel: leaked {}, missing {}, converged {} after the last call ({} lines off at first)\n\
             held connection: {} ({} echoes)\n{}",
            self.seed,
            self.ip_family,
            self.primary,
            self.firewall,
            self.pods,
            self.concurrency,
            self.keep,
            self.kills,
            self.kills_mid_call,
            self.startup_kills,
            row("ADD ok", &self.add, Some(&self.add_failed)),
            row("DEL ok", &self.del, Some(&self.del_failed)),
            row("restart", &self.restart, None),
            self.calls,
            self.non_retryable,
            self.gave_up,
            self.not_applied,
            self.leaked,
            self.missing,
            self.converged_after_s
                .map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| "never".into()),
            self.first_look_off,
            if self.connection_kept { "kept" } else { "CUT" },
            self.connection_echoes,
            if self.problems.is_empty() {
                "PASS\n".to_string()
            } else {
                format!("FAIL: {}\n", self.problems.join("; "))
            }
        )
    }
}

fn codes(c: &ByCode) -> String {
    c.iter()
        .map(|(code, n)| format!("{code}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// splitmix64: small, seedable, and the same sequence on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// The call indices (0-based, over the first attempts' `2 * pods` calls) at which the agent is
/// killed: `kills` distinct points spread over the first 90 %, in order.
pub fn kill_points(rng: &mut Rng, pods: usize, kills: usize) -> Vec<usize> {
    let span = ((2 * pods) as u64 * 9 / 10).max(kills as u64 + 1);
    let mut points = BTreeSet::new();
    while points.len() < kills {
        points.insert(rng.range(1, span) as usize);
    }
    points.into_iter().collect()
}

/// Brings a lab up, runs the churn in node A, tears the lab down.
pub fn churn_drill(lab_bin: &Path, args: &ChurnArgs) -> Result<ChurnReport> {
    if args.pods == 0 || args.concurrency == 0 {
        bail!("--pods and --concurrency must be at least 1");
    }
    if args.pods + args.keep > 2000 {
        bail!("--pods plus --keep above 2000 does not fit the drill's /20 with retries");
    }
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    eprintln!("drill: churn seed {seed} (replay with --seed {seed})");
    let opts = LabOptions::new(lab_bin)
        .arg("--ip-family")
        .arg(args.ip_family.clone())
        .arg("--primary")
        .arg(args.primary.clone())
        .arg("--firewall")
        .arg(args.firewall.clone());
    super::on_lab(&args.prefix, opts, |lab, state| {
        Churn::new(lab, state, args, seed)?.run()
    })
}

/// Counters the workers share with the killer.
#[derive(Default)]
struct Shared {
    /// CNI calls started, and in flight now.
    started: AtomicUsize,
    in_flight: AtomicUsize,
    /// Set when every worker is done.
    done: AtomicBool,
    /// Set when the killer could not restart the agent: the workers stop taking pods and
    /// retrying (the agent stays down), so the drill fails fast instead of at its bounds.
    abort: AtomicBool,
    stats: Mutex<Stats>,
}

#[derive(Default)]
struct Stats {
    add_ms: Vec<f64>,
    del_ms: Vec<f64>,
    add_failed: ByCode,
    del_failed: ByCode,
    non_retryable: Vec<String>,
    gave_up: Vec<String>,
    not_applied: Vec<String>,
    last_call: Option<Instant>,
}

/// One pod up: its sandbox, addresses (IPv4 first) and host veth.
struct Up {
    pod: Pod,
    ips: Vec<String>,
    veth: String,
}

struct Churn<'a> {
    lab: &'a Lab,
    net: DrillNet,
    args: &'a ChurnArgs,
    seed: u64,
    agent: ProcessRecord,
    shared: Shared,
}

impl<'a> Churn<'a> {
    fn new(lab: &'a Lab, state: &LabState, args: &'a ChurnArgs, seed: u64) -> Result<Self> {
        let node = state.node("A").context("no node A")?.clone();
        let agent = state
            .process(AGENT_PROCESS)
            .context("no agent-a process in the lab state")?
            .clone();
        let net = DrillNet::new(
            state,
            node,
            super::cniclient(state)?,
            NETWORK,
            &NetSpec {
                primary: args.primary.clone(),
                ranges: match args.ip_family.as_str() {
                    "dual" => vec![
                        (CIDR.into(), GATEWAY.into()),
                        (CIDR6.into(), GATEWAY6.into()),
                    ],
                    _ => vec![(CIDR.into(), GATEWAY.into())],
                },
            },
            CALL_TIMEOUT,
        )?;
        Ok(Churn {
            lab,
            net,
            args,
            seed,
            agent,
            shared: Shared::default(),
        })
    }

    fn run(self) -> Result<ChurnReport> {
        let node_netns = netns::named_path(&self.net.node.netns);
        netns::run_in(&node_netns, || self.in_node())?
    }

    /// Everything, from a thread in node A's netns (the CNI calls and `kernel_state` run
    /// there; the lab's helpers name their netns themselves).
    fn in_node(&self) -> Result<ChurnReport> {
        let started = Instant::now();
        let mut report = ChurnReport {
            seed: self.seed,
            ip_family: self.args.ip_family.clone(),
            primary: self.args.primary.clone(),
            firewall: self.args.firewall.clone(),
            pods: self.args.pods,
            concurrency: self.args.concurrency,
            keep: self.args.keep,
            ..Default::default()
        };
        let baseline = self.view()?;

        // The connection held through the path: a-client → ztunnel A → HBONE → ztunnel B →
        // b-app's echo server, neither pod churned.
        let b_app = SocketAddr::new(self.lab.pod_ip("b-app").into(), topology::SERVER_PORT);
        let mut held = self.lab.hold_connection("a-client", b_app)?;
        if crate::serve::parse_greeting(held.greeting.trim()).is_none() {
            bail!(
                "a-client → b-app: not the echo server's greeting: {:?}",
                held.greeting
            );
        }

        // The kept pods, ADDed while the agent is healthy: their state is the reference.
        let mut kept = Vec::new();
        for i in 0..self.args.keep {
            let pod = self.pod("ck", i, 0);
            self.net.make_netns(&pod.netns)?;
            let o = self.call("add", &pod)?;
            if o.code.is_some() {
                bail!("ADD of kept pod {} failed: {}", pod.name, o.why);
            }
            kept.push(self.up(&pod, &o)?);
        }
        let reference = self.view()?;
        self.check_reference(&baseline, &reference, &kept)?;

        let mut rng = Rng::new(self.seed);
        let points = kill_points(&mut rng, self.args.pods, self.args.kills);
        let (killer, lifetimes) = (rng.next_u64(), rng.next_u64());
        let next = AtomicUsize::new(0);
        let (kills, spawned) = std::thread::scope(|s| {
            let workers: Vec<_> = (0..self.args.concurrency)
                .map(|w| {
                    let next = &next;
                    s.spawn(move || {
                        let mut rng = Rng::new(lifetimes ^ (w as u64 + 1));
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= self.args.pods || self.shared.abort.load(Ordering::Acquire) {
                                break;
                            }
                            self.churn_pod(i, &mut rng);
                        }
                    })
                })
                .collect();
            let killer = s.spawn(|| self.killer(&points, Rng::new(killer), &mut held));
            for w in workers {
                let _ = w.join();
            }
            self.shared.done.store(true, Ordering::Release);
            killer
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the killer thread panicked")))
        })?;
        let last_call = self.stats().last_call.unwrap_or_else(Instant::now);

        report.kills = kills.iter().filter(|k| k.killed).count();
        report.kills_mid_call = kills.iter().filter(|k| k.in_flight > 0).count();
        report.startup_kills = kills.iter().filter(|k| k.startup_killed).count();
        let restarts: Vec<f64> = kills.iter().filter_map(|k| k.serving_ms).collect();
        report.restart = (!restarts.is_empty()).then(|| Latency::of(&restarts));
        report.connection_echoes = kills.iter().filter(|k| k.echoed).count();
        let mut problems: Vec<String> = kills.iter().filter_map(|k| k.problem.clone()).collect();
        if report.kills < self.args.kills {
            problems.push(format!(
                "{} kills of the {} asked for",
                report.kills, self.args.kills
            ));
        }

        // After the churn: the kept pods, the lab's pods and the ztunnel, exactly.
        // (Without an agent nothing converges: one look then.)
        let settle = match self.shared.abort.load(Ordering::Acquire) {
            true => Duration::ZERO,
            false => Duration::from_secs(self.args.settle),
        };
        let want_leases: BTreeSet<String> = kept.iter().flat_map(|u| u.ips.clone()).collect();
        let (diff, converged, first_off) =
            self.converge(&reference, &want_leases, last_call, settle)?;
        report.converged_after_s = converged;
        report.first_look_off = first_off;
        let (mut leaked, mut missing) = diff;

        // The kept pods' DEL (the agent is up: they must go at once), then the node as before.
        for u in &kept {
            self.del_until_done(&u.pod);
            let _ = netns::delete_named(&u.pod.netns);
        }
        let last = Instant::now();
        let ((l2, m2), after, _) = self.converge(&baseline, &BTreeSet::new(), last, settle)?;
        leaked.extend(l2);
        missing.extend(m2);
        if after.is_none() {
            report.converged_after_s = None;
        }

        let msg = b"still here at the end\n";
        match held.echo(msg) {
            Ok(back) if back == msg => {
                report.connection_echoes += 1;
                report.connection_kept = kills.iter().all(|k| k.echoed || !k.killed);
            }
            Ok(back) => problems.push(format!("the held connection echoed {back:?}")),
            Err(e) => problems.push(format!("the held connection was cut: {e:#}")),
        }
        if !report.connection_kept && !problems.iter().any(|p| p.contains("held connection")) {
            problems.push("the held connection missed an echo".into());
        }

        let st = self.stats();
        report.calls = self.shared.started.load(Ordering::Relaxed);
        report.add = (!st.add_ms.is_empty()).then(|| Latency::of(&st.add_ms));
        report.del = (!st.del_ms.is_empty()).then(|| Latency::of(&st.del_ms));
        report.add_failed = st.add_failed.clone();
        report.del_failed = st.del_failed.clone();
        for (code, n) in st.add_failed.iter().chain(&st.del_failed) {
            *report.retries_by_code.entry(*code).or_default() += n;
        }
        report.non_retryable = st.non_retryable.len();
        report.gave_up = st.gave_up.len();
        report.not_applied = st.not_applied.len();
        let first = |what: &str, v: &[String]| {
            (!v.is_empty())
                .then(|| format!("{} {what}: {}", v.len(), v[..v.len().min(5)].join(" | ")))
        };
        problems.extend(first("non-retryable failures", &st.non_retryable));
        problems.extend(first("pods given up", &st.gave_up));
        problems.extend(first("ADDs not applied", &st.not_applied));
        drop(st);
        report.leaked = leaked.len();
        report.missing = missing.len();
        problems.extend(first("leaked", &leaked));
        problems.extend(first("missing", &missing));
        if report.converged_after_s.is_none() && leaked.is_empty() && missing.is_empty() {
            problems.push("the kernel did not converge".into());
        }
        report.problems = problems;
        report.wall_s = started.elapsed().as_secs_f64();
        drop(spawned);
        Ok(report)
    }

    /// The node's state as compared: the lab's node snapshot (rules, tables, tunnels, both
    /// nft tables one element a line, backends' rules), the drill network's veths and leases.
    fn view(&self) -> Result<View> {
        let links = kernel_state()?
            .links
            .into_iter()
            .filter(|l| l.starts_with("veth"))
            .collect();
        Ok(View {
            snapshot: node_snapshot(self.lab, "nodeA"),
            links,
            leases: self.net.leases()?,
        })
    }

    /// The reference (kept pods up, healthy agent) must differ from the baseline only by the
    /// kept pods: their elements and routes, their veths, leases, and the drill network's
    /// gateway; each kept pod has its `veth . ip` element and its table-100 route.
    fn check_reference(&self, baseline: &View, reference: &View, kept: &[Up]) -> Result<()> {
        // A rule more renumbers the agent's tags on its neighbours: compared without them.
        let (base, refd) = (untagged(&baseline.snapshot), untagged(&reference.snapshot));
        let added = lines_only_in(&refd, &base);
        let bridge = NetSpec::bridge_name(NETWORK);
        let names_kept = |l: &str| {
            l.contains(GATEWAY)
                || l.contains(GATEWAY6)
                // A bridge's first pod brings its same-bridge capture rules.
                || (self.args.primary == "bridge" && l.contains(&bridge))
                || kept.iter().flat_map(|u| &u.ips).any(|ip| {
                    l.contains(&format!("{ip} "))
                        || l.contains(&format!("{ip},"))
                        || l.ends_with(ip.as_str())
                })
        };
        if let Some(l) = added.iter().find(|l| !names_kept(l)) {
            bail!("the kept pods' ADDs changed more than their own state: {l:?}");
        }
        let gone = lines_only_in(&base, &refd);
        if let Some(l) = gone
            .iter()
            .find(|l| !l.contains("element") && !l.contains("saddr"))
        {
            bail!("the kept pods' ADDs removed {l:?}");
        }
        for u in kept {
            for ip in &u.ips {
                let elem = match self.args.firewall.as_str() {
                    // `ipset save`: "add ztunnel-pods-iifs[6] <ip>,<routed device>".
                    "iptables" => format!(" {ip},{}", self.routed_dev(u)),
                    _ => format!("element \"{}\" . {ip}", u.veth),
                };
                let route = format!("{ip} via");
                let in_set = added.iter().any(|l| l.contains(&elem));
                let routed = added
                    .iter()
                    .any(|l| l.starts_with(&route) && l.contains("istioin"));
                if !in_set || !routed || !reference.links.contains(&u.veth) {
                    bail!(
                        "kept pod {} ({ip} on {}): element {in_set}, table-100 route {routed}, veth {}",
                        u.pod.name,
                        u.veth,
                        reference.links.contains(&u.veth)
                    );
                }
            }
        }
        Ok(())
    }

    /// Waits (up to `settle` after `since`) for the node to match `want` (with `leases`):
    /// the lines leaked and missing at the last look, and when it matched.
    fn converge(
        &self,
        want: &View,
        leases: &BTreeSet<String>,
        since: Instant,
        settle: Duration,
    ) -> Result<(Diff, Option<f64>, usize)> {
        let mut first = None;
        loop {
            let now = self.view()?;
            let mut leaked = lines_only_in(&now.snapshot, &want.snapshot);
            let mut missing = lines_only_in(&want.snapshot, &now.snapshot);
            leaked.extend(
                now.links
                    .difference(&want.links)
                    .map(|l| format!("link {l}")),
            );
            missing.extend(
                want.links
                    .difference(&now.links)
                    .map(|l| format!("link {l}")),
            );
            leaked.extend(now.leases.difference(leases).map(|l| format!("lease {l}")));
            missing.extend(leases.difference(&now.leases).map(|l| format!("lease {l}")));
            if first.is_none() && !(leaked.is_empty() && missing.is_empty()) {
                let some: Vec<&String> = leaked.iter().chain(&missing).take(4).collect();
                eprintln!("drill: not settled yet, e.g. {some:?}");
            }
            let off = *first.get_or_insert(leaked.len() + missing.len());
            if leaked.is_empty() && missing.is_empty() {
                let after = since.elapsed().as_secs_f64();
                return Ok(((leaked, missing), Some(after), off));
            }
            if since.elapsed() >= settle {
                return Ok(((leaked, missing), None, off));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.shared.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sandbox `attempt` of pod `i` of a kind (`cp` churned, `ck` kept).
    fn pod(&self, kind: &str, i: usize, attempt: u32) -> Pod {
        let attempt = if self.args.same_sandbox { 0 } else { attempt };
        Pod {
            netns: format!("{}-{kind}{i}", self.net.prefix),
            container_id: format!("{}-{kind}{i}-{attempt}", self.net.prefix),
            name: format!("{NETWORK}-{kind}{i}"),
        }
    }

    /// One CNI call, counted (the killer's clock).
    fn call(&self, op: &str, pod: &Pod) -> Result<CallOutcome> {
        self.shared.started.fetch_add(1, Ordering::AcqRel);
        self.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        let o = self.net.call_outcome(op, pod);
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        let mut guard = self.stats();
        let st = &mut *guard;
        st.last_call = Some(Instant::now());
        if let Ok(o) = &o {
            let (ok, failed) = match op {
                "add" => (&mut st.add_ms, &mut st.add_failed),
                _ => (&mut st.del_ms, &mut st.del_failed),
            };
            match o.code {
                None => ok.push(o.ms),
                Some(c) => *failed.entry(c).or_default() += 1,
            }
            if o.code.is_some_and(|c| c != RETRYABLE) {
                st.non_retryable
                    .push(format!("{op} of {}: {}", pod.container_id, o.why));
            }
        }
        o
    }

    /// The pod a successful ADD made: its address and host veth from the result.
    fn up(&self, pod: &Pod, o: &CallOutcome) -> Result<Up> {
        let v: Value = serde_json::from_str(&o.stdout)
            .with_context(|| format!("ADD of {} printed no result: {:?}", pod.name, o.stdout))?;
        let r = cni::parse_addresses(&v)?;
        let veth = r.host_veth.context("the ADD result names no host veth")?;
        Ok(Up {
            pod: pod.clone(),
            ips: r.ips.iter().map(ToString::to_string).collect(),
            veth,
        })
    }

    /// One churned pod, as kubelet would run it: sandboxes until an ADD succeeds (each failed
    /// one DELeted and removed), a short life, DEL, the netns removed.
    fn churn_pod(&self, i: usize, rng: &mut Rng) {
        let mut attempt = 0;
        let up = loop {
            let pod = self.pod("cp", i, attempt);
            if let Err(e) = self.net.make_netns(&pod.netns) {
                self.stats().gave_up.push(format!("{}: {e:#}", pod.name));
                return;
            }
            let o = match self.call("add", &pod) {
                Ok(o) => o,
                Err(e) => {
                    self.stats()
                        .gave_up
                        .push(format!("ADD of {}: {e:#}", pod.name));
                    self.teardown(&pod);
                    return;
                }
            };
            match o.code {
                None => match self.up(&pod, &o) {
                    Ok(u) => break u,
                    Err(e) => {
                        self.stats().not_applied.push(format!("{e:#}"));
                        self.teardown(&pod);
                        return;
                    }
                },
                Some(c) => {
                    self.teardown(&pod);
                    attempt += 1;
                    let abort = self.shared.abort.load(Ordering::Acquire);
                    if c != RETRYABLE || attempt >= MAX_ADD_ATTEMPTS || abort {
                        if c == RETRYABLE {
                            self.stats().gave_up.push(format!(
                                "{}: {attempt} ADDs failed, the last: {}",
                                pod.name, o.why
                            ));
                        }
                        return;
                    }
                    std::thread::sleep(backoff(attempt, rng));
                }
            }
        };
        if let Err(why) = self.applied(&up) {
            self.stats().not_applied.push(why);
        }
        std::thread::sleep(Duration::from_millis(rng.range(0, 100)));
        self.teardown(&up.pod);
    }

    /// DEL until it succeeds (bounded), then the netns removed.
    fn teardown(&self, pod: &Pod) {
        self.del_until_done(pod);
        let _ = netns::delete_named(&pod.netns);
    }

    fn del_until_done(&self, pod: &Pod) {
        let mut rng = Rng::new(pod.container_id.bytes().map(u64::from).sum());
        for attempt in 1..=MAX_DEL_ATTEMPTS {
            match self.call("del", pod) {
                Ok(o) if o.code.is_none() => return,
                Ok(o) if attempt == MAX_DEL_ATTEMPTS => {
                    self.stats().gave_up.push(format!(
                        "{}: {attempt} DELs failed, the last: {}",
                        pod.name, o.why
                    ));
                }
                Err(e) if attempt == MAX_DEL_ATTEMPTS => {
                    self.stats()
                        .gave_up
                        .push(format!("DEL of {}: {e:#}", pod.name));
                }
                _ => std::thread::sleep(backoff(attempt, &mut rng)),
            }
        }
    }

    /// The device the pod's packets are routed in on: the bridge, for a pod behind one.
    fn routed_dev(&self, u: &Up) -> String {
        match self.args.primary.as_str() {
            "bridge" => NetSpec::bridge_name(NETWORK),
            _ => u.veth.clone(),
        }
    }

    /// A successful ADD's pod is in the kernel: its `veth . ip` element and table-100 route
    /// (a kill after the reply may restart the agent meanwhile; its state is kept).
    fn applied(&self, u: &Up) -> std::result::Result<(), String> {
        // (stdout, stderr) of a command that may fail; a failure to run it is an error.
        let run = |argv: &[&str]| -> std::result::Result<(bool, String, String), String> {
            let mut cmd = std::process::Command::new(argv[0]);
            cmd.args(&argv[1..]);
            let out = procs::run_capture(&mut cmd, None, Duration::from_secs(10))
                .map_err(|e| format!("{e:#}"))?;
            let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
            Ok((out.status.success(), text(&out.stdout), text(&out.stderr)))
        };
        let dev = self.routed_dev(u);
        let table = ambient_net::consts::NODE_NFT_TABLE;
        for ip in &u.ips {
            let v6 = ip.contains(':');
            let (set, family) = match v6 {
                true => (POD_IIF_SET_V6, "-6"),
                false => (POD_IIF_SET, "-4"),
            };
            let elem = format!("{{ \"{dev}\" . {ip} }}");
            let member = format!("{ip},{dev}");
            let get: Vec<&str> = match self.args.firewall.as_str() {
                "iptables" => vec!["ipset", "test", set, &member],
                _ => vec!["nft", "get", "element", "inet", table, set, &elem],
            };
            // A lookup that fails for another reason than "no such element" (a dump
            // interrupted by a concurrent transaction) is asked again.
            let mut found = run(&get)?;
            for _ in 0..5 {
                if found.0
                    || found.2.contains("No such file or directory")
                    || found.2.contains("is NOT in set")
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
                found = run(&get)?;
            }
            let route = run(&["ip", family, "route", "show", "table", "100", "exact", ip])?;
            let listed = found.1.contains(ip.as_str()) || found.2.contains("is in set");
            if !found.0 || !listed || !route.1.contains("istioin") {
                return Err(format!(
                    "{} ({ip} on {}) after a successful ADD: element {:?} ({}), route {:?}",
                    u.pod.container_id, u.veth, found.1, found.2, route.1
                ));
            }
        }
        Ok(())
    }

    /// SIGKILLs the agent at each of `points` (calls started since the last restart, plus a
    /// random few ms so the kill lands inside a call), restarts it after a random pause, and
    /// checks the held connection after each restart. Returns what each kill did and every
    /// agent it started (the last one is serving).
    fn killer(
        &self,
        points: &[usize],
        mut rng: Rng,
        held: &mut HeldConnection,
    ) -> Result<(Vec<Kill>, Vec<Spawned>)> {
        let argv = self.agent.argv.clone();
        let mut current = self.agent.clone();
        let mut spawned: Vec<Spawned> = Vec::new();
        let mut kills = Vec::new();
        let mut mark = 0;
        let mut prev = 0;
        let mut echo_ok = true;
        let mut startup = BTreeSet::new();
        while startup.len() < self.args.startup_kills.min(points.len()) {
            startup.insert(rng.range(0, points.len() as u64 - 1) as usize);
        }
        for (k, point) in points.iter().enumerate() {
            let target = mark + (point - prev);
            prev = *point;
            while self.shared.started.load(Ordering::Acquire) < target
                && !self.shared.done.load(Ordering::Acquire)
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(rng.range(0, 60)));
            let mut kill = Kill {
                in_flight: self.shared.in_flight.load(Ordering::Acquire),
                ..Default::default()
            };
            let t = Instant::now();
            if let Err(e) = sigkill(&current) {
                kill.problem = Some(format!("kill {k}: {e:#}"));
                self.shared.abort.store(true, Ordering::Release);
                kills.push(kill);
                break;
            }
            kill.killed = true;
            // Reap our own child (the lab's first agent is not ours).
            if let Some(last) = spawned.last_mut() {
                let _ = last.stop();
            }
            std::thread::sleep(Duration::from_millis(
                rng.range(0, self.args.max_downtime_ms),
            ));
            let name = format!("{AGENT_PROCESS}-churn{k}");
            if startup.contains(&k) {
                // Killed again while it recovers: its state read, the journal replayed, the
                // first reconcile and the CNI calls already waiting on its socket.
                let r = self
                    .lab
                    .spawn(&format!("{name}-startup"), "nodeA", &argv)
                    .and_then(|mut first| {
                        std::thread::sleep(Duration::from_millis(
                            rng.range(0, STARTUP_KILL_MAX_MS),
                        ));
                        sigkill(&first.rec)?;
                        first.stop()
                    });
                if let Err(e) = r {
                    kill.problem = Some(format!("start-up kill {k}: {e:#}"));
                    self.shared.abort.store(true, Ordering::Release);
                    kills.push(kill);
                    break;
                }
                kill.startup_killed = true;
            }
            let s = self.lab.spawn(&name, "nodeA", &argv);
            let s = match s.and_then(|s| wait_serving(&s.rec).map(|()| s)) {
                Ok(s) => s,
                Err(e) => {
                    kill.problem = Some(format!("restart {k}: {e:#}"));
                    self.shared.abort.store(true, Ordering::Release);
                    kills.push(kill);
                    break;
                }
            };
            kill.serving_ms = Some(t.elapsed().as_secs_f64() * 1e3);
            current = s.rec.clone();
            spawned.push(s);
            if echo_ok {
                let msg = format!("after restart {k}\n");
                match held.echo(msg.as_bytes()) {
                    Ok(b) if b == msg.as_bytes() => kill.echoed = true,
                    Ok(b) => {
                        echo_ok = false;
                        kill.problem = Some(format!(
                            "the held connection echoed {b:?} after restart {k}"
                        ));
                    }
                    Err(e) => {
                        echo_ok = false;
                        kill.problem =
                            Some(format!("the held connection was cut by kill {k}: {e:#}"));
                    }
                }
            }
            kills.push(kill);
            mark = self.shared.started.load(Ordering::Acquire);
        }
        Ok((kills, spawned))
    }
}

/// What one kill did.
#[derive(Debug, Default)]
struct Kill {
    killed: bool,
    /// CNI calls in flight when it landed.
    in_flight: usize,
    /// From the kill to the restarted agent's "serving".
    serving_ms: Option<f64>,
    /// The first restarted agent was SIGKILLed again while it started.
    startup_killed: bool,
    echoed: bool,
    problem: Option<String>,
}

/// Lines (and veths, leases) leaked and missing.
type Diff = (Vec<String>, Vec<String>);

/// The node's state the drill compares.
struct View {
    snapshot: String,
    /// The node's veths.
    links: BTreeSet<String>,
    leases: BTreeSet<String>,
}

/// `text` without the agent's rule tags (`[ambient 1/2 4f4115da74bf8a68]`: the rule's place
/// in its chain and a hash).
fn untagged(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.find("[ambient ") {
            Some(start) => {
                let end = line[start..]
                    .find(']')
                    .map_or(line.len(), |e| start + e + 1);
                out.push_str(&line[..start]);
                out.push_str(&line[end..]);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// kubelet-like backoff: growing with the attempt, jittered, at most ~1 s.
fn backoff(attempt: u32, rng: &mut Rng) -> Duration {
    let base = (50 * u64::from(attempt)).min(800);
    Duration::from_millis(base + rng.range(0, base / 2))
}

fn sigkill(rec: &ProcessRecord) -> Result<()> {
    if !procs::is_alive(rec) {
        bail!("the agent (pid {}) was already gone", rec.pid);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(rec.pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while procs::is_alive(rec) {
        if Instant::now() > deadline {
            bail!("the agent (pid {}) survived SIGKILL", rec.pid);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Waits for a restarted agent's "serving" line.
fn wait_serving(rec: &ProcessRecord) -> Result<()> {
    let deadline = Instant::now() + SERVE_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&rec.log).unwrap_or_default();
        if text.contains("serving") {
            return Ok(());
        }
        if !procs::is_alive(rec) {
            bail!(
                "the restarted agent exited:\n{}",
                procs::log_tail(&rec.log, 20)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the restarted agent did not serve within {SERVE_TIMEOUT:?}:\n{}",
                procs::log_tail(&rec.log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rng_replays_and_kill_points_are_distinct_and_spread() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(
            a,
            (0..5)
                .scan(Rng::new(8), |r, _| Some(r.next_u64()))
                .collect::<Vec<_>>()
        );
        let mut r = Rng::new(1);
        assert!((0..1000)
            .map(|_| r.range(3, 5))
            .all(|v| (3..=5).contains(&v)));
        assert_eq!(r.range(4, 4), 4);
        let p = kill_points(&mut Rng::new(42), 200, 20);
        assert_eq!(p.len(), 20);
        assert!(p.windows(2).all(|w| w[0] < w[1]), "{p:?}");
        assert!(
            *p.first().unwrap() >= 1 && *p.last().unwrap() <= 360,
            "{p:?}"
        );
        // More kills than calls still terminates with distinct points.
        assert_eq!(kill_points(&mut Rng::new(1), 2, 10).len(), 10);
    }

    #[test]
    fn rule_tags_are_left_out() {
        let t = "a comment \"x [ambient 1/2 4f4115da]\"\nplain\n";
        assert_eq!(untagged(t), "a comment \"x \"\nplain\n");
    }

    #[test]
    fn the_report_fails_on_any_problem_and_names_the_seed() {
        let mut r = ChurnReport {
            seed: 9,
            connection_kept: true,
            ..Default::default()
        };
        assert!(r.verdict().is_ok());
        assert!(r.table().contains("PASS"));
        r.problems.push("1 leaked: x".into());
        let e = r.verdict().unwrap_err().to_string();
        assert!(e.contains("seed 9") && e.contains("leaked"), "{e}");
        assert!(r.table().contains("FAIL"));
    }
}
