//! 15001 proxies for the enrolled pods of its own node only (issue 13, "Nobody let in"): a
//! connection from any other source is closed without a single upstream connection, whether
//! its destination is a plain server (passthrough) or a mesh pod (HBONE).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connects from `src` through ztunnel A's outbound listener, writes, and returns what came
/// back before the close (empty when refused).
async fn try_through(outbound: SocketAddr, src: IpAddr) -> Vec<u8> {
    let Ok(mut s) = connect_from(src, outbound).await else {
        return Vec::new();
    };
    let _ = s.write_all(b"hello?").await;
    // Half-close, so that a served connection ends once the echo is back.
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    // Refused: closed by ztunnel (EOF or reset) long before this timeout.
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(
        r.is_ok(),
        "{src}: the connection was left open, neither served nor closed"
    );
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_sources_that_are_not_enrolled_pods_of_this_node() {
    let m = Mesh::new(44).await;
    // Sources that must not be proxied: outside the mesh, unknown; a mesh pod of another
    // node (echo, node-b, HBONE); a plain pod of another node (legacy, node-b, TCP); the
    // node's own ztunnel address.
    let strangers = [m.ip(50), m.ip(77), m.ip(21), m.ip(31), m.ip(1)];

    // A plain destination outside the mesh: passthrough would connect to it.
    let plain = echo_server(m.ip(60)).await;
    let a = m.node_a(plain.addr).await;
    for src in strangers {
        let got = try_through(a.addrs.outbound, src).await;
        assert!(got.is_empty(), "{src}: proxied: {got:?}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        plain.peers.lock().unwrap().len(),
        0,
        "an upstream connection was made for a stranger"
    );
    // The control: the enrolled pod of node-a is proxied, so the counter does count.
    assert_eq!(try_through(a.addrs.outbound, m.ip(11)).await, b"hello?");
    assert_eq!(plain.peers.lock().unwrap().len(), 1);
    a.shutdown().await;

    // A mesh destination: no HBONE tunnel is opened either (ztunnel B never relays to echo).
    let b = m.node_b().await;
    let a = m.node_a(m.echo.addr).await;
    for src in strangers {
        let got = try_through(a.addrs.outbound, src).await;
        assert!(got.is_empty(), "{src}: proxied over HBONE: {got:?}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(m.echo.peers.lock().unwrap().is_empty());
    assert_eq!(
        a.pool.connections(),
        0,
        "an HBONE connection was opened for a stranger"
    );
    assert_eq!(try_through(a.addrs.outbound, m.ip(11)).await, b"hello?");
    assert_eq!(m.echo.peers.lock().unwrap().len(), 1);
    a.shutdown().await;
    b.shutdown().await;
}
