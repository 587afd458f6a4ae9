//! `ambient-lab bench`: brings a lab up under its own prefix, measures the meshed path
//! against the unmeshed one and the control plane's costs, prints a table with the targets,
//! writes JSON, and tears the lab down (also on failure and on SIGINT/SIGTERM).
//!
//! Modules: [`dataplane`] (throughput, request/response, connection setup, ztunnel CPU and
//! RSS), [`l7`] (HTTP/1.1 through the waypoint vs ztunnel only vs unmeshed, the waypoint's
//! RSS and CPU), [`control`] (CNI ADD/DEL, agent cold start, ztunnel IP change), [`report`] (the
//! targets, the table, the JSON), [`stats`] (percentiles and medians over runs), [`sys`]
//! (what is read from /proc, signals, commands in a netns).

pub mod control;
pub mod dataplane;
pub mod l7;
pub mod report;
pub mod stats;
pub mod sys;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::{Lab, LabOptions};
use crate::paths;
use crate::state::LabState;
use control::ControlPlan;
use dataplane::{DataplanePlan, Ztunnels};
use l7::{HttpLevelPlan, HttpPlan};
pub use report::Report;

/// The default lab prefix of the bench.
pub const DEFAULT_PREFIX: &str = "bench";

/// The command line of `ambient-lab bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub prefix: String,
    pub quick: bool,
    pub runs: Option<usize>,
    /// Seconds per bulk-throughput run.
    pub duration: Option<u32>,
    /// Enrolled-pod levels of the CNI measures.
    pub pods: Option<Vec<usize>>,
    /// Measure only this part.
    pub only: Option<Part>,
    /// Leave the lab up afterwards (for profiling; `ambient-lab down --prefix <prefix>`).
    pub keep: bool,
}

/// The two halves of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Dataplane,
    Control,
}

impl BenchOptions {
    pub fn dataplane_plan(&self) -> DataplanePlan {
        let runs = self.runs.unwrap_or(if self.quick { 1 } else { 5 });
        if self.quick {
            DataplanePlan {
                runs,
                bulk_seconds: self.duration.unwrap_or(1),
                req_warmup: 50,
                req_samples: 500,
                connect_samples: 50,
                rate_clients: 2,
                rate_per_client: 25,
                open_connections: 100,
                http: HttpPlan {
                    warmup_per_client: 10,
                    levels: vec![
                        HttpLevelPlan {
                            clients: 1,
                            requests_per_client: 200,
                        },
                        HttpLevelPlan {
                            clients: 16,
                            requests_per_client: 50,
                        },
                    ],
                },
            }
        } else {
            DataplanePlan {
                runs,
                bulk_seconds: self.duration.unwrap_or(5),
                req_warmup: 1000,
                req_samples: 20_000,
                connect_samples: 1000,
                rate_clients: 4,
                rate_per_client: 500,
                open_connections: 1000,
                http: HttpPlan {
                    warmup_per_client: 100,
                    levels: vec![
                        HttpLevelPlan {
                            clients: 1,
                            requests_per_client: 10_000,
                        },
                        HttpLevelPlan {
                            clients: 16,
                            requests_per_client: 1000,
                        },
                    ],
                },
            }
        }
    }

    pub fn control_plan(&self) -> Result<ControlPlan> {
        let runs = self.runs.unwrap_or(if self.quick { 1 } else { 5 });
        let mut levels = self.pods.clone().unwrap_or_else(|| {
            if self.quick {
                vec![10]
            } else {
                vec![10, 100, 1000]
            }
        });
        levels.sort_unstable();
        levels.dedup();
        if levels.is_empty() {
            bail!("--pods needs at least one level");
        }
        if let Some(bad) = levels
            .iter()
            .find(|&&n| !(control::LAB_ENROLLED..=control::MAX_PODS).contains(&n))
        {
            bail!(
                "--pods {bad}: levels go from {} (the lab's own enrolled pods) to {}",
                control::LAB_ENROLLED,
                control::MAX_PODS
            );
        }
        let samples = if self.quick { 10 } else { 100 };
        Ok(ControlPlan {
            levels,
            runs,
            chain_samples: samples,
            plugin_samples: samples,
        })
    }
}

/// Progress lines on stderr, with the time since the bench started.
pub struct Progress {
    start: Instant,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            start: Instant::now(),
        }
    }

    pub fn say(&self, msg: impl AsRef<str>) {
        eprintln!(
            "bench [{:6.1}s] {}",
            self.start.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// Brings the lab up, measures, tears it down; the report, or the first error.
pub fn run(opts: &BenchOptions) -> Result<Report> {
    paths::validate_prefix(&opts.prefix)?;
    let dp_plan = opts.dataplane_plan();
    let cp_plan = opts.control_plan()?;
    if dp_plan.runs == 0 {
        bail!("--runs must be at least 1");
    }
    sys::catch_signals()?;
    sys::raise_nofile();
    let progress = Progress::new();
    let exe = std::env::current_exe().context("locate ambient-lab")?;
    progress.say(format!(
        "bringing up lab {} with the binaries in {}",
        opts.prefix,
        paths::exe_dir()?.display()
    ));
    let mut lab_opts = LabOptions::new(&exe);
    if opts.only != Some(Part::Control) {
        // The L7 figures go through the waypoint.
        lab_opts = lab_opts.waypoint();
    }
    let mut lab = Lab::up(&opts.prefix, lab_opts)?;
    progress.say("lab up");
    let measured = measure(&lab, opts.only, &dp_plan, &cp_plan, &progress);
    let down = if opts.keep {
        progress.say(format!(
            "leaving lab {} up (ambient-lab down --prefix {} removes it)",
            opts.prefix, opts.prefix
        ));
        lab.detach();
        Ok(())
    } else {
        progress.say("tearing the lab down");
        lab.down()
    };
    let (dataplane, controlplane) = measured?;
    down?;
    Report::new(dataplane, controlplane, progress.elapsed().as_secs_f64())
}

fn measure(
    lab: &Lab,
    only: Option<Part>,
    dp_plan: &DataplanePlan,
    cp_plan: &ControlPlan,
    progress: &Progress,
) -> Result<(
    Option<dataplane::DataplaneReport>,
    Option<control::ControlReport>,
)> {
    sys::check_interrupted()?;
    let state = LabState::load(lab.prefix())?.context("no lab state")?;
    let pid = |name: &str| {
        state
            .process(name)
            .map(|p| p.pid)
            .with_context(|| format!("the lab has no process {name}"))
    };
    let zt = Ztunnels {
        a: pid("ztunnel-a")?,
        b: pid("ztunnel-b")?,
    };
    let dp = match only {
        Some(Part::Control) => None,
        _ => Some(dataplane::run(
            lab,
            zt,
            pid(crate::waypoint::PROCESS)?,
            dp_plan,
            progress,
        )?),
    };
    sys::check_interrupted()?;
    let cp = match only {
        Some(Part::Dataplane) => None,
        _ => Some(control::run(lab, cp_plan, progress)?),
    };
    Ok((dp, cp))
}

/// Writes the report as pretty JSON (temp file + rename).
pub fn write_json(report: &Report, path: &Path) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let quick = BenchOptions {
            prefix: "b".into(),
            quick: true,
            runs: None,
            duration: None,
            pods: None,
            only: None,
            keep: false,
        };
        assert_eq!(quick.dataplane_plan().runs, 1);
        assert_eq!(quick.control_plan().unwrap().levels, vec![10]);
        let full = BenchOptions {
            quick: false,
            pods: Some(vec![1000, 10, 100, 10]),
            ..quick.clone()
        };
        assert_eq!(full.control_plan().unwrap().levels, vec![10, 100, 1000]);
        assert_eq!(full.dataplane_plan().open_connections, 1000);
        let bad = BenchOptions {
            pods: Some(vec![1]),
            ..quick
        };
        assert!(bad.control_plan().is_err());
    }
}
