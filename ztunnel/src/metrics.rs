//! Prometheus metrics with Istio's names and labels, served on 15020 `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::identity::Identity;
use crate::state::Workload;

pub const MUTUAL_TLS: &str = "mutual_tls";
pub const NONE: &str = "none";
const UNKNOWN: &str = "unknown";

/// Labels of the TCP metrics (a subset of Istio's standard labels).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// `source` (the client's ztunnel) or `destination` (the server's).
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    /// `mutual_tls` or `none`.
    pub connection_security_policy: String,
}

impl ConnLabels {
    pub fn new(
        reporter: &str,
        src: Option<&Workload>,
        src_id: Option<&Identity>,
        dst: Option<&Workload>,
        dst_id: Option<&Identity>,
        dst_service: Option<&str>,
        mtls: bool,
    ) -> ConnLabels {
        let s = |v: Option<&str>| v.unwrap_or(UNKNOWN).to_string();
        ConnLabels {
            reporter: reporter.to_string(),
            source_workload: s(src.map(|w| w.name.as_str())),
            source_workload_namespace: s(src.map(|w| w.namespace.as_str())),
            source_principal: src_id
                .map(|i| i.to_string())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_workload: s(dst.map(|w| w.name.as_str())),
            destination_workload_namespace: s(dst.map(|w| w.namespace.as_str())),
            destination_principal: dst_id
                .map(|i| i.to_string())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_service: s(dst_service),
            connection_security_policy: if mtls { MUTUAL_TLS } else { NONE }.to_string(),
        }
    }
}

/// Labels of the refusal counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The listener's direction: `outbound`, `inbound`, `inbound_plaintext`.
    pub direction: String,
    /// The cause, as [`crate::refusals`] logs it (`connection-limit`, `denied`…).
    pub cause: String,
}

pub struct Metrics {
    registry: Registry,
    /// Connections (or HBONE streams) turned away on purpose, by cause.
    pub refused_by_cause: Family<RefusalLabels, Counter>,
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent: Family<ConnLabels, Counter>,
    pub received: Family<ConnLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Self::with(|_| ())
    }

    /// The TCP families and whatever `extra` registers beside them in the same registry (the
    /// waypoint adds its HTTP families), all served on one `/metrics`.
    pub fn with(extra: impl FnOnce(&mut Registry)) -> Metrics {
        let mut registry = Registry::default();
        let opened = Family::<ConnLabels, Counter>::default();
        let closed = Family::<ConnLabels, Counter>::default();
        let sent = Family::<ConnLabels, Counter>::default();
        let received = Family::<ConnLabels, Counter>::default();
        let refused_by_cause = Family::<RefusalLabels, Counter>::default();
        // The registry appends `_total` to counters.
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response (destination to source)",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request (source to destination)",
            received.clone(),
        );
        registry.register(
            "ztunnel_refused_connections",
            "Connections and HBONE streams refused on purpose, by listener and cause",
            refused_by_cause.clone(),
        );
        extra(&mut registry);
        Metrics {
            registry,
            refused_by_cause,
            opened,
            closed,
            sent,
            received,
        }
    }

    /// Counts one refusal.
    pub fn refused(&self, direction: &str, cause: &str) {
        self.refused_n(direction, cause, 1);
    }

    /// Counts `n` refusals.
    pub fn refused_n(&self, direction: &str, cause: &str, n: u64) {
        let l = RefusalLabels {
            direction: direction.to_string(),
            cause: cause.to_string(),
        };
        self.refused_by_cause.get_or_create(&l).inc_by(n);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        let m = Metrics::new();
        let id = Identity::new("cluster.local", "demo", "sleep");
        let l = ConnLabels::new("source", None, Some(&id), None, None, None, true);
        m.opened.get_or_create(&l).inc();
        m.received.get_or_create(&l).inc_by(42);
        let text = m.encode();
        assert!(
            text.contains("istio_tcp_connections_opened_total{"),
            "{text}"
        );
        assert!(
            text.contains("connection_security_policy=\"mutual_tls\""),
            "{text}"
        );
        assert!(
            text.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/sleep\""),
            "{text}"
        );
        assert!(text.contains("destination_workload=\"unknown\""), "{text}");
        assert!(text.contains("} 42"), "{text}");
        m.refused("outbound", "connection-limit");
        m.refused("outbound", "connection-limit");
        let text = m.encode();
        assert!(
            text.contains(
                "ztunnel_refused_connections_total{direction=\"outbound\",cause=\"connection-limit\"} 2"
            ),
            "{text}"
        );
    }
}
