//! The node: desired state (ztunnel endpoint + enrolled pods) → diff → apply, in place.
//! Pod enroll/remove touch only that pod's set element, route and sysctl; a full reconcile
//! (start, ztunnel change, periodic resync) converges everything without flushing.
//!
//! Membership comes from a [`Membership`]: the standalone config, or (Kubernetes mode) the
//! watch cache. Pods arrive through CNI ADD ([`Node::handle`]) or, in Kubernetes mode, from
//! the watcher (`crate::kube::Dataplane`); both end in the same [`Node::enroll_attachment`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use ambient_net::consts::{self, rule, table};
use ambient_net::firewall::{self, FirewallDriver, FirewallKind, FirewallMode};
use ambient_net::model::{
    self, DualAddr, PodRoute, PodSource, TunnelChoice, TunnelMode, ZtunnelEndpoint,
};
use ambient_net::nft::{NodeNft, NodeRules, PodElement};
use ambient_net::nl::{self, Netlink};
use ambient_net::proto::{Attachment, PodInfo, Reply, Request};
use ambient_net::sysctl::Sysctl;
use anyhow::{anyhow, Context};
use netlink_packet_route::link::LinkAttribute;
use tracing::{info, warn};

use crate::kube::netns::{NetnsIndex, NetnsScan};
use crate::membership::{Membership, Verdict};
use crate::store::{self, AgentState, PodRecord, Store, ZtunnelRecord};

/// Node-wide sysctls whose previous values cleanup restores.
const RESTORABLE: [&str; 4] = [
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.rp_filter",
    "net.ipv4.conf.all.send_redirects",
    "net.ipv6.conf.all.forwarding",
];

/// Container ids of attachments the Kubernetes watcher enrolled itself (pods that started
/// before the agent, or whose CNI ADD the agent did not see): `k8s-watch:<pod uid>`. The
/// watcher owns them; CNI GC leaves them alone.
pub const WATCH_ATTACHMENT_PREFIX: &str = "k8s-watch:";

pub struct Node {
    pub membership: Membership,
    pub store: Store,
    pub state: AgentState,
    /// Kubernetes mode: where the netns of a pod is looked for when CNI did not name it.
    pub netns_scan: NetnsScan,
    pub(crate) netns_index: NetnsIndex,
    pub(crate) nl: Netlink,
    /// The firewall backend ([`AgentState::firewall`]); nothing else knows which it is.
    pub(crate) fw: &'static dyn FirewallDriver,
    port: u16,
    /// Kubernetes mode: the last CNI ADD of each pod, by (namespace, name), whatever its
    /// verdict, so the watcher can enroll the pod later (a namespace relabelled, a namespace
    /// the cache had not seen) with the runtime's own container id and netns.
    pub(crate) cni_seen: BTreeMap<(String, String), PodInfo>,
    /// When attachments were enrolled through CNI: the watcher leaves a pod it cannot see yet
    /// alone for a grace period (its watch event may lag behind the CNI ADD).
    pub(crate) cni_added: HashMap<String, Instant>,
    /// The saved state was missing or damaged: [`Node::rebuild_state`] must run before the
    /// first reconcile.
    pub rebuild_pending: bool,
}

impl Node {
    /// Loads the saved state and settles the tunnel kind and port (kept from the saved state
    /// so a restart never changes them under live traffic).
    pub async fn open(
        membership: Membership,
        store: Store,
        mode: TunnelMode,
        port: u16,
        firewall: FirewallMode,
    ) -> anyhow::Result<Self> {
        let nl = Netlink::current()?;
        let loaded = crate::recover::load(&store)?;
        let rebuild_pending = loaded.needs_rebuild();
        let mut state = loaded.state;
        let fw = settle_firewall(&mut state, firewall)?;
        let kind_ok = |c: &TunnelChoice| match mode {
            TunnelMode::Auto => true,
            TunnelMode::Geneve => c.kind == model::TunnelKind::Geneve,
            TunnelMode::Vxlan => c.kind == model::TunnelKind::Vxlan,
        };
        if !state.tunnel.as_ref().is_some_and(kind_ok) {
            let kind = nl.resolve_tunnel_kind(mode).await?;
            let ours = existing_tunnel_port(&nl).await?;
            let port = nl::free_udp_port(port, ours)?;
            if port != consts::TUNNEL_PORT {
                warn!(
                    port,
                    "UDP {} is taken on this node; the tunnels use {port}",
                    consts::TUNNEL_PORT
                );
            }
            info!(?kind, port, "tunnel encapsulation chosen");
            state.tunnel = Some(TunnelChoice { kind, port });
        }
        let node = Self {
            membership,
            store,
            state,
            netns_scan: NetnsScan::default(),
            netns_index: NetnsIndex::default(),
            nl,
            fw,
            port,
            cni_seen: BTreeMap::new(),
            cni_added: HashMap::new(),
            rebuild_pending,
        };
        // A lost state is saved once rebuilt ([`Node::rebuild_state`]): saved empty now, a
        // crash before the rebuild would leave a state that looks intact and forgets pods.
        if !node.rebuild_pending {
            node.store.save(&node.state)?;
        }
        Ok(node)
    }

    fn choice(&self) -> TunnelChoice {
        self.state.tunnel.unwrap_or(TunnelChoice {
            kind: model::TunnelKind::Vxlan,
            port: self.port,
        })
    }

    /// The families the ztunnel has an address of: a pod address of another family cannot
    /// be captured (and gets no table-100 route).
    fn capture_families(&self) -> DualAddr {
        self.state
            .ztunnel
            .as_ref()
            .map(|z| z.endpoint.ips())
            .unwrap_or_default()
    }

    fn routable(&self, r: &PodRoute) -> bool {
        self.capture_families().get(r.ip.is_ipv6()).is_some()
    }

    fn nft_desired(&self) -> NodeNft {
        nft_desired(&self.state, self.choice())
    }

    /// Converges every link, rule, route, sysctl and nft object the node agent owns.
    pub async fn reconcile(&mut self) -> anyhow::Result<bool> {
        self.forget_gone_pods().await?;
        // State saved by an agent that did not record the bridge's MAC: read it now, so the
        // same-bridge capture rules are rendered (the bridge plugin pins the bridge's MAC).
        if let Some(z) = self.state.ztunnel.as_mut() {
            let e = &mut z.endpoint;
            if let (Some(b), None) = (&e.bridge, &e.bridge_mac) {
                match self.nl.link_mac(b).await {
                    Ok(m) => e.bridge_mac = Some(m),
                    Err(err) => warn!(bridge = %b, "cannot read the bridge's MAC: {err}"),
                }
            }
        }
        let devs = pod_host_devs(&self.state);
        let zt = self.state.ztunnel.as_ref().map(|z| z.endpoint.clone());
        let ra_devs = match zt.as_ref().and_then(|z| z.ips().v6) {
            Some(_) => router_advertised_devs(&self.nl).await?,
            None => BTreeSet::new(),
        };
        let mut desired = net_desired(&self.state, self.choice(), &ra_devs);
        self.remember_sysctls(&desired.sysctls);
        // The pods' rp_filter=0 is checked against one link dump ([`relax_pod_rp_filters`]),
        // not read through /proc/sys a device at a time, which took most of a reconcile with
        // 1000 pods.
        let pod_rp_filter: BTreeSet<String> = devs
            .iter()
            .map(|d| Sysctl::conf(d, "rp_filter", "0").key)
            .collect();
        desired
            .sysctls
            .retain(|s| !(pod_rp_filter.contains(&s.key) && s.value == "0"));
        self.store.save(&self.state)?;
        if zt.is_none() {
            // Without a ztunnel nothing may be captured: the tunnels go too.
            nl::remove_all(
                &self.nl,
                &[consts::ISTIOIN.name, consts::ISTIOOUT.name],
                &[],
                &[],
            )
            .await?;
        }
        // The tunnels first, with their ARP timing set before any route sends traffic into
        // them (see [`TUNNEL_ARP_RETRANS_MS`]); `apply` then finds them current.
        let mut new_tunnels = 0;
        for t in &desired.tunnels {
            if self.nl.ensure_tunnel(t).await? {
                new_tunnels += 1;
            }
        }
        if !desired.tunnels.is_empty() {
            fast_tunnel_neighbours(desired.tunnels.iter().any(|t| t.v6))?;
        }
        let mut changes = self.nl.apply(&desired, &rule::ALL, &table::ALL).await?;
        changes.tunnels += new_tunnels;
        changes.sysctls += relax_pod_rp_filters(&self.nl, &devs).await?;
        let nft_changed = self.fw.reconcile_node(&self.nft_desired())?;
        let changed = !changes.is_empty() || nft_changed;
        if changed {
            info!(?changes, nft_changed, "reconciled node state");
        }
        Ok(changed)
    }

    /// Forgets the pods whose host veth is gone from the node: their network was torn down
    /// without the agent hearing of it, as when their CNI DEL was answered while the agent was
    /// down (ambient-cni lets DEL succeed so teardown is never blocked) and the primary plugin
    /// then deleted the veth. Their set elements and table-100 routes used to stay until a CNI
    /// GC; the reconcile this runs in removes them.
    async fn forget_gone_pods(&mut self) -> anyhow::Result<()> {
        if self.state.pods.is_empty() {
            return Ok(());
        }
        let links: BTreeSet<String> = self.nl.link_names().await?.into_values().collect();
        for key in gone_pods(&self.state, &links) {
            let Some(veth) = self.state.pods.get(&key).map(|r| r.host_veth.clone()) else {
                continue;
            };
            // A dump that raced with links coming and going can miss one: each absence is
            // confirmed by name before a live pod's capture could be dropped.
            if self.nl.link_by_name(&veth).await?.is_some() {
                continue;
            }
            let Some(rec) = self.state.pods.remove(&key) else {
                continue;
            };
            self.cni_added.remove(&key);
            self.cni_seen
                .retain(|_, p| p.container_id != rec.container_id);
            warn!(pod = %format!("{}/{}", rec.namespace, rec.name), container = %rec.container_id,
                  veth = %rec.host_veth, ips = ?rec.ips,
                  "the pod's veth is gone but no CNI DEL reached the agent (answered while it was down?): forgetting the pod");
        }
        Ok(())
    }

    /// Records the pre-change values of node-wide sysctls the first time they are changed.
    fn remember_sysctls(&mut self, want: &[Sysctl]) {
        for s in want.iter().filter(|s| RESTORABLE.contains(&s.key.as_str())) {
            if self.state.saved_sysctls.contains_key(&s.key) {
                continue;
            }
            if let Ok(Some(v)) = ambient_net::sysctl::read(&s.key) {
                if v != s.value {
                    self.state.saved_sysctls.insert(s.key.clone(), v);
                }
            }
        }
    }

    pub async fn handle(&mut self, req: Request) -> Reply {
        let r = match req {
            Request::Add { pod } => self.add(pod).await,
            Request::Del {
                container_id,
                if_name,
            } => self.del(&container_id, &if_name).await,
            Request::Check {
                container_id,
                if_name,
            } => self.check(&container_id, &if_name),
            Request::Status => Ok(Reply::ok(false, "ready")),
            Request::Gc { valid } => self.gc(&valid).await,
        };
        r.unwrap_or_else(|e| Reply::error(format!("{e:#}"), true))
    }

    async fn add(&mut self, pod: PodInfo) -> anyhow::Result<Reply> {
        let verdict = self.membership.verdict(&pod);
        // A refused ADD (namespace unknown) is torn down by the runtime: not remembered.
        if self.membership.is_kube() && verdict != Verdict::NamespaceUnknown {
            self.cni_seen
                .insert((pod.namespace.clone(), pod.name.clone()), pod.clone());
        }
        match verdict {
            Verdict::Ztunnel => {
                self.set_ztunnel_pod(pod).await?;
                Ok(Reply::ok(false, verdict.reason()))
            }
            Verdict::Enroll => {
                let key = store::key(&pod.container_id, &pod.if_name);
                let reply = self.enroll_attachment(pod).await?;
                self.cni_added.insert(key, Instant::now());
                Ok(reply)
            }
            Verdict::NamespaceUnknown => {
                // Fail closed: a pod of an ambient namespace must not start uncaptured
                // because the watch lags. The runtime retries the sandbox.
                let synced = self.membership.synced();
                warn!(pod = %format!("{}/{}", pod.namespace, pod.name), cache_synced = synced, "{}", verdict.reason());
                Ok(Reply::error(
                    format!(
                        "{}/{}: {}{}",
                        pod.namespace,
                        pod.name,
                        verdict.reason(),
                        if synced {
                            ""
                        } else {
                            " (the agent has not finished listing namespaces and pods)"
                        }
                    ),
                    true,
                ))
            }
            _ => {
                info!(pod = %format!("{}/{}", pod.namespace, pod.name), reason = verdict.reason(), "not enrolled");
                Ok(Reply::ok(false, verdict.reason()))
            }
        }
    }

    /// Makes `pod` the node's ztunnel endpoint and converges.
    pub(crate) async fn set_ztunnel_pod(&mut self, pod: PodInfo) -> anyhow::Result<()> {
        let endpoint = self.ztunnel_endpoint(&pod).await?;
        let rec = ZtunnelRecord {
            container_id: pod.container_id,
            if_name: pod.if_name,
            namespace: pod.namespace,
            name: pod.name,
            endpoint,
        };
        if self.state.ztunnel.as_ref() != Some(&rec) {
            info!(pod = %format!("{}/{}", rec.namespace, rec.name), ip = %rec.endpoint.ip, veth = %rec.endpoint.host_veth, "ztunnel endpoint");
        }
        self.state.ztunnel = Some(rec);
        self.reconcile().await?;
        Ok(())
    }

    /// No ztunnel: capture stops (tunnels, rules and routes go; pods stay recorded).
    pub(crate) async fn clear_ztunnel(&mut self) -> anyhow::Result<()> {
        if self.state.ztunnel.take().is_some() {
            info!("ztunnel pod removed: capture stops until a ztunnel is back");
            self.reconcile().await?;
        }
        Ok(())
    }

    /// Enrolls one pod attachment: the one code path for CNI ADD and the Kubernetes watcher.
    pub(crate) async fn enroll_attachment(&mut self, pod: PodInfo) -> anyhow::Result<Reply> {
        let key = store::key(&pod.container_id, &pod.if_name);
        if let Some(old) = self.state.pods.get(&key) {
            if self.nl.link_by_name(&old.host_veth).await?.is_some() {
                return Ok(Reply::ok(true, "already enrolled"));
            }
            // The attachment ADDed again after a DEL the agent missed (answered while it was
            // down), before the record was forgotten: the old record names a veth that is
            // gone; answering "already enrolled" would leave the new one uncaptured.
            warn!(pod = %format!("{}/{}", old.namespace, old.name), veth = %old.host_veth,
                  "ADD of an attachment whose recorded veth is gone: enrolling it afresh");
            self.remove_attachment(&key).await?;
        }
        // The same pod already enrolled under another attachment id (the watcher found it
        // before its CNI ADD reached us): the new record replaces it once in place.
        let same_pod: Vec<String> = self
            .state
            .pods
            .iter()
            .filter(|(_, r)| {
                r.namespace == pod.namespace
                    && r.name == pod.name
                    && (r.uid.is_empty() || pod.uid.is_empty() || r.uid == pod.uid)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let rec = self.pod_record(pod).await?;
        // Record first: if the kernel change fails half-way, the next reconcile rolls forward.
        self.state.pods.insert(key.clone(), rec.clone());
        self.store.save_pod(&self.state, &key)?;
        if let Err(e) = self.enroll_in_kernel(&rec).await {
            self.state.pods.remove(&key);
            self.store.save_pod(&self.state, &key)?;
            self.unenroll_in_kernel(&key, &rec).await.ok();
            return Err(e);
        }
        for old in same_pod {
            self.remove_attachment(&old).await?;
        }
        let captured = self.state.ztunnel.is_some();
        info!(pod = %format!("{}/{}", rec.namespace, rec.name), ips = ?rec.ips, veth = %rec.host_veth, captured, "enrolled");
        Ok(Reply::ok(
            true,
            if captured {
                "enrolled"
            } else {
                "enrolled; capture starts when the ztunnel is ready"
            },
        ))
    }

    /// The record of a pod attachment: its host side read from its netns.
    pub(crate) async fn pod_record(&self, pod: PodInfo) -> anyhow::Result<PodRecord> {
        let side = self.pod_host_side(&pod).await?;
        Ok(PodRecord {
            container_id: pod.container_id,
            if_name: pod.if_name,
            namespace: pod.namespace,
            name: pod.name,
            uid: pod.uid,
            netns: pod.netns,
            ips: pod.ips,
            host_veth: side.veth,
            host_bridge: side.bridge,
            gateway: side
                .gateways
                .primary()
                .ok_or_else(|| anyhow!("pod {} has no gateway toward the node", side.pod_name))?,
            gateway6: side.gateways.v4.and(side.gateways.v6),
        })
    }

    async fn enroll_in_kernel(&mut self, p: &PodRecord) -> anyhow::Result<()> {
        for dev in std::iter::once(&p.host_veth).chain(p.host_bridge.as_ref()) {
            relax_rp_filter(dev)?;
        }
        if self.nft_gateways_change(p) {
            // A new gateway address changes the output chain: converge everything.
            self.reconcile().await?;
            return Ok(());
        }
        self.fw
            .add_pod_elements(&firewall::pod_elements(&pod_sources(p)))?;
        if self.state.ztunnel.is_some() {
            for r in p.pod_routes().filter(|r| self.routable(r)) {
                let (k, v) = model::pod_inbound_route(&r);
                self.nl.put_route(&k, &v).await?;
            }
        }
        Ok(())
    }

    /// Whether `p` has a gateway address no other record (nor the ztunnel) has: its enroll
    /// adds an exemption to the output chain, its removal takes one away.
    fn nft_gateways_change(&self, p: &PodRecord) -> bool {
        if self.state.ztunnel.is_none() {
            return false;
        }
        let known: BTreeSet<IpAddr> = self
            .state
            .pods
            .values()
            .filter(|o| o.container_id != p.container_id)
            .flat_map(|o| dual_list(o.gateways()))
            .chain(
                self.state
                    .ztunnel
                    .iter()
                    .flat_map(|z| dual_list(z.endpoint.node_ips())),
            )
            .collect();
        dual_list(p.gateways()).iter().any(|g| !known.contains(g))
    }

    /// Removes a pod's set elements and routes, except those another record still holds
    /// (an address reused by a new pod before the old one's removal was seen).
    async fn unenroll_in_kernel(&self, key: &str, p: &PodRecord) -> anyhow::Result<()> {
        // One scan for the records sharing an address with this one, no set of every pod's
        // elements built for each DEL.
        let sharing: Vec<&PodRecord> = self
            .state
            .pods
            .iter()
            .filter(|(k, r)| k.as_str() != key && r.ips.iter().any(|ip| p.ips.contains(ip)))
            .map(|(_, r)| r)
            .collect();
        let held: BTreeSet<PodElement> = sharing
            .iter()
            .flat_map(|r| firewall::pod_elements(&pod_sources(r)))
            .collect();
        let gone: Vec<PodElement> = firewall::pod_elements(&pod_sources(p))
            .into_iter()
            .filter(|e| !held.contains(e))
            .collect();
        self.fw.delete_pod_elements(&gone)?;
        let gone: Vec<PodRoute> = p
            .pod_routes()
            .filter(|r| !sharing.iter().any(|o| o.ips.contains(&r.ip)))
            .collect();
        for r in gone {
            self.nl.del_route(&model::pod_inbound_route(&r).0).await?;
        }
        Ok(())
    }

    async fn del(&mut self, container_id: &str, if_name: &str) -> anyhow::Result<Reply> {
        let key = store::key(container_id, if_name);
        self.cni_seen.retain(|_, p| p.container_id != container_id);
        self.cni_added.remove(&key);
        if self
            .state
            .ztunnel
            .as_ref()
            .is_some_and(|z| z.container_id == container_id && z.if_name == if_name)
        {
            self.clear_ztunnel().await?;
            return Ok(Reply::ok(false, "ztunnel removed"));
        }
        if self.remove_attachment(&key).await? {
            Ok(Reply::ok(false, "removed"))
        } else {
            Ok(Reply::ok(false, "not enrolled"))
        }
    }

    /// Un-enrolls one attachment; false when it was not enrolled.
    pub(crate) async fn remove_attachment(&mut self, key: &str) -> anyhow::Result<bool> {
        let Some(rec) = self.state.pods.get(key).cloned() else {
            return Ok(false);
        };
        self.unenroll_in_kernel(key, &rec).await?;
        self.state.pods.remove(key);
        self.cni_added.remove(key);
        self.store.save_pod(&self.state, key)?;
        if self.nft_gateways_change(&rec) {
            // The last pod behind a gateway address: its exemption in the output chain goes
            // now, not at the next resync.
            self.fw.reconcile_node(&self.nft_desired())?;
        }
        info!(pod = %format!("{}/{}", rec.namespace, rec.name), "removed");
        Ok(true)
    }

    fn check(&self, container_id: &str, if_name: &str) -> anyhow::Result<Reply> {
        let key = store::key(container_id, if_name);
        let Some(rec) = self.state.pods.get(&key) else {
            return Ok(Reply::ok(false, "not enrolled"));
        };
        let missing = self
            .fw
            .missing_pod_elements(&firewall::pod_elements(&pod_sources(rec)))?;
        if let Some(e) = missing.first() {
            return Ok(Reply::error(format!("{e} is missing"), false));
        }
        Ok(Reply::ok(true, "enrolled"))
    }

    async fn gc(&mut self, valid: &[Attachment]) -> anyhow::Result<Reply> {
        let keep: BTreeSet<String> = valid
            .iter()
            .map(|a| store::key(&a.container_id, &a.if_name))
            .collect();
        let stale: Vec<(String, String)> = self
            .state
            .pods
            .values()
            .map(|p| (p.container_id.clone(), p.if_name.clone()))
            .chain(
                self.state
                    .ztunnel
                    .iter()
                    .map(|z| (z.container_id.clone(), z.if_name.clone())),
            )
            .filter(|(c, i)| !keep.contains(&store::key(c, i)))
            // The Kubernetes watcher's own attachments are not the runtime's to collect.
            .filter(|(c, _)| !c.starts_with(WATCH_ATTACHMENT_PREFIX))
            .collect();
        for (c, i) in &stale {
            self.del(c, i).await?;
        }
        Ok(Reply::ok(
            false,
            format!("removed {} stale attachments", stale.len()),
        ))
    }

    /// The pod's node-side device: the peer of its interface, found from inside its netns
    /// (bridge-type primaries have no per-pod host route to find it by).
    pub(crate) async fn pod_host_side(&self, pod: &PodInfo) -> anyhow::Result<HostSide> {
        let inner = Netlink::in_netns(Path::new(&pod.netns))
            .with_context(|| format!("open pod netns {}", pod.netns))?;
        // One link query per side (each one costs the kernel a walk over the netns ids of a
        // node with many pods): the pod's interface gives its peer and MAC, the peer its
        // name, MTU and bridge.
        let pod_link = inner
            .link_by_name(&pod.if_name)
            .await?
            .ok_or_else(|| anyhow!("no {} in {}", pod.if_name, pod.netns))?;
        let peer = pod_link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Link(i) => Some(*i),
                _ => None,
            })
            .ok_or_else(|| {
                anyhow!(
                    "{} in {} has no peer link (not a veth?)",
                    pod.if_name,
                    pod.netns
                )
            })?;
        let pod_mac = pod_link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(b) if b.len() == 6 => Some(
                    b.iter()
                        .map(|o| format!("{o:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                ),
                _ => None,
            })
            .ok_or_else(|| anyhow!("{} has no MAC address", pod.if_name))?;
        let host =
            self.nl.link_by_index(peer).await?.ok_or_else(|| {
                anyhow!("the peer of {} (#{peer}) is not in this netns", pod.if_name)
            })?;
        let (mut name, mut mtu, mut controller) = (None, 1500, None);
        for a in &host.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Mtu(m) => mtu = *m,
                LinkAttribute::Controller(c) => controller = Some(*c),
                _ => {}
            }
        }
        let name = name.ok_or_else(|| anyhow!("link #{peer} has no name"))?;
        let bridge = match controller {
            Some(c) => self.nl.link_name_mtu(c).await?.map(|(n, _)| n),
            None => None,
        };
        let bridge_mac = match &bridge {
            Some(b) => Some(self.nl.link_mac(b).await?),
            None => None,
        };
        // The gateways the CNI result names, else the pod's default routes'; only for the
        // families the pod has an address of. A link-local IPv6 gateway cannot be the `src`
        // of a node route: such a pod's IPv6 is not captured (and a warning says so).
        let families = DualAddr::first_of(pod.ips.iter().copied());
        let mut gateways = DualAddr::first_of(pod.gateways.iter().copied());
        if families.v4.is_some() && gateways.v4.is_none() {
            gateways.v4 = inner.default_gateway().await?.map(|(g, _)| g);
        }
        if families.v6.is_some() && gateways.v6.is_none() {
            gateways.v6 = inner.default_gateway6().await?.map(|(g, _)| g);
        }
        if gateways.v6.is_some_and(|g| nl::is_link_local6(&g)) {
            warn!(pod = %pod.name, gateway = ?gateways.v6, "the pod's IPv6 gateway is link-local: its IPv6 traffic is not captured");
            gateways.v6 = None;
        }
        if families.v4.is_none() {
            gateways.v4 = None;
        }
        if families.v6.is_none() {
            gateways.v6 = None;
        }
        if gateways.primary().is_none() {
            return Err(anyhow!("pod {} has no gateway toward the node", pod.name));
        }
        Ok(HostSide {
            bridge,
            bridge_mac,
            mtu,
            pod_mac,
            veth: name,
            gateways,
            pod_name: pod.name.clone(),
        })
    }

    pub(crate) async fn ztunnel_endpoint(&self, pod: &PodInfo) -> anyhow::Result<ZtunnelEndpoint> {
        let ips = DualAddr::first_of(pod.ips.iter().copied());
        let ip = ips
            .primary()
            .ok_or_else(|| anyhow!("the ztunnel pod has no IP address"))?;
        let side = self.pod_host_side(pod).await?;
        let node_ip = side
            .gateways
            .get(ip.is_ipv6())
            .ok_or_else(|| anyhow!("no gateway toward the ztunnel pod for {ip}"))?;
        // Dual-stack: the IPv6 path needs both ends' IPv6 addresses.
        let (ip6, node_ip6) = match (ip, ips.v6, side.gateways.v6) {
            (IpAddr::V4(_), Some(a), Some(g)) => (Some(a), Some(g)),
            _ => (None, None),
        };
        Ok(ZtunnelEndpoint {
            ip,
            ip6,
            netns: pod.netns.clone(),
            host_veth: side.veth,
            bridge: side.bridge,
            mac: side.pod_mac,
            bridge_mac: side.bridge_mac,
            veth_mtu: side.mtu,
            node_ip,
            node_ip6,
        })
    }

    /// Removes everything the agent ever created and restores node-wide sysctls.
    pub async fn cleanup(&mut self) -> anyhow::Result<()> {
        cleanup_kernel(&self.nl).await?;
        for (k, v) in std::mem::take(&mut self.state.saved_sysctls) {
            if let Err(e) = ambient_net::sysctl::ensure(&Sysctl::new(&k, &v)) {
                warn!(key = %k, "could not restore sysctl: {e}");
            }
        }
        self.store.remove()?;
        info!("removed every link, rule, route and nft table of the agent");
        Ok(())
    }
}

/// Where a pod attaches to the node.
pub(crate) struct HostSide {
    veth: String,
    /// The bridge the veth is a port of, if any.
    bridge: Option<String>,
    /// That bridge's own MAC.
    bridge_mac: Option<String>,
    mtu: u32,
    /// The pod interface's own MAC.
    pod_mac: String,
    /// The node's gateway addresses toward the pod, of the families the pod has.
    gateways: DualAddr,
    pod_name: String,
}

/// The node's desired links, rules, routes and sysctls for `state` (pure: the agent
/// reconciles to it, `explain`/`doctor` compare the kernel with it). `ra_devs`: see
/// [`model::node_desired`].
pub fn net_desired(
    state: &AgentState,
    choice: TunnelChoice,
    ra_devs: &BTreeSet<String>,
) -> model::NetDesired {
    let routes: BTreeSet<PodRoute> = state.pods.values().flat_map(|p| p.pod_routes()).collect();
    let zt = state.ztunnel.as_ref().map(|z| &z.endpoint);
    model::node_desired(zt, choice, &routes, &pod_host_devs(state), ra_devs)
}

/// The node's desired nft tables for `state` (pure).
pub fn nft_desired(state: &AgentState, choice: TunnelChoice) -> NodeNft {
    let mut gateways: Vec<IpAddr> = state
        .pods
        .values()
        .flat_map(|p| dual_list(p.gateways()))
        .collect();
    if let Some(z) = &state.ztunnel {
        gateways.extend(dual_list(z.endpoint.node_ips()));
    }
    gateways.sort();
    gateways.dedup();
    let zt = state.ztunnel.as_ref().map(|z| &z.endpoint);
    NodeNft {
        rules: zt.map(|z| NodeRules {
            ztunnel_veth: z.host_veth.clone(),
            ztunnel_bridge: z.bridge.clone(),
            ztunnel_mac: z.mac.clone(),
            bridge_mac: z.bridge_mac.clone(),
            ztunnel_ip: z.ip,
            ztunnel_ip6: z.ip6,
            node_gateways: gateways,
            tunnel_port: choice.port,
        }),
        pods: state.pods.values().flat_map(pod_sources).collect(),
    }
}

/// The ztunnel netns' desired state as ztunnel-init makes it for `z` (pure).
pub fn ztunnel_net_desired(
    z: &ZtunnelEndpoint,
    choice: TunnelChoice,
    pod_iface: &str,
) -> model::NetDesired {
    model::ztunnel_desired(choice, z.node_ips(), pod_iface, z.veth_mtu)
}

/// The node devices of every enrolled pod (veths, bridges).
pub fn pod_host_devs(state: &AgentState) -> BTreeSet<String> {
    state
        .pods
        .values()
        .flat_map(|p| std::iter::once(p.host_veth.clone()).chain(p.host_bridge.clone()))
        .collect()
}

/// Keys of the pod records whose host veth is not among the node's `links`.
fn gone_pods(state: &AgentState, links: &BTreeSet<String>) -> Vec<String> {
    state
        .pods
        .iter()
        .filter(|(_, p)| !links.contains(&p.host_veth))
        .map(|(k, _)| k.clone())
        .collect()
}

/// The addresses of a [`DualAddr`], IPv4 first.
fn dual_list(d: DualAddr) -> Vec<IpAddr> {
    d.v4.map(IpAddr::V4)
        .into_iter()
        .chain(d.v6.map(IpAddr::V6))
        .collect()
}

/// The device of the node's IPv6 default route when it takes router advertisements
/// (accept_ra 1, or the 2 we set): with IPv6 forwarding on it must say 2 to keep doing so.
async fn router_advertised_devs(nl: &Netlink) -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    if let Some((_, oif)) = nl.default_gateway6().await? {
        if let Some((name, _)) = nl.link_name_mtu(oif).await? {
            let key = Sysctl::conf6(&name, "accept_ra", "").key;
            if let Ok(Some(v)) = ambient_net::sysctl::read(&key) {
                if v == "1" || v == "2" {
                    out.insert(name);
                }
            }
        }
    }
    Ok(out)
}

/// Removes the agent's kernel objects, whether or not any state is known.
pub async fn cleanup_kernel(nl: &Netlink) -> anyhow::Result<()> {
    nl::remove_all(
        nl,
        &[consts::ISTIOIN.name, consts::ISTIOOUT.name],
        &rule::ALL,
        &table::ALL,
    )
    .await?;
    // Both backends: state may be gone, or name the other one after a --firewall change.
    for k in FirewallKind::ALL {
        match k.driver().cleanup_node() {
            Err(e) if e.is_missing() => {}
            r => r?,
        }
    }
    Ok(())
}

/// The firewall backend: the one recorded in `state` when `mode` accepts it, else `mode`
/// resolved now (and recorded). Switching backends removes the old one's node rules first,
/// so the two never both program the node.
fn settle_firewall(
    state: &mut AgentState,
    mode: FirewallMode,
) -> anyhow::Result<&'static dyn FirewallDriver> {
    let k = match state.firewall.filter(|k| mode.accepts(*k)) {
        Some(k) => k,
        None => switch_firewall(state, mode.resolve())?,
    };
    if k == FirewallKind::Iptables && firewall::kube_proxy_uses_nftables() {
        warn!("kube-proxy runs in nftables mode: the iptables backend cannot keep captured Service traffic's ClusterIP (run with --firewall nftables)");
    }
    Ok(k.driver())
}

/// Records `k` as the backend, removing the old one's node rules first.
fn switch_firewall(state: &mut AgentState, k: FirewallKind) -> anyhow::Result<FirewallKind> {
    if let Some(old) = state.firewall.replace(k) {
        warn!(from = %old, to = %k, "firewall backend changed: removing the old one's rules");
        old.driver().cleanup_node()?;
    }
    info!(firewall = %k, "firewall backend chosen");
    Ok(k)
}

async fn existing_tunnel_port(nl: &Netlink) -> anyhow::Result<Option<u16>> {
    Ok(nl
        .observe_tunnel(consts::ISTIOIN.name)
        .await?
        .and_then(|t| t.port))
}

/// Each address of a pod record with the devices its packets may come from (anti-spoofing).
pub fn pod_sources(p: &PodRecord) -> Vec<PodSource> {
    p.ips
        .iter()
        .map(|ip| PodSource {
            ip: *ip,
            veth: p.host_veth.clone(),
            bridge: p.host_bridge.clone(),
        })
        .collect()
}

/// `net.ipv4.conf.<dev>.rp_filter = 0`, written relative to a kept-open
/// `/proc/sys/net/ipv4/conf` of this thread's netns. Both obvious ways cost more with every
/// pod on the node: a full /proc/sys path is looked up from the top, and its `net` step walks a
/// hash chain holding one entry per network namespace; rtnetlink (IFLA_INET_CONF) sends a
/// change notification that walks the whole IPv6 routing table. A device that is gone is
/// skipped, as [`nl::apply_sysctls`] does.
fn relax_rp_filter(dev: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Mutex;
    static CONF: Mutex<Option<((u64, u64), std::fs::File)>> = Mutex::new(None);
    if dev.is_empty() || dev.contains('/') || dev == "." || dev == ".." {
        return Err(anyhow!("bad device name {dev:?}"));
    }
    let ns = std::fs::metadata("/proc/thread-self/ns/net")?;
    let ns = (ns.dev(), ns.ino());
    let mut conf = CONF.lock().unwrap_or_else(|p| p.into_inner());
    if conf.as_ref().is_none_or(|(id, _)| *id != ns) {
        *conf = Some((ns, std::fs::File::open("/proc/sys/net/ipv4/conf")?));
    }
    let (_, dir) = conf.as_ref().expect("just set");
    let path = format!("{dev}/rp_filter");
    let fd = match nix::fcntl::openat(
        dir,
        path.as_str(),
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(anyhow!("open net.ipv4.conf.{dev}.rp_filter: {e}")),
    };
    std::fs::File::from(fd)
        .write_all(b"0")
        .with_context(|| format!("net.ipv4.conf.{dev}.rp_filter=0"))?;
    Ok(())
}

/// rp_filter=0 on each of `devs` that exists and has another value, from one link dump;
/// returns how many were changed.
async fn relax_pod_rp_filters(nl: &Netlink, devs: &BTreeSet<String>) -> anyhow::Result<usize> {
    use futures::TryStreamExt;
    use netlink_packet_route::link::{AfSpecInet, AfSpecUnspec};
    if devs.is_empty() {
        return Ok(0);
    }
    let mut links = nl.handle().link().get().execute();
    let mut strict = Vec::new();
    while let Some(m) = links
        .try_next()
        .await
        .map_err(|e| anyhow!("dump links: {e}"))?
    {
        let mut name = None;
        let mut rp_filter = None;
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n),
                LinkAttribute::AfSpecUnspec(specs) => {
                    for spec in specs {
                        if let AfSpecUnspec::Inet(inet) = spec {
                            for i in inet {
                                if let AfSpecInet::DevConf(c) = i {
                                    rp_filter = Some(c.rp_filter);
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if let (Some(n), Some(v)) = (name, rp_filter) {
            if v != 0 && devs.contains(n) {
                strict.push(n.clone());
            }
        }
    }
    for dev in &strict {
        relax_rp_filter(dev)?;
    }
    Ok(strict.len())
}

/// ARP retransmit time on the node's tunnel devices (default 1 s). When the ztunnel pod
/// changes, the tunnels are re-pointed (or re-created) and their neighbours forgotten; the
/// first packets ask for the ztunnel side's MAC before `ztunnel-init` has made
/// `pistioin`/`pistioout` in the new pod: with the default, new connections waited up to a
/// second after the new ztunnel was ready.
const TUNNEL_ARP_RETRANS_MS: &str = "20";

fn fast_tunnel_neighbours(v6: bool) -> anyhow::Result<()> {
    let families: &[&str] = if v6 { &["ipv4", "ipv6"] } else { &["ipv4"] };
    let want: Vec<Sysctl> = [consts::ISTIOIN.name, consts::ISTIOOUT.name]
        .iter()
        .flat_map(|dev| {
            families.iter().map(move |f| {
                Sysctl::new(
                    format!("net.{f}.neigh.{dev}.retrans_time_ms"),
                    TUNNEL_ARP_RETRANS_MS,
                )
            })
        })
        .collect();
    nl::apply_sysctls(&want)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_whose_veth_is_gone_are_found() {
        let rec = |n: u8, veth: &str| PodRecord {
            host_veth: veth.into(),
            host_bridge: Some("cni0".into()),
            ..PodRecord::sample(n)
        };
        let mut state = AgentState::default();
        for (n, veth) in [(1, "veth1"), (2, "veth2"), (3, "veth3")] {
            state
                .pods
                .insert(store::key(&format!("c{n}"), "eth0"), rec(n, veth));
        }
        let links: BTreeSet<String> = ["lo", "eth0", "cni0", "veth1", "veth3"]
            .map(String::from)
            .into();
        assert_eq!(gone_pods(&state, &links), vec!["c2/eth0".to_string()]);
        // The bridge alone does not keep a record: its port is the pod's.
        let only_bridge: BTreeSet<String> = ["cni0".to_string()].into();
        assert_eq!(gone_pods(&state, &only_bridge).len(), 3);
        assert!(gone_pods(&AgentState::default(), &links).is_empty());
    }

    #[test]
    fn the_recorded_firewall_is_kept_across_restarts() {
        // First start with --firewall iptables: recorded.
        let mut state = AgentState::default();
        let fw = settle_firewall(&mut state, "iptables".parse().unwrap()).unwrap();
        assert_eq!(fw.kind(), FirewallKind::Iptables);
        assert_eq!(state.firewall, Some(FirewallKind::Iptables));
        // Restart with the default (auto): the recorded backend stays, whatever auto finds.
        let fw = settle_firewall(&mut state, FirewallMode::Auto).unwrap();
        assert_eq!(fw.kind(), FirewallKind::Iptables);
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains("\"firewall\":\"iptables\""), "{json}");
        // State written before the field existed loads as "not chosen yet".
        let old: AgentState = serde_json::from_str("{\"tunnel\":null,\"ztunnel\":null}").unwrap();
        assert_eq!(old.firewall, None);
    }
}
