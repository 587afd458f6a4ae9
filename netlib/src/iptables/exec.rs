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

use std::io::Write;
use std::process::{Command, Stdio};
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
pub(crate) struct Output {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn into_result(self, action: &str) -> Result<String, IptablesError> {
        if self.ok {
            Ok(self.stdout)
        } else {
            Err(IptablesError::Failed {
                action: action.to_string(),
                code: self.code,
                stderr: self.stderr.trim().to_string(),
            })
        }
    }
}

/// Runs `program args`, feeding `stdin` when given; stdout and stderr captured, C locale.
pub(crate) fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, IptablesError> {
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                IptablesError::Missing {
                    program: program.to_string(),
                }
            } else {
                IptablesError::Io {
                    action: format!("start {program}"),
                    source: e,
                }
            }
        })?;
    let io_err = |action: String, source| IptablesError::Io { action, source };
    let output = std::thread::scope(|s| {
        // A helper thread writes, so a large input never deadlocks against the output.
        let writer = child.stdin.take().map(|mut pipe| {
            let data = stdin.unwrap_or_default().as_bytes();
            s.spawn(move || pipe.write_all(data))
        });
        let out = child.wait_with_output();
        match writer.map(|w| w.join()) {
            Some(Ok(Err(e))) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(io_err(format!("write to {program}"), e))
            }
            Some(Err(_)) => {
                return Err(io_err(
                    format!("write to {program}"),
                    std::io::Error::other("writer panicked"),
                ))
            }
            _ => {}
        }
        out.map_err(|e| io_err(format!("wait for {program}"), e))
    })?;
    Ok(Output {
        ok: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
