//! `ambient-lab`: bring a two-node ambient lab up, show it, tear it down.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use ambient_lab::cni::Primary;
use ambient_lab::drill;
use ambient_lab::topology::IpFamily;
use ambient_lab::up::{Dataplane, UpOptions};
use ambient_lab::{
    bench, demo, down, exec, explain, flood, http, paths, serve, soak, status, tproxy, up,
};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ambient-lab",
    version,
    about = "Two-node ambient mesh lab in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Clone)]
struct PrefixArg {
    /// Prefix of the lab's netns names and of /run/ambient-lab/<prefix> ([a-z0-9], ≤16).
    #[arg(long, env = "AMBIENT_LAB_PREFIX", default_value = paths::DEFAULT_PREFIX)]
    prefix: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// On a lab that is up: show which connections node A captures into its ztunnel netns.
    Demo {
        #[command(flatten)]
        prefix: PrefixArg,
    },
    /// Build the lab: nodes, underlay, agents, pods via CNI, servers, Services, ztunnel-init,
    /// ztunnels, the waypoint.
    Up {
        #[command(flatten)]
        prefix: PrefixArg,
        /// The primary CNI plugin.
        #[arg(long, value_enum, default_value = "ptp")]
        primary: Primary,
        /// What runs in the ztunnel netns: the real ztunnel, or nothing (`none`).
        #[arg(long, value_enum, default_value = "ztunnel")]
        dataplane: Dataplane,
        /// No agent, no ambient-cni in the chain, no ztunnel-init: plain topology.
        #[arg(long)]
        no_agent: bool,
        /// Tunnel kind passed to the agent.
        #[arg(long, default_value = "auto", value_parser = ["auto", "geneve", "vxlan"])]
        tunnel: String,
        /// The agent's firewall backend (`--firewall`): auto, nftables or iptables. The
        /// environment variable lets a test suite run its labs on either backend.
        #[arg(long, env = "AMBIENT_LAB_FIREWALL", default_value = "auto",
              value_parser = ["auto", "nftables", "iptables"])]
        firewall: String,
        /// rp_filter for conf.all/default in every new netns (a distro-like baseline).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
        rp_filter: u8,
        /// Directory holding ambient-cni, ambient-agent and ztunnel-init (default: next
        /// to this executable).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// The ambient-agent binary.
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// The ambient-cni plugin binary (must be named ambient-cni).
        #[arg(long)]
        cni_plugin: Option<PathBuf>,
        /// The ztunnel-init binary.
        #[arg(long)]
        ztunnel_init_bin: Option<PathBuf>,
        /// Make everything (pods, Services, the waypoint's config) but do not start the
        /// waypoint process in b-waypoint.
        #[arg(long)]
        no_waypoint: bool,
        /// The waypoint binary (default: `waypoint` in --bin-dir or next to this executable).
        #[arg(long)]
        waypoint_bin: Option<PathBuf>,
        /// Enroll the waypoint pod like any ambient pod (its node's ztunnel then relays its
        /// HBONE both ways). By default it is opted out, as Istio's waypoints are: it speaks
        /// HBONE itself.
        #[arg(long)]
        waypoint_captured: bool,
        /// Address families of pods, Services and the underlay: ipv4, ipv6 (v6 only), or dual
        /// (both; v4 the primary, the underlay v4).
        #[arg(long, value_enum, default_value = "ipv4")]
        ip_family: IpFamily,
    },
    /// Show the lab's topology.
    Status {
        #[command(flatten)]
        prefix: PrefixArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Tear the lab down (CNI DEL, stop processes, delete netns and run dir).
    Down {
        #[command(flatten)]
        prefix: PrefixArg,
        /// Exit 1 when a CNI DEL failed (everything is removed anyway).
        #[arg(long)]
        strict: bool,
    },
    /// Run a command in a lab netns (`a-client`, `b-app`, `nodeA`, ...).
    Exec {
        #[command(flatten)]
        prefix: PrefixArg,
        /// The netns name without the prefix.
        netns: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// One connection's path across the lab: both nodes' `ambient-agent explain` and both
    /// ztunnels' decisions, stitched (`a-client b-app:9080`, `nodeA a-app:9080`).
    Explain {
        #[command(flatten)]
        prefix: PrefixArg,
        /// A pod (`a-client`) or a node (`nodeA`).
        from: String,
        /// `<pod>:<port>` or `<ip>:<port>`.
        to: String,
        /// Also probe with nftrace set and show the rules the packet hit.
        #[arg(long)]
        trace: bool,
        #[arg(long)]
        json: bool,
        /// The HTTP request the waypoint's decision is asked for (when ztunnel sends the
        /// connection to it): method, path (with its query), headers (`name:value`, repeated).
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Bring up a lab of its own, measure the meshed path against the unmeshed one and the
    /// control plane's costs, print a table with the targets, tear the lab down.
    Bench {
        /// The bench lab's prefix ([a-z0-9], ≤16).
        #[arg(long, default_value = bench::DEFAULT_PREFIX)]
        prefix: String,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// A short run (smoke test): one run, 1 s bulk runs, few samples, 10 pods.
        #[arg(long)]
        quick: bool,
        /// Repetitions of every measure (default 5; 1 with --quick).
        #[arg(long)]
        runs: Option<usize>,
        /// Seconds per bulk-throughput run (default 5; 1 with --quick).
        #[arg(long)]
        duration: Option<u32>,
        /// Enrolled pods on node A while CNI ADD/DEL are measured (default 10,100,1000;
        /// 10 with --quick); cold start and the ztunnel IP change run at the largest.
        #[arg(long, value_delimiter = ',')]
        pods: Option<Vec<usize>>,
        /// Measure only the data plane or only the control plane.
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
        /// Leave the lab up afterwards, e.g. to profile it (`ambient-lab down --prefix bench`).
        #[arg(long)]
        keep: bool,
    },
    /// Reliability drills on a lab of their own (`drill cni`: ADD/DEL at kubelet's concurrency;
    /// `drill churn`: pods enrolled and removed while the agent is SIGKILLed).
    Drill {
        #[command(subcommand)]
        drill: drill::DrillCmd,
    },
    /// Soak the mesh on a lab of its own: many concurrent connections opened, held and
    /// churned; both ztunnels' FDs and RSS sampled and held to a flatness criterion.
    Soak(soak::SoakArgs),
    /// Flood ztunnel's 15001, 15006 and 15008 from one pod on a lab of its own while other
    /// pods keep connecting: their latency before and during, nothing failed, all released.
    Flood(flood::FloodArgs),
    /// Test server run inside pods.
    #[command(hide = true)]
    Serve {
        /// The greeting + echo server's port.
        #[arg(long, default_value_t = 9080)]
        port: u16,
        /// Also serve HTTP (h1 and h2c) on this port.
        #[arg(long)]
        http_port: Option<u16>,
        /// Reported as `pod` in HTTP answers.
        #[arg(long, default_value = "")]
        name: String,
        /// Reported as `version` in HTTP answers.
        #[arg(long, default_value = "")]
        version: String,
        /// Also listen on [::] (v6 only).
        #[arg(long)]
        ipv6: bool,
    },
    /// Transparent test listeners for the ztunnel netns.
    #[command(hide = true)]
    TproxyListen {
        #[arg(long, value_delimiter = ',', default_value = "15001,15006,15008")]
        ports: Vec<u16>,
        #[arg(long)]
        log: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ambient-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    match std::io::stdout().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Up {
            prefix,
            primary,
            dataplane,
            no_agent,
            tunnel,
            firewall,
            rp_filter,
            bin_dir,
            agent_bin,
            cni_plugin,
            ztunnel_init_bin,
            no_waypoint,
            waypoint_bin,
            waypoint_captured,
            ip_family,
        } => {
            let state = up::up(&UpOptions {
                prefix: prefix.prefix,
                primary,
                dataplane,
                agent: !no_agent,
                tunnel,
                firewall,
                rp_filter,
                bin_dir,
                agent_bin,
                cni_plugin,
                ztunnel_init_bin,
                waypoint: !no_waypoint,
                waypoint_bin,
                waypoint_captured,
                ip_family,
            })?;
            emit(&status::LabStatus::from_state(&state).table())?;
        }
        Cmd::Status { prefix, json } => {
            let st = status::load(&prefix.prefix)?;
            if json {
                emit(&(serde_json::to_string_pretty(&st)? + "\n"))?;
            } else {
                emit(&st.table())?;
            }
        }
        Cmd::Down { prefix, strict } => {
            let report = down::down(&prefix.prefix)?;
            eprintln!("lab[{}] down", prefix.prefix);
            if strict && !report.del_failures.is_empty() {
                eprintln!("{} CNI DEL failure(s)", report.del_failures.len());
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Exec {
            prefix,
            netns,
            command,
        } => {
            let code = exec::exec(&prefix.prefix, &netns, &command)?;
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
        Cmd::Demo { prefix } => emit(&demo::run(&prefix.prefix)?)?,
        Cmd::Explain {
            prefix,
            from,
            to,
            trace,
            json,
            method,
            path,
            headers,
        } => {
            let mut req = http::HttpRequest::new(&method, &path);
            for h in &headers {
                let (n, v) = h
                    .split_once(':')
                    .with_context(|| format!("--header {h:?}: want name:value"))?;
                req.headers.push((n.trim().into(), v.trim().into()));
            }
            let opts = explain::ExplainOptions {
                prefix: prefix.prefix,
                from,
                to,
                trace,
            };
            let p = explain::run_http(&opts, &req)?;
            emit(&if json {
                serde_json::to_string_pretty(&p)? + "\n"
            } else {
                explain::render(&p)
            })?;
        }
        Cmd::Bench {
            prefix,
            json,
            quick,
            runs,
            duration,
            pods,
            only,
            keep,
        } => {
            let report = bench::run(&bench::BenchOptions {
                prefix,
                quick,
                runs,
                duration,
                pods,
                only,
                keep,
            })?;
            emit(&report.table())?;
            if let Some(path) = json {
                bench::write_json(&report, &path)?;
                eprintln!("bench: JSON written to {}", path.display());
            }
            eprintln!(
                "bench: {} of {} targets met",
                report
                    .targets
                    .iter()
                    .filter(|t| t.met == Some(true))
                    .count(),
                report.targets.len()
            );
        }
        Cmd::Drill { drill } => drill::run(drill)?,
        Cmd::Soak(args) => soak::run(&args)?,
        Cmd::Flood(args) => flood::run(&args)?,
        Cmd::Serve {
            port,
            http_port,
            name,
            version,
            ipv6,
        } => serve::run(&serve::ServeOptions {
            port,
            http_port,
            name,
            version,
            ipv6,
        })?,
        Cmd::TproxyListen { ports, log } => tproxy::run(&ports, &log)?,
    }
    Ok(ExitCode::SUCCESS)
}
