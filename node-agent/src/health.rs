//! Health and readiness over plain HTTP/1.x: `GET /healthz` (alive), `GET /ready` (the
//! first reconcile is done), `GET /state` (the agent's state as JSON, for operators).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tracing::warn;

use crate::node::Node;

pub async fn serve(
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    node: Arc<Mutex<Node>>,
) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let ready = ready.clone();
            let node = node.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n =
                    match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
                        .await
                    {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (code, body) = match path {
                    "/healthz" => (200, "ok\n".to_string()),
                    "/ready" if ready.load(Ordering::Acquire) => (200, "ready\n".to_string()),
                    "/ready" => (503, "not ready\n".to_string()),
                    "/state" => {
                        let n = node.lock().await;
                        (
                            200,
                            serde_json::to_string_pretty(&n.state).unwrap_or_default(),
                        )
                    }
                    _ => (404, "not found\n".to_string()),
                };
                let reason = match code {
                    200 => "OK",
                    503 => "Service Unavailable",
                    _ => "Not Found",
                };
                let resp = format!(
                    "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = s.write_all(resp.as_bytes()).await {
                    warn!("health response: {e}");
                }
            });
        }
    });
    Ok(())
}
