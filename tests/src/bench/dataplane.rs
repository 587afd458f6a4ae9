//! Data-plane figures, each measured on the meshed path (`a-client` → `b-app`: both pods
//! ambient, so node A's capture, ztunnel A, HBONE over the underlay, ztunnel B, node B's
//! capture) and on the unmeshed path (`a-plain` → `b-plain`, routed directly) in the same
//! run, alternating which goes first; and the L7 path through the waypoint beside both
//! ([`super::l7`]).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::l7::{self, HttpPlan, HttpReport, Watched};
use super::stats::{paired, Percentiles, Summary};
use super::sys;
use super::Progress;
use crate::harness::{Lab, Spawned};
use crate::paths;
use crate::topology::SERVER_PORT;

/// iperf3's port in the server pods.
pub const IPERF_PORT: u16 = 5201;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// One side of a comparison: client pod → server pod.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub name: &'static str,
    pub client: &'static str,
    pub server: &'static str,
}

pub const MESHED: Route = Route {
    name: "meshed",
    client: "a-client",
    server: "b-app",
};
pub const UNMESHED: Route = Route {
    name: "unmeshed",
    client: "a-plain",
    server: "b-plain",
};

/// How much to measure.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DataplanePlan {
    pub runs: usize,
    /// iperf3 `-t`, seconds.
    pub bulk_seconds: u32,
    pub req_warmup: usize,
    pub req_samples: usize,
    pub connect_samples: usize,
    /// Concurrent clients of the connections/s measure, and connections each.
    pub rate_clients: usize,
    pub rate_per_client: usize,
    /// Connections held open for the RSS figure.
    pub open_connections: usize,
    /// The HTTP/1.1 measures on the L7, L4 and unmeshed paths.
    pub http: HttpPlan,
}

/// Meshed and unmeshed values of one figure.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub meshed: Summary,
    pub unmeshed: Summary,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bulk {
    /// Gbit/s received by the server.
    pub gbps: Pair,
    /// meshed / unmeshed, run by run.
    pub ratio: Summary,
    /// CPU seconds of both ztunnels (utime + stime) per GB (10^9 bytes) received.
    pub ztunnel_cpu_seconds_per_gb: Summary,
    /// Both ztunnels' CPU time over the run's wall time (2.0 = two cores busy).
    pub ztunnel_cores: Summary,
    /// Busy share of the whole machine during the meshed / unmeshed runs (1.0 = every CPU).
    pub machine_busy: Pair,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    /// Microseconds.
    pub p50_us: Pair,
    pub p99_us: Pair,
    pub p999_us: Pair,
    pub samples_per_run: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReqResp {
    pub latency: Latency,
    /// meshed p50 − unmeshed p50, run by run, µs.
    pub added_p50_us: Summary,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connect {
    pub latency: Latency,
    /// meshed p50 / unmeshed p50, run by run.
    pub ratio_p50: Summary,
    /// New connection + 1-byte echo, completed per second by `rateClients` concurrent clients.
    pub per_second: Pair,
    pub rate_clients: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rss {
    /// VmRSS in MB (10^6 bytes) of ztunnel A (outbound side) and B (inbound side).
    pub idle_mb: ZtPair,
    /// With `openConnections` meshed connections open end to end.
    pub open_mb: ZtPair,
    pub open_connections: usize,
    /// Idle again after all the data-plane runs.
    pub after_load_mb: ZtPair,
}

#[derive(Debug, Clone, Serialize)]
pub struct ZtPair {
    pub a: Summary,
    pub b: Summary,
}

impl ZtPair {
    /// The larger of the two ztunnels, run by run.
    pub fn max(&self) -> Summary {
        paired(&self.a.runs, &self.b.runs, f64::max)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneReport {
    pub plan: DataplanePlan,
    pub one_stream: Bulk,
    pub four_streams: Bulk,
    /// four-stream / one-stream meshed throughput, run by run.
    pub four_over_one_meshed: Summary,
    pub req_resp_1k: ReqResp,
    pub connect: Connect,
    pub rss: Rss,
    /// HTTP/1.1 keep-alive with a 1 KB body: L7 (waypoint), L4 (ztunnel only), unmeshed.
    pub http1k: HttpReport,
}

/// The lab's two ztunnel processes.
#[derive(Debug, Clone, Copy)]
pub struct Ztunnels {
    pub a: i32,
    pub b: i32,
}

impl Ztunnels {
    fn cpu(&self) -> Result<f64> {
        Ok(sys::cpu_seconds(self.a)? + sys::cpu_seconds(self.b)?)
    }

    fn rss_mb(&self) -> Result<(f64, f64)> {
        Ok((sys::rss_bytes(self.a)? / 1e6, sys::rss_bytes(self.b)? / 1e6))
    }
}

pub fn run(
    lab: &Lab,
    zt: Ztunnels,
    waypoint: i32,
    plan: &DataplanePlan,
    progress: &Progress,
) -> Result<DataplaneReport> {
    let ip = |r: &Route| lab.pod_ip(r.server);
    let routes = [MESHED, UNMESHED];
    let (idle_a, idle_b) = zt.rss_mb()?;
    let waypoint_idle = sys::rss_bytes(waypoint)? / 1e6;
    progress.say(format!(
        "idle RSS: ztunnel A {idle_a:.1} MB, B {idle_b:.1} MB, waypoint {waypoint_idle:.1} MB"
    ));
    let watched = Watched {
        waypoint,
        ztunnel_a: zt.a,
        ztunnel_b: zt.b,
    };
    let mut http = l7::HttpRuns::new(&plan.http, waypoint_idle);

    // iperf3 servers in both server pods (recorded in the lab, so `down` stops them too).
    let mut servers: Vec<Spawned> = Vec::new();
    for r in &routes {
        let argv: Vec<String> = ["iperf3", "-4", "-s", "-p", &IPERF_PORT.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        servers.push(lab.spawn(&format!("iperf3-{}", r.server), r.server, &argv)?);
        sys::wait_listening(
            &paths::netns_name(lab.prefix(), r.server),
            IPERF_PORT,
            Duration::from_secs(5),
        )?;
    }

    let mut bulk = [BulkRuns::default(), BulkRuns::default()];
    let mut req = [LatRuns::default(), LatRuns::default()];
    let mut conn = [LatRuns::default(), LatRuns::default()];
    let mut rate = [Vec::new(), Vec::new()];
    let (mut open_a, mut open_b) = (Vec::new(), Vec::new());
    for run in 0..plan.runs {
        // Alternate which path goes first, so neither always runs on a warmer machine.
        let order: [usize; 2] = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for (s, streams) in [1u32, 4].into_iter().enumerate() {
            for &i in &order {
                sys::check_interrupted()?;
                let r = &routes[i];
                let cpu0 = zt.cpu()?;
                let m0 = sys::machine_cpu()?;
                let t0 = Instant::now();
                let res = iperf(lab, r, ip(r), streams, plan.bulk_seconds)?;
                let wall = t0.elapsed().as_secs_f64();
                let busy = sys::busy_fraction(m0, sys::machine_cpu()?);
                let cpu = zt.cpu()? - cpu0;
                progress.say(format!(
                    "run {}/{}: bulk {streams} stream(s) {}: {:.2} Gbit/s, machine {:.0}% busy",
                    run + 1,
                    plan.runs,
                    r.name,
                    res.gbps,
                    busy * 100.0
                ));
                let b = &mut bulk[s];
                if i == 0 {
                    b.meshed.push(res.gbps);
                    b.cpu_per_gb.push(cpu / (res.bytes / 1e9));
                    b.cores.push(cpu / wall);
                    b.busy_meshed.push(busy);
                } else {
                    b.unmeshed.push(res.gbps);
                    b.busy_unmeshed.push(busy);
                }
            }
        }
        for &i in &order {
            sys::check_interrupted()?;
            let r = &routes[i];
            let addr = SocketAddr::from((ip(r), SERVER_PORT));
            let samples = req_resp(lab, r.client, addr, plan.req_warmup, plan.req_samples)?;
            let p = Percentiles::of(&samples);
            progress.say(format!(
                "run {}/{}: 1 KB req/resp {}: p50 {:.1} µs, p99 {:.1} µs",
                run + 1,
                plan.runs,
                r.name,
                p.p50,
                p.p99
            ));
            req[i].push(p);
        }
        for &i in &order {
            sys::check_interrupted()?;
            let r = &routes[i];
            let addr = SocketAddr::from((ip(r), SERVER_PORT));
            let samples = connect_series(lab, r.client, addr, plan.connect_samples)?;
            let p = Percentiles::of(&samples);
            let cps = connect_rate(lab, r.client, addr, plan.rate_clients, plan.rate_per_client)?;
            progress.say(format!(
                "run {}/{}: connect + 1 B echo {}: p50 {:.0} µs, p99 {:.0} µs, {:.0}/s",
                run + 1,
                plan.runs,
                r.name,
                p.p50,
                p.p99,
                cps
            ));
            conn[i].push(p);
            rate[i].push(cps);
        }
        l7::run_once(
            lab, &plan.http, watched, &mut http, run, plan.runs, progress,
        )?;
        sys::check_interrupted()?;
        let addr = SocketAddr::from((ip(&MESHED), SERVER_PORT));
        let open = open_connections(lab, MESHED.client, addr, plan.open_connections)?;
        // Let both ztunnels finish the last streams' setup before reading.
        std::thread::sleep(Duration::from_millis(300));
        let (a, b) = zt.rss_mb()?;
        progress.say(format!(
            "run {}/{}: {} open meshed connections: ztunnel RSS A {a:.1} MB, B {b:.1} MB",
            run + 1,
            plan.runs,
            open.len()
        ));
        open_a.push(a);
        open_b.push(b);
        drop(open);
    }
    drop(servers);
    std::thread::sleep(Duration::from_millis(500));
    let (after_a, after_b) = zt.rss_mb()?;
    let waypoint_after = sys::rss_bytes(waypoint)? / 1e6;

    let [one, four] = bulk;
    let four_over_one = paired(&four.meshed, &one.meshed, |f, o| f / o);
    let [req_m, req_u] = req;
    let [conn_m, conn_u] = conn;
    let [rate_m, rate_u] = rate;
    Ok(DataplaneReport {
        plan: plan.clone(),
        one_stream: one.report(),
        four_streams: four.report(),
        four_over_one_meshed: four_over_one,
        req_resp_1k: ReqResp {
            added_p50_us: paired(&req_m.p50(), &req_u.p50(), |m, u| m - u),
            latency: latency(&req_m, &req_u, plan.req_samples),
        },
        connect: Connect {
            ratio_p50: paired(&conn_m.p50(), &conn_u.p50(), |m, u| m / u),
            latency: latency(&conn_m, &conn_u, plan.connect_samples),
            per_second: Pair {
                meshed: Summary::of(&rate_m),
                unmeshed: Summary::of(&rate_u),
            },
            rate_clients: plan.rate_clients,
        },
        rss: Rss {
            idle_mb: ZtPair {
                a: Summary::of(&[idle_a]),
                b: Summary::of(&[idle_b]),
            },
            open_mb: ZtPair {
                a: Summary::of(&open_a),
                b: Summary::of(&open_b),
            },
            open_connections: plan.open_connections,
            after_load_mb: ZtPair {
                a: Summary::of(&[after_a]),
                b: Summary::of(&[after_b]),
            },
        },
        http1k: l7::report(&plan.http, &http, waypoint_after),
    })
}

#[derive(Default)]
struct BulkRuns {
    meshed: Vec<f64>,
    unmeshed: Vec<f64>,
    cpu_per_gb: Vec<f64>,
    cores: Vec<f64>,
    busy_meshed: Vec<f64>,
    busy_unmeshed: Vec<f64>,
}

impl BulkRuns {
    fn report(&self) -> Bulk {
        Bulk {
            ratio: paired(&self.meshed, &self.unmeshed, |m, u| m / u),
            gbps: Pair {
                meshed: Summary::of(&self.meshed),
                unmeshed: Summary::of(&self.unmeshed),
            },
            ztunnel_cpu_seconds_per_gb: Summary::of(&self.cpu_per_gb),
            ztunnel_cores: Summary::of(&self.cores),
            machine_busy: Pair {
                meshed: Summary::of(&self.busy_meshed),
                unmeshed: Summary::of(&self.busy_unmeshed),
            },
        }
    }
}

#[derive(Default)]
struct LatRuns(Vec<Percentiles>);

impl LatRuns {
    fn push(&mut self, p: Percentiles) {
        self.0.push(p);
    }
    fn p50(&self) -> Vec<f64> {
        self.0.iter().map(|p| p.p50).collect()
    }
    fn p99(&self) -> Vec<f64> {
        self.0.iter().map(|p| p.p99).collect()
    }
    fn p999(&self) -> Vec<f64> {
        self.0.iter().map(|p| p.p999).collect()
    }
}

fn latency(m: &LatRuns, u: &LatRuns, samples: usize) -> Latency {
    let pair = |f: fn(&LatRuns) -> Vec<f64>| Pair {
        meshed: Summary::of(&f(m)),
        unmeshed: Summary::of(&f(u)),
    };
    Latency {
        p50_us: pair(LatRuns::p50),
        p99_us: pair(LatRuns::p99),
        p999_us: pair(LatRuns::p999),
        samples_per_run: samples,
    }
}

struct IperfResult {
    gbps: f64,
    bytes: f64,
}

/// `iperf3 -c` from the route's client pod to its server pod.
fn iperf(lab: &Lab, r: &Route, ip: Ipv4Addr, streams: u32, secs: u32) -> Result<IperfResult> {
    let argv: Vec<String> = [
        "iperf3",
        "-4",
        "-c",
        &ip.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &secs.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let netns = paths::netns_name(lab.prefix(), r.client);
    let out = sys::run_in_netns(&netns, &argv, Duration::from_secs(u64::from(secs) + 30))?;
    let json: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 {} printed no JSON: {}",
            r.name,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3 {} ({} → {ip}): {e}", r.name, r.client);
    }
    let sum = &json["end"]["sum_received"];
    let gbps = sum["bits_per_second"]
        .as_f64()
        .context("iperf3: no end.sum_received.bits_per_second")?
        / 1e9;
    let bytes = sum["bytes"].as_f64().context("iperf3: no bytes")?;
    Ok(IperfResult { gbps, bytes })
}

fn open(addr: SocketAddr) -> Result<TcpStream> {
    let s =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Reads the server's greeting line.
fn read_greeting(s: &mut TcpStream) -> Result<()> {
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 {
            bail!("the server closed before its greeting");
        }
        if b[0] == b'\n' {
            return Ok(());
        }
    }
}

/// 1 KB out, 1 KB back, on one warm connection: each round trip in µs.
fn req_resp(
    lab: &Lab,
    from: &str,
    addr: SocketAddr,
    warmup: usize,
    count: usize,
) -> Result<Vec<f64>> {
    lab.run_in(from, move || -> Result<Vec<f64>> {
        let mut s = open(addr)?;
        read_greeting(&mut s)?;
        let out = [0x5au8; 1024];
        let mut back = [0u8; 1024];
        let mut samples = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let t = Instant::now();
            s.write_all(&out)?;
            s.read_exact(&mut back)?;
            if i >= warmup {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })?
    .with_context(|| format!("1 KB req/resp from {from} to {addr}"))
}

/// A new connection, 1 byte sent, the greeting and that byte back; µs from connect() on.
fn connect_once(addr: SocketAddr) -> Result<f64> {
    let t = Instant::now();
    let mut s = open(addr)?;
    s.write_all(b"x")?;
    let mut buf = [0u8; 256];
    let mut after_newline: Option<usize> = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("closed before the echo");
        }
        for &b in &buf[..n] {
            match after_newline.as_mut() {
                Some(k) => *k += 1,
                None if b == b'\n' => after_newline = Some(0),
                None => {}
            }
        }
        if after_newline.is_some_and(|k| k >= 1) {
            return Ok(t.elapsed().as_secs_f64() * 1e6);
        }
    }
}

fn connect_series(lab: &Lab, from: &str, addr: SocketAddr, count: usize) -> Result<Vec<f64>> {
    lab.run_in(from, move || -> Result<Vec<f64>> {
        // One untimed connection first (the HBONE pool may need its first connection).
        connect_once(addr)?;
        (0..count).map(|_| connect_once(addr)).collect()
    })?
    .with_context(|| format!("connection setup from {from} to {addr}"))
}

/// Connections per second completed by `clients` concurrent loops of [`connect_once`].
fn connect_rate(
    lab: &Lab,
    from: &str,
    addr: SocketAddr,
    clients: usize,
    each: usize,
) -> Result<f64> {
    lab.run_in(from, move || -> Result<f64> {
        let t = Instant::now();
        // Threads started here inherit this thread's network namespace.
        std::thread::scope(|s| -> Result<()> {
            let loops: Vec<_> = (0..clients)
                .map(|_| s.spawn(move || (0..each).try_for_each(|_| connect_once(addr).map(drop))))
                .collect();
            for l in loops {
                l.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
            }
            Ok(())
        })?;
        Ok((clients * each) as f64 / t.elapsed().as_secs_f64())
    })?
    .with_context(|| format!("connections/s from {from} to {addr}"))
}

/// Opens `count` connections and waits for each one's greeting (so each is established end
/// to end); they stay open until the returned streams are dropped.
fn open_connections(
    lab: &Lab,
    from: &str,
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<TcpStream>> {
    lab.run_in(from, move || -> Result<Vec<TcpStream>> {
        (0..count)
            .map(|_| {
                let mut s = open(addr)?;
                read_greeting(&mut s)?;
                Ok(s)
            })
            .collect()
    })?
    .with_context(|| format!("{count} open connections from {from} to {addr}"))
}
