//! `ambient-lab demo`: on a lab that is up, make a few connections and show what the node
//! did with each. With the ztunnel data plane: what the server saw and the access-log lines
//! of both ztunnels; with `--dataplane none`: a transparent test listener in node A's
//! ztunnel netns shows which connections were captured and with which original destination.
//! When the waypoint runs: a few HTTP requests from a-client to the reviews Service, which
//! ztunnel sends through the waypoint (which version answered, the peer the server saw).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::harness::Lab;
use crate::http::HttpRequest;
use crate::tproxy::TproxyRecord;
use crate::{service, waypoint, ztunnel};

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
    out += &http_demo(&lab);
    out += &format!(
        "\nLook at the rules with:\n  ambient-lab exec --prefix {prefix} nodeA -- ip rule\n  \
         ambient-lab exec --prefix {prefix} nodeA -- nft list table inet ambient-node\n"
    );
    lab.detach();
    Ok(out)
}

/// HTTP through the waypoint, when it runs.
fn http_demo(lab: &Lab) -> String {
    let Some(wp) = lab.status().waypoint.clone() else {
        return String::new();
    };
    if !wp.running {
        return format!(
            "\nThe waypoint is not running ({}): no HTTP requests through it.\n",
            wp.not_started.as_deref().unwrap_or("its process exited")
        );
    }
    let seen = lab.waypoint_log().len();
    let addr = SocketAddr::from((service::REVIEWS_IP, service::SERVICE_PORT));
    let host = ztunnel::hostname(service::REVIEWS, service::SERVICE_NAMESPACE);
    let mut reqs: Vec<HttpRequest> = (0..4)
        .map(|i| HttpRequest::get(&format!("/demo?n={i}")).authority(&host))
        .collect();
    reqs.push(
        HttpRequest::get("/demo?n=4")
            .authority(&host)
            .header("x-version", "v2"),
    );
    let mut out = format!(
        "\nHTTP/1.1, one keep-alive connection, a-client -> http://{addr}/ (demo/reviews, \
         through the waypoint {} at {}):\n",
        wp.pod, wp.ip
    );
    match lab.http1("a-client", addr, &reqs) {
        Ok(resps) => {
            for (req, resp) in reqs.iter().zip(resps) {
                let what = match resp.echo() {
                    Ok(e) => format!(
                        "{} {} from {} (the server saw peer {})",
                        resp.status, e.version, e.pod, e.peer
                    ),
                    Err(_) => format!("{} {}", resp.status, resp.text().trim()),
                };
                let v2 = if req.headers.iter().any(|(k, _)| k == "x-version") {
                    " [x-version: v2]"
                } else {
                    ""
                };
                out += &format!("  GET {}{v2:<16} -> {what}\n", req.path);
            }
        }
        Err(e) => out += &format!("  error: {e:#}\n"),
    }
    std::thread::sleep(Duration::from_millis(100));
    let log = lab.waypoint_log();
    let lines = waypoint::access_lines(log.get(seen..).unwrap_or(""));
    if !lines.is_empty() {
        out += "waypoint access log (new lines):\n";
        for l in lines {
            out += &format!("  {}\n", strip_ansi(&l));
        }
    }
    out
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
