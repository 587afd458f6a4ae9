//! ambient-lab: a two-node ambient-mesh lab in network namespaces, built by driving the
//! real CNI chain (primary plugin + host-local + ambient-cni) through a libcni client,
//! with the node agent and ztunnel-init of this workspace; and the harness the
//! integration tests use to bring it up, talk across it and tear it down.
//!
//! Modules by concern: [`topology`] (shape, netns, underlay), [`cni`] (client build,
//! conflist, ADD/DEL), [`agent`] (agent and ztunnel-init), [`service`] (kube-proxy-style
//! DNAT), [`ztunnel`] and [`waypoint`] (the data plane's config and processes), [`http`]
//! (HTTP/1.1 and h2c clients for tests), [`procs`] and [`state`] (what was started and made), [`up`] / [`down`] /
//! [`status`] / [`exec`] (the commands), [`serve`] and [`tproxy`] (test endpoints run
//! inside pods), [`harness`] (the `Lab` RAII helper), [`bench`] (`ambient-lab bench`: the
//! meshed path against the unmeshed one, and the control plane's costs).

pub mod agent;
pub mod bench;
pub mod cni;
pub mod demo;
pub mod down;
pub mod drill;
pub mod exec;
pub mod explain;
pub mod flood;
pub mod harness;
pub mod http;
pub mod paths;
pub mod procs;
pub mod serve;
pub mod service;
pub mod snapshot;
pub mod soak;
pub mod state;
pub mod status;
pub mod sysctl;
pub mod topology;
pub mod tproxy;
pub mod up;
pub mod waypoint;
pub mod ztunnel;

pub use harness::{unique_prefix, Lab, LabOptions};
