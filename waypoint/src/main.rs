//! `waypoint`: see the crate docs and README.md.

use std::process::ExitCode;

use clap::Parser;
use waypoint::config::{Cli, Config};
use ztunnel::process;

fn main() -> ExitCode {
    ztunnel::proxy::h2::tune_allocator();
    // Each request it carries holds a downstream and an upstream descriptor, as in ztunnel.
    let nofile = process::raise_nofile_limit();
    let cli = Cli::parse();
    process::init_logging(&cli.log_format);
    process::log_nofile_limit(&nofile);
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
