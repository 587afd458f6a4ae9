//! The operators' tools: `ambient-agent explain` (the path of one connection, hop by hop, from
//! what the kernel holds now) and `ambient-agent doctor` (is this node healthy). Both run on a
//! node next to a running agent and only read: the kernel through netlink and `nft -j list`,
//! the agent's desired state computed from its state directory, and ztunnel's admin and
//! readiness ports. Nothing here changes the node, except `explain --trace`'s temporary
//! trace table (see [`probe`]).
//!
//! * [`desired`]: what the agent wants, from its saved state (the same model functions it
//!   reconciles with).
//! * [`kernel`]: what the node's and the ztunnel netns' kernel hold now.
//! * [`drift`]: the differences, each with what the agent will do about it.
//! * [`explain`], [`probe`] (`--trace`), [`doctor`].

pub mod desired;
pub mod doctor;
pub mod drift;
pub mod explain;
pub mod kernel;
pub mod probe;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// Why an operator command could not look.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("agent state in {dir}: {msg}")]
    State { dir: String, msg: String },
    #[error(transparent)]
    Net(#[from] ambient_net::nl::NetError),
    #[error(transparent)]
    Nft(#[from] ambient_net::nft::NftError),
    /// The iptables backend's tools failed.
    #[error("iptables backend: {0}")]
    Firewall(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

impl OpsError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        OpsError::Io {
            what: what.into(),
            source,
        }
    }
}

/// How long one HTTP exchange with ztunnel may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// The agent's desired state from `state_dir`, and the kernel now: the node's, and the
/// ztunnel netns' when a ztunnel is known (what `explain` and `doctor` both compare).
pub async fn desired_and_kernel(
    state_dir: &Path,
) -> Result<(desired::Desired, kernel::Kernel), OpsError> {
    let d = desired::Desired::load(state_dir)?;
    let k = kernel::Kernel::read(d.ztunnel_netns().as_deref(), d.firewall()).await?;
    Ok((d, k))
}

/// `GET path` on `127.0.0.1:port` inside `netns` (ztunnel's admin port listens on loopback
/// only, so it is asked from inside its netns): the status code and the body.
pub fn http_get(netns: &Path, port: u16, path: &str) -> Result<(u16, String), OpsError> {
    let what = format!("GET 127.0.0.1:{port}{path} in {}", netns.display());
    let r = ambient_net::netns::run_in(netns, || -> std::io::Result<(u16, String)> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
        s.set_read_timeout(Some(HTTP_TIMEOUT))?;
        s.set_write_timeout(Some(HTTP_TIMEOUT))?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        // Bounded: a status page, a JSON document.
        s.take(4 << 20).read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP response"))?;
        Ok((code, body.to_string()))
    });
    match r {
        Ok(Ok(v)) => Ok(v),
        // A read timeout shows as EAGAIN: say what it means.
        Ok(Err(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            let msg = format!("no answer within {} s", HTTP_TIMEOUT.as_secs());
            Err(OpsError::io(what, std::io::Error::new(e.kind(), msg)))
        }
        Ok(Err(e)) | Err(e) => Err(OpsError::io(what, e)),
    }
}
