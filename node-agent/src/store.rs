//! What the agent must remember across restarts, on disk as JSON (a snapshot written
//! atomically with write + rename, and a journal of pod changes appended to it), so a
//! restarted agent adopts the kernel state instead of rebuilding it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ambient_net::firewall::FirewallKind;
use ambient_net::model::{DualAddr, PodRoute, TunnelChoice, ZtunnelEndpoint};
use serde::{Deserialize, Serialize};

/// One enrolled pod attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub container_id: String,
    pub if_name: String,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    pub netns: String,
    pub ips: Vec<IpAddr>,
    /// The node-side device of the pod (its veth, found from the pod's netns).
    pub host_veth: String,
    /// The bridge that veth is a port of (bridge-type primaries): routed traffic of the pod
    /// enters the node through it, so its rp_filter is relaxed too.
    #[serde(default)]
    pub host_bridge: Option<String>,
    /// The node's gateway address toward the pod: IPv4 when the pod has IPv4, else IPv6.
    pub gateway: IpAddr,
    /// The node's IPv6 gateway toward a dual-stack pod (when [`Self::gateway`] is IPv4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
}

/// Unit tests' pod: `demo/p<n>` at 10.0.0.<n> behind `veth<n>`, gateway 10.0.0.1, no bridge.
#[cfg(test)]
impl PodRecord {
    pub fn sample(n: u8) -> PodRecord {
        use std::net::Ipv4Addr;
        PodRecord {
            container_id: format!("c{n}"),
            if_name: "eth0".into(),
            namespace: "demo".into(),
            name: format!("p{n}"),
            uid: String::new(),
            netns: format!("/run/netns/p{n}"),
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))],
            host_veth: format!("veth{n}"),
            host_bridge: None,
            gateway: Ipv4Addr::new(10, 0, 0, 1).into(),
            gateway6: None,
        }
    }
}

impl PodRecord {
    /// The node's addresses toward the pod, by family.
    pub fn gateways(&self) -> DualAddr {
        DualAddr::new(self.gateway, self.gateway6)
    }

    /// Each pod address with the node's gateway of its family (its table-100 route); an
    /// address of a family without a gateway has none.
    pub fn pod_routes(&self) -> impl Iterator<Item = PodRoute> + '_ {
        let gw = self.gateways();
        self.ips.iter().filter_map(move |ip| {
            gw.get(ip.is_ipv6())
                .map(|gateway| PodRoute { ip: *ip, gateway })
        })
    }
}

/// The ztunnel endpoint with the attachment it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZtunnelRecord {
    pub container_id: String,
    pub if_name: String,
    pub namespace: String,
    pub name: String,
    pub endpoint: ZtunnelEndpoint,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    pub tunnel: Option<TunnelChoice>,
    pub ztunnel: Option<ZtunnelRecord>,
    /// By `<containerId>/<ifName>`.
    #[serde(default)]
    pub pods: BTreeMap<String, PodRecord>,
    /// Node-wide sysctls the agent changed, with the value they had before, for cleanup.
    #[serde(default)]
    pub saved_sysctls: BTreeMap<String, String>,
    /// The firewall backend chosen at first start (`--firewall`), kept across restarts so
    /// `auto` never switches backends under live traffic; absent in older state: resolved.
    #[serde(default)]
    pub firewall: Option<FirewallKind>,
}

pub fn key(container_id: &str, if_name: &str) -> String {
    format!("{container_id}/{if_name}")
}

/// The state directory: `state.json` (a snapshot), `state.journal` (pod changes since the
/// snapshot, one JSON line each) and `tunnel.json` (what ztunnel-init reads).
///
/// CNI ADD and DEL change one pod, and rewriting a snapshot of every pod for each of them
/// made their cost grow with the number of pods (and on a disk-backed state dir, allocate an
/// inode per write). A pod-only change is appended to the journal instead; any other change,
/// or a journal longer than the pod count (at least [`MIN_COMPACT`] lines), writes a fresh
/// snapshot and starts a new journal. Loading replays the journal over the snapshot; a torn
/// last line (the agent killed mid-write) is ignored.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    written: std::sync::Mutex<Written>,
}

/// Journal lines before a compaction is considered.
const MIN_COMPACT: usize = 256;

/// What the files hold, as far as this process knows.
#[derive(Debug, Default)]
struct Written {
    /// The state the snapshot plus journal describe; `None` until the first snapshot.
    state: Option<AgentState>,
    journal_lines: usize,
}

impl Written {
    /// Whether going from what was written to `s` can be journaled: a snapshot exists, only
    /// pods differ, and the journal is not due for compaction.
    fn journal_takes(&self, s: &AgentState) -> bool {
        self.state.as_ref().is_some_and(|old| {
            old.tunnel == s.tunnel
                && old.ztunnel == s.ztunnel
                && old.saved_sysctls == s.saved_sysctls
                && self.journal_lines < MIN_COMPACT.max(s.pods.len())
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum JournalEntry {
    Put { key: String, pod: Box<PodRecord> },
    Del { key: String },
}

impl Store {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.into(),
            written: Default::default(),
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join("state.journal")
    }

    pub fn tunnel_path(&self) -> PathBuf {
        self.dir.join("tunnel.json")
    }

    pub fn load(&self) -> anyhow::Result<AgentState> {
        let mut state = match std::fs::read_to_string(self.state_path()) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| anyhow::anyhow!("state {}: {e}", self.state_path().display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AgentState::default(),
            Err(e) => return Err(e.into()),
        };
        let journal = match std::fs::read_to_string(self.journal_path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        for line in journal.lines() {
            match serde_json::from_str::<JournalEntry>(line) {
                Ok(JournalEntry::Put { key, pod }) => {
                    state.pods.insert(key, *pod);
                }
                Ok(JournalEntry::Del { key }) => {
                    state.pods.remove(&key);
                }
                // Only the last line can be torn; nothing after it was written.
                Err(_) => break,
            }
        }
        Ok(state)
    }

    /// Called on every CNI ADD and DEL: appends the pod changes to the journal when that is
    /// all that changed, else writes a snapshot (see the type's docs).
    pub fn save(&self, s: &AgentState) -> anyhow::Result<()> {
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let lines = match &w.state {
            Some(old) if w.journal_takes(s) => pod_changes(&old.pods, &s.pods),
            _ => return self.snapshot(&mut w, s),
        };
        self.append(&mut w, lines)
    }

    /// [`Store::save`] after a change to the pod `key` only (added, changed or removed): one
    /// journal line, without comparing every pod.
    pub fn save_pod(&self, s: &AgentState, key: &str) -> anyhow::Result<()> {
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let journal = w.journal_takes(s);
        if !journal {
            return self.snapshot(&mut w, s);
        }
        let entry = match s.pods.get(key) {
            Some(pod) => JournalEntry::Put {
                key: key.to_string(),
                pod: Box::new(pod.clone()),
            },
            None => JournalEntry::Del {
                key: key.to_string(),
            },
        };
        self.append(&mut w, vec![entry])
    }

    fn append(&self, w: &mut Written, lines: Vec<JournalEntry>) -> anyhow::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        self.append_lines(&lines)?;
        w.journal_lines += lines.len();
        let old = w.state.as_mut().expect("a snapshot precedes the journal");
        for entry in lines {
            match entry {
                JournalEntry::Put { key, pod } => {
                    old.pods.insert(key, *pod);
                }
                JournalEntry::Del { key } => {
                    old.pods.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// Appends journal lines; after a torn last line (a killed writer), on a line of their own.
    fn append_lines(&self, lines: &[JournalEntry]) -> anyhow::Result<()> {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(self.journal_path())?;
        let mut buf = Vec::new();
        if f.seek(SeekFrom::End(0))? > 0 {
            let mut last = [0u8; 1];
            f.seek(SeekFrom::End(-1))?;
            f.read_exact(&mut last)?;
            if last[0] != b'\n' {
                buf.push(b'\n');
            }
        }
        for entry in lines {
            serde_json::to_writer(&mut buf, entry)?;
            buf.push(b'\n');
        }
        f.write_all(&buf)?;
        Ok(())
    }

    /// Brings a journal left on disk up to `s`'s pods. A crash between a snapshot's rename
    /// and the journal's removal leaves both, and the next load replays that journal over the
    /// newer snapshot: without this it would undo the pod change that caused the snapshot (a
    /// DEL at a compaction brought its pod's record back).
    fn catch_up_journal(&self, s: &AgentState) -> anyhow::Result<()> {
        let journal = match std::fs::read(self.journal_path()) {
            Ok(j) => j,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        // What that load would find: the snapshot on disk (none when unreadable, as the load
        // then moves it aside) with every journal line that parses replayed over it.
        let mut on_disk: AgentState = std::fs::read(self.state_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        crate::recover::replay(&mut on_disk, &journal);
        let lines = pod_changes(&on_disk.pods, &s.pods);
        if lines.is_empty() {
            return Ok(());
        }
        self.append_lines(&lines)
    }

    fn snapshot(&self, w: &mut Written, s: &AgentState) -> anyhow::Result<()> {
        self.catch_up_journal(s)?;
        write_atomic(&self.state_path(), &serde_json::to_vec(s)?)?;
        // The snapshot holds everything the journal said: start it afresh.
        match std::fs::remove_file(self.journal_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        w.state = Some(s.clone());
        w.journal_lines = 0;
        if let Some(t) = &s.tunnel {
            let data = serde_json::to_vec(t)?;
            if std::fs::read(self.tunnel_path()).ok().as_deref() != Some(&data[..]) {
                write_atomic(&self.tunnel_path(), &data)?;
            }
        }
        Ok(())
    }

    pub fn remove(&self) -> anyhow::Result<()> {
        for p in [self.state_path(), self.journal_path(), self.tunnel_path()] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
        *w = Written::default();
        Ok(())
    }
}

/// The journal entries that turn `old` into `new` (one pass over both, in key order).
fn pod_changes(
    old: &BTreeMap<String, PodRecord>,
    new: &BTreeMap<String, PodRecord>,
) -> Vec<JournalEntry> {
    let mut out = Vec::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        let take_old = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, va)), Some((kb, vb))) if ka == kb => {
                if va != vb {
                    out.push(JournalEntry::Put {
                        key: (*kb).clone(),
                        pod: Box::new((*vb).clone()),
                    });
                }
                a.next();
                b.next();
                continue;
            }
            (Some((ka, _)), Some((kb, _))) => ka < kb,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if take_old {
            let (k, _) = a.next().expect("peeked");
            out.push(JournalEntry::Del { key: k.clone() });
        } else {
            let (k, v) = b.next().expect("peeked");
            out.push(JournalEntry::Put {
                key: k.clone(),
                pod: Box::new(v.clone()),
            });
        }
    }
    out
}

/// Write + rename: a reader (or an agent restarted after a crash) sees the old or the new
/// file, never a torn one. Not fsynced: the file describes kernel state that does not survive
/// a reboot either, and an fsync per write cost up to ~10 ms on a disk-backed state dir.
fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn state_round_trips_and_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert_eq!(store.load().unwrap(), AgentState::default());
        let mut s = AgentState {
            tunnel: Some(TunnelChoice {
                kind: ambient_net::model::TunnelKind::Vxlan,
                port: 6081,
            }),
            ..Default::default()
        };
        s.saved_sysctls
            .insert("net.ipv4.conf.all.rp_filter".into(), "1".into());
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        let t: TunnelChoice =
            serde_json::from_slice(&std::fs::read(store.tunnel_path()).unwrap()).unwrap();
        assert_eq!(t.port, 6081);
        store.remove().unwrap();
        store.remove().unwrap();
    }

    fn pod(n: u8) -> (String, PodRecord) {
        let rec = PodRecord::sample(n);
        (key(&rec.container_id, &rec.if_name), rec)
    }

    #[test]
    fn a_dual_stack_pod_routes_each_address_by_its_family_gateway() {
        let (_, mut p) = pod(5);
        let v6: Ipv6Addr = "fd00:10:244:1::5".parse().unwrap();
        let gw6: Ipv6Addr = "fd00:10:244:1::1".parse().unwrap();
        p.ips.push(v6.into());
        assert_eq!(p.pod_routes().count(), 1, "no IPv6 gateway: no IPv6 route");
        p.gateway6 = Some(gw6);
        let routes: Vec<_> = p.pod_routes().map(|r| (r.ip, r.gateway)).collect();
        assert_eq!(
            routes,
            vec![
                (
                    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)),
                    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))
                ),
                (v6.into(), gw6.into())
            ]
        );
        // A record an IPv4-only agent wrote still loads.
        let old = r#"{"containerId":"c","ifName":"eth0","namespace":"n","name":"p",
            "netns":"/x","ips":["10.0.0.5"],"hostVeth":"v","gateway":"10.0.0.1"}"#;
        let r: PodRecord = serde_json::from_str(old).unwrap();
        assert_eq!(
            (r.gateway, r.gateway6),
            (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), None)
        );
    }

    #[test]
    fn pod_changes_go_to_the_journal_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut s = AgentState::default();
        s.pods.extend([pod(1), pod(2)]);
        store.save(&s).unwrap();
        let snapshot = std::fs::read(store.state_path()).unwrap();
        assert!(!store.journal_path().exists());

        // ADD, DEL and a changed record: the snapshot stays, the journal grows by a line each.
        s.pods.extend([pod(3)]);
        store.save(&s).unwrap();
        s.pods.remove(&pod(1).0);
        s.pods.get_mut(&pod(2).0).unwrap().host_veth = "vethz".into();
        store.save(&s).unwrap();
        store.save(&s).unwrap();
        assert_eq!(std::fs::read(store.state_path()).unwrap(), snapshot);
        let journal = std::fs::read_to_string(store.journal_path()).unwrap();
        assert_eq!(journal.lines().count(), 3, "{journal}");
        assert_eq!(store.load().unwrap(), s);
        // A fresh process (a restarted agent) reads the same; its first save is a snapshot,
        // then it appends.
        let again = Store::new(dir.path());
        let mut loaded = again.load().unwrap();
        assert_eq!(loaded, s);
        again.save(&loaded).unwrap();
        assert!(!again.journal_path().exists());
        loaded.pods.extend([pod(4)]);
        again.save(&loaded).unwrap();
        assert!(again.journal_path().exists());
        assert_eq!(again.load().unwrap(), loaded);

        // A torn last line (killed mid-write) is ignored.
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(store.journal_path())
            .unwrap()
            .write_all(b"{\"put\":{\"key\":\"c9/e")
            .unwrap();
        assert_eq!(Store::new(dir.path()).load().unwrap(), loaded);

        // Anything but pods changing writes a snapshot and empties the journal.
        loaded.saved_sysctls.insert("k".into(), "v".into());
        again.save(&loaded).unwrap();
        assert!(!again.journal_path().exists());
        assert_eq!(again.load().unwrap(), loaded);
        again.remove().unwrap();
        assert_eq!(again.load().unwrap(), AgentState::default());
    }

    #[test]
    fn a_crash_between_a_snapshot_and_the_journal_removal_loses_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut s = AgentState::default();
        store.save(&s).unwrap();
        s.pods.extend([pod(1), pod(2)]);
        store.save(&s).unwrap();
        let journal = std::fs::read(store.journal_path()).unwrap();
        // Pod 1 removed by the change that writes a snapshot (a sysctl recorded with it).
        s.pods.remove(&pod(1).0);
        s.saved_sysctls.insert("k".into(), "v".into());
        // Killed right after the rename, before the journal's removal: what a restart loads.
        let crashed = |catch_up: bool| {
            std::fs::write(store.journal_path(), &journal).unwrap();
            if catch_up {
                store.catch_up_journal(&s).unwrap();
            }
            write_atomic(&store.state_path(), &serde_json::to_vec(&s).unwrap()).unwrap();
            crate::recover::load(&Store::new(dir.path())).unwrap().state
        };
        assert!(
            crashed(false).pods.contains_key(&pod(1).0),
            "without the catch-up the old journal brings pod 1 back"
        );
        assert_eq!(crashed(true), s);
        // The same after a torn last line: the catch-up starts a line of its own.
        std::fs::write(store.journal_path(), &journal).unwrap();
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(store.journal_path())
            .unwrap()
            .write_all(b"{\"put\":{\"ke")
            .unwrap();
        store.catch_up_journal(&s).unwrap();
        write_atomic(&store.state_path(), &serde_json::to_vec(&s).unwrap()).unwrap();
        let l = crate::recover::load(&Store::new(dir.path())).unwrap();
        assert_eq!((l.state, l.journal_dropped), (s.clone(), 1));
        // And a real save leaves no journal behind.
        store.save(&s).unwrap();
        assert!(!store.journal_path().exists());
    }

    #[test]
    fn a_long_journal_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut s = AgentState::default();
        store.save(&s).unwrap();
        for round in 0..(MIN_COMPACT + 10) {
            let (k, p) = pod((round % 200) as u8);
            if s.pods.remove(&k).is_none() {
                s.pods.insert(k, p);
            }
            store.save(&s).unwrap();
            let lines = std::fs::read_to_string(store.journal_path())
                .map(|j| j.lines().count())
                .unwrap_or(0);
            assert!(lines <= MIN_COMPACT.max(s.pods.len()), "{lines} lines");
        }
        assert_eq!(store.load().unwrap(), s);
    }

    #[test]
    fn one_pod_saves_append_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let mut s = AgentState::default();
        s.pods.extend([pod(1)]);
        store.save_pod(&s, &pod(1).0).unwrap();
        assert!(
            !store.journal_path().exists(),
            "the first save is a snapshot"
        );
        let (k2, p2) = pod(2);
        s.pods.insert(k2.clone(), p2);
        store.save_pod(&s, &k2).unwrap();
        s.pods.remove(&pod(1).0);
        store.save_pod(&s, &pod(1).0).unwrap();
        let journal = std::fs::read_to_string(store.journal_path()).unwrap();
        assert_eq!(journal.lines().count(), 2, "{journal}");
        assert_eq!(Store::new(dir.path()).load().unwrap(), s);
        // A full save afterwards finds nothing left to write.
        store.save(&s).unwrap();
        assert_eq!(
            std::fs::read_to_string(store.journal_path()).unwrap(),
            journal
        );
    }
}
