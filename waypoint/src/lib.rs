//! waypoint: the mesh's L7 proxy.
//!
//! ztunnel sends the traffic of the services (and workloads) that use this waypoint to it over
//! HBONE; the waypoint terminates the tunnel, applies HTTP routing (Gateway API `HTTPRoute`)
//! and L7 authorization (Istio `AuthorizationPolicy`), and carries each request to an endpoint
//! over HBONE again. The HBONE pieces (TLS 1.3 and SPIFFE verification, the h2 CONNECT server
//! settings and client pool, identity and certificates, TCP metrics, side ports) are
//! ztunnel's library, not a copy.
//!
//! - [`config`]: the command line and the config file's schema;
//! - [`state`]: the parsed, validated file, swapped whole on reload;
//! - [`route`]: `HTTPRoute` matching, precedence, filters, weights;
//! - [`authz`]: L7 `AuthorizationPolicy` evaluation;
//! - [`proxy`]: the HBONE listener, HTTP and TCP handling, upstream connections;
//! - [`metrics`], [`admin`]: Istio's request metrics, `/config_dump`, readiness;
//! - [`app`]: wiring, reload, drain on SIGTERM.

pub mod admin;
pub mod app;
pub mod authz;
pub mod config;
pub mod kube;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod state;
