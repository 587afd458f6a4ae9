//! The per-source cap on concurrent connections (issue 13, "Load"): a source at its cap is
//! refused on 15001 (its workload) and on 15008 (its address, from the accept on), counted in
//! `ztunnel_refused_connections_total`; a connection it closes frees a place; another source
//! is not affected.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use ambient_net::consts::port;
use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use ztunnel::app::start;

const CAP: usize = 3;

/// Whether the far end closes `s` within `within` (EOF or reset) instead of holding it.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn refused(metrics: &str, direction: &str) -> u64 {
    let want = format!(
        "ztunnel_refused_connections_total{{direction=\"{direction}\",cause=\"connection-limit\"}} "
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_at_its_cap_is_refused_and_others_are_served() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let m = Mesh::new(45).await;

        // 15001: `sleep` holds CAP passthrough connections to legacy; the next is refused.
        let mut cfg = m.config("node-a");
        cfg.outbound_orig_dst = Some(m.legacy.addr);
        cfg.max_connections_per_source = CAP;
        let a = start(cfg, tokio::runtime::Handle::current()).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..CAP {
            let s = connect_from(m.ip(11), a.addrs.outbound).await.unwrap();
            held.push(tcp_echo_keep(s, b"held").await);
        }
        let mut over = connect_from(m.ip(11), a.addrs.outbound).await.unwrap();
        assert!(
            closed_within(&mut over, Duration::from_secs(2)).await,
            "the connection over the cap was served"
        );
        let (_, text) = http_get(a.addrs.metrics, "/metrics").await;
        assert_eq!(refused(&text, "outbound"), 1, "{text}");
        // One closed: a place again.
        held.pop();
        let mut admitted = false;
        for _ in 0..100 {
            let s = connect_from(m.ip(11), a.addrs.outbound).await.unwrap();
            if tcp_echo(s, b"again").await.is_ok_and(|b| b == b"again") {
                admitted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(admitted, "no place freed by the closed connection");
        a.shutdown().await;

        // 15008: CAP silent connections from one address; its next is closed at once, while
        // another address's silent connection is held (until the handshake timeout).
        let mut cfg = m.config("node-b");
        cfg.inbound_addrs = vec![SocketAddr::new(m.ip(21), port::INBOUND_HBONE)];
        cfg.max_connections_per_source = CAP;
        cfg.connect_timeout = Duration::from_secs(5);
        let b = start(cfg, tokio::runtime::Handle::current()).await.unwrap();
        let mut silent = Vec::new();
        for _ in 0..CAP {
            silent.push(connect_from(m.ip(50), b.addrs.inbound).await.unwrap());
        }
        let mut over = connect_from(m.ip(50), b.addrs.inbound).await.unwrap();
        assert!(closed_within(&mut over, Duration::from_secs(2)).await);
        let mut other = connect_from(m.ip(51), b.addrs.inbound).await.unwrap();
        assert!(
            !closed_within(&mut other, Duration::from_millis(500)).await,
            "another address was refused too"
        );
        let (_, text) = http_get(b.addrs.metrics, "/metrics").await;
        assert_eq!(refused(&text, "inbound"), 1, "{text}");
        drop(silent);
        b.shutdown().await;
    })
    .await
    .expect("bounded");
}

/// Writes `data`, reads its echo, and keeps the connection open.
async fn tcp_echo_keep(mut s: TcpStream, data: &[u8]) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    s.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
    s
}
