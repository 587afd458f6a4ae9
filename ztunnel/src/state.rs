//! The data plane's view of the mesh: workloads, services and policies from the local config
//! file (and in Kubernetes mode, workloads and services from [`crate::discovery`]), indexed by
//! workload IP and service VIP; swapped as a whole on every change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::config::{
    parse_vip, read_local_config, AppProtocol, ConfigError, HealthStatus, LocalConfig,
    LocalService, LocalWorkload, PolicyScope, Protocol, WaypointRef,
};
use crate::identity::Identity;
use crate::rbac::Policy;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub workload_ips: Vec<IpAddr>,
    pub protocol: Protocol,
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
    /// `"<namespace>/<hostname>"` → (service port → target port overrides).
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    pub authorization_policies: Vec<String>,
    pub capacity: u32,
    pub status: HealthStatus,
    pub identity: Identity,
}

impl Workload {
    pub fn healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }

    /// The workload's address in the family (IPv4 or IPv6) of `like`, if it has one.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.workload_ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: BTreeMap<u16, u16>,
    pub subject_alt_names: Vec<Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub app_protocols: BTreeMap<u16, AppProtocol>,
    /// uids of the workloads that are endpoints of this service.
    pub endpoints: Vec<String>,
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// What `port` speaks (HTTP, detected, unless declared otherwise).
    pub fn app_protocol(&self, port: u16) -> AppProtocol {
        self.app_protocols
            .get(&port)
            .copied()
            .unwrap_or(AppProtocol::Http)
    }

    /// The address a connection to service port `port` reaches on endpoint `ep`: the endpoint's
    /// own target-port override, else the service's target port, else the same port; the
    /// endpoint IP of the port's family when it has several.
    pub fn endpoint_target(&self, ep: &Workload, port: u16, v4: bool) -> SocketAddr {
        let target_port = ep
            .services
            .get(&self.key())
            .and_then(|m| m.get(&port))
            .or_else(|| self.ports.get(&port))
            .copied()
            .unwrap_or(port);
        let ip = ep
            .workload_ips
            .iter()
            .find(|ip| ip.is_ipv4() == v4)
            .unwrap_or(&ep.workload_ips[0]);
        SocketAddr::new(*ip, target_port)
    }
}

/// One immutable snapshot.
#[derive(Debug, Default)]
pub struct State {
    pub node: String,
    pub trust_domain: String,
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    pub policies: Vec<Arc<Policy>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    policy_by_key: HashMap<String, Arc<Policy>>,
    by_key: HashMap<String, Arc<Service>>,
    /// Addresses of the workloads that are some service's or workload's waypoint: they
    /// terminate HBONE themselves.
    waypoints: HashSet<IpAddr>,
}

impl State {
    /// Validates and indexes a parsed file. Errors name the field.
    pub fn build(cfg: &LocalConfig, trust_domain: &str, node: &str) -> Result<State, ConfigError> {
        let mut st = State {
            node: node.to_string(),
            trust_domain: trust_domain.to_string(),
            ..State::default()
        };
        for (i, p) in cfg.policies.iter().enumerate() {
            let field = format!("policies[{i}]");
            let p = Arc::new(Policy::compile(p, &field)?);
            if st.policy_by_key.insert(p.key(), p.clone()).is_some() {
                return Err(ConfigError::invalid(
                    field,
                    format!("duplicate policy {}", p.key()),
                ));
            }
            st.policies.push(p);
        }
        let mut service_keys = HashSet::new();
        for (i, s) in cfg.services.iter().enumerate() {
            let field = format!("services[{i}]");
            nonempty(&s.name, &format!("{field}.name"))?;
            nonempty(&s.namespace, &format!("{field}.namespace"))?;
            nonempty(&s.hostname, &format!("{field}.hostname"))?;
            let key = format!("{}/{}", s.namespace, s.hostname);
            if !service_keys.insert(key.clone()) {
                return Err(ConfigError::invalid(
                    field,
                    format!("duplicate service {key}"),
                ));
            }
            let vips = s
                .vips
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    parse_vip(v).ok_or_else(|| {
                        ConfigError::invalid(
                            format!("{field}.vips[{j}]"),
                            format!("{v:?} is not an IP"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let sans = s
                .subject_alt_names
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    v.parse::<Identity>().map_err(|e| {
                        ConfigError::invalid(format!("{field}.subjectAltNames[{j}]"), e.to_string())
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let svc = Arc::new(Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                hostname: s.hostname.clone(),
                vips,
                ports: s.ports.clone(),
                subject_alt_names: sans,
                waypoint: s.waypoint.clone(),
                app_protocols: s.app_protocols.clone(),
                endpoints: Vec::new(),
            });
            st.services.push(svc);
        }
        let mut uids = HashSet::new();
        for (i, w) in cfg.workloads.iter().enumerate() {
            let field = format!("workloads[{i}]");
            nonempty(&w.name, &format!("{field}.name"))?;
            nonempty(&w.namespace, &format!("{field}.namespace"))?;
            nonempty(&w.service_account, &format!("{field}.serviceAccount"))?;
            nonempty(&w.node, &format!("{field}.node"))?;
            if w.workload_ips.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{field}.workloadIps"),
                    "must not be empty",
                ));
            }
            let uid = w
                .uid
                .clone()
                .unwrap_or_else(|| format!("{}/{}", w.namespace, w.name));
            if !uids.insert(uid.clone()) {
                return Err(ConfigError::invalid(
                    format!("{field}.uid"),
                    format!("duplicate uid {uid}"),
                ));
            }
            for key in w.services.keys() {
                if !service_keys.contains(key) {
                    return Err(ConfigError::invalid(
                        format!("{field}.services"),
                        format!(
                            "unknown service {key:?} (want <namespace>/<hostname> of a service)"
                        ),
                    ));
                }
            }
            for p in &w.authorization_policies {
                if !st.policy_by_key.contains_key(p) {
                    return Err(ConfigError::invalid(
                        format!("{field}.authorizationPolicies"),
                        format!("unknown policy {p:?} (want <namespace>/<name>)"),
                    ));
                }
            }
            let wl = Arc::new(Workload {
                uid,
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                service_account: w.service_account.clone(),
                workload_ips: w.workload_ips.clone(),
                protocol: w.protocol,
                node: w.node.clone(),
                waypoint: w.waypoint.clone(),
                services: w.services.clone(),
                authorization_policies: w.authorization_policies.clone(),
                capacity: w.capacity,
                status: w.status,
                identity: Identity::new(trust_domain, &w.namespace, &w.service_account),
            });
            for ip in &wl.workload_ips {
                if let Some(prev) = st.by_ip.insert(*ip, wl.clone()) {
                    return Err(ConfigError::invalid(
                        format!("{field}.workloadIps"),
                        format!("{ip} is also the address of workload {}", prev.uid),
                    ));
                }
            }
            for key in wl.services.keys() {
                st.endpoints
                    .entry(key.clone())
                    .or_default()
                    .push(wl.clone());
            }
            st.workloads.push(wl);
        }
        // Now that workloads are indexed: VIPs, endpoints, waypoints.
        for (i, svc) in st.services.iter_mut().enumerate() {
            let key = svc.key();
            let eps = st
                .endpoints
                .get(&key)
                .map(|v| v.iter().map(|w| w.uid.clone()).collect());
            Arc::make_mut(svc).endpoints = eps.unwrap_or_default();
            for vip in &svc.vips {
                if let Some(w) = st.by_ip.get(vip) {
                    return Err(ConfigError::invalid(
                        format!("services[{i}].vips"),
                        format!("{vip} is also the address of workload {}", w.uid),
                    ));
                }
                if let Some(prev) = st.by_vip.insert(*vip, svc.clone()) {
                    return Err(ConfigError::invalid(
                        format!("services[{i}].vips"),
                        format!("{vip} is also a VIP of service {}", prev.key()),
                    ));
                }
            }
            st.by_key.insert(key, svc.clone());
        }
        // Waypoints: a workload address, or the VIP of a service whose endpoints are the
        // waypoint's pods (a Gateway's Service: stable across waypoint pod restarts).
        let mut waypoints = HashSet::new();
        for (i, svc) in st.services.iter().enumerate() {
            if let Some(wp) = &svc.waypoint {
                let field = format!("services[{i}].waypoint.address");
                if svc.vips.contains(&wp.address) {
                    return Err(ConfigError::invalid(
                        field,
                        "a service cannot be its own waypoint",
                    ));
                }
                waypoints.extend(st.waypoint_addresses(wp, &field)?);
            }
        }
        for (i, w) in st.workloads.iter().enumerate() {
            if let Some(wp) = &w.waypoint {
                let field = format!("workloads[{i}].waypoint.address");
                let addrs = st.waypoint_addresses(wp, &field)?;
                if w.workload_ips.iter().any(|ip| addrs.contains(ip)) {
                    return Err(ConfigError::invalid(
                        field,
                        "a waypoint cannot be its own waypoint",
                    ));
                }
                waypoints.extend(addrs);
            }
        }
        st.waypoints = waypoints;
        Ok(st)
    }

    /// The addresses that terminate a waypoint's HBONE: the workload's IPs, or those of every
    /// endpoint of the waypoint's service. Neither a workload nor a VIP: an error for `field`.
    fn waypoint_addresses(
        &self,
        wp: &WaypointRef,
        field: &str,
    ) -> Result<Vec<IpAddr>, ConfigError> {
        if self.by_ip.contains_key(&wp.address) {
            return Ok(vec![wp.address]);
        }
        match self.by_vip.get(&wp.address) {
            Some(svc) => Ok(self
                .endpoints(svc)
                .iter()
                .flat_map(|w| w.workload_ips.iter().copied())
                .collect()),
            None => Err(ConfigError::invalid(
                field,
                format!(
                    "{} is neither a workload address nor a service VIP",
                    wp.address
                ),
            )),
        }
    }

    /// The workloads that are `wp`: the workload at its address, or the endpoints of the
    /// service whose VIP it is (healthy or not).
    pub fn waypoint_workloads(&self, wp: &WaypointRef) -> &[Arc<Workload>] {
        if let Some(w) = self.by_ip.get(&wp.address) {
            return std::slice::from_ref(w);
        }
        match self.by_vip.get(&wp.address) {
            Some(svc) => self.endpoints(svc),
            None => &[],
        }
    }

    /// The service whose VIP `wp` names, when it is a service waypoint.
    pub fn waypoint_service(&self, wp: &WaypointRef) -> Option<&Arc<Service>> {
        self.by_vip.get(&wp.address)
    }

    /// Is `w` (one of) the waypoint `wp`?
    pub fn is_waypoint_of(&self, w: &Workload, wp: &WaypointRef) -> bool {
        w.workload_ips.contains(&wp.address)
            || self
                .waypoint_service(wp)
                .is_some_and(|_| self.waypoint_workloads(wp).iter().any(|e| e.uid == w.uid))
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// A workload of this node at `ip`.
    pub fn local_workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip).filter(|w| w.node == self.node)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// A service by `<namespace>/<hostname>`.
    pub fn service_by_key(&self, key: &str) -> Option<&Arc<Service>> {
        self.by_key.get(key)
    }

    /// Is `ip` a waypoint's address (a workload that terminates HBONE itself: a waypoint
    /// workload, or an endpoint of a waypoint service)?
    pub fn is_waypoint(&self, ip: IpAddr) -> bool {
        self.waypoints.contains(&ip)
    }

    /// Behind a waypoint, only the waypoint may send `target_port`'s traffic to `wl`: anything
    /// else has bypassed the L7 policy it enforces. `peer` is the tunnel's identity; plaintext
    /// (15006) has none, so a port behind a waypoint refuses it (a client outside the mesh
    /// reaches such a service through an ingress or by joining the mesh).
    pub fn check_waypoint(
        &self,
        wl: &Workload,
        target_port: u16,
        peer: Option<&Identity>,
    ) -> Result<(), crate::rbac::Denied> {
        let waypoints = self.required_waypoints(wl, target_port);
        match (waypoints.first(), peer) {
            (None, _) => Ok(()),
            (Some(_), Some(id)) if waypoints.contains(id) => Ok(()),
            (Some(wp), _) => Err(crate::rbac::Denied::BypassedWaypoint(wp.to_string())),
        }
    }

    /// The identities a connection to `wl` for `target_port` must come from when it is
    /// behind a waypoint: its own waypoint's, and those of the waypoints of its services whose
    /// target port this is (for a waypoint service: every endpoint's). Empty: not behind a
    /// waypoint.
    pub fn required_waypoints(&self, wl: &Workload, target_port: u16) -> Vec<Identity> {
        let mut ids = Vec::new();
        let mut add = |wp: &WaypointRef| {
            for w in self.waypoint_workloads(wp) {
                if !ids.contains(&w.identity) {
                    ids.push(w.identity.clone());
                }
            }
        };
        if let Some(wp) = &wl.waypoint {
            add(wp);
        }
        for (key, overrides) in &wl.services {
            let Some(svc) = self.by_key.get(key) else {
                continue;
            };
            let Some(wp) = &svc.waypoint else { continue };
            // The target ports this workload serves the service on (no ports declared: any).
            let mut targets = svc
                .ports
                .iter()
                .map(|(p, t)| overrides.get(p).copied().unwrap_or(*t))
                .chain(overrides.values().copied());
            if (svc.ports.is_empty() && overrides.is_empty()) || targets.any(|t| t == target_port) {
                add(wp);
            }
        }
        ids
    }

    /// The endpoints of a service (healthy or not).
    pub fn endpoints(&self, svc: &Service) -> &[Arc<Workload>] {
        self.endpoints
            .get(&svc.key())
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    /// The identities of this node's workloads: the certificates to hold.
    pub fn local_identities(&self) -> HashSet<Identity> {
        self.workloads
            .iter()
            .filter(|w| w.node == self.node)
            .map(|w| w.identity.clone())
            .collect()
    }

    /// The policies that select a workload.
    pub fn policies_for<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies
            .iter()
            .filter(move |p| match p.scope {
                PolicyScope::Global => true,
                PolicyScope::Namespace => p.namespace == w.namespace,
                PolicyScope::WorkloadSelector => w.authorization_policies.contains(&p.key()),
            })
            .map(|p| p.as_ref())
    }

    /// Is `addr` (a destination) one of the node's mesh addresses?
    pub fn is_known(&self, addr: SocketAddr) -> bool {
        self.by_ip.contains_key(&addr.ip()) || self.by_vip.contains_key(&addr.ip())
    }
}

fn nonempty(v: &str, field: &str) -> Result<(), ConfigError> {
    if v.is_empty() {
        Err(ConfigError::invalid(field, "must not be empty"))
    } else {
        Ok(())
    }
}

/// The current snapshot, shared by every task; replaced as a whole by the file watcher (and in
/// Kubernetes mode by discovery).
#[derive(Clone)]
pub struct StateHandle {
    current: Arc<RwLock<Arc<State>>>,
    status: Arc<Mutex<LoadStatus>>,
    changed: watch::Sender<u64>,
    /// What the current state was built from. Held while a new state is built and swapped in,
    /// so a file reload and a discovery update never build from each other's stale input.
    sources: Arc<Mutex<Sources>>,
}

/// The inputs of the state.
#[derive(Debug, Default)]
struct Sources {
    /// The config file's last good contents (in Kubernetes mode: its policies).
    file: LocalConfig,
    /// Kubernetes mode: the discovered workloads and services (the file may not have any).
    discovered: Option<(Vec<LocalWorkload>, Vec<LocalService>)>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadStatus {
    pub generation: u64,
    pub loaded_at: Option<String>,
    /// The config file's last reload error (cleared by a good reload).
    pub last_error: Option<String>,
    /// Kubernetes mode: what discovery has seen (see [`crate::discovery`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<serde_json::Value>,
}

impl StateHandle {
    pub fn new(state: State) -> StateHandle {
        Self::with_sources(state, Sources::default())
    }

    fn with_sources(state: State, sources: Sources) -> StateHandle {
        let status = LoadStatus {
            generation: 1,
            loaded_at: Some(crate::identity::rfc3339(SystemTime::now())),
            last_error: None,
            discovery: None,
        };
        StateHandle {
            current: Arc::new(RwLock::new(Arc::new(state))),
            status: Arc::new(Mutex::new(status)),
            changed: watch::channel(1).0,
            sources: Arc::new(Mutex::new(sources)),
        }
    }

    /// Reads and builds the file: the initial load.
    pub fn load(path: &Path, trust_domain: &str, node: &str) -> Result<StateHandle, ConfigError> {
        let cfg = read_local_config(path)?;
        let st = State::build(&cfg, trust_domain, node)?;
        Ok(Self::with_sources(
            st,
            Sources {
                file: cfg,
                discovered: None,
            },
        ))
    }

    /// Kubernetes mode: no workloads or services until discovery delivers them
    /// ([`StateHandle::set_discovered`]); the optional file holds policies only.
    pub fn load_for_discovery(
        path: Option<&Path>,
        trust_domain: &str,
        node: &str,
    ) -> Result<StateHandle, ConfigError> {
        let file = match path {
            Some(p) => policies_only(read_local_config(p)?)?,
            None => LocalConfig::default(),
        };
        let st = State::build(&file, trust_domain, node)?;
        Ok(Self::with_sources(
            st,
            Sources {
                file,
                discovered: Some(Default::default()),
            },
        ))
    }

    /// Kubernetes mode: a new set of discovered workloads and services, combined with the
    /// file's policies. On an error (discovery hands over only consistent sets, so this would
    /// be a bug) the current state stays.
    pub fn set_discovered(
        &self,
        workloads: Vec<LocalWorkload>,
        services: Vec<LocalService>,
    ) -> Result<(), ConfigError> {
        let mut src = lock(&self.sources);
        let cfg = LocalConfig {
            workloads,
            services,
            policies: src.file.policies.clone(),
        };
        let cur = self.get();
        let st = State::build(&cfg, &cur.trust_domain, &cur.node)?;
        self.swap(st, false);
        src.discovered = Some((cfg.workloads, cfg.services));
        Ok(())
    }

    /// Kubernetes mode: what `/config_dump` shows under `configFile.discovery`.
    pub fn set_discovery_status(&self, status: serde_json::Value) {
        lock(&self.status).discovery = Some(status);
    }

    pub fn get(&self) -> Arc<State> {
        self.current.read().unwrap().clone()
    }

    pub fn status(&self) -> LoadStatus {
        self.status.lock().unwrap().clone()
    }

    /// Notified with the generation after every successful swap.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn replace(&self, st: State) {
        self.swap(st, true);
    }

    fn swap(&self, st: State, file_loaded: bool) {
        *self.current.write().unwrap() = Arc::new(st);
        let gen = {
            let mut s = lock(&self.status);
            s.generation += 1;
            s.loaded_at = Some(crate::identity::rfc3339(SystemTime::now()));
            if file_loaded {
                s.last_error = None;
            }
            s.generation
        };
        self.changed.send_replace(gen);
    }

    /// Re-reads the file; on any error the current state stays and the error is kept for the
    /// dump.
    pub fn reload(&self, path: &Path) -> Result<(), ConfigError> {
        let mut src = lock(&self.sources);
        let cur = self.get();
        let res = read_local_config(path).and_then(|file| match &src.discovered {
            None => {
                let st = State::build(&file, &cur.trust_domain, &cur.node)?;
                Ok((file, st))
            }
            Some((workloads, services)) => {
                let file = policies_only(file)?;
                let cfg = LocalConfig {
                    workloads: workloads.clone(),
                    services: services.clone(),
                    policies: file.policies.clone(),
                };
                let st = State::build(&cfg, &cur.trust_domain, &cur.node)?;
                Ok((file, st))
            }
        });
        match res {
            Ok((file, st)) => {
                tracing::info!(path = %path.display(), workloads = st.workloads.len(),
                    services = st.services.len(), policies = st.policies.len(), "config reloaded");
                self.swap(st, true);
                src.file = file;
                Ok(())
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "config reload failed; keeping the last good config");
                lock(&self.status).last_error = Some(e.to_string());
                Err(e)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kubernetes mode: the file may hold policies only (workloads and services come from the API
/// server). `WorkloadSelector` policies are allowed but select nothing: no discovered workload
/// lists them.
fn policies_only(file: LocalConfig) -> Result<LocalConfig, ConfigError> {
    for (field, n) in [
        ("workloads", file.workloads.len()),
        ("services", file.services.len()),
    ] {
        if n > 0 {
            return Err(ConfigError::invalid(
                field,
                "not allowed with --kube: workloads and services come from the API server, the file holds policies only",
            ));
        }
    }
    for p in &file.policies {
        if p.scope == PolicyScope::WorkloadSelector {
            tracing::warn!(policy = %format!("{}/{}", p.namespace, p.name),
                "a WorkloadSelector policy selects no workload with --kube (use Namespace or Global scope)");
        }
    }
    Ok(file)
}

/// What identifies a version of the file on disk.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Polls the file every `every` and reloads it when it changed, until `stop` fires. A change
/// is loaded once the file has stayed the same for one poll, so a writer caught half-way
/// (truncated, partly written) is never loaded.
pub async fn watch_file(
    handle: StateHandle,
    path: PathBuf,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    poll_file(path.clone(), every, stop, move || {
        let _ = handle.reload(&path);
    })
    .await
}

/// Calls `reload` whenever the file at `path` has changed and then stayed unchanged for one
/// poll (so a file being written is not read half-way), until `stop`.
pub async fn poll_file(
    path: PathBuf,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
    mut reload: impl FnMut() + Send,
) {
    let mut loaded = file_stamp(&path);
    let mut seen = loaded;
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = file_stamp(&path);
        if now.is_some() && now != loaded && now == seen {
            loaded = now;
            reload();
        }
        seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_local_config;

    pub const FILE: &str = r#"
workloads:
- name: client
  namespace: demo
  serviceAccount: sleep
  workloadIps: [10.0.0.1]
  protocol: HBONE
  node: node-a
- name: echo-1
  namespace: demo
  serviceAccount: echo
  workloadIps: [10.0.1.1]
  protocol: HBONE
  node: node-b
  services: {demo/echo.demo.svc.cluster.local: {}}
  authorizationPolicies: [demo/only-sleep]
services:
- name: echo
  namespace: demo
  hostname: echo.demo.svc.cluster.local
  vips: [10.96.0.10]
  ports: {80: 8080}
policies:
- name: only-sleep
  namespace: demo
  scope: WorkloadSelector
  action: Allow
  rules: [{serviceAccounts: [demo/sleep]}]
- name: ns-wide
  namespace: demo
  scope: Namespace
  action: Deny
- name: other-ns
  namespace: prod
  scope: Namespace
  action: Deny
"#;

    fn build(text: &str) -> Result<State, ConfigError> {
        State::build(&parse_local_config(text)?, "cluster.local", "node-a")
    }

    #[test]
    fn indexes_and_selection() {
        let st = build(FILE).unwrap();
        let echo = st.workload_by_ip("10.0.1.1".parse().unwrap()).unwrap();
        assert_eq!(
            echo.identity.to_string(),
            "spiffe://cluster.local/ns/demo/sa/echo"
        );
        assert_eq!(echo.uid, "demo/echo-1");
        assert!(st
            .local_workload_by_ip("10.0.1.1".parse().unwrap())
            .is_none());
        assert!(st
            .local_workload_by_ip("10.0.0.1".parse().unwrap())
            .is_some());
        let svc = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        assert_eq!(st.endpoints(svc).len(), 1);
        assert_eq!(svc.endpoints, vec!["demo/echo-1"]);
        let names: Vec<_> = st.policies_for(echo).map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["only-sleep", "ns-wide"]);
        let client = st.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap();
        let names: Vec<_> = st.policies_for(client).map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["ns-wide"]);
        assert_eq!(
            st.local_identities(),
            [Identity::new("cluster.local", "demo", "sleep")].into()
        );
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let dup = FILE.replace("[10.0.1.1]", "[10.0.0.1]");
        let err = build(&dup).unwrap_err().to_string();
        assert!(err.starts_with("workloads[1].workloadIps"), "{err}");
        let dangling = FILE.replace("{demo/echo.demo.svc.cluster.local: {}}", "{demo/nope: {}}");
        let err = build(&dangling).unwrap_err().to_string();
        assert!(
            err.starts_with("workloads[1].services") && err.contains("demo/nope"),
            "{err}"
        );
        let badpol = FILE.replace("[demo/only-sleep]", "[demo/missing]");
        let err = build(&badpol).unwrap_err().to_string();
        assert!(
            err.starts_with("workloads[1].authorizationPolicies"),
            "{err}"
        );
        let vip = FILE.replace("vips: [10.96.0.10]", "vips: [10.0.1.1]");
        let err = build(&vip).unwrap_err().to_string();
        assert!(err.starts_with("services[0].vips"), "{err}");
        let wp = FILE.replace(
            "  protocol: HBONE\n  node: node-a",
            "  protocol: HBONE\n  node: node-a\n  waypoint: {address: 10.9.9.9}",
        );
        let err = build(&wp).unwrap_err().to_string();
        assert!(err.starts_with("workloads[0].waypoint.address"), "{err}");
    }

    #[test]
    fn bad_reload_keeps_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local.yaml");
        std::fs::write(&path, FILE).unwrap();
        let h = StateHandle::load(&path, "cluster.local", "node-a").unwrap();
        let mut rx = h.subscribe();
        assert_eq!(h.get().workloads.len(), 2);
        std::fs::write(
            &path,
            FILE.replace("workloadIps: [10.0.0.1]", "workloadIPs: [10.0.0.1]"),
        )
        .unwrap();
        let err = h.reload(&path).unwrap_err().to_string();
        assert!(err.contains("workloadIPs"), "{err}");
        assert_eq!(h.get().workloads.len(), 2);
        assert_eq!(h.status().last_error.as_deref(), Some(err.as_str()));
        assert!(!rx.has_changed().unwrap());
        // A good file replaces the state and clears the error.
        std::fs::write(&path, "workloads: []\n").unwrap();
        h.reload(&path).unwrap();
        assert!(h.get().workloads.is_empty());
        assert!(h.status().last_error.is_none());
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 2);
    }

    #[test]
    fn kube_mode_combines_discovery_with_the_file_policies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policies.yaml");
        // The file may hold policies only.
        std::fs::write(&path, FILE).unwrap();
        let err = StateHandle::load_for_discovery(Some(&path), "cluster.local", "node-a")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("workloads: not allowed with --kube"),
            "{err}"
        );
        let full = parse_local_config(FILE).unwrap();
        let policies = |c: &LocalConfig| {
            serde_yaml_ng::to_string(&LocalConfig {
                policies: c.policies.clone(),
                ..LocalConfig::default()
            })
            .unwrap()
        };
        std::fs::write(&path, policies(&full)).unwrap();
        let h = StateHandle::load_for_discovery(Some(&path), "cluster.local", "node-a").unwrap();
        assert!(h.get().workloads.is_empty());
        assert_eq!(h.get().policies.len(), 3);
        // Discovery delivers workloads and services (without WorkloadSelector references).
        let mut workloads = full.workloads.clone();
        workloads[1].authorization_policies.clear();
        h.set_discovered(workloads.clone(), full.services.clone())
            .unwrap();
        assert_eq!(h.get().workloads.len(), 2);
        assert_eq!(h.get().policies.len(), 3);
        // A policy reload keeps the discovered workloads.
        std::fs::write(&path, "policies: []\n").unwrap();
        h.reload(&path).unwrap();
        assert_eq!(h.get().workloads.len(), 2);
        assert!(h.get().policies.is_empty());
        // A bad reload (workloads in the file) keeps everything and is reported; a discovery
        // update does not hide the file's error.
        std::fs::write(&path, FILE).unwrap();
        assert!(h.reload(&path).is_err());
        assert!(h.status().last_error.is_some());
        h.set_discovered(workloads[..1].to_vec(), full.services.clone())
            .unwrap();
        assert_eq!(h.get().workloads.len(), 1);
        assert!(h.get().policies.is_empty());
        assert!(h.status().last_error.is_some());
        // An inconsistent set from discovery is refused and the state stays.
        let mut dup = workloads.clone();
        dup[1].workload_ips = dup[0].workload_ips.clone();
        assert!(h.set_discovered(dup, vec![]).is_err());
        assert_eq!(h.get().workloads.len(), 1);
    }

    #[tokio::test]
    async fn watcher_picks_up_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local.yaml");
        std::fs::write(&path, FILE).unwrap();
        let h = StateHandle::load(&path, "cluster.local", "node-a").unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(watch_file(
            h.clone(),
            path.clone(),
            Duration::from_millis(20),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(&path, "workloads: []\npolicies: []\n").unwrap();
        let mut rx = h.subscribe();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(h.get().workloads.is_empty());
        stop.cancel();
        task.await.unwrap();
    }
}
