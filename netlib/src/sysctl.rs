//! `/proc/sys/net` reads and writes, in the calling thread's network namespace.

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One sysctl under `net.`, e.g. `net.ipv4.conf.all.rp_filter`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Sysctl {
    pub key: String,
    pub value: String,
}

impl Sysctl {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }

    /// `net.ipv4.conf.<dev>.<name>`
    pub fn conf(dev: &str, name: &str, value: &str) -> Self {
        Self::new(format!("net.ipv4.conf.{dev}.{name}"), value)
    }

    /// `net.ipv6.conf.<dev>.<name>`
    pub fn conf6(dev: &str, name: &str, value: &str) -> Self {
        Self::new(format!("net.ipv6.conf.{dev}.{name}"), value)
    }
}

fn path(key: &str) -> io::Result<PathBuf> {
    // Device names may not contain '/', and keys must stay under /proc/sys/net.
    if !key.starts_with("net.") || key.contains('/') || key.contains("..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad sysctl key {key:?}"),
        ));
    }
    Ok(PathBuf::from("/proc/sys").join(key.replace('.', "/")))
}

/// Reads a sysctl; `Ok(None)` when it does not exist (e.g. the device is gone).
pub fn read(key: &str) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path(key)?) {
        Ok(v) => Ok(Some(v.trim().to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a sysctl if its value differs; returns the previous value when it changed it.
pub fn ensure(s: &Sysctl) -> io::Result<Option<String>> {
    let old = read(&s.key)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no sysctl {}", s.key)))?;
    if old == s.value {
        return Ok(None);
    }
    std::fs::write(path(&s.key)?, &s.value)
        .map_err(|e| io::Error::new(e.kind(), format!("write {}={}: {e}", s.key, s.value)))?;
    Ok(Some(old))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_proc_paths_and_refuse_escapes() {
        assert_eq!(
            path("net.ipv4.conf.istioin.rp_filter").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/istioin/rp_filter")
        );
        assert!(path("kernel.panic").is_err());
        assert!(path("net.ipv4.conf.a/b.rp_filter").is_err());
    }

    #[test]
    fn conf_names_the_device() {
        assert_eq!(
            Sysctl::conf("all", "rp_filter", "0").key,
            "net.ipv4.conf.all.rp_filter"
        );
    }
}
