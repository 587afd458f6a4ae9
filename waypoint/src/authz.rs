//! L7 authorization: Istio `AuthorizationPolicy` semantics for the requests the waypoint
//! carries.
//!
//! Of the policies that apply to the destination service, any matching `DENY` refuses; then,
//! if at least one `ALLOW` applies, one must match; otherwise the request is allowed. A policy
//! matches when one of its rules does (no rules: never); a rule when one of its `from`, one of
//! its `to` and all of its `when` match (an empty part matches). Within a source or operation
//! every non-empty field must match one of its values and no value of a `not*` field may.
//!
//! A connection relayed at L4 has no HTTP attributes. As Istio does, a rule that needs one
//! (hosts, methods, paths, request headers) never matches in an `ALLOW` policy and is judged
//! without that field in a `DENY` policy: the result errs on the side of refusing.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;
use serde::Serialize;
use ztunnel::config::ConfigError;
use ztunnel::identity::Identity;
use ztunnel::rbac::{cidrs, principals, strings, StringMatch};

use crate::config::{Action, AuthorizationPolicy, Condition, Operation, PolicyRule, Source};

/// Istio's root namespace: a policy there without targets applies to every service.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// What a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Target {
    /// Requests to this service (`<namespace>/<name>`).
    Service { namespace: String, name: String },
    /// Everything this waypoint carries.
    Waypoint,
    /// Services in this namespace (None: every namespace).
    Namespace(Option<String>),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub action: Action,
    pub targets: Vec<Target>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub from: Vec<SourceMatch>,
    pub to: Vec<OperationMatch>,
    pub when: Vec<When>,
}

/// Values and negated values of one field.
#[derive(Debug, Clone, Serialize)]
pub struct Field<T> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<T>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            values: Vec::new(),
            not: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not.is_empty()
    }

    /// `matches(v)` says whether value `v` of the field matches the request.
    fn check(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&matches))
            && !self.not.iter().any(&matches)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceMatch {
    pub principals: Field<StringMatch>,
    pub namespaces: Field<StringMatch>,
    pub ip_blocks: Field<IpNet>,
    pub remote_ip_blocks: Field<IpNet>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationMatch {
    pub hosts: Field<StringMatch>,
    pub ports: Field<u16>,
    pub methods: Field<String>,
    pub paths: Field<StringMatch>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct When {
    pub key: Key,
    pub values: Field<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Key {
    RequestHeader(String),
    SourcePrincipal,
    SourceNamespace,
    SourceIp,
    RemoteIp,
    DestinationIp,
    DestinationPort,
}

/// The HTTP side of a request (None for a connection relayed at L4).
pub struct HttpAttrs<'a> {
    /// The Host (or `:authority`).
    pub host: &'a str,
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// Everything a decision looks at.
pub struct Attrs<'a> {
    pub principal: Option<&'a Identity>,
    /// The client's address (from the tunnel's verified `forwarded` header).
    pub source_ip: IpAddr,
    /// The address the waypoint's peer connected from.
    pub remote_ip: IpAddr,
    pub destination_ip: IpAddr,
    /// The service port.
    pub destination_port: u16,
    pub http: Option<HttpAttrs<'a>>,
}

pub use ztunnel::rbac::Denied;

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Does it apply to a request for service `namespace/name`?
    pub fn applies_to(&self, namespace: &str, name: &str) -> bool {
        self.targets.iter().any(|t| match t {
            Target::Service {
                namespace: n,
                name: s,
            } => n == namespace && s == name,
            Target::Waypoint => true,
            Target::Namespace(None) => true,
            Target::Namespace(Some(n)) => n == namespace,
        })
    }

    pub fn compile(
        p: &AuthorizationPolicy,
        waypoint: (&str, &str),
        field: &str,
    ) -> Result<Policy, ConfigError> {
        if p.name.is_empty() || p.namespace.is_empty() {
            return Err(ConfigError::invalid(
                field,
                "name and namespace must not be empty",
            ));
        }
        let targets = if p.target_refs.is_empty() {
            vec![Target::Namespace(
                (p.namespace != ROOT_NAMESPACE).then(|| p.namespace.clone()),
            )]
        } else {
            p.target_refs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let tf = format!("{field}.targetRefs[{i}]");
                    let ns = t.namespace.clone().unwrap_or_else(|| p.namespace.clone());
                    match (t.kind.as_str(), t.group.as_deref().unwrap_or("")) {
                        ("Service", "") => Ok(Target::Service {
                            namespace: ns,
                            name: t.name.clone(),
                        }),
                        ("Gateway", "" | "gateway.networking.k8s.io") => {
                            if (ns.as_str(), t.name.as_str()) != waypoint {
                                return Err(ConfigError::invalid(
                                    tf,
                                    format!(
                                        "Gateway {ns}/{} is not this waypoint ({}/{})",
                                        t.name, waypoint.0, waypoint.1
                                    ),
                                ));
                            }
                            Ok(Target::Waypoint)
                        }
                        (k, g) => Err(ConfigError::invalid(
                            format!("{tf}.kind"),
                            format!("{k:?} (group {g:?}): a target is a Service or the waypoint's Gateway"),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?
        };
        let rules = p
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule::compile(r, &format!("{field}.rules[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            action: p.action,
            targets,
            rules,
        })
    }

    fn matches(&self, a: &Attrs) -> bool {
        self.rules.iter().any(|r| r.matches(a, self.action))
    }
}

fn lower(v: &[String]) -> Vec<StringMatch> {
    v.iter()
        .map(|s| StringMatch::parse(&s.to_ascii_lowercase()))
        .collect()
}

fn ports(v: &[String], field: &str) -> Result<Vec<u16>, ConfigError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<u16>().map_err(|_| {
                ConfigError::invalid(format!("{field}[{i}]"), format!("{s:?} is not a port"))
            })
        })
        .collect()
}

impl SourceMatch {
    fn compile(s: &Source, field: &str) -> Result<SourceMatch, ConfigError> {
        Ok(SourceMatch {
            principals: Field {
                values: principals(&s.principals),
                not: principals(&s.not_principals),
            },
            namespaces: Field {
                values: strings(&s.namespaces),
                not: strings(&s.not_namespaces),
            },
            ip_blocks: Field {
                values: cidrs(&s.ip_blocks, &format!("{field}.ipBlocks"))?,
                not: cidrs(&s.not_ip_blocks, &format!("{field}.notIpBlocks"))?,
            },
            remote_ip_blocks: Field {
                values: cidrs(&s.remote_ip_blocks, &format!("{field}.remoteIpBlocks"))?,
                not: cidrs(
                    &s.not_remote_ip_blocks,
                    &format!("{field}.notRemoteIpBlocks"),
                )?,
            },
        })
    }

    fn matches(&self, a: &Attrs) -> bool {
        let principal = |m: &StringMatch| a.principal.is_some_and(|p| m.matches(&p.principal()));
        let namespace = |m: &StringMatch| a.principal.is_some_and(|p| m.matches(&p.namespace));
        self.principals.check(principal)
            && self.namespaces.check(namespace)
            && self.ip_blocks.check(|n| n.contains(&a.source_ip))
            && self.remote_ip_blocks.check(|n| n.contains(&a.remote_ip))
    }
}

impl OperationMatch {
    fn compile(o: &Operation, field: &str) -> Result<OperationMatch, ConfigError> {
        Ok(OperationMatch {
            hosts: Field {
                values: lower(&o.hosts),
                not: lower(&o.not_hosts),
            },
            ports: Field {
                values: ports(&o.ports, &format!("{field}.ports"))?,
                not: ports(&o.not_ports, &format!("{field}.notPorts"))?,
            },
            methods: Field {
                values: o.methods.clone(),
                not: o.not_methods.clone(),
            },
            paths: Field {
                values: strings(&o.paths),
                not: strings(&o.not_paths),
            },
        })
    }

    fn needs_http(&self) -> bool {
        !self.hosts.is_empty() || !self.methods.is_empty() || !self.paths.is_empty()
    }

    /// `http` is None at L4, where only the port is judged (see the module docs for what
    /// the caller does about the rest).
    fn matches(&self, a: &Attrs) -> bool {
        let port_ok = self.ports.check(|p| *p == a.destination_port);
        let Some(h) = &a.http else {
            return port_ok;
        };
        let host = h.host.to_ascii_lowercase();
        let bare = crate::route::host_without_port(&host);
        port_ok
            && self.hosts.check(|m| m.matches(&host) || m.matches(bare))
            && self.methods.check(|m| m == h.method)
            && self.paths.check(|m| m.matches(h.path))
    }
}

impl When {
    fn compile(c: &Condition, field: &str) -> Result<When, ConfigError> {
        let key = if let Some(name) = c
            .key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
        {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::invalid(
                    format!("{field}.key"),
                    format!("{name:?} is not a header name"),
                ));
            }
            Key::RequestHeader(name.to_ascii_lowercase())
        } else {
            match c.key.as_str() {
                "source.principal" => Key::SourcePrincipal,
                "source.namespace" => Key::SourceNamespace,
                "source.ip" => Key::SourceIp,
                "remote.ip" => Key::RemoteIp,
                "destination.ip" => Key::DestinationIp,
                "destination.port" => Key::DestinationPort,
                other => {
                    return Err(ConfigError::invalid(
                        format!("{field}.key"),
                        format!(
                            "{other:?} is not supported (request.headers[<name>], source.principal, source.namespace, source.ip, remote.ip, destination.ip, destination.port)"
                        ),
                    ))
                }
            }
        };
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(ConfigError::invalid(
                field,
                "a condition needs values or notValues",
            ));
        }
        let values = Field {
            values: c.values.clone(),
            not: c.not_values.clone(),
        };
        // Address conditions take CIDRs: check them now rather than never matching.
        if matches!(key, Key::SourceIp | Key::RemoteIp | Key::DestinationIp) {
            cidrs(&values.values, &format!("{field}.values"))?;
            cidrs(&values.not, &format!("{field}.notValues"))?;
        }
        Ok(When { key, values })
    }

    fn needs_http(&self) -> bool {
        matches!(self.key, Key::RequestHeader(_))
    }

    fn matches(&self, a: &Attrs) -> bool {
        let ip_in = |ip: IpAddr| {
            move |v: &String| {
                v.parse::<IpNet>()
                    .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                    .is_ok_and(|n| n.contains(&ip))
            }
        };
        match &self.key {
            Key::RequestHeader(name) => {
                let Some(h) = &a.http else { return true };
                let got: Vec<&str> = h
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                self.values.check(|v| {
                    let m = StringMatch::parse(v);
                    got.iter().any(|g| m.matches(g))
                })
            }
            Key::SourcePrincipal => self.values.check(|v| {
                let m = StringMatch::parse(v.strip_prefix("spiffe://").unwrap_or(v));
                a.principal.is_some_and(|p| m.matches(&p.principal()))
            }),
            Key::SourceNamespace => self.values.check(|v| {
                a.principal
                    .is_some_and(|p| StringMatch::parse(v).matches(&p.namespace))
            }),
            Key::SourceIp => self.values.check(ip_in(a.source_ip)),
            Key::RemoteIp => self.values.check(ip_in(a.remote_ip)),
            Key::DestinationIp => self.values.check(ip_in(a.destination_ip)),
            Key::DestinationPort => self
                .values
                .check(|v| v.parse::<u16>().is_ok_and(|p| p == a.destination_port)),
        }
    }
}

impl Rule {
    fn compile(r: &PolicyRule, field: &str) -> Result<Rule, ConfigError> {
        Ok(Rule {
            from: r
                .from
                .iter()
                .enumerate()
                .map(|(i, f)| SourceMatch::compile(&f.source, &format!("{field}.from[{i}].source")))
                .collect::<Result<_, _>>()?,
            to: r
                .to
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    OperationMatch::compile(&t.operation, &format!("{field}.to[{i}].operation"))
                })
                .collect::<Result<_, _>>()?,
            when: r
                .when
                .iter()
                .enumerate()
                .map(|(i, c)| When::compile(c, &format!("{field}.when[{i}]")))
                .collect::<Result<_, _>>()?,
        })
    }

    fn matches(&self, a: &Attrs, action: Action) -> bool {
        if a.http.is_none() && action == Action::Allow {
            // An ALLOW that needs HTTP attributes cannot be satisfied by a TCP connection.
            let needs_http =
                self.to.iter().any(|o| o.needs_http()) || self.when.iter().any(|w| w.needs_http());
            if needs_http {
                return false;
            }
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a)))
            && self.when.iter().all(|w| w.matches(a))
    }
}

/// Decides one request against the policies that apply to its destination (the decision
/// procedure is ztunnel's, [`ztunnel::rbac::decide`]).
pub fn authorize<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    a: &Attrs,
) -> Result<(), Denied> {
    ztunnel::rbac::decide(
        policies,
        |p| p.action == Action::Deny,
        |p| p.matches(a),
        |p| p.key(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_file;

    fn policies(yaml: &str) -> Vec<Policy> {
        let f = parse_file(yaml).unwrap();
        f.policies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Policy::compile(p, ("demo", "waypoint"), &format!("policies[{i}]")).unwrap()
            })
            .collect()
    }

    struct Req {
        principal: Option<Identity>,
        ip: IpAddr,
        port: u16,
        method: &'static str,
        path: &'static str,
        headers: HeaderMap,
    }

    fn req(sa: &str, method: &'static str, path: &'static str) -> Req {
        Req {
            principal: Some(Identity::new("cluster.local", "demo", sa)),
            ip: "10.244.1.4".parse().unwrap(),
            port: 80,
            method,
            path,
            headers: HeaderMap::new(),
        }
    }

    fn decide(ps: &[Policy], r: &Req, l4: bool) -> Result<(), Denied> {
        let a = Attrs {
            principal: r.principal.as_ref(),
            source_ip: r.ip,
            remote_ip: r.ip,
            destination_ip: "10.96.0.20".parse().unwrap(),
            destination_port: r.port,
            http: (!l4).then_some(HttpAttrs {
                host: "reviews:80",
                method: r.method,
                path: r.path,
                headers: &r.headers,
            }),
        };
        authorize(ps.iter().filter(|p| p.applies_to("demo", "reviews")), &a)
    }

    #[test]
    fn deny_on_a_path_leaves_other_paths() {
        let ps = policies(
            r#"
policies:
- name: no-admin
  namespace: demo
  targetRefs: [{kind: Service, name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#,
        );
        assert_eq!(
            decide(&ps, &req("client", "GET", "/admin/x"), false),
            Err(Denied::DenyPolicy("demo/no-admin".into()))
        );
        assert!(decide(&ps, &req("client", "GET", "/reviews"), false).is_ok());
        // At L4 the path cannot be known: the DENY is judged without it and refuses.
        assert!(decide(&ps, &req("client", "GET", "/reviews"), true).is_err());
    }

    #[test]
    fn allow_only_a_method_from_a_principal() {
        let ps = policies(
            r#"
policies:
- name: get-only
  namespace: demo
  targetRefs: [{kind: Service, name: reviews}]
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
    to: [{operation: {methods: [GET, HEAD]}}]
"#,
        );
        assert!(decide(&ps, &req("client", "GET", "/"), false).is_ok());
        assert!(decide(&ps, &req("client", "HEAD", "/"), false).is_ok());
        assert_eq!(
            decide(&ps, &req("client", "POST", "/"), false),
            Err(Denied::NoAllowMatch(1))
        );
        assert!(decide(&ps, &req("other", "GET", "/"), false).is_err());
        // An ALLOW that needs a method never admits a TCP connection.
        assert!(decide(&ps, &req("client", "GET", "/"), true).is_err());
    }

    #[test]
    fn not_fields_ip_blocks_and_conditions() {
        let ps = policies(
            r#"
policies:
- name: rules
  namespace: demo
  rules:
  - from: [{source: {notNamespaces: [kube-system], ipBlocks: [10.244.0.0/16], notIpBlocks: [10.244.9.0/24]}}]
    to: [{operation: {notPaths: ["*.php"], ports: ["80"]}}]
    when:
    - {key: "request.headers[x-token]", values: ["secret-*"]}
    - {key: source.principal, notValues: ["*/sa/blocked"]}
"#,
        );
        let mut r = req("client", "GET", "/x");
        assert!(decide(&ps, &r, false).is_err(), "no header");
        r.headers.insert("x-token", "secret-1".parse().unwrap());
        assert!(decide(&ps, &r, false).is_ok());
        let mut blocked = req("blocked", "GET", "/x");
        blocked.headers = r.headers.clone();
        assert!(decide(&ps, &blocked, false).is_err());
        let mut php = req("client", "GET", "/index.php");
        php.headers = r.headers.clone();
        assert!(decide(&ps, &php, false).is_err());
        r.ip = "10.244.9.7".parse().unwrap();
        assert!(decide(&ps, &r, false).is_err(), "notIpBlocks");
        r.ip = "10.244.1.4".parse().unwrap();
        r.port = 8080;
        assert!(decide(&ps, &r, false).is_err(), "ports");
        // A plaintext (no principal) client fails a principal notValues? No: nothing to
        // exclude, but an identity is needed for positive matches only.
        let mut anon = req("client", "GET", "/x");
        anon.principal = None;
        anon.headers = req_headers("secret-2");
        assert!(decide(&ps, &anon, false).is_ok());
    }

    fn req_headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-token", token.parse().unwrap());
        h
    }

    #[test]
    fn deny_beats_allow_and_policies_without_rules_match_nothing() {
        let ps = policies(
            r#"
policies:
- {name: allow-all, namespace: demo, rules: [{}]}
- {name: deny-post, namespace: demo, action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}
- {name: empty-deny, namespace: demo, action: DENY}
- {name: other-ns, namespace: prod, action: DENY, rules: [{}]}
"#,
        );
        assert!(decide(&ps, &req("client", "GET", "/"), false).is_ok());
        assert_eq!(
            decide(&ps, &req("client", "POST", "/"), false),
            Err(Denied::DenyPolicy("demo/deny-post".into()))
        );
        // An ALLOW without rules denies everything.
        let ps = policies("policies:\n- {name: nothing, namespace: demo}\n");
        assert!(decide(&ps, &req("client", "GET", "/"), false).is_err());
        // The root namespace applies everywhere.
        let ps = policies(
            "policies:\n- {name: all, namespace: istio-system, action: DENY, rules: [{}]}\n",
        );
        assert!(decide(&ps, &req("client", "GET", "/"), false).is_err());
    }

    #[test]
    fn bad_policies_are_named() {
        let bad = |yaml: &str| {
            let f = parse_file(yaml).unwrap();
            Policy::compile(&f.policies[0], ("demo", "waypoint"), "policies[0]")
                .unwrap_err()
                .to_string()
        };
        let e = bad("policies:\n- {name: p, namespace: demo, rules: [{when: [{key: request.auth.claims, values: [x]}]}]}\n");
        assert!(e.starts_with("policies[0].rules[0].when[0].key"), "{e}");
        let e = bad("policies:\n- {name: p, namespace: demo, rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]}\n");
        assert!(
            e.starts_with("policies[0].rules[0].from[0].source.ipBlocks[0]"),
            "{e}"
        );
        let e = bad("policies:\n- {name: p, namespace: demo, rules: [{to: [{operation: {ports: [http]}}]}]}\n");
        assert!(
            e.starts_with("policies[0].rules[0].to[0].operation.ports[0]"),
            "{e}"
        );
        let e = bad(
            "policies:\n- {name: p, namespace: demo, targetRefs: [{kind: Gateway, name: other}]}\n",
        );
        assert!(e.contains("is not this waypoint"), "{e}");
    }
}
