//! Running `iptables-restore`/`iptables-save` (and the ip6 twins) and `ipset`.
//!
//! There is no well-kept crate that programs iptables rules: kube-proxy, Calico and the
//! original ambient all drive the `iptables-restore` binary, and so does this module. Spawned
//! from the calling thread, so inside [`crate::netns::run_in`] they work on that namespace.
//!
//! Which iptables: it must be the one kube-proxy uses, since the two variants keep separate
//! tables and an ACCEPT in one does not stop the other's NAT. By default the `iptables` of
//! `PATH` (Debian 12's alternatives point it at `iptables-nft`, which kube-proxy's image
//! also picks on such a node); `iptables-legacy` when, as kube-proxy's iptables-wrapper
//! decides, the legacy tables hold kube-proxy's chains and the nft ones do not.
//! `AMBIENT_IPTABLES=legacy` or `=nft` forces `iptables-legacy-*` / `iptables-nft-*`.

use std::sync::OnceLock;

use super::render::Fam;
use super::IptablesError;

/// Environment variable choosing the iptables variant: `legacy`, `nft`, or unset (default).
pub const IPTABLES_ENV: &str = "AMBIENT_IPTABLES";

/// The iptables variant in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `iptables-*` of `PATH` (the distribution's alternative).
    Default,
    Legacy,
    Nft,
}

/// [`IPTABLES_ENV`] when set, else detected once per process ([`detect_variant`]).
pub fn variant() -> Variant {
    static DETECTED: OnceLock<Variant> = OnceLock::new();
    match std::env::var(IPTABLES_ENV).as_deref() {
        Ok("legacy") => Variant::Legacy,
        Ok("nft") => Variant::Nft,
        _ => *DETECTED.get_or_init(detect_variant),
    }
}

/// Legacy when the legacy nat table holds kube-proxy's chains (`:KUBE-`) and the nft one
/// does not, else the default. `/proc/thread-self/net/ip_tables_names` (this thread's netns;
/// `/proc/net` is the main thread's) is read first, so a node that never used legacy
/// iptables does not get its modules loaded by `iptables-legacy-save`.
pub fn detect_variant() -> Variant {
    let legacy =
        std::fs::read_to_string("/proc/thread-self/net/ip_tables_names").unwrap_or_default();
    if !legacy.lines().any(|t| t.trim() == "nat") {
        return Variant::Default;
    }
    let has_kube = |prog: &str| {
        run(prog, &["-t", "nat"], None).is_ok_and(|o| o.ok && o.stdout.contains(":KUBE-"))
    };
    if has_kube("iptables-legacy-save") && !has_kube("iptables-nft-save") {
        tracing::info!("kube-proxy's chains are in the legacy iptables: using iptables-legacy");
        Variant::Legacy
    } else {
        Variant::Default
    }
}

/// `iptables-restore` / `ip6tables-save` / ..., of the [`variant`] in use.
pub fn program(f: Fam, tool: &str) -> String {
    let base = match f {
        Fam::V4 => "iptables",
        Fam::V6 => "ip6tables",
    };
    match variant() {
        Variant::Legacy => format!("{base}-legacy-{tool}"),
        Variant::Nft => format!("{base}-nft-{tool}"),
        Variant::Default => format!("{base}-{tool}"),
    }
}

/// One finished run.
pub(crate) type Output = crate::exec::Output<IptablesError>;

impl From<crate::exec::Failed> for IptablesError {
    fn from(f: crate::exec::Failed) -> Self {
        IptablesError::Failed {
            action: f.action,
            code: f.code,
            stderr: f.stderr,
        }
    }
}

/// Runs `program args`, feeding `stdin` when given; stdout and stderr captured, C locale.
pub(crate) fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, IptablesError> {
    crate::exec::run(std::path::Path::new(program), args, stdin).map_err(|e| match e {
        crate::exec::RunError::Missing => IptablesError::Missing {
            program: program.to_string(),
        },
        crate::exec::RunError::Io(step, source) => IptablesError::Io {
            action: format!("{step} {program}"),
            source,
        },
    })
}
