//! Identities and certificates: SPIFFE IDs, the embedded CA, the certificate store.
//!
//! The [`SecretManager`] holds one certificate per identity of a workload on this node. With the
//! embedded [`Ca`] it mints them (ECDSA P-256, one URI SAN) and re-mints them at half-life; with
//! a certificate directory it (re)loads them from files. The TLS layer asks it for the current
//! certificate at every handshake, so rotation never touches open connections. Private keys
//! never leave this module except inside rustls' `CertifiedKey`, and never reach a log or a dump.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Serialize, Serializer};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("not a SPIFFE identity {0:?} (want spiffe://<td>/ns/<ns>/sa/<sa>)")]
    BadSpiffeId(String),
    #[error("certificate: {0}")]
    BadCert(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoSan,
    #[error("certificate has {0} URI SANs, want exactly one")]
    ManySans(usize),
    #[error("trust domain {got:?} is not ours ({want:?})")]
    WrongTrustDomain { got: String, want: String },
    #[error("no certificate for {0}: it is not a workload of this node")]
    NotLocal(Identity),
    #[error("no certificate for {0} in the certificate directory")]
    Missing(Identity),
    #[error("minting: {0}")]
    Mint(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] rustls::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(td: &str, ns: &str, sa: &str) -> Identity {
        Identity {
            trust_domain: td.to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        }
    }

    /// Istio's "principal": the SPIFFE ID without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::BadSpiffeId(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What the dumps show of a certificate: never the key.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub sans: Vec<String>,
    #[serde(serialize_with = "ser_time")]
    pub not_before: SystemTime,
    #[serde(serialize_with = "ser_time")]
    pub not_after: SystemTime,
}

fn ser_time<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&rfc3339(*t))
}

/// RFC 3339 in UTC, seconds precision.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(dt) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            dt.year(),
            dt.month() as u8,
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        ),
        Err(_) => secs.to_string(),
    }
}

impl CertInfo {
    /// Reads subject, issuer, serial, SANs and validity from a DER certificate.
    pub fn parse(der: &[u8]) -> Result<CertInfo, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::BadCert(e.to_string()))?;
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                use x509_parser::extensions::GeneralName;
                match name {
                    GeneralName::URI(u) => sans.push(u.to_string()),
                    GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                    GeneralName::IPAddress(ip) => sans.push(format!("IP:{ip:?}")),
                    other => sans.push(format!("{other:?}")),
                }
            }
        }
        let to_system = |t: &x509_parser::time::ASN1Time| {
            let ts = t.timestamp();
            if ts >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(ts as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            sans,
            not_before: to_system(&cert.validity().not_before),
            not_after: to_system(&cert.validity().not_after),
        })
    }

    /// The single SPIFFE identity of the certificate (exactly one URI SAN).
    pub fn identity(&self) -> Result<Identity, IdentityError> {
        let uris: Vec<&String> = self.sans.iter().filter(|s| s.contains("://")).collect();
        match uris.as_slice() {
            [] => Err(IdentityError::NoSan),
            [one] => one.parse(),
            many => Err(IdentityError::ManySans(many.len())),
        }
    }

    /// When the certificate should be replaced: half-way through its validity.
    pub fn half_life(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// The identity a certificate carries, checked against our trust domain.
pub fn identity_in_trust_domain(der: &[u8], td: &str) -> Result<Identity, IdentityError> {
    let id = CertInfo::parse(der)?.identity()?;
    if id.trust_domain != td {
        return Err(IdentityError::WrongTrustDomain {
            got: id.trust_domain,
            want: td.to_string(),
        });
    }
    Ok(id)
}

/// A certificate with its key, ready for rustls.
pub struct WorkloadCert {
    pub identity: Identity,
    pub info: CertInfo,
    pub certified: Arc<CertifiedKey>,
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    pub fn from_der(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<WorkloadCert, IdentityError> {
        let leaf = chain.first().ok_or(IdentityError::NoSan)?;
        let info = CertInfo::parse(leaf)?;
        // Checks that the key belongs to the leaf.
        let certified = CertifiedKey::from_der(chain, key, &crate::tls::provider())?;
        Ok(WorkloadCert {
            identity,
            info,
            certified: Arc::new(certified),
        })
    }

    pub fn needs_rotation(&self, now: SystemTime) -> bool {
        now >= self.info.half_life()
    }
}

/// A freshly minted certificate in both encodings (the PEM key is for writing files).
pub struct Minted {
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_der: PrivateKeyDer<'static>,
    pub key_pem: String,
}

/// The embedded CA: a self-signed ECDSA P-256 root that signs workload certificates.
pub struct Ca {
    trust_domain: String,
    root_der: CertificateDer<'static>,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";

impl Ca {
    /// A new root, in memory.
    pub fn generate(trust_domain: &str) -> Result<Ca, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "ambient-node ztunnel CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let root_pem = cert.pem();
        let root_der = cert.der().clone();
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            root_der,
            root_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `<dir>/root-cert.pem` and `<dir>/root-key.pem`, or creates them (key mode 0600)
    /// when neither exists. Returns the CA and whether it was created. Two processes creating
    /// the same directory at once end up sharing one root.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<(Ca, bool), IdentityError> {
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        if !cert_path.exists() && !key_path.exists() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            let ca = Ca::generate(trust_domain)?;
            let tmp = |name: &str| dir.join(format!(".{name}.{}", std::process::id()));
            let (tmp_key, tmp_cert) = (tmp(ROOT_KEY), tmp(ROOT_CERT));
            write_private(&tmp_key, ca.issuer.key().serialize_pem().as_bytes())?;
            std::fs::write(&tmp_cert, ca.root_pem.as_bytes()).map_err(io_err(&tmp_cert))?;
            // hard_link fails when the name exists: the first process to link its key wins.
            let won = std::fs::hard_link(&tmp_key, &key_path).is_ok()
                && std::fs::hard_link(&tmp_cert, &cert_path).is_ok();
            let _ = std::fs::remove_file(&tmp_key);
            let _ = std::fs::remove_file(&tmp_cert);
            if won {
                return Ok((ca, true));
            }
        }
        // Loading: wait a little for a concurrent creator to finish linking both files.
        for _ in 0..50 {
            if cert_path.exists() && key_path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        Ok((Ca::from_pem(&cert_pem, &key_pem, trust_domain)?, false))
    }

    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        trust_domain: &str,
    ) -> Result<Ca, IdentityError> {
        let key = KeyPair::from_pem(key_pem)?;
        let root_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| IdentityError::BadCert(format!("root certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&root_der, key)?;
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            root_der,
            root_pem: cert_pem.to_string(),
            issuer,
        })
    }

    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A leaf for `id`, valid from `not_before` for `lifetime`. The identity's trust domain is
    /// not checked here: tests mint foreign ones on purpose.
    pub fn mint(
        &self,
        id: &Identity,
        not_before: SystemTime,
        lifetime: Duration,
    ) -> Result<Minted, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, id.trust_domain.as_str());
        params.distinguished_name = dn;
        let uri = rcgen::string::Ia5String::try_from(id.to_string())?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_before + lifetime);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Minted {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_der: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            key_pem: key.serialize_pem(),
        })
    }

    /// Mints and wraps for rustls: chain = leaf + root.
    pub fn mint_workload_cert(
        &self,
        id: &Identity,
        not_before: SystemTime,
        lifetime: Duration,
    ) -> Result<WorkloadCert, IdentityError> {
        let m = self.mint(id, not_before, lifetime)?;
        WorkloadCert::from_der(
            id.clone(),
            vec![m.cert_der, self.root_der.clone()],
            m.key_der,
        )
    }

    /// Writes a certificate directory for `ids` (the layout `--cert-dir` reads).
    pub fn write_cert_dir(
        &self,
        dir: &Path,
        ids: &[Identity],
        lifetime: Duration,
    ) -> Result<(), IdentityError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let root = dir.join(ROOT_CERT);
        std::fs::write(&root, &self.root_pem).map_err(io_err(&root))?;
        for id in ids {
            let m = self.mint(id, SystemTime::now() - Duration::from_secs(60), lifetime)?;
            let d = dir.join(&id.namespace).join(&id.service_account);
            std::fs::create_dir_all(&d).map_err(io_err(&d))?;
            let chain = d.join(CERT_CHAIN);
            std::fs::write(&chain, format!("{}{}", m.cert_pem, self.root_pem))
                .map_err(io_err(&chain))?;
            write_private(&d.join(KEY), m.key_pem.as_bytes())?;
        }
        Ok(())
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    for x in &mut b {
        *x = fastrand::u8(..);
    }
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&b)
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Where the manager's certificates come from.
pub enum CertProvider {
    Ca(Arc<Ca>),
    Dir(PathBuf),
}

/// The certificate store: one current certificate per local identity.
pub struct SecretManager {
    trust_domain: String,
    provider: CertProvider,
    lifetime: Duration,
    roots: Vec<CertificateDer<'static>>,
    certs: RwLock<HashMap<Identity, Arc<WorkloadCert>>>,
    wanted: RwLock<HashSet<Identity>>,
}

impl SecretManager {
    /// The certificates of `source`: the embedded CA (its root created on first start when the
    /// directory has none) or a directory of ready-made certificates.
    pub fn from_source(
        source: &crate::config::CertSource,
        trust_domain: &str,
        lifetime: Duration,
    ) -> anyhow::Result<SecretManager> {
        use anyhow::Context;
        Ok(match source {
            crate::config::CertSource::Ca(dir) => {
                let (ca, created) = Ca::load_or_create(dir, trust_domain)
                    .with_context(|| format!("CA in {}", dir.display()))?;
                let root = dir.join(ROOT_CERT);
                if created {
                    tracing::info!(root = %root.display(), key = %dir.join(ROOT_KEY).display(),
                        "created a new CA root (share this directory between nodes of one mesh)");
                } else {
                    tracing::info!(root = %root.display(), "loaded the CA root");
                }
                SecretManager::with_ca(Arc::new(ca), lifetime)
            }
            crate::config::CertSource::Dir(dir) => SecretManager::with_dir(dir, trust_domain)
                .with_context(|| format!("certificate directory {}", dir.display()))?,
        })
    }

    pub fn with_ca(ca: Arc<Ca>, lifetime: Duration) -> SecretManager {
        SecretManager {
            trust_domain: ca.trust_domain.clone(),
            roots: vec![ca.root_der.clone()],
            provider: CertProvider::Ca(ca),
            lifetime,
            certs: RwLock::default(),
            wanted: RwLock::default(),
        }
    }

    /// Reads the trust anchors of `<dir>/root-cert.pem`; workload certificates are read on
    /// [`refresh`](Self::refresh).
    pub fn with_dir(dir: &Path, trust_domain: &str) -> Result<SecretManager, IdentityError> {
        let root_path = dir.join(ROOT_CERT);
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&root_path)
            .map_err(|e| IdentityError::BadCert(format!("{}: {e}", root_path.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| IdentityError::BadCert(format!("{}: {e}", root_path.display())))?;
        if roots.is_empty() {
            return Err(IdentityError::BadCert(format!(
                "{}: no certificate",
                root_path.display()
            )));
        }
        Ok(SecretManager {
            trust_domain: trust_domain.to_string(),
            provider: CertProvider::Dir(dir.to_path_buf()),
            lifetime: Duration::ZERO,
            roots,
            certs: RwLock::default(),
            wanted: RwLock::default(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust anchors peers must chain to.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The identities of this node's workloads: the only ones we hold certificates for.
    pub fn set_wanted(&self, ids: HashSet<Identity>) {
        *self.wanted.write().unwrap() = ids;
    }

    pub fn is_wanted(&self, id: &Identity) -> bool {
        self.wanted.read().unwrap().contains(id)
    }

    /// The current certificate of a local identity; minted on the spot if the CA has none yet.
    pub fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        if !self.is_wanted(id) {
            return Err(IdentityError::NotLocal(id.clone()));
        }
        if let Some(c) = self.certs.read().unwrap().get(id) {
            return Ok(c.clone());
        }
        match &self.provider {
            CertProvider::Ca(ca) => {
                let cert = Arc::new(self.mint(ca, id, SystemTime::now())?);
                let mut certs = self.certs.write().unwrap();
                Ok(certs.entry(id.clone()).or_insert(cert).clone())
            }
            CertProvider::Dir(_) => Err(IdentityError::Missing(id.clone())),
        }
    }

    fn mint(&self, ca: &Ca, id: &Identity, now: SystemTime) -> Result<WorkloadCert, IdentityError> {
        // Backdated a minute for clock skew between nodes.
        let skew = Duration::from_secs(60).min(self.lifetime / 4);
        let cert = ca.mint_workload_cert(id, now - skew, self.lifetime + skew)?;
        tracing::info!(identity = %id, serial = %cert.info.serial,
            expires = %rfc3339(cert.info.not_after), "certificate minted");
        Ok(cert)
    }

    /// Brings the store up to date at `now`: mints missing certificates and replaces those past
    /// half-life (CA), or reloads the directory's files (Dir); forgets identities no longer
    /// wanted. Returns the identities whose certificate changed.
    pub fn refresh(&self, now: SystemTime) -> Vec<Identity> {
        let wanted: Vec<Identity> = self.wanted.read().unwrap().iter().cloned().collect();
        let mut changed = Vec::new();
        for id in &wanted {
            let current = self.certs.read().unwrap().get(id).cloned();
            let fresh = match &self.provider {
                CertProvider::Ca(ca) => match &current {
                    Some(c) if !c.needs_rotation(now) => continue,
                    _ => self.mint(ca, id, now),
                },
                CertProvider::Dir(dir) => match load_dir_cert(dir, id, &self.trust_domain) {
                    Ok(c)
                        if current.as_ref().map(|cur| cur.info.serial != c.info.serial)
                            != Some(false) =>
                    {
                        Ok(c)
                    }
                    Ok(_) => continue,
                    Err(e) => Err(e),
                },
            };
            match fresh {
                Ok(c) => {
                    self.certs.write().unwrap().insert(id.clone(), Arc::new(c));
                    changed.push(id.clone());
                }
                Err(e) => tracing::warn!(identity = %id, error = %e, "no certificate"),
            }
        }
        let wanted: HashSet<Identity> = wanted.into_iter().collect();
        self.certs
            .write()
            .unwrap()
            .retain(|id, _| wanted.contains(id));
        changed
    }

    /// How long until the next certificate needs rotating (for the refresh loop).
    pub fn next_rotation(&self, now: SystemTime) -> Option<Duration> {
        self.certs
            .read()
            .unwrap()
            .values()
            .map(|c| c.info.half_life().duration_since(now).unwrap_or_default())
            .min()
    }

    /// Certificates for the dump (no keys).
    pub fn dump(&self) -> Vec<serde_json::Value> {
        let certs = self.certs.read().unwrap();
        let mut out: Vec<_> = certs
            .values()
            .map(|c| {
                serde_json::json!({
                    "identity": c.identity,
                    "certificate": c.info,
                    "rotateAt": rfc3339(c.info.half_life()),
                    "chainLength": c.certified.cert.len(),
                })
            })
            .collect();
        out.sort_by_key(|v| v["identity"].to_string());
        out
    }
}

fn load_dir_cert(dir: &Path, id: &Identity, td: &str) -> Result<WorkloadCert, IdentityError> {
    let d = dir.join(&id.namespace).join(&id.service_account);
    let chain_path = d.join(CERT_CHAIN);
    let key_path = d.join(KEY);
    if !chain_path.exists() {
        return Err(IdentityError::Missing(id.clone()));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&chain_path)
        .map_err(|e| IdentityError::BadCert(format!("{}: {e}", chain_path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::BadCert(format!("{}: {e}", chain_path.display())))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| IdentityError::BadCert(format!("{}: {e}", key_path.display())))?;
    let cert = WorkloadCert::from_der(id.clone(), chain, key)?;
    let got = cert.info.identity()?;
    if got.trust_domain != td {
        return Err(IdentityError::WrongTrustDomain {
            got: got.trust_domain,
            want: td.to_string(),
        });
    }
    if &got != id {
        return Err(IdentityError::BadCert(format!(
            "{} carries {got}, expected {id}",
            chain_path.display()
        )));
    }
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa)
    }

    #[test]
    fn spiffe_ids_round_trip_and_bad_ones_are_refused() {
        let i: Identity = "spiffe://cluster.local/ns/demo/sa/sleep".parse().unwrap();
        assert_eq!(i, id("demo", "sleep"));
        assert_eq!(i.to_string(), "spiffe://cluster.local/ns/demo/sa/sleep");
        assert_eq!(i.principal(), "cluster.local/ns/demo/sa/sleep");
        for bad in [
            "cluster.local/ns/demo/sa/sleep",
            "spiffe://cluster.local/ns/demo",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe://cluster.local/ns/demo/sa/x/y",
            "spiffe://cluster.local/sa/demo/ns/x",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn minted_cert_carries_one_uri_san_and_the_lifetime() {
        let ca = Ca::generate("cluster.local").unwrap();
        let start = SystemTime::now();
        let m = ca
            .mint(&id("demo", "sleep"), start, Duration::from_secs(3600))
            .unwrap();
        let info = CertInfo::parse(&m.cert_der).unwrap();
        assert_eq!(info.sans, vec!["spiffe://cluster.local/ns/demo/sa/sleep"]);
        assert_eq!(info.identity().unwrap(), id("demo", "sleep"));
        let life = info.not_after.duration_since(info.not_before).unwrap();
        assert_eq!(life.as_secs(), 3600);
        assert!(info.issuer.contains("ztunnel CA"), "{}", info.issuer);
        assert_eq!(
            identity_in_trust_domain(&m.cert_der, "cluster.local").unwrap(),
            id("demo", "sleep")
        );
        assert!(matches!(
            identity_in_trust_domain(&m.cert_der, "other.domain"),
            Err(IdentityError::WrongTrustDomain { .. })
        ));
        // The root carries no URI SAN.
        let root = CertInfo::parse(ca.root_der()).unwrap();
        assert!(matches!(root.identity(), Err(IdentityError::NoSan)));
    }

    #[test]
    fn ca_persists_and_reloads_the_same_root() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
        assert!(created);
        let (b, created) = Ca::load_or_create(dir.path(), "cluster.local").unwrap();
        assert!(!created);
        assert_eq!(a.root_der(), b.root_der());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(ROOT_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "root key must not be readable by others");
        // A leaf minted by the reloaded CA chains to the original root.
        let leaf = b
            .mint_workload_cert(&id("a", "b"), SystemTime::now(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(leaf.certified.cert[1], *a.root_der());
    }

    #[test]
    fn manager_mints_only_local_identities_and_rotates_at_half_life() {
        let ca = Arc::new(Ca::generate("cluster.local").unwrap());
        let m = SecretManager::with_ca(ca, Duration::from_secs(3600));
        let local = id("demo", "sleep");
        assert!(matches!(m.fetch(&local), Err(IdentityError::NotLocal(_))));
        m.set_wanted([local.clone()].into());
        let t0 = SystemTime::now();
        assert_eq!(m.refresh(t0), vec![local.clone()]);
        let first = m.fetch(&local).unwrap();
        // Before half-life: nothing changes.
        assert!(m.refresh(t0 + Duration::from_secs(1000)).is_empty());
        assert_eq!(m.fetch(&local).unwrap().info.serial, first.info.serial);
        let until = m.next_rotation(t0).unwrap();
        assert!(
            until > Duration::from_secs(1700) && until <= Duration::from_secs(1800),
            "{until:?}"
        );
        // Past half-life: a new certificate, the old Arc stays usable by whoever holds it.
        assert_eq!(
            m.refresh(t0 + Duration::from_secs(1801)),
            vec![local.clone()]
        );
        let second = m.fetch(&local).unwrap();
        assert_ne!(second.info.serial, first.info.serial);
        assert!(first.certified.cert.len() == 2);
        // No longer local: forgotten.
        m.set_wanted(HashSet::new());
        m.refresh(t0);
        assert!(m.dump().is_empty());
    }

    #[test]
    fn dump_has_no_key_material() {
        let ca = Arc::new(Ca::generate("cluster.local").unwrap());
        let m = SecretManager::with_ca(ca, Duration::from_secs(3600));
        m.set_wanted([id("demo", "sleep")].into());
        m.refresh(SystemTime::now());
        let text = serde_json::to_string(&m.dump()).unwrap();
        assert!(text.contains("spiffe://cluster.local/ns/demo/sa/sleep"));
        assert!(!text.contains("PRIVATE"), "{text}");
        assert!(!text.to_lowercase().contains("\"key\""), "{text}");
    }

    #[test]
    fn cert_dir_is_loaded_and_checked() {
        let ca = Ca::generate("cluster.local").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let good = id("demo", "sleep");
        ca.write_cert_dir(
            dir.path(),
            std::slice::from_ref(&good),
            Duration::from_secs(600),
        )
        .unwrap();
        let m = SecretManager::with_dir(dir.path(), "cluster.local").unwrap();
        assert_eq!(m.roots().len(), 1);
        m.set_wanted([good.clone(), id("demo", "missing")].into());
        assert_eq!(m.refresh(SystemTime::now()), vec![good.clone()]);
        assert!(m.fetch(&good).is_ok());
        assert!(matches!(
            m.fetch(&id("demo", "missing")),
            Err(IdentityError::Missing(_))
        ));
        // Unchanged files: nothing reloaded. A rewritten file: picked up.
        assert!(m.refresh(SystemTime::now()).is_empty());
        ca.write_cert_dir(
            dir.path(),
            std::slice::from_ref(&good),
            Duration::from_secs(600),
        )
        .unwrap();
        assert_eq!(m.refresh(SystemTime::now()), vec![good.clone()]);
        // A certificate for another identity under this name is refused.
        let other = Ca::generate("cluster.local").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        other
            .write_cert_dir(
                tmp.path(),
                &[id("demo", "intruder")],
                Duration::from_secs(600),
            )
            .unwrap();
        std::fs::copy(
            tmp.path().join("demo/intruder").join(CERT_CHAIN),
            dir.path().join("demo/sleep").join(CERT_CHAIN),
        )
        .unwrap();
        assert!(load_dir_cert(dir.path(), &good, "cluster.local").is_err());
    }
}
