//! rustls configurations for HBONE: TLS 1.3 only, AES-GCM suites only, ALPN `h2`, one crypto
//! provider (ring), mutual authentication with SPIFFE identities.
//!
//! - The server presents the certificate of the identity that owns the dialed address (one
//!   cached `ServerConfig` per identity; its resolver asks the [`SecretManager`] at every
//!   handshake, so rotation is picked up without rebuilding anything). It requires a client
//!   certificate chaining to our roots whose single URI SAN is in our trust domain.
//! - The client presents its workload's certificate and accepts the server only if the chain
//!   is ours and its SAN is one of the expected identities (names and IPs are not used).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{identity_in_trust_domain, Identity, SecretManager};

pub const ALPN_H2: &[u8] = b"h2";

/// The one crypto provider: ring, restricted to the TLS 1.3 AES-GCM suites.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = vec![
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ];
        Arc::new(p)
    })
    .clone()
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// (our identity, the identities the server may have)
type ClientKey = (Identity, Vec<Identity>);

/// Builds and caches the TLS configurations.
pub struct TlsContext {
    manager: Arc<SecretManager>,
    roots: Arc<RootCertStore>,
    servers: Mutex<HashMap<Identity, Arc<ServerConfig>>>,
    clients: Mutex<HashMap<ClientKey, Arc<ClientConfig>>>,
}

impl TlsContext {
    pub fn new(manager: Arc<SecretManager>) -> Result<TlsContext, Error> {
        let mut roots = RootCertStore::empty();
        for r in manager.roots() {
            roots.add(r.clone())?;
        }
        Ok(TlsContext {
            manager,
            roots: Arc::new(roots),
            servers: Mutex::default(),
            clients: Mutex::default(),
        })
    }

    pub fn manager(&self) -> &Arc<SecretManager> {
        &self.manager
    }

    /// The server side for connections dialed to a workload with identity `id`.
    pub fn server_config(&self, id: &Identity) -> Result<Arc<ServerConfig>, Error> {
        if let Some(c) = self.servers.lock().unwrap().get(id) {
            return Ok(c.clone());
        }
        let cfg = server_config(
            self.roots.clone(),
            self.manager.trust_domain(),
            Arc::new(IdentityResolver {
                manager: self.manager.clone(),
                id: id.clone(),
            }),
        )?;
        self.servers.lock().unwrap().insert(id.clone(), cfg.clone());
        Ok(cfg)
    }

    /// The client side for `src` talking to a server that must be one of `expected`.
    pub fn client_config(
        &self,
        src: &Identity,
        expected: &[Identity],
    ) -> Result<Arc<ClientConfig>, Error> {
        let key = (src.clone(), expected.to_vec());
        if let Some(c) = self.clients.lock().unwrap().get(&key) {
            return Ok(c.clone());
        }
        let cfg = client_config(
            self.roots.clone(),
            expected.to_vec(),
            Arc::new(IdentityResolver {
                manager: self.manager.clone(),
                id: src.clone(),
            }),
        )?;
        self.clients.lock().unwrap().insert(key, cfg.clone());
        Ok(cfg)
    }
}

/// A server configuration presenting `cert` (any resolver): TLS 1.3, ALPN h2, a client
/// certificate of `trust_domain` required. Public so tests can stand in for a peer.
pub fn server_config(
    roots: Arc<RootCertStore>,
    trust_domain: &str,
    cert: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = MeshClientVerifier::new(roots, trust_domain)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection proves its identity with the current certificate.
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A client configuration presenting `cert` (any resolver) and expecting one of `expected`.
/// Public so tests can build clients with arbitrary certificates.
pub fn client_config(
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    cert: Arc<dyn ResolvesClientCert>,
) -> Result<Arc<ClientConfig>, Error> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshServerVerifier { roots, expected }))
        .with_client_cert_resolver(cert);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Resolves to the manager's current certificate of one identity (server and client side).
#[derive(Debug)]
struct IdentityResolver {
    manager: Arc<SecretManager>,
    id: Identity,
}

impl IdentityResolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        match self.manager.fetch(&self.id) {
            Ok(c) => Some(c.certified.clone()),
            Err(e) => {
                tracing::warn!(identity = %self.id, error = %e, "no certificate to present");
                None
            }
        }
    }
}

impl std::fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretManager")
    }
}

impl ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for IdentityResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A fixed certificate (tests, tools).
#[derive(Debug)]
pub struct FixedCert(pub Arc<CertifiedKey>);

impl ResolvesClientCert for FixedCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn bad_san(e: impl std::fmt::Display) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        std::io::Error::other(e.to_string()),
    ))))
}

/// Server side: chain to our roots (webpki, client-auth usage, validity) and a SPIFFE SAN in
/// our trust domain.
#[derive(Debug)]
pub struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl MeshClientVerifier {
    pub fn new(roots: Arc<RootCertStore>, trust_domain: &str) -> Result<Self, Error> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| Error::General(e.to_string()))?;
        Ok(MeshClientVerifier {
            inner,
            trust_domain: trust_domain.to_string(),
        })
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        identity_in_trust_domain(end_entity, &self.trust_domain).map_err(bad_san)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: chain to our roots and a SAN equal to one of the expected identities.
#[derive(Debug)]
pub struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        let cert = crate::identity::CertInfo::parse(end_entity).map_err(bad_san)?;
        let id = cert.identity().map_err(bad_san)?;
        if !self.expected.contains(&id) {
            return Err(bad_san(format!(
                "server identity {id} is not the expected {}",
                self.expected
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    crate::identity::CertInfo::parse(leaf).ok()?.identity().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Ca;
    use std::time::{Duration, SystemTime};

    fn roots(ca: &Ca) -> Arc<RootCertStore> {
        let mut r = RootCertStore::empty();
        r.add(ca.root_der().clone()).unwrap();
        Arc::new(r)
    }

    fn chain(ca: &Ca, id: &Identity, start: SystemTime, life: u64) -> Vec<CertificateDer<'static>> {
        let m = ca.mint(id, start, Duration::from_secs(life)).unwrap();
        vec![m.cert_der, ca.root_der().clone()]
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn client_verifier_wants_our_chain_and_trust_domain() {
        let ca = Ca::generate("cluster.local").unwrap();
        let v = MeshClientVerifier::new(roots(&ca), "cluster.local").unwrap();
        assert!(v.client_auth_mandatory());
        let t = SystemTime::now() - Duration::from_secs(10);
        let good = chain(&ca, &Identity::new("cluster.local", "a", "b"), t, 600);
        assert!(v.verify_client_cert(&good[0], &good[1..], now()).is_ok());
        // Same CA, another trust domain: refused by the SAN check.
        let foreign = chain(&ca, &Identity::new("evil.org", "a", "b"), t, 600);
        let err = v
            .verify_client_cert(&foreign[0], &foreign[1..], now())
            .unwrap_err();
        assert!(err.to_string().contains("trust domain"), "{err}");
        // Expired.
        let old = SystemTime::now() - Duration::from_secs(7200);
        let expired = chain(&ca, &Identity::new("cluster.local", "a", "b"), old, 600);
        let err = v
            .verify_client_cert(&expired[0], &expired[1..], now())
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                )
            ),
            "{err:?}"
        );
        // Another CA.
        let other = Ca::generate("cluster.local").unwrap();
        let stranger = chain(&other, &Identity::new("cluster.local", "a", "b"), t, 600);
        assert!(v
            .verify_client_cert(&stranger[0], &stranger[1..], now())
            .is_err());
    }

    #[test]
    fn server_verifier_wants_the_expected_identity() {
        let ca = Ca::generate("cluster.local").unwrap();
        let want = Identity::new("cluster.local", "demo", "echo");
        let v = MeshServerVerifier {
            roots: roots(&ca),
            expected: vec![want.clone()],
        };
        let name = ServerName::try_from("10.0.0.1").unwrap();
        let t = SystemTime::now() - Duration::from_secs(10);
        let good = chain(&ca, &want, t, 600);
        assert!(v
            .verify_server_cert(&good[0], &good[1..], &name, &[], now())
            .is_ok());
        let wrong = chain(
            &ca,
            &Identity::new("cluster.local", "demo", "other"),
            t,
            600,
        );
        let err = v
            .verify_server_cert(&wrong[0], &wrong[1..], &name, &[], now())
            .unwrap_err();
        assert!(err.to_string().contains("not the expected"), "{err}");
        let other = Ca::generate("cluster.local").unwrap();
        let stranger = chain(&other, &want, t, 600);
        assert!(v
            .verify_server_cert(&stranger[0], &stranger[1..], &name, &[], now())
            .is_err());
    }

    #[test]
    fn provider_offers_only_aes_gcm_tls13() {
        let p = provider();
        assert_eq!(p.cipher_suites.len(), 2);
        for s in &p.cipher_suites {
            let name = format!("{:?}", s.suite());
            assert!(
                name.starts_with("TLS13_AES_") && name.contains("GCM"),
                "{name}"
            );
        }
    }
}
