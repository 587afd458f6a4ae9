//! Running `iptables-restore`/`iptables-save` (and the ip6 twins) and `ipset`.
//!
//! There is no well-kept crate that programs iptables rules: kube-proxy, Calico and the
//! original ambient all drive the `iptables-restore` binary, and so does this module. Spawned
//! from the calling thread, so inside [`crate::netns::run_in`] they work on that namespace.
//!
//! Which iptables: by default the `iptables` of `PATH` (Debian 12's alternatives point it at
//! `iptables-nft`, the one Debian's kube-proxy uses); `AMBIENT_IPTABLES=legacy` or `=nft`
//! picks `iptables-legacy-*` / `iptables-nft-*`. It must be the same one kube-proxy uses: the
//! two keep separate tables, and an ACCEPT in one does not stop the other's NAT.

use std::io::Write;
use std::process::{Command, Stdio};

use super::render::Fam;
use super::IptablesError;

/// Environment variable choosing the iptables variant: `legacy`, `nft`, or unset (default).
pub const IPTABLES_ENV: &str = "AMBIENT_IPTABLES";

/// `iptables-restore` / `ip6tables-save` / ..., of the variant [`IPTABLES_ENV`] selects.
pub fn program(f: Fam, tool: &str) -> String {
    let base = match f {
        Fam::V4 => "iptables",
        Fam::V6 => "ip6tables",
    };
    match std::env::var(IPTABLES_ENV).as_deref() {
        Ok("legacy") => format!("{base}-legacy-{tool}"),
        Ok("nft") => format!("{base}-nft-{tool}"),
        _ => format!("{base}-{tool}"),
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
