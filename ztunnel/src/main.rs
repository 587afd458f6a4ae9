//! `ztunnel`: see the crate docs and README.md.

use std::process::ExitCode;

use clap::Parser;
use ztunnel::config::{Cli, Config};
use ztunnel::process;

fn main() -> ExitCode {
    ztunnel::proxy::h2::tune_allocator();
    let cli = Cli::parse();
    process::init_logging(&cli.log_format);
    let cfg = Config::from(cli);
    let workers = cfg.worker_threads;
    let r = process::run_until_signal(
        "ztunnel",
        workers,
        |side| ztunnel::app::start(cfg, side),
        |running| running.shutdown(),
    );
    process::exit_code("ztunnel", r)
}
