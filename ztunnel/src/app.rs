//! Wiring: identity, state, listeners, background tasks; drain on shutdown.
//!
//! The data plane (listeners, connections, pool) runs on the runtime `start` is called from;
//! the side ports (admin, metrics, readiness) and the background tasks may run on another
//! (`main` gives them a small runtime of their own so a busy data plane never starves them).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminInputs};
use crate::config::Config;
use crate::drain::{Drain, Stopper};
use crate::identity::SecretManager;
use crate::metrics::Metrics;
use crate::proxy::pool::{Pool, PoolConfig};
use crate::proxy::{inbound, inbound_passthrough, outbound, Inputs};
use crate::state::{watch_file, StateHandle};
use crate::tls::TlsContext;

/// The addresses the listeners really bound (port 0 becomes a real port). `outbound`,
/// `inbound` and `inbound_plaintext` are each listener's first address; `*_all` every one
/// (an IPv4 and an IPv6 socket by default).
#[derive(Debug, Clone, Serialize)]
pub struct BoundAddrs {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub inbound_plaintext: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    pub outbound_all: Vec<SocketAddr>,
    pub inbound_all: Vec<SocketAddr>,
    pub inbound_plaintext_all: Vec<SocketAddr>,
}

impl BoundAddrs {
    /// The address of `addrs` in the family of `like` (the outbound listener for a v6 client…).
    pub fn of_family(addrs: &[SocketAddr], like: std::net::IpAddr) -> Option<SocketAddr> {
        addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == like.is_ipv4())
    }
}

/// A started ztunnel.
pub struct Running {
    pub addrs: BoundAddrs,
    pub state: StateHandle,
    pub manager: Arc<SecretManager>,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    stopper: Stopper,
}

impl Running {
    /// Stops accepting, fails readiness, lets open connections finish (up to the drain
    /// timeout), then stops the background tasks and side ports. True if nothing was cut.
    pub async fn shutdown(self) -> bool {
        self.stopper.stop().await
    }

    /// Connection tasks still running.
    pub fn active_connections(&self) -> usize {
        self.stopper.drain.active()
    }
}

/// Starts everything. Listeners are bound before this returns.
pub async fn start(cfg: Config, side: Handle) -> anyhow::Result<Running> {
    let cfg = Arc::new(cfg);
    let manager = Arc::new(SecretManager::from_source(
        &cfg.cert_source,
        &cfg.trust_domain,
        cfg.cert_lifetime,
    )?);
    let state = match (&cfg.config_file, cfg.kube) {
        (file, true) => {
            StateHandle::load_for_discovery(file.as_deref(), &cfg.trust_domain, &cfg.node_name)
        }
        (Some(file), false) => StateHandle::load(file, &cfg.trust_domain, &cfg.node_name),
        (None, false) => anyhow::bail!("--config is required (or --kube)"),
    }
    .with_context(|| match &cfg.config_file {
        Some(f) => format!("config {}", f.display()),
        None => "config".to_string(),
    })?;
    manager.set_wanted(state.get().local_identities());
    manager.refresh(SystemTime::now());
    let tls = Arc::new(TlsContext::new(manager.clone()).context("trust anchors")?);
    let metrics = Arc::new(Metrics::new());
    let pool = Arc::new(Pool::new(
        PoolConfig {
            max_streams: cfg.pool_max_streams,
            spread: cfg.pool_spread,
            idle_timeout: cfg.pool_idle_timeout,
            connect_timeout: cfg.connect_timeout,
            transparent: cfg.transparent,
        },
        tls.clone(),
    ));
    let drain = Drain::new();
    let background = CancellationToken::new();

    // Kubernetes mode: discovery on the side runtime (the client's background task too).
    // `open` turns true once its first complete state is in and the certificates of this
    // node's workloads are minted: only then are connections accepted (until then the kernel
    // queues them on the bound listeners) and is ztunnel ready. In file mode it starts true.
    let (open_tx, open) = tokio::sync::watch::channel(!cfg.kube);
    let gate = |serve: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
        let (mut open, stop) = (open.clone(), drain.signal());
        async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = open.wait_for(|o| *o) => if r.is_err() { return },
            }
            serve.await
        }
    };

    let bind = |addr: SocketAddr, transparent: bool, what: &str| {
        crate::socket::listen(addr, transparent).with_context(|| format!("{what} listener {addr}"))
    };
    let t = cfg.transparent;
    let outbound_l = crate::socket::listen_all(&cfg.outbound_addrs, t, "outbound")?;
    let inbound_l = crate::socket::listen_all(&cfg.inbound_addrs, t, "inbound")?;
    let plaintext_l =
        crate::socket::listen_all(&cfg.inbound_plaintext_addrs, t, "inbound plaintext")?;
    let admin_l = bind(cfg.admin_addr, false, "admin")?;
    let metrics_l = bind(cfg.metrics_addr, false, "metrics")?;
    let readiness_l = bind(cfg.readiness_addr, false, "readiness")?;
    let local = |ls: &[std::net::TcpListener]| -> std::io::Result<Vec<SocketAddr>> {
        ls.iter().map(|l| l.local_addr()).collect()
    };
    let (outbound_all, inbound_all, inbound_plaintext_all) = (
        local(&outbound_l)?,
        local(&inbound_l)?,
        local(&plaintext_l)?,
    );
    let addrs = BoundAddrs {
        // listen_all never returns an empty set.
        outbound: outbound_all[0],
        inbound: inbound_all[0],
        inbound_plaintext: inbound_plaintext_all[0],
        admin: admin_l.local_addr()?,
        metrics: metrics_l.local_addr()?,
        readiness: readiness_l.local_addr()?,
        outbound_all,
        inbound_all,
        inbound_plaintext_all,
    };

    if cfg.kube {
        let (url, params) = (
            cfg.kube_api_url.clone(),
            crate::discovery::Params::from_config(&cfg),
        );
        let (st, stop) = (state.clone(), background.clone());
        let mut synced = side
            .spawn(async move {
                let client = crate::discovery::client(url.as_deref()).await?;
                anyhow::Ok(crate::discovery::start(client, params, st, stop))
            })
            .await
            .context("discovery task")??;
        tracing::info!(
            api = cfg
                .kube_api_url
                .as_deref()
                .unwrap_or("in-cluster / KUBECONFIG"),
            "Kubernetes mode: waiting for the first sync before accepting connections"
        );
        let (st, manager) = (state.clone(), manager.clone());
        side.spawn(async move {
            if synced.wait_for(|s| *s).await.is_ok() {
                manager.set_wanted(st.get().local_identities());
                manager.refresh(SystemTime::now());
                open_tx.send_replace(true);
            }
        });
    }

    let inputs = Arc::new(Inputs {
        cfg: cfg.clone(),
        state: state.clone(),
        tls,
        metrics: metrics.clone(),
        pool: pool.clone(),
        drain: drain.clone(),
        limits: crate::proxy::limits::Limits::new(cfg.max_connections_per_source),
        own_addrs: crate::socket::local_addresses(),
        own_ports: {
            let mut ports: Vec<u16> = (addrs.outbound_all.iter())
                .chain(&addrs.inbound_all)
                .chain(&addrs.inbound_plaintext_all)
                .map(|a| a.port())
                .collect();
            ports.sort_unstable();
            ports.dedup();
            ports
        },
    });
    for l in outbound_l {
        let serve = outbound::serve(inputs.clone(), crate::socket::to_tokio(l)?);
        drain.spawn_listener(gate(Box::pin(serve)));
    }
    for l in inbound_l {
        let serve = inbound::serve(inputs.clone(), crate::socket::to_tokio(l)?);
        drain.spawn_listener(gate(Box::pin(serve)));
    }
    for l in plaintext_l {
        let serve = inbound_passthrough::serve(inputs.clone(), crate::socket::to_tokio(l)?);
        drain.spawn_listener(gate(Box::pin(serve)));
    }
    tokio::spawn(pool.clone().reaper(background.clone()));

    // Background: config file, certificates.
    if let Some(file) = &cfg.config_file {
        side.spawn(watch_file(
            state.clone(),
            file.clone(),
            cfg.config_poll,
            background.clone(),
        ));
    }
    // In its own netns (transparent): what the kernel's SYN limit drops before the listeners.
    if cfg.transparent {
        side.spawn(crate::syn_limit::report(
            metrics.clone(),
            background.clone(),
        ));
    }
    side.spawn(refresh_certificates(
        manager.clone(),
        state.clone(),
        background.clone(),
    ));

    let ready = Arc::new(AtomicBool::new(false));
    let admin_inputs = Arc::new(AdminInputs {
        cfg: cfg.clone(),
        state: state.clone(),
        manager: manager.clone(),
        pool: pool.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        draining: drain.signal(),
    });
    admin::spawn_side_ports(
        &side,
        admin_inputs,
        [admin_l, metrics_l, readiness_l],
        background.clone(),
    );
    let announce = {
        let (st, node, transparent) = (state.clone(), cfg.node_name.clone(), cfg.transparent);
        let addrs = addrs.clone();
        move || {
            ready.store(true, Ordering::Release);
            let st = st.get();
            tracing::info!(%node, workloads = st.workloads.len(),
                local_identities = st.local_identities().len(), services = st.services.len(),
                policies = st.policies.len(), transparent, addrs = ?addrs, "ztunnel ready");
        }
    };
    if cfg.kube {
        let mut open = open;
        side.spawn(async move {
            if open.wait_for(|o| *o).await.is_ok() {
                announce();
            }
        });
    } else {
        announce();
    }
    Ok(Running {
        addrs,
        state,
        manager,
        metrics,
        pool,
        stopper: Stopper {
            drain,
            background,
            timeout: cfg.drain_timeout,
        },
    })
}

/// Keeps the certificate store in step with the state (new local workloads, removed ones) and
/// rotates certificates at half-life.
async fn refresh_certificates(
    manager: Arc<SecretManager>,
    state: StateHandle,
    stop: CancellationToken,
) {
    let mut changes = state.subscribe();
    loop {
        let next = manager
            .next_rotation(SystemTime::now())
            .unwrap_or(Duration::from_secs(5))
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
            r = changes.changed() => {
                if r.is_err() { return; }
                manager.set_wanted(state.get().local_identities());
            }
        }
        let changed = manager.refresh(SystemTime::now());
        if !changed.is_empty() {
            tracing::debug!(count = changed.len(), "certificates updated");
        }
    }
}
