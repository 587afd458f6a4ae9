//! `ambient-lab explain <pod> <dst>`: one connection's path across the lab, stitched from the
//! answers of both nodes: `ambient-agent explain --json` run inside the source's node netns
//! (which asks its ztunnel's `/debug/route`), then, where ztunnel's decision or the
//! destination leads to another node, the same on that node for the next leg (ztunnel's
//! HBONE connection to `<pod>:15008` from the client's address, with the CONNECT's authority
//! so the destination ztunnel's `/debug/inbound` decision is asked too, or the uncaptured
//! packet itself). When ztunnel's decision is "to the waypoint", the waypoint's own
//! `/debug/route` decision for the request follows (its rule, backends, endpoints,
//! policies), then the hop from the waypoint to the chosen endpoint's node.
//!
//! With `--trace` and a next leg on another node, that node traces the connection arriving
//! (`ambient-agent explain --trace --trace-wait`) while the source node sends its probe, so
//! both nodes' rules are shown.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ambient_net::netns;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::http::{self, HttpRequest};
use crate::paths;
use crate::state::LabState;
use crate::status::{self, LabStatus, NodeStatus};

/// How long the destination node traces a probe arriving.
const TRACE_WAIT_SECS: u64 = 4;
const HBONE_PORT: u16 = ambient_net::consts::port::INBOUND_HBONE;

/// What to explain.
#[derive(Debug, Clone)]
pub struct ExplainOptions {
    pub prefix: String,
    /// A pod id (`a-client`) or a node (`nodeA`).
    pub from: String,
    /// `<pod id>:<port>`, `<ip>:<port>` or `[<ipv6>]:<port>`.
    pub to: String,
    pub trace: bool,
}

/// One node's part of the path.
#[derive(Debug, Clone, Serialize)]
pub struct Leg {
    pub node: String,
    /// Why this leg: `source`, `HBONE from ztunnel A`, `the packet itself`,
    /// `HBONE from the waypoint`.
    pub reason: String,
    /// `ambient-agent explain --json`'s answer.
    pub explanation: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabPath {
    pub from: String,
    pub to: SocketAddr,
    pub legs: Vec<Leg>,
    /// The waypoint's `/debug/route` answer, when ztunnel sent the connection to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<Value>,
}

/// `ambient-agent` as the lab started it.
fn agent_bin(prefix: &str) -> Result<PathBuf> {
    let recorded = LabState::load(prefix)?.and_then(|s| s.options.agent_bin);
    match recorded {
        Some(p) => Ok(p),
        None => paths::sibling_bin("ambient-agent"),
    }
}

fn resolve_to(st: &LabStatus, to: &str) -> Result<SocketAddr> {
    if let Ok(a) = to.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = to
        .rsplit_once(':')
        .with_context(|| format!("{to:?}: want <pod>:<port> or <ip>:<port>"))?;
    let port: u16 = port.parse().with_context(|| format!("{to:?}: bad port"))?;
    let pod = st
        .pod(host)
        .with_context(|| format!("{host:?} is not a pod of the lab"))?;
    // The pod's IPv4 address; its IPv6 one in an IPv6-only lab.
    let ip: IpAddr = match (pod.ip, pod.ip6) {
        (Some(a), _) => a.into(),
        (None, Some(a)) => a.into(),
        (None, None) => bail!("{host} has no address"),
    };
    Ok(SocketAddr::new(ip, port))
}

/// The node holding `ip` (one of its pods, any family).
fn node_of(st: &LabStatus, ip: IpAddr) -> Option<&NodeStatus> {
    let pod = st.pods.iter().find(|p| {
        p.ips.contains(&ip) || p.ip.map(IpAddr::V4) == Some(ip) || p.ip6.map(IpAddr::V6) == Some(ip)
    })?;
    st.node(&pod.node)
}

/// The `ambient-agent explain --json` command for `node`, inside its netns.
fn agent_command(
    prefix: &str,
    node: &NodeStatus,
    from: &str,
    to: SocketAddr,
    authority: Option<SocketAddr>,
) -> Result<Command> {
    let agent = node
        .agent
        .as_ref()
        .with_context(|| format!("node {} runs no agent", node.name))?;
    let mut cmd = Command::new(agent_bin(prefix)?);
    cmd.args(["explain", "--json", "--state-dir"])
        .arg(&agent.state_dir)
        .args(["--from", from, "--to", &to.to_string()]);
    if let Some(a) = authority {
        cmd.args(["--authority", &a.to_string()]);
    }
    netns::command_in(&mut cmd, &netns::named_path(&node.netns))?;
    Ok(cmd)
}

fn parse_output(node: &NodeStatus, ok: bool, stdout: &[u8], stderr: &[u8]) -> Result<Value> {
    if !ok {
        bail!(
            "ambient-agent explain on node {}: {}",
            node.name,
            String::from_utf8_lossy(stderr).trim()
        );
    }
    serde_json::from_slice(stdout).context("ambient-agent explain --json output")
}

/// Runs `ambient-agent explain --json` in `node`'s netns.
pub fn agent_explain(
    prefix: &str,
    node: &NodeStatus,
    from: &str,
    to: SocketAddr,
    trace: Option<PathBuf>,
) -> Result<Value> {
    agent_explain_hbone(prefix, node, from, to, None, trace)
}

/// [`agent_explain`] with the CONNECT's authority of an HBONE connection to `to`.
pub fn agent_explain_hbone(
    prefix: &str,
    node: &NodeStatus,
    from: &str,
    to: SocketAddr,
    authority: Option<SocketAddr>,
    trace: Option<PathBuf>,
) -> Result<Value> {
    let mut cmd = agent_command(prefix, node, from, to, authority)?;
    if let Some(ns) = trace {
        cmd.arg("--trace");
        if ns.as_os_str() != "node" {
            cmd.arg("--source-netns").arg(ns);
        }
    }
    let out = cmd
        .output()
        .with_context(|| format!("run ambient-agent explain on node {}", node.name))?;
    parse_output(node, out.status.success(), &out.stdout, &out.stderr)
}

/// The destination node tracing a connection as it arrives, until [`Arriving::wait`].
struct Arriving {
    child: Child,
    node: NodeStatus,
}

impl Arriving {
    /// Starts the tracer and waits until its trace tables are set (`tracing` on stderr).
    fn start(
        prefix: &str,
        node: &NodeStatus,
        from: &str,
        to: SocketAddr,
        authority: Option<SocketAddr>,
    ) -> Result<Arriving> {
        let mut cmd = agent_command(prefix, node, from, to, authority)?;
        cmd.args(["--trace", "--trace-wait", &TRACE_WAIT_SECS.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("start the arriving-trace explain")?;
        let stderr = child.stderr.take().context("its stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        // Bounded: the tracer exits by itself after TRACE_WAIT_SECS at most.
        let ready = lines.by_ref().map_while(|l| l.ok()).any(|l| l == "tracing");
        if !ready {
            let _ = child.wait();
            bail!(
                "ambient-agent explain --trace-wait on node {} did not start tracing",
                node.name
            );
        }
        Ok(Arriving {
            child,
            node: node.clone(),
        })
    }

    fn wait(mut self) -> Result<Value> {
        let mut out = Vec::new();
        if let Some(mut o) = self.child.stdout.take() {
            o.read_to_end(&mut out)?;
        }
        let status = self.child.wait()?;
        parse_output(&self.node, status.success(), &out, b"(see its stderr)")
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        // Only when not waited for: an early error on the source side.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The waypoint's `/debug/route` decision for `src` → `dst` (GET `req.path` by default).
pub fn waypoint_decision(
    st: &LabStatus,
    src: IpAddr,
    dst: SocketAddr,
    req: &HttpRequest,
) -> Result<Value> {
    let wp = st.waypoint.as_ref().context("the lab has no waypoint")?;
    let admin: SocketAddr = wp
        .admin_addr
        .parse()
        .with_context(|| format!("waypoint admin address {:?}", wp.admin_addr))?;
    // Everything but letters and digits percent-encoded (addresses, paths, header values).
    let pct = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let mut q = format!(
        "/debug/route?src={}&dst={}&method={}&path={}",
        pct(&src.to_string()),
        pct(&dst.to_string()),
        pct(&req.method),
        pct(&req.path)
    );
    for (n, v) in &req.headers {
        q += &format!("&header={}", pct(&format!("{n}:{v}")));
    }
    let get = HttpRequest::get(&q);
    let resp = netns::run_in(&netns::named_path(&wp.netns), || {
        http::http1(admin, std::slice::from_ref(&get), Duration::from_secs(3))
    })??;
    let r = resp
        .first()
        .context("no answer from the waypoint's admin port")?;
    if r.status != 200 {
        bail!(
            "waypoint /debug/route: HTTP {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body).trim()
        );
    }
    serde_json::from_slice(&r.body).context("the waypoint's /debug/route answer")
}

/// The endpoint the waypoint's decision most often picks: the largest share of the largest
/// backend.
fn likely_endpoint(wp: &Value) -> Option<(SocketAddr, bool)> {
    let share = |v: &Value| v["share"].as_f64().unwrap_or(0.0);
    let b = wp["route"]["backends"]
        .as_array()?
        .iter()
        .max_by(|a, b| share(a).total_cmp(&share(b)))?;
    let e = b["endpoints"]
        .as_array()?
        .iter()
        .max_by(|a, b| share(a).total_cmp(&share(b)))?;
    Some((e["target"].as_str()?.parse().ok()?, e["hbone"] == true))
}

/// Both nodes' answers for one connection (an HTTP `GET /` where the waypoint is asked).
pub fn run(opts: &ExplainOptions) -> Result<LabPath> {
    run_http(opts, &HttpRequest::get("/"))
}

/// [`run`] with the HTTP request the waypoint's routing decision is asked for.
pub fn run_http(opts: &ExplainOptions, req: &HttpRequest) -> Result<LabPath> {
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
            // The source's address of the destination's family.
            let ip = p
                .ips
                .iter()
                .copied()
                .chain(p.ip.map(IpAddr::V4))
                .chain(p.ip6.map(IpAddr::V6))
                .find(|a| a.is_ipv4() == to.is_ipv4())
                .with_context(|| format!("{} has no address of {to}'s family", p.id))?;
            let n = st
                .node(&p.node)
                .with_context(|| format!("no node {}", p.node))?;
            (n, ip.to_string(), Some(ip), netns::named_path(&p.netns))
        }
    };
    // The path first (without a probe): it says where the next leg is.
    let mut first = agent_explain(&opts.prefix, node, &from, to, None)?;
    // The next leg: where ztunnel sends it (HBONE to a pod's or the waypoint's 15008, from
    // the client's address), or the packet itself when this node did not capture it and the
    // destination is a pod of another node.
    let z = &first["ztunnel"];
    let tunnel = z["route"]["tunnel"]
        .as_str()
        .and_then(|t| t.parse::<SocketAddr>().ok());
    let authority = z["route"]["authority"]
        .as_str()
        .and_then(|t| t.parse::<SocketAddr>().ok());
    let to_waypoint = z["decision"] == "to the waypoint";
    let next = match (tunnel, src_ip) {
        (Some(t), Some(s)) => Some((
            t,
            s.to_string(),
            authority,
            format!("HBONE from ztunnel {}", node.name),
        )),
        _ if z.is_null() => src_ip.map(|s| (to, s.to_string(), None, "the packet itself".into())),
        _ => None,
    };
    let n2 = next.as_ref().and_then(|(dst, _, _, reason)| {
        node_of(&st, dst.ip()).filter(|n| n.name != node.name || reason.starts_with("HBONE"))
    });
    let mut legs = Vec::new();
    let mut second = None;
    if let (Some((dst, from2, auth, reason)), Some(n2)) = (&next, n2) {
        // --trace: the next node traces the connection arriving while this one probes.
        let arriving = match opts.trace && n2.name != node.name {
            true => Some(Arriving::start(&opts.prefix, n2, from2, *dst, *auth)?),
            false => None,
        };
        if opts.trace {
            first = agent_explain(&opts.prefix, node, &from, to, Some(netns.clone()))?;
        }
        let e = match arriving {
            Some(a) => a.wait()?,
            None => agent_explain_hbone(&opts.prefix, n2, from2, *dst, *auth, None)?,
        };
        second = Some(Leg {
            node: n2.name.clone(),
            reason: reason.clone(),
            explanation: e,
        });
    } else if opts.trace {
        first = agent_explain(&opts.prefix, node, &from, to, Some(netns))?;
    }
    legs.push(Leg {
        node: node.name.clone(),
        reason: "source".into(),
        explanation: first,
    });
    legs.extend(second);
    // The waypoint: its decision for the request, then its HBONE hop to the endpoint.
    let mut waypoint = None;
    if let (true, Some(src), Some(wp)) = (to_waypoint, src_ip, st.waypoint.as_ref()) {
        let d = waypoint_decision(&st, src, authority.unwrap_or(to), req)?;
        if let (Some((ep, true)), "allowed") =
            (likely_endpoint(&d), d["decision"].as_str().unwrap_or(""))
        {
            let hop = SocketAddr::new(ep.ip(), HBONE_PORT);
            // The waypoint's own node first, when the endpoint is on another one: its HBONE
            // connection leaves by the underlay.
            if let Some(nw) = st
                .node(&wp.node)
                .filter(|n| node_of(&st, ep.ip()).is_some_and(|e| e.name != n.name))
            {
                let e = agent_explain(&opts.prefix, nw, &wp.ip.to_string(), hop, None)?;
                legs.push(Leg {
                    node: nw.name.clone(),
                    reason: format!("HBONE from the waypoint to {ep}, leaving its node"),
                    explanation: e,
                });
            }
            if let Some(n3) = node_of(&st, ep.ip()) {
                let e =
                    agent_explain_hbone(&opts.prefix, n3, &wp.ip.to_string(), hop, Some(ep), None)?;
                legs.push(Leg {
                    node: n3.name.clone(),
                    reason: format!("HBONE from the waypoint to {ep}"),
                    explanation: e,
                });
            }
        }
        waypoint = Some(d);
    }
    Ok(LabPath {
        from: opts.from.clone(),
        to,
        legs,
        waypoint,
    })
}

/// The human form: each leg's steps, ztunnel's decision, the verdicts, the trace.
pub fn render(p: &LabPath) -> String {
    let mut s = format!("{} → {}\n", p.from, p.to);
    let onward = p
        .legs
        .iter()
        .position(|l| l.reason.starts_with("HBONE from the waypoint"));
    for (i, leg) in p.legs.iter().enumerate() {
        // The waypoint's decision sits between ztunnel's hop to it and its hop onward.
        if Some(i) == onward {
            if let Some(w) = &p.waypoint {
                s += &waypoint_lines(w);
            }
        }
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
                "  trace: {} {}:{} → {}\n",
                if i == 0 { "probe" } else { "arriving" },
                t["src"].as_str().unwrap_or("?"),
                t["sport"],
                t["connect"].as_str().unwrap_or("?")
            );
            if let Some(n) = t["note"].as_str() {
                s += &format!("    note: {n}\n");
            }
            for ns in ["node", "ztunnel"] {
                for h in t[ns].as_array().into_iter().flatten() {
                    s += &format!("    {ns:<8} {}\n", h["text"].as_str().unwrap_or("?"));
                }
            }
        }
    }
    if let (Some(w), None) = (&p.waypoint, onward) {
        s += &waypoint_lines(w);
    }
    s
}

/// The waypoint's decision: verdict, the rule, backends with weights, endpoints, policies.
fn waypoint_lines(w: &Value) -> String {
    let mut s = format!(
        "waypoint {}: {} {}{} → {}\n",
        w["waypoint"].as_str().unwrap_or("?"),
        w["request"]["method"].as_str().unwrap_or("?"),
        w["request"]["path"].as_str().unwrap_or("?"),
        w["request"]["query"]
            .as_str()
            .map(|q| format!("?{q}"))
            .unwrap_or_default(),
        w["decision"].as_str().unwrap_or("?")
    );
    if let Some(r) = w["reason"].as_str() {
        s += &format!("  reason: {r}\n");
    }
    for p in w["policies"].as_array().into_iter().flatten() {
        s += &format!(
            "  policy   {} {}{}\n",
            p["action"].as_str().unwrap_or("?"),
            p["policy"].as_str().unwrap_or("?"),
            if p["matches"] == true {
                " (matches)"
            } else {
                ""
            }
        );
    }
    let r = &w["route"];
    if !r.is_null() {
        s += &format!(
            "  route    {}\n",
            r["rule"]
                .as_str()
                .map(|x| format!("rule {x}"))
                .or_else(|| r["default"].as_str().map(str::to_string))
                .unwrap_or_default()
        );
        for b in r["backends"].as_array().into_iter().flatten() {
            let eps: Vec<String> = b["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    format!(
                        "{} on {} {:.0}%",
                        e["target"].as_str().unwrap_or("?"),
                        e["node"].as_str().unwrap_or("?"),
                        e["share"].as_f64().unwrap_or(0.0) * 100.0
                    )
                })
                .collect();
            s += &format!(
                "  backend  {}:{} weight {} ({:.0}%): {}\n",
                b["service"].as_str().unwrap_or("?"),
                b["port"],
                b["weight"],
                b["share"].as_f64().unwrap_or(0.0) * 100.0,
                eps.join(", ")
            );
        }
    }
    s
}

fn decision_line(z: &Value) -> String {
    if let Some(e) = z["error"].as_str() {
        return format!("no answer: {e}");
    }
    if z["direction"] == "inbound" {
        let mut s = format!(
            "{} inbound on {}",
            z["decision"].as_str().unwrap_or("?"),
            z["listener"]
        );
        for (key, name) in [
            ("authority", "CONNECT"),
            ("servedIdentity", "presents"),
            ("expectedPeerIdentity", "expects peer"),
        ] {
            if let Some(v) = z[key].as_str() {
                s += &format!(" {name} {v}");
            }
        }
        if let (Some(ns), Some(n)) = (
            z["destination"]["namespace"].as_str(),
            z["destination"]["name"].as_str(),
        ) {
            s += &format!(" to {ns}/{n}");
        }
        let pols: Vec<&str> = z["policies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["policy"].as_str())
            .collect();
        if !pols.is_empty() {
            s += &format!(", policies {}", pols.join(", "));
        }
        if let Some(reason) = z["reason"].as_str() {
            s += &format!(" ({reason})");
        }
        return s;
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
