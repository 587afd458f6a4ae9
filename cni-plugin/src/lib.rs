//! ambient-cni: a chained CNI plugin (spec 0.3.0 – 1.1.0) that registers pods with the
//! ambient node agent, which decides membership and programs the node's redirection.
//!
//! The binary is a thin shell around [`run`]: it hands over the environment and stdin and
//! prints [`Output::stdout`] with [`Output::exit_code`]. [`execute`] is the same without the
//! log file, for tests. Modules, by concern:
//! [`env`] (CNI_* variables), [`config`] (stdin, plugin options), [`prev_result`],
//! [`version`], [`client`] (the agent socket), [`cmd`] (commands, failure policy),
//! [`error`] (codes), [`logging`].

pub mod client;
pub mod cmd;
pub mod config;
pub mod env;
pub mod error;
pub mod logging;
pub mod prev_result;
pub mod version;

use std::panic::{self, AssertUnwindSafe};

pub use cmd::{execute, Output};
pub use env::EnvMap;
pub use error::CniError;

/// One invocation as the binary runs it: logs to the configured `logFile` (read leniently
/// from stdin so that even a rejected config is logged), then [`execute`]. A panic — there
/// should be none — still yields a CNI error on stdout instead of nothing.
pub fn run(env: &EnvMap, stdin: &[u8]) -> Output {
    let (log_file, level) = config::peek_logging(stdin);
    logging::with_file_logging(&log_file, level, || {
        panic::catch_unwind(AssertUnwindSafe(|| execute(env, stdin))).unwrap_or_else(|_| {
            tracing::error!("internal error: the plugin panicked");
            Output::error(
                &CniError::io("ambient-cni internal error"),
                config::peek_version(stdin),
            )
        })
    })
}
