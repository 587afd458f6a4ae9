//! The L7 figures of the data-plane bench: HTTP/1.1 keep-alive `GET /?bytes=1024` (a 1 KB
//! response body) from node A to node B on three paths side by side, at 1 and at 16
//! concurrent clients (each one keep-alive connection), plus the waypoint's RSS and CPU.
//!
//! The three paths end at pods on the same node (B) running the same server (`serve
//! --http-port 8080`), so they differ only in what is in between:
//! - **L7**: `a-client` → `10.96.0.22:80` (the ClusterIP of `demo/reviews-v2`): ztunnel A →
//!   HBONE → ztunnel B → `b-waypoint` → HBONE → ztunnel B → `b-reviews-v2:8080`. The reviews
//!   pods are behind the waypoint at workload level too, so no L4-only path to them exists;
//! - **L4**: `a-client` → `b-app:8080`: ztunnel A → HBONE → ztunnel B → `b-app` (no waypoint);
//! - **unmeshed**: `a-plain` → `b-plain:8080`, routed directly.
//!
//! The load client is hyper's HTTP/1.1 client on a current-thread tokio runtime on a thread
//! inside the client pod's netns (`Lab::run_in`): every client opens its connection and
//! warms up, then all start together; each sends a fixed number of requests, one at a time,
//! and records each one's latency (from sending the request to the end of its body).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use super::stats::{paired, Percentiles, Summary};
use super::sys;
use super::Progress;
use crate::harness::Lab;
use crate::service;
use crate::topology::HTTP_PORT;

/// The response body asked for, bytes.
pub const BODY_BYTES: usize = 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the waypoint's VmRSS is read during a measured phase.
const RSS_EVERY: Duration = Duration::from_millis(50);

/// Where an HTTP path's requests go.
#[derive(Debug, Clone, Copy)]
pub enum Dest {
    /// A pod's IP, this port.
    Pod(&'static str, u16),
    /// A ClusterIP and port.
    Vip(Ipv4Addr, u16),
}

/// One of the three HTTP paths.
#[derive(Debug, Clone, Copy)]
pub struct HttpPath {
    pub name: &'static str,
    /// What it crosses, for the JSON.
    pub describe: &'static str,
    pub client: &'static str,
    pub dest: Dest,
}

pub const L7: HttpPath = HttpPath {
    name: "L7",
    describe: "a-client -> 10.96.0.22:80 (demo/reviews-v2): ztunnel A -> HBONE -> ztunnel B -> \
               b-waypoint -> HBONE -> ztunnel B -> b-reviews-v2:8080 (node B)",
    client: "a-client",
    dest: Dest::Vip(service::REVIEWS_V2_IP, service::SERVICE_PORT),
};
pub const L4: HttpPath = HttpPath {
    name: "L4",
    describe: "a-client -> b-app:8080: ztunnel A -> HBONE -> ztunnel B -> b-app (node B), \
               no waypoint",
    client: "a-client",
    dest: Dest::Pod("b-app", HTTP_PORT),
};
pub const UNMESHED: HttpPath = HttpPath {
    name: "unmeshed",
    describe: "a-plain -> b-plain:8080 (node B), routed directly",
    client: "a-plain",
    dest: Dest::Pod("b-plain", HTTP_PORT),
};
/// In the order of the table's columns.
pub const PATHS: [HttpPath; 3] = [L7, L4, UNMESHED];

/// How much of the HTTP load to run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPlan {
    /// Untimed requests per client before the measured ones.
    pub warmup_per_client: usize,
    pub levels: Vec<HttpLevelPlan>,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpLevelPlan {
    pub clients: usize,
    pub requests_per_client: usize,
}

/// One figure on the three paths.
#[derive(Debug, Clone, Serialize)]
pub struct Trio {
    pub l7: Summary,
    pub l4: Summary,
    pub unmeshed: Summary,
}

/// One figure on the two mesh paths.
#[derive(Debug, Clone, Serialize)]
pub struct MeshPair {
    pub l7: Summary,
    pub l4: Summary,
}

/// The figures at one number of concurrent clients.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpLevel {
    pub clients: usize,
    pub requests_per_client: usize,
    /// Per request, µs.
    pub p50_us: Trio,
    pub p99_us: Trio,
    /// Measured requests of all clients over the wall time from their common start to the
    /// last one's end.
    pub requests_per_second: Trio,
    /// Both ztunnels' CPU (utime + stime) per 1000 requests, ms.
    pub ztunnel_cpu_ms_per_1000: MeshPair,
    /// The waypoint's CPU per 1000 requests of the L7 path, ms.
    pub waypoint_cpu_ms_per_1000: Summary,
    /// The waypoint's largest VmRSS seen during the L7 run (read every 50 ms), MB.
    pub waypoint_rss_peak_mb: Summary,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointFigures {
    /// VmRSS (MB, 10^6 bytes) just after the lab came up, before any measure.
    pub rss_idle_mb: Summary,
    /// The largest VmRSS during the L7 run with `loadClients` clients.
    pub rss_load_mb: Summary,
    /// Its CPU (utime + stime) per 1000 requests over that run, ms.
    pub cpu_ms_per_1000: Summary,
    pub load_clients: usize,
    /// Idle again after all the data-plane runs.
    pub rss_after_mb: Summary,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathNames {
    pub l7: String,
    pub l4: String,
    pub unmeshed: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpReport {
    pub request: String,
    pub body_bytes: usize,
    pub paths: PathNames,
    pub warmup_per_client: usize,
    pub levels: Vec<HttpLevel>,
    /// L7 p50 − L4 p50 at the smallest number of clients (1), run by run, µs.
    pub added_p50_l7_over_l4_us: Summary,
    /// L4 p50 − unmeshed p50 at the smallest number of clients, run by run, µs.
    pub added_p50_l4_over_unmeshed_us: Summary,
    pub waypoint: WaypointFigures,
}

impl HttpReport {
    /// The level with one client (the first level otherwise).
    pub fn one_client(&self) -> Option<&HttpLevel> {
        self.levels
            .iter()
            .find(|l| l.clients == 1)
            .or(self.levels.first())
    }
}

/// The processes watched during a measured phase.
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    pub waypoint: i32,
    pub ztunnel_a: i32,
    pub ztunnel_b: i32,
}

/// One load run's results.
#[derive(Debug, Clone)]
pub struct Load {
    pub latency: Percentiles,
    pub requests: usize,
    pub per_second: f64,
    /// CPU seconds over the measured phase: the waypoint, ztunnel A + B.
    pub waypoint_cpu_s: f64,
    pub ztunnel_cpu_s: f64,
    /// The waypoint's largest VmRSS in the measured phase, MB.
    pub waypoint_rss_peak_mb: f64,
}

/// The per-run results, collected over the runs.
#[derive(Default)]
pub struct HttpRuns {
    /// `[level][path]`, one entry per run.
    loads: Vec<[Vec<Load>; 3]>,
    idle_mb: f64,
}

impl HttpRuns {
    pub fn new(plan: &HttpPlan, waypoint_idle_mb: f64) -> Self {
        HttpRuns {
            loads: plan.levels.iter().map(|_| Default::default()).collect(),
            idle_mb: waypoint_idle_mb,
        }
    }
}

fn addr_of(lab: &Lab, dest: Dest) -> SocketAddr {
    match dest {
        Dest::Pod(pod, port) => SocketAddr::from((lab.pod_ip(pod), port)),
        Dest::Vip(ip, port) => SocketAddr::from((ip, port)),
    }
}

/// One round of every level on every path (the paths' order rotates with `run`).
pub fn run_once(
    lab: &Lab,
    plan: &HttpPlan,
    watched: Watched,
    runs: &mut HttpRuns,
    run: usize,
    of: usize,
    progress: &Progress,
) -> Result<()> {
    for (li, level) in plan.levels.iter().enumerate() {
        for k in 0..PATHS.len() {
            let pi = (run + k) % PATHS.len();
            sys::check_interrupted()?;
            let path = &PATHS[pi];
            let addr = addr_of(lab, path.dest);
            let load = http_load(
                lab,
                path.client,
                addr,
                level.clients,
                plan.warmup_per_client,
                level.requests_per_client,
                watched,
            )?;
            let waypoint = if pi == 0 {
                format!(
                    ", waypoint {:.0} ms CPU per 1000, RSS {:.1} MB",
                    load.waypoint_cpu_s * 1e6 / load.requests as f64,
                    load.waypoint_rss_peak_mb
                )
            } else {
                String::new()
            };
            progress.say(format!(
                "run {}/{of}: HTTP/1.1 1 KB, {} client(s), {} ({}): p50 {:.0} µs, p99 {:.0} µs, \
                 {:.0} req/s{waypoint}",
                run + 1,
                level.clients,
                path.name,
                addr,
                load.latency.p50,
                load.latency.p99,
                load.per_second,
            ));
            runs.loads[li][pi].push(load);
        }
    }
    Ok(())
}

/// The report over all runs; `rss_after_mb` is the waypoint idle after every run.
pub fn report(plan: &HttpPlan, runs: &HttpRuns, rss_after_mb: f64) -> HttpReport {
    let per_1000 = |cpu: f64, l: &Load| cpu * 1e6 / l.requests as f64;
    let levels: Vec<HttpLevel> = plan
        .levels
        .iter()
        .zip(&runs.loads)
        .map(|(lp, loads)| {
            let fig = |f: &dyn Fn(&Load) -> f64, pi: usize| {
                Summary::of(&loads[pi].iter().map(f).collect::<Vec<_>>())
            };
            let trio = |f: &dyn Fn(&Load) -> f64| Trio {
                l7: fig(f, 0),
                l4: fig(f, 1),
                unmeshed: fig(f, 2),
            };
            HttpLevel {
                clients: lp.clients,
                requests_per_client: lp.requests_per_client,
                p50_us: trio(&|l| l.latency.p50),
                p99_us: trio(&|l| l.latency.p99),
                requests_per_second: trio(&|l| l.per_second),
                ztunnel_cpu_ms_per_1000: MeshPair {
                    l7: fig(&|l| per_1000(l.ztunnel_cpu_s, l), 0),
                    l4: fig(&|l| per_1000(l.ztunnel_cpu_s, l), 1),
                },
                waypoint_cpu_ms_per_1000: fig(&|l| per_1000(l.waypoint_cpu_s, l), 0),
                waypoint_rss_peak_mb: fig(&|l| l.waypoint_rss_peak_mb, 0),
            }
        })
        .collect();
    let p50s = |li: usize, pi: usize| -> Vec<f64> {
        runs.loads[li][pi].iter().map(|l| l.latency.p50).collect()
    };
    let one = plan.levels.iter().position(|l| l.clients == 1).unwrap_or(0);
    let most = plan
        .levels
        .iter()
        .enumerate()
        .max_by_key(|(_, l)| l.clients)
        .map(|(i, _)| i)
        .unwrap_or(0);
    let nan = || Summary::of(&[]);
    HttpReport {
        request: format!("GET /?bytes={BODY_BYTES} (HTTP/1.1 keep-alive)"),
        body_bytes: BODY_BYTES,
        paths: PathNames {
            l7: L7.describe.into(),
            l4: L4.describe.into(),
            unmeshed: UNMESHED.describe.into(),
        },
        warmup_per_client: plan.warmup_per_client,
        added_p50_l7_over_l4_us: paired(&p50s(one, 0), &p50s(one, 1), |a, b| a - b),
        added_p50_l4_over_unmeshed_us: paired(&p50s(one, 1), &p50s(one, 2), |a, b| a - b),
        waypoint: WaypointFigures {
            rss_idle_mb: Summary::of(&[runs.idle_mb]),
            rss_load_mb: levels
                .get(most)
                .map(|l| l.waypoint_rss_peak_mb.clone())
                .unwrap_or_else(nan),
            cpu_ms_per_1000: levels
                .get(most)
                .map(|l| l.waypoint_cpu_ms_per_1000.clone())
                .unwrap_or_else(nan),
            load_clients: plan.levels.get(most).map(|l| l.clients).unwrap_or(0),
            rss_after_mb: Summary::of(&[rss_after_mb]),
        },
        levels,
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// One `GET /?bytes=1024` on a warm connection: µs from sending to the body's end.
async fn one_request(send: &mut Sender, host: &str) -> Result<f64> {
    let req = http::Request::get(format!("/?bytes={BODY_BYTES}"))
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .context("build request")?;
    send.ready().await.context("connection closed")?;
    let t = Instant::now();
    let resp = send.send_request(req).await.context("send request")?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut n = 0usize;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.context("read body")?.data_ref() {
            n += d.len();
        }
    }
    let us = t.elapsed().as_secs_f64() * 1e6;
    if status != http::StatusCode::OK || n != BODY_BYTES {
        bail!("answered {status} with {n} body bytes (wanted 200 with {BODY_BYTES})");
    }
    Ok(us)
}

async fn open(addr: SocketAddr) -> Result<(Sender, tokio::task::JoinHandle<()>)> {
    let s = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect {addr}: timed out"))?
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .context("HTTP/1.1 handshake")?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, driver))
}

/// One client: connect, warm up, wait for the others, then `count` timed requests.
async fn client(
    addr: SocketAddr,
    warmup: usize,
    count: usize,
    start: Arc<tokio::sync::Barrier>,
) -> Result<Vec<f64>> {
    let host = addr.to_string();
    let warm = async {
        let (mut send, driver) = open(addr).await?;
        for _ in 0..warmup {
            one_request(&mut send, &host).await?;
        }
        Ok::<_, anyhow::Error>((send, driver))
    }
    .await;
    // Every client reaches the barrier, failed or not, so none waits forever.
    start.wait().await;
    let (mut send, driver) = warm?;
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        samples.push(
            one_request(&mut send, &host)
                .await
                .with_context(|| format!("request {i}"))?,
        );
    }
    drop(send);
    driver.abort();
    Ok(samples)
}

/// Reads the waypoint's VmRSS every [`RSS_EVERY`] on its own thread until stopped; the
/// largest value, MB.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl RssSampler {
    fn start(pid: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0f64;
            loop {
                if let Ok(b) = sys::rss_bytes(pid) {
                    peak = peak.max(b / 1e6);
                }
                if flag.load(Ordering::SeqCst) {
                    return peak;
                }
                std::thread::park_timeout(RSS_EVERY);
            }
        });
        RssSampler { stop, thread }
    }

    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.thread().unpark();
        self.thread.join().unwrap_or(f64::NAN)
    }
}

/// `clients` concurrent keep-alive clients from inside `from`, each `warmup` untimed and
/// then `each` timed requests; the CPU of the watched processes is read at the common start
/// and at the end.
pub fn http_load(
    lab: &Lab,
    from: &str,
    addr: SocketAddr,
    clients: usize,
    warmup: usize,
    each: usize,
    watched: Watched,
) -> Result<Load> {
    let limit = Duration::from_secs(60) + Duration::from_millis(20) * (clients * each) as u32;
    lab.run_in(from, move || -> Result<Load> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?;
        rt.block_on(async move {
            tokio::time::timeout(limit, async move {
                let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
                let tasks: Vec<_> = (0..clients)
                    .map(|_| tokio::spawn(client(addr, warmup, each, start.clone())))
                    .collect();
                start.wait().await;
                let zt_cpu = || -> Result<f64> {
                    Ok(sys::cpu_seconds(watched.ztunnel_a)? + sys::cpu_seconds(watched.ztunnel_b)?)
                };
                let wp0 = sys::cpu_seconds(watched.waypoint)?;
                let zt0 = zt_cpu()?;
                let rss = RssSampler::start(watched.waypoint);
                let t0 = Instant::now();
                let mut samples = Vec::with_capacity(clients * each);
                let mut first_err = None;
                for (i, t) in tasks.into_iter().enumerate() {
                    match t.await {
                        Ok(Ok(s)) => samples.extend(s),
                        Ok(Err(e)) => {
                            first_err.get_or_insert(e.context(format!("client {i}")));
                        }
                        Err(e) => {
                            first_err.get_or_insert(anyhow!("client {i} panicked: {e}"));
                        }
                    }
                }
                let wall = t0.elapsed().as_secs_f64();
                let wp = sys::cpu_seconds(watched.waypoint)? - wp0;
                let zt = zt_cpu()? - zt0;
                let peak = rss.finish();
                if let Some(e) = first_err {
                    return Err(e);
                }
                let requests = samples.len();
                Ok(Load {
                    latency: Percentiles::of(&samples),
                    requests,
                    per_second: requests as f64 / wall,
                    waypoint_cpu_s: wp,
                    ztunnel_cpu_s: zt,
                    waypoint_rss_peak_mb: peak,
                })
            })
            .await
            .map_err(|_| anyhow!("no end within {limit:?}"))?
        })
    })?
    .with_context(|| format!("HTTP/1.1 load, {clients} client(s), from {from} to {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(p50: f64, requests: usize, wp_cpu: f64, rss: f64) -> Load {
        Load {
            latency: Percentiles {
                p50,
                p99: p50 * 2.0,
                p999: p50 * 3.0,
                samples: requests,
            },
            requests,
            per_second: 1e6 / p50,
            waypoint_cpu_s: wp_cpu,
            ztunnel_cpu_s: 2.0 * wp_cpu,
            waypoint_rss_peak_mb: rss,
        }
    }

    #[test]
    fn report_pairs_runs_and_picks_levels() {
        let plan = HttpPlan {
            warmup_per_client: 1,
            levels: vec![
                HttpLevelPlan {
                    clients: 1,
                    requests_per_client: 1000,
                },
                HttpLevelPlan {
                    clients: 16,
                    requests_per_client: 100,
                },
            ],
        };
        let mut runs = HttpRuns::new(&plan, 9.5);
        for (l7, l4, un) in [(400.0, 200.0, 50.0), (500.0, 260.0, 60.0)] {
            runs.loads[0][0].push(load(l7, 1000, 0.1, 11.0));
            runs.loads[0][1].push(load(l4, 1000, 0.0, 11.0));
            runs.loads[0][2].push(load(un, 1000, 0.0, 11.0));
            runs.loads[1][0].push(load(l7 * 8.0, 1600, 0.16, 12.0));
            runs.loads[1][1].push(load(l4 * 8.0, 1600, 0.0, 12.0));
            runs.loads[1][2].push(load(un * 8.0, 1600, 0.0, 12.0));
        }
        let r = report(&plan, &runs, 10.0);
        assert_eq!(r.added_p50_l7_over_l4_us.runs, vec![200.0, 240.0]);
        assert_eq!(r.added_p50_l4_over_unmeshed_us.runs, vec![150.0, 200.0]);
        assert_eq!(r.one_client().unwrap().clients, 1);
        assert_eq!(r.levels[1].p50_us.l4.median, (1600.0 + 2080.0) / 2.0);
        // 0.16 s over 1600 requests = 100 ms per 1000.
        assert!((r.waypoint.cpu_ms_per_1000.median - 100.0).abs() < 1e-9);
        assert!((r.levels[0].ztunnel_cpu_ms_per_1000.l7.median - 200.0).abs() < 1e-9);
        assert_eq!(r.waypoint.load_clients, 16);
        assert_eq!(r.waypoint.rss_load_mb.median, 12.0);
        assert_eq!(r.waypoint.rss_idle_mb.median, 9.5);
        assert_eq!(r.waypoint.rss_after_mb.median, 10.0);
    }
}
