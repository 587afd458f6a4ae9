//! Where the lab keeps things: its run dir, the binaries it drives, the netns names it owns.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Every lab lives in `/run/ambient-lab/<prefix>`.
pub const RUN_ROOT: &str = "/run/ambient-lab";
/// The lab's state file inside its run dir.
pub const STATE_FILE: &str = "lab.json";
/// The default prefix of netns names and the run dir.
pub const DEFAULT_PREFIX: &str = "amb";

/// A prefix is 1–16 of `[a-z0-9]`: no dash, so `<prefix>-` identifies one lab's
/// namespaces without ever matching another lab's.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 16
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        bail!("bad lab prefix {prefix:?}: use 1-16 characters of [a-z0-9]");
    }
    Ok(())
}

pub fn run_dir(prefix: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(prefix)
}

pub fn state_file(prefix: &str) -> PathBuf {
    run_dir(prefix).join(STATE_FILE)
}

/// Name of a lab netns: `<prefix>-<short>` (`amb-nodeA`, `amb-a-app`).
pub fn netns_name(prefix: &str, short: &str) -> String {
    format!("{prefix}-{short}")
}

/// True when `netns` belongs to the lab with this prefix.
pub fn owns_netns(prefix: &str, netns: &str) -> bool {
    netns
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('-'))
}

/// The directory of the running executable (`target/debug` for the lab binary).
pub fn exe_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the running executable")?;
    let dir = exe
        .parent()
        .context("the executable has no parent directory")?;
    // Test binaries live in target/<profile>/deps; the workspace binaries one level up.
    if dir.file_name().is_some_and(|n| n == "deps") {
        return Ok(dir.parent().unwrap_or(dir).to_path_buf());
    }
    Ok(dir.to_path_buf())
}

/// A binary built by this workspace, next to the lab's own executable.
pub fn sibling_bin(name: &str) -> Result<PathBuf> {
    Ok(exe_dir()?.join(name))
}

/// Cargo's target dir (the parent of the profile dir holding the executable).
pub fn target_dir() -> Result<PathBuf> {
    let dir = exe_dir()?;
    Ok(dir.parent().map(Path::to_path_buf).unwrap_or(dir))
}

/// The libcni client's Go source, shipped in this crate.
pub fn cniclient_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cniclient")
}

/// Fails unless `path` is an executable file.
pub fn require_executable(what: &str, path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{what} not found at {}", path.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("{what} at {} is not an executable file", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(validate_prefix("amb").is_ok());
        assert!(validate_prefix("lt42").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("a-b").is_err());
        assert!(validate_prefix("Amb").is_err());
        assert!(validate_prefix("abcdefghijklmnopq").is_err());
    }

    #[test]
    fn ownership() {
        assert!(owns_netns("amb", "amb-nodeA"));
        assert!(owns_netns("amb", "amb-a-app"));
        assert!(!owns_netns("amb", "amb2-nodeA"));
        assert!(!owns_netns("amb", "ambnodeA"));
        assert!(!owns_netns("amb", "xamb-nodeA"));
    }
}
