//! Graceful drain: a cancellation signal every listener and connection watches, and a tracker
//! of the connection tasks so shutdown can wait for them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Drain {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Fires when draining starts.
    pub fn signal(&self) -> CancellationToken {
        self.token.clone()
    }

    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Spawns a connection task that drain waits for.
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(f)
    }

    pub fn active(&self) -> usize {
        self.tracker.len()
    }

    /// Stops listeners and waits up to `timeout` for open connections. True if all finished.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok()
    }
}
