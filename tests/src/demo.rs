//! `ambient-lab demo`: on a lab that is up, make a few connections and show what the node
//! did with each. With the ztunnel data plane: what the server saw and the access-log lines
//! of both ztunnels; with `--dataplane none`: a transparent test listener in node A's
//! ztunnel netns shows which connections were captured and with which original destination.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::harness::Lab;
use crate::tproxy::TproxyRecord;

const CASES: [(&str, &str, &str, u16); 5] = [
    ("ambient pod -> pod on node B", "a-client", "b-app", 9080),
    (
        "ambient pod -> Service ClusterIP",
        "a-client",
        "service",
        80,
    ),
    (
        "plain pod -> ambient pod on node B",
        "a-plain",
        "b-app",
        9080,
    ),
    (
        "plain pod -> plain pod on node B",
        "a-plain",
        "b-plain",
        9080,
    ),
    (
        "node A -> local ambient pod (probe)",
        "nodeA",
        "a-app",
        9080,
    ),
];

/// Runs the demo against the lab `prefix` (which must be up) and returns the report.
pub fn run(prefix: &str) -> Result<String> {
    let bin = std::env::current_exe().context("own executable")?;
    let lab = Lab::attach(prefix, &bin)?;
    let with_ztunnel = lab.status().dataplane == "ztunnel";
    let listener = if with_ztunnel {
        None
    } else {
        Some(lab.tproxy_listen("a-ztunnel")?)
    };
    let logs = ["a-ztunnel", "b-ztunnel"].map(|z| lab.status().run_dir.join(format!("{z}.log")));
    let seen = logs
        .clone()
        .map(|l| std::fs::read_to_string(l).unwrap_or_default().len());

    let mut out = String::from("connection                             what answered\n");
    for (what, from, to, port) in CASES {
        let ip = match to {
            "service" => Ipv4Addr::new(10, 96, 0, 10),
            pod => lab.pod_ip(pod),
        };
        let line = lab
            .connect(from, ip, port)
            .unwrap_or_else(|e| format!("error: {e:#}"));
        let verdict = match TproxyRecord::parse_line(&line) {
            Some(r) => format!(
                "CAPTURED into ztunnel A :{} (original destination {}, peer {})",
                r.port, r.orig_dst, r.peer
            ),
            None => format!("the server answered: {line}"),
        };
        out += &format!("{what:<38} {from} -> {ip}:{port}\n{:<38} {verdict}\n", "");
    }
    std::thread::sleep(Duration::from_millis(100));
    if with_ztunnel {
        out += "\nztunnel access log (new lines):\n";
        for (log, from) in logs.iter().zip(seen) {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            for l in text.get(from..).unwrap_or("").lines() {
                if l.contains("connection complete") {
                    out += &format!("  {}\n", strip_ansi(l));
                }
            }
        }
    } else if let Some(l) = &listener {
        out += &format!(
            "\nztunnel A's test listener accepted {} connection(s).\n",
            l.records()?.len()
        );
    }
    out += &format!(
        "\nLook at the rules with:\n  ambient-lab exec --prefix {prefix} nodeA -- ip rule\n  \
         ambient-lab exec --prefix {prefix} nodeA -- nft list table inet ambient-node\n"
    );
    lab.detach();
    Ok(out)
}

/// Log lines carry terminal colours; the report should not.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}
