//! One HTTP request through the waypoint:
//!
//! 1. L7 authorization of the destination service's policies (denied: 403 `RBAC: access
//!    denied`);
//! 2. the route (see [`crate::route`]); none: the service itself on the same port;
//! 3. the rule's filters (a redirect answers here), a backend by weight and its filters;
//! 4. `x-forwarded-for` / `x-forwarded-proto`, hop-by-hop headers dropped;
//! 5. an endpoint of the backend service, the request carried over HBONE, retried on a
//!    connect failure, a reset or a retriable status while attempts are left (another
//!    endpoint when there is one; only bodies that can be sent again), all within the rule's
//!    request timeout (504);
//! 6. the response's filters; at its end one access-log line and the Istio request metrics.
//!
//! Upgrades (`Connection: upgrade`) are passed through: after the endpoint's 101 both sides'
//! bytes are relayed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ztunnel::config::Protocol;
use ztunnel::proxy::h2::H2Io;
use ztunnel::state::{Service, Workload};

use super::body::{self, Body, Tracked};
use super::upstream::{Endpoint, Proto, UpstreamError};
use super::{Downstream, Inputs};
use crate::authz::{self, HttpAttrs};
use crate::metrics::{RequestFacts, RequestLabels};
use crate::route::{
    host_without_port, Chosen, RedirectSpec, RequestView, RetryPolicy, RouteFilter,
};
use crate::state::{Destination, WaypointState};

/// Bodies up to this size (known in advance) are kept so a retry can send them again.
const REPLAYABLE_BODY: u64 = 64 * 1024;

/// Serves HTTP on one tunnel until the client closes it.
pub async fn serve(pi: Arc<Inputs>, down: Arc<Downstream>, io: H2Io, proto: Proto) {
    let svc = {
        let (pi, down) = (pi.clone(), down.clone());
        hyper::service::service_fn(move |req| {
            let (pi, down) = (pi.clone(), down.clone());
            async move { Ok::<_, Infallible>(handle(pi, down, proto, req).await) }
        })
    };
    let io = TokioIo::new(io);
    let result = match proto {
        Proto::Http1 => {
            hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, svc)
                .with_upgrades()
                .await
        }
        Proto::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, svc)
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(src = %down.src, error = %e, "downstream HTTP connection ended");
    }
}

/// What one request's access-log line and metrics are made of, filled in as it goes.
struct Exchange {
    pi: Arc<Inputs>,
    start: Instant,
    method: String,
    host: String,
    path: String,
    protocol: &'static str,
    src: SocketAddr,
    src_workload: Option<Arc<Workload>>,
    down: Arc<Downstream>,
    /// The service the request was routed to (the requested one until a backend is chosen).
    service: Option<Arc<Service>>,
    dst: Option<Arc<Workload>>,
    upstream: Option<SocketAddr>,
    route: Option<String>,
    attempts: u32,
    flags: &'static str,
    reason: Option<String>,
    req_bytes: Arc<AtomicU64>,
}

impl Exchange {
    /// Wraps the response body so the line and metrics are written when it ends.
    fn finish(
        mut self,
        resp: Response<Body>,
        on_done: Option<Box<dyn FnOnce() + Send>>,
    ) -> Response<Body> {
        let code = resp.status().as_u16();
        let (parts, b) = resp.into_parts();
        let resp_bytes = Arc::new(AtomicU64::new(0));
        let count = resp_bytes.clone();
        let on_end = Box::new(move |complete: bool| {
            if complete {
                if let Some(f) = on_done {
                    f();
                }
            } else if self.flags == "-" {
                // The client went away (or the upstream failed) mid-response.
                self.flags = "DC";
            }
            self.record(code, count.load(Ordering::Relaxed));
        });
        let tracked = Tracked::new(b, resp_bytes, Some(on_end));
        Response::from_parts(parts, body::boxed(tracked))
    }

    fn record(&self, code: u16, resp_bytes: u64) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let req_bytes = self.req_bytes.load(Ordering::Relaxed);
        let labels = RequestLabels::new(&RequestFacts {
            src: self.src_workload.as_deref(),
            src_id: Some(&self.down.identity),
            dst: self.dst.as_deref(),
            service: self.service.as_deref(),
            protocol: "http",
            code,
            flags: self.flags,
        });
        self.pi
            .http_metrics
            .record(&labels, duration_ms, req_bytes, resp_bytes);
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        tracing::info!(
            target: "access",
            method = %self.method, authority = %self.host, path = %self.path,
            protocol = self.protocol, code, flags = self.flags,
            duration_ms = format_args!("{duration_ms:.1}"),
            src.addr = %self.src, src.identity = %self.down.identity,
            src.workload = %opt(self.src_workload.as_ref().map(|w| w.uid.clone())),
            dst.service = %opt(self.service.as_ref().map(|s| s.hostname.clone())),
            dst.workload = %opt(self.dst.as_ref().map(|w| w.uid.clone())),
            dst.identity = %opt(self.dst.as_ref().map(|w| w.identity.to_string())),
            upstream = %opt(self.upstream.map(|u| u.to_string())),
            route = %opt(self.route.clone()), attempts = self.attempts,
            bytes_received = req_bytes, bytes_sent = resp_bytes,
            reason = %opt(self.reason.clone()),
            "request"
        );
    }

    /// A response of the waypoint's own (a denial, a redirect, an upstream failure).
    fn local(
        mut self,
        status: StatusCode,
        flags: &'static str,
        text: &'static str,
        reason: Option<String>,
    ) -> Response<Body> {
        self.flags = flags;
        self.reason = reason;
        let mut resp = Response::new(body::full(Bytes::from_static(text.as_bytes())));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        self.finish(resp, None)
    }
}

/// The answer when no attempt got a response: Envoy's text, `UF` (or `URX` after retries).
fn upstream_failed(attempt: u32, reason: String) -> (&'static str, &'static str, String) {
    let flags = if attempt > 1 { "URX" } else { "UF" };
    (
        flags,
        "upstream connect error or disconnect/reset before headers",
        reason,
    )
}

/// Hop-by-hop headers: never forwarded (RFC 9110 §7.6.1), except an upgrade's.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in listed {
        h.remove(n);
    }
    // `te: trailers` is end to end in practice (gRPC needs it); any other TE is not.
    let te_trailers = h
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in [
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "trailer",
    ] {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// The redirect's `Location`, as Gateway API derives it.
fn location(
    r: &RedirectSpec,
    host: &str,
    service_port: u16,
    path: &str,
    query: Option<&str>,
    prefix: Option<&str>,
) -> String {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let hostname = r
        .hostname
        .clone()
        .unwrap_or_else(|| host_without_port(host).to_string());
    let port = r.port.or_else(|| {
        if r.scheme.is_some() {
            None
        } else {
            host.strip_prefix(host_without_port(host))
                .and_then(|p| p.strip_prefix(':'))
                .and_then(|p| p.parse().ok())
                .or(Some(service_port))
        }
    });
    let port = match (scheme, port) {
        ("http", Some(80)) | ("https", Some(443)) | (_, None) => String::new(),
        (_, Some(p)) => format!(":{p}"),
    };
    let path = r
        .path
        .as_ref()
        .map(|p| p.apply(path, prefix))
        .unwrap_or_else(|| path.to_string());
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme}://{hostname}{port}{path}{query}")
}

/// Request-side filters: header edits and a rewrite (of the Host and the path).
fn apply_request_filters(
    filters: &[RouteFilter],
    headers: &mut HeaderMap,
    host: &mut String,
    path: &mut String,
    prefix: Option<&str>,
) {
    for f in filters {
        match f {
            RouteFilter::RequestHeaderModifier(e) => e.apply(headers),
            RouteFilter::UrlRewrite { hostname, path: p } => {
                if let Some(h) = hostname {
                    *host = h.clone();
                }
                if let Some(p) = p {
                    *path = p.apply(path, prefix);
                }
            }
            RouteFilter::ResponseHeaderModifier(_) | RouteFilter::RequestRedirect(_) => {}
        }
    }
}

/// The service or workload a request ends up at, and on which port.
pub(crate) enum Target {
    Service(Arc<Service>, u16),
    Workload(Arc<Workload>, u16),
}

/// The endpoints an attempt may go to.
pub(crate) fn endpoints(
    st: &WaypointState,
    target: &Target,
    v4: bool,
) -> Vec<(Arc<Workload>, Endpoint)> {
    let endpoint = |w: &Arc<Workload>, addr: SocketAddr, extra: &[ztunnel::identity::Identity]| {
        let mut identities = vec![w.identity.clone()];
        identities.extend(extra.iter().filter(|i| **i != w.identity).cloned());
        (
            w.clone(),
            Endpoint {
                addr,
                hbone: w.protocol == Protocol::Hbone,
                identities,
            },
        )
    };
    match target {
        Target::Service(svc, port) => st
            .mesh
            .endpoints(svc)
            .iter()
            .filter(|w| w.healthy() && w.capacity > 0)
            // Only endpoints with an address of the request's family: a v6 VIP's request
            // goes to a v6 endpoint address, never falls back to v4 (as ztunnel does).
            .filter(|w| w.workload_ips.iter().any(|ip| ip.is_ipv4() == v4))
            .map(|w| endpoint(w, svc.endpoint_target(w, *port, v4), &svc.subject_alt_names))
            .collect(),
        Target::Workload(w, port) => {
            let ip = w
                .workload_ips
                .iter()
                .find(|ip| ip.is_ipv4() == v4)
                .unwrap_or(&w.workload_ips[0]);
            vec![endpoint(w, SocketAddr::new(*ip, *port), &[])]
        }
    }
}

/// Weighted (capacity) random choice, avoiding `avoid` when another endpoint exists.
fn pick<'a>(
    eps: &'a [(Arc<Workload>, Endpoint)],
    avoid: Option<SocketAddr>,
    rng: &mut fastrand::Rng,
) -> Option<&'a (Arc<Workload>, Endpoint)> {
    let others: Vec<&(Arc<Workload>, Endpoint)> =
        eps.iter().filter(|(_, e)| Some(e.addr) != avoid).collect();
    let pool: Vec<&(Arc<Workload>, Endpoint)> = if others.is_empty() {
        eps.iter().collect()
    } else {
        others
    };
    let total: u64 = pool.iter().map(|(w, _)| w.capacity as u64).sum();
    if total == 0 {
        return None;
    }
    let mut n = rng.u64(0..total);
    for e in pool {
        if n < e.0.capacity as u64 {
            return Some(e);
        }
        n -= e.0.capacity as u64;
    }
    None
}

async fn handle(
    pi: Arc<Inputs>,
    down: Arc<Downstream>,
    proto: Proto,
    req: Request<Incoming>,
) -> Response<Body> {
    let st = pi.state.get();
    let (mut parts, incoming) = req.into_parts();
    let req_bytes = Arc::new(AtomicU64::new(0));
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| down.authority.to_string());
    let requested = match &down.dest {
        Destination::Service(s, p) => Target::Service(s.clone(), *p),
        Destination::Workload(w, p) => Target::Workload(w.clone(), *p),
    };
    let mut ex = Exchange {
        pi: pi.clone(),
        start: Instant::now(),
        method: parts.method.to_string(),
        host: host.clone(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into()),
        protocol: match proto {
            Proto::Http1 => "HTTP/1.1",
            Proto::Http2 => "HTTP/2",
        },
        src: down.src,
        src_workload: st.mesh.workload_by_ip(down.src.ip()).cloned(),
        down: down.clone(),
        service: match &requested {
            Target::Service(s, _) => Some(s.clone()),
            Target::Workload(..) => None,
        },
        dst: None,
        upstream: None,
        route: None,
        attempts: 0,
        flags: "-",
        reason: None,
        req_bytes: req_bytes.clone(),
    };

    // 1. Authorization.
    let (ns, name) = down.target_names();
    let attrs = down.attrs(Some(HttpAttrs {
        host: &host,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        headers: &parts.headers,
    }));
    if let Err(denied) = authz::authorize(st.policies_for(ns, name), &attrs) {
        return ex.local(
            StatusCode::FORBIDDEN,
            "-",
            "RBAC: access denied",
            Some(denied.to_string()),
        );
    }

    // 2. The route.
    let view = RequestView {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
    };
    let chosen: Option<Chosen> = match &requested {
        Target::Service(s, port) => st.routes.choose(&s.key(), *port, &host, &view),
        Target::Workload(..) => None,
    };
    let mut path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let mut new_host = host.clone();
    let mut response_filters: Vec<&RouteFilter> = Vec::new();
    let mut retry = RetryPolicy::default();
    let (mut request_timeout, mut backend_timeout) = (None, None);
    let mut rng = fastrand::Rng::new();
    let target = match chosen {
        None => requested,
        Some(c) => {
            ex.route = Some(format!("{}#{}", c.rule.route, c.rule.index));
            if let Some(r) = c.rule.redirect() {
                let loc = location(
                    r,
                    &host,
                    down.authority.port(),
                    &path,
                    query.as_deref(),
                    c.prefix(),
                );
                let mut resp = Response::new(body::empty());
                *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
                if let Ok(v) = HeaderValue::from_str(&loc) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                for f in &c.rule.filters {
                    if let RouteFilter::ResponseHeaderModifier(e) = f {
                        e.apply(resp.headers_mut());
                    }
                }
                return ex.finish(resp, None);
            }
            apply_request_filters(
                &c.rule.filters,
                &mut parts.headers,
                &mut new_host,
                &mut path,
                c.prefix(),
            );
            let Some(backend) = c.rule.pick_backend(&mut rng) else {
                return ex.local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "NR",
                    "no backend",
                    Some("the rule has no backend with a weight".into()),
                );
            };
            apply_request_filters(
                &backend.filters,
                &mut parts.headers,
                &mut new_host,
                &mut path,
                c.prefix(),
            );
            response_filters.extend(c.rule.filters.iter().chain(&backend.filters));
            retry = c.rule.retry.clone();
            request_timeout = c.rule.request_timeout;
            backend_timeout = c.rule.backend_timeout;
            ex.service = Some(backend.service.clone());
            Target::Service(backend.service.clone(), backend.port)
        }
    };

    // 4. Forwarding headers.
    let upgrade = proto == Proto::Http1 && is_upgrade(&parts.headers);
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let client = down.src.ip().to_string();
    let xff = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {client}"),
        None => client,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        parts.headers.insert("x-forwarded-for", v);
    }
    if !parts.headers.contains_key("x-forwarded-proto") {
        parts
            .headers
            .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    let path_and_query = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let uri: Uri = match proto {
        // HTTP/1.1 upstream: origin-form, the Host header carries the name.
        Proto::Http1 => {
            if let Ok(v) = HeaderValue::from_str(&new_host) {
                parts.headers.insert(header::HOST, v);
            }
            path_and_query.parse()
        }
        // HTTP/2: `:authority` comes from the URI.
        Proto::Http2 => {
            parts.headers.remove(header::HOST);
            format!("http://{new_host}{path_and_query}").parse()
        }
    }
    .unwrap_or_else(|_| parts.uri.clone());
    let downstream_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };

    // 5. The body: kept for retries when small and known, else streamed once.
    let counted = Tracked::new(incoming, req_bytes.clone(), None);
    let hint = counted.size_hint();
    let small = counted.is_end_stream() || hint.upper().is_some_and(|u| u <= REPLAYABLE_BODY);
    let mut streaming: Option<Body> = None;
    let kept: Option<Bytes> = if small && !upgrade {
        match counted.collect().await {
            Ok(c) => Some(c.to_bytes()),
            Err(e) => {
                return ex.local(
                    StatusCode::BAD_REQUEST,
                    "DC",
                    "bad request body",
                    Some(e.to_string()),
                )
            }
        }
    } else {
        streaming = Some(body::boxed(counted));
        None
    };

    let eps = endpoints(&st, &target, down.authority.is_ipv4());
    let attempt_loop = async {
        let mut last: Option<SocketAddr> = None;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            ex.attempts = attempt;
            let retries_left = attempt <= retry.attempts;
            let Some((wl, ep)) = pick(&eps, last, &mut rng) else {
                return Err((
                    "UH",
                    "no healthy upstream",
                    "no healthy endpoint".to_string(),
                ));
            };
            last = Some(ep.addr);
            ex.dst = Some(wl.clone());
            ex.upstream = Some(ep.addr);
            let conn = match pi.upstream.connect(ep, proto).await {
                Ok(c) => c,
                Err(e) if retries_left => {
                    tracing::debug!(upstream = %ep.addr, error = %e, attempt, "retrying");
                    tokio::time::sleep(retry.backoff).await;
                    continue;
                }
                Err(e) => return Err(upstream_failed(attempt, e.to_string())),
            };
            let body = match (&kept, streaming.take()) {
                (Some(b), _) => body::full(b.clone()),
                (None, Some(s)) => s,
                // Streamed once already: no retry can resend it (guarded below).
                (None, None) => {
                    return Err(upstream_failed(attempt, "request body already sent".into()))
                }
            };
            let mut req = Request::new(body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = parts.headers.clone();
            let sent = conn.send(req);
            let result = match backend_timeout {
                Some(t) => match tokio::time::timeout(t, sent).await {
                    Ok(r) => r,
                    Err(_) => Err(UpstreamError::Connect("backend request timeout".into())),
                },
                None => sent.await,
            };
            let can_resend = kept.is_some();
            match result {
                Ok((resp, lease)) => {
                    let code = resp.status().as_u16();
                    if retries_left && can_resend && retry.codes.contains(&code) {
                        tracing::debug!(upstream = %ep.addr, code, attempt, "retrying");
                        drop((resp, lease));
                        tokio::time::sleep(retry.backoff).await;
                        continue;
                    }
                    return Ok((resp, lease));
                }
                Err(e) if retries_left && can_resend => {
                    tracing::debug!(upstream = %ep.addr, error = %e, attempt, "retrying");
                    tokio::time::sleep(retry.backoff).await;
                    continue;
                }
                Err(e) => return Err(upstream_failed(attempt, e.to_string())),
            }
        }
    };
    let outcome = match request_timeout {
        Some(t) => tokio::time::timeout(t, attempt_loop).await.unwrap_or(Err((
            "UT",
            "upstream request timeout",
            format!("no response within {t:?}"),
        ))),
        None => attempt_loop.await,
    };
    let (mut resp, lease) = match outcome {
        Ok(r) => r,
        Err((flags, text, reason)) => {
            let status = if flags == "UT" {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return ex.local(status, flags, text, Some(reason));
        }
    };

    // 6. The response.
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down_up) = downstream_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match futures::future::try_join(down_up, up).await {
                    Ok((a, b)) => {
                        let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
        }
    }
    let (mut rparts, rbody) = resp.into_parts();
    let switching = rparts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(&mut rparts.headers, switching);
    for f in response_filters {
        if let RouteFilter::ResponseHeaderModifier(e) = f {
            e.apply(&mut rparts.headers);
        }
    }
    let resp = Response::from_parts(rparts, body::boxed(rbody));
    let release: Option<Box<dyn FnOnce() + Send>> = match lease {
        Some(l) if !switching => Some(Box::new(move || l.release())),
        _ => None,
    };
    ex.finish(resp, release)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::PathEdit;

    fn redirect(
        scheme: Option<&str>,
        hostname: Option<&str>,
        port: Option<u16>,
        path: Option<PathEdit>,
    ) -> RedirectSpec {
        RedirectSpec {
            scheme: scheme.map(str::to_string),
            hostname: hostname.map(str::to_string),
            path,
            port,
            status: 302,
        }
    }

    #[test]
    fn redirect_locations() {
        let r = redirect(None, Some("new"), None, None);
        assert_eq!(
            location(&r, "reviews", 80, "/a", Some("x=1"), None),
            "http://new/a?x=1"
        );
        assert_eq!(
            location(&r, "reviews:9080", 80, "/a", None, None),
            "http://new:9080/a"
        );
        let r = redirect(
            Some("https"),
            None,
            None,
            Some(PathEdit::ReplacePrefixMatch("/v2".into())),
        );
        assert_eq!(
            location(&r, "reviews:9080", 80, "/api/x", None, Some("/api")),
            "https://reviews/v2/x"
        );
        let r = redirect(
            Some("https"),
            None,
            Some(8443),
            Some(PathEdit::ReplaceFullPath("/login".into())),
        );
        assert_eq!(
            location(&r, "reviews", 80, "/api/x", None, None),
            "https://reviews:8443/login"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-app", "kept".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get("x-app").unwrap(), "kept");
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "echo".parse().unwrap());
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "echo");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }
}
