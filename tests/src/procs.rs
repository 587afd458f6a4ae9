//! Processes the lab starts: detached long-runners (servers, agents) recorded with their
//! start time, and short commands run to completion with a timeout.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use ambient_net::netns;
use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::state::ProcessRecord;

/// State letter and start time (clock ticks after boot) of a process, from
/// `/proc/<pid>/stat`; `None` when there is no such process.
pub fn stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 is fields[0]; starttime is field 22.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The start time to record for a process that was just spawned.
pub fn start_time(pid: i32) -> Result<u64> {
    stat(pid)
        .map(|(_, t)| t)
        .ok_or_else(|| anyhow!("process {pid} vanished right after it started"))
}

/// True while the recorded process runs: same PID, same start time, not a zombie.
pub fn is_alive(rec: &ProcessRecord) -> bool {
    matches!(stat(rec.pid), Some((state, start)) if start == rec.start_time && state != 'Z' && state != 'X')
}

/// Starts `argv` inside the netns `netns_name` in a session of its own, stdin from
/// /dev/null and stdout/stderr appended to `log`. Returns the record and the child
/// (poll it to notice an early exit; dropping it leaves the process running).
pub fn spawn_detached(
    name: &str,
    netns_name: &str,
    argv: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<(ProcessRecord, Child)> {
    let (program, args) = argv.split_first().context("empty command")?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open log {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    for (k, v) in env {
        cmd.env(k, v);
    }
    netns::command_in(&mut cmd, &netns::named_path(netns_name))?;
    // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("start {name}: {program} in netns {netns_name}"))?;
    let pid = child.id() as i32;
    let rec = ProcessRecord {
        name: name.to_string(),
        pid,
        start_time: start_time(pid)?,
        netns: netns_name.to_string(),
        argv: argv.to_vec(),
        log: log.to_path_buf(),
    };
    Ok((rec, child))
}

/// Stops a recorded process: SIGTERM, then SIGKILL after `grace`. Does nothing when the
/// PID is gone or now belongs to another process. Returns whether it signalled anything.
pub fn stop(rec: &ProcessRecord, grace: Duration) -> Result<bool> {
    if !is_alive(rec) {
        return Ok(false);
    }
    let pid = Pid::from_raw(rec.pid);
    let _ = kill(pid, Signal::SIGTERM);
    if wait_dead(rec, grace) {
        return Ok(true);
    }
    let _ = kill(pid, Signal::SIGKILL);
    if wait_dead(rec, Duration::from_secs(2)) {
        return Ok(true);
    }
    bail!("{} (pid {}) survived SIGKILL", rec.name, rec.pid)
}

fn wait_dead(rec: &ProcessRecord, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !is_alive(rec) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion with captured stdout/stderr, feeding `stdin` if given; kills
/// it and fails after `timeout`.
pub fn run_capture(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("run {program}"))?;
    let input = stdin.map(<[u8]>::to_vec);
    let mut child_in = child.stdin.take();
    let mut child_out = child.stdout.take().context("stdout pipe")?;
    let mut child_err = child.stderr.take().context("stderr pipe")?;
    let (status, stdout, stderr) = std::thread::scope(|s| -> Result<_> {
        if let (Some(data), Some(mut pipe)) = (input, child_in.take()) {
            s.spawn(move || {
                let _ = pipe.write_all(&data);
            });
        }
        let out = s.spawn(move || {
            let mut buf = Vec::new();
            let _ = child_out.read_to_end(&mut buf);
            buf
        });
        let err = s.spawn(move || {
            let mut buf = Vec::new();
            let _ = child_err.read_to_end(&mut buf);
            buf
        });
        let status = wait_timeout(&mut child, timeout)
            .with_context(|| format!("{program} did not finish within {timeout:?}"))?;
        Ok((
            status,
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        ))
    })?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Waits for `child`, killing it after `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            if all.is_empty() {
                format!("({} is empty)", path.display())
            } else {
                format!(
                    "last lines of {}:\n{}",
                    path.display(),
                    all[from..].join("\n")
                )
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_stat() {
        let me = std::process::id() as i32;
        let (state, start) = stat(me).expect("own stat");
        assert!(state == 'R' || state == 'S');
        assert!(start > 0);
        let rec = ProcessRecord {
            name: "me".into(),
            pid: me,
            start_time: start,
            netns: String::new(),
            argv: vec![],
            log: Default::default(),
        };
        assert!(is_alive(&rec));
        let other = ProcessRecord {
            start_time: start + 1,
            ..rec
        };
        assert!(!is_alive(&other));
    }

    #[test]
    fn capture_with_timeout() {
        let out = run_capture(
            Command::new("cat").arg("-"),
            Some(b"hello"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"hello");
        let slow = run_capture(
            Command::new("sleep").arg("5"),
            None,
            Duration::from_millis(100),
        );
        assert!(slow.is_err());
    }
}
