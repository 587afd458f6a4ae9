//! Running the `nft` binary (a runtime dependency: Debian package `nftables`).
//!
//! The `nftables` crate's own runner does not capture nft's stderr when applying, so the
//! error would lose nft's explanation; this one captures stdout and stderr, forces the C
//! locale (stable messages), and is spawned from the calling thread, so a thread that has
//! joined another network namespace (`netns::run_in`) runs nft in that namespace.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::NftError;

/// Environment variable that overrides where the `nft` binary is.
pub const NFT_ENV: &str = "AMBIENT_NFT";

/// Places tried when `nft` is not on `PATH` (a CNI plugin may run with a minimal `PATH`).
const FALLBACKS: &[&str] = &["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft", "/bin/nft"];

/// The `nft` to run: `$AMBIENT_NFT`, else `nft` on `PATH`, else a usual sbin location.
pub fn nft_program() -> PathBuf {
    if let Some(p) = std::env::var_os(NFT_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let cand = dir.join("nft");
            if is_executable(&cand) {
                return cand;
            }
        }
    }
    FALLBACKS
        .iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
        .unwrap_or_else(|| PathBuf::from("nft"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The result of one nft run that could be started.
pub(crate) struct Output {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn into_result(self, action: &str) -> Result<String, NftError> {
        if self.ok {
            Ok(self.stdout)
        } else {
            Err(NftError::Failed {
                action: action.to_string(),
                code: self.code,
                stderr: self.stderr.trim().to_string(),
            })
        }
    }

    /// nft's message for a table, chain, set or element that does not exist (ENOENT).
    pub fn is_absent(&self) -> bool {
        !self.ok && self.stderr.contains("No such file or directory")
    }
}

/// Runs `nft <args>`, feeding `stdin` when given.
pub(crate) fn run(args: &[&str], stdin: Option<&str>) -> Result<Output, NftError> {
    run_with(&nft_program(), args, stdin)
}

pub(crate) fn run_with(
    program: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, NftError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            NftError::Missing {
                program: program.display().to_string(),
            }
        } else {
            NftError::Io {
                action: format!("start {}", program.display()),
                source: e,
            }
        }
    })?;
    let io_err = |action: &str, source| NftError::Io {
        action: action.to_string(),
        source,
    };
    let output = std::thread::scope(|s| {
        // Write on a helper thread so a large batch can never deadlock against nft's output.
        let writer = child.stdin.take().map(|mut pipe| {
            let data = stdin.unwrap_or_default().as_bytes();
            s.spawn(move || pipe.write_all(data))
        });
        let out = child.wait_with_output();
        let wrote = writer.map(|w| w.join());
        match wrote {
            Some(Ok(Err(e))) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(io_err("write to nft", e))
            }
            Some(Err(_)) => return Err(io_err("write to nft", std::io::Error::other("panic"))),
            _ => {}
        }
        out.map_err(|e| io_err("wait for nft", e))
    })?;
    Ok(Output {
        ok: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
