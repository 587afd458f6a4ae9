//! Running the helper binaries the product drives (`nft`, `iptables-restore`, `ipset`): stdout
//! and stderr captured (so an error keeps the tool's explanation), the C locale (stable
//! messages), stdin written from a helper thread (a large batch can never deadlock against the
//! tool's output), spawned from the calling thread (a thread that joined another network
//! namespace runs the tool there).

use std::io::Write;
use std::marker::PhantomData;
use std::path::Path;
use std::process::{Command, Stdio};

/// One finished run; `E` is the caller's error type, which [`Output::into_result`] gives.
pub(crate) struct Output<E> {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    err: PhantomData<fn() -> E>,
}

/// A run that finished with a non-zero status: what was being done, the exit code, the
/// tool's stderr. Each backend's error enum converts it into its own `Failed` variant.
pub(crate) struct Failed {
    pub action: String,
    pub code: Option<i32>,
    pub stderr: String,
}

impl<E: From<Failed>> Output<E> {
    /// stdout when the run succeeded, else its [`Failed`].
    pub fn into_result(self, action: &str) -> Result<String, E> {
        if self.ok {
            Ok(self.stdout)
        } else {
            Err(E::from(Failed {
                action: action.to_string(),
                code: self.code,
                stderr: self.stderr.trim().to_string(),
            }))
        }
    }

    /// The tool's message for a table, chain, set or element that does not exist (ENOENT).
    pub fn is_absent(&self) -> bool {
        !self.ok && self.stderr.contains("No such file or directory")
    }
}

/// Why a run did not finish.
pub(crate) enum RunError {
    /// The program is not there (ENOENT on spawn).
    Missing,
    /// Starting it, writing its stdin or waiting for it failed: the step and the error.
    Io(&'static str, std::io::Error),
}

/// Runs `program args`, feeding `stdin` when given.
pub(crate) fn run<E>(
    program: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output<E>, RunError> {
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RunError::Missing,
            _ => RunError::Io("start", e),
        })?;
    let output = std::thread::scope(|s| {
        let writer = child.stdin.take().map(|mut pipe| {
            let data = stdin.unwrap_or_default().as_bytes();
            s.spawn(move || pipe.write_all(data))
        });
        let out = child.wait_with_output();
        match writer.map(|w| w.join()) {
            // The tool may exit (with its error on stderr) before reading all its input.
            Some(Ok(Err(e))) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(RunError::Io("write to", e))
            }
            Some(Err(_)) => {
                return Err(RunError::Io(
                    "write to",
                    std::io::Error::other("writer panicked"),
                ))
            }
            _ => {}
        }
        out.map_err(|e| RunError::Io("wait for", e))
    })?;
    Ok(Output {
        ok: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        err: PhantomData,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_stdin_and_missing() {
        let o = run::<()>(
            Path::new("/bin/sh"),
            &["-c", "cat; echo err >&2; exit 3"],
            Some("in"),
        )
        .ok()
        .unwrap();
        assert_eq!(
            (o.ok, o.code, o.stdout.as_str(), o.stderr.as_str()),
            (false, Some(3), "in", "err\n")
        );
        assert!(matches!(
            run::<()>(Path::new("/nonexistent/x"), &[], None),
            Err(RunError::Missing)
        ));
    }
}
