//! Control-plane figures on node A: CNI ADD/DEL through the real chain (the lab's libcni
//! client → ptp + host-local → ambient-cni → agent) and the ambient-cni plugin alone, with
//! N pods enrolled; the agent's cold start with N pods; and a ztunnel IP change.
//!
//! The lab's pod network on a node is a /24, too small for 1000 pods: the extra pods get a
//! network of their own on node A, `bench` (10.248.0.0/20), whose conflist is the lab's
//! (ptp + host-local, then ambient-cni with the node's agent socket). They are pods of the
//! ambient namespace `demo`, so every one of them is enrolled.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambient_net::netns;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::stats::{Percentiles, Summary};
use super::sys;
use super::Progress;
use crate::harness::Lab;
use crate::state::{LabState, NodeState, PodState, ProcessRecord};
use crate::topology::{self, SERVER_PORT};
use crate::{agent, cni, paths, procs, ztunnel};

pub const NETWORK: &str = "bench";
pub const CIDR: &str = "10.248.0.0/20";
pub const GATEWAY: &str = "10.248.0.1";
/// Addresses in [`CIDR`] host-local can hand out.
pub const MAX_PODS: usize = 4000;
/// The agent's health port in the node netns.
const HEALTH_PORT: u16 = 15120;
/// Enrolled pods of the lab itself on node A (`a-app`, `a-client`, `a-reviews-v1`).
pub const LAB_ENROLLED: usize = 3;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlan {
    /// Pods enrolled on node A while ADD/DEL are measured (ascending).
    pub levels: Vec<usize>,
    pub runs: usize,
    pub chain_samples: usize,
    pub plugin_samples: usize,
}

/// p50 and p99 over runs, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Lat {
    pub p50: Summary,
    pub p99: Summary,
}

impl Lat {
    fn of(runs: &[Percentiles]) -> Lat {
        Lat {
            p50: Summary::of(&runs.iter().map(|p| p.p50).collect::<Vec<_>>()),
            p99: Summary::of(&runs.iter().map(|p| p.p99).collect::<Vec<_>>()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fill {
    /// Pods added through the chain to reach the level.
    pub added: usize,
    pub seconds: f64,
    /// Wall time per pod (two pods were being added at a time).
    pub ms_per_pod: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Level {
    /// Pods enrolled on node A (the agent's count) before each measured ADD.
    pub pods: usize,
    pub fill: Fill,
    /// The whole chain, as the runtime sees it: libcni client process start to exit.
    pub chain_add_ms: Lat,
    pub chain_del_ms: Lat,
    /// ambient-cni alone, invoked as libcni would with the primary's result as prevResult:
    /// plugin start → agent enrolls the pod (nft set, route, sysctl) → reply → exit.
    pub plugin_add_ms: Lat,
    pub plugin_del_ms: Lat,
    /// ptp (+ host-local), invoked directly, for comparison.
    pub primary_add_ms: Lat,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdStart {
    pub pods: usize,
    /// kill -9, start: until `GET /ready` answers 200 (the first reconcile is done).
    pub restart_s: Summary,
    /// kill -9, delete the nft table and flush table 100, start: until /ready.
    pub flushed_s: Summary,
    /// After every start, the nft pod set and table 100 held every enrolled pod.
    pub kernel_matched: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IpChange {
    pub pods: usize,
    /// From the start of the new ztunnel pod's CNI ADD to the first new meshed connection
    /// (a-client → b-app, greeting received) that started after the ADD returned.
    pub total_s: Summary,
    /// The new pod's CNI ADD (the agent repoints tunnels, tables and nft rules in it).
    pub cni_add_s: Summary,
    pub ztunnel_init_s: Summary,
    /// ztunnel process start → `/healthz/ready` 200.
    pub ztunnel_ready_s: Summary,
    /// ADD returned → first new connection through the new ztunnel.
    pub after_repoint_s: Summary,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlReport {
    pub plan: ControlPlan,
    pub network: Value,
    pub levels: Vec<Level>,
    pub cold_start: ColdStart,
    pub ztunnel_ip_change: IpChange,
}

/// One pod of the bench network.
struct Pod {
    netns: String,
    container_id: String,
    name: String,
    uid: String,
}

impl Pod {
    fn cni_args(&self) -> String {
        cni::cni_args("demo", &self.name, &self.container_id, &self.uid)
    }
    fn netns_path(&self) -> String {
        netns::named_path(&self.netns).display().to_string()
    }
}

struct Ctx<'a> {
    lab: &'a Lab,
    progress: &'a Progress,
    prefix: String,
    node: NodeState,
    cniclient: PathBuf,
    conf_dir: PathBuf,
    ptp: PathBuf,
    ambient_cni: PathBuf,
    ptp_conf: Value,
    ambient_conf: Value,
    rp_filter: u8,
    next: AtomicUsize,
}

/// Runs the control-plane measurements. Everything here runs on a thread inside node A's
/// netns, like the runtime that invokes CNI on a node; the commands it starts inherit it.
pub fn run(lab: &Lab, plan: &ControlPlan, progress: &Progress) -> Result<ControlReport> {
    let state = LabState::load(lab.prefix())?.context("no lab state")?;
    let node = state.node("A").context("no node A")?.clone();
    let node_netns = netns::named_path(&node.netns);
    netns::run_in(&node_netns, || {
        run_in_node(lab, &state, node, plan, progress)
    })?
}

fn run_in_node(
    lab: &Lab,
    state: &LabState,
    node: NodeState,
    plan: &ControlPlan,
    progress: &Progress,
) -> Result<ControlReport> {
    let agent = node.agent.clone().context("node A has no agent")?;
    let cni_dir = node.cni.conf_dir.parent().context("cni dir")?.to_path_buf();
    let conf_dir = cni_dir.join("bench.d");
    let ipam_dir = cni_dir.join("bench-ipam");
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::create_dir_all(&ipam_dir)?;
    let ptp_plugin = json!({
        "type": "ptp", "ipMasq": false, "mtu": cni::POD_MTU,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": CIDR, "gateway": GATEWAY}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": ipam_dir,
        },
    });
    let ambient_plugin = json!({
        "type": "ambient-cni",
        "agentSocket": agent.socket,
        "logFile": node.cni.log_file.clone().unwrap_or_else(|| cni_dir.join("bench-cni.log")),
    });
    let conflist = json!({
        "cniVersion": cni::CNI_VERSION, "name": NETWORK,
        "plugins": [ptp_plugin, ambient_plugin],
    });
    std::fs::write(
        conf_dir.join("20-bench.conflist"),
        serde_json::to_vec_pretty(&conflist)?,
    )?;
    let with_name = |mut v: Value| {
        v["cniVersion"] = json!(cni::CNI_VERSION);
        v["name"] = json!(NETWORK);
        v
    };
    let ctx = Ctx {
        lab,
        progress,
        prefix: lab.prefix().to_string(),
        cniclient: state.cniclient.clone().context("no libcni client")?,
        conf_dir,
        ptp: sys::find_in_path(&node.cni.cni_path, "ptp").context("no ptp plugin")?,
        ambient_cni: sys::find_in_path(&node.cni.cni_path, "ambient-cni")
            .context("no ambient-cni plugin")?,
        ptp_conf: with_name(conflist["plugins"][0].clone()),
        ambient_conf: with_name(conflist["plugins"][1].clone()),
        rp_filter: state.options.rp_filter,
        node,
        next: AtomicUsize::new(0),
    };

    let mut levels = Vec::new();
    for &level in &plan.levels {
        sys::check_interrupted()?;
        levels.push(ctx.level(level, plan)?);
    }
    let top = *plan.levels.last().context("no pod levels")?;
    sys::check_interrupted()?;
    let cold_start = ctx.cold_start(top, plan.runs)?;
    sys::check_interrupted()?;
    let ztunnel_ip_change = ctx.ip_changes(top, plan.runs)?;
    Ok(ControlReport {
        plan: plan.clone(),
        network: conflist,
        levels,
        cold_start,
        ztunnel_ip_change,
    })
}

/// Loads the lab state, changes it and saves it (the bench is its only writer meanwhile).
fn update_state(prefix: &str, f: impl FnOnce(&mut LabState)) -> Result<()> {
    let mut st = LabState::load(prefix)?.context("no lab state")?;
    f(&mut st);
    st.save()
}

fn timed(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<(f64, Output)> {
    use std::io::Write;
    let t = Instant::now();
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", cmd.get_program().to_string_lossy()))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Network configs are a few KB: far below a pipe's buffer.
        pipe.write_all(data)?;
    }
    let out = child.wait_with_output()?;
    Ok((t.elapsed().as_secs_f64() * 1e3, out))
}

impl Ctx<'_> {
    fn new_pod(&self, tag: &str) -> Pod {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Pod {
            netns: format!("{}-bp{i}", self.prefix),
            container_id: format!("{}-bench-{tag}-{i}", self.prefix),
            name: format!("bench-{tag}-{i}"),
            uid: format!("00000000-0000-4000-8000-{i:012x}"),
        }
    }

    /// Creates the pod's netns (recorded in the lab state first, so `down` removes it).
    fn make_netns(&self, pods: &[&Pod]) -> Result<()> {
        update_state(&self.prefix, |st| {
            st.netns.extend(pods.iter().map(|p| p.netns.clone()));
        })?;
        let sysctls = topology::pod_sysctls(self.rp_filter);
        let pairs: Vec<(&str, &str)> = sysctls.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for p in pods {
            netns::create_named(&p.netns).with_context(|| format!("create netns {}", p.netns))?;
            crate::sysctl::set_in(&p.netns, &pairs)?;
        }
        Ok(())
    }

    fn drop_netns(&self, pod: &Pod) {
        let _ = netns::delete_named(&pod.netns);
    }

    /// The libcni client on the bench network: (ms, output).
    fn chain(&self, op: &str, pod: &Pod) -> Result<(f64, Output)> {
        let mut cmd = Command::new(&self.cniclient);
        cmd.arg(op)
            .arg(&self.conf_dir)
            .arg(NETWORK)
            .arg(pod.netns_path())
            .arg(&pod.container_id)
            .arg("eth0")
            .env("CNI_PATH", &self.node.cni.cni_path)
            .env("CNI_CACHE_DIR", &self.node.cni.cache_dir)
            .env("CNI_ARGS", pod.cni_args());
        let (ms, out) = timed(&mut cmd, None)?;
        if !out.status.success() {
            bail!(
                "CNI {op} of {} through the chain failed: {}",
                pod.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((ms, out))
    }

    /// One plugin binary invoked directly, as libcni does: (ms, output).
    fn plugin(&self, bin: &Path, op: &str, pod: &Pod, conf: &Value) -> Result<(f64, Output)> {
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("CNI_COMMAND", op)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", pod.cni_args())
            .env("CNI_PATH", &self.node.cni.cni_path)
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        let (ms, out) = timed(&mut cmd, Some(&serde_json::to_vec(conf)?))?;
        if !out.status.success() {
            bail!(
                "{} {op} of {} failed: {}{}",
                bin.display(),
                pod.name,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((ms, out))
    }

    /// How many pods the agent has enrolled (`GET /state`).
    fn enrolled(&self) -> Result<usize> {
        let (code, body) = ztunnel::http_get(HEALTH_PORT, "/state")?;
        if code != 200 {
            bail!("agent /state answered {code}");
        }
        let v: Value = serde_json::from_str(&body).context("parse agent /state")?;
        Ok(v["pods"].as_object().map_or(0, |m| m.len()))
    }

    /// Adds pods through the chain until the agent has `total` enrolled.
    fn fill_to(&self, total: usize) -> Result<Fill> {
        let have = self.enrolled()?;
        let need = total.saturating_sub(have);
        let t = Instant::now();
        let pods: Vec<Pod> = (0..need).map(|_| self.new_pod("fill")).collect();
        self.make_netns(&pods.iter().collect::<Vec<_>>())?;
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| -> Result<()> {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            sys::check_interrupted()?;
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(p) = pods.get(i) else { return Ok(()) };
                            self.chain("add", p)?;
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().map_err(|_| anyhow!("fill worker panicked"))??;
            }
            Ok(())
        })?;
        // The filling pods stay until the lab goes (`down` deletes their netns).
        let seconds = t.elapsed().as_secs_f64();
        let now = self.enrolled()?;
        if now != total.max(have) {
            bail!("the agent has {now} pods enrolled, expected {total}");
        }
        Ok(Fill {
            added: need,
            seconds,
            ms_per_pod: if need > 0 {
                seconds * 1e3 / need as f64
            } else {
                f64::NAN
            },
        })
    }

    fn level(&self, level: usize, plan: &ControlPlan) -> Result<Level> {
        let fill = self.fill_to(level)?;
        let pods = self.enrolled()?;
        self.progress.say(format!(
            "{pods} pods enrolled on node A ({} added through the chain in {:.1} s)",
            fill.added, fill.seconds
        ));
        let (mut c_add, mut c_del, mut p_add, mut p_del, mut prim) =
            (vec![], vec![], vec![], vec![], vec![]);
        for run in 0..plan.runs {
            let (mut a, mut d) = (vec![], vec![]);
            for _ in 0..plan.chain_samples {
                sys::check_interrupted()?;
                let pod = self.new_pod("chain");
                self.make_netns(&[&pod])?;
                let r = self.chain("add", &pod).and_then(|(add, _)| {
                    let (del, _) = self.chain("del", &pod)?;
                    Ok((add, del))
                });
                self.drop_netns(&pod);
                let (add, del) = r?;
                a.push(add);
                d.push(del);
            }
            let (mut pa, mut pd, mut pp) = (vec![], vec![], vec![]);
            for _ in 0..plan.plugin_samples {
                sys::check_interrupted()?;
                let pod = self.new_pod("plugin");
                self.make_netns(&[&pod])?;
                let r = self.plugin_sample(&pod);
                self.drop_netns(&pod);
                let (prim_ms, add, del) = r?;
                pp.push(prim_ms);
                pa.push(add);
                pd.push(del);
            }
            let (ca, cd, pa, pd, pp) = (
                Percentiles::of(&a),
                Percentiles::of(&d),
                Percentiles::of(&pa),
                Percentiles::of(&pd),
                Percentiles::of(&pp),
            );
            self.progress.say(format!(
                "run {}/{} at {pods} pods: chain ADD p50 {:.2} ms p99 {:.2} ms, DEL p50 {:.2} ms; ambient-cni ADD p50 {:.2} ms p99 {:.2} ms, DEL p50 {:.2} ms",
                run + 1, plan.runs, ca.p50, ca.p99, cd.p50, pa.p50, pa.p99, pd.p50
            ));
            c_add.push(ca);
            c_del.push(cd);
            p_add.push(pa);
            p_del.push(pd);
            prim.push(pp);
        }
        Ok(Level {
            pods,
            fill,
            chain_add_ms: Lat::of(&c_add),
            chain_del_ms: Lat::of(&c_del),
            plugin_add_ms: Lat::of(&p_add),
            plugin_del_ms: Lat::of(&p_del),
            primary_add_ms: Lat::of(&prim),
        })
    }

    /// ptp ADD (untimed share), ambient-cni ADD and DEL with ptp's result as prevResult
    /// (timed), ptp DEL. Returns (ptp ADD ms, ambient-cni ADD ms, ambient-cni DEL ms).
    fn plugin_sample(&self, pod: &Pod) -> Result<(f64, f64, f64)> {
        let (prim, out) = self.plugin(&self.ptp, "ADD", pod, &self.ptp_conf)?;
        let prev: Value = serde_json::from_slice(&out.stdout).context("ptp result")?;
        let mut conf = self.ambient_conf.clone();
        conf["prevResult"] = prev.clone();
        let r = self
            .plugin(&self.ambient_cni, "ADD", pod, &conf)
            .and_then(|(add, out)| {
                let echoed: Value =
                    serde_json::from_slice(&out.stdout).context("ambient-cni result")?;
                if echoed["ips"] != prev["ips"] {
                    bail!("ambient-cni changed the result: {echoed}");
                }
                let (del, _) = self.plugin(&self.ambient_cni, "DEL", pod, &conf)?;
                Ok((add, del))
            });
        let mut ptp_del = self.ptp_conf.clone();
        ptp_del["prevResult"] = prev;
        self.plugin(&self.ptp, "DEL", pod, &ptp_del)?;
        let (add, del) = r?;
        Ok((prim, add, del))
    }

    fn agent_record(&self) -> Result<ProcessRecord> {
        let st = LabState::load(&self.prefix)?.context("no lab state")?;
        let name = self
            .node
            .agent
            .as_ref()
            .context("no agent")?
            .process
            .clone();
        st.process(&name)
            .cloned()
            .with_context(|| format!("no process {name}"))
    }

    /// kill -9 the agent (optionally wiping its kernel state), start it again, and time
    /// until `/ready`; then check the kernel holds every enrolled pod.
    fn restart_agent(&self, flush: bool, pods: usize) -> Result<(f64, bool)> {
        let old = self.agent_record()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old.pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while procs::is_alive(&old) {
            if Instant::now() >= deadline {
                bail!("the agent survived SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if flush {
            for argv in [
                &["nft", "delete", "table", "inet", "ambient-node"][..],
                &["ip", "route", "flush", "table", "100"][..],
            ] {
                let out = Command::new(argv[0]).args(&argv[1..]).output()?;
                sys::require_success(&argv.join(" "), &out)?;
            }
            if kernel_pods()? != (0, 0) {
                bail!("the flush left pods in the kernel");
            }
        }
        let t = Instant::now();
        let (rec, _child) = procs::spawn_detached(&old.name, &old.netns, &old.argv, &[], &old.log)?;
        update_state(&self.prefix, |st| {
            if let Some(p) = st.processes.iter_mut().find(|p| p.name == old.name) {
                *p = rec.clone();
            }
        })?;
        loop {
            if matches!(ztunnel::http_get(HEALTH_PORT, "/ready"), Ok((200, _))) {
                break;
            }
            if !procs::is_alive(&rec) {
                bail!(
                    "the restarted agent exited\n{}",
                    procs::log_tail(&rec.log, 10)
                );
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the restarted agent is not ready after 60 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let secs = t.elapsed().as_secs_f64();
        let (set, routes) = kernel_pods()?;
        Ok((secs, set == pods && routes == pods))
    }

    fn cold_start(&self, level: usize, runs: usize) -> Result<ColdStart> {
        let pods = self.enrolled()?;
        if pods != level {
            bail!("{pods} pods enrolled, expected {level}");
        }
        let (mut restart, mut flushed, mut matched) = (vec![], vec![], true);
        for run in 0..runs {
            sys::check_interrupted()?;
            let (r, m1) = self.restart_agent(false, pods)?;
            let (f, m2) = self.restart_agent(true, pods)?;
            self.progress.say(format!(
                "run {}/{runs}: agent cold start with {pods} pods: {:.0} ms (kernel intact), {:.0} ms (kernel flushed){}",
                run + 1,
                r * 1e3,
                f * 1e3,
                if m1 && m2 { "" } else { "; KERNEL DID NOT MATCH" }
            ));
            restart.push(r);
            flushed.push(f);
            matched &= m1 && m2;
        }
        Ok(ColdStart {
            pods,
            restart_s: Summary::of(&restart),
            flushed_s: Summary::of(&flushed),
            kernel_matched: matched,
        })
    }

    fn ip_changes(&self, level: usize, runs: usize) -> Result<IpChange> {
        let pods = self.enrolled()?;
        if pods != level {
            bail!("{pods} pods enrolled, expected {level}");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (mut total, mut add, mut init, mut ready, mut after) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut current = "a-ztunnel".to_string();
        for run in 1..=runs {
            sys::check_interrupted()?;
            let r = self.ip_change(&rt, &current, run)?;
            self.progress.say(format!(
                "run {run}/{runs}: ztunnel IP change with {pods} pods: new connections after {:.0} ms (ADD {:.0} ms, ztunnel-init {:.0} ms, ztunnel ready {:.0} ms)",
                r.total * 1e3, r.add * 1e3, r.init * 1e3, r.ready * 1e3
            ));
            total.push(r.total);
            add.push(r.add);
            init.push(r.init);
            ready.push(r.ready);
            after.push(r.after);
            current = r.pod_id;
        }
        Ok(IpChange {
            pods,
            total_s: Summary::of(&total),
            cni_add_s: Summary::of(&add),
            ztunnel_init_s: Summary::of(&init),
            ztunnel_ready_s: Summary::of(&ready),
            after_repoint_s: Summary::of(&after),
        })
    }

    /// A new ztunnel pod on node A (new netns, CNI ADD, ztunnel-init, ztunnel), as in a
    /// DaemonSet rollout, while a prober opens a new meshed connection every 2 ms; then the
    /// old pod is deleted.
    fn ip_change(
        &self,
        rt: &tokio::runtime::Runtime,
        old_id: &str,
        run: usize,
    ) -> Result<IpChangeRun> {
        let st = LabState::load(&self.prefix)?.context("no lab state")?;
        let old = st.pod(old_id).context("no current ztunnel pod")?.clone();
        let template = st.pod("a-ztunnel").context("no a-ztunnel")?.clone();
        let id = format!("a-zt{run}");
        let netns_name = paths::netns_name(&self.prefix, &id);
        let pod = PodState {
            id: id.clone(),
            netns: netns_name.clone(),
            container_id: format!("{}-v{run}", template.container_id),
            k8s_name: format!("ztunnel-a-v{run}"),
            uid: format!("00000000-0000-4000-9000-{run:012x}"),
            ip: None,
            host_veth: None,
            cni_result: None,
            ..template
        };
        update_state(&self.prefix, |st| {
            st.netns.push(netns_name.clone());
            st.pods.push(pod.clone());
        })?;
        netns::create_named(&netns_name)?;
        let sysctls = topology::pod_sysctls(self.rp_filter);
        let pairs: Vec<(&str, &str)> = sysctls.iter().map(|(k, v)| (*k, v.as_str())).collect();
        crate::sysctl::set_in(&netns_name, &pairs)?;
        rt.block_on(topology::loopback_up(&netns_name))?;

        let target = SocketAddr::from((self.lab.pod_ip("b-app"), SERVER_PORT));
        let prober = Prober::start(&paths::netns_name(&self.prefix, "a-client"), target)?;
        let bins = paths::exe_dir()?;
        let agent = self.node.agent.as_ref().context("no agent")?;

        // Connections flow through the current ztunnel before the change.
        prober
            .first_success_started_after(Instant::now(), Duration::from_secs(5))
            .context("no meshed connection before the ztunnel IP change")?;
        let t0 = Instant::now();
        let result = cni::add(&self.cniclient, &self.node, &pod)?;
        let t1 = Instant::now();
        let ip = cni::parse_result(&result)?.ip;
        agent::run_ztunnel_init(
            &bins.join("ztunnel-init"),
            &netns_name,
            &agent.state_dir.join(agent::TUNNEL_STATE_FILE),
            "auto",
            &st.run_dir.join(format!("{id}-init.log")),
        )?;
        let t2 = Instant::now();
        let log = st.run_dir.join(format!("{id}.log"));
        let argv = ztunnel::argv(&bins.join("ztunnel"), &st.run_dir, "A");
        let (rec, _child) =
            procs::spawn_detached(&format!("ztunnel-{id}"), &netns_name, &argv, &[], &log)?;
        let t3 = Instant::now();
        update_state(&self.prefix, |st| {
            st.processes.push(rec.clone());
            if let Some(p) = st.pod_mut(&id) {
                p.ip = Some(ip);
                p.cni_result = Some(result.clone());
            }
        })?;
        let zt_ns = netns::named_path(&netns_name);
        loop {
            if netns::run_in(&zt_ns, ztunnel::ready_once)? {
                break;
            }
            if !procs::is_alive(&rec) {
                bail!("the new ztunnel exited\n{}", procs::log_tail(&log, 10));
            }
            if t3.elapsed() > Duration::from_secs(15) {
                bail!("the new ztunnel is not ready after 15 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let t4 = Instant::now();
        let flowing = prober.first_success_started_after(t1, Duration::from_secs(10));
        prober.stop();
        let tf =
            flowing.context("no new meshed connection within 10 s of the ztunnel IP change")?;

        // The old pod goes away afterwards, and its ztunnel with it.
        cni::del(&self.cniclient, &self.node, &old)?;
        update_state(&self.prefix, |st| {
            if let Some(p) = st.pod_mut(old_id) {
                p.cni_added = false;
            }
        })?;
        let old_proc = if old_id == "a-ztunnel" {
            "ztunnel-a".to_string()
        } else {
            format!("ztunnel-{old_id}")
        };
        if let Some(p) = st.process(&old_proc) {
            procs::stop(p, Duration::from_secs(2))?;
        }
        Ok(IpChangeRun {
            pod_id: id,
            total: (tf - t0).as_secs_f64(),
            add: (t1 - t0).as_secs_f64(),
            init: (t2 - t1).as_secs_f64(),
            ready: (t4 - t3).as_secs_f64(),
            after: (tf - t1).as_secs_f64(),
        })
    }
}

struct IpChangeRun {
    pod_id: String,
    total: f64,
    add: f64,
    init: f64,
    ready: f64,
    after: f64,
}

/// (elements of the nft pod set, pod routes in table 100) in the calling thread's netns.
fn kernel_pods() -> Result<(usize, usize)> {
    let out = Command::new("nft")
        .args([
            "-j",
            "list",
            "set",
            "inet",
            "ambient-node",
            "ztunnel-pods-ips",
        ])
        .output()?;
    let set = if out.status.success() {
        let v: Value = serde_json::from_slice(&out.stdout)?;
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|o| o["set"]["elem"].as_array().map(Vec::len))
            .unwrap_or(0)
    } else {
        0
    };
    let out = Command::new("ip")
        .args(["-4", "route", "show", "table", "100"])
        .output()?;
    let routes = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" dev istioin"))
        .count();
    Ok((set, routes))
}

/// Opens a new connection every 2 ms from a pod netns and records which ones got the
/// server's greeting.
struct Prober {
    stop: Arc<AtomicBool>,
    /// (start, end) of every successful probe.
    ok: Arc<Mutex<Vec<(Instant, Instant)>>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Prober {
    fn start(netns_name: &str, target: SocketAddr) -> Result<Prober> {
        let ns = std::fs::File::open(netns::named_path(netns_name))
            .with_context(|| format!("open netns {netns_name}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(Mutex::new(Vec::new()));
        let (stop2, ok2) = (stop.clone(), ok.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                while !stop2.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let ok = ok2.clone();
                    tokio::spawn(async move {
                        let start = Instant::now();
                        let probe = tokio::time::timeout(Duration::from_millis(500), greet(target));
                        if let Ok(Ok(())) = probe.await {
                            ok.lock().unwrap().push((start, Instant::now()));
                        }
                    });
                }
            });
            Ok(())
        });
        Ok(Prober {
            stop,
            ok,
            thread: Some(thread),
        })
    }

    /// The end of the first successful probe that started at or after `t`.
    fn first_success_started_after(&self, t: Instant, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self
                .ok
                .lock()
                .unwrap()
                .iter()
                .filter(|(s, _)| *s >= t)
                .map(|(_, e)| *e)
                .min();
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One new connection that receives the server's greeting line.
async fn greet(target: SocketAddr) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(target).await?;
    let mut buf = [0u8; 128];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[..n].contains(&b'\n') {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod lab_enrolled_tests {
    #[test]
    fn lab_enrolled_matches_the_plan() {
        let a = &crate::topology::NODES[0];
        let n = crate::topology::pods_on(a).filter(|p| p.ambient).count();
        assert_eq!(super::LAB_ENROLLED, n);
    }
}
