//! `ambient-lab flood`: one pod floods a ztunnel's listeners while other pods keep connecting
//! through the same ztunnels (issue 13, "Load").
//!
//! A lab of its own with the real data plane. Three phases, one per listener:
//!
//! - **15001**: the ambient pod `a-app` connects to `b-app:9080` as fast as it can (`--workers`
//!   connects in flight) and holds up to `--hold` of them (the oldest closed when full):
//!   ztunnel A's outbound listener, and the HBONE streams behind it;
//! - **15006**: the pod outside the mesh `a-plain` does the same: ztunnel B's plaintext
//!   listener, two descriptors per connection;
//! - **15008**: `a-plain` dials `b-app:15008` directly, half of its connections silent after
//!   the TCP handshake, half stalled in the middle of a TLS ClientHello: ztunnel B's HBONE
//!   listener, which must time the handshakes out (the last ones are kept open until it has).
//!
//! Before and during each flood the victims (`a-client` → `b-client:9080` over HBONE through
//! both ztunnels, `b-plain` → `b-client:9080` through ztunnel B's 15006) open connection
//! after connection; their connect latency (connect + greeting) is compared. None may fail,
//! each ztunnel's descriptors must stay under its per-source cap's share, and once the flood
//! stops both ztunnels are back at their baseline descriptors.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambient_net::consts::port;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::bench::stats::percentile;
use crate::bench::sys;
use crate::harness::{Lab, LabOptions};
use crate::serve::parse_greeting;
use crate::soak::{self, ProcSample, Ztunnel};
use crate::state::LabState;
use crate::topology::SERVER_PORT;
use crate::ztunnel;

pub const DEFAULT_PREFIX: &str = "flood";
/// The open-files limit the lab's processes get (ztunnel's per-source cap defaults to a
/// quarter of it: 4096), the same on every machine whose hard limit allows it.
pub const LAB_NOFILE: u64 = 16_384;
/// A victim's connect + greeting: beyond this it failed. Long enough for two SYN
/// retransmissions (1 s + 2 s + 4 s): a victim whose SYN a flooded accept queue dropped is
/// slowed, which its latency shows; one that gets no answer at all has failed.
const VICTIM_TIMEOUT: Duration = Duration::from_secs(15);
/// Victims' p99 connect latency during a flood must stay below this: a victim SYN lost to a
/// full accept queue costs a 1 s retransmission, so above it the flood starves others.
pub const VICTIM_P99_MS: f64 = 1_500.0;

/// Between a victim's connections.
const VICTIM_PAUSE: Duration = Duration::from_millis(20);
/// Descriptors above the baseline a ztunnel may keep after the flood (beside idle pooled
/// HBONE connections).
const RELEASE_SLACK: u64 = 16;
/// How long a ztunnel gets to close a flood's connections once it stops (it may still be
/// working through them on a saturated machine).
const RELEASE_WAIT: Duration = Duration::from_secs(30);
/// After a 15008 flood, how long its stalled handshakes are kept open: past ztunnel's
/// handshake timeout (its --connect-timeout, 5 s in the lab), so that ztunnel times them out.
const STALLED_LINGER: Duration = Duration::from_secs(6);

#[derive(clap::Args, Clone, Debug)]
pub struct FloodArgs {
    /// The flood lab's prefix ([a-z0-9], ≤16).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Seconds each flood lasts (the victims are measured for as long before it).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Connects the flooding pod has in flight at once.
    #[arg(long, default_value_t = 256)]
    pub workers: usize,
    /// Connections the flooding pod holds open at most (the oldest closed when full).
    #[arg(long, default_value_t = 6000)]
    pub hold: usize,
    /// ztunnel's --max-connections-per-source for the lab (0: no cap). Default: ztunnel's
    /// own (a quarter of the lab's open-files limit, 4096).
    #[arg(long)]
    pub ztunnel_cap: Option<usize>,
    /// Only these listeners (15001, 15006, 15008).
    #[arg(long, value_delimiter = ',', default_values_t = [port::OUTBOUND, port::INBOUND_PLAINTEXT, port::INBOUND_HBONE])]
    pub targets: Vec<u16>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl FloodArgs {
    pub fn new(seconds: u64) -> FloodArgs {
        FloodArgs {
            prefix: DEFAULT_PREFIX.into(),
            seconds,
            workers: 256,
            hold: 6000,
            ztunnel_cap: None,
            targets: vec![port::OUTBOUND, port::INBOUND_PLAINTEXT, port::INBOUND_HBONE],
            json: None,
        }
    }
}

/// What a flood connection does once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing: held until closed (15001, 15006; half of 15008: a half-open handshake).
    Hold,
    /// The first bytes of a TLS ClientHello, then nothing (the other half of 15008).
    StallTls,
}

/// The start of a TLS 1.2-framed ClientHello that announces 512 bytes and never sends them.
const PARTIAL_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, // handshake record, 512 bytes
    0x01, 0x00, 0x01, 0xfc, // ClientHello, 508 bytes
    0x03, 0x03, // legacy version
];

/// One listener's flood: who floods what, and which ztunnel takes it.
#[derive(Debug, Clone)]
struct Phase {
    listener: u16,
    flooder: &'static str,
    target: SocketAddr,
    /// 0: ztunnel A, 1: ztunnel B.
    ztunnel: usize,
    modes: &'static [Mode],
}

/// The victims: (pod, destination).
fn victims(lab: &Lab) -> Vec<(&'static str, SocketAddr)> {
    let to = SocketAddr::new(IpAddr::V4(lab.pod_ip("b-client")), SERVER_PORT);
    vec![("a-client", to), ("b-plain", to)]
}

fn phases(lab: &Lab, targets: &[u16]) -> Vec<Phase> {
    let app = IpAddr::V4(lab.pod_ip("b-app"));
    let all = [
        Phase {
            listener: port::OUTBOUND,
            flooder: "a-app",
            target: SocketAddr::new(app, SERVER_PORT),
            ztunnel: 0,
            modes: &[Mode::Hold],
        },
        Phase {
            listener: port::INBOUND_PLAINTEXT,
            flooder: "a-plain",
            target: SocketAddr::new(app, SERVER_PORT),
            ztunnel: 1,
            modes: &[Mode::Hold],
        },
        Phase {
            listener: port::INBOUND_HBONE,
            flooder: "a-plain",
            target: SocketAddr::new(app, port::INBOUND_HBONE),
            ztunnel: 1,
            modes: &[Mode::Hold, Mode::StallTls],
        },
    ];
    all.into_iter()
        .filter(|p| targets.contains(&p.listener))
        .collect()
}

/// Connect latencies of the victims over one stretch.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VictimStats {
    pub connections: usize,
    pub failures: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub first_error: Option<String>,
}

impl VictimStats {
    fn of(ms: &[f64], failures: usize, first_error: Option<String>) -> VictimStats {
        VictimStats {
            connections: ms.len() + failures,
            failures,
            p50_ms: percentile(ms, 50.0),
            p99_ms: percentile(ms, 99.0),
            max_ms: ms.iter().copied().fold(0.0, f64::max),
            first_error,
        }
    }
}

/// What the flooding pod saw.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FloodStats {
    pub attempts: u64,
    pub established: u64,
    pub failed: u64,
    /// Connections per second it opened.
    pub per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseReport {
    pub listener: u16,
    pub flooder: String,
    pub target: String,
    pub ztunnel: String,
    pub flood: FloodStats,
    pub before: VictimStats,
    pub during: VictimStats,
    pub baseline: ProcSample,
    /// The flooded ztunnel's largest descriptor count during the flood.
    pub peak_fds: u64,
    pub after: [ProcSample; 2],
    pub released: bool,
    /// `ztunnel_refused_connections_total` of the flooded ztunnel during the flood, by cause,
    /// and `syn-limit`: SYNs its netns's per-source limit dropped before they reached it.
    pub refused: Vec<(String, u64)>,
    /// Its WARN lines about refusals during the flood (once per cause and minute).
    pub refusal_warnings: usize,
    /// Its `ztunnel_refused_connections_total{cause="syn-limit"}` after the phase: the
    /// kernel's drops as ztunnel reports them (read every 10 s, so behind the counters).
    pub syn_limit_reported: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FloodReport {
    pub seconds: u64,
    pub workers: usize,
    pub hold: usize,
    /// The per-source cap the ztunnels run with.
    pub cap: usize,
    /// Soft open-files limits of ztunnel A and B.
    pub ztunnel_nofile: [u64; 2],
    pub phases: Vec<PhaseReport>,
    pub pass: bool,
}

impl FloodReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "flood: {} s per listener, {} connects in flight, up to {} held; ztunnel cap {} per source (open-files limit A {}, B {})\n\
             {:<6} {:<8} {:>9} {:>8} {:>7} | {:>23} | {:>23} | {:>7} {:>13} {:>8}  refused\n",
            self.seconds,
            self.workers,
            self.hold,
            self.cap,
            self.ztunnel_nofile[0],
            self.ztunnel_nofile[1],
            "port", "flooder", "attempts", "estab", "conn/s", "victims before p50/p99", "during p50/p99 (fail)",
            "peak fd", "base->after fd", "released"
        );
        for p in &self.phases {
            let z = if p.ztunnel.ends_with('a') { 0 } else { 1 };
            let refused: Vec<String> = p.refused.iter().map(|(c, n)| format!("{c}={n}")).collect();
            out += &format!(
                "{:<6} {:<8} {:>9} {:>8} {:>7.0} | {:>10.1} {:>8.1} ms | {:>8.1} {:>8.1} ({:>2}) | {:>7} {:>6}->{:<6} {:>8}  {}\n",
                p.listener,
                p.flooder,
                p.flood.attempts,
                p.flood.established,
                p.flood.per_second,
                p.before.p50_ms,
                p.before.p99_ms,
                p.during.p50_ms,
                p.during.p99_ms,
                p.during.failures,
                p.peak_fds,
                p.baseline.fds,
                p.after[z].fds,
                p.released,
                refused.join(" ")
            );
        }
        out += &format!(
            "victims (a-client -> b-client over HBONE, b-plain -> b-client plaintext): {} connections during the floods, {} failed; {}\n",
            self.phases.iter().map(|p| p.during.connections).sum::<usize>(),
            self.phases.iter().map(|p| p.during.failures).sum::<usize>(),
            if self.pass { "PASS" } else { "FAIL" }
        );
        for p in &self.phases {
            if let Some(e) = p
                .during
                .first_error
                .as_ref()
                .or(p.before.first_error.as_ref())
            {
                out += &format!("{}: first victim error: {e}\n", p.listener);
            }
        }
        out
    }
}

/// Runs the floods, prints the table and the JSON line, fails when it failed.
pub fn run(args: &FloodArgs) -> Result<()> {
    let exe = std::env::current_exe().context("locate ambient-lab")?;
    sys::catch_signals()?;
    let report = flood(&exe, args)?;
    let text = serde_json::to_string(&report)?;
    println!("{}{text}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, &text).with_context(|| format!("write {}", path.display()))?;
    }
    if !report.pass {
        bail!("flood failed (see the table)");
    }
    Ok(())
}

/// Sets this process's open-files limit to `n`, soft and hard; where the hard limit is lower
/// and may not be raised (no CAP_SYS_RESOURCE), both to the hard limit.
fn set_nofile(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit and getrlimit only read and write the local struct.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            return Ok(());
        }
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                return Ok(());
            }
        }
    }
    Err(std::io::Error::last_os_error()).context("setrlimit RLIMIT_NOFILE")
}

/// Brings a lab up (its processes with [`LAB_NOFILE`] open files), floods it, tears it down.
pub fn flood(lab_bin: &std::path::Path, args: &FloodArgs) -> Result<FloodReport> {
    if args.seconds == 0 || args.workers == 0 || args.hold == 0 {
        bail!("--seconds, --workers and --hold must be at least 1");
    }
    set_nofile(LAB_NOFILE)?;
    let opts = LabOptions::new(lab_bin);
    if let Some(cap) = args.ztunnel_cap {
        // Read by ztunnel's --max-connections-per-source; the lab's processes inherit it.
        std::env::set_var("ZTUNNEL_MAX_CONNECTIONS_PER_SOURCE", cap.to_string());
    }
    eprintln!("flood: bringing up lab {}", args.prefix);
    let lab = Lab::up(&args.prefix, opts);
    std::env::remove_var("ZTUNNEL_MAX_CONNECTIONS_PER_SOURCE");
    let mut lab = lab?;
    // As root, the flood itself may hold more than the lab's limit.
    soak::raise_nofile(1 << 20);
    let result = (|| {
        let state = LabState::load(lab.prefix())?.context("no lab state")?;
        flood_on(&lab, &state, args)
    })();
    eprintln!("flood: tearing the lab down");
    let down = lab.down();
    let report = result?;
    down?;
    Ok(report)
}

fn flood_on(lab: &Lab, state: &LabState, args: &FloodArgs) -> Result<FloodReport> {
    let zts = [
        Ztunnel::of(state, "ztunnel-a")?,
        Ztunnel::of(state, "ztunnel-b")?,
    ];
    let nofile = [zts[0].nofile()?, zts[1].nofile()?];
    let cap = args
        .ztunnel_cap
        .unwrap_or(usize::try_from(nofile[0] / 4).unwrap_or(usize::MAX));
    let secs = Duration::from_secs(args.seconds);
    let mut reports = Vec::new();
    for phase in phases(lab, &args.targets) {
        sys::check_interrupted()?;
        eprintln!(
            "flood: {} from {} to {}: victims alone for {secs:?}",
            phase.listener, phase.flooder, phase.target
        );
        let zt = &zts[phase.ztunnel];
        let baseline = zt.sample()?;
        let before = measure_victims(lab, secs, || {})?;
        let metrics_before = refused_counts(lab, phase.ztunnel)?;
        let log = state
            .process(&zt.name)
            .map(|p| p.log.clone())
            .context("ztunnel log")?;
        let log_from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        eprintln!("flood: {} flood for {secs:?}", phase.listener);
        let stop = AtomicBool::new(false);
        let peak = AtomicU64::new(baseline.fds);
        let (flood, during) = std::thread::scope(|s| -> Result<(FloodStats, VictimStats)> {
            let flooder =
                s.spawn(|| lab.run_in(phase.flooder, || run_flood(&phase, args, &stop))?);
            // The flood at full strength first.
            std::thread::sleep(Duration::from_secs(1));
            let during = measure_victims(lab, secs, || {
                if let Ok(x) = zt.sample() {
                    peak.fetch_max(x.fds, Ordering::Relaxed);
                }
            });
            stop.store(true, Ordering::Relaxed);
            let flood = flooder
                .join()
                .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
            Ok((flood, during?))
        })?;
        let after = released(&zts, &baseline, phase.ztunnel)?;
        let metrics_after = refused_counts(lab, phase.ztunnel)?;
        let refused = metrics_after
            .iter()
            .map(|(cause, n)| {
                let was = metrics_before
                    .iter()
                    .find(|(c, _)| c == cause)
                    .map_or(0, |x| x.1);
                (cause.clone(), n.saturating_sub(was))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let z = &after[phase.ztunnel];
        reports.push(PhaseReport {
            listener: phase.listener,
            flooder: phase.flooder.into(),
            target: phase.target.to_string(),
            ztunnel: zt.name.clone(),
            flood,
            before,
            during,
            baseline,
            peak_fds: peak.load(Ordering::Relaxed),
            released: z.fds.saturating_sub(z.hbone_conns) <= baseline.fds + RELEASE_SLACK,
            after,
            refused,
            refusal_warnings: refusal_warnings(&log, log_from),
            syn_limit_reported: refused_metrics(lab, phase.ztunnel)?
                .iter()
                .find(|(c, _)| c == "syn-limit")
                .map_or(0, |x| x.1),
        });
    }
    let pass = reports.iter().all(|p| {
        p.before.failures == 0
            && p.during.failures == 0
            && p.during.connections > 0
            && p.during.p99_ms < VICTIM_P99_MS
            && p.released
            && p.flood.established > 0
    });
    Ok(FloodReport {
        seconds: args.seconds,
        workers: args.workers,
        hold: args.hold,
        cap,
        ztunnel_nofile: nofile,
        phases: reports,
        pass,
    })
}

/// Samples until the flooded ztunnel is back at its baseline but for idle pooled HBONE
/// connections, or [`RELEASE_WAIT`] has passed.
fn released(zts: &[Ztunnel; 2], baseline: &ProcSample, which: usize) -> Result<[ProcSample; 2]> {
    let until = Instant::now() + RELEASE_WAIT;
    loop {
        let after = [zts[0].sample()?, zts[1].sample()?];
        let z = &after[which];
        if z.fds.saturating_sub(z.hbone_conns) <= baseline.fds + RELEASE_SLACK
            || Instant::now() >= until
        {
            return Ok(after);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// [`refused_metrics`] and the SYNs the ztunnel netns's per-source limit dropped.
fn refused_counts(lab: &Lab, which: usize) -> Result<Vec<(String, u64)>> {
    // ztunnel reports the kernel's drops too, but only every 10 s: the counters are read here.
    let mut out: Vec<(String, u64)> = refused_metrics(lab, which)?
        .into_iter()
        .filter(|(c, _)| c != "syn-limit")
        .collect();
    let netns = ["a-ztunnel", "b-ztunnel"][which];
    let drops = lab
        .run_in(netns, ambient_net::nft::syn_limit_drops)?
        .with_context(|| format!("{netns}: the syn-limit counters"))?;
    out.push(("syn-limit".into(), drops));
    Ok(out)
}

/// `ztunnel_refused_connections_total` of a ztunnel (0: A, 1: B), summed by cause.
fn refused_metrics(lab: &Lab, which: usize) -> Result<Vec<(String, u64)>> {
    let netns = ["a-ztunnel", "b-ztunnel"][which];
    let (code, text) = lab
        .run_in(netns, || ztunnel::http_get(port::METRICS, "/metrics"))?
        .context("GET /metrics")?;
    if code != 200 {
        bail!("{netns} /metrics: {code}");
    }
    let mut by_cause: Vec<(String, u64)> = Vec::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("ztunnel_refused_connections_total{") else {
            continue;
        };
        let cause = rest
            .split("cause=\"")
            .nth(1)
            .and_then(|c| c.split('"').next())
            .unwrap_or("")
            .to_string();
        let n: u64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match by_cause.iter_mut().find(|(c, _)| *c == cause) {
            Some(x) => x.1 += n,
            None => by_cause.push((cause, n)),
        }
    }
    Ok(by_cause)
}

/// WARN lines about refusals in a ztunnel log from byte `from` on.
fn refusal_warnings(log: &std::path::Path, from: u64) -> usize {
    let Ok(bytes) = std::fs::read(log) else {
        return 0;
    };
    let text = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default());
    text.lines()
        .filter(|l| l.contains("WARN") && l.contains("refusing connections"))
        .count()
}

/// Every victim opens connection after connection (connect + greeting) for `secs`, in its own
/// netns; `tick` runs on the calling thread meanwhile (every 100 ms).
fn measure_victims(lab: &Lab, secs: Duration, tick: impl Fn()) -> Result<VictimStats> {
    let end = Instant::now() + secs;
    let vs = victims(lab);
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = vs
            .iter()
            .map(|(pod, to)| s.spawn(move || lab.run_in(pod, || victim(*to, end))))
            .collect();
        while Instant::now() < end {
            tick();
            std::thread::sleep(Duration::from_millis(100));
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a victim panicked")))
            .collect::<Vec<_>>()
    });
    let (mut ms, mut failures, mut first) = (Vec::new(), 0, None);
    for r in results {
        let (m, f, e) = r??;
        ms.extend(m);
        failures += f;
        first = first.or(e);
    }
    Ok(VictimStats::of(&ms, failures, first))
}

/// One victim until `end`: (latencies in ms, failures, the first error).
fn victim(to: SocketAddr, end: Instant) -> (Vec<f64>, usize, Option<String>) {
    let (mut ms, mut failures, mut first) = (Vec::new(), 0, None);
    while Instant::now() < end {
        let t = Instant::now();
        let r = TcpStream::connect_timeout(&to, VICTIM_TIMEOUT).and_then(|c| {
            c.set_read_timeout(Some(
                VICTIM_TIMEOUT
                    .saturating_sub(t.elapsed())
                    .max(Duration::from_millis(1)),
            ))?;
            let mut line = String::new();
            BufReader::new(c).read_line(&mut line)?;
            Ok(line)
        });
        match r {
            Ok(line) if parse_greeting(&line).is_some() => ms.push(t.elapsed().as_secs_f64() * 1e3),
            Ok(line) => {
                failures += 1;
                first.get_or_insert(format!("{to}: no greeting: {line:?}"));
            }
            Err(e) => {
                failures += 1;
                first.get_or_insert(format!("{to}: {e}"));
            }
        }
        std::thread::sleep(VICTIM_PAUSE);
    }
    (ms, failures, first)
}

/// The flooding pod (on the calling thread, inside its netns): `workers` connects in flight,
/// up to `hold` connections held, until `stop`.
fn run_flood(phase: &Phase, args: &FloodArgs, stop: &AtomicBool) -> Result<FloodStats> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let held: Arc<Mutex<VecDeque<tokio::net::TcpStream>>> = Arc::default();
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let start = Instant::now();
    let stopped = Arc::new(AtomicBool::new(false));
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..args.workers {
            let mode = phase.modes[w % phase.modes.len()];
            let (held, counts, stopped) = (held.clone(), counts.clone(), stopped.clone());
            let (target, hold) = (phase.target, args.hold);
            tasks.spawn(async move {
                while !stopped.load(Ordering::Relaxed) {
                    counts[0].fetch_add(1, Ordering::Relaxed);
                    let c = tokio::time::timeout(
                        Duration::from_secs(2),
                        tokio::net::TcpStream::connect(target),
                    )
                    .await;
                    match c {
                        Ok(Ok(mut s)) => {
                            counts[1].fetch_add(1, Ordering::Relaxed);
                            if mode == Mode::StallTls {
                                let _ = s.write_all(PARTIAL_CLIENT_HELLO).await;
                            }
                            let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
                            h.push_back(s);
                            while h.len() > hold {
                                h.pop_front();
                            }
                        }
                        _ => {
                            counts[2].fetch_add(1, Ordering::Relaxed);
                            // An immediate refusal would otherwise spin.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            });
        }
        // `stop` is the caller's; the tasks watch a flag of their own.
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stopped.store(true, Ordering::Relaxed);
        // Connects in flight end within their timeout.
        while tasks.join_next().await.is_some() {}
        if phase.modes.contains(&Mode::StallTls) {
            tokio::time::sleep(STALLED_LINGER).await;
        }
    });
    held.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let secs = start.elapsed().as_secs_f64();
    let established = counts[1].load(Ordering::Relaxed);
    Ok(FloodStats {
        attempts: counts[0].load(Ordering::Relaxed),
        established,
        failed: counts[2].load(Ordering::Relaxed),
        per_second: established as f64 / secs.max(1e-3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn victim_stats_and_the_partial_hello() {
        let ms: Vec<f64> = (1..=100).map(f64::from).collect();
        let v = VictimStats::of(&ms, 2, Some("x".into()));
        assert_eq!((v.connections, v.failures), (102, 2));
        assert_eq!((v.p50_ms, v.p99_ms, v.max_ms), (50.0, 99.0, 100.0));
        // A handshake record announcing more than it sends: the server must wait (and time out).
        let announced = u16::from_be_bytes([PARTIAL_CLIENT_HELLO[3], PARTIAL_CLIENT_HELLO[4]]);
        assert_eq!(PARTIAL_CLIENT_HELLO[0], 0x16);
        assert!(usize::from(announced) > PARTIAL_CLIENT_HELLO.len() - 5);
    }
}
