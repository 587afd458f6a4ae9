//! What the bench reads from the system: a process's CPU time and RSS, the machine's CPU
//! busy time, listening sockets in a netns; and running a command in a netns with a timeout.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ambient_net::netns;
use anyhow::{bail, Context, Result};

use crate::procs;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP only set a flag: the bench stops at its next check and
/// still tears the lab down.
pub fn catch_signals() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("catch {sig}"))?;
    }
    Ok(())
}

/// Fails once a signal asked the bench to stop.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Raises the soft open-files limit to the hard one (1000 open connections need more than
/// a default 1024); what the bench starts inherits it.
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: i32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    let rest = &text[text.rfind(')').context("bad stat")? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15; fields[0] is field 3.
    let utime: f64 = f.get(11).context("no utime")?.parse()?;
    let stime: f64 = f.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / clock_ticks())
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: i32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb * 1024.0)
}

/// The machine's (busy, total) CPU time from /proc/stat, in ticks.
pub fn machine_cpu() -> Result<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = text.lines().next().context("empty /proc/stat")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    // idle and iowait.
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    Ok((total - idle, total))
}

/// Busy fraction of all CPUs between two [`machine_cpu`] readings.
pub fn busy_fraction(before: (f64, f64), after: (f64, f64)) -> f64 {
    let total = after.1 - before.1;
    if total <= 0.0 {
        return f64::NAN;
    }
    (after.0 - before.0) / total
}

pub fn cpu_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// True when something listens on TCP `port` in the netns (IPv4 or IPv6).
pub fn listening(netns_name: &str, port: u16) -> Result<bool> {
    let want = format!(":{port:04X}");
    let found = netns::run_in(&netns::named_path(netns_name), || {
        ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .any(|t| {
                t.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
                })
            })
    })?;
    Ok(found)
}

/// Waits until something listens on `port` in the netns.
pub fn wait_listening(netns_name: &str, port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !listening(netns_name, port)? {
        if Instant::now() >= deadline {
            bail!("nothing listens on {port} in {netns_name} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs `argv` inside the named netns and captures its output, killing it after `timeout`.
pub fn run_in_netns(netns_name: &str, argv: &[String], timeout: Duration) -> Result<Output> {
    let (program, args) = argv.split_first().context("empty command")?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    netns::command_in(&mut cmd, &netns::named_path(netns_name))?;
    procs::run_capture(&mut cmd, None, timeout)
        .with_context(|| format!("{program} in {netns_name}"))
}

/// Fails with the command's stderr when it did not exit 0.
pub fn require_success(what: &str, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// The first executable `name` in a `:`-separated search path.
pub fn find_in_path(path: &str, name: &str) -> Option<std::path::PathBuf> {
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
