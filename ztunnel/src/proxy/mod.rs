//! The listeners and what they do with a connection.
//!
//! - [`outbound`] (15001): captured connections of local pods, routed by destination to HBONE,
//!   a waypoint, the local fast path, or plain TCP passthrough;
//! - [`inbound`] (15008): HBONE from other ztunnels (mTLS, HTTP/2 CONNECT);
//! - [`inbound_passthrough`] (15006): plaintext from clients outside the mesh;
//! - [`pool`]: the HBONE connection pool; [`h2`]: HTTP/2 settings and relays;
//! - [`limits`]: the per-source caps on concurrent connections.
//!
//! Every connection ends in one access-log line (target `access`) and the Istio TCP metrics.

pub mod accept;
pub mod h2;
pub mod inbound;
pub mod inbound_passthrough;
pub mod limits;
pub mod outbound;
pub mod pool;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::drain::Drain;
use crate::identity::{Identity, IdentityError};
use crate::metrics::{ConnLabels, Metrics};
use crate::rbac::Denied;
use crate::state::{StateHandle, Workload};
use crate::tls::TlsContext;

/// Why a connection (or a CONNECT stream) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown source {0}: not a workload")]
    UnknownSource(IpAddr),
    #[error("source {0} is not a workload of this node")]
    NotLocalSource(IpAddr),
    #[error("connection to ztunnel's own listener {0} refused")]
    SelfConnect(SocketAddr),
    #[error("service {0} has no healthy endpoint")]
    NoHealthyEndpoint(String),
    #[error("waypoint {0} is not a known workload")]
    UnknownWaypoint(IpAddr),
    #[error("{0}")]
    Denied(#[from] Denied),
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, #[source] io::Error),
    #[error("tls: {0}")]
    Tls(#[source] io::Error),
    #[error("http2: {0}")]
    H2(#[source] ::h2::Error),
    #[error("tunnel answered {0}")]
    Status(http::StatusCode),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("bad CONNECT: {0}")]
    BadRequest(String),
    #[error("{0} is not a workload of this node")]
    NotLocalDestination(SocketAddr),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("draining")]
    Draining,
    #[error("{0} holds {1} connections, its limit")]
    ConnectionLimit(String, usize),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// The refusal this error is, if it is one (a connection turned away on purpose, not a
    /// failure): the cause [`crate::refusals`] logs once.
    pub fn refusal(&self) -> Option<&'static str> {
        match self {
            Error::UnknownSource(_) => Some("unknown-source"),
            Error::NotLocalSource(_) => Some("not-local-source"),
            Error::SelfConnect(_) => Some("self-connect"),
            Error::Denied(_) => Some("denied"),
            Error::BadRequest(_) => Some("bad-request"),
            Error::NotLocalDestination(_) => Some("not-local-destination"),
            Error::Tls(_) => Some("tls-handshake"),
            Error::Timeout("TLS handshake" | "HTTP/2 handshake") => Some("handshake-timeout"),
            Error::ConnectionLimit(..) => Some("connection-limit"),
            _ => None,
        }
    }
}

/// Everything a listener needs.
pub struct Inputs {
    pub cfg: Arc<Config>,
    pub state: StateHandle,
    pub tls: Arc<TlsContext>,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<pool::Pool>,
    pub drain: Drain,
    /// Concurrent connections per source.
    pub limits: Arc<limits::Limits>,
    /// This netns' addresses and our listener ports: a destination among them is ourselves.
    pub own_addrs: Vec<IpAddr>,
    pub own_ports: Vec<u16>,
}

impl Inputs {
    /// A place for a new connection from `src` under its source's cap (its workload's, else its
    /// address's). Taken in the accept loop itself, before the connection waits for a task: a
    /// refused one is closed at once, and a flood's queued connections hold no descriptors.
    pub fn admit(&self, src: IpAddr) -> Result<limits::Permit, Error> {
        let state = self.state.get();
        let wl = state.workload_by_ip(src).map(|w| w.as_ref());
        self.limits.acquire(limits::Source::of(wl, src))
    }

    /// The same by address only (15008, before the handshake says who the peer is).
    pub fn admit_addr(&self, src: IpAddr) -> Result<limits::Permit, Error> {
        self.limits
            .acquire(limits::Source::Addr(src.to_canonical()))
    }

    pub fn is_self(&self, dst: SocketAddr) -> bool {
        is_self_in(&self.own_addrs, &self.own_ports, dst)
    }
}

/// Is `dst` one of our listeners: one of `ports` on a loopback or wildcard address (`127/8`,
/// `::1`, `0.0.0.0`, `::`) or on one of `addrs`? A v4-mapped address counts as its IPv4 twin.
fn is_self_in(addrs: &[IpAddr], ports: &[u16], dst: SocketAddr) -> bool {
    let ip = dst.ip().to_canonical();
    ports.contains(&dst.port()) && (ip.is_loopback() || ip.is_unspecified() || addrs.contains(&ip))
}

/// One connection's access-log line and metrics, filled in as it goes.
pub struct ConnLog {
    pub direction: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_workload: Option<Arc<Workload>>,
    pub src_identity: Option<Identity>,
    pub dst_workload: Option<Arc<Workload>>,
    pub dst_identity: Option<Identity>,
    pub dst_service: Option<String>,
    /// `hbone`, `waypoint`, `passthrough`, `local`, `inbound`.
    pub route: &'static str,
    /// Where the bytes actually went (tunnel endpoint or upstream address).
    pub upstream: Option<SocketAddr>,
    pub mtls: bool,
    /// Which sides this process reports for (`source`, `destination`).
    pub reporters: &'static [&'static str],
    /// Set when the connection was refused on purpose (see [`Error::refusal`]): its access
    /// line is INFO and the WARN comes once per cause ([`crate::refusals`]).
    pub refusal: Option<&'static str>,
    start: Instant,
    opened: Vec<ConnLabels>,
}

impl ConnLog {
    pub fn new(direction: &'static str, src: SocketAddr, dst: SocketAddr) -> ConnLog {
        ConnLog {
            direction,
            src,
            dst,
            src_workload: None,
            src_identity: None,
            dst_workload: None,
            dst_identity: None,
            dst_service: None,
            route: "",
            upstream: None,
            mtls: false,
            reporters: &[],
            refusal: None,
            start: Instant::now(),
            opened: Vec::new(),
        }
    }

    /// A connection refused before it was handled (see [`Inputs::admit`]): its log line.
    pub fn refused(self, m: &Metrics, e: &Error) {
        let mut log = self;
        log.refusal = e.refusal();
        log.finish(m, 0, 0, Err(e.to_string()));
    }

    /// The connection is established: count it opened.
    pub fn opened(&mut self, m: &Metrics) {
        for r in self.reporters {
            let l = ConnLabels::new(
                r,
                self.src_workload.as_deref(),
                self.src_identity.as_ref(),
                self.dst_workload.as_deref(),
                self.dst_identity.as_ref(),
                self.dst_service.as_deref(),
                self.mtls,
            );
            m.opened.get_or_create(&l).inc();
            self.opened.push(l);
        }
    }

    /// Logs the line and, if it was opened, counts it closed with its bytes. `sent` is from
    /// the destination to the source (Istio's "sent during response"), `received` the other way.
    pub fn finish(self, m: &Metrics, received: u64, sent: u64, result: Result<(), String>) {
        for l in &self.opened {
            m.closed.get_or_create(l).inc();
            m.received.get_or_create(l).inc_by(received);
            m.sent.get_or_create(l).inc_by(sent);
        }
        let opt = |v: Option<String>| v.unwrap_or_default();
        let src_workload = opt(self.src_workload.as_ref().map(|w| w.uid.clone()));
        let dst_workload = opt(self.dst_workload.as_ref().map(|w| w.uid.clone()));
        let src_identity = opt(self.src_identity.as_ref().map(|i| i.to_string()));
        let dst_identity = opt(self.dst_identity.as_ref().map(|i| i.to_string()));
        let upstream = opt(self.upstream.map(|a| a.to_string()));
        let dst_service = self.dst_service.clone().unwrap_or_default();
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let security = if self.mtls { "mutual_tls" } else { "none" };
        match result {
            Ok(()) => tracing::info!(
                target: "access",
                direction = self.direction, src.addr = %self.src, dst.addr = %self.dst,
                src.workload = %src_workload, src.identity = %src_identity,
                dst.workload = %dst_workload, dst.identity = %dst_identity,
                dst.service = %dst_service, route = self.route, upstream = %upstream,
                security, bytes_sent = sent, bytes_received = received,
                duration_ms = format_args!("{duration_ms:.1}"), result = "ok",
                "connection complete"
            ),
            Err(e) if self.refusal.is_some() => {
                let cause = self.refusal.unwrap_or_default();
                tracing::info!(
                    target: "access",
                    direction = self.direction, src.addr = %self.src, dst.addr = %self.dst,
                    src.workload = %src_workload, src.identity = %src_identity,
                    dst.workload = %dst_workload, dst.identity = %dst_identity,
                    dst.service = %dst_service, route = self.route, upstream = %upstream,
                    security, bytes_sent = sent, bytes_received = received,
                    duration_ms = format_args!("{duration_ms:.1}"), result = "refused", cause,
                    error = %e, "connection refused"
                );
                m.refused(self.direction, cause);
                crate::refusals::warn(
                    self.direction,
                    cause,
                    &format_args!("{} -> {}: {e}", self.src, self.dst),
                );
            }
            Err(e) => tracing::warn!(
                target: "access",
                direction = self.direction, src.addr = %self.src, dst.addr = %self.dst,
                src.workload = %src_workload, src.identity = %src_identity,
                dst.workload = %dst_workload, dst.identity = %dst_identity,
                dst.service = %dst_service, route = self.route, upstream = %upstream,
                security, bytes_sent = sent, bytes_received = received,
                duration_ms = format_args!("{duration_ms:.1}"), result = "error", error = %e,
                "connection failed"
            ),
        }
    }
}

/// The `forwarded` header of a tunnel speaking for `client` (RFC 7239): `for="10.0.0.1:4000"`,
/// `for="[fd00::1]:4000"` (quoted: `:` and `[` are not token characters).
pub fn forwarded_value(client: SocketAddr) -> String {
    format!("for=\"{}\"", SocketAddr::new(client.ip(), client.port()))
}

/// The address of the original client a tunnel speaks for, from a `forwarded` header
/// (`for="10.0.0.1:4000"`, `for=10.0.0.1` (port 0), `for="[fd00::1]:4000"`).
pub fn forwarded_for(value: &str) -> Option<SocketAddr> {
    for elem in value.split(',') {
        for pair in elem.split(';') {
            let (k, v) = pair.trim().split_once('=')?;
            if !k.trim().eq_ignore_ascii_case("for") {
                continue;
            }
            let v = v.trim().trim_matches('"');
            if let Ok(sa) = v.parse::<SocketAddr>() {
                return Some(sa);
            }
            let v = v.trim_start_matches('[').trim_end_matches(']');
            return v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn refusals_are_named_and_failures_are_not() {
        let ip: std::net::IpAddr = "10.244.1.9".parse().unwrap();
        assert_eq!(Error::UnknownSource(ip).refusal(), Some("unknown-source"));
        assert_eq!(
            Error::Timeout("HTTP/2 handshake").refusal(),
            Some("handshake-timeout")
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            Error::Connect("10.0.0.1:80".parse().unwrap(), refused).refusal(),
            None
        );
        assert_eq!(Error::Timeout("CONNECT response").refusal(), None);
    }

    use super::*;

    #[test]
    fn forwarded_header_forms() {
        let sa = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(forwarded_for("for=\"10.0.0.1:4000\""), sa("10.0.0.1:4000"));
        assert_eq!(forwarded_for("for=10.0.0.1"), sa("10.0.0.1:0"));
        assert_eq!(
            forwarded_for("for=\"[fd00::1]:4000\""),
            sa("[fd00::1]:4000")
        );
        assert_eq!(
            forwarded_for("proto=http;for=10.0.0.2, for=10.0.0.3"),
            sa("10.0.0.2:0")
        );
        assert_eq!(
            forwarded_for("for=\"[fd00::1]\""),
            sa("[fd00::1]:0"),
            "a v6 node without a port"
        );
        assert_eq!(forwarded_for("by=10.0.0.1"), None);
        assert_eq!(forwarded_for("for=unknown"), None);
    }

    #[test]
    fn forwarded_value_round_trips_both_families() {
        for c in ["10.0.0.1:4000", "[fd00::1]:4000", "[::1]:1"] {
            let c: SocketAddr = c.parse().unwrap();
            let v = forwarded_value(c);
            assert!(v.starts_with("for=\"") && v.ends_with('"'), "{v}");
            assert!(http::HeaderValue::from_str(&v).is_ok(), "{v}");
            assert_eq!(forwarded_for(&v), Some(c));
        }
        assert_eq!(
            forwarded_value("[fd00::1]:4000".parse().unwrap()),
            r#"for="[fd00::1]:4000""#
        );
        // A scope id is this host's business.
        assert_eq!(
            forwarded_value("[fe80::1%3]:4000".parse().unwrap()),
            r#"for="[fe80::1]:4000""#
        );
    }

    #[test]
    fn self_connections_of_both_families_are_recognised() {
        let own_addrs: Vec<IpAddr> =
            vec!["10.0.9.1".parse().unwrap(), "fd00:9::1".parse().unwrap()];
        let own_ports = vec![15001, 15006, 15008];
        let is_self = |d: &str| is_self_in(&own_addrs, &own_ports, d.parse().unwrap());
        for d in [
            "127.0.0.1:15001",
            "[::1]:15001",
            "[::]:15008",
            "0.0.0.0:15006",
            "10.0.9.1:15008",
            "[fd00:9::1]:15006",
            "[::ffff:10.0.9.1]:15001",
        ] {
            assert!(is_self(d), "{d}");
        }
        for d in ["[fd00:9::1]:80", "[fd00:9::2]:15001", "10.0.9.2:15001"] {
            assert!(!is_self(d), "{d}");
        }
    }
}
