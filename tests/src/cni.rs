//! The CNI driver: builds the libcni client (`tests/cniclient`), renders each node's
//! conflist and runs ADD/DEL through the client inside the node netns, so the node is the
//! plugins' host and the pod netns is CNI_NETNS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use ambient_net::netns;
use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::paths;
use crate::procs;
use crate::state::{NodeState, PodState};
use crate::topology::{IpFamily, NodePlan, POD_PREFIX_LEN, POD_PREFIX_LEN6};

/// The network name (and conflist `name`).
pub const NETWORK: &str = "ambient";
pub const CNI_VERSION: &str = "1.0.0";
/// Debian's reference plugins.
pub const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// The bridge of `--primary bridge`.
pub const BRIDGE_NAME: &str = "cni0";
pub const POD_MTU: u32 = 1500;
const CNI_TIMEOUT: Duration = Duration::from_secs(60);
const GO_BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The primary (interface-creating) plugin of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Primary {
    Ptp,
    Bridge,
}

impl Primary {
    pub fn as_str(self) -> &'static str {
        match self {
            Primary::Ptp => "ptp",
            Primary::Bridge => "bridge",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ptp" => Ok(Primary::Ptp),
            "bridge" => Ok(Primary::Bridge),
            _ => bail!("unknown primary CNI {s:?}"),
        }
    }
}

/// The `ambient-cni` entry of the chain.
#[derive(Debug, Clone)]
pub struct AmbientCniConf {
    pub agent_socket: PathBuf,
    pub log_file: PathBuf,
}

/// The conflist of one node. host-local gets one range set per family (v4 first: the
/// primary), so a dual-stack pod gets one address of each; the v6 gateway is `::1` of the
/// node's /64. ptp puts each gateway on the pod's host veth (`/32`, `/128`), bridge with
/// `isGateway` on the bridge (with the range's prefix), for both families alike.
pub fn conflist(
    primary: Primary,
    node: &NodePlan,
    family: IpFamily,
    ipam_data_dir: &Path,
    ambient: Option<&AmbientCniConf>,
) -> Value {
    let mut ranges = Vec::new();
    let mut routes = Vec::new();
    if family.has_v4() {
        ranges.push(json!([{"subnet": node.pod_cidr(), "gateway": node.gateway.to_string()}]));
        routes.push(json!({"dst": "0.0.0.0/0"}));
    }
    if family.has_v6() {
        ranges.push(json!([{"subnet": node.pod_cidr6(), "gateway": node.gateway6.to_string()}]));
        routes.push(json!({"dst": "::/0"}));
    }
    let ipam = json!({
        "type": "host-local",
        "ranges": ranges,
        "routes": routes,
        "dataDir": ipam_data_dir,
    });
    let main = match primary {
        Primary::Ptp => json!({
            "type": "ptp",
            "ipMasq": false,
            "mtu": POD_MTU,
            "ipam": ipam,
        }),
        Primary::Bridge => json!({
            "type": "bridge",
            "bridge": BRIDGE_NAME,
            "isGateway": true,
            "ipMasq": false,
            "mtu": POD_MTU,
            "ipam": ipam,
        }),
    };
    let mut plugins = vec![main];
    if let Some(a) = ambient {
        plugins.push(json!({
            "type": "ambient-cni",
            "agentSocket": a.agent_socket,
            "logFile": a.log_file,
        }));
    }
    json!({"cniVersion": CNI_VERSION, "name": NETWORK, "plugins": plugins})
}

/// Builds `target/lab/cniclient` from `tests/cniclient` when missing or older than its
/// source. Serialised by a lock file, since parallel labs may all want it.
pub fn ensure_client() -> Result<PathBuf> {
    let out_dir = paths::target_dir()?.join("lab");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let bin = out_dir.join("cniclient");
    let src_dir = paths::cniclient_source();
    let src = src_dir.join("main.go");
    let src_time =
        mtime(&src).with_context(|| format!("libcni client source {}", src.display()))?;
    if mtime(&bin).is_ok_and(|t| t >= src_time) {
        return Ok(bin);
    }
    let lock_path = out_dir.join("cniclient.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("lock {}: {e}", lock_path.display()))?;
    if mtime(&bin).is_ok_and(|t| t >= src_time) {
        return Ok(bin);
    }
    eprintln!("lab: building the libcni client {}", bin.display());
    let tmp = out_dir.join(format!("cniclient.tmp.{}", std::process::id()));
    let mut cmd = Command::new("go");
    cmd.arg("build")
        .arg("-o")
        .arg(&tmp)
        .arg(".")
        .current_dir(&src_dir)
        .env("GOPATH", "/usr/share/gocode")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", out_dir.join("gocache"));
    let out = procs::run_capture(&mut cmd, None, GO_BUILD_TIMEOUT)
        .context("go build of the libcni client (is golang-go installed?)")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "go build of {} failed ({}):\n{}",
            src_dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&tmp, &bin).with_context(|| format!("install {}", bin.display()))?;
    Ok(bin)
}

fn mtime(path: &Path) -> std::io::Result<SystemTime> {
    std::fs::metadata(path)?.modified()
}

/// A failure reported by the client: the CNI error code (0 when the failure was not a
/// plugin's CNI error) and its message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

/// Finds the client's `cni-error: {...}` line in its stderr.
pub fn parse_cni_error(stderr: &str) -> Option<CniError> {
    stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("cni-error: "))
        .and_then(|j| serde_json::from_str(j).ok())
}

/// CNI_ARGS for a pod, the way kubelet passes them.
pub fn cni_args(namespace: &str, name: &str, container_id: &str, uid: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"
    )
}

/// Runs one client command for `pod` inside its node's netns.
fn run_client(
    client: &Path,
    node: &NodeState,
    pod: &PodState,
    op: &str,
    netns_arg: &str,
) -> Result<std::process::Output> {
    let mut cmd = Command::new(client);
    cmd.arg(op)
        .arg(&node.cni.conf_dir)
        .arg(&node.cni.network)
        .arg(netns_arg)
        .arg(&pod.container_id)
        .arg(&pod.ifname)
        .env("CNI_PATH", &node.cni.cni_path)
        .env("CNI_CACHE_DIR", &node.cni.cache_dir)
        .env(
            "CNI_ARGS",
            cni_args(&pod.namespace, &pod.k8s_name, &pod.container_id, &pod.uid),
        );
    netns::command_in(&mut cmd, &netns::named_path(&node.netns))?;
    procs::run_capture(&mut cmd, None, CNI_TIMEOUT)
}

fn failure(op: &str, pod: &PodState, out: &std::process::Output) -> anyhow::Error {
    let stderr = String::from_utf8_lossy(&out.stderr);
    match parse_cni_error(&stderr) {
        Some(e) => anyhow!(
            "CNI {op} of pod {} failed: code {}: {}{}",
            pod.id,
            e.code,
            e.msg,
            if e.details.is_empty() {
                String::new()
            } else {
                format!(" ({})", e.details)
            }
        ),
        None => anyhow!(
            "CNI {op} of pod {} failed ({}): {}",
            pod.id,
            out.status,
            stderr.trim()
        ),
    }
}

/// CNI ADD: returns the chain's result.
pub fn add(client: &Path, node: &NodeState, pod: &PodState) -> Result<Value> {
    let path = netns::named_path(&pod.netns);
    let out = run_client(client, node, pod, "add", &path.to_string_lossy())?;
    if !out.status.success() {
        return Err(failure("ADD", pod, &out));
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "CNI ADD of pod {} printed no result JSON: {:?}",
            pod.id,
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// CNI DEL; without the pod netns when it is already gone.
pub fn del(client: &Path, node: &NodeState, pod: &PodState) -> Result<()> {
    let path = netns::named_path(&pod.netns);
    let netns_arg = if path.exists() {
        path.to_string_lossy().into_owned()
    } else {
        "-".to_string()
    };
    let out = run_client(client, node, pod, "del", &netns_arg)?;
    if !out.status.success() {
        return Err(failure("DEL", pod, &out));
    }
    Ok(())
}

/// What the lab needs from an ADD result of an IPv4 pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub ip: Ipv4Addr,
    /// The pod's veth end in the node (a host-side interface that is not the bridge).
    pub host_veth: Option<String>,
}

/// An ADD result's addresses of both families.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddAddresses {
    /// Every address in the result's order (host-local's range sets: v4 first in dual).
    pub ips: Vec<IpAddr>,
    pub host_veth: Option<String>,
}

impl AddAddresses {
    pub fn v4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    pub fn v6(&self) -> Option<Ipv6Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    }
}

/// The IPv4 address and host veth of an ADD result; an error without a v4 address.
pub fn parse_result(result: &Value) -> Result<AddResult> {
    let all = parse_addresses(result)?;
    Ok(AddResult {
        ip: all.v4().context("CNI result has no IPv4 address")?,
        host_veth: all.host_veth,
    })
}

/// Every address of an ADD result (`ips[].address`, prefix dropped) and the host veth; an
/// error when it has none.
pub fn parse_addresses(result: &Value) -> Result<AddAddresses> {
    let ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse::<IpAddr>().ok())
        .collect();
    if ips.is_empty() {
        bail!("CNI result has no IP address");
    }
    let host_veth = result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["sandbox"].as_str().unwrap_or("").is_empty())
        .filter_map(|i| i["name"].as_str())
        .rfind(|n| *n != BRIDGE_NAME)
        .map(str::to_string);
    Ok(AddAddresses { ips, host_veth })
}

/// True when `ip` lies in `node`'s pod CIDR.
pub fn in_pod_cidr(node: &NodePlan, ip: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - POD_PREFIX_LEN);
    u32::from(ip) & mask == u32::from(node.pod_net) & mask
}

/// True when `ip` lies in `node`'s v6 pod CIDR.
pub fn in_pod_cidr6(node: &NodePlan, ip: Ipv6Addr) -> bool {
    let mask = u128::MAX << (128 - POD_PREFIX_LEN6);
    u128::from(ip) & mask == u128::from(node.pod_net6) & mask
}

/// Checks an ADD result against the plan: exactly one address per family of the lab, each
/// in the node's pod CIDR of its family.
pub fn check_addresses(node: &NodePlan, family: IpFamily, got: &AddAddresses) -> Result<()> {
    let v4: Vec<Ipv4Addr> = got
        .ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<Ipv6Addr> = got
        .ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
        .collect();
    let want = |has: bool| usize::from(has);
    if v4.len() != want(family.has_v4()) || v6.len() != want(family.has_v6()) {
        bail!(
            "expected {} v4 and {} v6 address(es) for --ip-family {}, got {:?}",
            want(family.has_v4()),
            want(family.has_v6()),
            family.as_str(),
            got.ips
        );
    }
    if let Some(ip) = v4.iter().find(|ip| !in_pod_cidr(node, **ip)) {
        bail!("{ip} is outside {}", node.pod_cidr());
    }
    if let Some(ip) = v6.iter().find(|ip| !in_pod_cidr6(node, **ip)) {
        bail!("{ip} is outside {}", node.pod_cidr6());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::NODES;

    #[test]
    fn ptp_conflist_with_ambient() {
        let a = AmbientCniConf {
            agent_socket: "/run/x/agent.sock".into(),
            log_file: "/run/x/nodeA-cni.log".into(),
        };
        let c = conflist(
            Primary::Ptp,
            &NODES[0],
            IpFamily::Ipv4,
            Path::new("/run/x/ipam"),
            Some(&a),
        );
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["name"], "ambient");
        assert_eq!(c["plugins"][0]["type"], "ptp");
        assert_eq!(c["plugins"][0]["ipMasq"], false);
        assert_eq!(c["plugins"][0]["mtu"], 1500);
        assert_eq!(
            c["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.1.0/24"
        );
        assert_eq!(c["plugins"][1]["type"], "ambient-cni");
        assert_eq!(c["plugins"][1]["agentSocket"], "/run/x/agent.sock");
        assert_eq!(
            c["plugins"][0]["ipam"]["ranges"].as_array().unwrap().len(),
            1
        );
        assert_eq!(
            c["plugins"][0]["ipam"]["routes"],
            json!([{"dst": "0.0.0.0/0"}])
        );
        let plain = conflist(
            Primary::Bridge,
            &NODES[1],
            IpFamily::Ipv4,
            Path::new("/i"),
            None,
        );
        assert_eq!(plain["plugins"].as_array().unwrap().len(), 1);
        assert_eq!(plain["plugins"][0]["bridge"], "cni0");
        assert_eq!(plain["plugins"][0]["isGateway"], true);
    }

    #[test]
    fn v6_and_dual_conflists() {
        let dual = conflist(
            Primary::Bridge,
            &NODES[1],
            IpFamily::Dual,
            Path::new("/i"),
            None,
        );
        let ipam = &dual["plugins"][0]["ipam"];
        assert_eq!(
            ipam["ranges"],
            json!([
                [{"subnet": "10.244.2.0/24", "gateway": "10.244.2.1"}],
                [{"subnet": "fd00:10:244:2::/64", "gateway": "fd00:10:244:2::1"}]
            ])
        );
        assert_eq!(
            ipam["routes"],
            json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])
        );
        let v6 = conflist(
            Primary::Ptp,
            &NODES[0],
            IpFamily::Ipv6,
            Path::new("/i"),
            None,
        );
        assert_eq!(
            v6["plugins"][0]["ipam"]["ranges"],
            json!([[{"subnet": "fd00:10:244:1::/64", "gateway": "fd00:10:244:1::1"}]])
        );
        assert_eq!(v6["plugins"][0]["ipam"]["routes"], json!([{"dst": "::/0"}]));
    }

    #[test]
    fn dual_results() {
        let r = json!({"interfaces":[{"name":"vethq"},{"name":"eth0","sandbox":"/p"}],"ips":[
            {"address":"10.244.1.3/24","gateway":"10.244.1.1"},
            {"address":"fd00:10:244:1::3/64","gateway":"fd00:10:244:1::1"}]});
        let a = parse_addresses(&r).unwrap();
        assert_eq!(a.v4(), Some(Ipv4Addr::new(10, 244, 1, 3)));
        assert_eq!(a.v6(), Some("fd00:10:244:1::3".parse().unwrap()));
        assert_eq!(a.ips.len(), 2);
        check_addresses(&NODES[0], IpFamily::Dual, &a).unwrap();
        assert!(check_addresses(&NODES[0], IpFamily::Ipv4, &a).is_err());
        assert!(check_addresses(&NODES[1], IpFamily::Dual, &a).is_err());
        let v6 = json!({"ips":[{"address":"fd00:10:244:2::5/64"}]});
        let a = parse_addresses(&v6).unwrap();
        check_addresses(&NODES[1], IpFamily::Ipv6, &a).unwrap();
        assert!(parse_result(&v6).is_err());
        assert!(!in_pod_cidr6(
            &NODES[0],
            "fd00:10:244:2::5".parse().unwrap()
        ));
    }

    #[test]
    fn results() {
        let ptp = json!({"cniVersion":"1.0.0","interfaces":[{"name":"veth1a2b","mac":"x"},{"name":"eth0","mac":"y","sandbox":"/run/netns/p"}],"ips":[{"interface":1,"address":"10.244.1.3/24","gateway":"10.244.1.1"}]});
        let r = parse_result(&ptp).unwrap();
        assert_eq!(r.ip, Ipv4Addr::new(10, 244, 1, 3));
        assert_eq!(r.host_veth.as_deref(), Some("veth1a2b"));
        let bridge = json!({"interfaces":[{"name":"cni0"},{"name":"vethz"},{"name":"eth0","sandbox":"/p"}],"ips":[{"address":"10.244.2.4/24"}]});
        assert_eq!(
            parse_result(&bridge).unwrap().host_veth.as_deref(),
            Some("vethz")
        );
        assert!(parse_result(&json!({"ips":[]})).is_err());
        assert!(in_pod_cidr(&NODES[1], Ipv4Addr::new(10, 244, 2, 4)));
        assert!(!in_pod_cidr(&NODES[0], Ipv4Addr::new(10, 244, 2, 4)));
    }

    #[test]
    fn client_errors() {
        let stderr = "cniclient add: plugin type=\"x\" failed (add): boom\ncni-error: {\"code\":7,\"msg\":\"boom\",\"details\":\"\"}\n";
        assert_eq!(
            parse_cni_error(stderr),
            Some(CniError {
                code: 7,
                msg: "boom".into(),
                details: String::new()
            })
        );
        assert_eq!(parse_cni_error("nothing"), None);
    }
}
