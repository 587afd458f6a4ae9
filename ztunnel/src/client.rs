//! A standalone HBONE client: a TLS 1.3 + HTTP/2 connection to a peer's 15008 presenting a
//! given certificate, and CONNECT streams on it. For tests and tools that stand in for a
//! ztunnel (the data plane's own client is [`crate::proxy::pool`]).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use tokio::net::TcpStream;

use crate::identity::Identity;
use crate::proxy::h2::{client_builder, ConnectRequest, H2Stream};

/// Connects to `addr` as the holder of `cert`, accepting only a server that is one of
/// `expected`; the HTTP/2 connection runs on a task of its own.
pub async fn connect(
    roots: Arc<RootCertStore>,
    cert: Arc<CertifiedKey>,
    expected: Vec<Identity>,
    addr: SocketAddr,
) -> Result<h2::client::SendRequest<Bytes>, String> {
    let cfg = crate::tls::client_config(roots, expected, Arc::new(crate::tls::FixedCert(cert)))
        .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (send, conn) = client_builder()
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| format!("http2: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Opens a CONNECT stream for `req`: the stream once the answer is 200, else the status.
pub async fn open(
    sender: &h2::client::SendRequest<Bytes>,
    req: &ConnectRequest,
) -> Result<H2Stream, Result<http::StatusCode, String>> {
    let mut s = sender
        .clone()
        .ready()
        .await
        .map_err(|e| Err(e.to_string()))?;
    let (resp, send) = s
        .send_request(req.build(), false)
        .map_err(|e| Err(e.to_string()))?;
    let resp = resp.await.map_err(|e| Err(e.to_string()))?;
    if resp.status() != http::StatusCode::OK {
        return Err(Ok(resp.status()));
    }
    Ok(H2Stream {
        send,
        recv: resp.into_body(),
    })
}
