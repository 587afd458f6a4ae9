//! `ambient-lab exec`: run a command inside one of a lab's namespaces.

use std::process::Command;

use ambient_net::netns;
use anyhow::{bail, Context, Result};

use crate::paths;

/// Runs `argv` in `<prefix>-<short>` with inherited stdio; returns its exit code.
pub fn exec(prefix: &str, short: &str, argv: &[String]) -> Result<i32> {
    paths::validate_prefix(prefix)?;
    let name = paths::netns_name(prefix, short);
    let path = netns::named_path(&name);
    if !path.exists() {
        bail!("no netns {name} (is lab {prefix:?} up? pods are a-app, b-client, ...; nodes nodeA, nodeB)");
    }
    let (program, args) = argv.split_first().context("no command given")?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    netns::command_in(&mut cmd, &path)?;
    let status = cmd
        .status()
        .with_context(|| format!("run {program} in {name}"))?;
    Ok(status.code().unwrap_or(128 + 9))
}
