//! HTTP routing: `HTTPRoute`s compiled against the services of the file, and the choice of a
//! rule for a request.
//!
//! Every match of every rule of the routes attached to a service becomes one candidate; the
//! candidates are sorted once by Gateway API precedence and the first that matches a request
//! wins:
//!
//! 1. an `Exact` path, then a `RegularExpression` (where Gateway API leaves the order to the
//!    implementation; Istio's), then a `PathPrefix`, longer prefixes first;
//! 2. a match with a method before one without;
//! 3. more header matches first, then more query parameter matches;
//! 4. the route that comes first in the file (standing in for the oldest), then by
//!    `<namespace>/<name>`, then rule and match order.
//!
//! No candidate matches: the request goes to the service it was sent to (as if there were no
//! route).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;
use serde::Serialize;
use ztunnel::config::ConfigError;
use ztunnel::state::{Service, State};

use crate::config::{
    parse_gateway_duration, BackendRef, Filter, FilterType, HeaderModifier, HttpRoute,
    PathMatchType, PathModifier, PathModifierType, RouteMatch, RouteRule, ValueMatchType,
};

/// Retries of a rule without a `retry` (Istio's default: two more attempts on connect
/// failure, reset or 503).
pub const DEFAULT_RETRIES: u32 = 2;
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
const MAX_RETRIES: u32 = 10;

/// How a request path is matched.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatch {
    Exact(String),
    /// Stored without a trailing `/`; `""` is `/` (everything).
    PathPrefix(String),
    RegularExpression(#[serde(with = "regex_text")] Regex),
}

mod regex_text {
    pub fn serialize<S: serde::Serializer>(r: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.as_str())
    }
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            // By path element: `/foo` matches `/foo`, `/foo/`, `/foo/bar`, not `/foobar`.
            PathMatch::PathPrefix(p) => {
                p.is_empty()
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::RegularExpression(r) => r.is_match(path),
        }
    }

    fn rank(&self) -> (u8, isize) {
        match self {
            PathMatch::Exact(p) => (0, -(p.len() as isize)),
            PathMatch::RegularExpression(r) => (1, -(r.as_str().len() as isize)),
            PathMatch::PathPrefix(p) => (2, -(p.len() as isize)),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum ValueMatch {
    Exact(String),
    RegularExpression(#[serde(with = "regex_text")] Regex),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => v == e,
            ValueMatch::RegularExpression(r) => r.is_match(v),
        }
    }
}

/// One compiled `matches[]` entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    pub path: PathMatch,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, ValueMatch)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<(String, ValueMatch)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "method_text")]
    pub method: Option<Method>,
}

fn method_text<S: serde::Serializer>(m: &Option<Method>, s: S) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.serialize_str(m.as_str()),
        None => s.serialize_none(),
    }
}

/// What a match looks at.
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Match {
    pub fn matches(&self, r: &RequestView) -> bool {
        if !self.path.matches(r.path) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| m != r.method) {
            return false;
        }
        let header_ok = |(name, m): &(String, ValueMatch)| {
            r.headers
                .get_all(name.as_str())
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
        };
        if !self.headers.iter().all(header_ok) {
            return false;
        }
        self.query_params.iter().all(|(name, m)| {
            query_value(r.query.unwrap_or(""), name).is_some_and(|v| m.matches(&v))
        })
    }
}

/// The first value of query parameter `name` (percent-decoded), as Gateway API says.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A header modifier with validated names and values.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderEdit {
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "pairs")]
    pub set: Vec<(HeaderName, HeaderValue)>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "pairs")]
    pub add: Vec<(HeaderName, HeaderValue)>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "names")]
    pub remove: Vec<HeaderName>,
}

fn pairs<S: serde::Serializer>(v: &[(HeaderName, HeaderValue)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for (n, val) in v {
        seq.serialize_element(&(n.as_str(), val.to_str().unwrap_or("")))?;
    }
    seq.end()
}

fn names<S: serde::Serializer>(v: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|n| n.as_str()))
}

impl HeaderEdit {
    /// Gateway API order: set, then add, then remove.
    pub fn apply(&self, h: &mut HeaderMap) {
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            h.remove(n);
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathEdit {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

impl PathEdit {
    /// The new path; `prefix` is the rule's matched `PathPrefix` (`""` for `/`).
    pub fn apply(&self, path: &str, prefix: Option<&str>) -> String {
        match self {
            PathEdit::ReplaceFullPath(p) => p.clone(),
            PathEdit::ReplacePrefixMatch(with) => {
                let rest = prefix.and_then(|p| path.strip_prefix(p)).unwrap_or(path);
                let with = with.trim_end_matches('/');
                match (with.is_empty(), rest.is_empty()) {
                    (true, true) => "/".to_string(),
                    (true, false) => rest.to_string(),
                    (false, _) => format!("{with}{rest}"),
                }
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RedirectSpec {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathEdit>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum RouteFilter {
    RequestHeaderModifier(HeaderEdit),
    ResponseHeaderModifier(HeaderEdit),
    RequestRedirect(RedirectSpec),
    #[serde(rename = "URLRewrite")]
    UrlRewrite {
        hostname: Option<String>,
        path: Option<PathEdit>,
    },
}

/// A backend: a service port and its share.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    #[serde(serialize_with = "service_key")]
    pub service: Arc<Service>,
    pub port: u16,
    pub weight: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
}

fn service_key<S: serde::Serializer>(s: &Arc<Service>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&s.key())
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: DEFAULT_RETRIES,
            codes: vec![503],
            backoff: DEFAULT_BACKOFF,
        }
    }
}

/// One compiled rule.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// `<namespace>/<route name>`.
    pub route: String,
    pub index: usize,
    pub matches: Vec<Match>,
    pub filters: Vec<RouteFilter>,
    pub backends: Vec<Backend>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: RetryPolicy,
}

impl Rule {
    /// Weighted random choice of a backend; None when there are none or every weight is 0.
    pub fn pick_backend(&self, rng: &mut fastrand::Rng) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| b.weight as u64).sum();
        if total == 0 {
            return None;
        }
        let mut n = rng.u64(0..total);
        for b in &self.backends {
            if n < b.weight as u64 {
                return Some(b);
            }
            n -= b.weight as u64;
        }
        None
    }

    pub fn redirect(&self) -> Option<&RedirectSpec> {
        self.filters.iter().find_map(|f| match f {
            RouteFilter::RequestRedirect(r) => Some(r),
            _ => None,
        })
    }
}

/// A rule chosen for a request, and the match that chose it.
#[derive(Debug, Clone, Copy)]
pub struct Chosen<'a> {
    pub rule: &'a Rule,
    pub matched: &'a Match,
}

impl Chosen<'_> {
    /// The matched prefix, for `ReplacePrefixMatch`.
    pub fn prefix(&self) -> Option<&str> {
        match &self.matched.path {
            PathMatch::PathPrefix(p) => Some(p),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Candidate {
    rule: usize,
    matched: usize,
    #[serde(skip)]
    rank: (u8, isize, u8, isize, isize, usize, String, usize, usize),
}

/// Where routes attach.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Attachment {
    /// A service (`<namespace>/<hostname>`), on one port or all.
    Service(String, Option<u16>),
    /// The waypoint itself (every service it serves), for these Host names (empty: all).
    Gateway(Option<u16>, Vec<String>),
}

/// Every compiled route of the file, ready to answer "which rule?".
#[derive(Debug, Default, Serialize)]
pub struct RouteTable {
    pub rules: Vec<Rule>,
    #[serde(skip)]
    by_service: HashMap<String, Vec<(Option<u16>, Candidate)>>,
    #[serde(skip)]
    gateway: Vec<(Option<u16>, Vec<String>, Candidate)>,
    /// route key → what it attached to (for the dump).
    pub attachments: Vec<(String, Vec<Attachment>)>,
}

/// The waypoint as a route parent (its Gateway's namespace and name).
pub struct GatewayName<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

impl RouteTable {
    /// Compiles `routes` against `state`'s services. `served` says whether this waypoint
    /// serves a service: attaching to another is an error (its traffic never comes here).
    pub fn build(
        routes: &[HttpRoute],
        state: &State,
        gateway: &GatewayName,
        served: impl Fn(&Service) -> bool,
    ) -> Result<RouteTable, ConfigError> {
        let mut table = RouteTable::default();
        let mut seen = std::collections::HashSet::new();
        for (ri, r) in routes.iter().enumerate() {
            let field = format!("routes[{ri}]");
            if r.name.is_empty() || r.namespace.is_empty() {
                return Err(ConfigError::invalid(
                    field,
                    "name and namespace must not be empty",
                ));
            }
            let key = format!("{}/{}", r.namespace, r.name);
            if !seen.insert(key.clone()) {
                return Err(ConfigError::invalid(
                    field,
                    format!("duplicate route {key}"),
                ));
            }
            if r.parent_refs.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{field}.parentRefs"),
                    "a route needs a parent: a Service or the waypoint's Gateway",
                ));
            }
            let mut attached = Vec::new();
            for (pi, p) in r.parent_refs.iter().enumerate() {
                let pf = format!("{field}.parentRefs[{pi}]");
                let ns = p.namespace.as_deref().unwrap_or(&r.namespace);
                let group = p.group.as_deref();
                match p.kind.as_deref().unwrap_or("Gateway") {
                    "Service" if group.unwrap_or("").is_empty() => {
                        let svc = find_service(state, ns, &p.name).ok_or_else(|| {
                            ConfigError::invalid(
                                format!("{pf}.name"),
                                format!("no service {ns}/{} in `services`", p.name),
                            )
                        })?;
                        if !served(svc) {
                            return Err(ConfigError::invalid(
                                pf,
                                format!(
                                    "service {} does not use this waypoint (its `waypoint.address` is not ours)",
                                    svc.key()
                                ),
                            ));
                        }
                        attached.push(Attachment::Service(svc.key(), p.port));
                    }
                    "Gateway"
                        if group.unwrap_or("gateway.networking.k8s.io")
                            == "gateway.networking.k8s.io" =>
                    {
                        if ns != gateway.namespace || p.name != gateway.name {
                            return Err(ConfigError::invalid(
                                pf,
                                format!(
                                    "Gateway {ns}/{} is not this waypoint ({}/{})",
                                    p.name, gateway.namespace, gateway.name
                                ),
                            ));
                        }
                        attached.push(Attachment::Gateway(p.port, r.hostnames.clone()));
                    }
                    other => {
                        return Err(ConfigError::invalid(
                            format!("{pf}.kind"),
                            format!(
                                "{other:?} (group {:?}): a parent is a core Service or a gateway.networking.k8s.io Gateway",
                                group.unwrap_or("")
                            ),
                        ))
                    }
                }
            }
            for (i, rule) in r.rules.iter().enumerate() {
                let rf = format!("{field}.rules[{i}]");
                let compiled = compile_rule(rule, &key, i, state, &rf)?;
                let rule_idx = table.rules.len();
                for (mi, m) in compiled.matches.iter().enumerate() {
                    let (kind, len) = m.path.rank();
                    let rank = (
                        kind,
                        len,
                        u8::from(m.method.is_none()),
                        -(m.headers.len() as isize),
                        -(m.query_params.len() as isize),
                        ri,
                        key.clone(),
                        i,
                        mi,
                    );
                    let c = Candidate {
                        rule: rule_idx,
                        matched: mi,
                        rank,
                    };
                    for a in &attached {
                        match a {
                            Attachment::Service(svc, port) => table
                                .by_service
                                .entry(svc.clone())
                                .or_default()
                                .push((*port, c.clone())),
                            Attachment::Gateway(port, hosts) => {
                                table.gateway.push((*port, hosts.clone(), c.clone()))
                            }
                        }
                    }
                }
                table.rules.push(compiled);
            }
            table.attachments.push((key, attached));
        }
        for v in table.by_service.values_mut() {
            v.sort_by(|a, b| a.1.rank.cmp(&b.1.rank));
        }
        table.gateway.sort_by(|a, b| a.2.rank.cmp(&b.2.rank));
        Ok(table)
    }

    /// The rule for a request to `service` (`<namespace>/<hostname>`) on `port` with Host
    /// `host`. Routes attached to the service win over routes attached to the waypoint's
    /// Gateway (the more specific parent).
    pub fn choose<'a>(
        &'a self,
        service: &str,
        port: u16,
        host: &str,
        req: &RequestView,
    ) -> Option<Chosen<'a>> {
        let ok_port = |p: &Option<u16>| p.is_none_or(|p| p == port);
        let pick = |c: &Candidate| {
            let rule = &self.rules[c.rule];
            let matched = &rule.matches[c.matched];
            matched.matches(req).then_some(Chosen { rule, matched })
        };
        if let Some(cands) = self.by_service.get(service) {
            if let Some(c) = cands
                .iter()
                .filter(|(p, _)| ok_port(p))
                .find_map(|(_, c)| pick(c))
            {
                return Some(c);
            }
        }
        let host = host_without_port(host);
        self.gateway
            .iter()
            .filter(|(p, hosts, _)| ok_port(p) && host_matches(hosts, host))
            .find_map(|(_, _, c)| pick(c))
    }
}

fn find_service<'a>(state: &'a State, ns: &str, name: &str) -> Option<&'a Arc<Service>> {
    state
        .services
        .iter()
        .find(|s| s.namespace == ns && s.name == name)
}

/// `host:port` → `host` (IPv6 literals keep their brackets).
pub fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map(|(h, _)| &host[..=h.len()])
            .unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Gateway API hostnames: exact, or `*.suffix` for any name ending in `.suffix`.
fn host_matches(hostnames: &[String], host: &str) -> bool {
    hostnames.is_empty()
        || hostnames.iter().any(|h| match h.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
            None => h.eq_ignore_ascii_case(host),
        })
}

fn regex(s: &str, field: &str) -> Result<Regex, ConfigError> {
    // Gateway API regexes match the whole value.
    Regex::new(&format!("^(?:{s})$"))
        .map_err(|e| ConfigError::invalid(field, format!("bad regular expression: {e}")))
}

fn compile_match(m: &RouteMatch, field: &str) -> Result<Match, ConfigError> {
    let path = match &m.path {
        None => PathMatch::PathPrefix(String::new()),
        Some(p) => {
            let v = p.value.clone().unwrap_or_else(|| "/".into());
            let pf = format!("{field}.path.value");
            match p.kind {
                PathMatchType::RegularExpression => PathMatch::RegularExpression(regex(&v, &pf)?),
                _ if !v.starts_with('/') => {
                    return Err(ConfigError::invalid(pf, format!("{v:?} must start with /")))
                }
                PathMatchType::Exact => PathMatch::Exact(v),
                PathMatchType::PathPrefix => {
                    PathMatch::PathPrefix(v.trim_end_matches('/').to_string())
                }
            }
        }
    };
    let values = |v: &[crate::config::ValueMatch], what: &str, lower: bool| {
        v.iter()
            .enumerate()
            .map(|(i, h)| {
                let f = format!("{field}.{what}[{i}]");
                if h.name.is_empty() {
                    return Err(ConfigError::invalid(
                        format!("{f}.name"),
                        "must not be empty",
                    ));
                }
                if lower && HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                    return Err(ConfigError::invalid(
                        format!("{f}.name"),
                        format!("{:?} is not a header name", h.name),
                    ));
                }
                let m = match h.kind {
                    ValueMatchType::Exact => ValueMatch::Exact(h.value.clone()),
                    ValueMatchType::RegularExpression => {
                        ValueMatch::RegularExpression(regex(&h.value, &format!("{f}.value"))?)
                    }
                };
                let name = if lower {
                    h.name.to_ascii_lowercase()
                } else {
                    h.name.clone()
                };
                Ok((name, m))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let method = match &m.method {
        None => None,
        Some(s) => Some(Method::from_bytes(s.as_bytes()).map_err(|_| {
            ConfigError::invalid(format!("{field}.method"), format!("{s:?} is not a method"))
        })?),
    };
    Ok(Match {
        path,
        headers: values(&m.headers, "headers", true)?,
        query_params: values(&m.query_params, "queryParams", false)?,
        method,
    })
}

fn header_edit(m: &HeaderModifier, field: &str) -> Result<HeaderEdit, ConfigError> {
    let pair = |h: &crate::config::HeaderValue, f: String| {
        let n = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
            ConfigError::invalid(
                format!("{f}.name"),
                format!("{:?} is not a header name", h.name),
            )
        })?;
        let v = HeaderValue::from_str(&h.value)
            .map_err(|_| ConfigError::invalid(format!("{f}.value"), "not a valid header value"))?;
        Ok::<_, ConfigError>((n, v))
    };
    Ok(HeaderEdit {
        set: m
            .set
            .iter()
            .enumerate()
            .map(|(i, h)| pair(h, format!("{field}.set[{i}]")))
            .collect::<Result<_, _>>()?,
        add: m
            .add
            .iter()
            .enumerate()
            .map(|(i, h)| pair(h, format!("{field}.add[{i}]")))
            .collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| {
                HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                    ConfigError::invalid(
                        format!("{field}.remove[{i}]"),
                        format!("{n:?} is not a header name"),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    })
}

fn path_edit(p: &PathModifier, field: &str) -> Result<PathEdit, ConfigError> {
    let need = |v: &Option<String>, name: &str| {
        v.clone().ok_or_else(|| {
            ConfigError::invalid(
                format!("{field}.{name}"),
                format!("required by type {:?}", p.kind),
            )
        })
    };
    Ok(match p.kind {
        PathModifierType::ReplaceFullPath => {
            PathEdit::ReplaceFullPath(need(&p.replace_full_path, "replaceFullPath")?)
        }
        PathModifierType::ReplacePrefixMatch => {
            PathEdit::ReplacePrefixMatch(need(&p.replace_prefix_match, "replacePrefixMatch")?)
        }
    })
}

fn compile_filter(f: &Filter, field: &str) -> Result<RouteFilter, ConfigError> {
    fn need<'a, T>(v: &'a Option<T>, field: &str, name: &str) -> Result<&'a T, ConfigError> {
        v.as_ref().ok_or_else(|| {
            ConfigError::invalid(format!("{field}.{name}"), "required by this filter type")
        })
    }
    let stray = [
        (
            f.request_header_modifier.is_some(),
            FilterType::RequestHeaderModifier,
            "requestHeaderModifier",
        ),
        (
            f.response_header_modifier.is_some(),
            FilterType::ResponseHeaderModifier,
            "responseHeaderModifier",
        ),
        (
            f.request_redirect.is_some(),
            FilterType::RequestRedirect,
            "requestRedirect",
        ),
        (
            f.url_rewrite.is_some(),
            FilterType::UrlRewrite,
            "urlRewrite",
        ),
    ]
    .into_iter()
    .find(|(set, kind, _)| *set && *kind != f.kind);
    if let Some((_, _, name)) = stray {
        return Err(ConfigError::invalid(
            format!("{field}.{name}"),
            format!("not allowed with type {:?}", f.kind),
        ));
    }
    Ok(match f.kind {
        FilterType::RequestHeaderModifier => RouteFilter::RequestHeaderModifier(header_edit(
            need(&f.request_header_modifier, field, "requestHeaderModifier")?,
            &format!("{field}.requestHeaderModifier"),
        )?),
        FilterType::ResponseHeaderModifier => RouteFilter::ResponseHeaderModifier(header_edit(
            need(&f.response_header_modifier, field, "responseHeaderModifier")?,
            &format!("{field}.responseHeaderModifier"),
        )?),
        FilterType::RequestRedirect => {
            let r = need(&f.request_redirect, field, "requestRedirect")?;
            let rf = format!("{field}.requestRedirect");
            let status = r.status_code.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err(ConfigError::invalid(
                    format!("{rf}.statusCode"),
                    format!("{status} is not a redirect status (301, 302, 303, 307, 308)"),
                ));
            }
            if let Some(s) = &r.scheme {
                if s != "http" && s != "https" {
                    return Err(ConfigError::invalid(
                        format!("{rf}.scheme"),
                        format!("{s:?}: http or https"),
                    ));
                }
            }
            RouteFilter::RequestRedirect(RedirectSpec {
                scheme: r.scheme.clone(),
                hostname: r.hostname.clone(),
                path: r
                    .path
                    .as_ref()
                    .map(|p| path_edit(p, &format!("{rf}.path")))
                    .transpose()?,
                port: r.port,
                status,
            })
        }
        FilterType::UrlRewrite => {
            let r = need(&f.url_rewrite, field, "urlRewrite")?;
            RouteFilter::UrlRewrite {
                hostname: r.hostname.clone(),
                path: r
                    .path
                    .as_ref()
                    .map(|p| path_edit(p, &format!("{field}.urlRewrite.path")))
                    .transpose()?,
            }
        }
    })
}

fn compile_filters(v: &[Filter], field: &str) -> Result<Vec<RouteFilter>, ConfigError> {
    let filters: Vec<RouteFilter> = v
        .iter()
        .enumerate()
        .map(|(i, f)| compile_filter(f, &format!("{field}[{i}]")))
        .collect::<Result<_, _>>()?;
    let redirects = filters
        .iter()
        .filter(|f| matches!(f, RouteFilter::RequestRedirect(_)))
        .count();
    let rewrites = filters
        .iter()
        .filter(|f| matches!(f, RouteFilter::UrlRewrite { .. }))
        .count();
    if redirects > 1 || rewrites > 1 || (redirects > 0 && rewrites > 0) {
        return Err(ConfigError::invalid(
            field,
            "at most one RequestRedirect or one URLRewrite, not both",
        ));
    }
    Ok(filters)
}

fn compile_backend(
    b: &BackendRef,
    route_ns: &str,
    state: &State,
    field: &str,
) -> Result<Backend, ConfigError> {
    let kind = b.kind.as_deref().unwrap_or("Service");
    if kind != "Service" || !b.group.as_deref().unwrap_or("").is_empty() {
        return Err(ConfigError::invalid(
            format!("{field}.kind"),
            format!("{kind:?}: a backend is a core Service"),
        ));
    }
    let ns = b.namespace.as_deref().unwrap_or(route_ns);
    let service = find_service(state, ns, &b.name).ok_or_else(|| {
        ConfigError::invalid(
            format!("{field}.name"),
            format!("no service {ns}/{} in `services`", b.name),
        )
    })?;
    let port = b.port.ok_or_else(|| {
        ConfigError::invalid(format!("{field}.port"), "required for a Service backend")
    })?;
    if !service.ports.is_empty() && !service.ports.contains_key(&port) {
        return Err(ConfigError::invalid(
            format!("{field}.port"),
            format!("service {} has no port {port}", service.key()),
        ));
    }
    let filters = compile_filters(&b.filters, &format!("{field}.filters"))?;
    if filters
        .iter()
        .any(|f| matches!(f, RouteFilter::RequestRedirect(_)))
    {
        return Err(ConfigError::invalid(
            format!("{field}.filters"),
            "RequestRedirect belongs on the rule, not on a backend",
        ));
    }
    Ok(Backend {
        service: service.clone(),
        port,
        weight: b.weight.unwrap_or(1),
        filters,
    })
}

fn compile_rule(
    r: &RouteRule,
    route: &str,
    index: usize,
    state: &State,
    field: &str,
) -> Result<Rule, ConfigError> {
    let route_ns = route.split('/').next().unwrap_or_default();
    let mut matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| compile_match(m, &format!("{field}.matches[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if matches.is_empty() {
        matches.push(compile_match(&RouteMatch::default(), field)?);
    }
    let filters = compile_filters(&r.filters, &format!("{field}.filters"))?;
    let backends = r
        .backend_refs
        .iter()
        .enumerate()
        .map(|(i, b)| compile_backend(b, route_ns, state, &format!("{field}.backendRefs[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let uses_prefix = filters
        .iter()
        .chain(backends.iter().flat_map(|b| &b.filters))
        .any(|f| {
            matches!(
                f,
                RouteFilter::UrlRewrite {
                    path: Some(PathEdit::ReplacePrefixMatch(_)),
                    ..
                } | RouteFilter::RequestRedirect(RedirectSpec {
                    path: Some(PathEdit::ReplacePrefixMatch(_)),
                    ..
                })
            )
        });
    if uses_prefix
        && matches
            .iter()
            .any(|m| !matches!(m.path, PathMatch::PathPrefix(_)))
    {
        return Err(ConfigError::invalid(
            format!("{field}.filters"),
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
        ));
    }
    let duration = |v: &Option<String>, name: &str| {
        v.as_deref()
            .map(|s| {
                parse_gateway_duration(s)
                    .map_err(|e| ConfigError::invalid(format!("{field}.timeouts.{name}"), e))
            })
            .transpose()
    };
    let (request_timeout, backend_timeout) = match &r.timeouts {
        Some(t) => (
            duration(&t.request, "request")?.filter(|d| !d.is_zero()),
            duration(&t.backend_request, "backendRequest")?.filter(|d| !d.is_zero()),
        ),
        None => (None, None),
    };
    let retry = match &r.retry {
        None => RetryPolicy::default(),
        Some(rt) => {
            let attempts = rt.attempts.unwrap_or(DEFAULT_RETRIES);
            if attempts > MAX_RETRIES {
                return Err(ConfigError::invalid(
                    format!("{field}.retry.attempts"),
                    format!("{attempts}: at most {MAX_RETRIES}"),
                ));
            }
            if let Some(c) = rt.codes.iter().find(|c| !(400..=599).contains(*c)) {
                return Err(ConfigError::invalid(
                    format!("{field}.retry.codes"),
                    format!("{c} is not an error status (400-599)"),
                ));
            }
            let backoff = match &rt.backoff {
                Some(b) => parse_gateway_duration(b)
                    .map_err(|e| ConfigError::invalid(format!("{field}.retry.backoff"), e))?,
                None => DEFAULT_BACKOFF,
            };
            RetryPolicy {
                attempts,
                codes: if rt.codes.is_empty() {
                    vec![503]
                } else {
                    rt.codes.clone()
                },
                backoff,
            }
        }
    };
    Ok(Rule {
        route: route.to_string(),
        index,
        matches,
        filters,
        backends,
        request_timeout,
        backend_timeout,
        retry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_file;

    const SERVICES: &str = r#"
workloads:
- {name: waypoint, namespace: demo, serviceAccount: waypoint, workloadIps: [10.0.0.9], protocol: HBONE, node: b}
- {name: r1, namespace: demo, serviceAccount: reviews, workloadIps: [10.0.1.1], protocol: HBONE, node: a, services: {demo/reviews.demo.svc.cluster.local: {}, demo/reviews-v1.demo.svc.cluster.local: {}}}
- {name: r2, namespace: demo, serviceAccount: reviews, workloadIps: [10.0.1.2], protocol: HBONE, node: b, services: {demo/reviews.demo.svc.cluster.local: {}, demo/reviews-v2.demo.svc.cluster.local: {}}}
services:
- {name: reviews, namespace: demo, hostname: reviews.demo.svc.cluster.local, vips: [10.96.0.20], ports: {80: 8080}, waypoint: {address: 10.0.0.9}}
- {name: reviews-v1, namespace: demo, hostname: reviews-v1.demo.svc.cluster.local, vips: [10.96.0.21], ports: {80: 8080}, waypoint: {address: 10.0.0.9}}
- {name: reviews-v2, namespace: demo, hostname: reviews-v2.demo.svc.cluster.local, vips: [10.96.0.22], ports: {80: 8080}, waypoint: {address: 10.0.0.9}}
- {name: other, namespace: demo, hostname: other.demo.svc.cluster.local, vips: [10.96.0.30], ports: {80: 80}}
"#;

    fn table(routes: &str) -> Result<RouteTable, ConfigError> {
        let file = parse_file(&format!("{SERVICES}\n{routes}")).unwrap();
        let cfg = ztunnel::config::LocalConfig {
            workloads: file.workloads.clone(),
            services: file.services.clone(),
            policies: vec![],
        };
        let st = State::build(&cfg, "cluster.local", "b").unwrap();
        let gw = GatewayName {
            namespace: "demo",
            name: "waypoint",
        };
        RouteTable::build(&file.routes, &st, &gw, |s| s.waypoint.is_some())
    }

    const REVIEWS: &str = "demo/reviews.demo.svc.cluster.local";

    fn choose(
        t: &RouteTable,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Option<(String, usize)> {
        let uri: http::Uri = uri.parse().unwrap();
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let view = RequestView {
            method: &method,
            path: uri.path(),
            query: uri.query(),
            headers: &h,
        };
        t.choose(REVIEWS, 80, "reviews", &view)
            .map(|c| (c.rule.route.clone(), c.rule.index))
    }

    #[test]
    fn precedence_follows_gateway_api() {
        let t = table(
            r#"
routes:
- name: a
  namespace: demo
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]            # 0: catch-all
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]         # 1
    backendRefs: [{name: reviews-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v2/}}]     # 2: longer prefix
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /api}}]              # 3: exact beats prefixes
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]   # 4: method
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-User, value: jason}]}]  # 5: header
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]  # 6
    backendRefs: [{name: reviews-v2, port: 80}]
  - matches: [{queryParams: [{name: debug, value: "1"}]}]       # 7: query beats the bare catch-all
    backendRefs: [{name: reviews-v2, port: 80}]
"#,
        )
        .unwrap();
        let r = |m, u, h: &[(&str, &str)]| choose(&t, m, u, h).map(|x| x.1);
        assert_eq!(r("GET", "/", &[]), Some(0));
        assert_eq!(
            r("GET", "/apix", &[]),
            Some(0),
            "prefixes match whole path elements"
        );
        assert_eq!(r("GET", "/api/x", &[]), Some(1));
        assert_eq!(r("GET", "/api/v2", &[]), Some(2));
        assert_eq!(r("GET", "/api/v2/x", &[]), Some(2));
        assert_eq!(r("GET", "/api", &[]), Some(3));
        assert_eq!(r("POST", "/api/x", &[]), Some(4));
        assert_eq!(r("GET", "/api/x", &[("x-user", "jason")]), Some(5));
        assert_eq!(r("GET", "/api/x", &[("x-user", "other")]), Some(1));
        assert_eq!(r("GET", "/re/12", &[]), Some(6));
        assert_eq!(
            r("GET", "/re/12x", &[]),
            Some(0),
            "regexes match the whole path"
        );
        assert_eq!(r("GET", "/x?debug=1", &[]), Some(7));
        assert_eq!(
            r("GET", "/x?debug=%31&debug=2", &[]),
            Some(7),
            "first value, decoded"
        );
        assert_eq!(r("GET", "/x?debug=2", &[]), Some(0));
    }

    #[test]
    fn earlier_route_wins_a_tie_and_service_parents_beat_the_gateway() {
        let t = table(
            r#"
routes:
- name: z-first
  namespace: demo
  parentRefs: [{kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews-v1, port: 80}]}]
- name: a-second
  namespace: demo
  parentRefs: [{kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews-v2, port: 80}]}]
- name: gw
  namespace: demo
  parentRefs: [{name: waypoint}]
  rules: [{matches: [{path: {type: Exact, value: /only-gw}}], backendRefs: [{name: reviews-v2, port: 80}]}]
"#,
        )
        .unwrap();
        assert_eq!(choose(&t, "GET", "/", &[]).unwrap().0, "demo/z-first");
        // The service's routes are tried first; the gateway's only when none matches. Here the
        // service catch-all matches everything.
        assert_eq!(
            choose(&t, "GET", "/only-gw", &[]).unwrap().0,
            "demo/z-first"
        );
        // Port-scoped parents only take their port.
        let t = table(
            r#"
routes:
- name: p
  namespace: demo
  parentRefs: [{kind: Service, name: reviews, port: 8443}]
  rules: [{backendRefs: [{name: reviews-v1, port: 80}]}]
"#,
        )
        .unwrap();
        assert!(choose(&t, "GET", "/", &[]).is_none());
    }

    #[test]
    fn weights_split_requests() {
        let t = table(
            r#"
routes:
- name: split
  namespace: demo
  parentRefs: [{kind: Service, name: reviews}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}, {name: reviews, port: 80, weight: 0}]
"#,
        )
        .unwrap();
        let rule = &t.rules[0];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut v2 = 0;
        for _ in 0..10_000 {
            let b = rule.pick_backend(&mut rng).unwrap();
            assert_ne!(b.service.name, "reviews", "weight 0 is never picked");
            if b.service.name == "reviews-v2" {
                v2 += 1;
            }
        }
        // Binomial(10000, 0.1): sd 30; 5 sd either way.
        assert!((850..=1150).contains(&v2), "{v2}");
    }

    #[test]
    fn bad_routes_are_named() {
        let err = |routes: &str| table(routes).unwrap_err().to_string();
        let e = err(
            "routes:\n- {name: r, namespace: demo, parentRefs: [{kind: Service, name: nope}]}\n",
        );
        assert!(
            e.starts_with("routes[0].parentRefs[0].name: no service demo/nope"),
            "{e}"
        );
        let e = err(
            "routes:\n- {name: r, namespace: demo, parentRefs: [{kind: Service, name: other}]}\n",
        );
        assert!(e.contains("does not use this waypoint"), "{e}");
        let e = err("routes:\n- {name: r, namespace: demo, parentRefs: [{name: someone-else}]}\n");
        assert!(e.contains("is not this waypoint"), "{e}");
        let e = err("routes:\n- {name: r, namespace: demo, parentRefs: [{kind: Service, name: reviews}], rules: [{backendRefs: [{name: reviews-v1}]}]}\n");
        assert!(
            e.starts_with("routes[0].rules[0].backendRefs[0].port: required"),
            "{e}"
        );
        let e = err("routes:\n- {name: r, namespace: demo, parentRefs: [{kind: Service, name: reviews}], rules: [{matches: [{path: {type: RegularExpression, value: '(['}}]}]}\n");
        assert!(
            e.starts_with("routes[0].rules[0].matches[0].path.value: bad regular expression"),
            "{e}"
        );
        let e = err("routes:\n- {name: r, namespace: demo, parentRefs: [{kind: Service, name: reviews}], rules: [{timeouts: {request: 10}}]}\n");
        assert!(e.starts_with("routes[0].rules[0].timeouts.request"), "{e}");
        let e = err("routes:\n- {name: r, namespace: demo, parentRefs: [{kind: Service, name: reviews}], rules: [{filters: [{type: RequestHeaderModifier}]}]}\n");
        assert!(
            e.starts_with("routes[0].rules[0].filters[0].requestHeaderModifier: required"),
            "{e}"
        );
        let e = err("routes:\n- {name: r, namespace: demo, parentRefs: [{kind: Service, name: reviews}], rules: [{matches: [{path: {type: Exact, value: /x}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /y}}}]}]}\n");
        assert!(e.contains("ReplacePrefixMatch needs"), "{e}");
    }

    #[test]
    fn path_edits() {
        let p = PathEdit::ReplacePrefixMatch("/v2".into());
        assert_eq!(p.apply("/api/x", Some("/api")), "/v2/x");
        assert_eq!(p.apply("/api", Some("/api")), "/v2");
        let root = PathEdit::ReplacePrefixMatch("/".into());
        assert_eq!(root.apply("/api/x", Some("/api")), "/x");
        assert_eq!(root.apply("/api", Some("/api")), "/");
        assert_eq!(
            PathEdit::ReplaceFullPath("/new".into()).apply("/old/x", None),
            "/new"
        );
        assert_eq!(host_without_port("reviews:80"), "reviews");
        assert_eq!(host_without_port("[fd00::1]:80"), "[fd00::1]");
        assert_eq!(host_without_port("reviews"), "reviews");
        assert!(host_matches(&["*.example.com".into()], "a.example.com"));
        assert!(!host_matches(&["*.example.com".into()], "example.com"));
    }
}
