//! Starting from a damaged state directory: a snapshot that is gone, truncated or garbage, or
//! a journal with bad lines. The agent must still start, say what it found, and rebuild its
//! records from what outlives it — the runtime's libcni cache (which attachments exist, with
//! their pods' names, addresses and netns) and the kernel (each pod's veth and bridge, seen
//! from its netns) — so the first reconcile finds every live pod recorded and changes nothing,
//! instead of flushing the routes and set elements of pods it forgot.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ambient_net::consts::{table, POD_IIF_SET, POD_IIF_SET_V6, POD_PORT_SET, POD_PORT_SET_V6};
use ambient_net::firewall::FirewallKind;
use ambient_net::nft::ObservedTable;
use ambient_net::proto::PodInfo;
use tracing::{error, info, warn};

use crate::install_cni::chain::PLUGIN_TYPE;
use crate::membership::Verdict;
use crate::node::Node;
use crate::store::{self, AgentState, JournalEntry, PodRecord, Store, ZtunnelRecord};

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("move the damaged {path} aside: {source}")]
    MoveAside {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the state directory held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A snapshot that parsed.
    Intact,
    /// No snapshot (a first start, or the directory was deleted).
    Missing,
    /// A snapshot that could not be read or parsed (empty, cut, garbage), now at `moved_to`.
    Corrupt { moved_to: PathBuf, error: String },
}

#[derive(Debug)]
pub struct Loaded {
    pub state: AgentState,
    pub found: Found,
    /// Journal lines that did not parse (a torn last line included) and were skipped.
    pub journal_dropped: usize,
}

impl Loaded {
    /// Whether records may be missing (no snapshot, or a journal line lost, which may have
    /// been a pod's record): the runtime and the kernel have to fill them in.
    pub fn needs_rebuild(&self) -> bool {
        self.found != Found::Intact || self.journal_dropped > 0
    }
}

/// Loads the state directory whatever it holds; only a damaged snapshot that cannot be moved
/// aside is an error (the agent would otherwise overwrite the evidence).
pub fn load(store: &Store) -> Result<Loaded, RecoverError> {
    let path = store.state_path();
    let (mut state, found) = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<AgentState>(&bytes) {
            Ok(s) => (s, Found::Intact),
            Err(e) => corrupt(&path, format!("{} bytes: {e}", bytes.len()))?,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            (AgentState::default(), Found::Missing)
        }
        Err(e) => corrupt(&path, e.to_string())?,
    };
    let journal = match std::fs::read(store.journal_path()) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            error!(path = %store.journal_path().display(), "cannot read the journal: {e}");
            Vec::new()
        }
    };
    let journal_dropped = replay(&mut state, &journal);
    if journal_dropped > 0 {
        warn!(path = %store.journal_path().display(), dropped = journal_dropped,
              "journal lines that did not parse were skipped; the others were replayed");
    }
    match &found {
        Found::Intact => {}
        Found::Missing => info!(
            dir = %path.parent().unwrap_or(Path::new(".")).display(),
            "no saved state: rebuilding from the runtime's CNI cache and the kernel"
        ),
        Found::Corrupt { moved_to, error } => error!(
            file = %path.display(), moved_to = %moved_to.display(), %error,
            "the saved state is damaged: moved aside; rebuilding from the runtime's CNI cache and the kernel"
        ),
    }
    Ok(Loaded {
        state,
        found,
        journal_dropped,
    })
}

/// Moves a damaged snapshot to `state.json.corrupt-<unix seconds>`.
fn corrupt(path: &Path, error: String) -> Result<(AgentState, Found), RecoverError> {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{ts}"));
    let moved_to = PathBuf::from(name);
    std::fs::rename(path, &moved_to).map_err(|source| RecoverError::MoveAside {
        path: path.display().to_string(),
        source,
    })?;
    Ok((AgentState::default(), Found::Corrupt { moved_to, error }))
}

/// Applies every journal line that parses, in order; returns how many did not.
pub(crate) fn replay(state: &mut AgentState, journal: &[u8]) -> usize {
    let mut dropped = 0;
    for line in journal.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<JournalEntry>(line) {
            Ok(JournalEntry::Put { key, pod }) => {
                state.pods.insert(key, *pod);
            }
            Ok(JournalEntry::Del { key }) => {
                state.pods.remove(&key);
            }
            Err(_) => dropped += 1,
        }
    }
    dropped
}

/// One attachment in the runtime's libcni cache (`<cache>/results/<net>-<id>-<ifname>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAttachment {
    pub container_id: String,
    pub if_name: String,
    pub network: String,
    /// Whether the cached network config chains ambient-cni.
    pub chained: bool,
    /// The pod interface's `sandbox` in the cached result (the netns path), if named.
    pub netns: Option<String>,
    pub ips: Vec<IpAddr>,
    pub gateways: Vec<IpAddr>,
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` of its CNI_ARGS.
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

impl CachedAttachment {
    /// `namespace/name`, or the container id when the runtime did not say.
    pub fn label(&self) -> String {
        match (&self.namespace, &self.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            _ => self.container_id.clone(),
        }
    }
}

/// Every attachment in a libcni cache directory; files that are not cache entries are skipped.
pub fn read_cni_cache(dir: &Path) -> std::io::Result<Vec<CachedAttachment>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)?.filter_map(Result::ok) {
        let Ok(bytes) = std::fs::read(e.path()) else {
            continue;
        };
        if let Some(a) = parse_cache_entry(&bytes) {
            out.push(a);
        }
    }
    out.sort_by(|a, b| (&a.container_id, &a.if_name).cmp(&(&b.container_id, &b.if_name)));
    Ok(out)
}

fn parse_cache_entry(bytes: &[u8]) -> Option<CachedAttachment> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let container_id = v["containerId"].as_str()?.to_string();
    let if_name = v["ifName"].as_str()?.to_string();
    let arg = |key: &str| {
        v["cniArgs"].as_array().and_then(|a| {
            a.iter()
                .find(|kv| kv[0].as_str() == Some(key))
                .and_then(|kv| kv[1].as_str())
                .map(str::to_string)
        })
    };
    // libcni stores the network config as bytes (base64 in JSON).
    let chained = v["config"]
        .as_str()
        .and_then(base64_decode)
        .and_then(|c| serde_json::from_slice::<serde_json::Value>(&c).ok())
        .is_some_and(|c| {
            c["plugins"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(std::iter::once(&c))
                .any(|p| p["type"].as_str() == Some(PLUGIN_TYPE))
        });
    let result = &v["result"];
    let interfaces = result["interfaces"].as_array();
    let iface = |i: &serde_json::Value| {
        i.as_u64()
            .and_then(|i| interfaces.and_then(|ifs| ifs.get(i as usize)))
    };
    let mut netns = v["netns"].as_str().map(str::to_string);
    let (mut ips, mut gateways) = (Vec::new(), Vec::new());
    for ip in result["ips"].as_array().into_iter().flatten() {
        if let Some(i) = iface(&ip["interface"]) {
            if i["name"].as_str() != Some(if_name.as_str()) {
                continue;
            }
            if netns.is_none() {
                netns = i["sandbox"].as_str().map(str::to_string);
            }
        }
        let addr = ip["address"].as_str().and_then(|a| a.split('/').next());
        if let Some(a) = addr.and_then(|a| a.parse().ok()) {
            ips.push(a);
        }
        if let Some(g) = ip["gateway"].as_str().and_then(|g| g.parse().ok()) {
            gateways.push(g);
        }
    }
    Some(CachedAttachment {
        container_id,
        if_name,
        network: v["networkName"].as_str().unwrap_or_default().to_string(),
        chained,
        netns: netns.filter(|n| !n.is_empty()),
        ips,
        gateways,
        namespace: arg("K8S_POD_NAMESPACE"),
        name: arg("K8S_POD_NAME"),
        uid: arg("K8S_POD_UID"),
    })
}

/// Standard base64 (with or without padding); `None` on any other byte.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

/// What a rebuild did.
#[derive(Debug, Default)]
pub struct Rebuilt {
    pub pods: usize,
    pub ztunnel: bool,
    /// Of [`Self::pods`], those whose netns was not found: rebuilt from what the kernel holds
    /// for their addresses, so their capture stays exactly as it was.
    pub from_kernel: usize,
    /// `namespace/name: why` of pods that should be enrolled but could not be rebuilt.
    pub failed: Vec<String>,
    /// Attachments left alone: other networks, or pods the membership does not enroll.
    pub skipped: usize,
}

/// An `ipset save` member of a `hash:net,iface` set: `10.0.0.5,veth1` (a `/32` or `/128`
/// suffix allowed).
fn ipset_dev_elem(elem: &str) -> Option<(IpAddr, String)> {
    let (net, dev) = elem.split_once(',')?;
    let ip = net.split('/').next()?.parse().ok()?;
    Some((ip, dev.to_string())).filter(|(_, d)| !d.is_empty())
}

/// The verdict on a cached attachment. Before the Kubernetes watch has synced (every verdict
/// is then "namespace unknown"), the kernel's capture is the evidence: an address with a
/// table-100 route was an enrolled pod, the gateway of table 102 is the ztunnel. The watcher
/// corrects either once it has listed.
fn verdict_with_kernel(
    v: Verdict,
    ips: &[IpAddr],
    routed: &BTreeSet<IpAddr>,
    ztunnel: &BTreeSet<IpAddr>,
) -> Verdict {
    if v != Verdict::NamespaceUnknown {
        v
    } else if ips.iter().any(|ip| ztunnel.contains(ip)) {
        Verdict::Ztunnel
    } else if ips.iter().any(|ip| routed.contains(ip)) {
        Verdict::Enroll
    } else {
        v
    }
}

/// What the node's kernel holds for pod addresses: the pieces of a record that outlive the
/// state directory (set elements name the veth and routed device, table-100 routes the
/// node's gateway address as their `src`).
#[derive(Debug, Default)]
struct KernelPods {
    /// `host veth . address` of the bridge table's port sets.
    veth: BTreeMap<IpAddr, String>,
    /// `routed device . address` of the inet table's iif sets (the bridge of a bridge port).
    routed: BTreeMap<IpAddr, String>,
    /// The `src` of each pod address's table-100 route.
    src: BTreeMap<IpAddr, IpAddr>,
}

impl KernelPods {
    fn add_set(map: &mut BTreeMap<IpAddr, String>, table: Option<&ObservedTable>, sets: [&str; 2]) {
        let Some(t) = table else { return };
        for name in sets {
            for (dev, ip) in t.sets.get(name).iter().flat_map(|s| &s.dev_elems) {
                map.insert(*ip, dev.clone());
            }
        }
    }

    /// The record of `info` from the kernel alone; `None` when the kernel lacks a piece. The
    /// iptables backend has no bridge port sets: the routed device stands for the veth (the
    /// same elements, so nothing changes).
    fn record(&self, info: &PodInfo) -> Option<PodRecord> {
        let first = info.ips.first()?;
        let veth = self.veth.get(first).or(self.routed.get(first))?.clone();
        let routed = self.routed.get(first).unwrap_or(&veth);
        let host_bridge = (*routed != veth).then(|| routed.clone());
        // The route's `src`, else the cached result's gateway, of each family the pod has.
        let gw = |v6: bool| {
            let own = info.ips.iter().filter(|ip| ip.is_ipv6() == v6);
            own.clone()
                .find_map(|ip| self.src.get(ip).copied())
                .or_else(|| {
                    own.clone()
                        .next()
                        .and(info.gateways.iter().find(|g| g.is_ipv6() == v6).copied())
                })
        };
        let (g4, g6) = (gw(false), gw(true));
        Some(PodRecord {
            container_id: info.container_id.clone(),
            if_name: info.if_name.clone(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            uid: info.uid.clone(),
            netns: info.netns.clone(),
            ips: info.ips.clone(),
            host_veth: veth,
            host_bridge,
            gateway: g4.or(g6)?,
            gateway6: match (g4, g6) {
                (Some(_), Some(IpAddr::V6(v6))) => Some(v6),
                _ => None,
            },
        })
    }
}

impl Node {
    /// Fills in the records a lost state forgot, from the runtime's CNI cache and the kernel;
    /// changes nothing in the kernel (the reconcile after it converges). Records already
    /// present (a journal that survived) are kept.
    pub async fn rebuild_state(&mut self, cni_cache_dir: &Path) -> Rebuilt {
        let started = std::time::Instant::now();
        self.rebuild_pending = false;
        let mut done = Rebuilt::default();
        let cached = match read_cni_cache(cni_cache_dir) {
            Ok(c) => c,
            Err(e) => {
                error!(dir = %cni_cache_dir.display(), "no runtime view to rebuild from (--cni-cache-dir): {e}; pods are enrolled again by their next CNI ADD/CHECK or the watcher");
                return done;
            }
        };
        // Pod addresses the kernel captures now (table 100): in Kubernetes mode, before the
        // watch has synced, this is the evidence that a pod was enrolled.
        let mut kernel = KernelPods::default();
        let mut ztunnel_ips = BTreeSet::new();
        match self
            .nl
            .observe_routes(&[table::INBOUND, table::RETURN])
            .await
        {
            Ok(r) => {
                for (k, v) in r {
                    match (k.table, v.src, v.gateway) {
                        (table::INBOUND, Some(src), _) => {
                            kernel.src.insert(k.dst, src);
                        }
                        // Table 102's default route is via the ztunnel pod.
                        (table::RETURN, _, Some(gw)) => {
                            ztunnel_ips.insert(gw);
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => warn!(
                "cannot read tables {}/{}: {e}",
                table::INBOUND,
                table::RETURN
            ),
        }
        let routed: BTreeSet<IpAddr> = kernel.src.keys().copied().collect();
        match self.fw.kind() {
            FirewallKind::Nftables => {
                match (
                    ambient_net::nft::observe_node(),
                    ambient_net::nft::observe_node_bridge(),
                ) {
                    (Ok(inet), Ok(bridge)) => {
                        let v4v6 = [POD_PORT_SET, POD_PORT_SET_V6];
                        KernelPods::add_set(&mut kernel.veth, bridge.as_ref(), v4v6);
                        let v4v6 = [POD_IIF_SET, POD_IIF_SET_V6];
                        KernelPods::add_set(&mut kernel.routed, inet.as_ref(), v4v6);
                    }
                    (Err(e), _) | (_, Err(e)) => warn!("cannot read the node's nft sets: {e}"),
                }
            }
            FirewallKind::Iptables => match ambient_net::iptables::ipset::members() {
                Ok(m) => {
                    for name in [POD_IIF_SET, POD_IIF_SET_V6] {
                        for elem in m.get(name).into_iter().flatten() {
                            if let Some((ip, dev)) = ipset_dev_elem(elem) {
                                kernel.routed.insert(ip, dev);
                            }
                        }
                    }
                }
                Err(e) => warn!("cannot read the node's ipsets: {e}"),
            },
        }
        let mut pods = Vec::new();
        for a in cached {
            let (Some(namespace), Some(name)) = (a.namespace.clone(), a.name.clone()) else {
                done.skipped += 1;
                continue;
            };
            if !a.chained {
                done.skipped += 1;
                continue;
            }
            let info = PodInfo {
                container_id: a.container_id.clone(),
                if_name: a.if_name.clone(),
                netns: a.netns.clone().unwrap_or_default(),
                namespace,
                name,
                uid: a.uid.clone().unwrap_or_default(),
                ips: a.ips.clone(),
                gateways: a.gateways.clone(),
            };
            let verdict = verdict_with_kernel(
                self.membership.verdict(&info),
                &a.ips,
                &routed,
                &ztunnel_ips,
            );
            match verdict {
                Verdict::Ztunnel | Verdict::Enroll => pods.push((verdict, a, info)),
                _ => done.skipped += 1,
            }
        }
        // The ztunnel first: the pods' records do not depend on it, but its log line leads.
        pods.sort_by_key(|(v, _, _)| *v != Verdict::Ztunnel);
        for (verdict, a, mut info) in pods {
            let key = store::key(&info.container_id, &info.if_name);
            if self.state.pods.contains_key(&key) {
                continue;
            }
            if let Err(e) = self.find_netns(&mut info).await {
                // A pod whose netns is not found (gone, or where the scan does not look): its
                // capture stays as the kernel holds it, until its CNI DEL or GC.
                match kernel.record(&info).filter(|_| verdict == Verdict::Enroll) {
                    Some(rec) => {
                        warn!(pod = %a.label(), veth = %rec.host_veth, "{e:#}: rebuilt from the kernel's elements and routes");
                        self.state.pods.insert(key, rec);
                        done.pods += 1;
                        done.from_kernel += 1;
                    }
                    None => done.failed.push(format!("{}: {e:#}", a.label())),
                }
                continue;
            }
            if verdict == Verdict::Ztunnel {
                if self.state.ztunnel.is_some() {
                    continue;
                }
                match self.ztunnel_endpoint(&info).await {
                    Ok(endpoint) => {
                        self.state.ztunnel = Some(ZtunnelRecord {
                            container_id: info.container_id,
                            if_name: info.if_name,
                            namespace: info.namespace,
                            name: info.name,
                            endpoint,
                        });
                        done.ztunnel = true;
                    }
                    Err(e) => done.failed.push(format!("{}: {e:#}", a.label())),
                }
                continue;
            }
            match self.pod_record(info).await {
                Ok(rec) => {
                    let gone: Vec<_> = rec.ips.iter().filter(|ip| !routed.contains(ip)).collect();
                    if self.state.ztunnel.is_some() && !gone.is_empty() {
                        info!(pod = %a.label(), ips = ?gone, "rebuilt pod had no table-100 route: the reconcile adds it");
                    }
                    self.state.pods.insert(key, rec);
                    done.pods += 1;
                }
                Err(e) => done.failed.push(format!("{}: {e:#}", a.label())),
            }
        }
        // Captured addresses no record holds now: the reconcile removes them.
        let held: BTreeSet<IpAddr> = self
            .state
            .pods
            .values()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        let orphans: Vec<&IpAddr> = routed.iter().filter(|ip| !held.contains(ip)).collect();
        if let Err(e) = self.store.save(&self.state) {
            error!("save the rebuilt state: {e:#}");
        }
        info!(
            pods = done.pods,
            records = self.state.pods.len(),
            ztunnel = done.ztunnel,
            from_kernel = done.from_kernel,
            skipped = done.skipped,
            failed = done.failed.len(),
            ms = started.elapsed().as_millis() as u64,
            "rebuilt the state from the runtime's CNI cache and the kernel"
        );
        for f in &done.failed {
            error!("not rebuilt (its next CNI ADD/CHECK/GC or the watcher enrolls it again): {f}");
        }
        if !orphans.is_empty() {
            warn!(ips = ?orphans, "table-100 routes of no attachment the runtime knows: the reconcile removes them");
        }
        done
    }

    /// A netns path for `info`: the cached one if it still exists, else the namespace that
    /// holds the pod's address and whose veth peer is on this node.
    async fn find_netns(&mut self, info: &mut PodInfo) -> anyhow::Result<()> {
        if !info.netns.is_empty() && Path::new(&info.netns).exists() {
            return Ok(());
        }
        let found = self
            .netns_scan
            .lookup(&mut self.netns_index, &info.ips)
            .await;
        for f in found.into_iter().filter(|f| f.if_name == info.if_name) {
            let mut probe = info.clone();
            probe.netns = f.netns.display().to_string();
            if self.pod_host_side(&probe).await.is_ok() {
                info.netns = probe.netns;
                return Ok(());
            }
        }
        anyhow::bail!(
            "no netns on this node holds {:?} on {}",
            info.ips,
            info.if_name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PodRecord;

    fn pod(n: u8) -> PodRecord {
        PodRecord::sample(n)
    }

    fn saved(dir: &Path, pods: &[u8]) -> (Store, AgentState) {
        let store = Store::new(dir);
        let mut s = AgentState::default();
        for n in pods {
            let p = pod(*n);
            s.pods.insert(store::key(&p.container_id, &p.if_name), p);
        }
        store.save(&s).unwrap();
        (store, s)
    }

    fn aside(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("state.json.corrupt-"))
            .collect()
    }

    #[test]
    fn an_intact_state_loads_and_needs_no_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let (store, s) = saved(dir.path(), &[1, 2]);
        let l = load(&store).unwrap();
        assert!(!l.needs_rebuild());
        assert_eq!((l.state, l.found, l.journal_dropped), (s, Found::Intact, 0));
    }

    #[test]
    fn a_missing_dir_is_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("gone"));
        let l = load(&store).unwrap();
        assert_eq!(l.found, Found::Missing);
        assert!(l.needs_rebuild());
        assert_eq!(l.state, AgentState::default());
    }

    #[test]
    fn truncated_empty_and_garbage_snapshots_are_moved_aside() {
        let full = {
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = saved(dir.path(), &[1, 2, 3]);
            std::fs::read(store.state_path()).unwrap()
        };
        let cases: [(&str, Vec<u8>); 3] = [
            ("half", full[..full.len() / 2].to_vec()),
            ("empty", Vec::new()),
            ("garbage", vec![0xff, 0x00, 0x13, b'{', 0x80, 0xfe]),
        ];
        for (what, bytes) in cases {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::new(dir.path());
            std::fs::write(store.state_path(), &bytes).unwrap();
            let l = load(&store).unwrap();
            let Found::Corrupt { moved_to, error } = &l.found else {
                panic!("{what}: {:?}", l.found);
            };
            assert!(!error.is_empty(), "{what}");
            assert_eq!(std::fs::read(moved_to).unwrap(), bytes, "{what}");
            assert_eq!(aside(dir.path()), vec![moved_to.clone()], "{what}");
            assert!(!store.state_path().exists(), "{what}");
            assert!(l.needs_rebuild());
            assert_eq!(l.state, AgentState::default(), "{what}");
        }
    }

    #[test]
    fn bad_journal_lines_anywhere_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut s) = saved(dir.path(), &[1]);
        for n in [2, 3] {
            let p = pod(n);
            s.pods.insert(store::key(&p.container_id, &p.if_name), p);
            store.save(&s).unwrap();
        }
        let journal = std::fs::read_to_string(store.journal_path()).unwrap();
        let lines: Vec<&str> = journal.lines().collect();
        assert_eq!(lines.len(), 2);
        // A garbage line between the two, and a torn one at the end.
        let damaged = format!("{}\n\u{1}garbage\n{}\n{{\"put\":{{\"ke", lines[0], lines[1]);
        std::fs::write(store.journal_path(), damaged).unwrap();
        let l = load(&store).unwrap();
        assert_eq!(l.found, Found::Intact);
        assert_eq!(l.journal_dropped, 2);
        assert_eq!(l.state, s, "every line that parsed was replayed");
        assert!(
            l.needs_rebuild(),
            "a lost line may have been a pod's record"
        );
    }

    #[test]
    fn cache_entries_parse_with_their_pod_netns_and_chain() {
        let conf = br#"{"name":"lab","plugins":[{"type":"ptp"},{"type":"ambient-cni"}]}"#;
        let entry = serde_json::json!({
            "kind": "cniCacheV1",
            "containerId": "abc",
            "config": base64_encode(conf),
            "ifName": "eth0",
            "networkName": "lab",
            "cniArgs": [["K8S_POD_NAMESPACE", "demo"], ["K8S_POD_NAME", "app"], ["K8S_POD_UID", "u1"]],
            "result": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/p"}],
                "ips": [{"interface": 1, "address": "10.244.1.3/24", "gateway": "10.244.1.1"},
                        {"interface": 0, "address": "10.9.9.9/24"}]
            }
        });
        let a = parse_cache_entry(entry.to_string().as_bytes()).unwrap();
        assert_eq!(a.label(), "demo/app");
        assert!(a.chained);
        assert_eq!(a.netns.as_deref(), Some("/run/netns/p"));
        assert_eq!(a.ips, vec!["10.244.1.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(a.gateways, vec!["10.244.1.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(a.uid.as_deref(), Some("u1"));

        let mut other = entry.clone();
        other["config"] = base64_encode(br#"{"name":"x","plugins":[{"type":"ptp"}]}"#).into();
        assert!(
            !parse_cache_entry(other.to_string().as_bytes())
                .unwrap()
                .chained
        );
        assert!(parse_cache_entry(b"{\"containerId\":\"x\"}").is_none());
        assert!(parse_cache_entry(b"\xff\xfe").is_none());
    }

    fn info(ips: &[&str], gateways: &[&str]) -> PodInfo {
        PodInfo {
            container_id: "c1".into(),
            if_name: "eth0".into(),
            netns: String::new(),
            namespace: "demo".into(),
            name: "app".into(),
            uid: "u".into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            gateways: gateways.iter().map(|i| i.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn a_pod_without_netns_is_rebuilt_from_its_elements_and_routes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut k = KernelPods::default();
        // A ptp pod (routed by its veth) and a bridge port (routed by the bridge), the first
        // dual-stack and captured (table-100 routes), the second not captured yet.
        k.veth.insert(ip("10.0.0.5"), "veth5".into());
        k.veth.insert(ip("fd00::5"), "veth5".into());
        k.routed.insert(ip("10.0.0.5"), "veth5".into());
        k.src.insert(ip("10.0.0.5"), ip("10.0.0.1"));
        k.src.insert(ip("fd00::5"), ip("fd00::1"));
        k.veth.insert(ip("10.0.1.7"), "veth7".into());
        k.routed.insert(ip("10.0.1.7"), "br0".into());

        let r = k.record(&info(&["10.0.0.5", "fd00::5"], &[])).unwrap();
        assert_eq!((r.host_veth.as_str(), r.host_bridge), ("veth5", None));
        assert_eq!(
            (r.gateway, r.gateway6),
            (ip("10.0.0.1"), Some("fd00::1".parse().unwrap()))
        );
        assert_eq!((r.container_id.as_str(), r.name.as_str()), ("c1", "app"));

        // No route: the cached result's gateway, of the pod's own family only.
        let r = k
            .record(&info(&["10.0.1.7"], &["fd00::9", "10.0.1.1"]))
            .unwrap();
        assert_eq!(r.host_bridge.as_deref(), Some("br0"));
        assert_eq!((r.gateway, r.gateway6), (ip("10.0.1.1"), None));

        // The iptables backend: only the routed device is known.
        let mut ipt = KernelPods::default();
        let (i, d) = ipset_dev_elem("10.0.0.5/32,veth5").unwrap();
        ipt.routed.insert(i, d);
        ipt.src.insert(ip("10.0.0.5"), ip("10.0.0.1"));
        let r = ipt.record(&info(&["10.0.0.5"], &[])).unwrap();
        assert_eq!((r.host_veth.as_str(), r.host_bridge), ("veth5", None));
        assert_eq!(ipset_dev_elem("fd00::5,veth5").unwrap().0, ip("fd00::5"));
        assert!(ipset_dev_elem("10.0.0.5").is_none());
        assert!(ipset_dev_elem("10.0.0.5,").is_none());

        // Nothing in the kernel, or no gateway anywhere: not rebuilt.
        assert!(k.record(&info(&["10.0.9.9"], &["10.0.9.1"])).is_none());
        assert!(k.record(&info(&["10.0.1.7"], &[])).is_none());
        assert!(k.record(&info(&[], &[])).is_none());
    }

    #[test]
    fn before_the_watch_syncs_the_kernel_says_who_was_captured() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let routed = BTreeSet::from([ip("10.0.0.5")]);
        let zt = BTreeSet::from([ip("10.0.0.2")]);
        let unknown = Verdict::NamespaceUnknown;
        let v = |v, a: &str| verdict_with_kernel(v, &[ip(a)], &routed, &zt);
        assert_eq!(v(unknown, "10.0.0.5"), Verdict::Enroll);
        assert_eq!(v(unknown, "10.0.0.2"), Verdict::Ztunnel);
        assert_eq!(v(unknown, "10.0.0.9"), unknown);
        // A verdict the membership could give stands, whatever the kernel holds.
        assert_eq!(v(Verdict::NotAmbient, "10.0.0.5"), Verdict::NotAmbient);
        assert_eq!(v(Verdict::Enroll, "10.0.0.9"), Verdict::Enroll);
    }

    #[test]
    fn base64_decodes_every_padding() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            assert_eq!(
                base64_decode(&base64_encode(s.as_bytes())).unwrap(),
                s.as_bytes()
            );
        }
        assert_eq!(base64_decode("Zm9vYmFy").unwrap(), b"foobar");
        assert!(base64_decode("Zm9v!").is_none());
        assert!(base64_decode("Z").is_none());
    }

    fn base64_encode(b: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, c)| n | (*c as u32) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
            out.extend(std::iter::repeat_n('=', 3 - chunk.len()));
        }
        out
    }
}
