//! Kubernetes mode (`ztunnel --kube`): workloads and services from the API server.
//!
//! * [`watch`]: four kube-runtime watchers, cluster-wide, list + watch: namespaces (the
//!   ambient label), pods (IPs, service account, node, hostNetwork, opt-out), services
//!   (ClusterIPs, ports) and discovery.k8s.io/v1 EndpointSlices (ready endpoints). Each keeps
//!   its table of the [`facts::Store`] (only the fields used).
//! * [`build`]: the store → the same workloads and services the config file declares
//!   (see there for the rules), handed to [`StateHandle::set_discovered`], which combines
//!   them with the file's policies and swaps the state in as a whole. The proxy is the same
//!   in both modes.
//! * The publisher (here) rebuilds after changes, once a burst has settled, and only once
//!   every resource has been listed completely: the returned flag turns true with the first
//!   complete state, which is when ztunnel starts accepting connections and turns ready.
//!
//! `/config_dump` shows the state as always, and under `configFile.discovery` what discovery
//! has seen: per resource the object count, whether it is listed and how often, the last
//! error; the counts of the last build; notes on what was left out and why.

pub mod build;
pub mod facts;
pub mod watch;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, LocalService, LocalWorkload};
use crate::state::StateHandle;

pub use self::build::Params;
use self::facts::Store;

/// How long a burst of changes may settle before the state is rebuilt (at least; a build that
/// took long stretches it to twice its own time).
pub const SETTLE: Duration = Duration::from_millis(50);
/// Notes kept for the dump.
const MAX_NOTES: usize = 100;

impl Params {
    pub fn from_config(cfg: &Config) -> Params {
        Params {
            cluster_domain: cfg.cluster_domain.clone(),
            excluded_namespaces: cfg.excluded_namespaces.iter().cloned().collect(),
        }
    }
}

/// The API client: `api_url` is plain HTTP without credentials (tests, `kubectl proxy`);
/// otherwise the in-cluster config or KUBECONFIG. Its background task lives on the runtime
/// this is called on.
pub async fn client(api_url: Option<&str>) -> anyhow::Result<Client> {
    // ztunnel's own TLS names its provider; the client's takes the process default: ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match api_url {
        Some(url) => {
            let uri: http::Uri = url
                .parse()
                .with_context(|| format!("--kube-api-url {url}"))?;
            Ok(Client::try_from(kube::Config::new(uri))?)
        }
        None => Client::try_default()
            .await
            .context("Kubernetes client (in-cluster config or KUBECONFIG)"),
    }
}

/// Where discovery delivers what it built: ztunnel's [`StateHandle`], or another consumer of
/// the same workloads and services (the waypoint).
pub trait Sink: Clone + Send + Sync + 'static {
    /// A new complete set of workloads and services.
    fn set_discovered(
        &self,
        workloads: Vec<LocalWorkload>,
        services: Vec<LocalService>,
    ) -> Result<(), ConfigError>;
    /// What `/config_dump` shows under `configFile.discovery`.
    fn set_discovery_status(&self, status: serde_json::Value);
}

impl Sink for StateHandle {
    fn set_discovered(
        &self,
        workloads: Vec<LocalWorkload>,
        services: Vec<LocalService>,
    ) -> Result<(), ConfigError> {
        StateHandle::set_discovered(self, workloads, services)
    }

    fn set_discovery_status(&self, status: serde_json::Value) {
        StateHandle::set_discovery_status(self, status)
    }
}

/// Starts the watchers and the publisher on the current runtime, until `stop`. The receiver
/// turns true once the first complete state is in `state`.
pub fn start<S: Sink>(
    client: Client,
    params: Params,
    state: S,
    stop: CancellationToken,
) -> tokio::sync::watch::Receiver<bool> {
    let store = Arc::new(Mutex::new(Store::default()));
    let changed = Arc::new(Notify::new());
    let (synced_tx, synced_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(watch::run(
        Api::<Namespace>::all(client.clone()),
        store.clone(),
        changed.clone(),
        stop.clone(),
    ));
    tokio::spawn(watch::run(
        Api::<Pod>::all(client.clone()),
        store.clone(),
        changed.clone(),
        stop.clone(),
    ));
    tokio::spawn(watch::run(
        Api::<Service>::all(client.clone()),
        store.clone(),
        changed.clone(),
        stop.clone(),
    ));
    tokio::spawn(watch::run(
        Api::<EndpointSlice>::all(client),
        store.clone(),
        changed.clone(),
        stop.clone(),
    ));
    state.set_discovery_status(status(&store.lock().unwrap(), false, None, &[]));
    tokio::spawn(publish(store, params, state, changed, synced_tx, stop));
    synced_rx
}

/// The last build, for the status.
struct Built {
    at: SystemTime,
    took: Duration,
    workloads: usize,
    services: usize,
}

fn status(
    store: &Store,
    synced: bool,
    built: Option<&Built>,
    notes: &[String],
) -> serde_json::Value {
    json!({
        "synced": synced,
        "resources": {
            "namespaces": store.namespaces.status(),
            "pods": store.pods.status(),
            "services": store.services.status(),
            "endpointslices": store.slices.status(),
        },
        "lastBuild": built.map(|b| json!({
            "at": crate::identity::rfc3339(b.at),
            "ms": b.took.as_secs_f64() * 1000.0,
            "workloads": b.workloads,
            "services": b.services,
        })),
        "notes": &notes[..notes.len().min(MAX_NOTES)],
        "notesTotal": notes.len(),
    })
}

async fn publish<S: Sink>(
    store: Arc<Mutex<Store>>,
    params: Params,
    state: S,
    changed: Arc<Notify>,
    synced: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
) {
    let mut took = Duration::ZERO;
    let mut built: Option<Built> = None;
    let mut notes: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changed.notified() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SETTLE.max(took * 2)) => {}
        }
        let discovered = {
            let mut st = store.lock().unwrap_or_else(|e| e.into_inner());
            if st.synced() && st.dirty {
                st.dirty = false;
                let t0 = Instant::now();
                let d = build::build(&st, &params);
                took = t0.elapsed();
                Some(d)
            } else {
                None
            }
        };
        if let Some(d) = discovered {
            let seen: HashSet<&String> = notes.iter().collect();
            for n in d.notes.iter().filter(|n| !seen.contains(n)) {
                tracing::info!(note = %n, "discovery");
            }
            let (workloads, services) = (d.workloads.len(), d.services.len());
            match state.set_discovered(d.workloads, d.services) {
                Ok(()) => {
                    built = Some(Built {
                        at: SystemTime::now(),
                        took,
                        workloads,
                        services,
                    });
                    notes = d.notes;
                    if !*synced.borrow() {
                        tracing::info!(
                            workloads,
                            services,
                            ms = took.as_millis() as u64,
                            "discovery synced with the API server"
                        );
                        // The status first: whoever waits for the flag sees it synced.
                        let st = store.lock().unwrap_or_else(|e| e.into_inner());
                        state.set_discovery_status(status(&st, true, built.as_ref(), &notes));
                        drop(st);
                        synced.send_replace(true);
                    } else {
                        tracing::debug!(workloads, services, "discovered state updated");
                    }
                }
                // Discovery hands over consistent sets only: this would be a bug.
                Err(e) => {
                    tracing::error!(error = %e, "discovered state refused; keeping the previous one")
                }
            }
        }
        let st = store.lock().unwrap_or_else(|e| e.into_inner());
        state.set_discovery_status(status(&st, *synced.borrow(), built.as_ref(), &notes));
    }
}
