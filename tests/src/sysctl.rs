//! Sysctls inside a lab netns: `/proc/sys/net` shows the netns of the thread that opens
//! it, so the writes happen on a thread that joined the namespace.

use std::path::PathBuf;

use ambient_net::netns;
use anyhow::{Context, Result};

/// `net.ipv4.ip_forward` → `/proc/sys/net/ipv4/ip_forward`.
fn proc_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Writes each `(key, value)` in the named netns, in order.
pub fn set_in(netns_name: &str, settings: &[(&str, &str)]) -> Result<()> {
    let path = netns::named_path(netns_name);
    netns::run_in(&path, || -> Result<()> {
        for (key, value) in settings {
            std::fs::write(proc_path(key), value)
                .with_context(|| format!("sysctl {key}={value} in netns {netns_name}"))?;
        }
        Ok(())
    })?
}

/// Reads one sysctl in the named netns.
pub fn get_in(netns_name: &str, key: &str) -> Result<String> {
    let path = netns::named_path(netns_name);
    netns::run_in(&path, || {
        std::fs::read_to_string(proc_path(key))
            .map(|s| s.trim().to_string())
            .with_context(|| format!("read sysctl {key} in netns {netns_name}"))
    })?
}
