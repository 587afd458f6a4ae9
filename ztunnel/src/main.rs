//! `ztunnel`: see the crate docs and README.md.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ztunnel::config::{Cli, Config};
use ztunnel::process;

fn main() -> ExitCode {
    ztunnel::proxy::h2::tune_allocator();
    let cli = Cli::parse();
    process::init_logging(&cli.log_format);
    match run(Config::from(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ztunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: Config) -> anyhow::Result<bool> {
    let (side, dataplane) = process::runtimes("ztunnel", cfg.worker_threads)?;
    let side_handle = side.handle().clone();
    let clean = dataplane.block_on(async move {
        let running = ztunnel::app::start(cfg, side_handle).await?;
        process::wait_for_signal().await?;
        anyhow::Ok(running.shutdown().await)
    })?;
    dataplane.shutdown_timeout(Duration::from_millis(100));
    side.shutdown_timeout(Duration::from_millis(100));
    Ok(clean)
}
