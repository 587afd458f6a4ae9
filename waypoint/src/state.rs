//! The waypoint's view: who it is, the mesh (ztunnel's workloads and services, built by
//! ztunnel's own [`State`]), the services it serves, its routes and policies; one immutable
//! snapshot, swapped as a whole when the file changes (a bad file keeps the last good one).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use serde::Serialize;
use ztunnel::config::{read_file, ConfigError, LocalConfig};
use ztunnel::identity::Identity;
use ztunnel::state::{Service, State, Workload};

use crate::authz::Policy;
use crate::config::{parse_file, WaypointFile};
use crate::route::{GatewayName, RouteTable};

/// Where a CONNECT the waypoint accepted goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A service VIP:port this waypoint serves.
    Service(Arc<Service>, u16),
    /// A workload address:port whose waypoint this is.
    Workload(Arc<Workload>, u16),
}

impl Destination {
    pub fn port(&self) -> u16 {
        match self {
            Destination::Service(_, p) | Destination::Workload(_, p) => *p,
        }
    }
}

/// Why a CONNECT is refused (answered 400: the waypoint is never an open proxy).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotServed {
    #[error("{0} is not a service or workload this waypoint serves")]
    Unknown(SocketAddr),
    #[error("service {0} has no port {1}")]
    NoSuchPort(String, u16),
}

#[derive(Debug)]
pub struct WaypointState {
    /// The waypoint's own workload.
    pub me: Arc<Workload>,
    pub mesh: State,
    /// Keys (`<namespace>/<hostname>`) of the services whose waypoint we are.
    pub served: BTreeSet<String>,
    pub routes: RouteTable,
    pub policies: Vec<Policy>,
}

impl WaypointState {
    pub fn identity(&self) -> &Identity {
        &self.me.identity
    }

    /// Is `wp` this waypoint (its address, or a waypoint service it is an endpoint of)?
    fn is_me(&self, wp: &ztunnel::config::WaypointRef) -> bool {
        self.mesh.is_waypoint_of(&self.me, wp)
    }

    /// Validates and indexes a parsed file. Errors name the field.
    pub fn build(file: &WaypointFile, trust_domain: &str) -> Result<WaypointState, ConfigError> {
        let who = file.waypoint.as_ref().ok_or_else(|| {
            ConfigError::invalid(
                "waypoint",
                "required: {name, namespace} of this waypoint's entry in `workloads`",
            )
        })?;
        let cfg = LocalConfig {
            workloads: file.workloads.clone(),
            services: file.services.clone(),
            policies: Vec::new(),
        };
        // The node does not matter here: the waypoint serves no workload of its own.
        let mesh = State::build(&cfg, trust_domain, "")?;
        let me = mesh
            .workloads
            .iter()
            .find(|w| w.name == who.name && w.namespace == who.namespace)
            .cloned()
            .ok_or_else(|| {
                ConfigError::invalid(
                    "waypoint",
                    format!(
                        "no workload {}/{} in `workloads` (the waypoint's own entry: its IPs and service account)",
                        who.namespace, who.name
                    ),
                )
            })?;
        let served: BTreeSet<String> = mesh
            .services
            .iter()
            .filter(|s| {
                s.waypoint
                    .as_ref()
                    .is_some_and(|w| mesh.is_waypoint_of(&me, w))
            })
            .map(|s| s.key())
            .collect();
        let gateway = GatewayName {
            namespace: &who.namespace,
            name: &who.name,
        };
        let routes =
            RouteTable::build(&file.routes, &mesh, &gateway, |s| served.contains(&s.key()))?;
        let policies = file
            .policies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Policy::compile(p, (&who.namespace, &who.name), &format!("policies[{i}]"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut keys = std::collections::HashSet::new();
        for (i, p) in policies.iter().enumerate() {
            if !keys.insert(p.key()) {
                return Err(ConfigError::invalid(
                    format!("policies[{i}]"),
                    format!("duplicate policy {}", p.key()),
                ));
            }
        }
        Ok(WaypointState {
            me,
            mesh,
            served,
            routes,
            policies,
        })
    }

    /// What a CONNECT to `authority` asks for, if this waypoint serves it.
    pub fn destination(&self, authority: SocketAddr) -> Result<Destination, NotServed> {
        if let Some(svc) = self.mesh.service_by_vip(authority.ip()) {
            if !self.served.contains(&svc.key()) {
                return Err(NotServed::Unknown(authority));
            }
            if !svc.ports.is_empty() && !svc.ports.contains_key(&authority.port()) {
                return Err(NotServed::NoSuchPort(svc.key(), authority.port()));
            }
            return Ok(Destination::Service(svc.clone(), authority.port()));
        }
        match self.mesh.workload_by_ip(authority.ip()) {
            Some(w) if w.waypoint.as_ref().is_some_and(|wp| self.is_me(wp)) => {
                Ok(Destination::Workload(w.clone(), authority.port()))
            }
            _ => Err(NotServed::Unknown(authority)),
        }
    }

    /// The policies that apply to requests for `svc` (a service's namespace and name).
    pub fn policies_for<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies
            .iter()
            .filter(move |p| p.applies_to(namespace, name))
    }

    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "identity": self.me.identity,
            "workload": self.me,
            "servedServices": self.served,
            "workloadsServed": self.mesh.workloads.iter()
                .filter(|w| w.waypoint.as_ref().is_some_and(|wp| self.is_me(wp)))
                .map(|w| w.uid.clone()).collect::<Vec<_>>(),
            "routes": self.routes,
            "policies": self.policies,
            "workloads": self.mesh.workloads,
            "services": self.mesh.services,
        })
    }
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadStatus {
    pub generation: u64,
    pub loaded_at: Option<String>,
    /// The last reload's error (cleared by a good reload).
    pub last_error: Option<String>,
    /// Kubernetes mode: what the watchers have seen ([`crate::kube`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<serde_json::Value>,
}

/// The current snapshot, shared by every connection: each request reads it anew, so a route
/// or policy change applies to open keep-alive connections too.
#[derive(Clone)]
pub struct StateHandle {
    current: Arc<RwLock<Arc<WaypointState>>>,
    status: Arc<Mutex<LoadStatus>>,
    trust_domain: String,
}

pub fn read(path: &Path, trust_domain: &str) -> Result<WaypointState, ConfigError> {
    WaypointState::build(&parse_file(&read_file(path)?)?, trust_domain)
}

impl StateHandle {
    pub fn load(path: &Path, trust_domain: &str) -> Result<StateHandle, ConfigError> {
        Ok(Self::from_state(
            Arc::new(read(path, trust_domain)?),
            trust_domain,
        ))
    }

    /// Kubernetes mode: the first state built from the API server.
    pub fn from_state(st: Arc<WaypointState>, trust_domain: &str) -> StateHandle {
        StateHandle {
            current: Arc::new(RwLock::new(st)),
            status: Arc::new(Mutex::new(LoadStatus {
                generation: 1,
                loaded_at: Some(ztunnel::identity::rfc3339(SystemTime::now())),
                last_error: None,
                discovery: None,
            })),
            trust_domain: trust_domain.to_string(),
        }
    }

    /// Kubernetes mode: a new state from the API server. As with a reload, the identity may
    /// not change under running tunnels (the state stays, the error shows in the dump).
    pub fn set_discovered(&self, st: Arc<WaypointState>) -> Result<(), ConfigError> {
        let cur = self.get();
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if st.me.identity != cur.me.identity {
            let e = ConfigError::invalid(
                "waypoint",
                format!(
                    "the identity changed from {} to {}: restart the waypoint to change who it is",
                    cur.me.identity, st.me.identity
                ),
            );
            status.last_error = Some(e.to_string());
            return Err(e);
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = st;
        status.generation += 1;
        status.loaded_at = Some(ztunnel::identity::rfc3339(SystemTime::now()));
        status.last_error = None;
        Ok(())
    }

    /// Kubernetes mode: what `/config_dump` shows under `configFile.discovery`.
    pub fn set_discovery_status(&self, v: serde_json::Value) {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .discovery = Some(v);
    }

    pub fn get(&self) -> Arc<WaypointState> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn status(&self) -> LoadStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the file; on any error the current state stays and the error is kept for the
    /// dump. The waypoint's identity may not change under running tunnels: a file naming
    /// another identity is refused the same way.
    pub fn reload(&self, path: &Path) -> Result<(), ConfigError> {
        let res = read(path, &self.trust_domain).and_then(|st| {
            let cur = self.get();
            if st.me.identity != cur.me.identity {
                return Err(ConfigError::invalid(
                    "waypoint",
                    format!(
                        "the identity changed from {} to {}: restart the waypoint to change who it is",
                        cur.me.identity, st.me.identity
                    ),
                ));
            }
            Ok(st)
        });
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match res {
            Ok(st) => {
                tracing::info!(path = %path.display(), services = st.served.len(),
                    routes = st.routes.attachments.len(), policies = st.policies.len(), "config reloaded");
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(st);
                status.generation += 1;
                status.loaded_at = Some(ztunnel::identity::rfc3339(SystemTime::now()));
                status.last_error = None;
                Ok(())
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "config reload failed; keeping the last good config");
                status.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const FILE: &str = r#"
waypoint: {name: waypoint, namespace: demo}
workloads:
- {name: waypoint, namespace: demo, serviceAccount: waypoint, workloadIps: [10.0.0.9], protocol: HBONE, node: b}
- {name: client, namespace: demo, serviceAccount: client, workloadIps: [10.0.0.1], protocol: HBONE, node: a}
- {name: r1, namespace: demo, serviceAccount: reviews, workloadIps: [10.0.1.1], protocol: HBONE, node: a, waypoint: {address: 10.0.0.9}, services: {demo/reviews.demo.svc.cluster.local: {}}}
services:
- {name: reviews, namespace: demo, hostname: reviews.demo.svc.cluster.local, vips: [10.96.0.20], ports: {80: 8080}, waypoint: {address: 10.0.0.9}}
- {name: other, namespace: demo, hostname: other.demo.svc.cluster.local, vips: [10.96.0.30], ports: {80: 80}}
"#;

    pub fn state(extra: &str) -> Result<WaypointState, ConfigError> {
        WaypointState::build(&parse_file(&format!("{FILE}{extra}"))?, "cluster.local")
    }

    #[test]
    fn serves_only_its_services_and_workloads() {
        let st = state("").unwrap();
        assert_eq!(
            st.identity().to_string(),
            "spiffe://cluster.local/ns/demo/sa/waypoint"
        );
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(
            matches!(st.destination(sa("10.96.0.20:80")), Ok(Destination::Service(s, 80)) if s.name == "reviews")
        );
        assert_eq!(
            st.destination(sa("10.96.0.20:81")).unwrap_err(),
            NotServed::NoSuchPort("demo/reviews.demo.svc.cluster.local".into(), 81)
        );
        // Another service, a workload without this waypoint, an unknown address: never.
        for a in [
            "10.96.0.30:80",
            "10.0.0.1:8080",
            "1.2.3.4:80",
            "10.0.0.9:15008",
        ] {
            assert!(st.destination(sa(a)).is_err(), "{a}");
        }
        assert!(
            matches!(st.destination(sa("10.0.1.1:8080")), Ok(Destination::Workload(w, 8080)) if w.name == "r1")
        );
    }

    #[test]
    fn the_waypoint_must_be_a_workload() {
        let text = FILE.replace(
            "waypoint: {name: waypoint, namespace: demo}",
            "waypoint: {name: nobody, namespace: demo}",
        );
        let e = WaypointState::build(&parse_file(&text).unwrap(), "cluster.local").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("waypoint: no workload demo/nobody"),
            "{e}"
        );
        let text = FILE.replace("waypoint: {name: waypoint, namespace: demo}\n", "");
        let e = WaypointState::build(&parse_file(&text).unwrap(), "cluster.local").unwrap_err();
        assert!(e.to_string().starts_with("waypoint: required"), "{e}");
    }

    #[test]
    fn a_bad_reload_keeps_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.yaml");
        std::fs::write(&path, FILE).unwrap();
        let h = StateHandle::load(&path, "cluster.local").unwrap();
        std::fs::write(&path, format!("{FILE}routes: [{{name: r, namespace: demo, parentRefs: [{{kind: Service, name: nope}}]}}]\n")).unwrap();
        let e = h.reload(&path).unwrap_err();
        assert!(
            e.to_string().starts_with("routes[0].parentRefs[0].name"),
            "{e}"
        );
        assert_eq!(h.status().generation, 1);
        assert!(h.status().last_error.is_some());
        assert_eq!(h.get().served.len(), 1);
        // Another identity is refused too.
        std::fs::write(
            &path,
            FILE.replace("serviceAccount: waypoint", "serviceAccount: other"),
        )
        .unwrap();
        assert!(h
            .reload(&path)
            .unwrap_err()
            .to_string()
            .contains("identity changed"));
        std::fs::write(
            &path,
            format!("{FILE}policies: [{{name: p, namespace: demo}}]\n"),
        )
        .unwrap();
        h.reload(&path).unwrap();
        assert_eq!(h.status().generation, 2);
        assert!(h.status().last_error.is_none());
        assert_eq!(h.get().policies.len(), 1);
    }
}
