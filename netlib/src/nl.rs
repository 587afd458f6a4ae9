//! rtnetlink: one handle per network namespace (links, addresses, rules, routes).

use std::io;
use std::path::Path;

use rtnetlink::Handle;

/// A netlink handle bound to one network namespace for its whole life.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A handle in the calling thread's namespace. Must be called inside a tokio runtime.
    pub fn current() -> io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// A handle in the namespace at `netns`: the socket is opened on a thread that joined
    /// it, and keeps talking to that namespace afterwards.
    pub fn in_netns(netns: &Path) -> io::Result<Self> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = crate::netns::run_in(netns, || {
            let _guard = rt.enter();
            rtnetlink::new_connection()
        })??;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The raw rtnetlink handle, for callers with needs of their own (the lab).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}
