//! `ambient-lab soak`: many concurrent connections through the mesh for a long time (issue 13,
//! "Load").
//!
//! A lab of its own with the real data plane. `--connections` connections go from the
//! ambient client pods of node A to the ambient server pods of node B, so each one takes the
//! whole path: capture → ztunnel A's 15001 → HBONE → ztunnel B's 15008 → the pod. They are
//! opened (at most `--open-concurrency` connects at a time), held (each echoes a short unique
//! message every `--echo-every` seconds and checks what comes back) and churned (`--churn` a
//! second are closed and opened again), until `--duration`: every loop stops there, and every
//! wait is bounded by it or by a per-operation timeout.
//!
//! Both ztunnels' descriptors (`/proc/<pid>/fd`) and RSS (`VmRSS`) are sampled every
//! `--interval`. After `--warmup` they must stay flat at the constant connection count (see
//! [`Criterion`]), nothing may fail (connects, resets, timeouts, wrong greetings or echoes:
//! all 0), and once the connections are closed each ztunnel is back at its baseline but for
//! its idle pooled HBONE connections (which close on their idle timeout).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambient_net::consts::port;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{sleep_until, timeout_at};

use crate::bench::sys;
use crate::harness::{Lab, LabOptions};
use crate::serve::parse_greeting;
use crate::state::{LabState, PodRole};
use crate::topology::SERVER_PORT;

pub const DEFAULT_PREFIX: &str = "soak";
/// One connect (with its greeting), one echo, one close: far above any healthy latency.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed connect, before the next attempt (the loop still ends at the deadline).
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long the closed connections get to be released before the after-sample.
const RELEASE_WAIT: Duration = Duration::from_secs(15);
/// The open-files limit the soak gives itself and what it starts (the lab's ztunnels raise
/// their soft limit to it): what Kubernetes' runtimes give a container.
const NOFILE: u64 = 1 << 20;

#[derive(clap::Args, Clone, Debug)]
pub struct SoakArgs {
    /// The soak lab's prefix ([a-z0-9], ≤16).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Concurrent connections through the mesh.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Seconds the whole run lasts (opening included); every loop stops then.
    #[arg(long, default_value_t = 600)]
    pub duration: u64,
    /// Connections closed and opened again per second. Default: 1% of --connections.
    #[arg(long)]
    pub churn: Option<f64>,
    /// Seconds before the samples are held to the flatness criterion. Default: a fifth of
    /// --duration, between 5 and 120 (the allocator settles under churn for a minute or two).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    pub interval: u64,
    /// Every connection echoes a message this often (seconds).
    #[arg(long, default_value_t = 10)]
    pub echo_every: u64,
    /// Connects in flight at once while opening.
    #[arg(long, default_value_t = 200)]
    pub open_concurrency: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl SoakArgs {
    pub fn new(connections: usize, duration: u64) -> SoakArgs {
        SoakArgs {
            prefix: DEFAULT_PREFIX.into(),
            connections,
            duration,
            churn: None,
            warmup: None,
            interval: 10,
            echo_every: 10,
            open_concurrency: 200,
            json: None,
        }
    }

    fn churn_per_s(&self) -> f64 {
        self.churn.unwrap_or(self.connections as f64 / 100.0)
    }

    fn warmup_s(&self) -> u64 {
        self.warmup.unwrap_or((self.duration / 5).clamp(5, 120))
    }

    fn validate(&self) -> Result<()> {
        if self.connections == 0 || self.duration == 0 || self.interval == 0 {
            bail!("--connections, --duration and --interval must be at least 1");
        }
        if self.echo_every == 0 || self.open_concurrency == 0 {
            bail!("--echo-every and --open-concurrency must be at least 1");
        }
        if !(self.churn_per_s() >= 0.0 && self.churn_per_s().is_finite()) {
            bail!("--churn must be a rate ≥ 0");
        }
        if self.warmup_s() + 2 * self.interval > self.duration {
            bail!(
                "--duration {} leaves fewer than 2 samples after --warmup {} at --interval {}",
                self.duration,
                self.warmup_s(),
                self.interval
            );
        }
        Ok(())
    }
}

/// What "flat" means: after the warm-up, at a constant connection count, each ztunnel's
/// descriptors vary by at most `fd_margin` (max − min) and its RSS by at most
/// `rss_margin_pct` of its smallest post-warm-up RSS, or `rss_floor_mb` if that is more.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Criterion {
    /// 1% of the connections, at least 64 (pooled HBONE connections come and go with load).
    pub fd_margin: u64,
    pub rss_margin_pct: f64,
    /// Allocator noise on a small heap.
    pub rss_floor_mb: f64,
    /// Every post-warm-up sample has at least this many connections open (99%).
    pub min_open: usize,
}

impl Criterion {
    fn new(connections: usize) -> Criterion {
        Criterion {
            fd_margin: (connections as u64 / 100).max(64),
            rss_margin_pct: 10.0,
            rss_floor_mb: 16.0,
            min_open: connections - connections / 100,
        }
    }

    /// The RSS margin of a ztunnel whose smallest post-warm-up RSS is `min_mb`.
    pub fn rss_margin_mb(&self, min_mb: f64) -> f64 {
        (min_mb * self.rss_margin_pct / 100.0).max(self.rss_floor_mb)
    }

    pub fn describe(&self) -> String {
        format!(
            "after warm-up, per ztunnel: FDs max-min <= {}, RSS max-min <= {}% of its minimum (at least {} MB); >= {} connections open at every sample; 0 failures; after closing, FDs back to baseline + {} (+ idle pooled HBONE connections)",
            self.fd_margin, self.rss_margin_pct, self.rss_floor_mb, self.min_open, RELEASE_SLACK
        )
    }
}

/// Descriptors a ztunnel may hold above its baseline once everything is closed, beside its
/// idle pooled HBONE connections.
const RELEASE_SLACK: u64 = 16;

/// One sample of one ztunnel.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcSample {
    pub fds: u64,
    pub rss_mb: f64,
    /// ESTABLISHED TCP sockets of its netns with a 15008 end (HBONE connections).
    pub hbone_conns: u64,
}

/// A ztunnel of the lab, sampled through /proc.
#[derive(Debug, Clone)]
pub struct Ztunnel {
    pub name: String,
    pub pid: i32,
}

impl Ztunnel {
    /// `ztunnel-a` or `ztunnel-b` of the lab.
    pub fn of(state: &LabState, name: &str) -> Result<Ztunnel> {
        let rec = state
            .process(name)
            .with_context(|| format!("the lab has no {name} process"))?;
        Ok(Ztunnel {
            name: name.to_string(),
            pid: rec.pid,
        })
    }

    pub fn sample(&self) -> Result<ProcSample> {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .with_context(|| format!("{} (pid {}) is gone", self.name, self.pid))?
            .count() as u64;
        let rss_mb = sys::rss_bytes(self.pid)? / 1e6;
        Ok(ProcSample {
            fds,
            rss_mb,
            hbone_conns: self.hbone_conns()?,
        })
    }

    /// Its soft open-files limit (`/proc/<pid>/limits`).
    pub fn nofile(&self) -> Result<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/limits", self.pid))?;
        text.lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok())
            .context("no 'Max open files' in /proc/<pid>/limits")
    }

    /// /proc/<pid>/net/tcp{,6} show the process's netns.
    fn hbone_conns(&self) -> Result<u64> {
        let hbone = format!(":{:04X}", port::INBOUND_HBONE);
        let mut n = 0;
        for f in ["tcp", "tcp6"] {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{}/net/{f}", self.pid)) else {
                continue;
            };
            n += text
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .filter(|c| c.len() > 3 && c[3] == "01")
                .filter(|c| c[1].ends_with(&hbone) || c[2].ends_with(&hbone))
                .count() as u64;
        }
        Ok(n)
    }
}

/// Raises this process's open-files limit (soft and hard: as root) to at least `want`, capped
/// by the kernel's `nr_open`; what it starts inherits it. Returns the soft limit.
pub fn raise_nofile(want: u64) -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(want);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let target = want.min(nr_open).max(lim.rlim_max);
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: target,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Not root: the soft limit up to the hard one.
            sys::raise_nofile();
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Counters the connection tasks update and the sampler reads.
#[derive(Default)]
struct Counters {
    open: AtomicUsize,
    opened: AtomicU64,
    churned: AtomicU64,
    echoes: AtomicU64,
    connect_failures: AtomicU64,
    resets: AtomicU64,
    timeouts: AtomicU64,
    wrong: AtomicU64,
    /// The first error of each kind, in the order they happened.
    first_errors: Mutex<Vec<String>>,
}

impl Counters {
    fn failures(&self) -> u64 {
        self.connect_failures.load(Ordering::Relaxed)
            + self.resets.load(Ordering::Relaxed)
            + self.timeouts.load(Ordering::Relaxed)
            + self.wrong.load(Ordering::Relaxed)
    }

    /// Counts a failure; the first of its kind (`counter`) is kept.
    fn fail(&self, counter: &AtomicU64, what: String) {
        if counter.fetch_add(1, Ordering::Relaxed) == 0 {
            let mut first = self.first_errors.lock().unwrap_or_else(|p| p.into_inner());
            first.push(what);
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    pub t_s: f64,
    pub open: usize,
    pub echoes: u64,
    pub failures: u64,
    pub a: ProcSample,
    pub b: ProcSample,
}

/// Max − min of one ztunnel's post-warm-up samples.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spread {
    pub fds_min: u64,
    pub fds_max: u64,
    pub rss_min_mb: f64,
    pub rss_max_mb: f64,
}

impl Spread {
    fn of(samples: &[&ProcSample]) -> Spread {
        let fds = samples.iter().map(|s| s.fds);
        let rss = samples.iter().map(|s| s.rss_mb);
        Spread {
            fds_min: fds.clone().min().unwrap_or(0),
            fds_max: fds.max().unwrap_or(0),
            rss_min_mb: rss.clone().fold(f64::INFINITY, f64::min),
            rss_max_mb: rss.fold(0.0, f64::max),
        }
    }

    fn flat(&self, c: &Criterion) -> bool {
        self.fds_max - self.fds_min <= c.fd_margin
            && self.rss_max_mb - self.rss_min_mb <= c.rss_margin_mb(self.rss_min_mb)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SoakReport {
    pub connections: usize,
    pub duration_s: u64,
    pub warmup_s: u64,
    pub interval_s: u64,
    pub churn_per_s: f64,
    pub echo_every_s: u64,
    pub clients: Vec<String>,
    pub servers: Vec<String>,
    /// Soft open-files limits: this process, ztunnel A, ztunnel B.
    pub nofile: [u64; 3],
    pub baseline: [ProcSample; 2],
    pub samples: Vec<Sample>,
    /// After every connection closed (and [`RELEASE_WAIT`] at most).
    pub after: [ProcSample; 2],
    pub opened: u64,
    pub churned: u64,
    pub echoes: u64,
    pub connect_failures: u64,
    pub resets: u64,
    pub timeouts: u64,
    pub wrong: u64,
    /// The first connect failure, reset, timeout and wrong answer, as they happened.
    pub first_errors: Vec<String>,
    /// Lines of both ztunnels' logs during the soak: refused or failed connections.
    pub ztunnel_refused: usize,
    pub ztunnel_failed: usize,
    pub criterion: Criterion,
    pub spread: [Spread; 2],
    pub min_open_after_warmup: usize,
    pub flat: bool,
    pub released: bool,
    pub pass: bool,
}

impl SoakReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "soak: {} connections {} -> {} for {} s (warm-up {} s), churn {:.1}/s, an echo per connection every {} s\n\
             open-files limit: soak {}, ztunnel A {}, ztunnel B {}\n\
             criterion: {}\n\
             {:>6} {:>6} {:>9} {:>5} {:>7} {:>9} {:>6} {:>7} {:>9} {:>6}\n",
            self.connections,
            self.clients.join(","),
            self.servers.join(","),
            self.duration_s,
            self.warmup_s,
            self.churn_per_s,
            self.echo_every_s,
            self.nofile[0],
            self.nofile[1],
            self.nofile[2],
            self.criterion.describe(),
            "t s", "open", "echoes", "fail", "A fds", "A rss MB", "A hb", "B fds", "B rss MB", "B hb"
        );
        let row = |t: &str, open: usize, echoes: u64, fail: u64, a: &ProcSample, b: &ProcSample| {
            format!(
                "{t:>6} {open:>6} {echoes:>9} {fail:>5} {:>7} {:>9.1} {:>6} {:>7} {:>9.1} {:>6}\n",
                a.fds, a.rss_mb, a.hbone_conns, b.fds, b.rss_mb, b.hbone_conns
            )
        };
        out += &row("base", 0, 0, 0, &self.baseline[0], &self.baseline[1]);
        for s in &self.samples {
            let mark = if s.t_s >= self.warmup_s as f64 {
                ""
            } else {
                "w"
            };
            out += &row(
                &format!("{mark}{:.0}", s.t_s),
                s.open,
                s.echoes,
                s.failures,
                &s.a,
                &s.b,
            );
        }
        out += &row(
            "after",
            0,
            self.echoes,
            self.failures(),
            &self.after[0],
            &self.after[1],
        );
        for (name, s) in ["A", "B"].iter().zip(&self.spread) {
            out += &format!(
                "ztunnel {name} after warm-up: FDs {}..{} (spread {}), RSS {:.1}..{:.1} MB (spread {:.1})\n",
                s.fds_min,
                s.fds_max,
                s.fds_max - s.fds_min,
                s.rss_min_mb,
                s.rss_max_mb,
                s.rss_max_mb - s.rss_min_mb
            );
        }
        out += &format!(
            "opened {}, churned {}, echoes {}; connect failures {}, resets {}, timeouts {}, wrong greetings/echoes {}; ztunnel log: {} refused, {} failed\n\
             at least {} open after warm-up; flat: {}, released: {}; {}\n",
            self.opened,
            self.churned,
            self.echoes,
            self.connect_failures,
            self.resets,
            self.timeouts,
            self.wrong,
            self.ztunnel_refused,
            self.ztunnel_failed,
            self.min_open_after_warmup,
            self.flat,
            self.released,
            if self.pass { "PASS" } else { "FAIL" }
        );
        for e in &self.first_errors {
            out += &format!("first of its kind: {e}\n");
        }
        out
    }

    fn failures(&self) -> u64 {
        self.connect_failures + self.resets + self.timeouts + self.wrong
    }
}

/// Runs the soak, prints the table and the JSON line, fails when it failed.
pub fn run(args: &SoakArgs) -> Result<()> {
    let exe = std::env::current_exe().context("locate ambient-lab")?;
    sys::catch_signals()?;
    let report = soak(&exe, args)?;
    let text = serde_json::to_string(&report)?;
    println!("{}{text}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, &text).with_context(|| format!("write {}", path.display()))?;
    }
    if !report.pass {
        bail!("soak failed (see the table)");
    }
    Ok(())
}

/// Brings a lab up, soaks it, tears it down; the report (whether or not it passed).
pub fn soak(lab_bin: &std::path::Path, args: &SoakArgs) -> Result<SoakReport> {
    args.validate()?;
    let nofile = raise_nofile(NOFILE);
    if nofile < args.connections as u64 + 1024 {
        bail!(
            "open-files limit {nofile}: too low for {} connections",
            args.connections
        );
    }
    eprintln!("soak: bringing up lab {}", args.prefix);
    let mut lab = Lab::up(&args.prefix, LabOptions::new(lab_bin))?;
    let result = (|| {
        let state = LabState::load(lab.prefix())?.context("no lab state")?;
        soak_on(&lab, &state, args, nofile)
    })();
    eprintln!("soak: tearing the lab down");
    let down = lab.down();
    let report = result?;
    down?;
    Ok(report)
}

/// The ambient pods of `node` that run the test servers: every one can be a client; a server
/// must have no waypoint of its own (its connections would go through the waypoint).
fn mesh_pods(state: &LabState, node: &str, servers: bool) -> Vec<(String, IpAddr)> {
    state
        .pods
        .iter()
        .filter(|p| p.node == node && p.ambient && p.server.is_some())
        .filter(|p| !matches!(p.role, PodRole::Ztunnel | PodRole::Waypoint))
        .filter(|p| !servers || p.waypoint.is_none())
        .filter_map(|p| Some((p.id.clone(), p.primary_ip()?)))
        .collect()
}

fn soak_on(lab: &Lab, state: &LabState, args: &SoakArgs, nofile: u64) -> Result<SoakReport> {
    let clients = mesh_pods(state, "A", false);
    let servers: Vec<(String, SocketAddr)> = mesh_pods(state, "B", true)
        .into_iter()
        .map(|(id, ip)| (id, SocketAddr::new(ip, SERVER_PORT)))
        .collect();
    if clients.is_empty() || servers.is_empty() {
        bail!("the lab has no ambient client pods on node A or server pods on node B");
    }
    let zts = [
        Ztunnel::of(state, "ztunnel-a")?,
        Ztunnel::of(state, "ztunnel-b")?,
    ];
    let logs: Vec<(PathBuf, u64)> = ["ztunnel-a", "ztunnel-b"]
        .iter()
        .filter_map(|n| state.process(n))
        .map(|p| {
            let len = std::fs::metadata(&p.log).map(|m| m.len()).unwrap_or(0);
            (p.log.clone(), len)
        })
        .collect();
    let baseline = [zts[0].sample()?, zts[1].sample()?];
    let limits = [nofile, zts[0].nofile()?, zts[1].nofile()?];
    let warmup = args.warmup_s();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.duration);
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let per_pod = split(args.connections, clients.len());
    eprintln!(
        "soak: {} connections from {:?} to {:?} for {} s",
        args.connections,
        clients.iter().map(|c| &c.0).collect::<Vec<_>>(),
        servers.iter().map(|s| &s.0).collect::<Vec<_>>(),
        args.duration
    );
    let mut samples = Vec::new();
    let sampled: Result<()> = std::thread::scope(|s| {
        let mut pods = Vec::new();
        for (i, (id, ip)) in clients.iter().enumerate() {
            let plan = PodPlan {
                first_slot: per_pod[..i].iter().sum(),
                slots: per_pod[i],
                own_ip: *ip,
                servers: servers.iter().map(|s| s.1).collect(),
                churn_per_s: args.churn_per_s() * per_pod[i] as f64 / args.connections as f64,
                echo_every: Duration::from_secs(args.echo_every),
                open_concurrency: (args.open_concurrency / clients.len()).max(1),
                deadline: tokio::time::Instant::from_std(deadline),
            };
            let (counters, stop) = (counters.clone(), stop_rx.clone());
            let id = id.clone();
            pods.push(s.spawn(move || -> Result<()> {
                lab.run_in(&id, move || run_pod(plan, counters, stop))?
                    .with_context(|| format!("client pod {id}"))
            }));
        }
        let mut next = start;
        loop {
            next += Duration::from_secs(args.interval);
            while Instant::now() < next && !pods.iter().all(|p| p.is_finished()) {
                if sys::interrupted() {
                    let _ = stop_tx.send(true);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if pods.iter().all(|p| p.is_finished()) || Instant::now() >= deadline {
                break;
            }
            let sample = Sample {
                t_s: start.elapsed().as_secs_f64(),
                open: counters.open.load(Ordering::Relaxed),
                echoes: counters.echoes.load(Ordering::Relaxed),
                failures: counters.failures(),
                a: zts[0].sample()?,
                b: zts[1].sample()?,
            };
            eprintln!(
                "soak: t={:.0}s open={} echoes={} failures={} A fds={} rss={:.1}MB B fds={} rss={:.1}MB",
                sample.t_s,
                sample.open,
                sample.echoes,
                sample.failures,
                sample.a.fds,
                sample.a.rss_mb,
                sample.b.fds,
                sample.b.rss_mb
            );
            samples.push(sample);
        }
        for p in pods {
            p.join()
                .map_err(|_| anyhow::anyhow!("a client pod thread panicked"))??;
        }
        Ok(())
    });
    sampled?;
    if sys::interrupted() {
        bail!("interrupted");
    }
    let after = released_sample(&zts, &baseline)?;
    let (mut refused, mut failed) = (0, 0);
    for (log, from) in &logs {
        let (r, f) = count_log_problems(log, *from);
        refused += r;
        failed += f;
    }
    let judged: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= warmup as f64).collect();
    if judged.len() < 2 {
        bail!("only {} samples after the warm-up", judged.len());
    }
    let spread = [
        Spread::of(&judged.iter().map(|s| &s.a).collect::<Vec<_>>()),
        Spread::of(&judged.iter().map(|s| &s.b).collect::<Vec<_>>()),
    ];
    let criterion = Criterion::new(args.connections);
    let min_open = judged.iter().map(|s| s.open).min().unwrap_or(0);
    let flat = spread.iter().all(|s| s.flat(&criterion)) && min_open >= criterion.min_open;
    let released = is_released(&after, &baseline);
    let c = &counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let first_errors = c
        .first_errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut report = SoakReport {
        connections: args.connections,
        duration_s: args.duration,
        warmup_s: warmup,
        interval_s: args.interval,
        churn_per_s: args.churn_per_s(),
        echo_every_s: args.echo_every,
        clients: clients.iter().map(|c| c.0.clone()).collect(),
        servers: servers.iter().map(|s| s.0.clone()).collect(),
        nofile: limits,
        baseline,
        samples,
        after,
        opened: load(&c.opened),
        churned: load(&c.churned),
        echoes: load(&c.echoes),
        connect_failures: load(&c.connect_failures),
        resets: load(&c.resets),
        timeouts: load(&c.timeouts),
        wrong: load(&c.wrong),
        first_errors,
        ztunnel_refused: refused,
        ztunnel_failed: failed,
        criterion,
        spread,
        min_open_after_warmup: min_open,
        flat,
        released,
        pass: false,
    };
    report.pass = report.flat
        && report.released
        && report.failures() == 0
        && report.echoes > 0
        && report.ztunnel_refused == 0
        && report.ztunnel_failed == 0;
    Ok(report)
}

/// `total` split into `parts` near-equal counts.
fn split(total: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// Back at the baseline but for idle pooled HBONE connections (and [`RELEASE_SLACK`]).
fn is_released(after: &[ProcSample; 2], baseline: &[ProcSample; 2]) -> bool {
    after
        .iter()
        .zip(baseline)
        .all(|(a, b)| a.fds.saturating_sub(a.hbone_conns) <= b.fds + RELEASE_SLACK)
}

/// Samples both ztunnels until they are released or [`RELEASE_WAIT`] has passed.
fn released_sample(zts: &[Ztunnel; 2], baseline: &[ProcSample; 2]) -> Result<[ProcSample; 2]> {
    let until = Instant::now() + RELEASE_WAIT;
    loop {
        let after = [zts[0].sample()?, zts[1].sample()?];
        if is_released(&after, baseline) || Instant::now() >= until {
            return Ok(after);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Refused and failed connections in a ztunnel log from byte `from` on.
fn count_log_problems(log: &std::path::Path, from: u64) -> (usize, usize) {
    let Ok(bytes) = std::fs::read(log) else {
        return (0, 0);
    };
    let text = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default());
    let count = |what: &str| text.lines().filter(|l| l.contains(what)).count();
    (count("connection refused"), count("connection failed"))
}

/// What one client pod's thread runs.
struct PodPlan {
    first_slot: usize,
    slots: usize,
    own_ip: IpAddr,
    servers: Vec<SocketAddr>,
    churn_per_s: f64,
    echo_every: Duration,
    open_concurrency: usize,
    deadline: tokio::time::Instant,
}

/// On the calling thread (inside the pod's netns): a runtime of its own, whose sockets are
/// the pod's, runs every slot of the pod and its churn ticker until the deadline.
fn run_pod(plan: PodPlan, counters: Arc<Counters>, stop: watch::Receiver<bool>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let plan = Arc::new(plan);
        let opening = Arc::new(Semaphore::new(plan.open_concurrency));
        let churn: Arc<Vec<Notify>> = Arc::new((0..plan.slots).map(|_| Notify::new()).collect());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..plan.slots {
            let slot = Slot {
                id: plan.first_slot + i,
                plan: plan.clone(),
                counters: counters.clone(),
                opening: opening.clone(),
                churn: churn.clone(),
                stop: stop.clone(),
            };
            tasks.spawn(slot.run(i));
        }
        tasks.spawn(churn_ticker(plan.clone(), churn, stop));
        while tasks.join_next().await.is_some() {}
    });
    Ok(())
}

/// Asks one slot after the other (round robin) to close and reopen its connection, at the
/// pod's churn rate, until the deadline.
async fn churn_ticker(
    plan: Arc<PodPlan>,
    churn: Arc<Vec<Notify>>,
    mut stop: watch::Receiver<bool>,
) {
    if plan.churn_per_s <= 0.0 || churn.is_empty() {
        return;
    }
    let every = Duration::from_secs_f64(1.0 / plan.churn_per_s);
    let mut next = tokio::time::Instant::now() + every;
    let mut k = 0;
    loop {
        tokio::select! {
            _ = sleep_until(next.min(plan.deadline)) => {}
            _ = stop.changed() => return,
        }
        if tokio::time::Instant::now() >= plan.deadline {
            return;
        }
        churn[k % churn.len()].notify_one();
        k += 1;
        next += every;
    }
}

/// One of the connections: opened, held and reopened until the deadline.
struct Slot {
    id: usize,
    plan: Arc<PodPlan>,
    counters: Arc<Counters>,
    opening: Arc<Semaphore>,
    churn: Arc<Vec<Notify>>,
    stop: watch::Receiver<bool>,
}

/// Why a held connection ended.
enum End {
    Churn,
    Deadline,
    Failed,
}

impl Slot {
    fn server(&self) -> SocketAddr {
        let s = &self.plan.servers;
        // A pod's slots are consecutive ids: they alternate between the servers.
        s[self.id % s.len()]
    }

    fn done(&self) -> bool {
        tokio::time::Instant::now() >= self.plan.deadline || *self.stop.borrow()
    }

    async fn run(mut self, index: usize) {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (self.id as u64 + 1).wrapping_mul(0x2545_f491));
        while !self.done() {
            let Some(conn) = self.open().await else {
                let pause = tokio::time::Instant::now() + RETRY_PAUSE;
                sleep_until(pause.min(self.plan.deadline)).await;
                continue;
            };
            let c = self.counters.clone();
            c.open.fetch_add(1, Ordering::Relaxed);
            c.opened.fetch_add(1, Ordering::Relaxed);
            let end = self.hold(conn, index, &mut rng).await;
            c.open.fetch_sub(1, Ordering::Relaxed);
            if let End::Churn = end {
                c.churned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A connection with the server's greeting read and checked, or None (counted).
    async fn open(&mut self) -> Option<BufReader<TcpStream>> {
        let to = self.server();
        let permit = tokio::select! {
            p = self.opening.acquire() => p.ok()?,
            _ = sleep_until(self.plan.deadline) => return None,
        };
        // From the permit on: waiting for one is the ramp's pace, not the mesh's latency.
        let limit = (tokio::time::Instant::now() + OP_TIMEOUT).min(self.plan.deadline);
        let opened = timeout_at(limit, async {
            let tcp = TcpStream::connect(to).await?;
            tcp.set_nodelay(true)?;
            let mut r = BufReader::new(tcp);
            let mut line = String::new();
            r.read_line(&mut line).await?;
            std::io::Result::Ok((r, line))
        })
        .await;
        drop(permit);
        let c = &self.counters;
        match opened {
            _ if self.done() => None,
            Err(_) => {
                c.fail(&c.connect_failures, format!("connect to {to}: timed out"));
                None
            }
            Ok(Err(e)) => {
                c.fail(&c.connect_failures, format!("connect to {to}: {e}"));
                None
            }
            Ok(Ok((r, line))) => match parse_greeting(&line) {
                Some((server, client)) if server == to && client.ip() == self.plan.own_ip => {
                    Some(r)
                }
                _ => {
                    c.fail(&c.wrong, format!("greeting from {to}: {line:?}"));
                    None
                }
            },
        }
    }

    /// Echoes every `echo_every` (from a random phase) until churned, the deadline or a
    /// failure; then closes (half-close, the echo server's EOF read back).
    async fn hold(&mut self, mut conn: BufReader<TcpStream>, index: usize, rng: &mut Rng) -> End {
        let every = self.plan.echo_every;
        let phase = Duration::from_millis(rng.below(every.as_millis().max(1) as u64));
        let mut next = tokio::time::Instant::now() + phase;
        let mut seq = 0u64;
        let c = self.counters.clone();
        // An echo the deadline cut short: its answer (or what is left of it) may still come.
        let mut cut: Option<String> = None;
        let end = loop {
            let churned = self.churn[index].notified();
            tokio::select! {
                _ = sleep_until(next.min(self.plan.deadline)) => {}
                _ = churned => break End::Churn,
                _ = self.stop.changed() => break End::Deadline,
            }
            if self.done() {
                break End::Deadline;
            }
            seq += 1;
            let msg = format!("soak {} {seq}\n", self.id);
            let limit = (tokio::time::Instant::now() + OP_TIMEOUT).min(self.plan.deadline);
            let mut back = vec![0u8; msg.len()];
            let r = timeout_at(limit, async {
                conn.get_mut().write_all(msg.as_bytes()).await?;
                conn.read_exact(&mut back).await.map(drop)
            })
            .await;
            match r {
                Ok(Ok(())) if back == msg.as_bytes() => {
                    c.echoes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(())) => {
                    c.fail(&c.wrong, format!("echo of {msg:?}: {back:?}"));
                    break End::Failed;
                }
                Ok(Err(e)) => {
                    c.fail(&c.resets, format!("echo {}: {e}", self.id));
                    break End::Failed;
                }
                Err(_) if self.done() => {
                    cut = Some(msg);
                    break End::Deadline;
                }
                Err(_) => {
                    c.fail(&c.timeouts, format!("echo {}: timed out", self.id));
                    break End::Failed;
                }
            }
            next += every;
        };
        if !matches!(end, End::Failed) {
            self.close(conn, cut.as_deref()).await;
        }
        end
    }

    /// Half-closes and reads to the server's EOF: a clean close end to end, within
    /// [`OP_TIMEOUT`] (past the deadline too: the last closes happen after it). Only the tail
    /// of an echo the deadline `cut` short may come before the EOF.
    async fn close(&self, mut conn: BufReader<TcpStream>, cut: Option<&str>) {
        let c = &self.counters;
        let r = tokio::time::timeout(OP_TIMEOUT, async {
            conn.get_mut().shutdown().await?;
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).await.map(|_| rest)
        })
        .await;
        match r {
            Ok(Ok(rest)) if rest.is_empty() => {}
            Ok(Ok(rest)) if cut.is_some_and(|m| m.as_bytes().ends_with(&rest)) => {}
            Ok(Ok(rest)) => c.fail(
                &c.wrong,
                format!("{} bytes after the last echo", rest.len()),
            ),
            Ok(Err(e)) => c.fail(&c.resets, format!("close {}: {e}", self.id)),
            Err(_) => c.fail(&c.timeouts, format!("close {}: no EOF", self.id)),
        }
    }
}

/// xorshift64: the slots' echo phases, without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ps(fds: u64, rss_mb: f64, hbone_conns: u64) -> ProcSample {
        ProcSample {
            fds,
            rss_mb,
            hbone_conns,
        }
    }

    #[test]
    fn flat_means_within_the_margins() {
        let c = Criterion::new(10_000);
        assert_eq!((c.fd_margin, c.min_open), (100, 9_900));
        assert!((c.rss_margin_mb(200.0) - 20.0).abs() < 1e-9);
        assert!((c.rss_margin_mb(50.0) - 16.0).abs() < 1e-9);
        assert_eq!(Criterion::new(500).fd_margin, 64);
        let flat = Spread::of(&[&ps(10_100, 200.0, 0), &ps(10_150, 215.0, 0)]);
        assert!(flat.flat(&c));
        let leaking_fds = Spread::of(&[&ps(10_100, 200.0, 0), &ps(10_250, 201.0, 0)]);
        assert!(!leaking_fds.flat(&c));
        let growing = Spread::of(&[&ps(10_100, 200.0, 0), &ps(10_100, 230.0, 0)]);
        assert!(!growing.flat(&c));
    }

    #[test]
    fn released_allows_only_idle_pooled_connections() {
        let base = [ps(20, 10.0, 0), ps(20, 10.0, 0)];
        assert!(is_released(&[ps(30, 0.0, 0), ps(100, 0.0, 80)], &base));
        assert!(!is_released(&[ps(30, 0.0, 0), ps(100, 0.0, 10)], &base));
    }

    #[test]
    fn connections_split_over_pods_and_short_runs_are_refused() {
        assert_eq!(split(10_000, 3), vec![3334, 3333, 3333]);
        assert_eq!(split(1, 2), vec![1, 0]);
        let mut a = SoakArgs::new(500, 20);
        a.interval = 2;
        a.warmup = Some(6);
        assert!(a.validate().is_ok());
        a.duration = 9;
        assert!(a.validate().is_err());
        let full = SoakArgs::new(10_000, 600);
        assert_eq!((full.warmup_s(), full.churn_per_s()), (120, 100.0));
    }
}
