//! `ambient-lab explain <pod> <dst>`: one connection's path across the lab, stitched from the
//! answers of both nodes: `ambient-agent explain --json` run inside the source's node netns
//! (which asks its ztunnel's `/debug/route`), then, where ztunnel's decision or the
//! destination leads to the other node, the same on that node for the next leg (ztunnel's
//! HBONE connection to `<pod>:15008`, or the uncaptured packet itself).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;

use ambient_net::netns;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::paths;
use crate::state::LabState;
use crate::status::{self, LabStatus, NodeStatus};

/// What to explain.
#[derive(Debug, Clone)]
pub struct ExplainOptions {
    pub prefix: String,
    /// A pod id (`a-client`) or a node (`nodeA`).
    pub from: String,
    /// `<pod id>:<port>` or `<ip>:<port>`.
    pub to: String,
    pub trace: bool,
}

/// One node's part of the path.
#[derive(Debug, Clone, Serialize)]
pub struct Leg {
    pub node: String,
    /// Why this leg: `source`, `HBONE from ztunnel A`, `the packet itself`.
    pub reason: String,
    /// `ambient-agent explain --json`'s answer.
    pub explanation: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabPath {
    pub from: String,
    pub to: SocketAddrV4,
    pub legs: Vec<Leg>,
}

/// `ambient-agent` as the lab started it.
fn agent_bin(prefix: &str) -> Result<PathBuf> {
    let recorded = LabState::load(prefix)?.and_then(|s| s.options.agent_bin);
    match recorded {
        Some(p) => Ok(p),
        None => paths::sibling_bin("ambient-agent"),
    }
}

fn resolve_to(st: &LabStatus, to: &str) -> Result<SocketAddrV4> {
    if let Ok(a) = to.parse::<SocketAddrV4>() {
        return Ok(a);
    }
    let (host, port) = to
        .rsplit_once(':')
        .with_context(|| format!("{to:?}: want <pod>:<port> or <ip>:<port>"))?;
    let port: u16 = port.parse().with_context(|| format!("{to:?}: bad port"))?;
    let ip = st
        .pod(host)
        .and_then(|p| p.ip)
        .with_context(|| format!("{host:?} is not a pod of the lab"))?;
    Ok(SocketAddrV4::new(ip, port))
}

/// The node holding `ip` (one of its pods).
fn node_of(st: &LabStatus, ip: Ipv4Addr) -> Option<&NodeStatus> {
    let pod = st.pods.iter().find(|p| p.ip == Some(ip))?;
    st.node(&pod.node)
}

/// Runs `ambient-agent explain --json` in `node`'s netns.
pub fn agent_explain(
    prefix: &str,
    node: &NodeStatus,
    from: &str,
    to: SocketAddrV4,
    trace: Option<PathBuf>,
) -> Result<Value> {
    let agent = node
        .agent
        .as_ref()
        .with_context(|| format!("node {} runs no agent", node.name))?;
    let mut cmd = Command::new(agent_bin(prefix)?);
    cmd.args(["explain", "--json", "--state-dir"])
        .arg(&agent.state_dir)
        .args(["--from", from, "--to", &to.to_string()]);
    if let Some(ns) = trace {
        cmd.arg("--trace");
        if ns.as_os_str() != "node" {
            cmd.arg("--source-netns").arg(ns);
        }
    }
    netns::command_in(&mut cmd, &netns::named_path(&node.netns))?;
    let out = cmd
        .output()
        .with_context(|| format!("run ambient-agent explain on node {}", node.name))?;
    if !out.status.success() {
        bail!(
            "ambient-agent explain on node {}: {}",
            node.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("ambient-agent explain --json output")
}

/// Both nodes' answers for one connection.
pub fn run(opts: &ExplainOptions) -> Result<LabPath> {
    paths::validate_prefix(&opts.prefix)?;
    let st = status::load(&opts.prefix)?;
    let to = resolve_to(&st, &opts.to)?;
    let (node, from, src_ip, netns) = match opts.from.strip_prefix("node") {
        Some(letter) => {
            let n = st
                .node(letter)
                .with_context(|| format!("no node {letter}"))?;
            (n, "node".to_string(), None, PathBuf::from("node"))
        }
        None => {
            let p = st
                .pod(&opts.from)
                .with_context(|| format!("{:?} is not a pod of the lab", opts.from))?;
            let ip = p.ip.with_context(|| format!("{} has no address", p.id))?;
            let n = st
                .node(&p.node)
                .with_context(|| format!("no node {}", p.node))?;
            (n, ip.to_string(), Some(ip), netns::named_path(&p.netns))
        }
    };
    let trace = opts.trace.then_some(netns);
    let first = agent_explain(&opts.prefix, node, &from, to, trace)?;
    let mut legs = vec![Leg {
        node: node.name.clone(),
        reason: "source".into(),
        explanation: first.clone(),
    }];
    // The next leg: where ztunnel sends it (HBONE to a pod's 15008), or the packet itself
    // when this node did not capture it and the destination is a pod of the other node.
    let zt_ip = st
        .ztunnels
        .iter()
        .find(|z| z.node == node.name)
        .and_then(|z| z.ip);
    let tunnel = first["ztunnel"]["route"]["tunnel"]
        .as_str()
        .and_then(|t| t.parse::<SocketAddrV4>().ok());
    let next = match (tunnel, zt_ip) {
        (Some(t), Some(z)) => Some((
            t,
            z.to_string(),
            format!("HBONE from ztunnel {}", node.name),
        )),
        _ if first["ztunnel"].is_null() => {
            src_ip.map(|s| (to, s.to_string(), "the packet itself".to_string()))
        }
        _ => None,
    };
    if let Some((dst, from2, reason)) = next {
        if let Some(n2) =
            node_of(&st, *dst.ip()).filter(|n| n.name != node.name || reason.starts_with("HBONE"))
        {
            let second = agent_explain(&opts.prefix, n2, &from2, dst, None)?;
            legs.push(Leg {
                node: n2.name.clone(),
                reason,
                explanation: second,
            });
        }
    }
    Ok(LabPath {
        from: opts.from.clone(),
        to,
        legs,
    })
}

/// The human form: each leg's steps, ztunnel's decision, the verdicts, the trace.
pub fn render(p: &LabPath) -> String {
    let mut s = format!("{} → {}\n", p.from, p.to);
    for leg in &p.legs {
        let e = &leg.explanation;
        s += &format!(
            "node {} ({}): {} → {}\n",
            leg.node,
            leg.reason,
            e["from"]["ip"].as_str().unwrap_or("?"),
            e["to"].as_str().unwrap_or("?")
        );
        for st in e["steps"].as_array().into_iter().flatten() {
            s += &format!(
                "  {:<8} {:<10} {}{}\n",
                st["netns"].as_str().unwrap_or(""),
                st["hop"].as_str().unwrap_or(""),
                st["what"].as_str().unwrap_or(""),
                if st["ok"].as_bool() == Some(false) {
                    "   <-- BROKEN"
                } else {
                    ""
                }
            );
            for d in st["drift"].as_array().into_iter().flatten() {
                s += &format!(
                    "           DRIFT {}: kernel has {}, the agent wants {}; {}\n",
                    d["subject"].as_str().unwrap_or(""),
                    d["kernel"].as_str().unwrap_or(""),
                    d["desired"].as_str().unwrap_or(""),
                    d["fix"].as_str().unwrap_or("")
                );
            }
        }
        let z = &e["ztunnel"];
        if !z.is_null() {
            s += &format!(
                "  {:<8} {:<10} {}\n",
                "ztunnel",
                "decision",
                decision_line(z)
            );
        }
        s += &format!("  path: {}\n", e["verdict"].as_str().unwrap_or("?"));
        let t = &e["trace"];
        if !t.is_null() {
            s += &format!(
                "  trace: probe {}:{} → {}\n",
                t["src"].as_str().unwrap_or("?"),
                t["sport"],
                t["connect"].as_str().unwrap_or("?")
            );
            for ns in ["node", "ztunnel"] {
                for h in t[ns].as_array().into_iter().flatten() {
                    s += &format!(
                        "    {ns:<8} {} {} {}: {} → {}, mark {}\n",
                        h["family"].as_str().unwrap_or(""),
                        h["table"].as_str().unwrap_or(""),
                        h["chain"].as_str().unwrap_or(""),
                        match (h["handle"].as_u64(), h["comment"].as_str()) {
                            (Some(n), Some(c)) => format!("rule handle {n} \"{c}\""),
                            (Some(n), None) => format!("rule handle {n}"),
                            // The chain's end: no rule matched.
                            (None, _) => "no rule matched".to_string(),
                        },
                        h["verdict"].as_str().unwrap_or(""),
                        h["mark"]
                            .as_u64()
                            .map_or("?".into(), |m| format!("{m:#05x}"))
                    );
                }
            }
        }
    }
    s
}

fn decision_line(z: &Value) -> String {
    if let Some(e) = z["error"].as_str() {
        return format!("no answer: {e}");
    }
    let mut s = z["decision"].as_str().unwrap_or("?").to_string();
    let r = &z["route"];
    for key in ["kind", "tunnel", "authority", "target"] {
        if let Some(v) = r[key].as_str() {
            s += &format!(" {key} {v}");
        }
    }
    let ids: Vec<&str> = r["expectedIdentities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !ids.is_empty() {
        s += &format!(", expects {}", ids.join(" or "));
    }
    if let Some(reason) = z["reason"].as_str() {
        s += &format!(" ({reason})");
    }
    s
}
