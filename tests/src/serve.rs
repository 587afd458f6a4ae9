//! `ambient-lab serve`: the pods' test server. Each connection first gets one line naming
//! both ends as the server sees them, then an echo of whatever arrives until EOF, so the
//! same server answers one-shot probes and long-lived streams.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// The greeting for a connection: `server=<local ip:port> client=<peer ip:port>`.
pub fn greeting(local: SocketAddr, peer: SocketAddr) -> String {
    format!("server={local} client={peer}\n")
}

/// Parses a greeting back into (server, client).
pub fn parse_greeting(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut server = None;
    let mut client = None;
    for field in line.split_whitespace() {
        if let Some(v) = field.strip_prefix("server=") {
            server = v.parse().ok();
        } else if let Some(v) = field.strip_prefix("client=") {
            client = v.parse().ok();
        }
    }
    Some((server?, client?))
}

pub fn run(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(serve(port))
}

async fn serve(port: u16) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    eprintln!("serve: listening on {addr}");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("serve: accept: {e}");
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = handle(stream, peer).await {
                eprintln!("serve: {peer}: {e}");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr()?;
    stream.write_all(greeting(local, peer).as_bytes()).await?;
    let (mut rd, mut wr) = stream.split();
    tokio::io::copy(&mut rd, &mut wr).await?;
    wr.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trip() {
        let s: SocketAddr = "10.244.2.3:9080".parse().unwrap();
        let c: SocketAddr = "10.244.1.4:41234".parse().unwrap();
        let line = greeting(s, c);
        assert_eq!(line, "server=10.244.2.3:9080 client=10.244.1.4:41234\n");
        assert_eq!(parse_greeting(&line), Some((s, c)));
        assert_eq!(parse_greeting("hello"), None);
    }
}
