//! The command line ([`Cli`] → [`Config`]) and the local config file's schema ([`LocalConfig`]).
//!
//! The file has the shape of upstream ztunnel's local config: camelCase `workloads`, `services`
//! and `policies`. Unknown fields are refused and every error names the field it is about
//! (`workloads[1].serviceAccount: …`), see [`parse_local_config`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ambient_net::consts::membership::DEFAULT_EXCLUDED_NAMESPACES;
use ambient_net::consts::port;
use clap::{Args, Parser};
use serde::{Deserialize, Serialize};

/// Errors of this module: reading or parsing the local config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A syntax or schema error; `field` is the path to the offending field.
    #[error("{field}: {message}")]
    Parse { field: String, message: String },
    /// A well-formed file whose contents do not make sense (duplicate IPs, dangling references…).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `ztunnel` command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "The node's HBONE data plane: carries captured connections between nodes over mTLS HTTP/2 CONNECT."
)]
pub struct Cli {
    /// Local config file (workloads, services, policies); reloaded when it changes. With
    /// `--kube`: optional, and policies only.
    #[arg(long, env = "ZTUNNEL_CONFIG", required_unless_present = "kube")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// This node's name: only workloads with this `node` are served and get certificates.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The SPIFFE trust domain of every identity.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Lifetime of the certificates the embedded CA mints (rotated at half-life): 1h, 30m, 90s.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub cert_lifetime: Duration,
    /// Data-plane worker threads.
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
    #[command(flatten)]
    pub listeners: ListenerArgs,
    /// Test mode: no IP_TRANSPARENT on listeners or upstream sockets. Upstream sockets still bind
    /// to the original source IP, which works when it is local (loopback tests).
    #[arg(long)]
    pub no_transparent: bool,
    /// Test hook: treat every connection accepted on the outbound listener as if its original
    /// destination were this address (instead of the socket's local address, as under TPROXY).
    #[arg(long)]
    pub outbound_orig_dst: Option<SocketAddr>,
    /// Test hook: the same for the inbound plaintext listener.
    #[arg(long)]
    pub inbound_plaintext_orig_dst: Option<SocketAddr>,
    /// How long SIGTERM waits for open connections before exiting.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How often the config file is checked for changes.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub config_poll: Duration,
    /// Streams carried by one pooled HTTP/2 connection before another one is opened.
    #[arg(long, default_value_t = 100)]
    pub pool_max_streams: usize,
    /// Connections per pool key that are opened before streams start sharing one
    /// (spreads concurrent streams over cores). Default: the number of worker threads.
    #[arg(long)]
    pub pool_spread: Option<usize>,
    /// Pooled connections idle this long are closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,
    /// Timeout of an upstream TCP connect (and of the TLS + HTTP/2 handshake).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Log format.
    #[arg(long, default_value = "plain", value_parser = ["plain", "json"])]
    pub log_format: String,
    /// Concurrent connections one source may hold in this ztunnel (a workload on 15001, 15006
    /// and as the client of HBONE streams on 15008; an address outside the mesh; a peer
    /// address's TCP connections on 15008); beyond it new ones are refused, so a flood from
    /// one pod cannot starve the others. Default: a quarter of the open-files limit (a
    /// connection holds up to two descriptors: one source takes at most half). 0: no cap.
    #[arg(long, env = "ZTUNNEL_MAX_CONNECTIONS_PER_SOURCE")]
    pub max_connections_per_source: Option<usize>,
}

#[derive(Debug, Clone, Args)]
#[group(required = false, multiple = false)]
pub struct IdentityArgs {
    /// Embedded CA (default): root-cert.pem and root-key.pem in this directory, created on first
    /// start when absent.
    #[arg(long, default_value = "/var/run/ztunnel/ca")]
    pub ca_dir: PathBuf,
    /// Ready-made certificates instead of the CA: <dir>/root-cert.pem and
    /// <dir>/<namespace>/<serviceaccount>/{cert-chain.pem,key.pem}.
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
}

/// Kubernetes mode: workloads and services from the API server.
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Kubernetes mode: learn workloads (pods) and services (services + EndpointSlices) from
    /// the API server (in-cluster config, or KUBECONFIG). `--config` then holds policies only.
    #[arg(long)]
    pub kube: bool,
    /// Talk to the API server at this plain-HTTP URL without credentials (tests and `kubectl
    /// proxy` only).
    #[arg(long, requires = "kube")]
    pub kube_api_url: Option<String>,
    /// The cluster's DNS domain: services are named `<name>.<namespace>.svc.<domain>`.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Namespaces whose pods are never in the mesh, comma-separated (as the node agent's flag
    /// of the same name: the two must agree).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_EXCLUDED_NAMESPACES.iter().map(|s| s.to_string()))]
    pub excluded_namespaces: Vec<String>,
}

/// The listeners' addresses. The three data-plane listeners take one address per flag
/// occurrence (repeat the flag, or separate with commas): by default the IPv4 and the IPv6
/// wildcard, one socket each (see [`crate::socket::listen`]).
#[derive(Debug, Clone, Args)]
pub struct ListenerArgs {
    /// Outbound capture (15001). Default: `0.0.0.0:15001,[::]:15001`.
    #[arg(long = "outbound-addr", value_delimiter = ',', default_values_t = dual_stack(port::OUTBOUND))]
    pub outbound_addrs: Vec<SocketAddr>,
    /// Inbound HBONE (15008). Default: `0.0.0.0:15008,[::]:15008`.
    #[arg(long = "inbound-addr", value_delimiter = ',', default_values_t = dual_stack(port::INBOUND_HBONE))]
    pub inbound_addrs: Vec<SocketAddr>,
    /// Inbound plaintext (15006). Default: `0.0.0.0:15006,[::]:15006`.
    #[arg(long = "inbound-plaintext-addr", value_delimiter = ',', default_values_t = dual_stack(port::INBOUND_PLAINTEXT))]
    pub inbound_plaintext_addrs: Vec<SocketAddr>,
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], port::ADMIN)))]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], port::METRICS)))]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], port::READINESS)))]
    pub readiness_addr: SocketAddr,
}

/// `0.0.0.0:<port>` and `[::]:<port>`: a data-plane listener's default addresses. Where the
/// host has no IPv6, the second one's bind failure is a warning ([`crate::socket::no_ipv6`]).
pub fn dual_stack(port: u16) -> Vec<SocketAddr> {
    vec![
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    ]
}

/// Where certificates come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CertSource {
    Ca(PathBuf),
    Dir(PathBuf),
}

/// The resolved runtime configuration.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Optional only in Kubernetes mode.
    pub config_file: Option<PathBuf>,
    pub node_name: String,
    /// Kubernetes mode (`--kube`): workloads and services from the API server.
    pub kube: bool,
    pub kube_api_url: Option<String>,
    pub cluster_domain: String,
    pub excluded_namespaces: Vec<String>,
    pub trust_domain: String,
    pub cert_source: CertSource,
    pub cert_lifetime: Duration,
    pub worker_threads: usize,
    /// Every address of a data-plane listener gets a socket of its own.
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addrs: Vec<SocketAddr>,
    pub inbound_plaintext_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub transparent: bool,
    pub outbound_orig_dst: Option<SocketAddr>,
    pub inbound_plaintext_orig_dst: Option<SocketAddr>,
    pub drain_timeout: Duration,
    pub config_poll: Duration,
    pub pool_max_streams: usize,
    pub pool_spread: usize,
    pub pool_idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// 0: no cap (see [`Cli::max_connections_per_source`]).
    pub max_connections_per_source: usize,
}

/// The default per-source cap: a quarter of the soft open-files limit (1024 when unknown).
pub fn default_max_connections_per_source() -> usize {
    let soft = crate::process::nofile_limit()
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    usize::try_from(soft / 4).unwrap_or(usize::MAX).max(1)
}

impl Config {
    /// Defaults for everything but the three things a deployment must say.
    pub fn new(config_file: PathBuf, node_name: &str, cert_source: CertSource) -> Config {
        let cli = Cli::parse_from(["ztunnel", "--config", "unused", "--node-name", node_name]);
        let mut cfg = Config::from(cli);
        cfg.config_file = Some(config_file);
        cfg.cert_source = cert_source;
        cfg
    }

    /// Kubernetes mode against a plain-HTTP API server (tests); `policies` is the optional
    /// policy file.
    pub fn new_kube(
        api_url: &str,
        policies: Option<PathBuf>,
        node_name: &str,
        cert_source: CertSource,
    ) -> Config {
        let cli = Cli::parse_from(["ztunnel", "--kube", "--node-name", node_name]);
        let mut cfg = Config::from(cli);
        cfg.config_file = policies;
        cfg.kube_api_url = Some(api_url.to_string());
        cfg.cert_source = cert_source;
        cfg
    }

    /// Every listener on an ephemeral port of `ip`, without IP_TRANSPARENT (tests).
    pub fn on_loopback(mut self, ip: IpAddr) -> Config {
        let any = SocketAddr::new(ip, 0);
        self.outbound_addrs = vec![any];
        self.inbound_addrs = vec![any];
        self.inbound_plaintext_addrs = vec![any];
        self.admin_addr = any;
        self.metrics_addr = any;
        self.readiness_addr = any;
        self.transparent = false;
        self
    }
}

impl From<Cli> for Config {
    fn from(cli: Cli) -> Config {
        let cert_source = match cli.identity.cert_dir {
            Some(dir) => CertSource::Dir(dir),
            None => CertSource::Ca(cli.identity.ca_dir),
        };
        let worker_threads = cli.worker_threads.max(1);
        Config {
            config_file: cli.config,
            node_name: cli.node_name,
            kube: cli.kube.kube,
            kube_api_url: cli.kube.kube_api_url,
            cluster_domain: cli.kube.cluster_domain,
            excluded_namespaces: cli
                .kube
                .excluded_namespaces
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect(),
            trust_domain: cli.trust_domain,
            cert_source,
            cert_lifetime: cli.cert_lifetime,
            worker_threads,
            outbound_addrs: cli.listeners.outbound_addrs,
            inbound_addrs: cli.listeners.inbound_addrs,
            inbound_plaintext_addrs: cli.listeners.inbound_plaintext_addrs,
            admin_addr: cli.listeners.admin_addr,
            metrics_addr: cli.listeners.metrics_addr,
            readiness_addr: cli.listeners.readiness_addr,
            transparent: !cli.no_transparent,
            outbound_orig_dst: cli.outbound_orig_dst,
            inbound_plaintext_orig_dst: cli.inbound_plaintext_orig_dst,
            drain_timeout: cli.drain_timeout,
            config_poll: cli.config_poll,
            pool_max_streams: cli.pool_max_streams.max(1),
            pool_spread: cli.pool_spread.unwrap_or(worker_threads).max(1),
            pool_idle_timeout: cli.pool_idle_timeout,
            connect_timeout: cli.connect_timeout,
            max_connections_per_source: cli
                .max_connections_per_source
                .unwrap_or_else(default_max_connections_per_source),
        }
    }
}

/// `90`, `90s`, `500ms`, `30m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 90s, 30m or 1h"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    }
}

// ---------------------------------------------------------------------------------------------
// The local config file.

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    #[serde(default)]
    pub services: Vec<LocalService>,
    #[serde(default)]
    pub policies: Vec<LocalPolicy>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum Protocol {
    /// In the mesh: reached over HBONE on port 15008.
    #[serde(rename = "HBONE")]
    Hbone,
    /// Not in the mesh: plain TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// A waypoint proxy: traffic for the workload or service goes to it over HBONE instead.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointRef {
    /// The waypoint's workload IP, or the VIP of the waypoint's service (a Gateway's Service:
    /// a healthy endpoint of it is picked per connection). Either must be in the state: the
    /// identity verified is the waypoint workload's (the picked endpoint's).
    pub address: IpAddr,
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    port::INBOUND_HBONE
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkload {
    /// Defaults to `<namespace>/<name>`.
    #[serde(default)]
    pub uid: Option<String>,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    pub node: String,
    #[serde(default)]
    pub waypoint: Option<WaypointRef>,
    /// Services this workload is an endpoint of: `"<namespace>/<hostname>"` → port overrides
    /// (service port → this workload's target port; `{}` uses the service's `ports`).
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// `"<namespace>/<name>"` of the `WorkloadSelector` policies that select this workload.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// Load-balancing weight among a service's endpoints (0: never picked).
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    #[serde(default)]
    pub status: HealthStatus,
}

fn default_service_account() -> String {
    "default".to_string()
}

fn default_capacity() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalService {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// `"10.96.0.10"` or upstream's `"<network>/10.96.0.10"`.
    #[serde(default)]
    pub vips: Vec<String>,
    /// Service port → target port.
    #[serde(default)]
    pub ports: BTreeMap<u16, u16>,
    /// Extra identities accepted for this service's endpoints (`spiffe://…`).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub waypoint: Option<WaypointRef>,
    /// What a service port speaks (Kubernetes' `appProtocol`): service port → protocol. Only the
    /// waypoint looks at it: `tcp` ports are relayed at L4; `http` (the default) is detected.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub app_protocols: BTreeMap<u16, AppProtocol>,
}

/// A service port's application protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1 or HTTP/2, detected per connection.
    Http,
    /// HTTP/2 only (prior knowledge).
    Http2,
    /// Opaque TCP: never parsed.
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum PolicyScope {
    /// Every workload.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// The workloads that list the policy in `authorizationPolicies`.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum PolicyAction {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalPolicy {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    /// The policy matches a connection when any rule does. No rules: matches nothing.
    #[serde(default)]
    pub rules: Vec<LocalRule>,
}

/// One rule: every non-empty field must match (values within a field are alternatives); a
/// `not*` field matches when none of its values does. An empty rule matches everything.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalRule {
    /// Source namespaces (from the peer certificate). `*`, `prefix*`, `*suffix` allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Source principals `<td>/ns/<ns>/sa/<sa>` (a `spiffe://` prefix is accepted). Wildcards as above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// Source service accounts `<namespace>/<serviceaccount>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// Source addresses: `10.0.0.1` or `10.0.0.0/24`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<String>,
    /// Destination (target) ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// Parses the file's text. Syntax and schema errors name the field (`workloads[0].protocol`)
/// and carry the line and column.
pub fn parse_local_config(text: &str) -> Result<LocalConfig, ConfigError> {
    parse_yaml(text)
}

/// Parses a YAML config file of any schema (ztunnel's, the waypoint's): an empty file is the
/// default value; errors name the field by its path and carry the line and column.
pub fn parse_yaml<T: serde::de::DeserializeOwned + Default>(text: &str) -> Result<T, ConfigError> {
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path.is_empty() || path == "." {
            "(file)".to_string()
        } else {
            path
        };
        // serde_yaml_ng prefixes its message with its own (shorter) path: drop it.
        let mut message = e.into_inner().to_string();
        if let Some((head, rest)) = message.split_once(": ") {
            if !head.contains(' ') && field.starts_with(head) {
                message = rest.to_string();
            }
        }
        ConfigError::Parse { field, message }
    })
}

pub fn read_local_config(path: &Path) -> Result<LocalConfig, ConfigError> {
    parse_local_config(&read_file(path)?)
}

/// A config file's text.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A VIP as written in the file: `10.96.0.10` or `<network>/10.96.0.10`.
pub fn parse_vip(s: &str) -> Option<IpAddr> {
    let ip = s.rsplit_once('/').map(|(_, ip)| ip).unwrap_or(s);
    IpAddr::from_str(ip).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workloads:
- name: client
  namespace: demo
  serviceAccount: sleep
  workloadIps: [10.0.0.1]
  protocol: HBONE
  node: node-a
  services:
    demo/echo.demo.svc.cluster.local: {80: 9090}
- name: legacy
  namespace: demo
  workloadIps: [10.0.0.2]
  node: node-b
services:
- name: echo
  namespace: demo
  hostname: echo.demo.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports: {80: 8080}
policies:
- name: deny-legacy
  namespace: demo
  scope: Namespace
  action: Deny
  rules:
  - sourceIps: [10.0.0.2/32]
    notDestinationPorts: [22]
"#;

    #[test]
    fn good_file_parses_with_defaults() {
        let cfg = parse_local_config(GOOD).unwrap();
        assert_eq!(cfg.workloads.len(), 2);
        let legacy = &cfg.workloads[1];
        assert_eq!(legacy.service_account, "default");
        assert_eq!(legacy.protocol, Protocol::Tcp);
        assert_eq!(legacy.capacity, 1);
        assert_eq!(cfg.workloads[0].protocol, Protocol::Hbone);
        assert_eq!(
            cfg.workloads[0].services["demo/echo.demo.svc.cluster.local"][&80],
            9090
        );
        assert_eq!(
            parse_vip(&cfg.services[0].vips[0]),
            Some("10.96.0.10".parse().unwrap())
        );
        assert_eq!(cfg.policies[0].action, PolicyAction::Deny);
        assert_eq!(cfg.policies[0].rules[0].not_destination_ports, vec![22]);
    }

    #[test]
    fn dual_stack_addresses_in_the_file() {
        let text = r#"
workloads:
- {name: a, namespace: demo, workloadIps: [10.0.0.1, "fd00::1"], node: n}
- name: b
  namespace: demo
  workloadIps:
  - fd00::2
  - 10.0.0.2
  node: n
  waypoint: {address: "fd00::100"}
services:
- {name: s, namespace: demo, hostname: s.demo, vips: [10.96.0.10, "fd00:96::10", "net1/fd00:96::11"]}
"#;
        let cfg = parse_local_config(text).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            cfg.workloads[0].workload_ips,
            [ip("10.0.0.1"), ip("fd00::1")]
        );
        // Unquoted in flow style too.
        let flow = parse_local_config(&text.replace("\"fd00::1\"", "fd00::1")).unwrap();
        assert_eq!(flow.workloads[0].workload_ips[1], ip("fd00::1"));
        // Block style needs no quotes.
        assert_eq!(
            cfg.workloads[1].workload_ips,
            [ip("fd00::2"), ip("10.0.0.2")]
        );
        assert_eq!(
            cfg.workloads[1].waypoint.as_ref().unwrap().address,
            ip("fd00::100")
        );
        let vips: Vec<_> = cfg.services[0].vips.iter().map(|v| parse_vip(v)).collect();
        assert_eq!(
            vips,
            [
                Some(ip("10.96.0.10")),
                Some(ip("fd00:96::10")),
                Some(ip("fd00:96::11"))
            ]
        );
        assert_eq!(parse_vip("[fd00::1]"), None);
        let err = parse_local_config(&text.replace("\"fd00::1\"", "\"fd00:::1\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("workloads[0].workloadIps"), "{err}");
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let text = GOOD.replace("serviceAccount: sleep", "serviceAcount: sleep");
        let err = parse_local_config(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("workloads[0].serviceAcount: unknown field `serviceAcount`"),
            "{err}"
        );
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn invalid_value_is_named_with_its_path() {
        let text = GOOD.replace("protocol: HBONE", "protocol: QUIC");
        let err = parse_local_config(&text).unwrap_err().to_string();
        assert!(err.starts_with("workloads[0].protocol"), "{err}");
        let text = GOOD.replace("[10.0.0.1]", "[10.0.0.300]");
        let err = parse_local_config(&text).unwrap_err().to_string();
        assert!(err.contains("workloads[0].workloadIps"), "{err}");
        let text = GOOD.replace("action: Deny", "action: Maybe");
        let err = parse_local_config(&text).unwrap_err().to_string();
        assert!(err.starts_with("policies[0].action"), "{err}");
    }

    #[test]
    fn empty_file_is_empty_config() {
        let cfg = parse_local_config("\n").unwrap();
        assert!(cfg.workloads.is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn kube_flags() {
        // --config is required without --kube, optional with it.
        assert!(Cli::try_parse_from(["ztunnel", "--node-name", "a"]).is_err());
        let cfg = Config::from(Cli::parse_from(["ztunnel", "--kube", "--node-name", "a"]));
        assert!(cfg.kube && cfg.config_file.is_none());
        assert_eq!(cfg.cluster_domain, "cluster.local");
        assert_eq!(cfg.excluded_namespaces, ["kube-system"]);
        assert!(cfg.kube_api_url.is_none());
        let cfg = Config::from(Cli::parse_from([
            "ztunnel",
            "--kube",
            "--node-name=a",
            "--config=p.yaml",
            "--kube-api-url=http://127.0.0.1:8001",
            "--excluded-namespaces=kube-system,monitoring",
            "--cluster-domain=example.org",
        ]));
        assert_eq!(cfg.config_file, Some(PathBuf::from("p.yaml")));
        assert_eq!(cfg.kube_api_url.as_deref(), Some("http://127.0.0.1:8001"));
        assert_eq!(cfg.excluded_namespaces, ["kube-system", "monitoring"]);
        assert_eq!(cfg.cluster_domain, "example.org");
        // --kube-api-url only with --kube.
        assert!(Cli::try_parse_from([
            "ztunnel",
            "--config=c",
            "--node-name=a",
            "--kube-api-url=http://x"
        ])
        .is_err());
    }

    #[test]
    fn admin_port_defaults_to_loopback_only() {
        for args in [
            &["ztunnel", "--config", "c.yaml", "--node-name", "a"][..],
            &["ztunnel", "--kube", "--node-name", "a"][..],
        ] {
            let cfg = Config::from(Cli::parse_from(args));
            assert!(cfg.admin_addr.ip().is_loopback(), "{:?}", cfg.admin_addr);
            assert_eq!(cfg.admin_addr.port(), port::ADMIN);
            // The data-plane and the metrics/readiness ports are the ones that face the node.
            for a in [cfg.metrics_addr, cfg.readiness_addr] {
                assert!(!a.ip().is_loopback(), "{a}");
            }
        }
        let cfg = Config::new("c.yaml".into(), "a", CertSource::Ca("/ca".into()));
        assert!(cfg.admin_addr.ip().is_loopback(), "{:?}", cfg.admin_addr);
    }

    #[test]
    fn listener_flags_take_v4_v6_and_several_addresses() {
        let base = ["ztunnel", "--config", "c.yaml", "--node-name", "a"];
        let parse = |extra: &[&str]| {
            let args = base.iter().chain(extra).copied();
            Cli::try_parse_from(args).map(Config::from)
        };
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        // One v4 address: only that one (the v4-only setup of before).
        let cfg = parse(&["--outbound-addr", "0.0.0.0:15001"]).unwrap();
        assert_eq!(cfg.outbound_addrs, [sa("0.0.0.0:15001")]);
        // v6 alone, bracketed.
        let cfg = parse(&["--inbound-addr", "[::]:15008"]).unwrap();
        assert_eq!(cfg.inbound_addrs, [sa("[::]:15008")]);
        // Two per listener: repeated, or comma-separated.
        let cfg = parse(&[
            "--inbound-plaintext-addr",
            "0.0.0.0:15006",
            "--inbound-plaintext-addr",
            "[fd00::1]:15006",
            "--outbound-addr=127.0.0.1:15001,[::1]:15001",
        ])
        .unwrap();
        assert_eq!(
            cfg.inbound_plaintext_addrs,
            [sa("0.0.0.0:15006"), sa("[fd00::1]:15006")]
        );
        assert_eq!(
            cfg.outbound_addrs,
            [sa("127.0.0.1:15001"), sa("[::1]:15001")]
        );
        // The others keep their defaults; an unbracketed v6 with a port is refused.
        assert_eq!(cfg.inbound_addrs, dual_stack(port::INBOUND_HBONE));
        assert!(parse(&["--outbound-addr", "::1:15001"]).is_err());
        assert!(parse(&["--outbound-addr", "[::1]"]).is_err());
        // The side ports take a v6 address too.
        let cfg = parse(&["--metrics-addr", "[::]:15020"]).unwrap();
        assert_eq!(cfg.metrics_addr, sa("[::]:15020"));
    }

    #[test]
    fn cli_defaults_use_the_spec_ports() {
        let cli = Cli::parse_from(["ztunnel", "--config", "c.yaml", "--node-name", "a"]);
        let cfg = Config::from(cli);
        assert_eq!(cfg.outbound_addrs, dual_stack(port::OUTBOUND));
        assert_eq!(cfg.inbound_addrs, dual_stack(port::INBOUND_HBONE));
        assert_eq!(
            cfg.inbound_plaintext_addrs,
            dual_stack(port::INBOUND_PLAINTEXT)
        );
        assert_eq!(
            cfg.admin_addr,
            SocketAddr::from(([127, 0, 0, 1], port::ADMIN))
        );
        assert!(cfg.transparent);
        assert_eq!(cfg.pool_spread, 2);
        assert!(matches!(cfg.cert_source, CertSource::Ca(_)));
        let cli = Cli::parse_from([
            "ztunnel",
            "--config",
            "c",
            "--node-name",
            "a",
            "--cert-dir",
            "/certs",
        ]);
        assert_eq!(
            Config::from(cli).cert_source,
            CertSource::Dir("/certs".into())
        );
    }
}
