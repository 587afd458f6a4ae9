//! Process plumbing shared by the proxies of the system (ztunnel, the waypoint): logging, the
//! two runtimes, signals, the exit status.

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use tokio::runtime::Handle;

use tracing_subscriber::EnvFilter;

/// The open-files limit (soft, hard) of this process.
pub fn nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Raises the soft open-files limit to the hard one, as Envoy and upstream ztunnel do at
/// start: every proxied connection holds one or two descriptors, and a soft limit of 1024
/// (many init systems' default) would cap a node's pods at a few hundred connections while the
/// hard limit allows far more. Returns the (soft, hard) limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let (soft, hard) = nofile_limit()?;
    if soft < hard {
        let lim = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    nofile_limit()
}

/// Logs what [`raise_nofile_limit`] did (once logging is up).
pub fn log_nofile_limit(r: &std::io::Result<(u64, u64)>) {
    match r {
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
}

/// Logs to stderr, `plain` or `json` (one object per line), filtered by `RUST_LOG` (default
/// `info`).
pub fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or a container log gets plain lines
        // (and every access-log line costs less to format).
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// The data plane's multi-thread runtime (`workers` threads named `<name>-dp`) and a
/// one-thread runtime for side ports and background work (`<name>-admin`), so a busy data
/// plane never starves readiness, metrics or config reloads.
pub fn runtimes(
    name: &str,
    workers: usize,
) -> std::io::Result<(tokio::runtime::Runtime, tokio::runtime::Runtime)> {
    let side = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("{name}-admin"))
        .enable_all()
        .build()?;
    let dataplane = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name(format!("{name}-dp"))
        .enable_all()
        .build()?;
    Ok((side, dataplane))
}

/// Returns at SIGTERM or SIGINT.
pub async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
}

/// Runs a proxy: `start` on the data-plane runtime (given the side runtime's handle), then at
/// SIGTERM/SIGINT `stop` (its drain). True when the drain cut nothing.
pub fn run_until_signal<R, S, SF, D, DF>(
    name: &str,
    workers: usize,
    start: S,
    stop: D,
) -> anyhow::Result<bool>
where
    S: FnOnce(Handle) -> SF,
    SF: Future<Output = anyhow::Result<R>>,
    D: FnOnce(R) -> DF,
    DF: Future<Output = bool>,
{
    let (side, dataplane) = runtimes(name, workers)?;
    let side_handle = side.handle().clone();
    let clean = dataplane.block_on(async move {
        let running = start(side_handle).await?;
        wait_for_signal().await?;
        anyhow::Ok(stop(running).await)
    })?;
    dataplane.shutdown_timeout(Duration::from_millis(100));
    side.shutdown_timeout(Duration::from_millis(100));
    Ok(clean)
}

/// The exit status: 0 after a clean drain, 2 when the drain cut connections, 1 on an error
/// (logged and printed).
pub fn exit_code(name: &str, r: anyhow::Result<bool>) -> ExitCode {
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ztunnel and the waypoint both start with this: a soft limit below the hard one is
    /// raised to it (lowering it first, as many init systems leave it).
    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        let (_, hard) = nofile_limit().unwrap();
        let low = libc::rlimit {
            rlim_cur: hard.min(1024),
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        assert_eq!(nofile_limit().unwrap(), (hard.min(1024), hard));
        assert_eq!(raise_nofile_limit().unwrap(), (hard, hard));
    }
}
