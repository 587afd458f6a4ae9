//! The lab's waypoint: an L7 proxy in the `b-waypoint` pod (namespace `demo`, service account
//! `waypoint`) that ztunnel sends the reviews Services' traffic to over HBONE. This module
//! renders its config file (`<run dir>/waypoint-config.yaml`: the same workloads and services
//! ztunnel gets, plus HTTPRoute-shaped `routes` and AuthorizationPolicy-shaped `policies`),
//! runs the `waypoint` binary in the pod's netns and talks to its side ports.
//!
//! Tests change routing or policy with [`write`] (or `Lab::set_waypoint_config`): the file
//! is replaced atomically and the waypoint reloads it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambient_net::consts::port;
use ambient_net::netns;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::procs;
use crate::service;
use crate::state::LabState;
use crate::ztunnel::{self, LocalService};

/// The config file under the run dir.
pub const CONFIG_FILE: &str = "waypoint-config.yaml";
/// The waypoint pod's name in the plan (pod id `b-waypoint`).
pub const POD_NAME: &str = "waypoint";
/// The name of its process record (and the binary's).
pub const PROCESS: &str = "waypoint";
pub const BINARY: &str = "waypoint";
pub const SERVICE_ACCOUNT: &str = "waypoint";
/// The Services the lab puts behind the waypoint (`demo/<name>`).
pub const SERVICES: [&str; 3] = [service::REVIEWS, service::REVIEWS_V1, service::REVIEWS_V2];
/// Its ports: HBONE, metrics, admin (loopback), readiness.
pub const HBONE_PORT: u16 = port::INBOUND_HBONE;
pub const METRICS_PORT: u16 = port::METRICS;
pub const ADMIN_PORT: u16 = port::ADMIN;
pub const READINESS_PORT: u16 = port::READINESS;

pub fn config_path(run_dir: &Path) -> PathBuf {
    run_dir.join(CONFIG_FILE)
}

/// The log file of the waypoint in pod `pod_id`.
pub fn log_path(run_dir: &Path, pod_id: &str) -> PathBuf {
    run_dir.join(format!("{pod_id}.log"))
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn identity(namespace: &str, service_account: &str) -> String {
    format!(
        "spiffe://{}/ns/{namespace}/sa/{service_account}",
        ztunnel::TRUST_DOMAIN
    )
}

/// The waypoint's config file (YAML, camelCase).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointConfig {
    /// Which entry of `workloads` is the waypoint itself.
    pub waypoint: SelfRef,
    /// ztunnel's workload schema (the same list ztunnel gets).
    pub workloads: Vec<Value>,
    /// ztunnel's service schema; those whose `waypoint.address` is the waypoint's IP are the
    /// ones it serves.
    pub services: Vec<LocalService>,
    /// HTTPRoute-shaped routes.
    pub routes: Value,
    /// AuthorizationPolicy-shaped L7 policies.
    pub policies: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SelfRef {
    pub name: String,
    pub namespace: String,
}

/// The lab's default routes: `demo/reviews` goes to reviews-v2 for `x-version: v2`, else
/// 90/10 between reviews-v1 and reviews-v2.
pub fn default_routes() -> Value {
    json!([{
        "name": "reviews",
        "namespace": "demo",
        "parentRefs": [{"kind": "Service", "name": service::REVIEWS}],
        "rules": [
            {
                "matches": [{"headers": [{"name": "x-version", "value": "v2"}]}],
                "backendRefs": [{"name": service::REVIEWS_V2, "port": service::SERVICE_PORT}]
            },
            {
                "backendRefs": [
                    {"name": service::REVIEWS_V1, "port": service::SERVICE_PORT, "weight": 90},
                    {"name": service::REVIEWS_V2, "port": service::SERVICE_PORT, "weight": 10}
                ]
            }
        ]
    }])
}

/// No L7 policies.
pub fn default_policies() -> Value {
    json!([])
}

/// The config for the lab's waypoint with these `routes` and `policies`; fails when the lab
/// has no waypoint.
pub fn render_config(state: &LabState, routes: &Value, policies: &Value) -> Result<WaypointConfig> {
    let wp = state.waypoint.as_ref().context("the lab has no waypoint")?;
    Ok(WaypointConfig {
        waypoint: SelfRef {
            name: wp.k8s_name.clone(),
            namespace: wp.namespace.clone(),
        },
        workloads: ztunnel::render_workloads(state),
        services: ztunnel::render_services(state),
        routes: routes.clone(),
        policies: policies.clone(),
    })
}

/// Writes the config atomically (temp file + rename: the waypoint reloads it on change).
pub fn write_config(run_dir: &Path, config: &WaypointConfig) -> Result<PathBuf> {
    let path = config_path(run_dir);
    ztunnel::write_yaml_atomically(&path, config)?;
    Ok(path)
}

/// Renders and writes the waypoint's config with other `routes` / `policies` (the rest
/// from the lab's state).
pub fn write(state: &LabState, routes: &Value, policies: &Value) -> Result<PathBuf> {
    write_config(&state.run_dir, &render_config(state, routes, policies)?)
}

/// The waypoint's command line.
pub fn argv(bin: &Path, run_dir: &Path) -> Vec<String> {
    vec![
        bin.display().to_string(),
        "--config".into(),
        config_path(run_dir).display().to_string(),
        "--ca-dir".into(),
        run_dir.join(ztunnel::CA_DIR).display().to_string(),
        "--trust-domain".into(),
        ztunnel::TRUST_DOMAIN.into(),
    ]
}

/// Waits until the waypoint at `ip` (in `netns_name`) answers 200 on `/healthz/ready`.
pub fn wait_ready(
    netns_name: &str,
    ip: Ipv4Addr,
    child: &mut std::process::Child,
    log: &Path,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("waypoint exited ({status})\n{}", procs::log_tail(log, 15));
        }
        if netns::run_in(&netns::named_path(netns_name), || ready_once(ip))? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("waypoint not ready after 15s\n{}", procs::log_tail(log, 15));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// One `GET /healthz/ready` on `ip`'s readiness port from the calling thread's netns.
pub fn ready_once(ip: Ipv4Addr) -> bool {
    http_get(SocketAddr::from((ip, READINESS_PORT)), "/healthz/ready")
        .map(|(code, _)| code == 200)
        .unwrap_or(false)
}

/// A plain HTTP/1.0 GET to `addr` from the calling thread's netns: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The access-log lines of a waypoint log: tracing target `access`, in the plain format
/// (`... INFO access: ...`) or the JSON one (`"target":"access"`).
pub fn access_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" access: ") || l.contains("\"target\":\"access\""))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::planned_state;

    #[test]
    fn default_config_file() {
        let state = planned_state("unit").unwrap();
        let wp = state.waypoint.clone().unwrap();
        assert_eq!(wp.pod, "b-waypoint");
        assert_eq!(wp.k8s_name, "waypoint-b");
        assert_eq!(wp.identity, "spiffe://cluster.local/ns/demo/sa/waypoint");
        assert_eq!(wp.workloads, ["a-reviews-v1", "b-reviews-v2"]);
        assert_eq!(
            wp.services,
            ["demo/reviews", "demo/reviews-v1", "demo/reviews-v2"]
        );
        let cfg = render_config(&state, &default_routes(), &default_policies()).unwrap();
        let yaml = serde_yaml_ng::to_string(&cfg).unwrap();
        let v: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["policies", "routes", "services", "waypoint", "workloads"]
        );
        assert!(yaml.starts_with("waypoint:"), "{yaml}");
        assert_eq!(
            v["waypoint"],
            json!({"name": "waypoint-b", "namespace": "demo"})
        );
        assert_eq!(v["policies"], json!([]));
        // Its own entry in `workloads`: its IP and identity.
        let me: Vec<&Value> = v["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["name"] == "waypoint-b" && w["namespace"] == "demo")
            .collect();
        assert_eq!(me.len(), 1);
        assert_eq!(me[0]["workloadIps"], json!([wp.ip.to_string()]));
        assert_eq!(me[0]["serviceAccount"], "waypoint");
        assert_eq!(me[0]["protocol"], "HBONE");
        assert!(me[0].get("waypoint").is_none());
        // The services it serves are those whose waypoint is its IP.
        let mine: Vec<&str> = v["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["waypoint"]["address"] == wp.ip.to_string())
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(mine, SERVICES);
        let routes = &v["routes"][0];
        assert_eq!(
            routes["parentRefs"],
            json!([{"kind": "Service", "name": "reviews"}])
        );
        assert_eq!(
            routes["rules"][0]["matches"][0]["headers"][0],
            json!({"name": "x-version", "value": "v2"})
        );
        assert_eq!(routes["rules"][1]["backendRefs"][0]["weight"], 90);
        assert_eq!(routes["rules"][1]["backendRefs"][1]["name"], "reviews-v2");
        // workloads and services are exactly ztunnel's schema.
        #[derive(Serialize)]
        struct Zt<'a> {
            workloads: &'a [Value],
            services: &'a [LocalService],
        }
        let zt = serde_yaml_ng::to_string(&Zt {
            workloads: &cfg.workloads,
            services: &cfg.services,
        })
        .unwrap();
        ::ztunnel::config::parse_local_config(&zt).unwrap_or_else(|e| panic!("{e}\n{zt}"));
    }

    #[test]
    fn write_replaces_the_file_atomically() {
        let dir = std::env::temp_dir().join(format!("ambient-lab-wp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut state = planned_state("unit").unwrap();
        state.run_dir = dir.clone();
        let path = write(&state, &default_routes(), &default_policies()).unwrap();
        assert_eq!(path, dir.join(CONFIG_FILE));
        let policies = json!([{"name": "deny-all", "namespace": "demo", "action": "DENY",
            "targetRefs": [{"kind": "Service", "name": "reviews"}], "rules": [{}]}]);
        write(&state, &json!([]), &policies).unwrap();
        let v: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["routes"], json!([]));
        assert_eq!(v["policies"], policies);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [CONFIG_FILE], "a temp file was left behind");
        std::fs::remove_dir_all(&dir).unwrap();
        let no_wp = LabState {
            waypoint: None,
            ..state
        };
        assert!(render_config(&no_wp, &json!([]), &json!([])).is_err());
    }

    #[test]
    fn access_lines_in_both_formats() {
        let log = "2025-01-01T00:00:00Z  INFO waypoint: ready\n\
                   2025-01-01T00:00:01Z  INFO access: request complete status=200\n\
                   {\"level\":\"INFO\",\"target\":\"access\",\"status\":503}\n\
                   {\"level\":\"INFO\",\"target\":\"waypoint\"}\n";
        let lines = access_lines(log);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("status=200"));
        assert!(lines[1].contains("503"));
    }

    #[test]
    fn identity_and_argv() {
        assert_eq!(
            identity("demo", SERVICE_ACCOUNT),
            "spiffe://cluster.local/ns/demo/sa/waypoint"
        );
        let a = argv(Path::new("/t/waypoint"), Path::new("/run/ambient-lab/x"));
        assert_eq!(
            a,
            [
                "/t/waypoint",
                "--config",
                "/run/ambient-lab/x/waypoint-config.yaml",
                "--ca-dir",
                "/run/ambient-lab/x/ztunnel-ca",
                "--trust-domain",
                "cluster.local"
            ]
        );
    }
}
