//! The lab's one Service, programmed the way kube-proxy's nftables mode would: a DNAT of
//! the ClusterIP to the backend pod, in prerouting (pod traffic) and output (node traffic).
//! The output chain says `priority -100` (= dstnat): this nft (1.0.x) rejects the name
//! `dstnat` on the output hook.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use ambient_net::netns;
use anyhow::{bail, Context, Result};

use crate::procs;

pub const SERVICE_NAME: &str = "app";
pub const SERVICE_NAMESPACE: &str = "demo";
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const SERVICE_PORT: u16 = 80;
/// The nft table (family ip) holding the DNAT.
pub const TABLE: &str = "kube-proxy";

/// The nft script for one node.
pub fn render(cluster_ip: Ipv4Addr, port: u16, backend: Ipv4Addr, target_port: u16) -> String {
    let rule = format!("ip daddr {cluster_ip} tcp dport {port} dnat to {backend}:{target_port}");
    format!(
        "table ip {TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\t{rule}\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\t{rule}\n\
         \t}}\n\
         }}\n"
    )
}

/// Loads `script` with `nft -f -` inside the named netns.
pub fn apply(netns_name: &str, script: &str) -> Result<()> {
    let mut cmd = Command::new("nft");
    cmd.arg("-f").arg("-");
    netns::command_in(&mut cmd, &netns::named_path(netns_name))?;
    let out = procs::run_capture(&mut cmd, Some(script.as_bytes()), Duration::from_secs(20))
        .with_context(|| format!("nft in netns {netns_name}"))?;
    if !out.status.success() {
        bail!(
            "nft -f - in netns {netns_name} failed ({}): {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script() {
        let s = render(CLUSTER_IP, 80, Ipv4Addr::new(10, 244, 2, 3), 9080);
        assert!(s.starts_with("table ip kube-proxy {"));
        assert_eq!(
            s.matches("ip daddr 10.96.0.10 tcp dport 80 dnat to 10.244.2.3:9080")
                .count(),
            2
        );
        assert!(s.contains("type nat hook prerouting priority dstnat;"));
        assert!(s.contains("type nat hook output priority -100;"));
    }
}
