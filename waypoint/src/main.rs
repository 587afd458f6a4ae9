//! `waypoint`: see the crate docs and README.md.

use std::process::ExitCode;

use clap::Parser;
use waypoint::config::{Cli, Config};
use ztunnel::process;

fn main() -> ExitCode {
    ztunnel::proxy::h2::tune_allocator();
    let cli = Cli::parse();
    process::init_logging(&cli.log_format);
    let cfg = Config::from(cli);
    let workers = cfg.worker_threads;
    let r = process::run_until_signal(
        "waypoint",
        workers,
        |side| waypoint::app::start(cfg, side),
        |running| running.shutdown(),
    );
    process::exit_code("waypoint", r)
}
