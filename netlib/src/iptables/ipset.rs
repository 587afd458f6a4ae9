//! The node's pod sets as ipsets, through the `ipset` binary (`ipset -exist restore`).
//!
//! Why not the `ipset` crate: it is a bindgen wrapper of the C libipset, so every build needs
//! clang/libclang and libipset's headers (Debian `libipset-dev`, `libclang-dev`) and the
//! binaries link libipset.so; `ipset restore` drives the same library with none of that.
//! A restore applies its lines in order and stops at the first error (it is not one kernel
//! transaction like nft's); every change here is a list of single `add`/`del` lines with
//! `-exist`, so a retry after a failure converges, and a set is never flushed or rebuilt.
//!
//! Sets: `ztunnel-pods-ips` `hash:ip` (family inet6 for `ztunnel-pods-ips6`), as the
//! original. The nft backend's `iifname . saddr` pairs are `hash:net,iface` sets
//! (`ztunnel-pods-iifs[6]`, elements `<ip>,<device>`, i.e. a host net), matched with
//! `-m set --match-set <set> src,src`: the packet's source address and its input device.

use std::collections::{BTreeMap, BTreeSet};

use super::exec;
use super::render::Fam;
use super::IptablesError;
use crate::consts;
use crate::model::PodSource;
use crate::nft::{PodElement, SetElem};

/// One ipset of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetDef {
    pub name: &'static str,
    pub fam: Fam,
    /// `hash:ip` or `hash:net,iface`.
    pub kind: &'static str,
}

impl SetDef {
    fn create(&self) -> String {
        format!(
            "create {} {} family {}",
            self.name,
            self.kind,
            self.fam.ipset_family()
        )
    }

    fn with_dev(&self) -> bool {
        self.kind == "hash:net,iface"
    }

    /// This set's element for `p`, if `p` is of its family.
    fn elem(&self, p: &PodSource) -> Option<String> {
        if Fam::of(p.ip) != self.fam {
            return None;
        }
        Some(if self.with_dev() {
            format!("{},{}", p.ip, p.routed_dev())
        } else {
            p.ip.to_string()
        })
    }
}

/// Every set, in creation order.
pub const SETS: [SetDef; 4] = [
    SetDef {
        name: consts::POD_SET,
        fam: Fam::V4,
        kind: "hash:ip",
    },
    SetDef {
        name: consts::POD_SET_V6,
        fam: Fam::V6,
        kind: "hash:ip",
    },
    SetDef {
        name: consts::POD_IIF_SET,
        fam: Fam::V4,
        kind: "hash:net,iface",
    },
    SetDef {
        name: consts::POD_IIF_SET_V6,
        fam: Fam::V6,
        kind: "hash:net,iface",
    },
];

/// The set and ipset element text of a node element this backend has: the inet table's
/// address and `device . address` sets; the nft bridge table's sets have no twin here.
pub fn element(e: &PodElement) -> Option<(&'static SetDef, String)> {
    if e.family() != "inet" {
        return None;
    }
    let def = SETS.iter().find(|s| s.name == e.set_name())?;
    let text = match &e.elem {
        SetElem::Addr(ip) => ip.to_string(),
        SetElem::DevAddr(dev, ip) => format!("{ip},{dev}"),
    };
    Some((def, text))
}

/// The desired members of every set for these pods.
pub fn desired<'a>(
    pods: impl IntoIterator<Item = &'a PodSource> + Clone,
) -> Vec<(SetDef, BTreeSet<String>)> {
    SETS.iter()
        .map(|d| {
            (
                *d,
                pods.clone().into_iter().filter_map(|p| d.elem(p)).collect(),
            )
        })
        .collect()
}

/// The names of the sets that exist.
pub fn existing() -> Result<BTreeSet<String>, IptablesError> {
    let out = exec::run("ipset", &["list", "-n"], None)?.into_result("ipset list -n")?;
    Ok(out
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// The members of every existing set of ours (one `ipset save`), by set name.
pub fn members() -> Result<BTreeMap<String, BTreeSet<String>>, IptablesError> {
    let out = exec::run("ipset", &["save"], None)?.into_result("ipset save")?;
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in out.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("create"), Some(name), _) if SETS.iter().any(|s| s.name == name) => {
                m.entry(name.to_string()).or_default();
            }
            (Some("add"), Some(name), Some(elem)) if SETS.iter().any(|s| s.name == name) => {
                m.entry(name.to_string())
                    .or_default()
                    .insert(elem.to_string());
            }
            _ => {}
        }
    }
    Ok(m)
}

/// `ipset -exist restore` of these lines; nothing runs for none.
pub fn restore(lines: &[String]) -> Result<(), IptablesError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut text = lines.join("\n");
    text.push('\n');
    tracing::debug!(lines = lines.len(), "ipset restore");
    exec::run("ipset", &["-exist", "restore"], Some(&text))?.into_result("ipset restore")?;
    Ok(())
}

/// The lines that bring the sets to `want`: missing sets created, elements added and
/// deleted one by one.
pub fn plan(
    want: &[(SetDef, BTreeSet<String>)],
    have: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut lines = Vec::new();
    for (def, elems) in want {
        let current = match have.get(def.name) {
            Some(c) => c.clone(),
            None => {
                lines.push(def.create());
                BTreeSet::new()
            }
        };
        for e in elems.difference(&current) {
            lines.push(format!("add {} {e}", def.name));
        }
        for e in current.difference(elems) {
            lines.push(format!("del {} {e}", def.name));
        }
    }
    lines
}

/// CNI ADD: the sets created if missing, these elements added.
pub fn add(elems: &[PodElement]) -> Result<(), IptablesError> {
    let adds: Vec<String> = elems
        .iter()
        .filter_map(element)
        .map(|(d, e)| format!("add {} {e}", d.name))
        .collect();
    if adds.is_empty() {
        return Ok(());
    }
    let mut lines: Vec<String> = SETS.iter().map(SetDef::create).collect();
    lines.extend(adds);
    restore(&lines)
}

/// CNI DEL: these elements deleted from the sets that exist (absent elements are fine).
pub fn delete(elems: &[PodElement]) -> Result<(), IptablesError> {
    let dels: Vec<(&SetDef, String)> = elems.iter().filter_map(element).collect();
    if dels.is_empty() {
        return Ok(());
    }
    let present = existing()?;
    let lines: Vec<String> = dels
        .into_iter()
        .filter(|(d, _)| present.contains(d.name))
        .map(|(d, e)| format!("del {} {e}", d.name))
        .collect();
    restore(&lines)
}

/// CNI CHECK: the elements of this backend's sets that the kernel does not hold.
pub fn missing(elems: &[PodElement]) -> Result<Vec<PodElement>, IptablesError> {
    let have = members()?;
    Ok(elems
        .iter()
        .filter(|e| {
            element(e).is_some_and(|(d, text)| !have.get(d.name).is_some_and(|m| m.contains(&text)))
        })
        .cloned()
        .collect())
}

/// Cleanup: our sets destroyed (after the rules that use them are gone).
pub fn destroy() -> Result<(), IptablesError> {
    let present = existing()?;
    let lines: Vec<String> = SETS
        .iter()
        .filter(|d| present.contains(d.name))
        .map(|d| format!("destroy {}", d.name))
        .collect();
    restore(&lines)
}
