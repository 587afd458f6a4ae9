//! The data plane.
//!
//! - [`server`] (15008): HBONE from ztunnels: mTLS with the waypoint's identity, HTTP/2
//!   CONNECT for a service VIP:port (or workload address) this waypoint serves; inside each
//!   tunnel HTTP/1.1 or HTTP/2 (detected) goes to [`http`], anything else to [`tcp`];
//! - [`http`]: one request: authorization, routing, filters, retries and timeouts, metrics
//!   and the access log;
//! - [`upstream`]: requests carried to endpoints over HBONE, connections reused;
//! - [`tcp`]: L4 relay with L4 policy only;
//! - [`body`]: body types and byte counting.

pub mod body;
pub mod http;
pub mod server;
pub mod tcp;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use ztunnel::drain::Drain;
use ztunnel::identity::Identity;
use ztunnel::metrics::Metrics;
use ztunnel::tls::TlsContext;

use crate::config::Config;
use crate::metrics::HttpMetrics;
use crate::state::{Destination, StateHandle};

/// Everything the listener and its connections need.
pub struct Inputs {
    pub cfg: Arc<Config>,
    pub state: StateHandle,
    pub tls: Arc<TlsContext>,
    /// ztunnel's TCP families (L4 relays) and the registry `/metrics` encodes.
    pub metrics: Arc<Metrics>,
    pub http_metrics: HttpMetrics,
    pub upstream: Arc<upstream::Upstream>,
    pub drain: Drain,
}

/// One accepted CONNECT stream: who sent it and what it is for.
#[derive(Debug, Clone)]
pub struct Downstream {
    /// The tunnel's peer (the client's ztunnel dials from the client's address).
    pub peer: SocketAddr,
    /// The client, from the tunnel's `forwarded` header when it is the peer identity's.
    pub src: SocketAddr,
    /// The peer certificate's identity: the request's source principal.
    pub identity: Identity,
    /// The CONNECT's `:authority`.
    pub authority: SocketAddr,
    pub dest: Destination,
}

impl Downstream {
    /// What authorization looks at for this tunnel (`http`: the request, None at L4).
    pub fn attrs<'a>(
        &'a self,
        http: Option<crate::authz::HttpAttrs<'a>>,
    ) -> crate::authz::Attrs<'a> {
        crate::authz::Attrs {
            principal: Some(&self.identity),
            source_ip: self.src.ip(),
            remote_ip: self.peer.ip(),
            destination_ip: self.authority.ip(),
            destination_port: self.authority.port(),
            http,
        }
    }

    /// The namespace and name of what was asked for, as policies name it (a workload has no
    /// service name).
    pub fn target_names(&self) -> (&str, &str) {
        match &self.dest {
            Destination::Service(s, _) => (&s.namespace, &s.name),
            Destination::Workload(w, _) => (&w.namespace, ""),
        }
    }
}
