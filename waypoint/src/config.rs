//! The command line ([`Cli`] → [`Config`]) and the local config file's schema ([`WaypointFile`]).
//!
//! The file has ztunnel's shape (its `workloads` and `services`, the same schema) plus who the
//! waypoint is (`waypoint`), `routes` shaped like Gateway API `HTTPRoute`s and `policies` shaped
//! like Istio `AuthorizationPolicy`s. Unknown fields are refused and every error names the field
//! (`routes[0].rules[1].matches[0].path.type: …`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambient_net::consts::port;
use clap::Parser;
use serde::{Deserialize, Deserializer, Serialize};
use ztunnel::config::{
    parse_duration, parse_yaml, CertSource, ConfigError, IdentityArgs, LocalService, LocalWorkload,
};

/// `waypoint` command line.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "waypoint",
    version,
    about = "The mesh's L7 proxy: terminates HBONE for the services it serves, routes and authorizes each HTTP request, and carries it to an endpoint over HBONE."
)]
pub struct Cli {
    /// Local config file (who the waypoint is, workloads, services, routes, policies); reloaded
    /// when it changes. Required unless `--kube`.
    #[arg(
        long,
        env = "WAYPOINT_CONFIG",
        required_unless_present = "kube",
        conflicts_with = "kube"
    )]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The SPIFFE trust domain of every identity.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Lifetime of the certificate the embedded CA mints (rotated at half-life).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub cert_lifetime: Duration,
    /// Data-plane worker threads.
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
    /// The HBONE listeners (mTLS HTTP/2 CONNECT from ztunnels): repeat or comma-separate; by
    /// default `0.0.0.0` and `[::]` (one socket per family; IPv6 skipped with a warning where
    /// the host has none), as ztunnel reaches a waypoint in the connection's family.
    #[arg(long = "hbone-addr", value_delimiter = ',', default_values_t = ztunnel::config::dual_stack(port::INBOUND_HBONE))]
    pub hbone_addrs: Vec<SocketAddr>,
    /// `/config_dump` (localhost only by default).
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], port::ADMIN)))]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], port::METRICS)))]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], port::READINESS)))]
    pub readiness_addr: SocketAddr,
    /// How often the config file is checked for changes.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub config_poll: Duration,
    /// How long a tunnel may stay silent before its first bytes decide HTTP or TCP: a client
    /// that has said nothing by then (a server-first protocol) is relayed at L4.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub protocol_detect_timeout: Duration,
    /// Timeout of an upstream HBONE connect (TCP, TLS, HTTP/2 and the CONNECT's 200).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Upstream HTTP/1.1 connections and HBONE connections idle this long are closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// How long SIGTERM waits for open tunnels before exiting.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Log format.
    #[arg(long, default_value = "plain", value_parser = ["plain", "json"])]
    pub log_format: String,
}

/// Kubernetes mode.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Kubernetes mode: the waypoint's Gateway, HTTPRoutes and AuthorizationPolicies, and the
    /// mesh (pods, services, EndpointSlices, namespaces, as ztunnel discovers them) from the
    /// API server (in-cluster config, or KUBECONFIG); no config file.
    #[arg(long)]
    pub kube: bool,
    /// Talk to the API server at this plain-HTTP URL without credentials (tests and `kubectl
    /// proxy` only).
    #[arg(long, requires = "kube")]
    pub kube_api_url: Option<String>,
    /// The name of this waypoint's Gateway (gatewayClassName istio-waypoint).
    #[arg(long, env = "GATEWAY_NAME", required_if_eq("kube", "true"))]
    pub gateway_name: Option<String>,
    /// The Gateway's namespace, which is the waypoint pod's.
    #[arg(long, env = "POD_NAMESPACE", required_if_eq("kube", "true"))]
    pub gateway_namespace: Option<String>,
    /// This waypoint's pod (its IPs and service account are the waypoint's address and
    /// identity).
    #[arg(long, env = "POD_NAME", required_if_eq("kube", "true"))]
    pub pod_name: Option<String>,
    /// The cluster's DNS domain: services are named `<name>.<namespace>.svc.<domain>`.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Namespaces whose pods are never in the mesh (as ztunnel's and the node agent's flag).
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    pub excluded_namespaces: Vec<String>,
}

/// Kubernetes mode, resolved.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeConfig {
    pub api_url: Option<String>,
    pub who: crate::kube::Who,
    pub cluster_domain: String,
    pub excluded_namespaces: Vec<String>,
}

/// The resolved runtime configuration.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub config_file: Option<PathBuf>,
    pub kube: Option<KubeConfig>,
    pub trust_domain: String,
    pub cert_source: CertSource,
    pub cert_lifetime: Duration,
    pub worker_threads: usize,
    pub hbone_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub config_poll: Duration,
    pub protocol_detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
}

impl From<Cli> for Config {
    fn from(cli: Cli) -> Config {
        let k = cli.kube;
        let kube = k.kube.then(|| KubeConfig {
            api_url: k.kube_api_url,
            who: crate::kube::Who {
                gateway_namespace: k.gateway_namespace.unwrap_or_default(),
                gateway_name: k.gateway_name.unwrap_or_default(),
                pod_name: k.pod_name.unwrap_or_default(),
            },
            cluster_domain: k.cluster_domain,
            excluded_namespaces: k.excluded_namespaces,
        });
        Config {
            config_file: cli.config,
            kube,
            trust_domain: cli.trust_domain,
            cert_source: match cli.identity.cert_dir {
                Some(d) => CertSource::Dir(d),
                None => CertSource::Ca(cli.identity.ca_dir),
            },
            cert_lifetime: cli.cert_lifetime,
            worker_threads: cli.worker_threads.max(1),
            hbone_addrs: cli.hbone_addrs,
            admin_addr: cli.admin_addr,
            metrics_addr: cli.metrics_addr,
            readiness_addr: cli.readiness_addr,
            config_poll: cli.config_poll,
            protocol_detect_timeout: cli.protocol_detect_timeout,
            connect_timeout: cli.connect_timeout,
            idle_timeout: cli.idle_timeout,
            drain_timeout: cli.drain_timeout,
        }
    }
}

impl Config {
    /// Defaults, with every listener on an ephemeral port of `ip` (tests).
    pub fn for_tests(config_file: PathBuf, cert_source: CertSource, ip: std::net::IpAddr) -> Self {
        let cli = Cli::parse_from(["waypoint", "--config", "unused"]);
        let mut cfg = Config::from(cli);
        cfg.config_file = Some(config_file);
        cfg.cert_source = cert_source;
        let any = SocketAddr::new(ip, 0);
        cfg.hbone_addrs = vec![any];
        cfg.admin_addr = any;
        cfg.metrics_addr = any;
        cfg.readiness_addr = any;
        cfg
    }
}

// ---------------------------------------------------------------------------------------------
// The local config file.

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointFile {
    /// Which entry of `workloads` this waypoint is: its IPs are the address ztunnels send to,
    /// its service account the identity it presents.
    #[serde(default)]
    pub waypoint: Option<SelfRef>,
    /// ztunnel's workload schema.
    #[serde(default)]
    pub workloads: Vec<LocalWorkload>,
    /// ztunnel's service schema; the services whose `waypoint.address` is one of ours are the
    /// ones served.
    #[serde(default)]
    pub services: Vec<LocalService>,
    #[serde(default)]
    pub routes: Vec<HttpRoute>,
    #[serde(default)]
    pub policies: Vec<AuthorizationPolicy>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelfRef {
    pub name: String,
    pub namespace: String,
}

pub fn parse_file(text: &str) -> Result<WaypointFile, ConfigError> {
    parse_yaml(text)
}

// --- HTTPRoute (gateway.networking.k8s.io/v1), the subset a waypoint honours ---------------

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    /// The Services (GAMMA: `kind: Service`, `group: ""`) or the waypoint's Gateway the route
    /// attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// For Gateway parents: the Host names the route answers (`*.example.com` allowed).
    /// Ignored for Service parents, as GAMMA says.
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    /// `""` for Services, `gateway.networking.k8s.io` (the default) for Gateways.
    #[serde(default)]
    pub group: Option<String>,
    /// `Gateway` (the default) or `Service`.
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    /// Defaults to the route's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Only this service port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub section_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Alternatives; none means every request (`PathPrefix /`).
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    #[serde(default)]
    pub retry: Option<Retry>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatch {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: FilterType,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub request_redirect: Option<Redirect>,
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
    #[serde(default)]
    pub port: Option<u16>,
    /// 301, 302 (the default), 303, 307 or 308.
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: PathModifierType,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// `""` (core) only.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` only.
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Service port (required for a Service, as Gateway API says).
    #[serde(default)]
    pub port: Option<u16>,
    /// Relative share of requests (default 1; 0 never picked).
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub filters: Vec<Filter>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Until the response starts, retries included (Gateway API duration: `1s`, `500ms`, `1m30s`).
    #[serde(default)]
    pub request: Option<String>,
    /// One attempt's.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// Gateway API's `HTTPRouteRetry`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Retries after the first attempt (at most 10).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Response codes that are retried (connect failures and resets always are).
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub backoff: Option<String>,
}

// --- AuthorizationPolicy (security.istio.io/v1), L7 rules ---------------------------------

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    /// `kind: Service` (requests to that service) or `kind: Gateway` naming this waypoint
    /// (everything it carries). None: every service this waypoint serves in the policy's
    /// namespace (in the root namespace `istio-system`: every service).
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(default)]
    pub action: Action,
    /// A request matches the policy when any rule matches. None: matches nothing.
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// Every non-empty part must match: one of `from`, one of `to`, all of `when`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    #[serde(default)]
    pub to: Vec<RuleTo>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Source,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Service ports (strings in Istio's schema; numbers are accepted too).
    #[serde(default, deserialize_with = "strings_or_numbers")]
    pub ports: Vec<String>,
    #[serde(default, deserialize_with = "strings_or_numbers")]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Exact, `prefix*`, `*suffix` or `*`; the path without its query.
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// `request.headers[<name>]`, `source.principal`, `source.namespace`, `source.ip`,
    /// `remote.ip`, `destination.ip`, `destination.port`.
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

fn strings_or_numbers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        S(String),
        N(u64),
    }
    Ok(Vec::<V>::deserialize(d)?
        .into_iter()
        .map(|v| match v {
            V::S(s) => s,
            V::N(n) => n.to_string(),
        })
        .collect())
}

/// A Gateway API duration: one to four `<number><unit>` parts, units `h`, `m`, `s`, `ms`
/// (`1s`, `500ms`, `1m30s`).
pub fn parse_gateway_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 500ms, 10s or 1m30s");
    if s.is_empty() {
        return Err(bad());
    }
    let (mut rest, mut total, mut parts) = (s, Duration::ZERO, 0);
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * n as u32;
        parts += 1;
    }
    if parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_port_defaults_to_loopback_only() {
        let cfg = Config::from(Cli::parse_from(["waypoint", "--config", "w.yaml"]));
        assert!(cfg.admin_addr.ip().is_loopback(), "{:?}", cfg.admin_addr);
        assert_eq!(cfg.admin_addr.port(), port::ADMIN);
        // HBONE, metrics and readiness face the node; only the dump is kept local.
        for a in [cfg.metrics_addr, cfg.readiness_addr]
            .into_iter()
            .chain(cfg.hbone_addrs.iter().copied())
        {
            assert!(!a.ip().is_loopback(), "{a}");
        }
        assert_eq!(
            cfg.hbone_addrs,
            [
                "0.0.0.0:15008".parse().unwrap(),
                "[::]:15008".parse().unwrap()
            ]
        );
    }

    #[test]
    fn gateway_durations() {
        assert_eq!(
            parse_gateway_duration("1s").unwrap(),
            Duration::from_secs(1)
        );
        assert_eq!(
            parse_gateway_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_gateway_duration("1m30s").unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(
            parse_gateway_duration("1h1m1s1ms").unwrap(),
            Duration::from_millis(3_661_001)
        );
        for bad in ["", "1", "s", "1d", "1.5s", "123456s", "1h1m1s1ms1h", "-1s"] {
            assert!(parse_gateway_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = parse_file("routes:\n- name: r\n  namespace: d\n  rules:\n  - matchs: []\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("routes[0].rules[0].matchs: unknown field `matchs`"),
            "{err}"
        );
        let err = parse_file(
            "policies:\n- name: p\n  namespace: d\n  rules:\n  - to:\n    - operation: {verbs: [GET]}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("policies[0].rules[0].to[0].operation.verbs: unknown field"),
            "{err}"
        );
        let err = parse_file("waypoint: {name: w, namespace: d}\nroute: []\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("route: unknown field"), "{err}");
    }

    #[test]
    fn ports_as_strings_or_numbers() {
        let f = parse_file(
            "policies:\n- name: p\n  namespace: d\n  rules:\n  - to:\n    - operation: {ports: [\"80\", 8080]}\n",
        )
        .unwrap();
        assert_eq!(f.policies[0].rules[0].to[0].operation.ports, ["80", "8080"]);
        assert_eq!(f.policies[0].action, Action::Allow);
    }
}
