//! `ztunnel`: see the crate docs and README.md.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use ztunnel::config::{Cli, Config};

fn main() -> ExitCode {
    ztunnel::proxy::h2::tune_allocator();
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or a container log gets plain lines
        // (and every access-log line costs less to format).
        .with_ansi(std::io::stderr().is_terminal());
    if cli.log_format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    let cfg = Config::from(cli);
    match run(cfg) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ztunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The data plane on its own multi-thread runtime; side ports and background work on a
/// one-thread runtime of their own.
fn run(cfg: Config) -> anyhow::Result<bool> {
    let side = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ztunnel-admin")
        .enable_all()
        .build()?;
    let dataplane = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads)
        .thread_name("ztunnel-dp")
        .enable_all()
        .build()?;
    let side_handle = side.handle().clone();
    let clean = dataplane.block_on(async move {
        let running = ztunnel::app::start(cfg, side_handle).await?;
        wait_for_signal().await?;
        anyhow::Ok(running.shutdown().await)
    })?;
    dataplane.shutdown_timeout(std::time::Duration::from_millis(100));
    side.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(clean)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
}
