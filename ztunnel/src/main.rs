//! `ztunnel`: see the crate docs and README.md.

use std::process::ExitCode;

use clap::Parser;
use ztunnel::config::{Cli, Config};
use ztunnel::process;

fn main() -> ExitCode {
    ztunnel::proxy::h2::tune_allocator();
    // Before the config: the per-source connection cap defaults to a share of this limit.
    let nofile = process::raise_nofile_limit();
    let cli = Cli::parse();
    process::init_logging(&cli.log_format);
    process::log_nofile_limit(&nofile);
    let cfg = Config::from(cli);
    tracing::info!(
        max = cfg.max_connections_per_source,
        "concurrent connections per source (0: no cap)"
    );
    let workers = cfg.worker_threads;
    let r = process::run_until_signal(
        "ztunnel",
        workers,
        |side| ztunnel::app::start(cfg, side),
        |running| running.shutdown(),
    );
    process::exit_code("ztunnel", r)
}
