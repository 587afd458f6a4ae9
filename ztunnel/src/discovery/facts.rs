//! What discovery keeps of each watched object: only the fields it reads, so the store of a
//! large cluster stays small. The watchers ([`super::watch`]) fill a [`Store`]; the builder
//! ([`super::build`]) reads it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambient_net::consts::membership::{
    NAMESPACE_LABEL, NAMESPACE_LABEL_VALUE, REDIRECTION_ANNOTATION, REDIRECTION_DISABLED,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

/// Namespace label turning on sidecar injection (such pods are never in the ambient mesh).
pub const INJECTION_LABEL: &str = "istio-injection";
/// Revision label: sidecar injection by a control-plane revision (namespace or pod).
pub const REVISION_LABEL: &str = "istio.io/rev";
/// The injected sidecar container.
pub const SIDECAR_CONTAINER: &str = "istio-proxy";
/// Set by the sidecar injector on the pods it injected.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// The label naming an EndpointSlice's service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// On a Service, a namespace or a pod: the waypoint (its Gateway's name) its traffic goes
/// through; `none` opts out of a less specific binding.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Next to [`USE_WAYPOINT_LABEL`]: the waypoint's namespace (default: the object's own).
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// On a waypoint's pods and Service: the Gateway they implement. Waypoints use no waypoint.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// What an object's `istio.io/use-waypoint` labels say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UseWaypoint {
    /// `istio.io/use-waypoint: none`: no waypoint, whatever a less specific level says.
    OptOut,
    /// The waypoint `<namespace>/<name>` (namespace from `istio.io/use-waypoint-namespace`,
    /// else the object's own).
    Gateway { namespace: String, name: String },
}

impl UseWaypoint {
    /// From the labels of an object in `namespace` (a namespace's own name for namespaces).
    pub fn from_labels(
        labels: Option<&BTreeMap<String, String>>,
        namespace: &str,
    ) -> Option<UseWaypoint> {
        let labels = labels?;
        let name = labels.get(USE_WAYPOINT_LABEL)?.trim();
        if name.is_empty() {
            return None;
        }
        if name == "none" {
            return Some(UseWaypoint::OptOut);
        }
        let namespace = labels
            .get(USE_WAYPOINT_NAMESPACE_LABEL)
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .unwrap_or(namespace);
        Some(UseWaypoint::Gateway {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsFacts {
    /// `istio.io/dataplane-mode=ambient`.
    pub ambient: bool,
    /// `istio-injection=enabled` or an `istio.io/rev` label.
    pub sidecar_injection: bool,
    /// `istio.io/use-waypoint` on the namespace: its services and pods.
    pub use_waypoint: Option<UseWaypoint>,
}

impl NsFacts {
    pub fn from_namespace(ns: &Namespace) -> NsFacts {
        let labels = ns.metadata.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        NsFacts {
            ambient: label(NAMESPACE_LABEL) == Some(NAMESPACE_LABEL_VALUE),
            sidecar_injection: label(INJECTION_LABEL) == Some("enabled")
                || label(REVISION_LABEL).is_some(),
            use_waypoint: UseWaypoint::from_labels(
                labels,
                ns.metadata.name.as_deref().unwrap_or_default(),
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub service_account: String,
    pub node: Option<String>,
    pub host_network: bool,
    /// `status.podIPs`, else `status.podIP`.
    pub ips: Vec<IpAddr>,
    /// `ambient.istio.io/redirection: disabled`.
    pub opted_out: bool,
    /// A sidecar pod: `istio.io/rev` label, an `istio-proxy` (init) container, or the
    /// injector's status annotation.
    pub sidecar: bool,
    /// Phase Succeeded or Failed: its IP may already belong to another pod.
    pub finished: bool,
    /// `metadata.deletionTimestamp` is set (still running, shutting down).
    pub terminating: bool,
    /// `istio.io/use-waypoint` on the pod.
    pub use_waypoint: Option<UseWaypoint>,
    /// A waypoint's own pod (`gateway.networking.k8s.io/gateway-name`): never behind one.
    pub waypoint: bool,
}

impl PodFacts {
    pub fn from_pod(pod: &Pod) -> PodFacts {
        let m = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(
                status
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        let annotation = |k: &str| {
            m.annotations
                .as_ref()
                .and_then(|a| a.get(k))
                .map(String::as_str)
        };
        let proxy_container = spec.is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == SIDECAR_CONTAINER)
        });
        let phase = status.and_then(|s| s.phase.as_deref());
        PodFacts {
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            node: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ips,
            opted_out: annotation(REDIRECTION_ANNOTATION) == Some(REDIRECTION_DISABLED),
            sidecar: proxy_container
                || annotation(SIDECAR_STATUS_ANNOTATION).is_some()
                || m.labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(REVISION_LABEL)),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
            terminating: m.deletion_timestamp.is_some(),
            use_waypoint: UseWaypoint::from_labels(
                m.labels.as_ref(),
                m.namespace.as_deref().unwrap_or_default(),
            ),
            waypoint: m
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(GATEWAY_NAME_LABEL)),
        }
    }
}

/// Where a service port leads on its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name: resolved per endpoint by the EndpointSlices.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortFacts {
    /// `""` when unnamed (a single-port service).
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for headless services.
    pub vips: Vec<IpAddr>,
    /// The TCP ports only: ztunnel carries TCP.
    pub ports: Vec<ServicePortFacts>,
    /// `type: ExternalName`: a DNS alias, nothing to balance.
    pub external_name: bool,
    /// `istio.io/use-waypoint` on the service.
    pub use_waypoint: Option<UseWaypoint>,
    /// A waypoint's own Service (`gateway.networking.k8s.io/gateway-name`): never behind one.
    pub waypoint: bool,
}

impl ServiceFacts {
    pub fn from_service(svc: &Service) -> ServiceFacts {
        let spec = svc.spec.as_ref();
        let mut vips: Vec<IpAddr> = spec
            .and_then(|s| s.cluster_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if vips.is_empty() {
            // "None" (headless) and "" do not parse.
            vips.extend(
                spec.and_then(|s| s.cluster_ip.as_deref())
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
            );
        }
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok().filter(|p| *p > 0)?;
                let target = match &p.target_port {
                    None => TargetPort::Number(port),
                    Some(IntOrString::Int(n)) => {
                        TargetPort::Number(u16::try_from(*n).ok().filter(|n| *n > 0)?)
                    }
                    Some(IntOrString::String(s)) => match s.parse::<u16>() {
                        Ok(n) if n > 0 => TargetPort::Number(n),
                        _ => TargetPort::Named(s.clone()),
                    },
                };
                Some(ServicePortFacts {
                    name: p.name.clone().unwrap_or_default(),
                    port,
                    target,
                })
            })
            .collect();
        ServiceFacts {
            vips,
            ports,
            external_name: spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName"),
            use_waypoint: UseWaypoint::from_labels(
                svc.metadata.labels.as_ref(),
                svc.metadata.namespace.as_deref().unwrap_or_default(),
            ),
            waypoint: svc
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(GATEWAY_NAME_LABEL)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointFacts {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready`; unset counts as ready, as the API documents.
    pub ready: bool,
    /// `targetRef` when it is a Pod: (namespace, name).
    pub pod: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceFacts {
    /// The `kubernetes.io/service-name` label.
    pub service: Option<String>,
    /// TCP ports: (name, `""` when unnamed) → port number on the endpoints.
    pub ports: BTreeMap<String, u16>,
    pub endpoints: Vec<EndpointFacts>,
}

impl SliceFacts {
    pub fn from_slice(slice: &EndpointSlice) -> SliceFacts {
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        let ip_slice = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok().filter(|p| *p > 0)?;
                Some((p.name.clone().unwrap_or_default(), port))
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .filter(|_| ip_slice)
            .map(|e| EndpointFacts {
                addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
                pod: e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        let ns = r.namespace.clone().unwrap_or_else(|| namespace.clone());
                        Some((ns, r.name.clone()?))
                    }),
            })
            .collect();
        SliceFacts {
            service: slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL).cloned()),
            ports,
            endpoints,
        }
    }
}

fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

/// (namespace, name); namespaces themselves have namespace `""`.
pub type Key = (String, String);

/// One watched resource: its objects' facts by key, with their uids (a delete removes only the
/// object it names, not a successor of the same name).
#[derive(Debug)]
pub struct Table<F> {
    pub items: BTreeMap<Key, (String, F)>,
    /// A complete list has arrived at least once.
    pub listed: bool,
    /// Complete lists so far (the first one and every re-list).
    pub lists: u64,
    pub last_error: Option<String>,
}

impl<F> Default for Table<F> {
    fn default() -> Self {
        Table {
            items: BTreeMap::new(),
            listed: false,
            lists: 0,
            last_error: None,
        }
    }
}

impl<F> Table<F> {
    pub fn get(&self, key: &Key) -> Option<&F> {
        self.items.get(key).map(|(_, f)| f)
    }

    pub fn status(&self) -> TableStatus {
        TableStatus {
            count: self.items.len(),
            listed: self.listed,
            lists: self.lists,
            last_error: self.last_error.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableStatus {
    pub count: usize,
    pub listed: bool,
    pub lists: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Everything discovery knows of the cluster.
#[derive(Debug, Default)]
pub struct Store {
    pub namespaces: Table<NsFacts>,
    pub pods: Table<PodFacts>,
    pub services: Table<ServiceFacts>,
    pub slices: Table<SliceFacts>,
    /// Something changed since the last build.
    pub dirty: bool,
}

impl Store {
    /// Every resource has been listed completely at least once.
    pub fn synced(&self) -> bool {
        self.namespaces.listed && self.pods.listed && self.services.listed && self.slices.listed
    }
}
