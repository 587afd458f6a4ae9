//! Logging to the plugin's log file. stdout belongs to the CNI result, so logs never go there:
//! they are appended to `logFile`, or to stderr when that file cannot be opened.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use tracing::level_filters::LevelFilter;

/// Runs `f` with a tracing subscriber that appends to `path` (creating its directory if
/// possible), falling back to stderr. The subscriber is scoped to `f`, not global.
pub fn with_file_logging<T>(path: &Path, level: LevelFilter, f: impl FnOnce() -> T) -> T {
    match open_log(path) {
        Ok(file) => {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(Mutex::new(file))
                .with_ansi(false)
                .with_max_level(level)
                .finish();
            tracing::subscriber::with_default(subscriber, f)
        }
        Err(err) => {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(io::stderr)
                .with_ansi(false)
                .with_max_level(level)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::warn!(
                    log_file = %path.display(),
                    error = %err,
                    "cannot open the log file; logging to stderr"
                );
                f()
            })
        }
    }
}

fn open_log(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Best effort: opening the file reports the real problem if this fails.
        let _ = fs::create_dir_all(dir);
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_to_the_file_creating_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/cni.log");
        with_file_logging(&path, LevelFilter::INFO, || {
            tracing::info!(container = "abc", "first");
            tracing::debug!("filtered out");
        });
        with_file_logging(&path, LevelFilter::DEBUG, || tracing::debug!("second"));
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("INFO") && lines[0].contains("first"));
        assert!(lines[0].contains("container=\"abc\""));
        assert!(lines[1].contains("DEBUG") && lines[1].contains("second"));
        assert!(!text.contains("filtered out"));
        assert!(!text.contains('\u{1b}'), "no ANSI colours in the file");
    }

    #[test]
    fn unopenable_file_still_runs_the_closure() {
        let dir = tempfile::tempdir().unwrap();
        // A directory cannot be opened for appending.
        let got = with_file_logging(dir.path(), LevelFilter::INFO, || 42);
        assert_eq!(got, 42);
    }
}
