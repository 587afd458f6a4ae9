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

impl NetnsScan {
    /// For each wanted address, every netns (by the path it was found at) with an interface
    /// holding it. Each namespace is looked at once however many paths lead to it, and the
    /// caller's own namespace (the node's) is skipped.
    pub async fn find(&self, want: &BTreeSet<IpAddr>) -> BTreeMap<IpAddr, Vec<Found>> {
        let mut found: BTreeMap<IpAddr, Vec<Found>> = BTreeMap::new();
        if want.is_empty() {
            return found;
        }
        let mut seen: BTreeSet<(u64, u64)> = BTreeSet::new();
        if let Ok(own) = std::fs::metadata("/proc/thread-self/ns/net") {
            seen.insert((own.dev(), own.ino()));
        }
        let mut candidates = Vec::new();
        for dir in &self.dirs {
            candidates.extend(entries(dir));
        }
        self.look(&candidates, want, &mut seen, &mut found).await;
        let missing = want.iter().any(|ip| !found.contains_key(ip));
        if let (true, Some(proc_dir)) = (missing, &self.proc_dir) {
            let procs: Vec<PathBuf> = entries(proc_dir)
                .into_iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .map(|p| p.join("ns/net"))
                .collect();
            self.look(&procs, want, &mut seen, &mut found).await;
        }
        found
    }

    async fn look(
        &self,
        paths: &[PathBuf],
        want: &BTreeSet<IpAddr>,
        seen: &mut BTreeSet<(u64, u64)>,
        found: &mut BTreeMap<IpAddr, Vec<Found>>,
    ) {
        for path in paths {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            match addresses_in(path).await {
                Ok(addrs) => {
                    for (ip, if_name) in addrs {
                        if want.contains(&ip) {
                            found.entry(ip).or_default().push(Found {
                                netns: path.clone(),
                                if_name,
                            });
                        }
                    }
                }
                // Not a netns (a stray file), or one that went away meanwhile.
                Err(e) => debug!(path = %path.display(), "skipping: {e:#}"),
            }
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
