//! `ambient-lab up`: builds the lab step by step, recording each thing in the state file
//! before relying on it; on any failure tears down whatever was made.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use ambient_net::netns;
use anyhow::{bail, Context, Result};

use crate::agent;
use crate::cni::{self, AmbientCniConf, Primary};
use crate::down;
use crate::paths;
use crate::procs;
use crate::service;
use crate::state::{
    no_v4, AgentState, EndpointState, LabOptionsState, LabState, NodeCniState, NodeState, Phase,
    PodRole, PodState, ServiceState, WaypointState,
};
use crate::sysctl;
use crate::topology::{self, IpFamily, NodePlan, PodPlan, HTTP_PORT, NODES, SERVER_PORT};
use crate::waypoint;
use crate::ztunnel;

/// What runs in the ztunnel netns besides ztunnel-init: the real `ztunnel`, or nothing (the
/// netns stays prepared, e.g. for a test's transparent listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dataplane {
    Ztunnel,
    None,
}

impl Dataplane {
    pub fn as_str(self) -> &'static str {
        match self {
            Dataplane::Ztunnel => "ztunnel",
            Dataplane::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub prefix: String,
    pub primary: Primary,
    pub dataplane: Dataplane,
    /// Run the agent, chain ambient-cni and run ztunnel-init.
    pub agent: bool,
    pub tunnel: String,
    /// The agent's `--firewall` (auto, nftables, iptables); a restarted agent keeps the one
    /// it recorded in its state.
    pub firewall: String,
    pub rp_filter: u8,
    pub bin_dir: Option<PathBuf>,
    pub agent_bin: Option<PathBuf>,
    pub cni_plugin: Option<PathBuf>,
    pub ztunnel_init_bin: Option<PathBuf>,
    /// Start the waypoint in `b-waypoint` (only with the agent and the ztunnel data plane;
    /// `--no-waypoint` turns it off, everything else is still made).
    pub waypoint: bool,
    /// The waypoint binary (default: `waypoint` in `--bin-dir` or next to this executable).
    pub waypoint_bin: Option<PathBuf>,
    /// Enroll the waypoint pod (see [`crate::topology::enrolled`]).
    pub waypoint_captured: bool,
    /// The address families of pods, Services and the underlay (see [`crate::topology`]).
    pub ip_family: IpFamily,
}

/// The executables a lab run needs.
struct Binaries {
    lab: PathBuf,
    cniclient: PathBuf,
    cni_path: String,
    cni_plugin: Option<PathBuf>,
    agent: Option<PathBuf>,
    ztunnel_init: Option<PathBuf>,
    ztunnel: Option<PathBuf>,
    waypoint: Option<PathBuf>,
}

/// Progress lines on stderr, with seconds since `up` started.
struct Progress {
    prefix: String,
    start: Instant,
}

impl Progress {
    fn say(&self, msg: impl AsRef<str>) {
        eprintln!(
            "lab[{}] {:6.2}s {}",
            self.prefix,
            self.start.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

pub fn up(opts: &UpOptions) -> Result<LabState> {
    paths::validate_prefix(&opts.prefix)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("ambient-lab up needs root (network namespaces, netlink, nft)");
    }
    if !["auto", "geneve", "vxlan"].contains(&opts.tunnel.as_str()) {
        bail!("--tunnel must be auto, geneve or vxlan");
    }
    if !["auto", "nftables", "iptables"].contains(&opts.firewall.as_str()) {
        bail!("--firewall must be auto, nftables or iptables");
    }
    let progress = Progress {
        prefix: opts.prefix.clone(),
        start: Instant::now(),
    };
    let run_dir = paths::run_dir(&opts.prefix);
    if let Some(old) = LabState::load(&opts.prefix)? {
        bail!(
            "lab {:?} already exists (phase {:?}, {}); run `ambient-lab down --prefix {}` first",
            opts.prefix,
            old.phase,
            old.path().display(),
            opts.prefix
        );
    }
    let leftovers: Vec<String> = netns::list_named()?
        .into_iter()
        .filter(|n| paths::owns_netns(&opts.prefix, n))
        .collect();
    if !leftovers.is_empty() || run_dir.exists() {
        bail!(
            "leftovers of a lab {:?} exist (netns {leftovers:?}, dir {}); run `ambient-lab down --prefix {}` first",
            opts.prefix,
            run_dir.display(),
            opts.prefix
        );
    }

    let bins = resolve_binaries(opts)?;
    progress.say(format!(
        "libcni client {}, CNI_PATH {}",
        bins.cniclient.display(),
        bins.cni_path
    ));

    std::fs::create_dir_all(&run_dir).with_context(|| format!("create {}", run_dir.display()))?;
    let mut state = LabState::new(
        &opts.prefix,
        LabOptionsState {
            primary: opts.primary.as_str().into(),
            dataplane: opts.dataplane.as_str().into(),
            agent: opts.agent,
            tunnel: opts.tunnel.clone(),
            rp_filter: opts.rp_filter,
            cni_plugin: bins.cni_plugin.clone(),
            agent_bin: bins.agent.clone(),
            ztunnel_init_bin: bins.ztunnel_init.clone(),
            waypoint: bins.waypoint.is_some(),
            waypoint_bin: bins.waypoint.clone(),
            ip_family: opts.ip_family,
        },
    );
    state.cniclient = Some(bins.cniclient.clone());
    state.save()?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let built = Builder {
        state: &mut state,
        opts,
        bins: &bins,
        rt: &rt,
        progress: &progress,
    }
    .build();
    match built {
        Ok(()) => {
            progress.say("ready");
            Ok(state)
        }
        Err(err) => {
            progress.say(format!("failed: {err:#}"));
            progress.say("cleaning up");
            if let Err(e) = down::teardown(&opts.prefix, Some(&state)) {
                progress.say(format!("cleanup after the failure also failed: {e:#}"));
            }
            Err(err.context(format!("ambient-lab up --prefix {} failed", opts.prefix)))
        }
    }
}

fn resolve_binaries(opts: &UpOptions) -> Result<Binaries> {
    let find = |name: &str, explicit: &Option<PathBuf>| -> Result<PathBuf> {
        let path = match (explicit, &opts.bin_dir) {
            (Some(p), _) => p.clone(),
            (None, Some(dir)) => dir.join(name),
            (None, None) => paths::sibling_bin(name)?,
        };
        paths::require_executable(name, &path)
            .with_context(|| format!("{name} is needed (build it, or run with --no-agent)"))?;
        Ok(path)
    };
    let lab = std::env::current_exe().context("locate ambient-lab")?;
    let (cni_plugin, agent, ztunnel_init) = if opts.agent {
        let plugin = find("ambient-cni", &opts.cni_plugin)?;
        if plugin.file_name().is_none_or(|n| n != "ambient-cni") {
            bail!(
                "the CNI plugin binary must be named ambient-cni (the conflist type), got {}",
                plugin.display()
            );
        }
        (
            Some(plugin),
            Some(find("ambient-agent", &opts.agent_bin)?),
            Some(find("ztunnel-init", &opts.ztunnel_init_bin)?),
        )
    } else {
        (None, None, None)
    };
    let plugin_dir = match &cni_plugin {
        Some(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
        None => paths::exe_dir()?,
    };
    let cni_path = format!("{}:{}", plugin_dir.display(), cni::SYSTEM_CNI_DIR);
    let cniclient = cni::ensure_client()?;
    let ztunnel = match (opts.agent, opts.dataplane) {
        (true, Dataplane::Ztunnel) => Some(find("ztunnel", &None)?),
        _ => None,
    };
    // The lab's waypoint is addressed by its v4 IP (ztunnel's and its own config, the
    // state's types): an ipv6 lab has none.
    let waypoint = match (&ztunnel, opts.waypoint && opts.ip_family.has_v4()) {
        (Some(_), true) => {
            let path = match (&opts.waypoint_bin, &opts.bin_dir) {
                (Some(p), _) => p.clone(),
                (None, Some(dir)) => dir.join(waypoint::BINARY),
                (None, None) => paths::sibling_bin(waypoint::BINARY)?,
            };
            paths::require_executable(waypoint::BINARY, &path).with_context(|| {
                "the waypoint binary is needed (cargo build -p waypoint, or --waypoint-bin PATH; \
                 `up --no-waypoint` makes everything but the waypoint process)"
            })?;
            Some(path)
        }
        _ => None,
    };
    Ok(Binaries {
        lab,
        cniclient,
        cni_path,
        cni_plugin,
        agent,
        ztunnel_init,
        ztunnel,
        waypoint,
    })
}

struct Builder<'a> {
    state: &'a mut LabState,
    opts: &'a UpOptions,
    bins: &'a Binaries,
    rt: &'a tokio::runtime::Runtime,
    progress: &'a Progress,
}

impl Builder<'_> {
    fn build(mut self) -> Result<()> {
        self.nodes()?;
        self.underlay()?;
        for node in &NODES {
            self.node_cni(node)?;
        }
        if self.opts.agent {
            for node in &NODES {
                self.start_agent(node)?;
            }
        }
        for node in &NODES {
            for pod in topology::pods_on(node) {
                self.add_pod(node, pod)?;
            }
        }
        for node in &NODES {
            for pod in topology::pods_on(node).filter(|p| p.serves) {
                self.start_server(node, pod)?;
            }
        }
        if self.opts.ip_family.has_v6() {
            for node in &NODES {
                let netns_name = self.node_state(node)?.netns.clone();
                self.rt
                    .block_on(topology::wait_v6_settled(&netns_name, V6_SETTLE_TIMEOUT))?;
            }
        }
        self.waypoint_topology()?;
        self.service()?;
        if self.opts.agent {
            for node in &NODES {
                self.ztunnel_init(node)?;
            }
        }
        if self.bins.ztunnel.is_some() {
            let config = ztunnel::render_config(self.state, &serde_json::json!([]));
            let path = ztunnel::write_config(&self.run_dir(), &config)?;
            self.state.add_file(&path);
            // One at a time: the first creates the lab CA the second then loads.
            for node in &NODES {
                self.start_ztunnel(node)?;
            }
        }
        // Always written when the lab has a waypoint (tests and `status` look at it); the
        // process only runs with the data plane and without --no-waypoint.
        if self.state.waypoint.is_some() {
            let state = &*self.state;
            let path = waypoint::write(
                state,
                &waypoint::default_routes(),
                &waypoint::default_policies(),
            )?;
            self.state.add_file(&path);
            self.state.save()?;
            if self.bins.waypoint.is_some() {
                self.start_waypoint()?;
            }
        }
        self.state.phase = Phase::Ready;
        self.state.save()
    }

    fn run_dir(&self) -> PathBuf {
        self.state.run_dir.clone()
    }

    /// Creates a netns, records it, sets its sysctls and brings loopback up.
    fn make_netns(&mut self, short: &str, sysctls: &[(&str, String)]) -> Result<String> {
        let name = paths::netns_name(&self.state.prefix, short);
        netns::create_named(&name).with_context(|| format!("create netns {name}"))?;
        self.state.netns.push(name.clone());
        self.state.save()?;
        let pairs: Vec<(&str, &str)> = sysctls.iter().map(|(k, v)| (*k, v.as_str())).collect();
        sysctl::set_in(&name, &pairs)?;
        self.rt.block_on(topology::loopback_up(&name))?;
        Ok(name)
    }

    fn nodes(&mut self) -> Result<()> {
        for node in &NODES {
            let sysctls = topology::node_sysctls(self.opts.rp_filter, self.opts.ip_family);
            let netns = self.make_netns(&node.short(), &sysctls)?;
            self.progress
                .say(format!("node {} netns {netns}", node.name));
        }
        Ok(())
    }

    fn underlay(&mut self) -> Result<()> {
        let [a, b] =
            [&NODES[0], &NODES[1]].map(|n| paths::netns_name(&self.state.prefix, &n.short()));
        let family = self.opts.ip_family;
        self.rt.block_on(async {
            topology::create_underlay(&a, &b).await?;
            topology::configure_underlay(&a, &NODES[0], family).await?;
            topology::configure_underlay(&b, &NODES[1], family).await
        })?;
        let ends = |n: &NodePlan| match family {
            IpFamily::Ipv4 => n.underlay_ip.to_string(),
            IpFamily::Ipv6 => n.underlay_ip6.to_string(),
            IpFamily::Dual => format!("{} ({})", n.underlay_ip, n.underlay_ll),
        };
        self.progress.say(format!(
            "underlay {} ({}): {} <-> {}",
            topology::UNDERLAY_DEV,
            family.as_str(),
            ends(&NODES[0]),
            ends(&NODES[1])
        ));
        Ok(())
    }

    /// Writes the node's conflist and records its CNI and agent layout.
    fn node_cni(&mut self, node: &NodePlan) -> Result<()> {
        let run = self.run_dir();
        let cni_dir = run.join(format!("node{}-cni", node.name));
        let conf_dir = cni_dir.join("net.d");
        let cache_dir = cni_dir.join("cache");
        let ipam_dir = cni_dir.join("ipam");
        for d in [&conf_dir, &cache_dir, &ipam_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let agent_dir = run.join(format!("node{}-agent", node.name));
        let agent = self.opts.agent.then(|| AgentState {
            process: format!("agent-{}", node.letter),
            socket: agent_dir.join("agent.sock"),
            health_addr: agent::HEALTH_ADDR.into(),
            state_dir: agent_dir.join("state"),
            config: agent_dir.join("config.json"),
            tunnel: self.opts.tunnel.clone(),
            log: run.join(format!("node{}-agent.log", node.name)),
        });
        let ambient_conf = agent.as_ref().map(|a| AmbientCniConf {
            agent_socket: a.socket.clone(),
            log_file: run.join(format!("node{}-cni.log", node.name)),
        });
        let family = self.opts.ip_family;
        let conflist = cni::conflist(
            self.opts.primary,
            node,
            family,
            &ipam_dir,
            ambient_conf.as_ref(),
        );
        let conflist_path = conf_dir.join("10-ambient.conflist");
        std::fs::write(&conflist_path, serde_json::to_vec_pretty(&conflist)?)
            .with_context(|| format!("write {}", conflist_path.display()))?;
        self.state.add_file(&cni_dir);
        self.state.add_file(&conflist_path);
        let v4 = |ip: Ipv4Addr| if family.has_v4() { ip } else { no_v4::absent() };
        let ul6 = |n: &NodePlan| match family {
            IpFamily::Ipv4 => None,
            IpFamily::Ipv6 => Some(n.underlay_ip6),
            IpFamily::Dual => Some(n.underlay_ll),
        };
        self.state.nodes.push(NodeState {
            name: node.name.into(),
            netns: paths::netns_name(&self.state.prefix, &node.short()),
            underlay_dev: topology::UNDERLAY_DEV.into(),
            underlay_ip: v4(node.underlay_ip),
            underlay_prefix_len: if family.has_v4() {
                topology::UNDERLAY_PREFIX_LEN
            } else {
                topology::UNDERLAY_PREFIX_LEN6
            },
            peer_underlay_ip: v4(node.peer().underlay_ip),
            pod_cidr: if family.has_v4() {
                node.pod_cidr()
            } else {
                String::new()
            },
            gateway: v4(node.gateway),
            underlay_ip6: ul6(node),
            peer_underlay_ip6: ul6(node.peer()),
            pod_cidr6: family.has_v6().then(|| node.pod_cidr6()),
            gateway6: family.has_v6().then_some(node.gateway6),
            cni: NodeCniState {
                conf_dir,
                conflist: conflist_path,
                network: cni::NETWORK.into(),
                cache_dir,
                ipam_data_dir: ipam_dir,
                cni_path: self.bins.cni_path.clone(),
                log_file: ambient_conf.map(|a| a.log_file),
            },
            agent,
        });
        self.state.save()
    }

    fn start_agent(&mut self, node: &NodePlan) -> Result<()> {
        let ns = self.node_state(node)?;
        let a = ns.agent.clone().context("agent layout missing")?;
        let netns_name = ns.netns.clone();
        let results = ns.cni.cache_dir.join("results").display().to_string();
        let agent_dir = a.socket.parent().context("socket dir")?.to_path_buf();
        std::fs::create_dir_all(&a.state_dir)
            .with_context(|| format!("create {}", a.state_dir.display()))?;
        let opt_out = topology::opted_out(self.opts.waypoint_captured);
        std::fs::write(
            &a.config,
            serde_json::to_vec_pretty(&agent::config(&opt_out))?,
        )
        .with_context(|| format!("write {}", a.config.display()))?;
        self.state.add_file(&agent_dir);
        let bin = self.bins.agent.as_ref().context("no agent binary")?;
        let mut argv = agent::argv(bin, &a.config, &a.socket, &a.state_dir, &a.tunnel);
        argv.extend(["--firewall".to_string(), self.opts.firewall.clone()]);
        // libcni keeps its results under `<cache dir>/results`: what a lost state is rebuilt from.
        argv.extend(["--cni-cache-dir".to_string(), results]);
        let mut child = self.spawn(&a.process, &netns_name, &argv, &a.log)?;
        agent::wait_ready(&netns_name, &a.socket, &mut child, &a.log)?;
        self.progress.say(format!(
            "node {} agent pid {} ready on {}",
            node.name,
            child.id(),
            a.socket.display()
        ));
        Ok(())
    }

    fn node_state(&self, node: &NodePlan) -> Result<&NodeState> {
        self.state
            .node(node.name)
            .with_context(|| format!("node {} is not recorded", node.name))
    }

    fn add_pod(&mut self, node: &NodePlan, plan: &PodPlan) -> Result<()> {
        let id = plan.id(node);
        let family = self.opts.ip_family;
        let netns_name =
            self.make_netns(&id, &topology::pod_sysctls_for(self.opts.rp_filter, family))?;
        let pod = PodState {
            id: id.clone(),
            name: plan.name.into(),
            role: plan.role,
            k8s_name: format!("{}-{}", plan.name, node.letter),
            namespace: plan.namespace.into(),
            uid: random_uuid()?,
            node: node.name.into(),
            netns: netns_name,
            container_id: format!("{}-{id}-{}", self.state.prefix, &random_hex(4)?),
            ifname: "eth0".into(),
            ambient: topology::enrolled(plan, self.opts.waypoint_captured),
            cni_added: true,
            ip: None,
            ip6: None,
            ips: Vec::new(),
            host_veth: None,
            cni_result: None,
            server: None,
            server_port: None,
            service_account: plan.service_account.into(),
            version: (!plan.version.is_empty()).then(|| plan.version.to_string()),
            http_port: None,
            waypoint: None,
        };
        // Recorded before ADD runs: a half-done ADD still gets its DEL.
        self.state.pods.push(pod.clone());
        self.state.save()?;
        let node_state = self.node_state(node)?.clone();
        let result = cni::add(&self.bins.cniclient, &node_state, &pod)?;
        let parsed = cni::parse_addresses(&result)
            .with_context(|| format!("CNI ADD result of pod {id}: {result}"))?;
        let rec = self.state.pod_mut(&id).context("pod vanished from state")?;
        rec.ip = parsed.v4();
        rec.ip6 = parsed.v6();
        rec.ips = parsed.ips.clone();
        rec.host_veth = parsed.host_veth.clone();
        rec.cni_result = Some(result);
        self.state.save()?;
        cni::check_addresses(node, family, &parsed).with_context(|| format!("pod {id}"))?;
        if family.has_v6() {
            self.rt
                .block_on(topology::wait_v6_settled(&pod.netns, V6_SETTLE_TIMEOUT))?;
        }
        let ips: Vec<String> = parsed.ips.iter().map(IpAddr::to_string).collect();
        self.progress.say(format!(
            "pod {id} ({}/{}) {} host veth {}",
            plan.namespace,
            pod.k8s_name,
            ips.join(" "),
            parsed.host_veth.as_deref().unwrap_or("?")
        ));
        Ok(())
    }

    fn start_server(&mut self, node: &NodePlan, plan: &PodPlan) -> Result<()> {
        let id = plan.id(node);
        let pod = self.state.pod(&id).context("pod not recorded")?.clone();
        let name = format!("serve-{id}");
        let log = self.run_dir().join(format!("{id}-serve.log"));
        let mut argv = vec![
            self.bins.lab.display().to_string(),
            "serve".into(),
            "--port".into(),
            SERVER_PORT.to_string(),
            "--http-port".into(),
            HTTP_PORT.to_string(),
            "--name".into(),
            id.clone(),
            "--version".into(),
            plan.version.into(),
        ];
        if self.opts.ip_family.has_v6() {
            argv.push("--ipv6".into());
        }
        let mut child = self.spawn(&name, &pod.netns, &argv, &log)?;
        let rec = self.state.pod_mut(&id).context("pod vanished from state")?;
        rec.server = Some(name.clone());
        rec.server_port = Some(SERVER_PORT);
        rec.http_port = Some(HTTP_PORT);
        self.state.save()?;
        for port in [SERVER_PORT, HTTP_PORT] {
            wait_listening(&pod.netns, port, &mut child, &log)
                .with_context(|| format!("server in pod {id}"))?;
        }
        Ok(())
    }

    /// Records the waypoint (pod `b-waypoint`) and points the reviews workloads at it.
    fn waypoint_topology(&mut self) -> Result<()> {
        if !self.opts.ip_family.has_v4() {
            // No waypoint in an ipv6 lab (see resolve_binaries): b-waypoint is a plain
            // opted-out pod and the reviews Services have no waypoint.
            self.state.waypoint = None;
            self.progress
                .say("no waypoint: the lab's waypoint needs an IPv4 address (--ip-family ipv6)");
            return self.state.save();
        }
        let why = if self.bins.waypoint.is_some() {
            None
        } else if !self.opts.agent {
            Some("--no-agent (no data plane)".to_string())
        } else if self.opts.dataplane != Dataplane::Ztunnel {
            Some(format!("--dataplane {}", self.opts.dataplane.as_str()))
        } else {
            Some("--no-waypoint".to_string())
        };
        plan_waypoint(self.state, why)?;
        self.state.save()
    }

    /// Starts a detached process and records it right away.
    fn spawn(
        &mut self,
        name: &str,
        netns_name: &str,
        argv: &[String],
        log: &Path,
    ) -> Result<Child> {
        let (rec, child) = procs::spawn_detached(name, netns_name, argv, &[], log)?;
        self.state.add_file(log);
        self.state.processes.push(rec);
        self.state.save()?;
        Ok(child)
    }

    /// The Services with kube-proxy-style DNAT for all of them on both nodes.
    fn service(&mut self) -> Result<()> {
        let services = plan_services(self.state)?;
        let per_service: Vec<Vec<service::Dnat>> = services.iter().map(dnat_rules).collect();
        let all: Vec<service::Dnat> = per_service.iter().flatten().cloned().collect();
        // kube-proxy in the mode matching the agent's backend: the iptables backend's
        // coexistence rule (ACCEPT ahead of KUBE-SERVICES) works on iptables-mode Services.
        let iptables = self.opts.firewall == "iptables";
        let script = service::render_all(&all);
        let (ipt4, ipt6) = service::render_iptables(&all);
        for node in &NODES {
            let netns_name = self.node_state(node)?.netns.clone();
            if iptables {
                for (v6, input) in [(false, &ipt4), (true, &ipt6)] {
                    if let Some(input) = input {
                        service::apply_iptables(&netns_name, v6, input)?;
                    }
                }
            } else {
                service::apply(&netns_name, &script)?;
            }
        }
        for (svc, rules) in services.into_iter().zip(&per_service) {
            for rule in rules {
                self.progress.say(format!(
                    "service {} {} (nft table {} {} on nodes {}{})",
                    svc.key(),
                    rule.rule(),
                    if rule.cluster_ip.is_ipv4() {
                        "ip"
                    } else {
                        "ip6"
                    },
                    service::TABLE,
                    svc.nodes.join(","),
                    svc.waypoint
                        .map(|w| format!(", waypoint {w}"))
                        .unwrap_or_default()
                ));
            }
            self.state.services.push(svc);
        }
        self.state.save()
    }

    fn ztunnel_init(&mut self, node: &NodePlan) -> Result<()> {
        let a = self.node_state(node)?.agent.clone().context("no agent")?;
        let id = format!("{}-ztunnel", node.letter);
        let pod_netns = self.state.pod(&id).context("no ztunnel pod")?.netns.clone();
        let log = self.run_dir().join(format!("{id}-init.log"));
        self.state.add_file(&log);
        let bin = self
            .bins
            .ztunnel_init
            .as_ref()
            .context("no ztunnel-init binary")?;
        agent::run_ztunnel_init(
            bin,
            &pod_netns,
            &a.state_dir.join(agent::TUNNEL_STATE_FILE),
            &self.opts.firewall,
            &log,
        )?;
        self.state.save()?;
        self.progress
            .say(format!("ztunnel-init done in {pod_netns}"));
        Ok(())
    }
}

impl Builder<'_> {
    fn start_ztunnel(&mut self, node: &NodePlan) -> Result<()> {
        let id = format!("{}-ztunnel", node.letter);
        let pod_netns = self.state.pod(&id).context("no ztunnel pod")?.netns.clone();
        let bin = self.bins.ztunnel.clone().context("no ztunnel binary")?;
        let log = self.run_dir().join(format!("{id}.log"));
        let argv = ztunnel::argv(&bin, &self.run_dir(), node.name);
        let mut child = self.spawn(&format!("ztunnel-{}", node.letter), &pod_netns, &argv, &log)?;
        ztunnel::wait_ready(&pod_netns, &mut child, &log)
            .with_context(|| format!("ztunnel in {pod_netns}"))?;
        self.progress.say(format!("ztunnel ready in {pod_netns}"));
        Ok(())
    }
}

impl Builder<'_> {
    fn start_waypoint(&mut self) -> Result<()> {
        let wp = self
            .state
            .waypoint
            .clone()
            .context("no waypoint recorded")?;
        let pod_netns = self
            .state
            .pod(&wp.pod)
            .context("no waypoint pod")?
            .netns
            .clone();
        let bin = self.bins.waypoint.clone().context("no waypoint binary")?;
        let argv = waypoint::argv(&bin, &self.run_dir());
        let mut child = self.spawn(&wp.process, &pod_netns, &argv, &wp.log)?;
        waypoint::wait_ready(&pod_netns, wp.ip, &mut child, &wp.log)
            .with_context(|| format!("waypoint in {pod_netns}"))?;
        self.progress.say(format!(
            "waypoint ready in {pod_netns} ({} as {}, config {})",
            wp.ip,
            wp.identity,
            wp.config.display()
        ));
        Ok(())
    }
}

/// How long a netns' v6 addresses may stay tentative (DAD is off: normally no time at all).
const V6_SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// A Service's DNAT rules: one per ClusterIP, to its endpoints' addresses of that family.
pub fn dnat_rules(svc: &ServiceState) -> Vec<service::Dnat> {
    svc.vips()
        .into_iter()
        .map(|vip| service::Dnat {
            cluster_ip: vip,
            port: svc.port,
            backends: svc
                .endpoints()
                .iter()
                .filter_map(|e| match vip {
                    IpAddr::V4(_) => no_v4::present(e.ip).map(IpAddr::V4),
                    IpAddr::V6(_) => e.ip6.map(IpAddr::V6),
                })
                .collect(),
            target_port: svc.target_port,
        })
        .collect()
}

/// The id of a pod of the plan that lives on one node (`reviews-v1` → `a-reviews-v1`).
fn single_pod_id(name: &str) -> Result<String> {
    let plan = topology::plan(name).with_context(|| format!("no pod {name} in the plan"))?;
    let node = NODES
        .iter()
        .find(|n| plan.on(n))
        .with_context(|| format!("pod {name} is on no node"))?;
    Ok(plan.id(node))
}

/// Records the waypoint pod as `state.waypoint` and makes it the workload-level waypoint of
/// the reviews pods. `not_started` says why its process will not run, if it will not.
pub fn plan_waypoint(state: &mut LabState, not_started: Option<String>) -> Result<()> {
    let pod = state
        .pod(&single_pod_id(waypoint::POD_NAME)?)
        .context("waypoint pod not recorded")?
        .clone();
    let ip = pod.ip.context("waypoint pod has no IP")?;
    let mut workloads = Vec::new();
    for p in state.pods.iter_mut().filter(|p| p.role == PodRole::Reviews) {
        p.waypoint = Some(ip);
        workloads.push(p.id.clone());
    }
    let any = |port: u16| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).to_string();
    state.waypoint = Some(WaypointState {
        pod: pod.id.clone(),
        k8s_name: pod.k8s_name.clone(),
        namespace: pod.namespace.clone(),
        node: pod.node.clone(),
        ip,
        service_account: pod.service_account().to_string(),
        identity: waypoint::identity(&pod.namespace, pod.service_account()),
        config: waypoint::config_path(&state.run_dir),
        log: waypoint::log_path(&state.run_dir, &pod.id),
        process: waypoint::PROCESS.into(),
        hbone_addr: SocketAddr::from((ip, waypoint::HBONE_PORT)).to_string(),
        metrics_addr: any(waypoint::METRICS_PORT),
        admin_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, waypoint::ADMIN_PORT)).to_string(),
        readiness_addr: any(waypoint::READINESS_PORT),
        services: waypoint::SERVICES
            .iter()
            .map(|s| format!("{}/{s}", service::SERVICE_NAMESPACE))
            .collect(),
        workloads,
        not_started,
    });
    Ok(())
}

/// The lab's Services from its pods: `demo/app` (b-app:9080), `demo/reviews` (both reviews
/// pods), `demo/reviews-v1`, `demo/reviews-v2` (port 80 → 8080, behind the waypoint when
/// `state.waypoint` is set). All are programmed on every node.
pub fn plan_services(state: &LabState) -> Result<Vec<ServiceState>> {
    let family = state.options.ip_family;
    let endpoint = |id: &str| -> Result<EndpointState> {
        let pod = state
            .pod(id)
            .with_context(|| format!("pod {id} not recorded"))?;
        let ip = match (family.has_v4(), pod.ip) {
            (true, Some(ip)) => ip,
            (true, None) => bail!("pod {id} has no IPv4 address"),
            (false, _) => no_v4::absent(),
        };
        if family.has_v6() && pod.ip6.is_none() {
            bail!("pod {id} has no IPv6 address");
        }
        Ok(EndpointState {
            pod: id.to_string(),
            ip,
            ip6: pod.ip6,
        })
    };
    let waypoint_ip = state.waypoint.as_ref().map(|w| w.ip);
    let app = format!("{}-app", NODES[1].letter);
    let (v1, v2) = (single_pod_id("reviews-v1")?, single_pod_id("reviews-v2")?);
    let specs = [
        (
            service::SERVICE_NAME,
            (service::CLUSTER_IP, service::CLUSTER_IP6),
            SERVER_PORT,
            vec![endpoint(&app)?],
            None,
        ),
        (
            service::REVIEWS,
            (service::REVIEWS_IP, service::REVIEWS_IP6),
            HTTP_PORT,
            vec![endpoint(&v1)?, endpoint(&v2)?],
            waypoint_ip,
        ),
        (
            service::REVIEWS_V1,
            (service::REVIEWS_V1_IP, service::REVIEWS_V1_IP6),
            HTTP_PORT,
            vec![endpoint(&v1)?],
            waypoint_ip,
        ),
        (
            service::REVIEWS_V2,
            (service::REVIEWS_V2_IP, service::REVIEWS_V2_IP6),
            HTTP_PORT,
            vec![endpoint(&v2)?],
            waypoint_ip,
        ),
    ];
    Ok(specs
        .into_iter()
        .map(|(name, (ip, ip6), target, eps, wp)| ServiceState {
            name: name.into(),
            namespace: service::SERVICE_NAMESPACE.into(),
            cluster_ip: if family.has_v4() { ip } else { no_v4::absent() },
            cluster_ip6: family.has_v6().then_some(ip6),
            cluster_ips: family_order(family, ip, ip6),
            port: service::SERVICE_PORT,
            target_port: target,
            backend_pod: eps[0].pod.clone(),
            backend_ip: eps[0].ip,
            nodes: NODES.iter().map(|n| n.name.to_string()).collect(),
            endpoints: eps,
            waypoint: wp,
        })
        .collect())
}

/// The addresses of a family, the primary (v4 in dual) first.
fn family_order(family: IpFamily, v4: Ipv4Addr, v6: Ipv6Addr) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if family.has_v4() {
        out.push(IpAddr::V4(v4));
    }
    if family.has_v6() {
        out.push(IpAddr::V6(v6));
    }
    out
}

/// A lab state as `up` records it (pods with the IPs host-local hands out in creation
/// order, the waypoint, the Services), without making anything: for unit tests.
pub fn planned_state(prefix: &str) -> Result<LabState> {
    planned_state_for(prefix, IpFamily::Ipv4)
}

/// [`planned_state`] for a lab of `family`.
pub fn planned_state_for(prefix: &str, family: IpFamily) -> Result<LabState> {
    let mut state = LabState::new(
        prefix,
        LabOptionsState {
            primary: "ptp".into(),
            dataplane: "ztunnel".into(),
            agent: true,
            tunnel: "auto".into(),
            rp_filter: 1,
            cni_plugin: None,
            agent_bin: None,
            ztunnel_init_bin: None,
            waypoint: family.has_v4(),
            waypoint_bin: None,
            ip_family: family,
        },
    );
    for node in &NODES {
        for (i, plan) in topology::pods_on(node).enumerate() {
            let id = plan.id(node);
            let o = node.pod_net.octets();
            let v4 = Ipv4Addr::new(o[0], o[1], o[2], 2 + i as u8);
            let v6 = Ipv6Addr::from(u128::from(node.pod_net6) + 2 + i as u128);
            let ips = family_order(family, v4, v6);
            state.pods.push(PodState {
                id: id.clone(),
                name: plan.name.into(),
                role: plan.role,
                k8s_name: format!("{}-{}", plan.name, node.letter),
                namespace: plan.namespace.into(),
                uid: format!("uid-{id}"),
                node: node.name.into(),
                netns: paths::netns_name(prefix, &id),
                container_id: format!("{prefix}-{id}"),
                ifname: "eth0".into(),
                ambient: topology::enrolled(plan, false),
                cni_added: true,
                ip: family.has_v4().then_some(v4),
                ip6: family.has_v6().then_some(v6),
                ips,
                host_veth: None,
                cni_result: None,
                server: plan.serves.then(|| format!("serve-{id}")),
                server_port: plan.serves.then_some(SERVER_PORT),
                service_account: plan.service_account.into(),
                version: (!plan.version.is_empty()).then(|| plan.version.to_string()),
                http_port: plan.serves.then_some(HTTP_PORT),
                waypoint: None,
            });
        }
    }
    if family.has_v4() {
        plan_waypoint(&mut state, None)?;
    }
    state.services = plan_services(&state)?;
    Ok(state)
}

/// Waits until `port` accepts on the pod's loopback; fails when the server exits.
fn wait_listening(netns_name: &str, port: u16, child: &mut Child, log: &Path) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("exited ({status})\n{}", procs::log_tail(log, 10));
        }
        let ok = netns::run_in(&netns::named_path(netns_name), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "not listening on {addr} after 10s\n{}",
                procs::log_tail(log, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf)
}

fn random_hex(bytes: usize) -> Result<String> {
    let raw = random_bytes::<16>()?;
    Ok(raw[..bytes.min(16)]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A version-4 UUID, as Kubernetes gives pods.
fn random_uuid() -> Result<String> {
    let mut b = random_bytes::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}
