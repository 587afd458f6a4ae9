//! `ambient-agent doctor`: what an operator would check by hand on a node, each finding with
//! what to do; the exit status is non-zero when something is wrong.
//!
//! Kernel features (the tunnel kind in use, nf_tables, TPROXY and the socket match, checked by
//! a `nft --check` transaction the kernel validates and discards), the sysctls of the path, the
//! CNI chain (the primary config has our entry last, the installed plugin binary is the one
//! shipped with this agent), the ztunnel (found, its netns there, admin port reachable, ready on
//! 15021), drift between the desired and the kernel state, and the pods the agent's store knows
//! against the pods present (their netns and veth) and the runtime's CNI cache.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ambient_net::consts::port;
use ambient_net::firewall::FirewallKind;
use ambient_net::iptables;
use ambient_net::model::TunnelKind;
use serde::Serialize;

use super::desired::Desired;
use super::drift;
use super::kernel::Kernel;
use super::{http_get, OpsError};
use crate::install_cni::chain;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// The agent's state directory.
    #[arg(long, default_value = "/var/run/ambient/state")]
    pub state_dir: PathBuf,
    /// The node's CNI config directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The node's CNI binary directory; the ambient-cni there must be the one shipped next to
    /// this agent.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The runtime's CNI cache (libcni's `results` directory).
    #[arg(long, default_value = "/var/lib/cni/results")]
    pub cni_cache_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Info,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// `kernel`, `sysctl`, `cni`, `ztunnel`, `drift`, `pods`.
    pub area: &'static str,
    /// A short name a test or a script can match, e.g. `ztunnel-ready`.
    pub check: String,
    pub level: Level,
    pub what: String,
    /// What to do about it (empty when nothing is to be done).
    pub fix: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub healthy: bool,
    pub findings: Vec<Finding>,
}

fn found(area: &'static str, check: &str, level: Level, what: String, fix: &str) -> Finding {
    Finding {
        area,
        check: check.into(),
        level,
        what,
        fix: fix.into(),
    }
}

/// Runs the checks and prints them; an error exit when a check failed.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let r = doctor(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", render(&r));
    }
    if !r.healthy {
        anyhow::bail!(
            "doctor: {} check(s) failed",
            r.findings.iter().filter(|f| f.level == Level::Fail).count()
        );
    }
    Ok(())
}

pub async fn doctor(args: &Args) -> Result<Report, OpsError> {
    let (d, k) = super::desired_and_kernel(&args.state_dir).await?;
    let zt_netns = d.ztunnel_netns();
    let mut f = Vec::new();
    kernel_checks(&mut f, &d, &k);
    let mut all = drift::compare(&d, &k);
    all.extend(drift::ztunnel_sysctl_drift(&d, &k));
    // Sysctls are their own area; the rest of the drift is listed as such.
    let (sysctls, others): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|x| x.subject.contains("sysctl "));
    if sysctls.is_empty() {
        f.push(found(
            "sysctl",
            "sysctls",
            Level::Ok,
            format!(
                "{} sysctls of the path as the agent wants them",
                d.net.sysctls.len() + d.ztunnel.as_ref().map_or(0, |z| z.sysctls.len())
            ),
            "",
        ));
    }
    for s in sysctls {
        f.push(found(
            "sysctl",
            &s.subject.replace("sysctl ", ""),
            Level::Fail,
            format!("is {}, the path needs {}", s.kernel, s.desired),
            &s.fix,
        ));
    }
    if others.is_empty() {
        f.push(found(
            "drift",
            "drift",
            Level::Ok,
            "the kernel holds the agent's desired rules, routes, tunnels, sets and chains".into(),
            "",
        ));
    }
    for x in others {
        f.push(found(
            "drift",
            &x.subject,
            Level::Fail,
            format!("kernel: {}; the agent wants: {}", x.kernel, x.desired),
            &x.fix,
        ));
    }
    cni_checks(&mut f, args);
    ztunnel_checks(&mut f, &d, zt_netns.as_deref());
    pod_checks(&mut f, &d, &k, &args.cni_cache_dir);
    let healthy = f.iter().all(|x| x.level != Level::Fail);
    Ok(Report {
        healthy,
        findings: f,
    })
}

fn kernel_checks(f: &mut Vec<Finding>, d: &Desired, k: &Kernel) {
    let kind = k.node.tunnels.values().flatten().find_map(|t| t.kind);
    match (d.state.ztunnel.is_some(), kind) {
        (_, Some(TunnelKind::Geneve)) => f.push(found("kernel", "tunnel", Level::Ok, format!("Geneve tunnels, UDP port {}", d.choice.port), "")),
        (_, Some(TunnelKind::Vxlan)) => f.push(found("kernel", "tunnel", Level::Ok, format!("VXLAN tunnels (the fallback: same VNIs, UDP port {}); the kernel has no Geneve or --tunnel vxlan was chosen", d.choice.port), "")),
        (false, None) => f.push(found("kernel", "tunnel", Level::Info, format!("no tunnels yet: no ztunnel pod is known; chosen {:?}, port {}", d.choice.kind, d.choice.port).to_lowercase(), "start the ztunnel pod on this node")),
        (true, None) => f.push(found("kernel", "tunnel", Level::Fail, "a ztunnel is known but istioin/istioout are missing".into(), "the agent's next reconcile creates them; check its log for why it could not")),
    }
    if k.firewall == FirewallKind::Iptables {
        let chains = k
            .node
            .ipt
            .as_ref()
            .is_some_and(|i| i.v4.chain("mangle", iptables::chain::PREROUTING).is_some());
        let variant = match iptables::variant() {
            iptables::Variant::Legacy => "iptables-legacy",
            _ => "iptables (Debian's alternative)",
        };
        if chains {
            f.push(found(
                "kernel",
                "iptables",
                Level::Ok,
                format!("the iptables backend ({variant}): the AMBIENT-* chains and the ipsets are in place"),
                "",
            ));
        } else {
            f.push(found(
                "kernel",
                "iptables",
                Level::Fail,
                format!("the iptables backend ({variant}): mangle AMBIENT-PREROUTING is missing"),
                "is the agent running? it creates its chains at start",
            ));
        }
    } else if k.node.nft.is_some() {
        f.push(found(
            "kernel",
            "nf_tables",
            Level::Ok,
            "nf_tables: the inet ambient-node table is in place".into(),
            "",
        ));
    } else {
        f.push(found(
            "kernel",
            "nf_tables",
            Level::Fail,
            "the inet ambient-node table is missing".into(),
            "is the agent running? it creates the table at start",
        ));
    }
    for (check, expr, what) in [
        (
            "tproxy",
            "meta l4proto tcp tproxy ip to 127.0.0.1:15001",
            "TPROXY (nft_tproxy)",
        ),
        (
            "socket-match",
            "socket transparent 1 accept",
            "the socket match (nft_socket)",
        ),
    ] {
        match nft_check(expr) {
            Ok(()) => f.push(found("kernel", check, Level::Ok, format!("{what} is available"), "")),
            Err(e) => f.push(found("kernel", check, Level::Fail, format!("{what}: the kernel refused it: {e}"), "load the module or use a kernel built with it (CONFIG_NFT_TPROXY, CONFIG_NFT_SOCKET)")),
        }
    }
}

/// Has the kernel validate (and then discard) a rule with `expr` in a throwaway table.
fn nft_check(expr: &str) -> Result<(), String> {
    let table = format!("ambient-doctor-{}", std::process::id());
    let text = format!(
        "table ip {table} {{\n chain c {{\n  type filter hook prerouting priority -150; policy accept;\n  {expr}\n }}\n}}\n"
    );
    let mut child = Command::new(ambient_net::nft::nft_program())
        .args(["--check", "-f", "-"])
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or("failed")
            .to_string())
    }
}

fn cni_checks(f: &mut Vec<Finding>, args: &Args) {
    let dir = &args.cni_conf_dir;
    let mut names: Vec<(String, chain::Kind)> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| chain::kind_of(&n).map(|k| (n, k)))
            .collect(),
        Err(e) => {
            f.push(found(
                "cni",
                "cni-config",
                Level::Fail,
                format!("cannot read {}: {e}", dir.display()),
                "give the node's CNI config dir with --cni-conf-dir",
            ));
            return;
        }
    };
    names.sort_by(|a, b| a.0.cmp(&b.0));
    // The primary is the first file that loads, as kubelet and the runtimes choose it.
    let primary = names.iter().find_map(|(n, kind)| {
        let text = std::fs::read_to_string(dir.join(n)).ok()?;
        chain::parse(*kind, &text).ok().map(|p| (n.clone(), p))
    });
    match primary {
        None => f.push(found(
            "cni",
            "cni-config",
            Level::Fail,
            format!("no usable CNI network config in {}", dir.display()),
            "the primary CNI has not written its config yet",
        )),
        Some((name, p)) => {
            let plugins = p.value["plugins"].as_array().cloned().unwrap_or_default();
            let types: Vec<&str> = plugins.iter().filter_map(|x| x["type"].as_str()).collect();
            let last = types.last().copied() == Some(chain::PLUGIN_TYPE);
            if last {
                f.push(found(
                    "cni",
                    "cni-chain",
                    Level::Ok,
                    format!("{name}: {} (ambient-cni last)", types.join(" → ")),
                    "",
                ));
            } else if p.has_entry() {
                f.push(found(
                    "cni",
                    "cni-chain",
                    Level::Fail,
                    format!(
                        "{name}: {}: ambient-cni is not last, so it sees no complete prevResult",
                        types.join(" → ")
                    ),
                    "run ambient-agent install-cni (it moves the entry to the end)",
                ));
            } else {
                f.push(found("cni", "cni-chain", Level::Fail, format!("{name}: {}: ambient-cni is not in the primary config: new pods are not enrolled", if types.is_empty() { "(single plugin)".to_string() } else { types.join(" → ") }), "run ambient-agent install-cni (--watch keeps it there)"));
            }
        }
    }
    let installed = args.cni_bin_dir.join(chain::PLUGIN_TYPE);
    let shipped = std::env::current_exe()
        .ok()
        .map(|e| e.with_file_name(chain::PLUGIN_TYPE));
    match (
        std::fs::read(&installed),
        shipped.as_ref().map(std::fs::read),
    ) {
        (Err(e), _) => f.push(found(
            "cni",
            "cni-binary",
            Level::Fail,
            format!("{}: {e}", installed.display()),
            "run ambient-agent install-cni",
        )),
        (Ok(a), Some(Ok(b))) if a == b => f.push(found(
            "cni",
            "cni-binary",
            Level::Ok,
            format!(
                "{} is the one shipped with this agent ({} {})",
                installed.display(),
                chain::PLUGIN_TYPE,
                env!("CARGO_PKG_VERSION")
            ),
            "",
        )),
        (Ok(_), Some(Ok(_))) => f.push(found(
            "cni",
            "cni-binary",
            Level::Fail,
            format!(
                "{} differs from the {} shipped with this agent ({})",
                installed.display(),
                chain::PLUGIN_TYPE,
                env!("CARGO_PKG_VERSION")
            ),
            "run ambient-agent install-cni to install the matching plugin",
        )),
        (Ok(_), _) => f.push(found(
            "cni",
            "cni-binary",
            Level::Info,
            format!(
                "{} is installed; no {} next to this agent to compare it with",
                installed.display(),
                chain::PLUGIN_TYPE
            ),
            "",
        )),
    }
}

fn ztunnel_checks(f: &mut Vec<Finding>, d: &Desired, netns: Option<&Path>) {
    let (Some(z), Some(ns)) = (&d.state.ztunnel, netns) else {
        f.push(found(
            "ztunnel",
            "ztunnel-found",
            Level::Fail,
            "no ztunnel pod is known to the agent: nothing is captured".into(),
            "start the ztunnel DaemonSet pod on this node (its CNI ADD tells the agent)",
        ));
        return;
    };
    let who = format!("{}/{} ({})", z.namespace, z.name, z.endpoint.ip);
    if !ns.exists() {
        f.push(found(
            "ztunnel",
            "ztunnel-found",
            Level::Fail,
            format!("ztunnel {who}: its netns {} is gone", ns.display()),
            "the ztunnel pod died without a CNI DEL: restart it",
        ));
        return;
    }
    f.push(found(
        "ztunnel",
        "ztunnel-found",
        Level::Ok,
        format!("ztunnel {who}, netns {}", ns.display()),
        "",
    ));
    match http_get(ns, port::ADMIN, "/config_dump") {
        Ok((200, _)) => f.push(found(
            "ztunnel",
            "ztunnel-admin",
            Level::Ok,
            format!("admin port 127.0.0.1:{} answers", port::ADMIN),
            "",
        )),
        Ok((c, _)) => f.push(found(
            "ztunnel",
            "ztunnel-admin",
            Level::Fail,
            format!("admin port answers HTTP {c}"),
            "see ztunnel's log",
        )),
        Err(e) => f.push(found(
            "ztunnel",
            "ztunnel-admin",
            Level::Fail,
            format!("admin port unreachable: {e}"),
            "is ztunnel running in its pod? see its log",
        )),
    }
    match http_get(ns, port::READINESS, "/healthz/ready") {
        Ok((200, _)) => f.push(found(
            "ztunnel",
            "ztunnel-ready",
            Level::Ok,
            format!("ready on {}", port::READINESS),
            "",
        )),
        Ok((c, b)) => f.push(found(
            "ztunnel",
            "ztunnel-ready",
            Level::Fail,
            format!("not ready: HTTP {c} {}", b.trim()),
            "ztunnel is not ready: its certificates or workload config (see its log)",
        )),
        Err(e) => f.push(found(
            "ztunnel",
            "ztunnel-ready",
            Level::Fail,
            format!("readiness port {} unreachable: {e}", port::READINESS),
            "ztunnel is not running: captured connections are refused; restart the ztunnel pod",
        )),
    }
}

fn pod_checks(f: &mut Vec<Finding>, d: &Desired, k: &Kernel, cache: &Path) {
    let links: BTreeSet<&str> = k.node.links.values().map(String::as_str).collect();
    let mut gone = Vec::new();
    for p in d.state.pods.values() {
        let why = if !Path::new(&p.netns).exists() {
            Some(format!("its netns {} is gone", p.netns))
        } else if !links.contains(p.host_veth.as_str()) {
            Some(format!("its host veth {} is gone", p.host_veth))
        } else {
            None
        };
        if let Some(w) = why {
            gone.push(format!("{}/{} ({w})", p.namespace, p.name));
        }
    }
    let n = d.state.pods.len();
    if gone.is_empty() {
        f.push(found(
            "pods",
            "pods-present",
            Level::Ok,
            format!("{n} enrolled pod attachments, each with its netns and host veth"),
            "",
        ));
    } else {
        f.push(found("pods", "pods-present", Level::Fail, format!("{} of {n} enrolled pods are gone: {}", gone.len(), gone.join(", ")), "a CNI DEL was missed: the runtime's CNI GC (or, with --kube, the watcher) removes them; `ambient-agent cleanup` resets the node"));
    }
    // The runtime's view: attachments libcni cached that the agent has no record of.
    let Ok(cached) = crate::recover::read_cni_cache(cache) else {
        f.push(found(
            "pods",
            "runtime-pods",
            Level::Info,
            format!(
                "no CNI cache at {} to compare with (--cni-cache-dir)",
                cache.display()
            ),
            "",
        ));
        return;
    };
    let known: BTreeSet<(String, String)> = d
        .state
        .pods
        .values()
        .map(|p| (p.container_id.clone(), p.if_name.clone()))
        .chain(
            d.state
                .ztunnel
                .iter()
                .map(|z| (z.container_id.clone(), z.if_name.clone())),
        )
        .collect();
    let total = cached.len();
    let mut unknown: Vec<String> = cached
        .iter()
        .filter(|a| !known.contains(&(a.container_id.clone(), a.if_name.clone())))
        .map(|a| a.label())
        .collect();
    unknown.sort();
    f.push(found(
        "pods",
        "runtime-pods",
        Level::Info,
        if unknown.is_empty() {
            format!("the runtime's {total} attachments are all known to the agent")
        } else {
            format!("the runtime has {total} attachments; {} not enrolled by the agent (outside the mesh, opted out, or missed): {}", unknown.len(), unknown.join(", "))
        },
        "",
    ));
}

pub fn render(r: &Report) -> String {
    let mut s = String::new();
    for x in &r.findings {
        let tag = match x.level {
            Level::Ok => "ok  ",
            Level::Info => "info",
            Level::Fail => "FAIL",
        };
        s += &format!("{tag}  {:<8} {:<22} {}\n", x.area, x.check, x.what);
        if !x.fix.is_empty() && x.level != Level::Ok {
            s += &format!("      {:<8} {:<22} → {}\n", "", "", x.fix);
        }
    }
    let failed = r.findings.iter().filter(|x| x.level == Level::Fail).count();
    s += &if failed == 0 {
        "healthy\n".to_string()
    } else {
        format!("{failed} problem(s)\n")
    };
    s
}
