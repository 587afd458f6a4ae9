//! ambient-agent: owns the node's redirection state (tunnels, rules, routes, nftables).

mod config;
mod health;
mod install_cni;
mod kube;
mod membership;
mod node;
mod ops;
mod recover;
mod server;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambient_net::firewall::FirewallMode;
use ambient_net::model::TunnelMode;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;
use tracing::{error, info, warn};

/// When the pass after the start runs (see [`run`]).
const STARTUP_RECHECK: Duration = Duration::from_secs(3);

#[derive(Parser)]
#[command(
    name = "ambient-agent",
    version,
    about = "ambient-node agent: node redirection state"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the Run variant's size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: adopt and converge the kernel state, then serve the CNI plugin.
    Run {
        /// Standalone membership config (JSON). Required unless --kube; with --kube only its
        /// excludedNamespaces are used.
        #[arg(long, env = "AMBIENT_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, default_value = ambient_net::consts::DEFAULT_AGENT_SOCKET)]
        socket: PathBuf,
        #[arg(long, default_value = "/var/run/ambient/state")]
        state_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:15120")]
        health_addr: SocketAddr,
        /// auto: Geneve, or VXLAN with the same VNIs and port when the kernel has no Geneve.
        #[arg(long, default_value = "auto")]
        tunnel: TunnelMode,
        /// The tunnels' UDP port; the next free one is used when it is taken.
        #[arg(long, default_value_t = ambient_net::consts::TUNNEL_PORT)]
        tunnel_port: u16,
        /// auto: nftables when the kernel and `nft` have it, else iptables + ipset. Recorded
        /// in the state, so a restart keeps the backend.
        #[arg(long, default_value = "auto")]
        firewall: FirewallMode,
        /// The runtime's CNI cache (libcni's `results` directory): what a lost or damaged
        /// state directory is rebuilt from.
        #[arg(long, default_value = "/var/lib/cni/results")]
        cni_cache_dir: PathBuf,
        /// Seconds between full reconciles that repair drift.
        #[arg(long, default_value_t = 30)]
        resync: u64,
        /// Remove everything on SIGTERM (uninstall); by default state stays so traffic flows.
        #[arg(long)]
        cleanup_on_exit: bool,
        #[command(flatten)]
        kube: kube::KubeArgs,
    },
    /// Put the ambient-cni plugin into the node's CNI chain (and keep it there with --watch).
    InstallCni(install_cni::Args),
    /// The path of one connection through this node, hop by hop, from the kernel now.
    Explain(ops::explain::Args),
    /// Check this node's kernel, sysctls, CNI chain, ztunnel and drift; non-zero when unwell.
    Doctor(ops::doctor::Args),
    /// Remove every link, rule, route, nft table and saved state the agent created.
    Cleanup {
        #[arg(long, default_value = "/var/run/ambient/state")]
        state_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    ambient_net::logging::init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Run {
                config,
                socket,
                state_dir,
                health_addr,
                tunnel,
                tunnel_port,
                firewall,
                cni_cache_dir,
                resync,
                cleanup_on_exit,
                kube,
            } => {
                run(
                    config,
                    socket,
                    state_dir,
                    health_addr,
                    tunnel,
                    tunnel_port,
                    firewall,
                    cni_cache_dir,
                    resync,
                    cleanup_on_exit,
                    kube,
                )
                .await
            }
            Cmd::InstallCni(args) => install_cni::run(args).await,
            Cmd::Explain(args) => ops::explain::run(args).await,
            Cmd::Doctor(args) => ops::doctor::run(args).await,
            Cmd::Cleanup { state_dir } => cleanup(state_dir).await,
        }
    });
    if let Err(e) = &r {
        error!("{e:#}");
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn run(
    config: Option<PathBuf>,
    socket: PathBuf,
    state_dir: PathBuf,
    health_addr: SocketAddr,
    tunnel: TunnelMode,
    tunnel_port: u16,
    firewall: FirewallMode,
    cni_cache_dir: PathBuf,
    resync: u64,
    cleanup_on_exit: bool,
    kube_args: kube::KubeArgs,
) -> anyhow::Result<()> {
    let config = config.as_deref().map(config::Config::load).transpose()?;
    let mut kube_mode = None;
    let membership = if kube_args.kube {
        if config
            .as_ref()
            .is_some_and(|c| !c.ambient_namespaces.is_empty() || !c.opt_out_pods.is_empty())
        {
            warn!("--kube: ambientNamespaces and optOutPods of --config are ignored (labels and annotations decide); only excludedNamespaces is used");
        }
        let excluded = config.map(|c| c.excluded_namespaces).unwrap_or_default();
        let policy = kube_args.policy(&excluded)?;
        info!(node = %policy.node_name, ztunnel_namespace = %policy.ztunnel_namespace,
              ztunnel_label = %format!("{}={}", policy.ztunnel_label.0, policy.ztunnel_label.1),
              excluded = ?policy.excluded, "Kubernetes mode");
        let client = kube_args.client().await?;
        let cache = kube::cache::Cache::shared(policy);
        kube_mode = Some((client, cache.clone()));
        membership::Membership::Kube(cache)
    } else {
        let Some(config) = config else {
            anyhow::bail!("--config is required (or --kube for Kubernetes mode)");
        };
        membership::Membership::Standalone(config)
    };
    let store = store::Store::new(&state_dir);
    let mut node = node::Node::open(membership, store, tunnel, tunnel_port, firewall).await?;
    node.netns_scan = kube_args.netns_scan();
    if node.rebuild_pending {
        node.rebuild_state(&cni_cache_dir).await;
    }
    info!(
        pods = node.state.pods.len(),
        ztunnel = node.state.ztunnel.is_some(),
        "adopting saved state"
    );
    node.reconcile().await?;
    let node = Arc::new(Mutex::new(node));
    let ready = Arc::new(AtomicBool::new(false));
    health::serve(health_addr, ready.clone(), node.clone()).await?;
    let listener = server::bind(&socket)?;
    tokio::spawn(server::serve(listener, node.clone()));
    match kube_mode {
        // Ready once the controller has made a pass over a synced watch cache.
        Some((client, cache)) => kube::start(
            client,
            cache,
            node.clone(),
            ready.clone(),
            Duration::from_secs(kube_args.kube_sweep.max(1)),
        ),
        None => ready.store(true, Ordering::Release),
    }
    info!(socket = %socket.display(), health = %health_addr, "serving");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(resync.max(1)));
    tick.tick().await;
    // CNI DELs answered while the agent was down may still be finishing as it starts (the
    // primary plugin removes the pod's veth after ambient-cni returned): one more pass soon
    // after the start forgets those pods without waiting a whole resync.
    let recheck = tokio::time::sleep(STARTUP_RECHECK.min(Duration::from_secs(resync.max(1))));
    tokio::pin!(recheck);
    let mut rechecked = false;
    loop {
        tokio::select! {
            _ = &mut recheck, if !rechecked => {
                rechecked = true;
                if let Err(e) = node.lock().await.reconcile().await {
                    error!("recheck after start: {e:#}");
                }
            }
            _ = tick.tick() => {
                if let Err(e) = node.lock().await.reconcile().await {
                    error!("resync: {e:#}");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    ready.store(false, Ordering::Release);
    let _ = std::fs::remove_file(&socket);
    if cleanup_on_exit {
        node.lock().await.cleanup().await?;
    } else {
        info!("stopping; kernel state stays in place for live traffic");
    }
    Ok(())
}

async fn cleanup(state_dir: PathBuf) -> anyhow::Result<()> {
    let store = store::Store::new(&state_dir);
    let mut state = store.load().unwrap_or_default();
    let nl = ambient_net::nl::Netlink::current()?;
    node::cleanup_kernel(&nl).await?;
    for (k, v) in std::mem::take(&mut state.saved_sysctls) {
        ambient_net::sysctl::ensure(&ambient_net::sysctl::Sysctl::new(&k, &v))?;
    }
    store.remove()?;
    info!("cleaned up");
    Ok(())
}
