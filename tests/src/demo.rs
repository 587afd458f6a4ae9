//! `ambient-lab demo`: on a lab that is up, put the test transparent listener in node A's
//! ztunnel netns and show which connections the node captures, and where they land.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::harness::Lab;
use crate::tproxy::TproxyRecord;

/// Runs the demo against the lab `prefix` (which must be up) and returns the report.
pub fn run(prefix: &str) -> Result<String> {
    let bin = std::env::current_exe().context("own executable")?;
    let lab = Lab::attach(prefix, &bin)?;
    let listener = lab.tproxy_listen("a-ztunnel")?;
    let ip = |p: &str| lab.pod_ip(p);
    let cases: [(&str, &str, Ipv4Addr, u16); 5] = [
        (
            "ambient pod -> pod on node B",
            "a-client",
            ip("b-app"),
            9080,
        ),
        (
            "ambient pod -> Service ClusterIP",
            "a-client",
            Ipv4Addr::new(10, 96, 0, 10),
            80,
        ),
        (
            "plain pod -> local ambient pod",
            "a-plain",
            ip("a-app"),
            9080,
        ),
        (
            "plain pod -> plain pod on node B",
            "a-plain",
            ip("b-plain"),
            9080,
        ),
        (
            "node A -> local ambient pod (probe)",
            "nodeA",
            ip("a-app"),
            9080,
        ),
    ];
    let mut out = String::from("connection                             what answered\n");
    for (what, from, ip, port) in cases {
        let line = lab
            .connect(from, ip, port)
            .unwrap_or_else(|e| format!("error: {e:#}"));
        let verdict = match TproxyRecord::parse_line(&line) {
            Some(r) => format!(
                "CAPTURED into ztunnel A :{} (original destination {}, peer {})",
                r.port, r.orig_dst, r.peer
            ),
            None => format!("not captured: {line}"),
        };
        out += &format!("{what:<38} {from} -> {ip}:{port}\n{:<38} {verdict}\n", "");
    }
    std::thread::sleep(Duration::from_millis(50));
    out += &format!(
        "\nztunnel A's listener accepted {} connection(s). Look at the rules with:\n  \
         ambient-lab exec --prefix {prefix} nodeA -- ip rule\n  \
         ambient-lab exec --prefix {prefix} nodeA -- nft list table inet ambient-node\n",
        listener.records()?.len()
    );
    lab.detach();
    Ok(out)
}
