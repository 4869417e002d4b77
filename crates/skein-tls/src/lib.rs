//! The cluster's private PKI: one self-signed CA per cluster, one certificate
//! per node, and the rustls configurations that make gossip mutually
//! authenticated.
//!
//! Trust is "signed by the cluster CA", nothing else: there is no public PKI
//! and no hostname to check, because peers are dialled by address. Every node
//! certificate therefore carries the same DNS SAN, [`SERVER_NAME`], which a
//! dialer uses as the TLS server name; the node's identity is the certificate
//! CN, read back with [`peer_node_id`].

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// DNS SAN carried by every node certificate; dialers verify the peer's chain
/// and this name, since all they know about a peer is its address.
pub const SERVER_NAME: &str = "skein-node";

/// ALPN protocol of the gossip transport. Bumping it is how an incompatible
/// wire change keeps old and new nodes from talking past each other.
pub const ALPN: &[u8] = b"skein-gossip/1";

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const NODE_CERT_FILE: &str = "node.pem";
pub const NODE_KEY_FILE: &str = "node-key.pem";

/// What can go wrong with the cluster's certificates and keys. Messages
/// name the file and what is wrong with it; `{e:#}`-style chains come from
/// [`TlsError::Context`].
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file or value that is not what it must be; the message says which.
    #[error("{0}")]
    Invalid(String),
    /// What was being done, and what failed underneath.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

pub type Result<T, E = TlsError> = std::result::Result<T, E>;

/// `anyhow::Context`'s two methods, for this crate's error.
trait Context<T> {
    fn context(self, context: &str) -> Result<T>;
    fn with_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, context: &str) -> Result<T> {
        self.with_context(|| context.to_string())
    }

    fn with_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| TlsError::Context {
            context: context(),
            source: Box::new(e),
        })
    }
}

macro_rules! bail {
    ($($arg:tt)*) => { return Err(TlsError::Invalid(format!($($arg)*))) };
}

macro_rules! anyhow {
    ($($arg:tt)*) => { TlsError::Invalid(format!($($arg)*)) };
}

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 60 * 60);
const NODE_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Certificates start being valid a day in the past so that a node whose
/// clock lags the issuing machine's still accepts fresh certificates.
const BACKDATE: Duration = DAY;

/// Creates the cluster CA in `dir`: `ca.pem` (distributed to every node) and
/// `ca-key.pem` (mode 0600, kept by the operator only).
///
/// Refuses to overwrite an existing CA: replacing it would silently orphan
/// every node certificate already issued.
pub fn init_ca(dir: &Path, cluster_id: &str) -> Result<()> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            bail!(
                "refusing to overwrite existing CA file {}; remove it first if you really want a new cluster CA",
                path.display()
            );
        }
    }
    fs::create_dir_all(dir).with_context(|| format!("creating CA directory {}", dir.display()))?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(&format!("skein cluster CA {cluster_id}"));
    // Path length 0: the CA signs node certificates directly, never
    // intermediates, so a leaked node key can never mint other nodes.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY);
    let cert = params
        .self_signed(&key)
        .context("self-signing CA certificate")?;

    // Key first and with create_new: if anything races us, we fail instead of
    // clobbering a key that a just-written ca.pem would no longer match.
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Issues a certificate for `node_id` signed by the CA in `ca_dir` and writes
/// `ca.pem`, `node.pem` and `node-key.pem` (mode 0600) into `out_dir`, which
/// is then everything [`NodeTls::load`] needs. Existing node files in
/// `out_dir` are replaced (re-issuing is how a node key is rotated).
pub fn issue_node(ca_dir: &Path, node_id: &str, out_dir: &Path) -> Result<()> {
    if node_id.is_empty() {
        bail!("node id must not be empty");
    }
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = read_to_string(&ca_cert_path)?;
    let ca_key_pem = read_to_string(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{} is not a valid private key", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("{} is not a valid CA certificate", ca_cert_path.display()))?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating node key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(node_id);
    params.subject_alt_names = vec![SanType::DnsName(
        SERVER_NAME.try_into().context("the server name")?,
    )];
    // The node id as a second SAN is a convenience for tools that dial a node
    // by name; ids that are not DNS names (or are IPs) simply don't get one.
    if node_id != SERVER_NAME && is_dns_name(node_id) {
        params
            .subject_alt_names
            .push(SanType::DnsName(node_id.try_into().context("the node id")?));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every node is both a QUIC server (accepting gossip) and a client
    // (dialling peers) with the same certificate.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, NODE_VALIDITY);
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing node certificate")?;

    // rcgen does not check that ca-key.pem belongs to ca.pem; a mismatch
    // would yield certificates every peer rejects. Verify before writing.
    let roots = root_store(&ca_pem, &ca_cert_path)?;
    verify_chain(&roots, cert.der()).with_context(|| {
        format!(
            "issued certificate does not verify against {}; does {} belong to it?",
            ca_cert_path.display(),
            ca_key_path.display()
        )
    })?;

    fs::create_dir_all(out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;
    // Written via temp file + rename, so out_dir == ca_dir is safe and a
    // crash never leaves a half-written key next to a new certificate.
    write_replace(
        &out_dir.join(NODE_KEY_FILE),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_replace(&out_dir.join(NODE_CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    write_replace(&out_dir.join(CA_CERT_FILE), ca_pem.as_bytes(), 0o644)?;
    Ok(())
}

/// A node's TLS identity: its certificate chain and key, and the cluster CA
/// it trusts.
pub struct NodeTls {
    node_id: String,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

impl std::fmt::Debug for NodeTls {
    // Hand-written so the private key can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("node_id", &self.node_id)
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Loads `ca.pem`, `node.pem` and `node-key.pem` from `dir` and checks
    /// that they fit together (certificate signed by the CA, key matching the
    /// certificate), so a misconfiguration fails at startup rather than as
    /// handshake errors on every peer.
    pub fn load(dir: &Path) -> Result<NodeTls> {
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(NODE_CERT_FILE);
        let key_path = dir.join(NODE_KEY_FILE);

        let roots = Arc::new(root_store(&read_to_string(&ca_path)?, &ca_path)?);
        let certs = CertificateDer::pem_slice_iter(&read(&cert_path)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("{}: invalid PEM: {e}", cert_path.display()))?;
        let leaf = certs
            .first()
            .ok_or_else(|| anyhow!("{}: no certificate found", cert_path.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?)
            .map_err(|e| anyhow!("{}: no usable private key: {e}", key_path.display()))?;
        let node_id = peer_node_id(leaf).ok_or_else(|| {
            anyhow!(
                "{}: certificate has no readable common name (node id)",
                cert_path.display()
            )
        })?;
        verify_chain(&roots, leaf).with_context(|| {
            format!(
                "{} is not a valid node certificate of the CA in {}",
                cert_path.display(),
                ca_path.display()
            )
        })?;

        let tls = NodeTls {
            node_id,
            certs,
            key,
            roots,
        };
        // Building a config is what checks the key against the certificate.
        tls.server_config().with_context(|| {
            format!(
                "{} does not match {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
        Ok(tls)
    }

    /// This node's id, the CN of its certificate.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// A secret that is the same every time this node starts (derived from
    /// its private key) and unknown to anyone without that key. QUIC uses it
    /// for stateless-reset tokens: a node restarted on the same address can
    /// then tell peers at once that their connection to its previous life is
    /// gone, instead of letting them send into it until the idle timeout.
    pub fn stateless_reset_secret(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"skein quic stateless reset v1\0");
        ctx.update(self.key.secret_der());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// Server side of gossip: presents the node certificate and requires a
    /// client certificate chained to the cluster CA. TLS 1.3 only (QUIC).
    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .context("building client certificate verifier")?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .context("node certificate/key rejected by rustls")?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Client side of gossip: verifies the server's chain to the cluster CA
    /// and its [`SERVER_NAME`], and presents the node certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .context("node certificate/key rejected by rustls")?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// What gossip needs to sign what this node originates and to check what
/// others did: this node's certificate and key, and the cluster CA.
pub struct GossipSigner {
    node_id: String,
    cert: Vec<u8>,
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    verifier: Arc<WebPkiServerVerifier>,
}

impl std::fmt::Debug for GossipSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipSigner")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Length of a gossip signature (ECDSA P-256, fixed r||s encoding).
pub const GOSSIP_SIG_LEN: usize = 64;

impl GossipSigner {
    /// This node's certificate (DER): what proves its key to peers.
    pub fn identity(&self) -> &[u8] {
        &self.cert
    }

    pub fn sign(&self, msg: &[u8]) -> Option<[u8; GOSSIP_SIG_LEN]> {
        let sig = self.key.sign(&self.rng, msg).ok()?;
        sig.as_ref().try_into().ok()
    }

    /// Whether `cert_der` is a certificate the cluster CA issued for node
    /// `node_id` (and valid now).
    pub fn check_identity(&self, node_id: &str, cert_der: &[u8]) -> bool {
        let cert = CertificateDer::from(cert_der);
        let Ok(name) = ServerName::try_from(SERVER_NAME) else {
            return false;
        };
        peer_node_id(cert_der).as_deref() == Some(node_id)
            && self
                .verifier
                .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
                .is_ok()
    }

    /// Whether `sig` over `msg` was made with the key of `cert_der` (a
    /// certificate already accepted by [`GossipSigner::check_identity`]).
    pub fn verify(cert_der: &[u8], msg: &[u8], sig: &[u8]) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert_der) else {
            return false;
        };
        let key = &cert.public_key().subject_public_key.data;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, key)
            .verify(msg, sig)
            .is_ok()
    }
}

impl NodeTls {
    /// The signer for what this node publishes in gossip.
    pub fn gossip_signer(&self) -> Result<GossipSigner> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = match &self.key {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der(),
            _ => bail!("the node key must be PKCS#8 (as `skein cert issue` writes it)"),
        };
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &rng,
        )
        .map_err(|e| anyhow!("the node key is not an ECDSA P-256 key: {e}"))?;
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .context("building certificate verifier")?;
        let cert = self
            .certs
            .first()
            .ok_or_else(|| anyhow!("no node certificate"))?
            .to_vec();
        Ok(GossipSigner {
            node_id: self.node_id.clone(),
            cert,
            key,
            rng,
            verifier,
        })
    }
}

/// The node id (subject CN) of a peer certificate, or `None` if the DER
/// cannot be read or has no textual CN.
///
/// Only meaningful for a certificate rustls has already verified against
/// the cluster CA; this does no validation of its own.
pub fn peer_node_id(cert_der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const EXPLICIT_0: u8 = 0xa0;
    // 2.5.4.3, id-at-commonName.
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];

    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let cert = expect(der_tlv(cert_der)?, SEQUENCE)?;
    let mut tbs = expect(der_tlv(cert)?, SEQUENCE)?;
    // TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber,
    //   signature, issuer, validity, subject, ... }
    let (tag, _, rest) = der_tlv(tbs)?;
    if tag == EXPLICIT_0 {
        tbs = rest;
    }
    for _ in 0..4 {
        let (_, _, rest) = der_tlv(tbs)?;
        tbs = rest;
    }
    let mut rdns = expect(der_tlv(tbs)?, SEQUENCE)?;
    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
    while !rdns.is_empty() {
        let (tag, mut set, rest) = der_tlv(rdns)?;
        rdns = rest;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, attr, rest) = der_tlv(set)?;
            set = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_tlv(attr)?;
            if tag != OID || oid != CN_OID {
                continue;
            }
            let (tag, text, _) = der_tlv(value)?;
            // UTF8String, PrintableString, IA5String: all valid UTF-8. Other
            // string types are never produced by `issue_node`.
            return match tag {
                0x0c | 0x13 | 0x16 => std::str::from_utf8(text).ok().map(str::to_owned),
                _ => None,
            };
        }
    }
    None
}

/// Splits one DER tag-length-value off the front of `input`: returns
/// `(tag, contents, rest)`, or `None` if it is truncated or not DER
/// (indefinite or absurd lengths). Only single-byte tags, which is all X.509
/// needs up to the subject.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

fn expect<'a>((tag, contents, _): (u8, &'a [u8], &'a [u8]), want: u8) -> Option<&'a [u8]> {
    (tag == want).then_some(contents)
}

/// The ring provider, explicitly: the process-wide default may be unset or
/// be another provider installed by some other dependency.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "skein");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + validity).into();
}

fn is_dns_name(name: &str) -> bool {
    name.parse::<std::net::IpAddr>().is_err() && DnsName::try_from(name).is_ok()
}

fn root_store(ca_pem: &str, path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| anyhow!("{}: invalid PEM: {e}", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no CA certificate found", path.display());
    }
    Ok(roots)
}

/// Checks `leaf` the way a dialing peer will: chain to `roots`, validity
/// period, serverAuth, and the [`SERVER_NAME`] SAN.
fn verify_chain(roots: &RootCertStore, leaf: &CertificateDer<'_>) -> Result<()> {
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots.clone()), provider())
        .build()
        .context("building certificate verifier")?;
    let server_name = ServerName::try_from(SERVER_NAME).context("the server name")?;
    verifier
        .verify_server_cert(leaf, &[], &server_name, &[], UnixTime::now())
        .context("certificate chain")?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn read_to_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Creates `path` (failing if it exists) with `mode` from the first byte on,
/// so a key is never briefly readable by others.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Atomically replaces `path` with `contents` (temp file + rename).
fn write_replace(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", file_name.to_string_lossy()));
    // A leftover from a crashed run may have other permissions; start clean.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(dir: &Path, cluster_id: &str, node_id: &str) -> NodeTls {
        let ca = dir.join("ca");
        let node = dir.join(node_id);
        init_ca(&ca, cluster_id).unwrap();
        issue_node(&ca, node_id, &node).unwrap();
        NodeTls::load(&node).unwrap()
    }

    #[test]
    fn init_issue_load_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        let tls = cluster(tmp.path(), "c1", "node-1");
        assert_eq!(tls.node_id(), "node-1");
        assert_eq!(peer_node_id(&tls.certs[0]).as_deref(), Some("node-1"));
        tls.server_config().unwrap();
        tls.client_config().unwrap();

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [
                tmp.path().join("ca").join(CA_KEY_FILE),
                tmp.path().join("node-1").join(NODE_KEY_FILE),
            ] {
                let mode = fs::metadata(&key).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", key.display());
            }
        }
    }

    #[test]
    fn init_ca_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), "c1").unwrap();
        let before = fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();
        let err = init_ca(tmp.path(), "c1").unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err:#}");
        assert_eq!(fs::read(tmp.path().join(CA_KEY_FILE)).unwrap(), before);
    }

    #[test]
    fn issue_into_ca_dir_and_non_dns_node_id() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), "c1").unwrap();
        // Not a DNS name, so only the shared SAN; must still load and verify.
        issue_node(tmp.path(), "node 7/ä", tmp.path()).unwrap();
        let tls = NodeTls::load(tmp.path()).unwrap();
        assert_eq!(tls.node_id(), "node 7/ä");
    }

    #[test]
    fn load_names_the_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(&tmp.path().join("ca"), "c1").unwrap();
        issue_node(&tmp.path().join("ca"), "n", tmp.path()).unwrap();
        fs::remove_file(tmp.path().join(NODE_KEY_FILE)).unwrap();
        let err = format!("{:#}", NodeTls::load(tmp.path()).unwrap_err());
        assert!(err.contains(NODE_KEY_FILE), "{err}");
    }

    #[test]
    fn load_rejects_cert_from_other_ca() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(&tmp.path().join("a"), "a").unwrap();
        init_ca(&tmp.path().join("b"), "b").unwrap();
        issue_node(&tmp.path().join("a"), "n", &tmp.path().join("n")).unwrap();
        fs::copy(
            tmp.path().join("b").join(CA_CERT_FILE),
            tmp.path().join("n").join(CA_CERT_FILE),
        )
        .unwrap();
        let err = format!("{:#}", NodeTls::load(&tmp.path().join("n")).unwrap_err());
        assert!(err.contains(NODE_CERT_FILE), "{err}");
    }

    #[test]
    fn foreign_ca_cert_fails_verification() {
        let tmp = tempfile::tempdir().unwrap();
        let good = cluster(&tmp.path().join("a"), "a", "good");
        let foreign = cluster(&tmp.path().join("b"), "b", "foreign");

        // Server side: good's client verifier must refuse foreign's cert.
        let verifier = WebPkiClientVerifier::builder_with_provider(good.roots.clone(), provider())
            .build()
            .unwrap();
        let err = verifier
            .verify_client_cert(&foreign.certs[0], &[], UnixTime::now())
            .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
        // ...while accepting its own.
        verifier
            .verify_client_cert(&good.certs[0], &[], UnixTime::now())
            .unwrap();

        // Client side: a full in-memory handshake foreign -> good fails.
        let mut client = rustls::ClientConnection::new(
            Arc::new(foreign.client_config().unwrap()),
            ServerName::try_from(SERVER_NAME).unwrap(),
        )
        .unwrap();
        let mut server =
            rustls::ServerConnection::new(Arc::new(good.server_config().unwrap())).unwrap();
        assert!(handshake(&mut client, &mut server).is_err());

        // And the same handshake between two good nodes succeeds.
        let other = {
            issue_node(
                &tmp.path().join("a").join("ca"),
                "other",
                &tmp.path().join("o"),
            )
            .unwrap();
            NodeTls::load(&tmp.path().join("o")).unwrap()
        };
        let mut client = rustls::ClientConnection::new(
            Arc::new(other.client_config().unwrap()),
            ServerName::try_from(SERVER_NAME).unwrap(),
        )
        .unwrap();
        let mut server =
            rustls::ServerConnection::new(Arc::new(good.server_config().unwrap())).unwrap();
        handshake(&mut client, &mut server).unwrap();
        let peer = server.peer_certificates().unwrap();
        assert_eq!(peer_node_id(&peer[0]).as_deref(), Some("other"));
        assert_eq!(server.alpn_protocol(), Some(ALPN));
    }

    /// Pumps TLS records between the two sides until both finish or one fails.
    fn handshake(
        client: &mut rustls::ClientConnection,
        server: &mut rustls::ServerConnection,
    ) -> Result<(), rustls::Error> {
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                server.read_tls(&mut buf.as_slice()).unwrap();
                server.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                client.read_tls(&mut buf.as_slice()).unwrap();
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn peer_node_id_rejects_garbage() {
        assert_eq!(peer_node_id(&[]), None);
        assert_eq!(peer_node_id(&[0x30, 0x82, 0xff]), None);
        assert_eq!(peer_node_id(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(peer_node_id(&[0x30, 0x80, 0, 0]), None);
        let tmp = tempfile::tempdir().unwrap();
        let tls = cluster(tmp.path(), "c", "n1");
        let der = tls.certs[0].as_ref();
        for len in 0..der.len() {
            // Any truncation must be handled without panicking.
            let _ = peer_node_id(&der[..len]);
        }
    }
}
