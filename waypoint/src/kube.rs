//! Kubernetes mode (`waypoint --kube`): the waypoint's whole state from the API server.
//!
//! * The mesh (workloads and services, with their `waypoint` bindings from the
//!   `istio.io/use-waypoint` labels) is ztunnel's discovery, reused as is: its watchers and its
//!   build deliver into a [`Sink`] here instead of ztunnel's state.
//! * Three more watchers, through the same kube-runtime machinery
//!   ([`ztunnel::discovery::watch::run_with`]): the waypoint's own `Gateway` (its namespace,
//!   `metadata.name`), every `HTTPRoute` (gateway.networking.k8s.io/v1, typed by the
//!   `gateway-api` crate) and every `AuthorizationPolicy` (security.istio.io/v1, typed here).
//! * [`combine`] turns all of it into a [`WaypointState`] — the typed HTTPRoutes and policies
//!   are converted into the local config's `HttpRoute`/`AuthorizationPolicy` (which mirror their
//!   specs field for field) so one compiler ([`crate::route`], [`crate::authz`]) serves both
//!   modes — and into the route status this waypoint owes (Accepted / ResolvedRefs per parent).
//! * The publisher rebuilds after changes once a burst has settled (50 ms), hands the state to
//!   the waypoint ([`KubeHandle::states`]) and writes route status where it changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::{
    HTTPRoute, HTTPRouteStatus, HTTPRouteStatusParents, HTTPRouteStatusParentsParentRef,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use ztunnel::config::{LocalConfig, LocalService, LocalWorkload};
use ztunnel::discovery::facts::Table;
use ztunnel::discovery::watch::{run_with, Tables, Watched};
use ztunnel::discovery::{Params, Sink, SETTLE};
use ztunnel::state::State;

use crate::authz::Policy;
use crate::config::{self, Action, HttpRoute, PolicyRule, PolicyTargetRef};
use crate::route::{GatewayName, RouteTable};
use crate::state::WaypointState;

/// The `controllerName` of the route status this waypoint writes.
pub const CONTROLLER_NAME: &str = "ambient-node.io/waypoint";
/// The GatewayClass of waypoints (Istio's).
pub const GATEWAY_CLASS: &str = "istio-waypoint";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The field manager of status writes.
const FIELD_MANAGER: &str = "ambient-waypoint";

/// Who this waypoint is: its Gateway, and its own pod (in the Gateway's namespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Who {
    pub gateway_namespace: String,
    pub gateway_name: String,
    pub pod_name: String,
}

// --- AuthorizationPolicy (security.istio.io/v1), typed -------------------------------------

/// Istio's `AuthorizationPolicy`, the fields a waypoint reads. Fields it does not know are
/// ignored at this level (one odd object must not break the watch of all); `rules` are checked
/// strictly against the local config's schema ([`Checked`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// The older singular form.
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    /// A workload selector: such a policy is for ztunnel (or sidecars), never a waypoint's.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// `ALLOW` (default), `DENY`; `AUDIT` and `CUSTOM` are not implemented.
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub rules: Checked<Vec<PolicyRule>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl Resource for AuthorizationPolicy {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "AuthorizationPolicy".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "security.istio.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "authorizationpolicies".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A part of an object checked strictly against the local config's schema (unknown fields and
/// bad values are errors naming the field) without failing the object's deserialization: a
/// field the waypoint does not implement makes that object invalid, not the watch.
#[derive(Debug, Clone)]
pub enum Checked<T> {
    Ok(T),
    Invalid(String),
}

impl<T: Default> Default for Checked<T> {
    fn default() -> Self {
        Checked::Ok(T::default())
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(match serde_path_to_error::deserialize::<_, T>(v) {
            Ok(t) => Checked::Ok(t),
            Err(e) => Checked::Invalid(format!("{}: {}", e.path(), e.inner())),
        })
    }
}

impl<T: Serialize> Serialize for Checked<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Checked::Ok(t) => t.serialize(s),
            Checked::Invalid(e) => s.serialize_str(e),
        }
    }
}

// --- the watched tables ------------------------------------------------------------------------

/// What the waypoint's own watchers hold (whole typed objects: routes and policies are few).
#[derive(Debug, Default)]
pub struct KubeStore {
    pub routes: Table<HTTPRoute>,
    pub policies: Table<AuthorizationPolicy>,
    pub gateways: Table<Gateway>,
    pub dirty: bool,
}

impl Tables for KubeStore {
    fn mark_dirty(&mut self) {
        self.dirty = true;
    }
}

impl KubeStore {
    pub fn synced(&self) -> bool {
        self.routes.listed && self.policies.listed && self.gateways.listed
    }
}

impl Watched<KubeStore> for HTTPRoute {
    type Facts = HTTPRoute;
    const WHAT: &'static str = "httproutes";
    fn facts(&self) -> HTTPRoute {
        self.clone()
    }
    fn table(s: &mut KubeStore) -> &mut Table<HTTPRoute> {
        &mut s.routes
    }
}

impl Watched<KubeStore> for AuthorizationPolicy {
    type Facts = AuthorizationPolicy;
    const WHAT: &'static str = "authorizationpolicies";
    fn facts(&self) -> AuthorizationPolicy {
        self.clone()
    }
    fn table(s: &mut KubeStore) -> &mut Table<AuthorizationPolicy> {
        &mut s.policies
    }
}

impl Watched<KubeStore> for Gateway {
    type Facts = Gateway;
    const WHAT: &'static str = "gateways";
    fn facts(&self) -> Gateway {
        self.clone()
    }
    fn table(s: &mut KubeStore) -> &mut Table<Gateway> {
        &mut s.gateways
    }
}

// --- combining -----------------------------------------------------------------------------------

/// The status this waypoint owes one route: its entries (our controllerName) per parent.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteStatus {
    pub namespace: String,
    pub name: String,
    pub parents: Vec<HTTPRouteStatusParents>,
}

/// One build's result.
#[derive(Debug)]
pub struct Built {
    pub state: WaypointState,
    /// For every route that has (or had) a parent of ours.
    pub statuses: Vec<RouteStatus>,
    /// The parents of ours seen (`Gateway ns/name`, `Service ns/name`), to clean up entries
    /// after a parent stops being ours.
    pub parents: BTreeSet<String>,
    pub notes: Vec<String>,
}

fn condition(
    ty: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: ty.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: Time(k8s_openapi::chrono::Utc::now()),
    }
}

/// A route parent's identity as the status spells it.
fn parent_label(p: &config::ParentRef, route_ns: &str) -> String {
    let ns = p.namespace.as_deref().unwrap_or(route_ns);
    format!("{} {ns}/{}", p.kind.as_deref().unwrap_or("Gateway"), p.name)
}

fn is_gateway_ref(p: &config::ParentRef) -> bool {
    p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
        && matches!(p.group.as_deref(), None | Some(GATEWAY_GROUP))
}

fn is_service_ref(p: &config::ParentRef) -> bool {
    p.kind.as_deref() == Some("Service") && p.group.as_deref().unwrap_or("").is_empty()
}

/// The typed HTTPRoute as the local config's route (its fields mirror the spec's): a field the
/// waypoint does not implement is an error naming it.
pub fn convert_route(r: &HTTPRoute) -> Result<HttpRoute, String> {
    let mut v = serde_json::to_value(&r.spec).map_err(|e| e.to_string())?;
    if let Some(m) = v.as_object_mut() {
        m.insert(
            "name".into(),
            json!(r.metadata.name.clone().unwrap_or_default()),
        );
        m.insert(
            "namespace".into(),
            json!(r.metadata.namespace.clone().unwrap_or_default()),
        );
    }
    serde_path_to_error::deserialize::<_, HttpRoute>(v)
        .map_err(|e| format!("spec.{}: {}", e.path(), e.inner()))
}

fn status_parent_ref(p: &config::ParentRef) -> HTTPRouteStatusParentsParentRef {
    HTTPRouteStatusParentsParentRef {
        group: p.group.clone(),
        kind: p.kind.clone(),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        port: p.port.map(i32::from),
        section_name: p.section_name.clone(),
    }
}

/// Builds the waypoint's state from the discovered mesh and the watched objects. `Err`: no
/// state can be built yet (the waypoint's own pod is not known, or a bug in discovery).
pub fn combine(
    who: &Who,
    trust_domain: &str,
    workloads: &[LocalWorkload],
    services: &[LocalService],
    store: &KubeStore,
) -> Result<Built, String> {
    let mut notes = Vec::new();
    let cfg = LocalConfig {
        workloads: workloads.to_vec(),
        services: services.to_vec(),
        policies: Vec::new(),
    };
    let mesh = State::build(&cfg, trust_domain, "").map_err(|e| e.to_string())?;
    let me = mesh
        .workloads
        .iter()
        .find(|w| w.namespace == who.gateway_namespace && w.name == who.pod_name)
        .cloned()
        .ok_or_else(|| {
            format!(
                "this waypoint's pod {}/{} is not known (yet)",
                who.gateway_namespace, who.pod_name
            )
        })?;
    let served: BTreeSet<String> = mesh
        .services
        .iter()
        .filter(|s| {
            s.waypoint
                .as_ref()
                .is_some_and(|w| mesh.is_waypoint_of(&me, w))
        })
        .map(|s| s.key())
        .collect();
    let served_by_name: BTreeSet<(String, String)> = mesh
        .services
        .iter()
        .filter(|s| served.contains(&s.key()))
        .map(|s| (s.namespace.clone(), s.name.clone()))
        .collect();
    let gw_key = (who.gateway_namespace.clone(), who.gateway_name.clone());
    let gateway_ok = match store.gateways.get(&gw_key) {
        None => {
            notes.push(format!(
                "Gateway {}/{} does not exist: routes and policies naming it do not attach",
                gw_key.0, gw_key.1
            ));
            false
        }
        Some(g) if g.spec.gateway_class_name != GATEWAY_CLASS => {
            notes.push(format!(
                "Gateway {}/{} has gatewayClassName {:?}, not {GATEWAY_CLASS:?}: routes and policies naming it do not attach",
                gw_key.0, gw_key.1, g.spec.gateway_class_name
            ));
            false
        }
        Some(g) => {
            if !g
                .spec
                .listeners
                .iter()
                .any(|l| l.port == 15008 && l.protocol == "HBONE")
            {
                notes.push(format!(
                    "Gateway {}/{} has no listener on port 15008 with protocol HBONE",
                    gw_key.0, gw_key.1
                ));
            }
            true
        }
    };
    let gateway = GatewayName {
        namespace: &who.gateway_namespace,
        name: &who.gateway_name,
    };
    let is_served = |s: &ztunnel::state::Service| served.contains(&s.key());
    let mut parents_seen = BTreeSet::new();
    parents_seen.insert(format!("Gateway {}/{}", gw_key.0, gw_key.1));
    for (ns, name) in &served_by_name {
        parents_seen.insert(format!("Service {ns}/{name}"));
    }

    // Routes, oldest first (Gateway API's tie-break), then by namespace/name.
    let mut routes: Vec<&HTTPRoute> = store.routes.items.values().map(|(_, r)| r).collect();
    routes.sort_by_key(|r| {
        (
            r.metadata.creation_timestamp.clone().map(|t| t.0),
            r.metadata.namespace.clone(),
            r.metadata.name.clone(),
        )
    });
    let mut accepted: Vec<HttpRoute> = Vec::new();
    let mut statuses = Vec::new();
    for r in routes {
        let rns = r.metadata.namespace.clone().unwrap_or_default();
        let rname = r.metadata.name.clone().unwrap_or_default();
        let generation = r.metadata.generation;
        // The parents of ours, from the typed spec (conversion may fail below).
        let ours: Vec<config::ParentRef> = r
            .spec
            .parent_refs
            .iter()
            .flatten()
            .map(|p| config::ParentRef {
                group: p.group.clone(),
                kind: p.kind.clone(),
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                port: p.port.and_then(|p| u16::try_from(p).ok()),
                section_name: p.section_name.clone(),
            })
            .filter(|p| {
                let ns = p.namespace.clone().unwrap_or_else(|| rns.clone());
                (is_gateway_ref(p) && (ns.clone(), p.name.clone()) == gw_key)
                    || (is_service_ref(p) && served_by_name.contains(&(ns, p.name.clone())))
            })
            .collect();
        let mut entry = RouteStatus {
            namespace: rns.clone(),
            name: rname.clone(),
            parents: Vec::new(),
        };
        if ours.is_empty() {
            statuses.push(entry);
            continue;
        }
        let (attachable, unattached): (Vec<_>, Vec<_>) = ours
            .into_iter()
            .partition(|p| !is_gateway_ref(p) || gateway_ok);
        for p in &unattached {
            entry.parents.push(HTTPRouteStatusParents {
                controller_name: CONTROLLER_NAME.into(),
                parent_ref: status_parent_ref(p),
                conditions: vec![
                    condition(
                        "Accepted",
                        false,
                        "NoMatchingParent",
                        &format!(
                            "{} is no Gateway of class {GATEWAY_CLASS}",
                            parent_label(p, &rns)
                        ),
                        generation,
                    ),
                    condition("ResolvedRefs", true, "ResolvedRefs", "", generation),
                ],
            });
        }
        if attachable.is_empty() {
            statuses.push(entry);
            continue;
        }
        let compiled = convert_route(r).and_then(|mut route| {
            route.parent_refs = attachable.clone();
            RouteTable::build(std::slice::from_ref(&route), &mesh, &gateway, is_served)
                .map(|_| route)
                .map_err(|e| {
                    e.to_string()
                        .strip_prefix("routes[0].")
                        .map(|s| format!("spec.{s}"))
                        .unwrap_or_else(|| e.to_string())
                })
        });
        let conditions = match &compiled {
            Ok(_) => vec![
                condition(
                    "Accepted",
                    true,
                    "Accepted",
                    &format!(
                        "accepted by waypoint {}/{}",
                        who.gateway_namespace, who.gateway_name
                    ),
                    generation,
                ),
                condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "all references resolved",
                    generation,
                ),
            ],
            Err(e) => {
                notes.push(format!("HTTPRoute {rns}/{rname} refused: {e}"));
                let refs_reason = if e.contains("backendRefs") {
                    "BackendNotFound"
                } else {
                    "UnsupportedValue"
                };
                vec![
                    condition("Accepted", false, "UnsupportedValue", e, generation),
                    condition("ResolvedRefs", false, refs_reason, e, generation),
                ]
            }
        };
        for p in &attachable {
            entry.parents.push(HTTPRouteStatusParents {
                controller_name: CONTROLLER_NAME.into(),
                parent_ref: status_parent_ref(p),
                conditions: conditions.clone(),
            });
        }
        if let Ok(route) = compiled {
            accepted.push(route);
        }
        statuses.push(entry);
    }
    let table = match RouteTable::build(&accepted, &mesh, &gateway, is_served) {
        Ok(t) => t,
        Err(e) => {
            // Each compiled alone; together they cannot fail (their keys are unique).
            notes.push(format!("routes refused together: {e}"));
            RouteTable::default()
        }
    };

    // Policies with targetRefs to our Gateway or a served Service (the rest are ztunnel's).
    let mut policies = Vec::new();
    let mut pol: Vec<&AuthorizationPolicy> =
        store.policies.items.values().map(|(_, p)| p).collect();
    pol.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));
    for p in pol {
        let pns = p.metadata.namespace.clone().unwrap_or_default();
        let pname = p.metadata.name.clone().unwrap_or_default();
        if p.spec.selector.is_some() {
            continue;
        }
        let targets: Vec<PolicyTargetRef> = p
            .spec
            .target_refs
            .iter()
            .chain(p.spec.target_ref.iter())
            .filter(|t| {
                let ns = t.namespace.clone().unwrap_or_else(|| pns.clone());
                match (t.kind.as_str(), t.group.as_deref().unwrap_or("")) {
                    ("Gateway", "" | GATEWAY_GROUP) => gateway_ok && (ns, t.name.clone()) == gw_key,
                    ("Service", "") => served_by_name.contains(&(ns, t.name.clone())),
                    _ => false,
                }
            })
            .map(|t| PolicyTargetRef {
                group: t.group.clone(),
                kind: t.kind.clone(),
                name: t.name.clone(),
                namespace: t.namespace.clone(),
            })
            .collect();
        if targets.is_empty() {
            continue;
        }
        let action = match p.spec.action.as_deref() {
            None | Some("ALLOW") => Ok(Action::Allow),
            Some("DENY") => Ok(Action::Deny),
            Some(a) => Err(format!(
                "spec.action: {a} is not implemented by the waypoint"
            )),
        };
        let rules = match &p.spec.rules {
            Checked::Ok(r) => Ok(r.clone()),
            Checked::Invalid(e) => Err(format!("spec.rules{e}")),
        };
        let local = |action, rules| config::AuthorizationPolicy {
            name: pname.clone(),
            namespace: pns.clone(),
            target_refs: targets.clone(),
            action,
            rules,
        };
        let field = format!("AuthorizationPolicy {pns}/{pname}");
        let compiled = action
            .and_then(|a| rules.map(|r| local(a, r)))
            .and_then(|lp| {
                Policy::compile(&lp, (&who.gateway_namespace, &who.gateway_name), "spec")
                    .map_err(|e| e.to_string())
            });
        match compiled {
            Ok(c) => policies.push(c),
            Err(e) => {
                // Fail closed: a policy the waypoint cannot read denies its targets' requests.
                notes.push(format!(
                    "{field} refused ({e}): every request to its targets is denied until it is fixed"
                ));
                let deny = local(Action::Deny, vec![PolicyRule::default()]);
                match Policy::compile(&deny, (&who.gateway_namespace, &who.gateway_name), "spec") {
                    Ok(c) => policies.push(c),
                    Err(e) => notes.push(format!("{field}: {e}")),
                }
            }
        }
    }
    Ok(Built {
        state: WaypointState {
            me,
            mesh,
            served,
            routes: table,
            policies,
        },
        statuses,
        parents: parents_seen,
        notes,
    })
}

/// Our entries in a route's current status, and everyone else's.
fn split_status(r: &HTTPRoute) -> (Vec<HTTPRouteStatusParents>, Vec<HTTPRouteStatusParents>) {
    r.status
        .iter()
        .flat_map(|s| s.parents.iter().cloned())
        .partition(|p| p.controller_name == CONTROLLER_NAME)
}

/// Equal but for the conditions' transition times.
fn same_status(a: &[HTTPRouteStatusParents], b: &[HTTPRouteStatusParents]) -> bool {
    let strip = |v: &[HTTPRouteStatusParents]| {
        let mut v = v.to_vec();
        for p in &mut v {
            for c in &mut p.conditions {
                c.last_transition_time = Time(k8s_openapi::chrono::DateTime::UNIX_EPOCH);
            }
        }
        v
    };
    strip(a) == strip(b)
}

/// The status subresource as it should be for `desired` (our entries for the parents this
/// waypoint manages), or `None` when it already is. Others' entries (other controllers, other
/// waypoints' parents) are kept; a condition that did not change keeps its transition time.
pub fn status_patch(
    current: &HTTPRoute,
    desired: &RouteStatus,
    managed: &BTreeSet<String>,
) -> Option<HTTPRouteStatus> {
    let rns = current.metadata.namespace.clone().unwrap_or_default();
    let (ours, others) = split_status(current);
    let label = |p: &HTTPRouteStatusParentsParentRef| {
        let ns = p.namespace.as_deref().unwrap_or(&rns);
        format!("{} {ns}/{}", p.kind.as_deref().unwrap_or("Gateway"), p.name)
    };
    // Our entries for parents another waypoint manages stay as they are.
    let (mine, foreign): (Vec<_>, Vec<_>) = ours
        .into_iter()
        .partition(|p| managed.contains(&label(&p.parent_ref)));
    let mut want = desired.parents.clone();
    for p in &mut want {
        let old = mine.iter().find(|o| o.parent_ref == p.parent_ref);
        for c in &mut p.conditions {
            if let Some(oc) = old.and_then(|o| {
                o.conditions
                    .iter()
                    .find(|oc| oc.type_ == c.type_ && oc.status == c.status)
            }) {
                c.last_transition_time = oc.last_transition_time.clone();
            }
        }
    }
    if same_status(&mine, &want) {
        return None;
    }
    let mut parents = others;
    parents.extend(foreign);
    parents.extend(want);
    Some(HTTPRouteStatus { parents })
}

// --- running -------------------------------------------------------------------------------------

/// The mesh as ztunnel's discovery delivers it.
#[derive(Clone, Default)]
struct MeshSink {
    inner: Arc<Mutex<MeshInputs>>,
    changed: Arc<Notify>,
}

#[derive(Default)]
struct MeshInputs {
    discovered: Option<(Vec<LocalWorkload>, Vec<LocalService>)>,
    status: serde_json::Value,
}

impl Sink for MeshSink {
    fn set_discovered(
        &self,
        workloads: Vec<LocalWorkload>,
        services: Vec<LocalService>,
    ) -> Result<(), ztunnel::config::ConfigError> {
        lock(&self.inner).discovered = Some((workloads, services));
        self.changed.notify_one();
        Ok(())
    }

    fn set_discovery_status(&self, status: serde_json::Value) {
        lock(&self.inner).status = status;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What [`start`] returns: every new state (`None` until the first complete one), and the
/// discovery status for `/config_dump`.
pub struct KubeHandle {
    pub states: watch::Receiver<Option<Arc<WaypointState>>>,
    pub status: Arc<Mutex<serde_json::Value>>,
}

/// Starts the watchers (ztunnel's discovery and the waypoint's own) and the publisher on the
/// current runtime, until `stop`.
pub fn start(
    client: Client,
    params: Params,
    who: Who,
    trust_domain: String,
    stop: CancellationToken,
) -> KubeHandle {
    let mesh = MeshSink::default();
    let changed = mesh.changed.clone();
    let mesh_synced = ztunnel::discovery::start(client.clone(), params, mesh.clone(), stop.clone());
    let store = Arc::new(Mutex::new(KubeStore::default()));
    tokio::spawn(run_with(
        Api::<HTTPRoute>::all(client.clone()),
        watcher::Config::default(),
        store.clone(),
        changed.clone(),
        stop.clone(),
    ));
    tokio::spawn(run_with(
        Api::<AuthorizationPolicy>::all(client.clone()),
        watcher::Config::default(),
        store.clone(),
        changed.clone(),
        stop.clone(),
    ));
    tokio::spawn(run_with(
        Api::<Gateway>::namespaced(client.clone(), &who.gateway_namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", who.gateway_name)),
        store.clone(),
        changed.clone(),
        stop.clone(),
    ));
    let (tx, states) = watch::channel(None);
    let status = Arc::new(Mutex::new(json!({"synced": false})));
    tokio::spawn(publish(Publisher {
        client,
        who,
        trust_domain,
        mesh,
        mesh_synced,
        store,
        changed,
        tx,
        status: status.clone(),
        stop,
    }));
    KubeHandle { states, status }
}

struct Publisher {
    client: Client,
    who: Who,
    trust_domain: String,
    mesh: MeshSink,
    mesh_synced: watch::Receiver<bool>,
    store: Arc<Mutex<KubeStore>>,
    changed: Arc<Notify>,
    tx: watch::Sender<Option<Arc<WaypointState>>>,
    status: Arc<Mutex<serde_json::Value>>,
    stop: CancellationToken,
}

async fn publish(p: Publisher) {
    let mut managed: BTreeSet<String> = BTreeSet::new();
    let mut notes: Vec<String> = Vec::new();
    let mut last_error: Option<String> = None;
    let mut writes: u64 = 0;
    let mut write_error: Option<String> = None;
    // Statuses that could not be written: retried on the next round.
    let mut retry = false;
    loop {
        tokio::select! {
            _ = p.stop.cancelled() => return,
            _ = p.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)), if retry => {}
        }
        tokio::select! {
            _ = p.stop.cancelled() => return,
            _ = tokio::time::sleep(SETTLE) => {}
        }
        let mesh_synced = *p.mesh_synced.borrow();
        let discovered = lock(&p.mesh.inner).discovered.clone();
        let mut pending: Vec<(RouteStatus, HTTPRouteStatus)> = Vec::new();
        {
            let st = lock(&p.store);
            if let (true, true, Some((w, s))) = (mesh_synced, st.synced(), &discovered) {
                match combine(&p.who, &p.trust_domain, w, s, &st) {
                    Ok(built) => {
                        last_error = None;
                        managed.extend(built.parents.iter().cloned());
                        for rs in &built.statuses {
                            let key = (rs.namespace.clone(), rs.name.clone());
                            if let Some(cur) = st.routes.get(&key) {
                                if let Some(patch) = status_patch(cur, rs, &managed) {
                                    pending.push((rs.clone(), patch));
                                }
                            }
                        }
                        managed = built.parents;
                        if notes != built.notes {
                            for n in built.notes.iter().filter(|n| !notes.contains(n)) {
                                tracing::info!(note = %n, "waypoint discovery");
                            }
                            notes = built.notes;
                        }
                        let first = p.tx.borrow().is_none();
                        p.tx.send_replace(Some(Arc::new(built.state)));
                        if first {
                            tracing::info!("waypoint synced with the API server");
                        }
                    }
                    Err(e) => {
                        if last_error.as_ref() != Some(&e) {
                            tracing::warn!(error = %e, "waypoint state not built");
                        }
                        last_error = Some(e);
                    }
                }
            }
        }
        retry = false;
        for (rs, status) in pending {
            let api: Api<HTTPRoute> = Api::namespaced(p.client.clone(), &rs.namespace);
            let patch = json!({ "status": status });
            match api
                .patch_status(
                    &rs.name,
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    writes += 1;
                    tracing::info!(route = %format!("{}/{}", rs.namespace, rs.name), "route status written");
                }
                Err(e) => {
                    tracing::warn!(route = %format!("{}/{}", rs.namespace, rs.name), error = %e, "route status not written; retrying");
                    write_error = Some(format!(
                        "{}: {}/{}: {e}",
                        ztunnel::identity::rfc3339(SystemTime::now()),
                        rs.namespace,
                        rs.name
                    ));
                    retry = true;
                }
            }
        }
        let st = lock(&p.store);
        *lock(&p.status) = json!({
            "synced": p.tx.borrow().is_some(),
            "who": p.who,
            "mesh": lock(&p.mesh.inner).status.clone(),
            "resources": {
                "httproutes": st.routes.status(),
                "authorizationpolicies": st.policies.status(),
                "gateways": st.gateways.status(),
            },
            "lastError": last_error,
            "notes": notes,
            "statusWrites": {"count": writes, "lastError": write_error},
        });
    }
}

/// How many of `routes`' parents are `Accepted=True` from us (tests, the dump).
pub fn accepted_parents(r: &HTTPRoute) -> HashMap<String, bool> {
    let rns = r.metadata.namespace.clone().unwrap_or_default();
    split_status(r)
        .0
        .iter()
        .map(|p| {
            let ns = p.parent_ref.namespace.as_deref().unwrap_or(&rns);
            (
                format!("{}/{}", ns, p.parent_ref.name),
                p.conditions
                    .iter()
                    .any(|c| c.type_ == "Accepted" && c.status == "True"),
            )
        })
        .collect()
}
