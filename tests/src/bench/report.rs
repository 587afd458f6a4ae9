//! The bench's result: the figures, the targets beside them, the table and the JSON.

use std::fmt::Write as _;

use anyhow::Result;
use serde::Serialize;

use super::control::{ControlReport, Lat, Level};
use super::dataplane::{DataplaneReport, Pair, ZtPair};
use super::l7::{HttpReport, Trio};
use super::stats::Summary;
use super::sys;
use crate::paths;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
}

/// One target of the issue, judged on the median over runs.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub id: String,
    pub what: String,
    /// The bound, e.g. `≥ 25%`.
    pub target: String,
    /// The measured value, in the bound's unit.
    pub value: f64,
    pub figure: String,
    /// `None` when it cannot be judged from this run (e.g. a single pod level).
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub command: String,
    /// Whether the binaries were a `release` or a `debug` build.
    pub build: String,
    pub binaries: String,
    pub machine: Machine,
    pub started_unix: u64,
    pub seconds: f64,
    /// Absent when skipped (`--only control`).
    pub dataplane: Option<DataplaneReport>,
    /// Absent when skipped (`--only dataplane`).
    pub controlplane: Option<ControlReport>,
    pub targets: Vec<Target>,
}

impl Report {
    pub fn new(
        dataplane: Option<DataplaneReport>,
        controlplane: Option<ControlReport>,
        seconds: f64,
    ) -> Result<Report> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let machine = Machine {
            cpus: sys::cpu_count(),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
                .unwrap_or_default(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut targets = Vec::new();
        if let Some(dp) = &dataplane {
            targets.extend(dataplane_targets(dp));
        }
        if let Some(cp) = &controlplane {
            targets.extend(control_targets(cp));
        }
        Ok(Report {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .into(),
            binaries: paths::exe_dir()?.display().to_string(),
            machine,
            started_unix: now.saturating_sub(seconds as u64),
            seconds,
            dataplane,
            controlplane,
            targets,
        })
    }
}

/// A number with about three significant digits.
pub fn num(v: f64) -> String {
    if v.is_nan() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `median [min–max]`, or just the value for a single run.
pub fn summary(s: &Summary) -> String {
    if s.runs.len() <= 1 {
        num(s.median)
    } else {
        format!("{} [{}–{}]", num(s.median), num(s.min), num(s.max))
    }
}

fn level_at(cp: &ControlReport, first: bool) -> Option<&Level> {
    if first {
        cp.levels.first()
    } else {
        cp.levels.last()
    }
}

fn judge(id: &str, what: &str, target: &str, value: f64, figure: String, ok: bool) -> Target {
    Target {
        id: id.into(),
        what: what.into(),
        target: target.into(),
        value,
        figure,
        met: if value.is_nan() { None } else { Some(ok) },
    }
}

pub fn dataplane_targets(dp: &DataplaneReport) -> Vec<Target> {
    let mut t = Vec::new();
    let r = dp.one_stream.ratio.median;
    t.push(judge(
        "P1",
        "one-stream HBONE throughput vs unmeshed",
        "≥ 25%",
        r * 100.0,
        format!(
            "{}% ({} vs {} Gbit/s)",
            num(r * 100.0),
            num(dp.one_stream.gbps.meshed.median),
            num(dp.one_stream.gbps.unmeshed.median)
        ),
        r >= 0.25,
    ));
    let r = dp.four_over_one_meshed.median;
    t.push(judge(
        "P2",
        "four streams vs one stream, meshed",
        "≥ 1.6×",
        r,
        format!(
            "{}× ({} vs {} Gbit/s)",
            num(r),
            num(dp.four_streams.gbps.meshed.median),
            num(dp.one_stream.gbps.meshed.median)
        ),
        r >= 1.6,
    ));
    let a = dp.req_resp_1k.added_p50_us.median;
    t.push(judge(
        "P3",
        "1 KB req/resp added latency at p50",
        "≤ 45 µs",
        a,
        format!(
            "{} µs ({} vs {} µs)",
            num(a),
            num(dp.req_resp_1k.latency.p50_us.meshed.median),
            num(dp.req_resp_1k.latency.p50_us.unmeshed.median)
        ),
        a <= 45.0,
    ));
    let r = dp.connect.ratio_p50.median;
    t.push(judge(
        "P4",
        "connection setup p50 vs unmeshed",
        "≤ 2.2×",
        r,
        format!(
            "{}× ({} vs {} µs)",
            num(r),
            num(dp.connect.latency.p50_us.meshed.median),
            num(dp.connect.latency.p50_us.unmeshed.median)
        ),
        r <= 2.2,
    ));
    let idle = dp.rss.idle_mb.max().median;
    t.push(judge(
        "P5",
        "ztunnel RSS idle (larger of A, B)",
        "≤ 10 MB",
        idle,
        format!("{} MB", num(idle)),
        idle <= 10.0,
    ));
    let open = dp.rss.open_mb.max().median;
    t.push(judge(
        "P5",
        &format!(
            "ztunnel RSS with {} open connections (larger of A, B)",
            dp.rss.open_connections
        ),
        "≤ 40 MB",
        open,
        format!("{} MB", num(open)),
        open <= 40.0,
    ));
    t.extend(http_targets(&dp.http1k));
    t
}

pub fn http_targets(h: &HttpReport) -> Vec<Target> {
    let mut t = Vec::new();
    let a = h.added_p50_l7_over_l4_us.median;
    let (l7, l4, clients) = h
        .one_client()
        .map(|l| (l.p50_us.l7.median, l.p50_us.l4.median, l.clients))
        .unwrap_or((f64::NAN, f64::NAN, 1));
    t.push(judge(
        "P8",
        &format!("HTTP/1.1 1 KB added p50, L7 over L4 mesh path, {clients} client(s)"),
        "≤ 150 µs",
        a,
        format!("{} µs ({} vs {} µs)", num(a), num(l7), num(l4)),
        a <= 150.0,
    ));
    let idle = h.waypoint.rss_idle_mb.median;
    t.push(judge(
        "P9",
        "waypoint RSS idle",
        "≤ 15 MB",
        idle,
        format!("{} MB", num(idle)),
        idle <= 15.0,
    ));
    t
}

pub fn control_targets(cp: &ControlReport) -> Vec<Target> {
    let mut t = Vec::new();
    if let (Some(lo), Some(hi)) = (level_at(cp, true), level_at(cp, false)) {
        let p50 = hi.plugin_add_ms.p50.median;
        let p99 = hi.plugin_add_ms.p99.median;
        t.push(judge(
            "P6",
            &format!("ambient-cni ADD p50 at {} pods", hi.pods),
            "≤ 3 ms",
            p50,
            format!("{} ms", num(p50)),
            p50 <= 3.0,
        ));
        t.push(judge(
            "P6",
            &format!("ambient-cni ADD p99 at {} pods", hi.pods),
            "≤ 10 ms",
            p99,
            format!("{} ms", num(p99)),
            p99 <= 10.0,
        ));
        let ratio = if hi.pods > lo.pods {
            p50 / lo.plugin_add_ms.p50.median
        } else {
            f64::NAN
        };
        t.push(judge(
            "P6",
            &format!("ambient-cni ADD p50 at {} vs {} pods", hi.pods, lo.pods),
            "≤ 1.5×",
            ratio,
            if ratio.is_nan() {
                "n/a (one pod level)".into()
            } else {
                format!(
                    "{}× ({} vs {} ms)",
                    num(ratio),
                    num(p50),
                    num(lo.plugin_add_ms.p50.median)
                )
            },
            ratio <= 1.5,
        ));
    }
    let cs = &cp.cold_start;
    for (what, s) in [
        ("kernel state intact", &cs.restart_s),
        ("kernel state flushed", &cs.flushed_s),
    ] {
        t.push(judge(
            "P7",
            &format!("agent cold start with {} pods, {what}", cs.pods),
            "≤ 0.5 s",
            s.median,
            format!(
                "{} ms{}",
                num(s.median * 1e3),
                if cs.kernel_matched {
                    ""
                } else {
                    " (kernel did NOT match)"
                }
            ),
            s.median <= 0.5 && cs.kernel_matched,
        ));
    }
    let ip = &cp.ztunnel_ip_change;
    t.push(judge(
        "P7",
        "ztunnel IP change to new connections",
        "≤ 0.2 s",
        ip.total_s.median,
        format!("{} ms", num(ip.total_s.median * 1e3)),
        ip.total_s.median <= 0.2,
    ));
    t
}

/// Rows of cells, printed with aligned columns.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new() -> Self {
        Table { rows: Vec::new() }
    }

    fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    fn render(&self, out: &mut String) {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in &self.rows {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if c + 1 < r.len() {
                    line.extend(std::iter::repeat_n(' ', width[c] - cell.chars().count()));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

fn pair_row(t: &mut Table, what: &str, p: &Pair, scale: f64) {
    t.row([
        what.to_string(),
        summary(&p.meshed.map(|v| v * scale)),
        summary(&p.unmeshed.map(|v| v * scale)),
    ]);
}

fn trio_row(t: &mut Table, what: &str, p: &Trio) {
    t.row([
        what.to_string(),
        summary(&p.l7),
        summary(&p.l4),
        summary(&p.unmeshed),
    ]);
}

fn zt_row(t: &mut Table, what: &str, p: &ZtPair) {
    t.row([
        what.to_string(),
        format!("A {} / B {}", summary(&p.a), summary(&p.b)),
        String::new(),
    ]);
}

fn lat_row(t: &mut Table, what: String, l: &Lat) {
    t.row([what, summary(&l.p50), summary(&l.p99)]);
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ambient-lab bench: {} build ({}), {} CPUs ({}), kernel {}, {} run(s), {:.0} s",
            self.build,
            self.binaries,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.kernel,
            self.runs(),
            self.seconds
        );
        let _ = writeln!(
            out,
            "every figure: median over runs [min–max]; meshed and unmeshed measured in the same run\n"
        );

        let mut t = Table::new();
        if let Some(dp) = &self.dataplane {
            dataplane_rows(&mut t, dp);
        }
        if let Some(cp) = &self.controlplane {
            control_rows(&mut t, cp);
        }
        t.row(["TARGETS", "", ""]);
        for g in &self.targets {
            t.row([
                format!("{} {} {}", g.id, g.what, g.target),
                g.figure.clone(),
                match g.met {
                    Some(true) => "met",
                    Some(false) => "NOT MET",
                    None => "n/a",
                }
                .to_string(),
            ]);
        }
        t.render(&mut out);
        out
    }

    fn runs(&self) -> usize {
        match (&self.dataplane, &self.controlplane) {
            (Some(dp), _) => dp.plan.runs,
            (None, Some(cp)) => cp.plan.runs,
            _ => 0,
        }
    }
}

fn dataplane_rows(t: &mut Table, dp: &DataplaneReport) {
    {
        t.row([
            "DATA PLANE, pod on node A → pod on node B",
            "meshed: a-client → b-app (HBONE)",
            "unmeshed: a-plain → b-plain",
        ]);
        pair_row(
            t,
            &format!("bulk TCP, 1 stream, Gbit/s ({} s)", dp.plan.bulk_seconds),
            &dp.one_stream.gbps,
            1.0,
        );
        pair_row(t, "bulk TCP, 4 streams, Gbit/s", &dp.four_streams.gbps, 1.0);
        pair_row(
            t,
            "  machine CPU busy, 1 stream, %",
            &dp.one_stream.machine_busy,
            100.0,
        );
        pair_row(
            t,
            "  machine CPU busy, 4 streams, %",
            &dp.four_streams.machine_busy,
            100.0,
        );
        let rr = &dp.req_resp_1k.latency;
        let rr_n = format!("{} per run", rr.samples_per_run);
        pair_row(
            t,
            &format!("1 KB req/resp p50, µs ({rr_n})"),
            &rr.p50_us,
            1.0,
        );
        pair_row(t, "1 KB req/resp p99, µs", &rr.p99_us, 1.0);
        pair_row(t, "1 KB req/resp p99.9, µs", &rr.p999_us, 1.0);
        let c = &dp.connect.latency;
        pair_row(
            t,
            &format!(
                "new connection + 1 B echo p50, µs ({} per run)",
                c.samples_per_run
            ),
            &c.p50_us,
            1.0,
        );
        pair_row(t, "new connection + 1 B echo p99, µs", &c.p99_us, 1.0);
        pair_row(
            t,
            &format!(
                "new connections/s ({} concurrent clients)",
                dp.connect.rate_clients
            ),
            &dp.connect.per_second,
            1.0,
        );
        t.row([
            "ztunnel CPU s per GB moved, 1 / 4 streams".to_string(),
            format!(
                "{} / {}",
                summary(&dp.one_stream.ztunnel_cpu_seconds_per_gb),
                summary(&dp.four_streams.ztunnel_cpu_seconds_per_gb)
            ),
            String::new(),
        ]);
        t.row([
            "ztunnel CPU busy (cores, A+B), 1 / 4 streams".to_string(),
            format!(
                "{} / {}",
                summary(&dp.one_stream.ztunnel_cores),
                summary(&dp.four_streams.ztunnel_cores)
            ),
            String::new(),
        ]);
        zt_row(t, "ztunnel RSS idle (fresh), MB", &dp.rss.idle_mb);
        zt_row(
            t,
            &format!(
                "ztunnel RSS, {} open connections, MB",
                dp.rss.open_connections
            ),
            &dp.rss.open_mb,
        );
        zt_row(
            t,
            "ztunnel RSS idle after the runs, MB",
            &dp.rss.after_load_mb,
        );
        t.row([""; 3]);
    }
    http_rows(t, &dp.http1k);
}

fn http_rows(t: &mut Table, h: &HttpReport) {
    t.row([
        "HTTP/1.1 keep-alive GET, 1 KB body, node A → node B",
        "L7: a-client → reviews-v2 VIP",
        "L4: a-client → b-app",
        "unmeshed: a-plain → b-plain",
    ]);
    t.row(["  L7 via b-waypoint (node B) to b-reviews-v2:8080; L4: HBONE, :8080"]);
    for l in &h.levels {
        let who = if l.clients == 1 {
            "1 client".to_string()
        } else {
            format!("{} clients", l.clients)
        };
        trio_row(
            t,
            &format!(
                "{who} p50, µs ({} requests each per run)",
                l.requests_per_client
            ),
            &l.p50_us,
        );
        trio_row(t, &format!("{who} p99, µs"), &l.p99_us);
        trio_row(t, &format!("{who} requests/s"), &l.requests_per_second);
    }
    if let Some(one) = h.one_client() {
        t.row([
            format!(
                "  added p50, {} client(s), µs: L7 − L4, L4 − unmeshed",
                one.clients
            ),
            summary(&h.added_p50_l7_over_l4_us),
            summary(&h.added_p50_l4_over_unmeshed_us),
            String::new(),
        ]);
    }
    for l in &h.levels {
        t.row([
            format!(
                "ztunnel CPU (A+B) ms per 1000 requests, {} client(s)",
                l.clients
            ),
            summary(&l.ztunnel_cpu_ms_per_1000.l7),
            summary(&l.ztunnel_cpu_ms_per_1000.l4),
            String::new(),
        ]);
    }
    for l in &h.levels {
        t.row([
            format!("waypoint CPU ms per 1000 requests, {} client(s)", l.clients),
            summary(&l.waypoint_cpu_ms_per_1000),
            String::new(),
            String::new(),
        ]);
    }
    let w = &h.waypoint;
    t.row([
        format!(
            "waypoint RSS, MB: idle (fresh) / {} clients (peak) / after",
            w.load_clients
        ),
        format!(
            "{} / {} / {}",
            summary(&w.rss_idle_mb),
            summary(&w.rss_load_mb),
            summary(&w.rss_after_mb)
        ),
        String::new(),
        String::new(),
    ]);
    t.row([""; 3]);
}

fn control_rows(t: &mut Table, cp: &ControlReport) {
    {
        t.row(["CONTROL PLANE, node A, ms", "p50", "p99"]);
        for l in &cp.levels {
            lat_row(
                t,
                format!("CNI ADD, whole chain, {} pods enrolled", l.pods),
                &l.chain_add_ms,
            );
        }
        for l in &cp.levels {
            lat_row(
                t,
                format!("CNI DEL, whole chain, {} pods enrolled", l.pods),
                &l.chain_del_ms,
            );
        }
        for l in &cp.levels {
            lat_row(
                t,
                format!("  ptp + host-local alone, ADD, {} pods", l.pods),
                &l.primary_add_ms,
            );
        }
        for l in &cp.levels {
            lat_row(
                t,
                format!("ambient-cni share of ADD (P6), {} pods", l.pods),
                &l.plugin_add_ms,
            );
        }
        for l in &cp.levels {
            lat_row(
                t,
                format!("ambient-cni share of DEL, {} pods", l.pods),
                &l.plugin_del_ms,
            );
        }
        for l in cp.levels.iter().filter(|l| l.fill.added > 0) {
            t.row([
                format!("  enrolling {} pods through the chain", l.fill.added),
                format!(
                    "{} s ({} ms/pod, 2 at a time)",
                    num(l.fill.seconds),
                    num(l.fill.ms_per_pod)
                ),
                String::new(),
            ]);
        }
        let cs = &cp.cold_start;
        t.row([
            format!("agent cold start, {} pods, kernel intact, ms", cs.pods),
            summary(&cs.restart_s.map(|v| v * 1e3)),
            String::new(),
        ]);
        t.row([
            format!("agent cold start, {} pods, kernel flushed, ms", cs.pods),
            summary(&cs.flushed_s.map(|v| v * 1e3)),
            String::new(),
        ]);
        let ip = &cp.ztunnel_ip_change;
        t.row([
            format!("ztunnel IP change → new connections, {} pods, ms", ip.pods),
            summary(&ip.total_s.map(|v| v * 1e3)),
            String::new(),
        ]);
        t.row([
            "  of which CNI ADD / ztunnel-init / ztunnel start, ms".to_string(),
            format!(
                "{} / {} / {}",
                summary(&ip.cni_add_s.map(|v| v * 1e3)),
                summary(&ip.ztunnel_init_s.map(|v| v * 1e3)),
                summary(&ip.ztunnel_ready_s.map(|v| v * 1e3))
            ),
            String::new(),
        ]);
        t.row([""; 3]);
    }
}
