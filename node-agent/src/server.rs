//! The CNI-facing unix socket (root-only): one JSON request line, one JSON reply line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use ambient_net::proto::{Reply, Request};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::node::Node;

/// The longest request line accepted (a GC list for thousands of pods fits).
const MAX_REQUEST: usize = 4 << 20;

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // A socket file left by a previous (killed) agent would make bind fail.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(listener: UnixListener, node: Arc<Mutex<Node>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, node).await {
                        warn!("CNI connection: {e:#}");
                    }
                });
            }
            Err(e) => warn!("accept on the CNI socket: {e}"),
        }
    }
}

async fn handle(stream: UnixStream, node: Arc<Mutex<Node>>) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let n = BufReader::new(r.take(MAX_REQUEST as u64))
        .read_line(&mut line)
        .await?;
    let reply = if n == 0 {
        return Ok(());
    } else {
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                debug!(?req, "CNI request");
                node.lock().await.handle(req).await
            }
            Err(e) => Reply::error(format!("bad request: {e}"), false),
        }
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

use tokio::io::AsyncReadExt as _;
