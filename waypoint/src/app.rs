//! Wiring: identity, state, the HBONE listener, side ports, reload and certificate rotation;
//! drain on shutdown. The data plane runs on the runtime `start` is called from, the side
//! ports and background work on `side` (as in ztunnel).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use ztunnel::admin;
use ztunnel::drain::{Drain, Stopper};
use ztunnel::identity::SecretManager;
use ztunnel::metrics::Metrics;
use ztunnel::proxy::pool::{Pool, PoolConfig};
use ztunnel::tls::TlsContext;

use crate::admin::WaypointAdmin;
use crate::config::Config;
use crate::metrics::HttpMetrics;
use crate::proxy::upstream::Upstream;
use crate::proxy::{server, Inputs};
use crate::state::StateHandle;

/// The addresses the listeners really bound.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BoundAddrs {
    pub hbone: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

pub struct Running {
    pub addrs: BoundAddrs,
    pub state: StateHandle,
    pub metrics: Arc<Metrics>,
    pub hbone: Arc<Pool>,
    stopper: Stopper,
}

impl Running {
    /// Stops accepting, fails readiness, lets open tunnels finish (up to the drain timeout).
    /// True if nothing was cut.
    pub async fn shutdown(self) -> bool {
        self.stopper.stop().await
    }
}

pub async fn start(cfg: Config, side: Handle) -> anyhow::Result<Running> {
    let cfg = Arc::new(cfg);
    let background = CancellationToken::new();
    let state = match (&cfg.kube, &cfg.config_file) {
        (Some(k), _) => from_kube(k, &cfg.trust_domain, &side, &background).await?,
        (None, Some(f)) => StateHandle::load(f, &cfg.trust_domain)
            .with_context(|| format!("config {}", f.display()))?,
        (None, None) => anyhow::bail!("--config is required (or --kube)"),
    };
    let manager = Arc::new(SecretManager::from_source(
        &cfg.cert_source,
        &cfg.trust_domain,
        cfg.cert_lifetime,
    )?);
    let me = state.get().identity().clone();
    manager.set_wanted([me.clone()].into());
    manager.refresh(SystemTime::now());
    manager
        .fetch(&me)
        .with_context(|| format!("the waypoint's certificate ({me})"))?;
    let tls = Arc::new(TlsContext::new(manager.clone()).context("trust anchors")?);
    let hbone = Arc::new(Pool::new(
        PoolConfig {
            max_streams: 100,
            spread: cfg.worker_threads,
            idle_timeout: cfg.idle_timeout,
            connect_timeout: cfg.connect_timeout,
            // The waypoint speaks from its own address.
            transparent: false,
        },
        tls.clone(),
    ));
    let upstream = Arc::new(Upstream::new(
        hbone.clone(),
        me.clone(),
        state.get().me.workload_ips.clone(),
        cfg.connect_timeout,
        cfg.idle_timeout,
    ));
    let (http_metrics, metrics) = HttpMetrics::new();
    let metrics = Arc::new(metrics);
    let drain = Drain::new();

    let bind = |addr: SocketAddr, what: &str| {
        ztunnel::socket::listen(addr, false).with_context(|| format!("{what} listener {addr}"))
    };
    let hbone_ls = ztunnel::socket::listen_all(&cfg.hbone_addrs, false, "HBONE")?;
    let admin_l = bind(cfg.admin_addr, "admin")?;
    let metrics_l = bind(cfg.metrics_addr, "metrics")?;
    let readiness_l = bind(cfg.readiness_addr, "readiness")?;
    let addrs = BoundAddrs {
        // listen_all never returns an empty set.
        hbone: hbone_ls[0].local_addr()?,
        admin: admin_l.local_addr()?,
        metrics: metrics_l.local_addr()?,
        readiness: readiness_l.local_addr()?,
    };
    let inputs = Arc::new(Inputs {
        cfg: cfg.clone(),
        state: state.clone(),
        tls,
        metrics: metrics.clone(),
        http_metrics,
        upstream: upstream.clone(),
        drain: drain.clone(),
    });
    for l in hbone_ls {
        drain.spawn_listener(server::serve(inputs.clone(), ztunnel::socket::to_tokio(l)?));
    }
    tokio::spawn(hbone.clone().reaper(background.clone()));
    {
        let (up, stop) = (upstream.clone(), background.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => up.reap(),
                }
            }
        });
    }

    // Background: the config file, the certificate.
    if let Some(path) = cfg.config_file.clone() {
        let st = state.clone();
        side.spawn(ztunnel::state::poll_file(
            path.clone(),
            cfg.config_poll,
            background.clone(),
            move || {
                let _ = st.reload(&path);
            },
        ));
    }
    side.spawn(rotate(manager.clone(), background.clone()));

    let ready = Arc::new(AtomicBool::new(false));
    let admin_inputs = Arc::new(WaypointAdmin {
        cfg: cfg.clone(),
        state: state.clone(),
        manager,
        hbone: hbone.clone(),
        upstream,
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
    ready.store(true, Ordering::Release);
    let st = state.get();
    tracing::info!(identity = %me, services = ?st.served, routes = st.routes.attachments.len(),
        policies = st.policies.len(), addrs = ?addrs, "waypoint ready");
    Ok(Running {
        addrs,
        state,
        metrics,
        hbone,
        stopper: Stopper {
            drain,
            background,
            timeout: cfg.drain_timeout,
        },
    })
}

/// Kubernetes mode: starts the watchers on the side runtime and waits for the first complete
/// state (the waypoint is not ready, and its listeners are not bound, before it); then keeps
/// the handle current.
async fn from_kube(
    k: &crate::config::KubeConfig,
    trust_domain: &str,
    side: &Handle,
    stop: &CancellationToken,
) -> anyhow::Result<StateHandle> {
    let params = ztunnel::discovery::Params {
        cluster_domain: k.cluster_domain.clone(),
        excluded_namespaces: k.excluded_namespaces.iter().cloned().collect(),
    };
    let (url, who, td, st) = (
        k.api_url.clone(),
        k.who.clone(),
        trust_domain.to_string(),
        stop.clone(),
    );
    let kube = side
        .spawn(async move {
            let client = ztunnel::discovery::client(url.as_deref()).await?;
            anyhow::Ok(crate::kube::start(client, params, who, td, st))
        })
        .await
        .context("Kubernetes watchers")??;
    tracing::info!(
        api = k.api_url.as_deref().unwrap_or("in-cluster / KUBECONFIG"),
        gateway = %format!("{}/{}", k.who.gateway_namespace, k.who.gateway_name),
        pod = %k.who.pod_name,
        "Kubernetes mode: waiting for the first complete sync"
    );
    let mut states = kube.states;
    let first = states
        .wait_for(|s| s.is_some())
        .await
        .context("Kubernetes watchers stopped")?
        .clone()
        .expect("a state");
    let handle = StateHandle::from_state(first, trust_domain);
    let (h, status, stop) = (handle.clone(), kube.status.clone(), stop.clone());
    h.set_discovery_status(status.lock().unwrap_or_else(|e| e.into_inner()).clone());
    side.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = states.changed() => {
                    if r.is_err() { return }
                    let st = states.borrow_and_update().clone();
                    if let Some(st) = st {
                        if let Err(e) = h.set_discovered(st) {
                            tracing::error!(error = %e, "discovered state refused; keeping the current one");
                        }
                    }
                }
                _ = tick.tick() => {}
            }
            h.set_discovery_status(status.lock().unwrap_or_else(|e| e.into_inner()).clone());
        }
    });
    Ok(handle)
}

/// Rotates the waypoint's certificate at half-life.
async fn rotate(manager: Arc<SecretManager>, stop: CancellationToken) {
    loop {
        let next = manager
            .next_rotation(SystemTime::now())
            .unwrap_or(Duration::from_secs(5))
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
        manager.refresh(SystemTime::now());
    }
}
