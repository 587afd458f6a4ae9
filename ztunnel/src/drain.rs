//! Graceful drain: a cancellation signal every listener and connection watches, and a tracker
//! of the connection tasks so shutdown can wait for them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Drain {
    token: CancellationToken,
    tracker: TaskTracker,
    /// The accept loops: drain waits for them to return, so their listening sockets are
    /// closed once it is over (a proxy started again on the same ports binds them).
    listeners: TaskTracker,
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

    /// Spawns an accept loop (it must return when [`Drain::signal`] fires).
    pub fn spawn_listener<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.listeners.spawn(f)
    }

    pub fn active(&self) -> usize {
        self.tracker.len()
    }

    /// Stops listeners (their sockets closed when this returns) and waits up to `timeout` for
    /// open connections. True if all finished.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.token.cancel();
        self.listeners.close();
        self.tracker.close();
        let all = async {
            self.listeners.wait().await;
            self.tracker.wait().await;
        };
        tokio::time::timeout(timeout, all).await.is_ok()
    }
}

/// How a proxy stops: drain the connections (up to `timeout`), then cancel the background
/// tasks and side ports.
pub struct Stopper {
    pub drain: Drain,
    pub background: CancellationToken,
    pub timeout: Duration,
}

impl Stopper {
    /// Stops accepting, fails readiness, lets open connections finish (up to the timeout),
    /// then stops the background work. True if nothing was cut.
    pub async fn stop(self) -> bool {
        tracing::info!(active = self.drain.active(), timeout = ?self.timeout, "draining");
        let clean = self.drain.drain(self.timeout).await;
        if clean {
            tracing::info!("drained");
        } else {
            tracing::warn!(
                left = self.drain.active(),
                "drain timeout: closing the remaining connections"
            );
        }
        self.background.cancel();
        clean
    }
}
