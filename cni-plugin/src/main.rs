//! ambient-cni: reads the CNI environment and stdin, runs the library, prints its output.

use std::io::{Read, Write};
use std::process::ExitCode;

use ambient_cni::{CniError, EnvMap, Output};

fn main() -> ExitCode {
    // Lossy: a non-UTF-8 variable must not abort the plugin; the library validates values.
    let env: EnvMap = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    // Bounded: one byte past the limit is enough for the library to refuse it (code 6).
    let mut stdin = Vec::new();
    let limit = ambient_cni::config::MAX_STDIN as u64 + 1;
    let out = match std::io::stdin().lock().take(limit).read_to_end(&mut stdin) {
        Ok(_) => ambient_cni::run(&env, &stdin),
        Err(e) => Output::error(
            &CniError::io("cannot read the network configuration from stdin")
                .with_details(e.to_string()),
            None,
        ),
    };
    let mut stdout = std::io::stdout().lock();
    // Nothing useful can be done if stdout is gone; the exit status still tells.
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    ExitCode::from(u8::try_from(out.exit_code).unwrap_or(1))
}
