//! The integration tests' handle on a lab: `Lab::up` runs `ambient-lab up` and parses
//! `status --json`; `connect` talks from inside a pod; dropping the `Lab` runs `down`.
//!
//! ```no_run
//! use ambient_lab::{unique_prefix, Lab, LabOptions};
//! let lab = Lab::up(&unique_prefix("doc"), LabOptions::new("target/debug/ambient-lab").no_agent())
//!     .unwrap();
//! let app = lab.pod_ip("b-app");
//! let line = lab.connect("a-client", app, 9080).unwrap();
//! assert!(line.starts_with("server="));
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ambient_net::netns;
use anyhow::{bail, Context, Result};

use crate::cni;
use crate::http::{self, HttpRequest, HttpResponse};
use crate::paths;
use crate::procs;
use crate::state::{LabState, ProcessRecord};
use crate::status::{LabStatus, PodStatus, ServiceStatus, WaypointStatus};
use crate::tproxy::{self, TproxyRecord};
use crate::waypoint;

const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// How to bring a lab up.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The `ambient-lab` executable: `env!("CARGO_BIN_EXE_ambient-lab")` in integration tests.
    pub bin: PathBuf,
    pub no_agent: bool,
    pub primary: Option<String>,
    /// Anything else for `ambient-lab up`.
    pub extra_args: Vec<String>,
    /// Start the waypoint process (`up` without `--no-waypoint`). Off by default: the tests
    /// that need it say so with [`LabOptions::waypoint`], the others do not depend on the
    /// waypoint binary.
    pub waypoint: bool,
    /// `up --ip-family` (`ipv4`, `ipv6`, `dual`); none: the default, ipv4.
    pub ip_family: Option<String>,
}

impl LabOptions {
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            no_agent: false,
            primary: None,
            extra_args: Vec::new(),
            waypoint: false,
            ip_family: None,
        }
    }

    /// `up --ip-family <family>`: `ipv4`, `ipv6` or `dual`.
    pub fn ip_family(mut self, family: &str) -> Self {
        self.ip_family = Some(family.into());
        self
    }

    /// Runs the waypoint in `b-waypoint` (needs the `waypoint` binary next to ambient-lab,
    /// the agent and the ztunnel data plane).
    pub fn waypoint(mut self) -> Self {
        self.waypoint = true;
        self
    }

    pub fn no_agent(mut self) -> Self {
        self.no_agent = true;
        self
    }

    pub fn primary(mut self, primary: &str) -> Self {
        self.primary = Some(primary.into());
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }
}

/// A prefix unique to this test process and call: `<base><pid><n>`.
pub fn unique_prefix(base: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{base}{}{n}", std::process::id())
}

/// A running lab; `Drop` tears it down.
pub struct Lab {
    prefix: String,
    bin: PathBuf,
    status: LabStatus,
    /// stderr of `up` (its progress lines), for diagnostics.
    pub up_log: String,
    down_done: bool,
}

impl Lab {
    /// Runs `ambient-lab up --prefix <prefix> ...`. On failure the lab is torn down and
    /// the error carries `up`'s output.
    pub fn up(prefix: &str, opts: LabOptions) -> Result<Lab> {
        paths::validate_prefix(prefix)?;
        if paths::state_file(prefix).exists() {
            // A leftover of an earlier run of this very prefix.
            run_down(&opts.bin, prefix)?;
        }
        let mut cmd = Command::new(&opts.bin);
        cmd.args(["up", "--prefix", prefix]);
        if opts.no_agent {
            cmd.arg("--no-agent");
        }
        if let Some(p) = &opts.primary {
            cmd.args(["--primary", p]);
        }
        if let Some(f) = &opts.ip_family {
            cmd.args(["--ip-family", f]);
        }
        if !opts.waypoint {
            cmd.arg("--no-waypoint");
        }
        cmd.args(&opts.extra_args);
        let out = cmd
            .output()
            .with_context(|| format!("run {}", opts.bin.display()))?;
        let up_log = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            let _ = run_down(&opts.bin, prefix);
            bail!(
                "ambient-lab up --prefix {prefix} failed ({}):\n{up_log}",
                out.status
            );
        }
        let status = match read_status(&opts.bin, prefix) {
            Ok(s) => s,
            Err(e) => {
                let _ = run_down(&opts.bin, prefix);
                return Err(e);
            }
        };
        Ok(Lab {
            prefix: prefix.to_string(),
            bin: opts.bin,
            status,
            up_log,
            down_done: false,
        })
    }

    /// A handle on a lab that is already up (e.g. for `ambient-lab demo`); dropping it does
    /// not tear the lab down unless [`Lab::down`] is called.
    pub fn attach(prefix: &str, bin: &Path) -> Result<Lab> {
        let status = read_status(bin, prefix)
            .with_context(|| format!("lab {prefix} is not up (run `ambient-lab up` first)"))?;
        Ok(Lab {
            prefix: prefix.to_string(),
            bin: bin.to_path_buf(),
            status,
            up_log: String::new(),
            down_done: true,
        })
    }

    /// Leaves the lab up when this handle is dropped.
    pub fn detach(mut self) {
        self.down_done = true;
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The status parsed right after `up` (or the last [`Lab::refresh`]).
    pub fn status(&self) -> &LabStatus {
        &self.status
    }

    /// Re-reads `status --json`.
    pub fn refresh(&mut self) -> Result<&LabStatus> {
        self.status = read_status(&self.bin, &self.prefix)?;
        Ok(&self.status)
    }

    /// A pod by id (`a-app`, `b-client`, ...); panics when there is none.
    pub fn pod(&self, id: &str) -> &PodStatus {
        self.status
            .pod(id)
            .unwrap_or_else(|| panic!("lab {} has no pod {id}", self.prefix))
    }

    /// A pod's IP; panics when it has none.
    pub fn pod_ip(&self, id: &str) -> Ipv4Addr {
        self.pod(id)
            .ip
            .unwrap_or_else(|| panic!("pod {id} has no IP"))
    }

    /// A pod's IPv6 address (ipv6 and dual labs); panics when it has none.
    pub fn pod_ip6(&self, id: &str) -> Ipv6Addr {
        self.pod(id)
            .ip6
            .unwrap_or_else(|| panic!("pod {id} has no IPv6 address"))
    }

    /// Every address of a pod, the primary first (v4 then v6 in a dual lab).
    pub fn pod_ips(&self, id: &str) -> Vec<IpAddr> {
        self.pod(id).ips.clone()
    }

    /// A Service by name (`app`, `reviews`, ...); panics when there is none.
    pub fn service(&self, name: &str) -> &ServiceStatus {
        self.status
            .services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("lab {} has no service {name}", self.prefix))
    }

    /// The netns path of a pod id or node (`nodeA`).
    pub fn netns_path(&self, short: &str) -> PathBuf {
        netns::named_path(&paths::netns_name(&self.prefix, short))
    }

    /// Runs `f` on a thread inside the netns of `from` (a pod id or `nodeA`/`nodeB`).
    pub fn run_in<T: Send>(&self, from: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.netns_path(from);
        if !path.exists() {
            bail!("lab {} has no netns {from}", self.prefix);
        }
        Ok(netns::run_in(&path, f)?)
    }

    /// Opens a TCP connection from inside `from` and returns the first line received
    /// (without the newline).
    pub fn connect(&self, from: &str, ip: impl Into<IpAddr>, port: u16) -> Result<String> {
        let addr = SocketAddr::new(ip.into(), port);
        self.run_in(from, move || -> Result<String> {
            let stream = open(addr)?;
            let mut line = String::new();
            BufReader::new(stream)
                .read_line(&mut line)
                .with_context(|| format!("read from {addr}"))?;
            Ok(line.trim_end_matches('\n').to_string())
        })?
        .with_context(|| format!("connect from {from} to {addr}"))
    }

    /// Like [`Lab::connect`], then sends `payload`, half-closes and returns the first line
    /// and everything received after it (the test server echoes).
    pub fn exchange(
        &self,
        from: &str,
        ip: impl Into<IpAddr>,
        port: u16,
        payload: &[u8],
    ) -> Result<(String, Vec<u8>)> {
        let addr = SocketAddr::new(ip.into(), port);
        let payload = payload.to_vec();
        self.run_in(from, move || -> Result<(String, Vec<u8>)> {
            let stream = open(addr)?;
            let mut writer = stream.try_clone()?;
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let sender = std::thread::spawn(move || -> std::io::Result<()> {
                writer.write_all(&payload)?;
                writer.shutdown(std::net::Shutdown::Write)
            });
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest)?;
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("sender panicked"))??;
            Ok((line.trim_end_matches('\n').to_string(), rest))
        })?
        .with_context(|| format!("exchange from {from} with {addr}"))
    }

    /// Runs a command inside a lab netns (a pod id or `nodeA`) and returns its output.
    pub fn exec(&self, short: &str, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().context("empty command")?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        netns::command_in(&mut cmd, &self.netns_path(short))?;
        cmd.output()
            .with_context(|| format!("run {program} in {short}"))
    }

    /// Runs the lab's libcni client inside `node`'s netns (`A`/`B`) with that node's
    /// CNI_PATH and cache dir: `args` are what follows the command name, e.g.
    /// `["check", <conf dir>, "ambient", <netns>, <container id>, "eth0"]`.
    pub fn cniclient(&self, node: &str, args: &[&str], cni_args: &str) -> Result<Output> {
        let n = self
            .status
            .node(node)
            .with_context(|| format!("no node {node}"))?;
        let client = self.status.cniclient.as_ref().context("no cniclient")?;
        let mut cmd = Command::new(client);
        cmd.args(args)
            .env("CNI_PATH", &n.cni_path)
            .env("CNI_CACHE_DIR", &n.cni_cache_dir)
            .env("CNI_ARGS", cni_args);
        netns::command_in(&mut cmd, &netns::named_path(&n.netns))?;
        cmd.output().context("run cniclient")
    }

    /// `cniclient <op>` (add, check, del) for a lab pod with its own identity and netns.
    pub fn cni(&self, op: &str, pod_id: &str) -> Result<Output> {
        let pod = self.pod(pod_id).clone();
        let node = self.status.node(&pod.node).context("pod's node")?.clone();
        let netns = netns::named_path(&pod.netns);
        let netns = if netns.exists() {
            netns.display().to_string()
        } else {
            "-".into()
        };
        let cni_args = cni::cni_args(&pod.namespace, &pod.k8s_name, &pod.container_id, &pod.uid);
        let conf_dir = node.cni_conf_dir.display().to_string();
        self.cniclient(
            &pod.node,
            &[
                op,
                &conf_dir,
                &node.cni_network,
                &netns,
                &pod.container_id,
                "eth0",
            ],
            &cni_args,
        )
    }

    /// Starts `argv` detached inside a lab netns, output to `<run dir>/<name>.log`, and
    /// records it in the lab's state file so `down` stops it even if the test dies. The
    /// returned guard stops it when dropped.
    pub fn spawn(&self, name: &str, short: &str, argv: &[String]) -> Result<Spawned> {
        let state_path = paths::state_file(&self.prefix);
        let mut state = LabState::load_from(&state_path)?
            .with_context(|| format!("lab {} has no state file", self.prefix))?;
        if state.process(name).is_some() {
            bail!("lab {} already has a process named {name}", self.prefix);
        }
        let log = state.run_dir.join(format!("{name}.log"));
        let netns_name = paths::netns_name(&self.prefix, short);
        let (rec, child) = procs::spawn_detached(name, &netns_name, argv, &[], &log)?;
        state.processes.push(rec.clone());
        state.add_file(&log);
        state.save()?;
        Ok(Spawned { rec, child })
    }

    /// Starts `ambient-lab tproxy-listen` on 15001/15006/15008 in a ztunnel pod's netns
    /// (`a-ztunnel`), and waits until its listeners are bound.
    pub fn tproxy_listen(&self, ztunnel_pod: &str) -> Result<TproxyListener> {
        let records = self
            .status
            .run_dir
            .join(format!("{ztunnel_pod}-tproxy.jsonl"));
        let argv = vec![
            self.bin.display().to_string(),
            "tproxy-listen".into(),
            "--log".into(),
            records.display().to_string(),
        ];
        let mut proc = self.spawn(&format!("tproxy-{ztunnel_pod}"), ztunnel_pod, &argv)?;
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&proc.rec.log).unwrap_or_default();
            if text.contains("IP_TRANSPARENT listeners") {
                break;
            }
            if let Some(status) = proc.child.try_wait()? {
                bail!("tproxy-listen in {ztunnel_pod} exited ({status}): {text}");
            }
            if Instant::now() >= deadline {
                bail!("tproxy-listen in {ztunnel_pod} not listening: {text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(TproxyListener { proc, records })
    }

    /// Tears the lab down now (Drop does it otherwise), reporting failure.
    pub fn down(&mut self) -> Result<()> {
        self.down_done = true;
        run_down(&self.bin, &self.prefix)
    }
}

/// How long the HTTP helpers wait for a whole exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// HTTP from inside pods, and the waypoint's side ports, log and config.
impl Lab {
    /// Sends `reqs` one after the other over one HTTP/1.1 keep-alive connection from inside
    /// `from` (a pod id) to `addr`, e.g. `(service::REVIEWS_IP, 80)`.
    pub fn http1(
        &self,
        from: &str,
        addr: impl Into<SocketAddr>,
        reqs: &[HttpRequest],
    ) -> Result<Vec<HttpResponse>> {
        let addr = addr.into();
        let reqs = reqs.to_vec();
        self.run_in(from, move || http::http1(addr, &reqs, HTTP_TIMEOUT))?
            .with_context(|| format!("HTTP/1.1 from {from} to {addr}"))
    }

    /// Sends `reqs` concurrently over one HTTP/2 prior-knowledge (h2c) connection from
    /// inside `from`; answers in request order.
    pub fn h2c(
        &self,
        from: &str,
        addr: impl Into<SocketAddr>,
        reqs: &[HttpRequest],
    ) -> Result<Vec<HttpResponse>> {
        let addr = addr.into();
        let reqs = reqs.to_vec();
        self.run_in(from, move || http::h2c(addr, &reqs, HTTP_TIMEOUT))?
            .with_context(|| format!("h2c from {from} to {addr}"))
    }

    /// One HTTP/1.1 GET from inside `from`.
    pub fn http_get(
        &self,
        from: &str,
        addr: impl Into<SocketAddr>,
        path: &str,
    ) -> Result<HttpResponse> {
        let mut r = self.http1(from, addr, &[HttpRequest::get(path)])?;
        r.pop().context("no response")
    }

    /// An HTTP/1.1 upgrade to the test server's raw echo from inside `from`: (status, the
    /// bytes echoed after the 101).
    pub fn http_upgrade_echo(
        &self,
        from: &str,
        addr: impl Into<SocketAddr>,
        path: &str,
        payload: &[u8],
    ) -> Result<(u16, Vec<u8>)> {
        let addr = addr.into();
        let payload = payload.to_vec();
        let path = path.to_string();
        self.run_in(from, move || {
            http::upgrade_echo(addr, &path, None, &payload, HTTP_TIMEOUT)
        })?
        .with_context(|| format!("upgrade from {from} to {addr}"))
    }

    /// The waypoint as `status` reports it; panics when the lab has none.
    pub fn waypoint(&self) -> &WaypointStatus {
        self.status
            .waypoint
            .as_ref()
            .unwrap_or_else(|| panic!("lab {} has no waypoint", self.prefix))
    }

    /// The waypoint's IP (its workload address, the `waypoint.address` in the configs).
    pub fn waypoint_ip(&self) -> Ipv4Addr {
        self.waypoint().ip
    }

    /// `GET http://<waypoint ip>:15020/metrics` from the waypoint's netns: the Prometheus text.
    pub fn waypoint_metrics(&self) -> Result<String> {
        let wp = self.waypoint().clone();
        let addr = SocketAddr::from((wp.ip, waypoint::METRICS_PORT));
        let (code, body) = self
            .run_in(&wp.pod, move || waypoint::http_get(addr, "/metrics"))?
            .with_context(|| format!("GET {addr}/metrics"))?;
        if code != 200 {
            bail!("GET {addr}/metrics: status {code}: {body}");
        }
        Ok(body)
    }

    /// A GET on the waypoint's admin port (127.0.0.1:15000) from its netns: (status, body).
    pub fn waypoint_admin(&self, path: &str) -> Result<(u16, String)> {
        let wp = self.waypoint().clone();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, waypoint::ADMIN_PORT));
        let owned = path.to_string();
        self.run_in(&wp.pod, move || waypoint::http_get(addr, &owned))?
            .with_context(|| format!("GET {addr}{path}"))
    }

    /// The waypoint's whole log so far (its stderr).
    pub fn waypoint_log(&self) -> String {
        std::fs::read_to_string(&self.waypoint().log).unwrap_or_default()
    }

    /// Its access-log lines (tracing target `access`) so far.
    pub fn waypoint_access_log(&self) -> Vec<String> {
        waypoint::access_lines(&self.waypoint_log())
    }

    /// Rewrites the waypoint's config (atomically) with these HTTPRoute-shaped `routes` and
    /// AuthorizationPolicy-shaped `policies`; the waypoint reloads it. Returns the path.
    pub fn set_waypoint_config(
        &self,
        routes: &serde_json::Value,
        policies: &serde_json::Value,
    ) -> Result<PathBuf> {
        let state = LabState::load(&self.prefix)?
            .with_context(|| format!("lab {} has no state file", self.prefix))?;
        waypoint::write(&state, routes, policies)
    }

    /// Puts the lab's default routes and no policies back.
    pub fn reset_waypoint_config(&self) -> Result<PathBuf> {
        self.set_waypoint_config(&waypoint::default_routes(), &waypoint::default_policies())
    }
}

/// Bulk transfers through the lab's 9080 echo servers.
impl Lab {
    /// Sends `size` pseudo-random bytes from pod `from` to the echo server at `to` while
    /// reading the echo back (both directions at once); the FNV-1a hashes of what was sent
    /// and what came back, and how many bytes came back.
    pub fn echo_transfer(
        &self,
        from: &str,
        to: SocketAddr,
        size: usize,
    ) -> Result<(u64, u64, usize)> {
        self.run_in(from, move || -> std::io::Result<(u64, u64, usize)> {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut r = BufReader::new(s.try_clone()?);
            let mut greeting = String::new();
            r.read_line(&mut greeting)?;
            let mut w = s;
            let writer = std::thread::spawn(move || -> std::io::Result<u64> {
                let mut h = crate::serve::Fnv64::default();
                let mut x: u64 = 0x9e3779b97f4a7c15;
                let mut buf = vec![0u8; 64 << 10];
                let mut left = size;
                while left > 0 {
                    for c in buf.chunks_mut(8) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
                    }
                    let n = left.min(buf.len());
                    w.write_all(&buf[..n])?;
                    h.update(&buf[..n]);
                    left -= n;
                }
                w.shutdown(std::net::Shutdown::Write)?;
                Ok(h.0)
            });
            let mut h = crate::serve::Fnv64::default();
            let mut buf = vec![0u8; 64 << 10];
            let mut total = 0usize;
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                total += n;
            }
            let sent = writer
                .join()
                .map_err(|_| std::io::Error::other("the sender panicked"))??;
            Ok((sent, h.0, total))
        })?
        .with_context(|| format!("echo transfer from {from} to {to}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.down_done {
            if let Err(e) = self.down() {
                eprintln!("lab {}: down failed: {e:#}", self.prefix);
            }
        }
    }
}

/// A process started by [`Lab::spawn`]; dropping it stops the process.
pub struct Spawned {
    pub rec: ProcessRecord,
    child: Child,
}

impl Spawned {
    pub fn pid(&self) -> i32 {
        self.rec.pid
    }

    /// Stops the process (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) -> Result<()> {
        procs::stop(&self.rec, Duration::from_secs(2))?;
        let _ = self.child.try_wait();
        Ok(())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The test transparent listener in a ztunnel netns.
pub struct TproxyListener {
    pub proc: Spawned,
    /// Its JSON-lines log of accepted connections.
    pub records: PathBuf,
}

impl TproxyListener {
    /// Every connection accepted so far.
    pub fn records(&self) -> Result<Vec<TproxyRecord>> {
        tproxy::read_log(&self.records)
    }
}

fn open(addr: SocketAddr) -> Result<TcpStream> {
    let stream =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn read_status(bin: &Path, prefix: &str) -> Result<LabStatus> {
    let out = Command::new(bin)
        .args(["status", "--prefix", prefix, "--json"])
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "ambient-lab status --prefix {prefix} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parse ambient-lab status --json")
}

fn run_down(bin: &Path, prefix: &str) -> Result<()> {
    let out = Command::new(bin)
        .args(["down", "--prefix", prefix])
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "ambient-lab down --prefix {prefix} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A packet capture (`tcpdump -w`) on one interface of a lab netns, for tests that check what
/// crossed the wire (e.g. only TLS on the underlay).
pub struct Capture {
    child: Child,
    pcap: PathBuf,
}

impl Lab {
    /// Starts capturing on `iface` in `short`'s netns (e.g. `nodeA`, `ul0`) and returns once
    /// tcpdump writes its file.
    pub fn capture(&self, short: &str, iface: &str) -> Result<Capture> {
        let pcap = self
            .status()
            .run_dir
            .join(format!("{short}-{iface}-{}.pcap", std::process::id()));
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", iface, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&pcap)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        netns::command_in(&mut cmd, &self.netns_path(short))?;
        let child = cmd.spawn().context("tcpdump (Debian package tcpdump)")?;
        let mut c = Capture { child, pcap };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !c.pcap.exists() {
            if Instant::now() > deadline {
                let _ = c.child.kill();
                bail!("tcpdump on {short}/{iface} did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // tcpdump creates the file just before it starts reading packets.
        std::thread::sleep(Duration::from_millis(300));
        Ok(c)
    }
}

impl Capture {
    /// Stops the capture: the raw file's bytes, and tcpdump's text of it (`-nn`).
    pub fn stop(mut self) -> Result<(Vec<u8>, String)> {
        std::thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        self.child.wait()?;
        let raw = std::fs::read(&self.pcap)?;
        let text = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.pcap)
            .output()?;
        let _ = std::fs::remove_file(&self.pcap);
        Ok((raw, String::from_utf8_lossy(&text.stdout).into_owned()))
    }
}

/// A TCP connection opened from inside a lab pod and held by the test, to check later that a
/// change (a restart, a damaged state) did not cut it.
pub struct HeldConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The first line the far end sent.
    pub greeting: String,
}

impl Lab {
    /// Connects from `from` to `to` and reads the greeting line (3 s timeouts).
    pub fn hold_connection(&self, from: &str, to: SocketAddr) -> Result<HeldConnection> {
        let conn = self
            .run_in(from, move || {
                TcpStream::connect_timeout(&to, Duration::from_secs(3))
            })?
            .with_context(|| format!("connect from {from} to {to}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        Ok(HeldConnection {
            reader,
            writer: conn,
            greeting,
        })
    }
}

impl HeldConnection {
    /// Sends `data` and reads as many bytes back (the far end echoes).
    pub fn echo(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        self.writer.write_all(data)?;
        let mut back = vec![0u8; data.len()];
        self.reader.read_exact(&mut back)?;
        Ok(back)
    }
}
