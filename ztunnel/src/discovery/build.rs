//! From the store's facts to the state's inputs: the same [`LocalWorkload`]s and
//! [`LocalService`]s the config file declares, so [`crate::state::State::build`] indexes and
//! validates both alike and the proxy never knows where they came from.
//!
//! The rules:
//!
//! * **Workloads** are the pods with a node and an IP that have not finished. uid
//!   `<namespace>/<name>`, identity from `spec.serviceAccountName`. **HBONE** when the pod is
//!   in the ambient mesh as the node agent decides it: namespace label
//!   `istio.io/dataplane-mode=ambient`, not an excluded namespace, not hostNetwork, not opted
//!   out (`ambient.istio.io/redirection: disabled`), no sidecar (namespace `istio-injection=
//!   enabled` or `istio.io/rev`, pod `istio.io/rev`, an `istio-proxy` container, the
//!   injector's status annotation). Everything else is **TCP**.
//! * **One workload per IP.** hostNetwork pods share their node's IP, and a finished or
//!   terminating pod's IP can already be a new pod's: the IP goes to the pod not on the host
//!   network, then the one not terminating, then the first by namespace/name; a pod left with
//!   no IP is dropped. Each such decision is a note in the dump.
//! * **Services**: ClusterIP services with TCP ports (ExternalName and UDP-only ones are
//!   left alone), hostname `<name>.<namespace>.svc.<cluster domain>`, VIPs from
//!   `spec.clusterIPs` (none when headless). Ports map service port → target port; a named
//!   target port is resolved per endpoint from the EndpointSlices' ports.
//! * **Endpoints**: the *ready* addresses of the service's EndpointSlices (label
//!   `kubernetes.io/service-name`), each mapped to its workload through `targetRef` (a pod
//!   holding that address) or else by IP. A service with a ready address that is no known
//!   workload (a selector-less service such as `default/kubernetes`, or a pod not seen yet) is
//!   left out entirely: its VIP stays unknown to ztunnel, so connections to it pass through to
//!   kube-proxy instead of being balanced over part of its endpoints.
//! * **Waypoints**: `istio.io/use-waypoint: <name>` (and `istio.io/use-waypoint-namespace`) on a
//!   Service or a pod, else on its namespace, names the waypoint's Service `<namespace>/<name>`
//!   (the Service of the waypoint's Gateway); its ClusterIP becomes `waypoint.address`, so
//!   ztunnel sends the traffic to a ready waypoint pod. `none` on the Service or pod opts out of
//!   the namespace's. The waypoint's own pods and Service (label
//!   `gateway.networking.k8s.io/gateway-name`) never use one. A waypoint that is no built
//!   service with a VIP binds nothing (a note says so): traffic goes as without it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::config::{HealthStatus, LocalService, LocalWorkload, Protocol, WaypointRef};

use super::facts::{Key, NsFacts, PodFacts, Store, TargetPort, UseWaypoint};

/// The settings the rules above read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub cluster_domain: String,
    pub excluded_namespaces: BTreeSet<String>,
}

/// The result of one build.
#[derive(Debug, Default)]
pub struct Discovered {
    pub workloads: Vec<LocalWorkload>,
    pub services: Vec<LocalService>,
    /// What was left out or decided, and why (shown in the dump).
    pub notes: Vec<String>,
}

/// Is this pod in the ambient mesh (the node agent captures it)?
pub fn in_mesh(ns: &str, pod: &PodFacts, ns_facts: Option<&NsFacts>, params: &Params) -> bool {
    ns_facts.is_some_and(|n| n.ambient && !n.sidecar_injection)
        && !params.excluded_namespaces.contains(ns)
        && !pod.host_network
        && !pod.opted_out
        && !pod.sidecar
}

/// Which of two pods claiming one IP keeps it: the smaller rank.
fn rank<'a>(key: &'a Key, pod: &PodFacts) -> (bool, bool, &'a Key) {
    (pod.host_network, pod.terminating, key)
}

pub fn build(store: &Store, params: &Params) -> Discovered {
    let mut out = Discovered::default();

    // Workloads, one per IP.
    let candidates: Vec<(&Key, &PodFacts, &String)> = store
        .pods
        .items
        .iter()
        .filter_map(|(k, (_, p))| {
            let node = p.node.as_ref()?;
            (!p.finished && !p.ips.is_empty()).then_some((k, p, node))
        })
        .collect();
    let mut owner: HashMap<IpAddr, (&Key, &PodFacts)> = HashMap::new();
    for &(k, p, _) in &candidates {
        for ip in &p.ips {
            match owner.get(ip) {
                Some(&(ok, op)) if rank(ok, op) <= rank(k, p) => {}
                _ => {
                    owner.insert(*ip, (k, p));
                }
            }
        }
    }
    // Workload index in `out.workloads` by pod key.
    let mut by_pod: HashMap<&Key, usize> = HashMap::new();
    for &(k, p, node) in &candidates {
        let (kept, lost): (Vec<IpAddr>, Vec<IpAddr>) =
            p.ips.iter().copied().partition(|ip| owner[ip].0 == k);
        for ip in &lost {
            let (ok, _) = owner[ip];
            out.notes.push(format!(
                "pod {}/{}: {ip} is also the address of pod {}/{} (kept there)",
                k.0, k.1, ok.0, ok.1
            ));
        }
        if kept.is_empty() {
            continue;
        }
        let protocol = if in_mesh(
            &k.0,
            p,
            store.namespaces.get(&(String::new(), k.0.clone())),
            params,
        ) {
            Protocol::Hbone
        } else {
            Protocol::Tcp
        };
        by_pod.insert(k, out.workloads.len());
        out.workloads.push(LocalWorkload {
            uid: Some(format!("{}/{}", k.0, k.1)),
            name: k.1.clone(),
            namespace: k.0.clone(),
            service_account: p.service_account.clone(),
            workload_ips: kept,
            protocol,
            node: node.clone(),
            waypoint: None,
            services: BTreeMap::new(),
            authorization_policies: Vec::new(),
            capacity: 1,
            status: HealthStatus::Healthy,
        });
    }
    let by_ip: HashMap<IpAddr, usize> = owner
        .iter()
        .filter_map(|(ip, (k, _))| Some((*ip, *by_pod.get(k)?)))
        .collect();

    // EndpointSlices by their service.
    let mut slices: HashMap<Key, Vec<&super::facts::SliceFacts>> = HashMap::new();
    for ((ns, _), (_, s)) in &store.slices.items {
        if let Some(svc) = &s.service {
            slices.entry((ns.clone(), svc.clone())).or_default().push(s);
        }
    }

    let mut vips_taken: HashMap<IpAddr, String> = HashMap::new();
    'services: for (key, (_, svc)) in &store.services.items {
        let (ns, name) = key;
        if svc.external_name || svc.ports.is_empty() {
            continue;
        }
        let hostname = format!("{name}.{ns}.svc.{}", params.cluster_domain);
        let svc_key = format!("{ns}/{hostname}");
        let svc_slices = slices.get(key).map(Vec::as_slice).unwrap_or(&[]);
        // Endpoint workload → (service port → target port).
        let mut members: BTreeMap<usize, BTreeMap<u16, u16>> = BTreeMap::new();
        for slice in svc_slices {
            let targets: BTreeMap<u16, u16> = svc
                .ports
                .iter()
                .filter_map(|p| {
                    let target = match &p.target {
                        TargetPort::Number(n) if slice.ports.is_empty() => *n,
                        _ => *slice.ports.get(&p.name)?,
                    };
                    Some((p.port, target))
                })
                .collect();
            for ep in slice.endpoints.iter().filter(|e| e.ready) {
                for ip in &ep.addresses {
                    let by_ref = ep
                        .pod
                        .as_ref()
                        .and_then(|pk| by_pod.get(pk))
                        .filter(|i| out.workloads[**i].workload_ips.contains(ip));
                    let Some(&w) = by_ref.or_else(|| by_ip.get(ip)) else {
                        out.notes.push(format!(
                            "service {ns}/{name}: ready endpoint {ip} is no known pod; left to kube-proxy"
                        ));
                        continue 'services;
                    };
                    members.entry(w).or_default().extend(targets.iter());
                }
            }
        }
        let mut vips = Vec::new();
        for vip in &svc.vips {
            if let Some(&w) = by_ip.get(vip) {
                out.notes.push(format!(
                    "service {ns}/{name}: VIP {vip} is also the address of pod {}; VIP left out",
                    out.workloads[w].uid.as_deref().unwrap_or_default()
                ));
            } else if let Some(other) = vips_taken.get(vip) {
                out.notes.push(format!(
                    "service {ns}/{name}: VIP {vip} is also a VIP of service {other}; VIP left out"
                ));
            } else {
                vips_taken.insert(*vip, format!("{ns}/{name}"));
                vips.push(vip.to_string());
            }
        }
        let ports = svc
            .ports
            .iter()
            .map(|p| {
                let target = match &p.target {
                    TargetPort::Number(n) => *n,
                    // The endpoints carry the real number; this is only a fallback.
                    // (slices name their ports after the service's ports).
                    TargetPort::Named(_) => svc_slices
                        .iter()
                        .find_map(|s| s.ports.get(&p.name).copied())
                        .unwrap_or(p.port),
                };
                (p.port, target)
            })
            .collect();
        for (w, targets) in members {
            out.workloads[w]
                .services
                .entry(svc_key.clone())
                .or_default()
                .extend(targets);
        }
        out.services.push(LocalService {
            name: name.clone(),
            namespace: ns.clone(),
            hostname,
            vips,
            ports,
            subject_alt_names: Vec::new(),
            waypoint: None,
            app_protocols: Default::default(),
        });
    }
    bind_waypoints(store, &by_pod, &mut out);
    out
}

/// The waypoint a pod or service uses: its own label, else its namespace's; `none` at the
/// more specific level opts out. A waypoint's own pods and Service use none.
fn binding<'a>(
    own: Option<&'a UseWaypoint>,
    ns: Option<&'a NsFacts>,
) -> Option<(&'a str, &'a str)> {
    match own.or(ns.and_then(|n| n.use_waypoint.as_ref()))? {
        UseWaypoint::OptOut => None,
        UseWaypoint::Gateway { namespace, name } => Some((namespace, name)),
    }
}

/// Sets `waypoint` on the bound services and workloads: `istio.io/use-waypoint: <name>` (+
/// `istio.io/use-waypoint-namespace`) names the waypoint's Service `<namespace>/<name>` (the
/// Service of its Gateway), whose ClusterIP becomes the address; ztunnel picks a healthy
/// endpoint of it per connection. A waypoint that resolves to no built service with a VIP, or
/// that would be its own waypoint, binds nothing: a note says so.
fn bind_waypoints(store: &Store, by_pod: &HashMap<&Key, usize>, out: &mut Discovered) {
    let ns_facts = |ns: &str| store.namespaces.get(&(String::new(), ns.to_string()));
    let hbone = ambient_net::consts::port::INBOUND_HBONE;
    // The waypoint services: (namespace, name) → (index, VIP).
    let by_name: HashMap<(String, String), (usize, IpAddr)> = out
        .services
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let vip = s.vips.first()?.parse().ok()?;
            Some(((s.namespace.clone(), s.name.clone()), (i, vip)))
        })
        .collect();
    let lookup = |ns: &str, name: &str| by_name.get(&(ns.to_string(), name.to_string())).copied();
    let mut unresolved: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut bound_services: Vec<(usize, WaypointRef)> = Vec::new();
    for (i, svc) in out.services.iter().enumerate() {
        let key = (svc.namespace.clone(), svc.name.clone());
        let Some(facts) = store.services.get(&key) else {
            continue;
        };
        if facts.waypoint {
            continue;
        }
        let Some((wns, wname)) = binding(facts.use_waypoint.as_ref(), ns_facts(&svc.namespace))
        else {
            continue;
        };
        match lookup(wns, wname) {
            Some((wi, vip)) if wi != i => bound_services.push((
                i,
                WaypointRef {
                    address: vip,
                    hbone_mtls_port: hbone,
                },
            )),
            _ => unresolved
                .entry(format!("{wns}/{wname}"))
                .or_default()
                .push(format!("service {}/{}", svc.namespace, svc.name)),
        }
    }
    for (i, wp) in bound_services {
        out.services[i].waypoint = Some(wp);
    }
    let mut pods: Vec<(&Key, usize)> = by_pod.iter().map(|(k, i)| (*k, *i)).collect();
    pods.sort();
    for (k, w) in pods {
        let Some(facts) = store.pods.get(k) else {
            continue;
        };
        if facts.waypoint {
            continue;
        }
        let Some((wns, wname)) = binding(facts.use_waypoint.as_ref(), ns_facts(&k.0)) else {
            continue;
        };
        let Some((wi, vip)) = lookup(wns, wname) else {
            unresolved
                .entry(format!("{wns}/{wname}"))
                .or_default()
                .push(format!("pod {}/{}", k.0, k.1));
            continue;
        };
        // A pod that is itself an endpoint of that waypoint service is no client of it.
        let wkey = format!(
            "{}/{}",
            out.services[wi].namespace, out.services[wi].hostname
        );
        if out.workloads[w].services.contains_key(&wkey) {
            out.notes.push(format!(
                "pod {}/{}: an endpoint of its own waypoint {wns}/{wname}; no waypoint",
                k.0, k.1
            ));
            continue;
        }
        out.workloads[w].waypoint = Some(WaypointRef {
            address: vip,
            hbone_mtls_port: hbone,
        });
    }
    for (wp, users) in unresolved {
        let more = users.len().saturating_sub(3);
        let mut list = users[..users.len().min(3)].join(", ");
        if more > 0 {
            list.push_str(&format!(" and {more} more"));
        }
        out.notes.push(format!(
            "waypoint {wp} (istio.io/use-waypoint of {list}) is no Service with a ClusterIP and ready waypoint pods; those use no waypoint"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::facts::{EndpointFacts, ServiceFacts, ServicePortFacts, SliceFacts, Table};
    use super::*;

    fn params() -> Params {
        Params {
            cluster_domain: "cluster.local".into(),
            excluded_namespaces: ["kube-system".to_string()].into(),
        }
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.to_string(), name.to_string())
    }

    fn put<F>(t: &mut Table<F>, ns: &str, name: &str, f: F) {
        t.items
            .insert(key(ns, name), (format!("uid-{ns}-{name}"), f));
        t.listed = true;
    }

    fn pod(node: &str, ip: &str) -> PodFacts {
        PodFacts {
            service_account: "default".into(),
            node: Some(node.into()),
            host_network: false,
            ips: vec![ip.parse().unwrap()],
            opted_out: false,
            sidecar: false,
            finished: false,
            terminating: false,
            use_waypoint: None,
            waypoint: false,
        }
    }

    fn ns(ambient: bool) -> NsFacts {
        NsFacts {
            ambient,
            sidecar_injection: false,
            use_waypoint: None,
        }
    }

    fn svc(vip: &str, ports: &[(&str, u16, TargetPort)]) -> ServiceFacts {
        ServiceFacts {
            vips: vec![vip.parse().unwrap()],
            ports: ports
                .iter()
                .map(|(n, p, t)| ServicePortFacts {
                    name: n.to_string(),
                    port: *p,
                    target: t.clone(),
                })
                .collect(),
            external_name: false,
            use_waypoint: None,
            waypoint: false,
        }
    }

    fn slice(
        service: &str,
        ports: &[(&str, u16)],
        eps: &[(&str, bool, Option<&str>)],
    ) -> SliceFacts {
        SliceFacts {
            service: Some(service.into()),
            ports: ports.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
            endpoints: eps
                .iter()
                .map(|(ip, ready, pod)| EndpointFacts {
                    addresses: vec![ip.parse().unwrap()],
                    ready: *ready,
                    pod: pod.map(|p| key("demo", p)),
                })
                .collect(),
        }
    }

    fn workload<'a>(d: &'a Discovered, uid: &str) -> &'a LocalWorkload {
        d.workloads
            .iter()
            .find(|w| w.uid.as_deref() == Some(uid))
            .unwrap_or_else(|| panic!("no workload {uid} in {:?}", d.workloads))
    }

    /// demo (ambient): sleep (a), echo-0 (b), echo-1 (b, opted out), legacy (other ns).
    fn store() -> Store {
        let mut s = Store::default();
        put(&mut s.namespaces, "", "demo", ns(true));
        put(&mut s.namespaces, "", "legacy", ns(false));
        put(&mut s.namespaces, "", "kube-system", ns(true));
        let mut sleep = pod("node-a", "10.0.0.1");
        sleep.service_account = "sleep".into();
        put(&mut s.pods, "demo", "sleep", sleep);
        put(&mut s.pods, "demo", "echo-0", pod("node-b", "10.0.1.1"));
        let mut out = pod("node-b", "10.0.1.2");
        out.opted_out = true;
        put(&mut s.pods, "demo", "echo-1", out);
        put(&mut s.pods, "legacy", "old", pod("node-a", "10.0.0.9"));
        put(
            &mut s.pods,
            "kube-system",
            "dns",
            pod("node-a", "10.0.0.53"),
        );
        put(
            &mut s.services,
            "demo",
            "echo",
            svc(
                "10.96.0.10",
                &[("http", 80, TargetPort::Named("web".into()))],
            ),
        );
        put(
            &mut s.slices,
            "demo",
            "echo-abcde",
            slice(
                "echo",
                // Named after the service port, with the number `web` resolved to.
                &[("http", 8080)],
                &[
                    ("10.0.1.1", true, Some("echo-0")),
                    ("10.0.1.2", true, None),
                    ("10.0.1.3", false, None),
                ],
            ),
        );
        s
    }

    #[test]
    fn pods_become_workloads_with_their_mesh_protocol() {
        let d = build(&store(), &params());
        assert!(d.notes.is_empty(), "{:?}", d.notes);
        let sleep = workload(&d, "demo/sleep");
        assert_eq!(sleep.protocol, Protocol::Hbone);
        assert_eq!(sleep.service_account, "sleep");
        assert_eq!(sleep.node, "node-a");
        assert_eq!(
            sleep.workload_ips,
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(workload(&d, "demo/echo-0").protocol, Protocol::Hbone);
        // Opted out, not-ambient namespace, excluded namespace: TCP.
        assert_eq!(workload(&d, "demo/echo-1").protocol, Protocol::Tcp);
        assert_eq!(workload(&d, "legacy/old").protocol, Protocol::Tcp);
        assert_eq!(workload(&d, "kube-system/dns").protocol, Protocol::Tcp);
    }

    #[test]
    fn services_map_ready_endpoints_with_their_target_ports() {
        let d = build(&store(), &params());
        assert_eq!(d.services.len(), 1);
        let s = &d.services[0];
        assert_eq!(s.hostname, "echo.demo.svc.cluster.local");
        assert_eq!(s.vips, vec!["10.96.0.10"]);
        assert_eq!(s.ports, [(80, 8080)].into());
        let key = "demo/echo.demo.svc.cluster.local";
        // By targetRef and by IP; the not-ready endpoint is no member.
        assert_eq!(
            workload(&d, "demo/echo-0").services[key],
            [(80, 8080)].into()
        );
        assert_eq!(
            workload(&d, "demo/echo-1").services[key],
            [(80, 8080)].into()
        );
        assert!(workload(&d, "demo/sleep").services.is_empty());
        // And the state accepts it all.
        let cfg = crate::config::LocalConfig {
            workloads: d.workloads,
            services: d.services,
            policies: vec![],
        };
        let st = crate::state::State::build(&cfg, "cluster.local", "node-a").unwrap();
        let svc = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        assert_eq!(st.endpoints(svc).len(), 2);
    }

    #[test]
    fn numbered_target_ports_and_port_filters() {
        let mut s = store();
        put(
            &mut s.services,
            "demo",
            "num",
            svc("10.96.0.11", &[("", 90, TargetPort::Number(9090))]),
        );
        // A slice without ports (no selector match yet) still maps numbered targets.
        put(
            &mut s.slices,
            "demo",
            "num-1",
            slice("num", &[], &[("10.0.0.1", true, Some("sleep"))]),
        );
        let d = build(&s, &params());
        let num = d.services.iter().find(|s| s.name == "num").unwrap();
        assert_eq!(num.ports, [(90, 9090)].into());
        assert_eq!(
            workload(&d, "demo/sleep").services["demo/num.demo.svc.cluster.local"],
            [(90, 9090)].into()
        );
        // No TCP port, ExternalName: left alone.
        put(&mut s.services, "demo", "udp", svc("10.96.0.12", &[]));
        let mut ext = svc("10.96.0.13", &[("", 80, TargetPort::Number(80))]);
        ext.external_name = true;
        put(&mut s.services, "demo", "ext", ext);
        let d = build(&s, &params());
        let names: Vec<_> = d.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["echo", "num"]);
    }

    #[test]
    fn an_endpoint_that_is_no_pod_leaves_the_service_to_kube_proxy() {
        let mut s = store();
        put(
            &mut s.services,
            "default",
            "kubernetes",
            svc("10.96.0.1", &[("https", 443, TargetPort::Number(6443))]),
        );
        put(
            &mut s.slices,
            "default",
            "kubernetes",
            slice(
                "kubernetes",
                &[("https", 6443)],
                &[("192.0.2.10", true, None)],
            ),
        );
        let d = build(&s, &params());
        assert!(d.services.iter().all(|s| s.name != "kubernetes"));
        assert!(d.notes[0].contains("default/kubernetes"), "{:?}", d.notes);
        assert!(d.workloads.iter().all(|w| w.services.len() <= 1));
    }

    #[test]
    fn one_workload_per_ip() {
        let mut s = store();
        // Two hostNetwork pods on one node share its IP; a terminating pod's IP is reused.
        let mut h1 = pod("node-a", "192.0.2.1");
        h1.host_network = true;
        put(&mut s.pods, "kube-system", "proxy-a", h1.clone());
        put(&mut s.pods, "istio-system", "agent-a", h1);
        let mut old = pod("node-a", "10.0.0.7");
        old.terminating = true;
        put(&mut s.pods, "demo", "aaa-old", old);
        put(&mut s.pods, "demo", "zzz-new", pod("node-a", "10.0.0.7"));
        // Finished pods and pods without an IP or node are no workloads.
        let mut done = pod("node-a", "10.0.0.8");
        done.finished = true;
        put(&mut s.pods, "demo", "job", done);
        let mut pending = pod("node-a", "10.0.0.8");
        pending.ips.clear();
        put(&mut s.pods, "demo", "pending", pending);
        let d = build(&s, &params());
        assert_eq!(workload(&d, "istio-system/agent-a").protocol, Protocol::Tcp);
        assert!(d
            .workloads
            .iter()
            .all(|w| w.uid.as_deref() != Some("kube-system/proxy-a")));
        workload(&d, "demo/zzz-new");
        for gone in ["demo/aaa-old", "demo/job", "demo/pending"] {
            assert!(
                d.workloads.iter().all(|w| w.uid.as_deref() != Some(gone)),
                "{gone}"
            );
        }
        assert_eq!(d.notes.len(), 2, "{:?}", d.notes);
        let cfg = crate::config::LocalConfig {
            workloads: d.workloads,
            services: d.services,
            policies: vec![],
        };
        crate::state::State::build(&cfg, "cluster.local", "node-a").unwrap();
    }

    #[test]
    fn sidecar_pods_and_namespaces_are_not_in_the_mesh() {
        let mut s = store();
        let mut sc = pod("node-a", "10.0.0.20");
        sc.sidecar = true;
        put(&mut s.pods, "demo", "sidecar", sc);
        put(
            &mut s.namespaces,
            "",
            "injected",
            NsFacts {
                ambient: true,
                sidecar_injection: true,
                use_waypoint: None,
            },
        );
        put(&mut s.pods, "injected", "p", pod("node-a", "10.0.0.21"));
        // A namespace not seen (yet): not in the mesh.
        put(&mut s.pods, "unseen", "p", pod("node-a", "10.0.0.22"));
        let d = build(&s, &params());
        for uid in ["demo/sidecar", "injected/p", "unseen/p"] {
            assert_eq!(workload(&d, uid).protocol, Protocol::Tcp, "{uid}");
        }
    }

    fn uses(ns: &str, name: &str) -> Option<UseWaypoint> {
        Some(UseWaypoint::Gateway {
            namespace: ns.into(),
            name: name.into(),
        })
    }

    /// The store plus a waypoint `demo/waypoint` (pod wp-0 behind Service `waypoint`).
    fn with_waypoint() -> Store {
        let mut s = store();
        let mut wp = pod("node-b", "10.0.1.9");
        wp.service_account = "waypoint".into();
        wp.waypoint = true;
        put(&mut s.pods, "demo", "wp-0", wp);
        let mut svc = svc("10.96.0.99", &[("mesh", 15008, TargetPort::Number(15008))]);
        svc.waypoint = true;
        put(&mut s.services, "demo", "waypoint", svc);
        put(
            &mut s.slices,
            "demo",
            "waypoint-1",
            slice(
                "waypoint",
                &[("mesh", 15008)],
                &[("10.0.1.9", true, Some("wp-0"))],
            ),
        );
        s
    }

    fn waypoint_of(d: &Discovered, uid: &str) -> Option<String> {
        workload(d, uid)
            .waypoint
            .as_ref()
            .map(|w| w.address.to_string())
    }

    fn service_waypoint(d: &Discovered, name: &str) -> Option<String> {
        d.services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
            .waypoint
            .as_ref()
            .map(|w| w.address.to_string())
    }

    fn state_accepts(d: Discovered) -> crate::state::State {
        let cfg = crate::config::LocalConfig {
            workloads: d.workloads,
            services: d.services,
            policies: vec![],
        };
        crate::state::State::build(&cfg, "cluster.local", "node-a").unwrap()
    }

    #[test]
    fn a_namespace_label_binds_its_services_and_pods_to_the_waypoint_service() {
        let mut s = with_waypoint();
        s.namespaces
            .items
            .get_mut(&key("", "demo"))
            .unwrap()
            .1
            .use_waypoint = uses("demo", "waypoint");
        let d = build(&s, &params());
        assert!(d.notes.is_empty(), "{:?}", d.notes);
        assert_eq!(service_waypoint(&d, "echo").as_deref(), Some("10.96.0.99"));
        assert_eq!(
            waypoint_of(&d, "demo/echo-0").as_deref(),
            Some("10.96.0.99")
        );
        assert_eq!(waypoint_of(&d, "demo/sleep").as_deref(), Some("10.96.0.99"));
        // The waypoint itself and its Service: never; other namespaces: not bound.
        assert_eq!(waypoint_of(&d, "demo/wp-0"), None);
        assert_eq!(service_waypoint(&d, "waypoint"), None);
        assert_eq!(waypoint_of(&d, "legacy/old"), None);
        let st = state_accepts(d);
        assert!(st.is_waypoint("10.0.1.9".parse().unwrap()));
        let echo = st.workload_by_ip("10.0.1.1".parse().unwrap()).unwrap();
        assert_eq!(
            st.required_waypoints(echo, 8080)[0].to_string(),
            "spiffe://cluster.local/ns/demo/sa/waypoint"
        );
    }

    #[test]
    fn service_and_pod_labels_override_the_namespace_and_none_opts_out() {
        let mut s = with_waypoint();
        // Another waypoint in another namespace.
        let mut wp = pod("node-a", "10.0.0.99");
        wp.waypoint = true;
        put(&mut s.pods, "infra", "other-0", wp);
        let mut osvc = svc("10.96.1.99", &[("mesh", 15008, TargetPort::Number(15008))]);
        osvc.waypoint = true;
        put(&mut s.services, "infra", "other", osvc);
        put(
            &mut s.slices,
            "infra",
            "other-1",
            slice("other", &[], &[("10.0.0.99", true, None)]),
        );
        s.namespaces
            .items
            .get_mut(&key("", "demo"))
            .unwrap()
            .1
            .use_waypoint = uses("demo", "waypoint");
        // The service names the other waypoint (use-waypoint-namespace), a pod opts out.
        s.services
            .items
            .get_mut(&key("demo", "echo"))
            .unwrap()
            .1
            .use_waypoint = uses("infra", "other");
        s.pods
            .items
            .get_mut(&key("demo", "echo-0"))
            .unwrap()
            .1
            .use_waypoint = Some(UseWaypoint::OptOut);
        // A pod of a namespace without the label binds itself.
        s.pods
            .items
            .get_mut(&key("legacy", "old"))
            .unwrap()
            .1
            .use_waypoint = uses("demo", "waypoint");
        let d = build(&s, &params());
        assert!(d.notes.is_empty(), "{:?}", d.notes);
        assert_eq!(service_waypoint(&d, "echo").as_deref(), Some("10.96.1.99"));
        assert_eq!(waypoint_of(&d, "demo/echo-0"), None);
        assert_eq!(
            waypoint_of(&d, "demo/echo-1").as_deref(),
            Some("10.96.0.99")
        );
        assert_eq!(waypoint_of(&d, "legacy/old").as_deref(), Some("10.96.0.99"));
        // `none` on the service: not even the namespace's.
        s.services
            .items
            .get_mut(&key("demo", "echo"))
            .unwrap()
            .1
            .use_waypoint = Some(UseWaypoint::OptOut);
        let d = build(&s, &params());
        assert_eq!(service_waypoint(&d, "echo"), None);
        state_accepts(d);
    }

    #[test]
    fn an_unresolved_waypoint_binds_nothing_and_says_so() {
        let mut s = store();
        s.namespaces
            .items
            .get_mut(&key("", "demo"))
            .unwrap()
            .1
            .use_waypoint = uses("demo", "missing");
        let d = build(&s, &params());
        assert_eq!(service_waypoint(&d, "echo"), None);
        assert!(d.workloads.iter().all(|w| w.waypoint.is_none()));
        assert_eq!(d.notes.len(), 1, "{:?}", d.notes);
        assert!(
            d.notes[0].starts_with("waypoint demo/missing (istio.io/use-waypoint of service demo/echo, pod demo/echo-0, pod demo/echo-1 and 1 more)"),
            "{:?}",
            d.notes
        );
        // A waypoint Service whose pods are unknown is left out, so unresolved too.
        let mut s = with_waypoint();
        s.pods.items.remove(&key("demo", "wp-0"));
        s.namespaces
            .items
            .get_mut(&key("", "demo"))
            .unwrap()
            .1
            .use_waypoint = uses("demo", "waypoint");
        let d = build(&s, &params());
        assert_eq!(service_waypoint(&d, "echo"), None);
        assert!(
            d.notes
                .iter()
                .any(|n| n.starts_with("waypoint demo/waypoint")),
            "{:?}",
            d.notes
        );
        state_accepts(d);
    }
}
