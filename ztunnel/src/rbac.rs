//! Authorization: compiled policies and their evaluation for one connection.
//!
//! Semantics (Istio's): of the policies that select the destination workload, any matching
//! `Deny` refuses; then, if at least one `Allow` policy selects it, one of them must match;
//! otherwise the connection is allowed. A policy matches when any of its rules does; a rule
//! matches when every non-empty field does (its values are alternatives) and no value of a
//! `not*` field does. Plaintext connections have no identity: identity fields never match them
//! and `not*` identity fields always do.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::Serialize;

use crate::config::{ConfigError, LocalPolicy, LocalRule, PolicyAction, PolicyScope};
use crate::identity::Identity;

/// `*`, `prefix*`, `*suffix` or an exact string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum StringMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl From<StringMatch> for String {
    fn from(m: StringMatch) -> String {
        match m {
            StringMatch::Any => "*".into(),
            StringMatch::Exact(s) => s,
            StringMatch::Prefix(p) => format!("{p}*"),
            StringMatch::Suffix(s) => format!("*{s}"),
        }
    }
}

impl StringMatch {
    pub fn parse(s: &str) -> StringMatch {
        if s == "*" {
            StringMatch::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            StringMatch::Suffix(p.to_string())
        } else {
            StringMatch::Exact(s.to_string())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Any => true,
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    pub rules: Vec<Rule>,
}

/// What the decision looks at.
#[derive(Debug, Clone)]
pub struct Connection<'a> {
    /// The verified peer identity (None for plaintext).
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    /// The destination workload address and target port.
    pub dst: SocketAddr,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("denied by policy {0}")]
    DenyPolicy(String),
    #[error("no allow policy matched ({0} apply)")]
    NoAllowMatch(usize),
    #[error("the destination is behind waypoint {0}: connections must come from it")]
    BypassedWaypoint(String),
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Compiles a policy of the file; `field` is its path (`policies[3]`) for errors.
    pub fn compile(p: &LocalPolicy, field: &str) -> Result<Policy, ConfigError> {
        if p.name.is_empty() {
            return Err(ConfigError::invalid(
                format!("{field}.name"),
                "must not be empty",
            ));
        }
        let rules = p
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule::compile(r, &format!("{field}.rules[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            scope: p.scope,
            action: p.action,
            rules,
        })
    }

    pub fn matches(&self, c: &Connection) -> bool {
        self.rules.iter().any(|r| r.matches(c))
    }
}

/// Addresses or CIDRs (`10.0.0.1`, `10.0.0.0/24`); `field` names the list for errors. Shared
/// with the waypoint's policies.
pub fn cidrs(v: &[String], field: &str) -> Result<Vec<IpNet>, ConfigError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    ConfigError::invalid(
                        format!("{field}[{i}]"),
                        format!("{s:?} is not an IP address or CIDR"),
                    )
                })
        })
        .collect()
}

fn service_accounts(v: &[String], field: &str) -> Result<Vec<(String, String)>, ConfigError> {
    v.iter()
        .enumerate()
        .map(|(i, s)| match s.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok((ns.to_string(), sa.to_string()))
            }
            _ => Err(ConfigError::invalid(
                format!("{field}[{i}]"),
                format!("{s:?} is not <namespace>/<serviceaccount>"),
            )),
        })
        .collect()
}

/// Principals `<td>/ns/<ns>/sa/<sa>` (a `spiffe://` prefix accepted), wildcards allowed.
pub fn principals(v: &[String]) -> Vec<StringMatch> {
    v.iter()
        .map(|s| StringMatch::parse(s.strip_prefix("spiffe://").unwrap_or(s)))
        .collect()
}

/// `*`, `prefix*`, `*suffix` or exact strings.
pub fn strings(v: &[String]) -> Vec<StringMatch> {
    v.iter().map(|s| StringMatch::parse(s)).collect()
}

impl Rule {
    pub fn compile(r: &LocalRule, field: &str) -> Result<Rule, ConfigError> {
        Ok(Rule {
            namespaces: strings(&r.namespaces),
            not_namespaces: strings(&r.not_namespaces),
            principals: principals(&r.principals),
            not_principals: principals(&r.not_principals),
            service_accounts: service_accounts(
                &r.service_accounts,
                &format!("{field}.serviceAccounts"),
            )?,
            not_service_accounts: service_accounts(
                &r.not_service_accounts,
                &format!("{field}.notServiceAccounts"),
            )?,
            source_ips: cidrs(&r.source_ips, &format!("{field}.sourceIps"))?,
            not_source_ips: cidrs(&r.not_source_ips, &format!("{field}.notSourceIps"))?,
            destination_ports: r.destination_ports.clone(),
            not_destination_ports: r.not_destination_ports.clone(),
        })
    }

    pub fn matches(&self, c: &Connection) -> bool {
        // Positive fields: empty = no constraint; otherwise one value must match.
        fn any<T>(v: &[T], f: impl Fn(&T) -> bool) -> bool {
            v.is_empty() || v.iter().any(f)
        }
        // Negative fields: no value may match.
        fn none<T>(v: &[T], f: impl Fn(&T) -> bool) -> bool {
            !v.iter().any(f)
        }
        let id = c.src_identity;
        let ns = |m: &StringMatch| id.is_some_and(|i| m.matches(&i.namespace));
        let principal = |m: &StringMatch| id.is_some_and(|i| m.matches(&i.principal()));
        let sa = |(n, s): &(String, String)| {
            id.is_some_and(|i| &i.namespace == n && &i.service_account == s)
        };
        let ip = |n: &IpNet| n.contains(&c.src_ip);
        let port = |p: &u16| *p == c.dst.port();
        any(&self.namespaces, ns)
            && none(&self.not_namespaces, ns)
            && any(&self.principals, principal)
            && none(&self.not_principals, principal)
            && any(&self.service_accounts, sa)
            && none(&self.not_service_accounts, sa)
            && any(&self.source_ips, ip)
            && none(&self.not_source_ips, ip)
            && any(&self.destination_ports, port)
            && none(&self.not_destination_ports, port)
    }
}

/// Decides one connection against the policies that select its destination workload.
pub fn authorize<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    c: &Connection,
) -> Result<(), Denied> {
    decide(
        policies,
        |p| p.action == PolicyAction::Deny,
        |p| p.matches(c),
        |p| p.key(),
    )
}

/// Istio's decision over the policies that apply, shared by ztunnel (L4) and the waypoint
/// (L7): a matching DENY refuses (naming it by `key`); then, if any ALLOW applies, one must
/// match.
pub fn decide<P>(
    policies: impl IntoIterator<Item = P>,
    is_deny: impl Fn(&P) -> bool,
    matches: impl Fn(&P) -> bool,
    key: impl Fn(&P) -> String,
) -> Result<(), Denied> {
    let mut allows = 0usize;
    let mut allowed = false;
    for p in policies {
        if is_deny(&p) {
            if matches(&p) {
                return Err(Denied::DenyPolicy(key(&p)));
            }
        } else {
            allows += 1;
            allowed = allowed || matches(&p);
        }
    }
    if allows > 0 && !allowed {
        return Err(Denied::NoAllowMatch(allows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(action: PolicyAction, rules: Vec<LocalRule>) -> Policy {
        let p = LocalPolicy {
            name: "p".into(),
            namespace: "demo".into(),
            scope: PolicyScope::Namespace,
            action,
            rules,
        };
        Policy::compile(&p, "policies[0]").unwrap()
    }

    fn sleep() -> Identity {
        Identity::new("cluster.local", "demo", "sleep")
    }

    fn conn<'a>(id: Option<&'a Identity>, ip: &str, port: u16) -> Connection<'a> {
        Connection {
            src_identity: id,
            src_ip: ip.parse().unwrap(),
            dst: SocketAddr::new("10.0.0.9".parse().unwrap(), port),
        }
    }

    #[test]
    fn no_policy_allows() {
        let id = sleep();
        assert_eq!(authorize([], &conn(Some(&id), "10.0.0.1", 80)), Ok(()));
    }

    #[test]
    fn deny_is_evaluated_before_allow() {
        let id = sleep();
        let allow_all = policy(PolicyAction::Allow, vec![LocalRule::default()]);
        let deny_sleep = policy(
            PolicyAction::Deny,
            vec![LocalRule {
                principals: vec!["cluster.local/ns/demo/sa/sleep".into()],
                ..Default::default()
            }],
        );
        let c = conn(Some(&id), "10.0.0.1", 80);
        assert_eq!(
            authorize([&allow_all, &deny_sleep], &c),
            Err(Denied::DenyPolicy("demo/p".into()))
        );
        let other = Identity::new("cluster.local", "demo", "other");
        assert_eq!(
            authorize(
                [&allow_all, &deny_sleep],
                &conn(Some(&other), "10.0.0.1", 80)
            ),
            Ok(())
        );
    }

    #[test]
    fn an_allow_policy_selecting_the_workload_must_match() {
        let id = sleep();
        let allow_sleep = policy(
            PolicyAction::Allow,
            vec![LocalRule {
                principals: vec!["spiffe://cluster.local/ns/demo/sa/sleep".into()],
                ..Default::default()
            }],
        );
        assert_eq!(
            authorize([&allow_sleep], &conn(Some(&id), "10.0.0.1", 80)),
            Ok(())
        );
        let other = Identity::new("cluster.local", "demo", "other");
        assert_eq!(
            authorize([&allow_sleep], &conn(Some(&other), "10.0.0.1", 80)),
            Err(Denied::NoAllowMatch(1))
        );
        // Plaintext has no principal.
        assert!(authorize([&allow_sleep], &conn(None, "10.0.0.1", 80)).is_err());
        // An allow policy without rules allows nothing.
        let allow_nothing = policy(PolicyAction::Allow, vec![]);
        assert!(authorize([&allow_nothing], &conn(Some(&id), "10.0.0.1", 80)).is_err());
    }

    #[test]
    fn not_fields_and_conjunction() {
        let id = sleep();
        let deny = policy(
            PolicyAction::Deny,
            vec![LocalRule {
                namespaces: vec!["dem*".into()],
                not_source_ips: vec!["10.0.0.0/24".into()],
                not_destination_ports: vec![22],
                ..Default::default()
            }],
        );
        // In namespace, from outside 10.0.0.0/24, port not 22: denied.
        assert!(authorize([&deny], &conn(Some(&id), "10.1.0.1", 80)).is_err());
        // From inside the excluded range: not denied.
        assert!(authorize([&deny], &conn(Some(&id), "10.0.0.7", 80)).is_ok());
        // To the excluded port: not denied.
        assert!(authorize([&deny], &conn(Some(&id), "10.1.0.1", 22)).is_ok());
        // Plaintext: `namespaces` cannot match.
        assert!(authorize([&deny], &conn(None, "10.1.0.1", 80)).is_ok());

        let deny_not_sa = policy(
            PolicyAction::Deny,
            vec![LocalRule {
                not_service_accounts: vec!["demo/sleep".into()],
                destination_ports: vec![80, 443],
                ..Default::default()
            }],
        );
        assert!(authorize([&deny_not_sa], &conn(Some(&id), "10.0.0.1", 80)).is_ok());
        let other = Identity::new("cluster.local", "demo", "other");
        assert!(authorize([&deny_not_sa], &conn(Some(&other), "10.0.0.1", 443)).is_err());
        assert!(authorize([&deny_not_sa], &conn(Some(&other), "10.0.0.1", 8080)).is_ok());
        // Plaintext is "not" any service account.
        assert!(authorize([&deny_not_sa], &conn(None, "10.0.0.1", 80)).is_err());
    }

    #[test]
    fn rules_are_alternatives() {
        let allow = policy(
            PolicyAction::Allow,
            vec![
                LocalRule {
                    source_ips: vec!["192.168.1.5".into()],
                    ..Default::default()
                },
                LocalRule {
                    not_principals: vec!["*".into()],
                    destination_ports: vec![8080],
                    ..Default::default()
                },
            ],
        );
        assert!(authorize([&allow], &conn(None, "192.168.1.5", 1)).is_ok());
        assert!(authorize([&allow], &conn(None, "192.168.1.6", 8080)).is_ok());
        let id = sleep();
        assert!(authorize([&allow], &conn(Some(&id), "192.168.1.6", 8080)).is_err());
    }

    #[test]
    fn bad_values_name_their_field() {
        let p = LocalPolicy {
            name: "p".into(),
            namespace: "demo".into(),
            scope: PolicyScope::Global,
            action: PolicyAction::Deny,
            rules: vec![
                LocalRule::default(),
                LocalRule {
                    source_ips: vec!["10.0.0.0/8".into(), "nope".into()],
                    ..Default::default()
                },
            ],
        };
        let err = Policy::compile(&p, "policies[2]").unwrap_err().to_string();
        assert!(
            err.starts_with("policies[2].rules[1].sourceIps[1]"),
            "{err}"
        );
        let p = LocalPolicy {
            rules: vec![LocalRule {
                service_accounts: vec!["sleep".into()],
                ..Default::default()
            }],
            ..p
        };
        let err = Policy::compile(&p, "policies[0]").unwrap_err().to_string();
        assert!(
            err.starts_with("policies[0].rules[0].serviceAccounts[0]"),
            "{err}"
        );
    }

    #[test]
    fn v6_addresses_and_cidrs() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let nets = cidrs(
            &list(&[
                "fd00:77::11",
                "fd00:10::/64",
                "2001:db8::1/48",
                "10.0.0.0/8",
            ]),
            "f",
        )
        .unwrap();
        assert_eq!(nets[0].to_string(), "fd00:77::11/128");
        assert_eq!(nets[1].to_string(), "fd00:10::/64");
        for bad in ["fd00::/129", "[fd00::1]", "fd00:::1", "fd00::1/"] {
            let err = cidrs(&list(&[bad]), "f").unwrap_err().to_string();
            assert!(err.starts_with("f[0]"), "{bad}: {err}");
        }
        // A v6 block matches v6 sources inside it, never another family's.
        let allow = policy(
            PolicyAction::Allow,
            vec![LocalRule {
                source_ips: list(&["fd00:10::/64"]),
                ..Default::default()
            }],
        );
        let deny = policy(
            PolicyAction::Deny,
            vec![LocalRule {
                not_source_ips: list(&["fd00:10::/64", "10.0.0.0/8"]),
                ..Default::default()
            }],
        );
        let id = sleep();
        let c = |ip: &str| Connection {
            src_identity: Some(&id),
            src_ip: ip.parse().unwrap(),
            dst: "[fd00:20::1]:80".parse().unwrap(),
        };
        assert_eq!(authorize([&allow], &c("fd00:10::5")), Ok(()));
        assert!(authorize([&allow], &c("fd00:11::5")).is_err());
        assert!(authorize([&allow], &c("10.0.0.5")).is_err());
        assert!(authorize([&deny], &c("fd00:10::ffff")).is_ok());
        assert!(authorize([&deny], &c("fd00:99::1")).is_err());
    }
}
