//! iptables + ipset: the second firewall backend, the original's way (SPEC §2, §3).
//!
//! * The rules live in chains of our own (`AMBIENT-PREROUTING` ... in mangle,
//!   `AMBIENT-NAT-*` in nat), each jumped to by the first rule of its built-in chain. A
//!   change is one `iptables-restore --noflush` per family (`ip6tables-restore` for IPv6):
//!   only the chains of ours that differ are declared (`:CHAIN - [0:0]`, which flushes it)
//!   and refilled, and a jump that is missing or no longer first is re-inserted at 1, in the
//!   same restore transaction, as kube-proxy does; nothing else is touched.
//! * Whether a chain is current is read from its rules' comments (`[ambient i/n fp]`, as in
//!   the nft backend), from `iptables-save`; a second reconcile runs no restore at all.
//! * The pod sets are ipsets ([`ipset`]), elements added and deleted singly.
//! * The nft backend's bridge-family table (anti-spoofing by bridge port, same-bridge
//!   capture) has no twin here: that would take ebtables. With a bridge-type primary, the
//!   anti-spoofing here is by the bridge as input device.

pub mod exec;
pub mod ipset;
pub mod render;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use exec::{detect_variant, program, variant, Variant, IPTABLES_ENV};
pub use render::{
    chain, node_chains, ztunnel_chain, ztunnel_syn_limit_chain, ChainRules, Fam, RuleLine,
    JUMP_COMMENT,
};

use crate::nft::{NodeNft, PodElement, RuleTag, ZtunnelRules};

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error(
        "{program} was not found: the iptables backend needs Debian's `iptables` and `ipset` \
         packages (or use --firewall nftables)"
    )]
    Missing { program: String },
    #[error("{action} failed (exit {code:?}): {stderr}")]
    Failed {
        action: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid input: {0}")]
    Invalid(String),
}

// ---- observing -----------------------------------------------------------------------------

/// One table of `iptables-save`: every chain with its rules (the text after `-A <chain> `).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedTable {
    pub chains: BTreeMap<String, Vec<String>>,
}

/// `iptables-save` of one family, by table name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub tables: BTreeMap<String, ObservedTable>,
}

impl Observed {
    pub fn chain(&self, table: &str, name: &str) -> Option<&Vec<String>> {
        self.tables.get(table)?.chains.get(name)
    }
}

/// Parses `iptables-save` output.
pub fn parse_save(text: &str) -> Observed {
    let mut o = Observed::default();
    let mut table: Option<String> = None;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = Some(t.trim().to_string());
            o.tables.entry(t.trim().to_string()).or_default();
            continue;
        }
        let Some(t) = table.as_ref().and_then(|t| o.tables.get_mut(t)) else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                t.chains.entry(name.to_string()).or_default();
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            if let Some((name, rule)) = rest.split_once(' ') {
                t.chains
                    .entry(name.to_string())
                    .or_default()
                    .push(rule.to_string());
            }
        } else if line == "COMMIT" {
            table = None;
        }
    }
    o
}

/// The family's rules as `iptables-save` shows them.
pub fn observe(f: Fam) -> Result<Observed, IptablesError> {
    let prog = program(f, "save");
    let out = exec::run(&prog, &[], None)?.into_result(&prog)?;
    Ok(parse_save(&out))
}

/// The `--comment` of a saved rule (quoted when it has spaces).
pub fn comment_of(rule: &str) -> Option<&str> {
    let rest = &rule[rule.find("--comment ")? + "--comment ".len()..];
    match rest.strip_prefix('"') {
        Some(q) => q.find('"').map(|end| &q[..end]),
        None => rest.split_whitespace().next(),
    }
}

/// The chain a saved rule jumps to (`-j NAME` / `-g NAME`).
pub fn target_of(rule: &str) -> Option<&str> {
    let mut w = rule.split_whitespace();
    while let Some(t) = w.next() {
        if t == "-j" || t == "-g" {
            return w.next();
        }
    }
    None
}

/// Whether the kernel's chain holds exactly the rules of `spec` (by their tags).
pub fn chain_current(spec: &ChainRules, have: Option<&Vec<String>>) -> bool {
    let Some(rules) = have else {
        return false;
    };
    let count = spec.rules.len();
    let fingerprint = spec.fingerprint();
    rules.len() == count
        && rules.iter().enumerate().all(|(i, r)| {
            comment_of(r).and_then(RuleTag::parse)
                == Some(RuleTag {
                    index: i + 1,
                    count,
                    fingerprint,
                })
        })
}

/// Whether the built-in chain's first rule, and only that one, jumps to `spec`'s chain.
pub fn jump_current(spec: &ChainRules, hook_rules: Option<&Vec<String>>) -> bool {
    let rules = hook_rules.map(|v| v.as_slice()).unwrap_or_default();
    let jumps: Vec<usize> = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| target_of(r) == Some(spec.name))
        .map(|(i, _)| i)
        .collect();
    jumps == [0]
}

// ---- planning (pure) -----------------------------------------------------------------------

fn tables_of<'a>(chains: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = Vec::new();
    for t in chains {
        if !v.contains(&t) {
            v.push(t);
        }
    }
    v
}

/// The `iptables-restore --noflush` input that brings our `chains` (and their jumps) from
/// `observed` to desired; empty when everything is current.
pub fn plan(chains: &[ChainRules], observed: &Observed) -> String {
    let mut out = String::new();
    for table in tables_of(chains.iter().map(|c| c.table)) {
        let mut decls = Vec::new();
        let mut lines = Vec::new();
        for spec in chains.iter().filter(|c| c.table == table) {
            if !chain_current(spec, observed.chain(table, spec.name)) {
                decls.push(format!(":{} - [0:0]", spec.name));
                lines.extend(spec.lines());
            }
            let hook = observed.chain(table, spec.hook);
            if !jump_current(spec, hook) {
                for r in hook.into_iter().flatten() {
                    if target_of(r) == Some(spec.name) {
                        lines.push(format!("-D {} {r}", spec.hook));
                    }
                }
                lines.push(format!("-I {} 1 {}", spec.hook, spec.jump()));
            }
        }
        if !lines.is_empty() || !decls.is_empty() {
            out.push_str(&format!("*{table}\n"));
            for l in decls.iter().chain(&lines) {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
    }
    out
}

/// The restore input that removes the chains `ours` ((table, name)) and every rule jumping to
/// them; empty when none is there.
pub fn plan_cleanup(ours: &[(&str, &str)], observed: &Observed) -> String {
    let mut out = String::new();
    for table in tables_of(ours.iter().map(|(t, _)| *t)) {
        let Some(t) = observed.tables.get(table) else {
            continue;
        };
        let mine: Vec<&str> = ours
            .iter()
            .filter(|(tt, _)| *tt == table)
            .map(|(_, n)| *n)
            .collect();
        let mut lines = Vec::new();
        for (name, rules) in &t.chains {
            if mine.contains(&name.as_str()) {
                continue;
            }
            for r in rules {
                if target_of(r).is_some_and(|tgt| mine.contains(&tgt)) {
                    lines.push(format!("-D {name} {r}"));
                }
            }
        }
        for name in &mine {
            if t.chains.contains_key(*name) {
                lines.push(format!("-F {name}"));
                lines.push(format!("-X {name}"));
            }
        }
        if !lines.is_empty() {
            out.push_str(&format!("*{table}\n{}\nCOMMIT\n", lines.join("\n")));
        }
    }
    out
}

// ---- kernel --------------------------------------------------------------------------------

/// `iptables-restore --noflush` (`ip6tables-` for IPv6) of `text`; nothing runs for "".
pub fn restore(f: Fam, text: &str) -> Result<(), IptablesError> {
    if text.is_empty() {
        return Ok(());
    }
    let prog = program(f, "restore");
    tracing::debug!(program = %prog, "iptables restore");
    exec::run(&prog, &["-w", "5", "--noflush"], Some(text))?.into_result(&prog)?;
    Ok(())
}

/// Attempts per reconcile: another writer (kube-proxy) can change a built-in chain between
/// our save and restore, failing a `-D`; observe and plan again.
const ATTEMPTS: usize = 3;

/// Brings our chains of family `f` to `chains`; `Ok(true)` when a restore ran.
fn reconcile_chains(f: Fam, chains: &[ChainRules]) -> Result<bool, IptablesError> {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let text = plan(chains, &observe(f)?);
        if text.is_empty() {
            // (After a failed attempt, someone else made it current.)
            return Ok(false);
        }
        match restore(f, &text) {
            Ok(()) => return Ok(true),
            Err(e @ IptablesError::Failed { .. }) => {
                tracing::debug!(error = %e, "iptables restore raced, retrying");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| IptablesError::Invalid("reconcile gave up".into())))
}

fn cleanup_chains(f: Fam, ours: &[(&str, &str)]) -> Result<bool, IptablesError> {
    let text = plan_cleanup(ours, &observe(f)?);
    restore(f, &text)?;
    Ok(!text.is_empty())
}

/// The families to program: IPv6 only where the kernel has it (`ipv6.disable=1` leaves no
/// ip6tables to restore into; the nft backend's inet table needs no such care).
fn families() -> Vec<Fam> {
    let v6 = std::path::Path::new("/proc/thread-self/net/if_inet6").exists();
    Fam::BOTH
        .into_iter()
        .filter(|f| *f == Fam::V4 || v6)
        .collect()
}

fn invalid(e: crate::nft::NftError) -> IptablesError {
    IptablesError::Invalid(e.to_string())
}

/// Our node chains as (table, name).
fn node_chain_names() -> Vec<(&'static str, &'static str)> {
    node_chains(None, Fam::V4)
        .into_iter()
        .map(|c| (c.table, c.name))
        .collect()
}

/// Brings the node's sets and chains (both families) to `desired`; `Ok(true)` on a change.
/// Sets first: a rule can only refer to an ipset that exists.
pub fn reconcile_node(desired: &NodeNft) -> Result<bool, IptablesError> {
    desired.validate().map_err(invalid)?;
    let lines = ipset::plan(&ipset::desired(&desired.pods), &ipset::members()?);
    ipset::restore(&lines)?;
    let mut changed = !lines.is_empty();
    for f in families() {
        changed |= reconcile_chains(f, &node_chains(desired.rules.as_ref(), f))?;
    }
    Ok(changed)
}

/// CNI ADD fast path: the pod's elements of this backend's sets (created when missing).
pub fn add_pod_elements(elems: &[PodElement]) -> Result<(), IptablesError> {
    ipset::add(elems)
}

/// CNI DEL fast path; absent elements or sets are fine.
pub fn delete_pod_elements(elems: &[PodElement]) -> Result<(), IptablesError> {
    ipset::delete(elems)
}

/// CNI CHECK: which of these elements (of this backend's sets) the kernel does not hold.
pub fn missing_pod_elements(elems: &[PodElement]) -> Result<Vec<PodElement>, IptablesError> {
    ipset::missing(elems)
}

/// Cleanup: our node chains and the jumps to them (both families), then our sets.
pub fn cleanup_node() -> Result<(), IptablesError> {
    for f in families() {
        cleanup_chains(f, &node_chain_names())?;
    }
    ipset::destroy()
}

/// Our ztunnel netns chains as (table, name).
const ZTUNNEL_CHAINS: [(&str, &str); 2] =
    [("mangle", chain::PREROUTING), ("raw", chain::SYN_LIMIT)];

/// Brings the ztunnel netns chains to `desired`: the TPROXY chain (and the SYN limit's)
/// of each family the pod has an address of; the others removed. `Ok(true)` on a change.
pub fn reconcile_ztunnel(desired: &ZtunnelRules) -> Result<bool, IptablesError> {
    desired.validate().map_err(invalid)?;
    let mut changed = false;
    for f in families() {
        let want: Vec<ChainRules> = [
            ztunnel_chain(desired, f),
            ztunnel_syn_limit_chain(desired, f),
        ]
        .into_iter()
        .flatten()
        .collect();
        let gone: Vec<(&str, &str)> = ZTUNNEL_CHAINS
            .into_iter()
            .filter(|(t, n)| !want.iter().any(|c| c.table == *t && c.name == *n))
            .collect();
        if !want.is_empty() {
            changed |= reconcile_chains(f, &want)?;
        }
        if !gone.is_empty() {
            changed |= cleanup_chains(f, &gone)?;
        }
    }
    Ok(changed)
}

/// Cleanup of the ztunnel netns chains (both families).
pub fn cleanup_ztunnel() -> Result<(), IptablesError> {
    for f in families() {
        cleanup_chains(f, &ZTUNNEL_CHAINS)?;
    }
    Ok(())
}
