//! Finding a pod's network namespace on the node from its IP, for pods the agent learns of
//! from the API server rather than from a CNI ADD (pods that were running before the product
//! was installed, or before this agent started and whose namespace was relabelled later).
//!
//! The choice: scan the runtime's netns directories first (`/var/run/netns`, `/run/netns`:
//! containerd and CRI-O bind-mount every pod sandbox's netns there, and that is the path they
//! hand CNI as `CNI_NETNS`), and pick the namespace that has an interface holding the pod's
//! IP. Only when that finds nothing, fall back to `/proc/<pid>/ns/net` of every process (a
//! runtime that does not pin its netns in a directory; needs the host's PID namespace). The
//! pod's own IP is the only fact the API and the node share, so it is the key; the caller then
//! checks the interface is a veth whose peer is on the node (a stale netns of a dead sandbox
//! with the same address has no peer here).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ambient_net::nl::Netlink;
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use tracing::debug;

/// Where to look for pod network namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsScan {
    pub dirs: Vec<PathBuf>,
    /// `/proc`, or `None` to never scan processes.
    pub proc_dir: Option<PathBuf>,
}

impl Default for NetnsScan {
    fn default() -> Self {
        Self {
            dirs: vec!["/var/run/netns".into(), "/run/netns".into()],
            proc_dir: Some("/proc".into()),
        }
    }
}

/// A netns with an interface holding a wanted address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub netns: PathBuf,
    pub if_name: String,
}

/// What one scan found: every address in every namespace looked at. Kept for
/// [`INDEX_FRESH`] so that enrolling many pods at once (a namespace labelled on a busy node)
/// costs one pass over the namespaces, not one per pod.
#[derive(Debug, Default)]
pub struct NetnsIndex {
    built: Option<Instant>,
    by_ip: BTreeMap<IpAddr, Vec<Found>>,
    /// (dev, inode) of every namespace already looked at, the node's own included.
    seen: BTreeSet<(u64, u64)>,
    proc_done: bool,
}

/// How long a scan is reused.
pub const INDEX_FRESH: Duration = Duration::from_secs(1);

impl NetnsIndex {
    fn hits(&self, ips: &[IpAddr]) -> Vec<Found> {
        let mut v: Vec<Found> = ips
            .iter()
            .flat_map(|ip| self.by_ip.get(ip).into_iter().flatten().cloned())
            .collect();
        v.dedup();
        v
    }
}

impl NetnsScan {
    /// The namespaces with an interface holding one of `ips`: from the netns dirs, and only
    /// when they have none, from /proc. Each namespace is looked at once however many paths
    /// lead to it, and the caller's own namespace (the node's) is skipped.
    pub async fn lookup(&self, index: &mut NetnsIndex, ips: &[IpAddr]) -> Vec<Found> {
        if index.built.is_none_or(|t| t.elapsed() > INDEX_FRESH) {
            *index = NetnsIndex {
                built: Some(Instant::now()),
                ..Default::default()
            };
            if let Ok(own) = std::fs::metadata("/proc/thread-self/ns/net") {
                index.seen.insert((own.dev(), own.ino()));
            }
            let mut paths = Vec::new();
            for dir in &self.dirs {
                paths.extend(entries(dir));
            }
            look(&paths, index).await;
        }
        let hits = index.hits(ips);
        match &self.proc_dir {
            Some(proc_dir) if hits.is_empty() && !index.proc_done => {
                index.proc_done = true;
                let paths: Vec<PathBuf> = entries(proc_dir)
                    .into_iter()
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .map(|p| p.join("ns/net"))
                    .collect();
                look(&paths, index).await;
                index.hits(ips)
            }
            _ => hits,
        }
    }
}

async fn look(paths: &[PathBuf], index: &mut NetnsIndex) {
    for path in paths {
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        if !index.seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        match addresses_in(path).await {
            Ok(addrs) => {
                for (ip, if_name) in addrs {
                    index.by_ip.entry(ip).or_default().push(Found {
                        netns: path.clone(),
                        if_name,
                    });
                }
            }
            // Not a netns (a stray file), or one that went away meanwhile.
            Err(e) => debug!(path = %path.display(), "skipping: {e:#}"),
        }
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    v.sort();
    v
}

/// Every address in the netns at `path`, with the name of the interface holding it.
async fn addresses_in(path: &Path) -> anyhow::Result<Vec<(IpAddr, String)>> {
    let nl = Netlink::in_netns(path)?;
    let names = nl.link_names().await?;
    let msgs: Vec<_> = nl.handle().address().get().execute().try_collect().await?;
    Ok(msgs
        .iter()
        .filter_map(|m| {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })?;
            let name = names.get(&m.header.index)?;
            Some((ip, name.clone()))
        })
        .collect())
}
