//! A client's first bytes travel with the CONNECT ("optimistic data") instead of a round trip
//! later, and are sent again when the tunnel connection dies before the response.
//!
//! ztunnel A talks to a scripted HBONE peer standing in for ztunnel B on echo's 15008: it
//! presents echo's certificate and reads what a CONNECT stream carries *before* it answers.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ambient_net::consts::port;
use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use ztunnel::proxy::h2::server_builder;
use ztunnel::tls::FixedCert;

#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// Read the stream to its END_STREAM, then answer 200 and send it all back.
    AnswerAfterEnd,
    /// On the first connection: read `n` bytes, then drop the connection without an answer.
    /// Later connections: as `AnswerAfterEnd`.
    DieAfter(usize),
}

/// What the peer saw: per TLS connection, the bytes of each stream before its answer.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Vec<Vec<u8>>>>>);

async fn scripted_peer(m: &Mesh, script: Script) -> Seen {
    let listener = TcpListener::bind((m.ip(21), port::INBOUND_HBONE))
        .await
        .unwrap();
    let cert =
        m.ca.mint_workload_cert(
            &id("echo"),
            SystemTime::now() - Duration::from_secs(5),
            Duration::from_secs(600),
        )
        .unwrap();
    let tls = ztunnel::tls::server_config(
        m.roots(),
        "cluster.local",
        Arc::new(FixedCert(cert.certified.clone())),
    )
    .unwrap();
    let seen = Seen::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let conn_index = {
                let mut v = s2.0.lock().unwrap();
                v.push(Vec::new());
                v.len() - 1
            };
            let (tls, seen) = (tls.clone(), s2.clone());
            tokio::spawn(async move {
                let Ok(stream) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
                    return;
                };
                let mut h2 = server_builder()
                    .handshake::<_, Bytes>(stream)
                    .await
                    .unwrap();
                let (die_tx, mut die_rx) = oneshot::channel::<()>();
                let mut die_tx = Some(die_tx);
                loop {
                    let next = tokio::select! {
                        n = h2.accept() => n,
                        _ = &mut die_rx => return, // drops the connection: no answer, no GOAWAY
                    };
                    let Some(Ok((req, mut respond))) = next else {
                        return;
                    };
                    let die_after = match script {
                        Script::DieAfter(n) if conn_index == 0 => Some((n, die_tx.take())),
                        _ => None,
                    };
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let mut got = Vec::new();
                        while let Some(d) = body.data().await {
                            let d = d.unwrap();
                            let _ = body.flow_control().release_capacity(d.len());
                            got.extend_from_slice(&d);
                            if let Some((n, _)) = &die_after {
                                if got.len() >= *n {
                                    break;
                                }
                            }
                        }
                        seen.0.lock().unwrap()[conn_index].push(got.clone());
                        if let Some((_, Some(die))) = die_after {
                            let _ = die.send(());
                            return;
                        }
                        let mut send = respond
                            .send_response(http::Response::new(()), false)
                            .unwrap();
                        send.send_data(Bytes::from(got), true).unwrap();
                    });
                }
            });
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_bytes_and_the_half_close_go_out_before_the_answer() {
    let m = Mesh::new(42).await;
    let seen = scripted_peer(&m, Script::AnswerAfterEnd).await;
    let a = m.node_a(m.echo.addr).await;
    let mut s = connect_from(m.ip(11), a.addrs.outbound).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    s.shutdown().await.unwrap();
    // A peer that answers only after the END_STREAM gets both before it has answered: with a
    // CONNECT that waited for its 200 first, this would hang until A's connect timeout.
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .expect("no answer: the first bytes waited for the CONNECT's response")
        .unwrap();
    assert_eq!(back, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(
        *seen.0.lock().unwrap(),
        vec![vec![b"GET / HTTP/1.0\r\n\r\n".to_vec()]]
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_are_sent_again_when_the_connection_dies_before_the_answer() {
    let m = Mesh::new(43).await;
    let seen = scripted_peer(&m, Script::DieAfter(5)).await;
    let a = m.node_a(m.echo.addr).await;
    let mut s = connect_from(m.ip(11), a.addrs.outbound).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    // Wait until the first connection has the bytes (and dies), then finish the request.
    eventually(|| {
        seen.0
            .lock()
            .unwrap()
            .first()
            .is_some_and(|c| !c.is_empty())
    })
    .await;
    s.write_all(b" world").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .expect("no answer after the retry")
        .unwrap();
    assert_eq!(back, b"hello world");
    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "a second tunnel connection: {seen:?}");
    assert_eq!(seen[0], vec![b"hello".to_vec()]);
    // The retried stream carried the early bytes once, then the rest.
    assert_eq!(seen[1], vec![b"hello world".to_vec()]);
    a.shutdown().await;
}
