//! Running the `nft` binary (a runtime dependency: Debian package `nftables`).
//!
//! The `nftables` crate's own runner does not capture nft's stderr when applying, so the
//! error would lose nft's explanation; this one captures stdout and stderr, forces the C
//! locale (stable messages), and is spawned from the calling thread, so a thread that has
//! joined another network namespace (`netns::run_in`) runs nft in that namespace.

use std::path::{Path, PathBuf};

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
pub(crate) type Output = crate::exec::Output<NftError>;

impl From<crate::exec::Failed> for NftError {
    fn from(f: crate::exec::Failed) -> Self {
        NftError::Failed {
            action: f.action,
            code: f.code,
            stderr: f.stderr,
        }
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
    crate::exec::run(program, args, stdin).map_err(|e| match e {
        crate::exec::RunError::Missing => NftError::Missing {
            program: program.display().to_string(),
        },
        crate::exec::RunError::Io(step, source) => NftError::Io {
            action: format!("{step} {}", program.display()),
            source,
        },
    })
}
