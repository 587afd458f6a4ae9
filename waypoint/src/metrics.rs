//! The waypoint's HTTP metrics, with Istio's names and labels (`reporter="waypoint"`), served
//! beside ztunnel's TCP families (used for connections relayed at L4) on one `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use ztunnel::identity::Identity;
use ztunnel::metrics::Metrics;
use ztunnel::state::{Service, Workload};

pub const REPORTER: &str = "waypoint";
const UNKNOWN: &str = "unknown";

/// Istio's request duration buckets (ms).
const DURATION_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets (bytes).
const BYTES: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_MS)
}

fn bytes_histogram() -> Histogram {
    Histogram::new(BYTES)
}

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// The service's hostname.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `http` (HTTP/1.1) or `http2`... as Istio: `http` for both, `grpc` for gRPC.
    pub request_protocol: String,
    pub response_code: String,
    /// Envoy's: `-`, `UF` (upstream connect failure), `UH` (no healthy upstream), `UT`
    /// (timeout), `URX` (retries exhausted), `DC` (client went away), `NR` (no backend).
    pub response_flags: String,
    pub connection_security_policy: String,
}

/// What one request's labels are made of.
pub struct RequestFacts<'a> {
    pub src: Option<&'a Workload>,
    pub src_id: Option<&'a Identity>,
    pub dst: Option<&'a Workload>,
    pub service: Option<&'a Service>,
    pub protocol: &'a str,
    pub code: u16,
    pub flags: &'a str,
}

impl RequestLabels {
    pub fn new(f: &RequestFacts) -> RequestLabels {
        let s = |v: Option<&str>| v.unwrap_or(UNKNOWN).to_string();
        RequestLabels {
            reporter: REPORTER.into(),
            source_workload: s(f.src.map(|w| w.name.as_str())),
            source_workload_namespace: s(f.src.map(|w| w.namespace.as_str())),
            source_principal: f
                .src_id
                .map(|i| i.to_string())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_workload: s(f.dst.map(|w| w.name.as_str())),
            destination_workload_namespace: s(f.dst.map(|w| w.namespace.as_str())),
            destination_principal: f
                .dst
                .map(|w| w.identity.to_string())
                .unwrap_or_else(|| UNKNOWN.into()),
            destination_service: s(f.service.map(|s| s.hostname.as_str())),
            destination_service_name: s(f.service.map(|s| s.name.as_str())),
            destination_service_namespace: s(f.service.map(|s| s.namespace.as_str())),
            request_protocol: f.protocol.into(),
            response_code: f.code.to_string(),
            response_flags: f.flags.into(),
            connection_security_policy: ztunnel::metrics::MUTUAL_TLS.into(),
        }
    }
}

#[derive(Clone)]
pub struct HttpMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration_ms: Histograms,
    pub request_bytes: Histograms,
    pub response_bytes: Histograms,
}

impl HttpMetrics {
    /// The HTTP families and, in the same registry, ztunnel's TCP families.
    pub fn new() -> (HttpMetrics, Metrics) {
        let http = HttpMetrics {
            requests: Family::default(),
            duration_ms: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
        };
        let h = http.clone();
        let tcp = Metrics::with(move |r: &mut Registry| {
            r.register("istio_requests", "The total number of requests", h.requests);
            r.register(
                "istio_request_duration_milliseconds",
                "Duration of requests, until the response's end",
                h.duration_ms,
            );
            r.register(
                "istio_request_bytes",
                "Size of request bodies",
                h.request_bytes,
            );
            r.register(
                "istio_response_bytes",
                "Size of response bodies",
                h.response_bytes,
            );
        });
        (http, tcp)
    }

    pub fn record(&self, l: &RequestLabels, duration_ms: f64, req_bytes: u64, resp_bytes: u64) {
        self.requests.get_or_create(l).inc();
        self.duration_ms.get_or_create(l).observe(duration_ms);
        self.request_bytes
            .get_or_create(l)
            .observe(req_bytes as f64);
        self.response_bytes
            .get_or_create(l)
            .observe(resp_bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        let (http, all) = HttpMetrics::new();
        let id = Identity::new("cluster.local", "demo", "client");
        let l = RequestLabels::new(&RequestFacts {
            src: None,
            src_id: Some(&id),
            dst: None,
            service: None,
            protocol: "http",
            code: 403,
            flags: "-",
        });
        http.record(&l, 3.0, 10, 19);
        let text = all.encode();
        for want in [
            "istio_requests_total{reporter=\"waypoint\"",
            "response_code=\"403\"",
            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
            "istio_request_duration_milliseconds_bucket{",
            "istio_request_bytes_sum{",
            "istio_response_bytes_count{",
            "# TYPE istio_tcp_connections_opened counter",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }
}
