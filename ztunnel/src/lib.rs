//! ztunnel: the node's HBONE data plane.
//!
//! The kernel (see `ambient-net`) hands this process every TCP connection of the node's mesh
//! pods: outbound ones on 15001, inbound HBONE on 15008, inbound plaintext on 15006. The modules
//! follow the concerns of the upstream design:
//!
//! - [`config`]: the command line and the local YAML config file (schema and parsing);
//! - [`state`]: workloads, services and policies indexed by IP/VIP, reloaded on change;
//! - [`discovery`]: Kubernetes mode, workloads and services from the API server;
//! - [`rbac`]: authorization policy evaluation;
//! - [`identity`]: SPIFFE identities, the embedded CA, the certificate store and rotation;
//! - [`tls`]: rustls configurations and the SPIFFE-aware verifiers;
//! - [`proxy`]: the listeners, the HBONE connection pool and the relays;
//! - [`socket`]: transparent listeners and spoofing upstream sockets;
//! - [`metrics`], [`admin`]: Prometheus metrics, `/config_dump`, readiness;
//! - [`app`]: wiring, drain on SIGTERM; [`process`]: logging, runtimes, signals.
//!
//! The waypoint (`waypoint/`) is built on this library: it shares the TLS configurations and
//! SPIFFE verification, identity and certificates, the HBONE pool and h2 relays, metrics and
//! the side ports.

pub mod admin;
pub mod app;
pub mod client;
pub mod config;
pub mod discovery;
pub mod drain;
pub mod explain;
pub mod identity;
pub mod metrics;
pub mod process;
pub mod proxy;
pub mod rbac;
pub mod refusals;
pub mod socket;
pub mod state;
pub mod syn_limit;
pub mod tls;
