//! The cluster's private PKI: one self-signed CA per cluster, one certificate
//! per node, and the rustls configurations that make gossip mutually
//! authenticated.
//!
//! Trust is "signed by the cluster CA", nothing else: there is no public PKI
//! and no hostname to check, because peers are dialled by address. Every node
//! certificate therefore carries the same DNS SAN, [`SERVER_NAME`], which a
//! dialer uses as the TLS server name; the node's identity is the certificate
//! CN, read back with [`peer_node_id`].
//!
//! Every node certificate also names its cluster, as a URI SAN
//! `skein://<cluster-id>/<node-id>` (both parts percent-encoded), read back
//! with [`peer_cluster_id`]. Both handshake verifiers refuse a peer whose
//! certificate names another cluster, or none (certificates issued before
//! the cluster id was put in them), even when it chains to the same CA.
//! Beyond the chain, a CRL in the TLS dir ([`CRL_FILE`], written by
//! [`revoke`]) refuses revoked certificates; [`TlsWatch`] notices when the
//! files change so that the agent can switch to them without a restart.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, DnsName, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::ClientCertVerifier;
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
/// The cluster's CRL: written into the CA dir by `skein cert revoke`, copied
/// by the operator into each node's TLS dir (optional there: without it,
/// nothing is revoked).
pub const CRL_FILE: &str = "ca.crl.pem";

/// Scheme of the URI SAN that names a node's cluster.
pub const CLUSTER_URI_SCHEME: &str = "skein";
/// Default lifetime of a node certificate, in days (`--days`).
pub const DEFAULT_NODE_DAYS: u32 = 365;
/// What `init_ca` puts before the cluster id in the CA's CN; `issue_node`
/// reads the cluster id back from it.
const CA_CN_PREFIX: &str = "skein cluster CA ";

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
    ($($arg:tt)*) => { return Err($crate::TlsError::Invalid(format!($($arg)*))) };
}

macro_rules! anyhow {
    ($($arg:tt)*) => { $crate::TlsError::Invalid(format!($($arg)*)) };
}

mod revoke;
mod verify;
mod watch;

pub use revoke::{revoke, RevokeTarget, Revoked, ISSUED_DIR};
pub use verify::{Refusal, TlsStats, WrongCluster};
pub use watch::TlsWatch;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 60 * 60);
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
    if cluster_id.is_empty() {
        bail!("cluster id must not be empty");
    }
    params.distinguished_name = distinguished_name(&format!("{CA_CN_PREFIX}{cluster_id}"));
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

/// How [`issue_node_with`] issues a node certificate.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// Lifetime in days (capped at the CA's own expiry).
    pub days: u32,
    /// The cluster the certificate is for; `None`: the CA's (from its CN).
    /// Only needed when one CA serves several clusters.
    pub cluster_id: Option<String>,
}

impl Default for IssueOptions {
    fn default() -> Self {
        IssueOptions {
            days: DEFAULT_NODE_DAYS,
            cluster_id: None,
        }
    }
}

/// What [`issue_node_with`] issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Serial number, lowercase hex (what `skein cert revoke --serial` takes).
    pub serial: String,
    pub cluster_id: String,
    pub not_after: SystemTime,
}

/// [`issue_node_with`] with the defaults: [`DEFAULT_NODE_DAYS`], the CA's
/// cluster id.
pub fn issue_node(ca_dir: &Path, node_id: &str, out_dir: &Path) -> Result<Issued> {
    issue_node_with(ca_dir, node_id, out_dir, &IssueOptions::default())
}

/// Issues a certificate for `node_id` signed by the CA in `ca_dir` and writes
/// `ca.pem`, `node.pem` and `node-key.pem` (mode 0600) into `out_dir`, which
/// is then everything [`NodeTls::load`] needs (plus the CA dir's CRL, if it
/// has one). Existing node files in `out_dir` are replaced (re-issuing is
/// how a node key is rotated). A copy of the certificate is kept in
/// `<ca_dir>/issued/` so that [`revoke`] can find it by node id.
pub fn issue_node_with(
    ca_dir: &Path,
    node_id: &str,
    out_dir: &Path,
    options: &IssueOptions,
) -> Result<Issued> {
    if node_id.is_empty() {
        bail!("node id must not be empty");
    }
    if options.days == 0 {
        bail!("a node certificate must be valid for at least one day");
    }
    let (issuer, ca_pem) = load_issuer(ca_dir)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| anyhow!("{}: invalid PEM: {e}", ca_cert_path.display()))?;
    let cluster_id = match &options.cluster_id {
        Some(id) => id.clone(),
        None => ca_cluster_id(&ca_der).ok_or_else(|| {
            anyhow!(
                "{}: the CA's name does not say its cluster id; pass one with --cluster-id",
                ca_cert_path.display()
            )
        })?,
    };
    if cluster_id.is_empty() {
        bail!("cluster id must not be empty");
    }

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
    // The cluster, checked by every peer's handshake (see the crate docs).
    params.subject_alt_names.push(SanType::URI(
        node_uri(&cluster_id, node_id)
            .try_into()
            .context("the cluster URI")?,
    ));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every node is both a QUIC server (accepting gossip) and a client
    // (dialling peers) with the same certificate.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, DAY * options.days);
    // A node certificate outliving its CA would only fail later, confusingly.
    if let Some(ca_end) = not_after(&ca_der) {
        if SystemTime::from(params.not_after) > ca_end {
            params.not_after = ca_end.into();
        }
    }
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing node certificate")?;

    // rcgen does not check that ca-key.pem belongs to ca.pem; a mismatch
    // would yield certificates every peer rejects. Verify before writing.
    let roots = Arc::new(root_store(&ca_pem, &ca_cert_path)?);
    verify_chain(&roots, &[], cert.der()).with_context(|| {
        format!(
            "issued certificate does not verify against {}; does {} belong to it?",
            ca_cert_path.display(),
            ca_key_path.display()
        )
    })?;
    let serial = revoke::cert_serial(cert.der())
        .ok_or_else(|| anyhow!("cannot read back the serial of the issued certificate"))?;
    // Recorded before it is handed out, so anything deployed is revocable
    // by node id.
    revoke::record_issued(ca_dir, &serial, &cert.pem())?;

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
    // A new node starts with the cluster's current CRL.
    let crl = ca_dir.join(CRL_FILE);
    if crl.exists() {
        write_replace(&out_dir.join(CRL_FILE), &read(&crl)?, 0o644)?;
    }
    Ok(Issued {
        serial: revoke::hex(&serial),
        cluster_id,
        not_after: params.not_after.into(),
    })
}

/// The CA in `ca_dir` as an issuer, and its certificate's PEM.
fn load_issuer(ca_dir: &Path) -> Result<(Issuer<'static, KeyPair>, String)> {
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = read_to_string(&ca_cert_path)?;
    let ca_key_pem = read_to_string(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{} is not a valid private key", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("{} is not a valid CA certificate", ca_cert_path.display()))?;
    Ok((issuer, ca_pem))
}

/// A node's TLS identity: its certificate chain and key, the cluster CA it
/// trusts, the CRL it applies, and the cluster it belongs to.
pub struct NodeTls {
    dir: PathBuf,
    node_id: String,
    cluster_id: String,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    not_after: SystemTime,
    ca_not_after: SystemTime,
    /// Digest of the files this was loaded from (see [`TlsWatch`]).
    fingerprint: [u8; 32],
    stats: Arc<TlsStats>,
}

impl std::fmt::Debug for NodeTls {
    // Hand-written so the private key can never end up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("node_id", &self.node_id)
            .field("cluster_id", &self.cluster_id)
            .field("certs", &self.certs.len())
            .field("crls", &self.crls.len())
            .finish_non_exhaustive()
    }
}

/// The files of a TLS dir, as read at one moment. A missing CRL is empty.
struct TlsFiles {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    crl: Option<Vec<u8>>,
}

impl TlsFiles {
    fn read(dir: &Path) -> Result<TlsFiles> {
        let crl_path = dir.join(CRL_FILE);
        let crl = match fs::read(&crl_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", crl_path.display())),
        };
        Ok(TlsFiles {
            ca: read(&dir.join(CA_CERT_FILE))?,
            cert: read(&dir.join(NODE_CERT_FILE))?,
            key: read(&dir.join(NODE_KEY_FILE))?,
            crl,
        })
    }

    fn fingerprint(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [
            Some(&self.ca),
            Some(&self.cert),
            Some(&self.key),
            self.crl.as_ref(),
        ] {
            // Length-prefixed so that bytes moving between files count.
            let part = part.map_or(&[][..], Vec::as_slice);
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

impl NodeTls {
    /// Loads `ca.pem`, `node.pem`, `node-key.pem` and, if present,
    /// `ca.crl.pem` from `dir` and checks that they fit together (certificate
    /// signed by the CA, not revoked, carrying a cluster id; key matching the
    /// certificate; CRL signed by the CA), so a misconfiguration fails at
    /// startup rather than as handshake errors on every peer.
    pub fn load(dir: &Path) -> Result<NodeTls> {
        NodeTls::load_with_stats(dir, Arc::default())
    }

    /// [`NodeTls::load`], counting into `stats` (shared across reloads).
    pub fn load_with_stats(dir: &Path, stats: Arc<TlsStats>) -> Result<NodeTls> {
        let files = TlsFiles::read(dir)?;
        let tls = NodeTls::from_files(dir, &files, stats)?;
        tls.stats
            .cert_not_after
            .store(unix(tls.not_after), Ordering::Relaxed);
        tls.stats
            .ca_not_after
            .store(unix(tls.ca_not_after), Ordering::Relaxed);
        Ok(tls)
    }

    fn from_files(dir: &Path, files: &TlsFiles, stats: Arc<TlsStats>) -> Result<NodeTls> {
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(NODE_CERT_FILE);
        let key_path = dir.join(NODE_KEY_FILE);
        let crl_path = dir.join(CRL_FILE);

        let ca_pem = std::str::from_utf8(&files.ca)
            .map_err(|_| anyhow!("{}: not a PEM file", ca_path.display()))?;
        let roots = Arc::new(root_store(ca_pem, &ca_path)?);
        let ca_not_after = CertificateDer::pem_slice_iter(&files.ca)
            .filter_map(|c| c.ok().and_then(|c| not_after(&c)))
            .min()
            .ok_or_else(|| anyhow!("{}: no readable CA certificate", ca_path.display()))?;
        let certs = CertificateDer::pem_slice_iter(&files.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("{}: invalid PEM: {e}", cert_path.display()))?;
        let leaf = certs
            .first()
            .ok_or_else(|| anyhow!("{}: no certificate found", cert_path.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&files.key)
            .map_err(|e| anyhow!("{}: no usable private key: {e}", key_path.display()))?;
        let crls = match &files.crl {
            None => Vec::new(),
            Some(pem) => {
                let crls = CertificateRevocationListDer::pem_slice_iter(pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| anyhow!("{}: invalid PEM: {e}", crl_path.display()))?;
                if crls.is_empty() {
                    bail!("{}: no CRL found", crl_path.display());
                }
                crls
            }
        };
        let node_id = peer_node_id(leaf).ok_or_else(|| {
            anyhow!(
                "{}: certificate has no readable common name (node id)",
                cert_path.display()
            )
        })?;
        let cluster_id = peer_cluster_id(leaf).ok_or_else(|| {
            anyhow!(
                "{}: certificate carries no cluster id (a {CLUSTER_URI_SCHEME}:// URI SAN); \
                 it was issued by an older skein: issue a new one with `skein cert issue`",
                cert_path.display()
            )
        })?;
        let not_after = not_after(leaf)
            .ok_or_else(|| anyhow!("{}: unreadable validity", cert_path.display()))?;
        // Without the CRL first, so that a CRL problem is named as one.
        verify_chain(&roots, &[], leaf).with_context(|| {
            format!(
                "{} is not a valid node certificate of the CA in {}",
                cert_path.display(),
                ca_path.display()
            )
        })?;
        // Checking our own certificate against the CRL is what checks the
        // CRL: webpki refuses a CRL not signed by the CA (or not the CA's)
        // only when it meets a certificate, and would then refuse every peer.
        if !crls.is_empty() {
            verify_chain(&roots, &crls, leaf).with_context(|| {
                format!(
                    "{} refuses this node's own certificate {} (revoked, or not the CA's CRL)",
                    crl_path.display(),
                    cert_path.display()
                )
            })?;
        }

        let tls = NodeTls {
            dir: dir.to_owned(),
            node_id,
            cluster_id,
            certs,
            key,
            roots,
            crls,
            not_after,
            ca_not_after,
            fingerprint: files.fingerprint(),
            stats,
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

    /// Loads the same dir again, counting into the same stats. Refuses
    /// material for another node id or cluster (a node does not change
    /// identity under a running agent). Counts the outcome in
    /// `reloads_ok`/`reloads_error`.
    pub fn reload(&self) -> Result<NodeTls> {
        let result = NodeTls::load_with_stats_unpublished(&self.dir, self.stats.clone())
            .and_then(|new| {
                if new.node_id != self.node_id || new.cluster_id != self.cluster_id {
                    bail!(
                        "{}: new certificate is for node {:?} of cluster {:?}, this agent is node {:?} of cluster {:?}",
                        self.dir.join(NODE_CERT_FILE).display(),
                        new.node_id,
                        new.cluster_id,
                        self.node_id,
                        self.cluster_id
                    );
                }
                Ok(new)
            });
        let counter = match &result {
            Ok(new) => {
                // Only material that will be used moves the expiry gauges.
                self.stats
                    .cert_not_after
                    .store(unix(new.not_after), Ordering::Relaxed);
                self.stats
                    .ca_not_after
                    .store(unix(new.ca_not_after), Ordering::Relaxed);
                &self.stats.reloads_ok
            }
            Err(_) => &self.stats.reloads_error,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn load_with_stats_unpublished(dir: &Path, stats: Arc<TlsStats>) -> Result<NodeTls> {
        NodeTls::from_files(dir, &TlsFiles::read(dir)?, stats)
    }

    /// The dir this was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This node's id, the CN of its certificate.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// This node's cluster, from its certificate; peers must carry the same.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// When this node's certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the CA certificate expires.
    pub fn ca_not_after(&self) -> SystemTime {
        self.ca_not_after
    }

    /// CRLs in effect (zero or one, from [`CRL_FILE`]).
    pub fn crl_count(&self) -> usize {
        self.crls.len()
    }

    pub fn stats(&self) -> &Arc<TlsStats> {
        &self.stats
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

    fn client_verifier(&self, count: bool) -> Result<Arc<dyn ClientCertVerifier>> {
        Ok(Arc::new(verify::ClusterClientVerifier {
            inner: verify::webpki_client(&self.roots, &self.crls)?,
            cluster_id: self.cluster_id.clone(),
            stats: count.then(|| self.stats.clone()),
        }))
    }

    fn server_verifier(&self, count: bool) -> Result<Arc<verify::ClusterServerVerifier>> {
        Ok(Arc::new(verify::ClusterServerVerifier {
            inner: verify::webpki_server(&self.roots, &self.crls)?,
            cluster_id: self.cluster_id.clone(),
            stats: count.then(|| self.stats.clone()),
        }))
    }

    /// Server side of gossip: presents the node certificate and requires a
    /// client certificate chained to the cluster CA, not revoked, of this
    /// node's cluster. TLS 1.3 only (QUIC).
    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .with_client_cert_verifier(self.client_verifier(true)?)
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .context("node certificate/key rejected by rustls")?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Client side of gossip: verifies the server's chain to the cluster CA,
    /// its [`SERVER_NAME`], the CRL and its cluster id, and presents the
    /// node certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .dangerous()
            .with_custom_certificate_verifier(self.server_verifier(true)?)
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .context("node certificate/key rejected by rustls")?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Whether a peer that presented `certs` (leaf first) at its handshake
    /// would be accepted by this material now: how open connections are
    /// re-checked after a reload (a CRL revoking the peer, say). Not counted
    /// as a handshake refusal.
    pub fn check_peer(&self, certs: &[CertificateDer<'_>]) -> Result<()> {
        let (leaf, intermediates) = certs
            .split_first()
            .ok_or_else(|| anyhow!("no peer certificate"))?;
        self.client_verifier(false)?
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| verify::tls_error("peer certificate", e))?;
        Ok(())
    }
}

/// What gossip needs to sign what this node originates and to check what
/// others did: this node's certificate and key, and the cluster CA.
pub struct GossipSigner {
    node_id: String,
    cert: Vec<u8>,
    key: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    /// Chain, CRL (as loaded at start) and cluster id.
    verifier: Arc<verify::ClusterServerVerifier>,
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
    /// `node_id` of this cluster (valid now, not revoked by the CRL this
    /// signer was made with).
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
        let verifier = self.server_verifier(false)?;
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
/// period, serverAuth, the [`SERVER_NAME`] SAN, and `crls`.
fn verify_chain(
    roots: &Arc<RootCertStore>,
    crls: &[CertificateRevocationListDer<'static>],
    leaf: &CertificateDer<'_>,
) -> Result<()> {
    let verifier = verify::webpki_server(roots, crls)?;
    let server_name = ServerName::try_from(SERVER_NAME).context("the server name")?;
    verifier
        .verify_server_cert(leaf, &[], &server_name, &[], UnixTime::now())
        .context("certificate chain")?;
    Ok(())
}

/// The URI SAN naming a node's cluster: `skein://<cluster-id>/<node-id>`,
/// each part percent-encoded (any byte but RFC 3986's unreserved ones), so
/// any id makes a valid URI.
pub fn node_uri(cluster_id: &str, node_id: &str) -> String {
    format!(
        "{CLUSTER_URI_SCHEME}://{}/{}",
        pct_encode(cluster_id),
        pct_encode(node_id)
    )
}

/// The cluster id a certificate's `skein://` URI SAN names, or `None` if
/// it has none, more than one, or one that does not decode.
///
/// Only meaningful for a certificate verified against the cluster CA.
pub fn peer_cluster_id(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let prefix = format!("{CLUSTER_URI_SCHEME}://");
    let mut found = None;
    for name in &san.value.general_names {
        let x509_parser::extensions::GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(rest) = uri.strip_prefix(&prefix) else {
            continue;
        };
        let authority = rest.split('/').next()?;
        let id = pct_decode(authority)?;
        if id.is_empty() || found.is_some() {
            // Two cluster URIs are ambiguous; neither is trusted.
            return None;
        }
        found = Some(id);
    }
    found
}

/// The cluster id in a CA certificate's CN (as `init_ca` writes it).
fn ca_cluster_id(ca_der: &[u8]) -> Option<String> {
    let cn = peer_node_id(ca_der)?;
    let id = cn.strip_prefix(CA_CN_PREFIX)?;
    (!id.is_empty()).then(|| id.to_owned())
}

fn not_after(cert_der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn pct_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn pct_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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
        let verifier = good.client_verifier(false).unwrap();
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

    const YEAR: u64 = 365 * 24 * 60 * 60;

    /// Seconds from now until `t` (negative if past).
    fn secs_until(t: SystemTime) -> i64 {
        unix(t) - unix(SystemTime::now())
    }

    #[test]
    fn node_cert_names_its_cluster_and_lives_a_year_by_default() {
        let tmp = tempfile::tempdir().unwrap();
        let tls = cluster(tmp.path(), "prod/eu 1:ä", "node-1");
        assert_eq!(tls.cluster_id(), "prod/eu 1:ä");
        assert_eq!(
            peer_cluster_id(&tls.certs[0]).as_deref(),
            Some("prod/eu 1:ä")
        );
        let left = secs_until(tls.not_after());
        assert!((left - YEAR as i64).abs() < 86_400, "{left}");
        // The gauge behind skein_tls_cert_expiry_seconds says the same.
        assert!((tls.stats().cert_expiry_seconds() - left).abs() < 60);
        assert!(tls.stats().ca_expiry_seconds() > 19 * YEAR as i64);

        let issued = issue_node_with(
            &tmp.path().join("ca"),
            "short",
            &tmp.path().join("short"),
            &IssueOptions {
                days: 30,
                cluster_id: None,
            },
        )
        .unwrap();
        let left = secs_until(issued.not_after);
        assert!((left - 30 * 86_400).abs() < 86_400, "{left}");
        let short = NodeTls::load(&tmp.path().join("short")).unwrap();
        assert!((secs_until(short.not_after()) - left).abs() < 60);
    }

    #[test]
    fn issue_refuses_zero_days() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), "c1").unwrap();
        let options = IssueOptions {
            days: 0,
            cluster_id: None,
        };
        assert!(issue_node_with(tmp.path(), "n", tmp.path(), &options).is_err());
    }

    /// A client that accepts any server: a rogue peer does not check us,
    /// so the server's own check must hold alone.
    #[derive(Debug)]
    struct AcceptAnyServer;

    impl ServerCertVerifier for AcceptAnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// A client presenting `certs`/`key` that trusts any server.
    fn rogue_client(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> rustls::ClientConfig {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
            .with_client_auth_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![ALPN.to_vec()];
        config
    }

    fn connect(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(), rustls::Error> {
        let mut client = rustls::ClientConnection::new(
            Arc::new(client),
            ServerName::try_from(SERVER_NAME).unwrap(),
        )
        .unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        handshake(&mut client, &mut server)
    }

    fn issue_load(ca: &Path, node_id: &str, dir: &Path, cluster_id: Option<&str>) -> NodeTls {
        let options = IssueOptions {
            cluster_id: cluster_id.map(str::to_owned),
            ..IssueOptions::default()
        };
        issue_node_with(ca, node_id, dir, &options).unwrap();
        NodeTls::load(dir).unwrap()
    }

    #[test]
    fn peer_of_another_cluster_is_refused_by_both_verifiers() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        init_ca(&ca, "c1").unwrap();
        let a = issue_load(&ca, "a", &tmp.path().join("a"), None);
        let a2 = issue_load(&ca, "a2", &tmp.path().join("a2"), None);
        // Same CA, another cluster id.
        let b = issue_load(&ca, "b", &tmp.path().join("b"), Some("c2"));
        assert_eq!((a.cluster_id(), b.cluster_id()), ("c1", "c2"));

        // Same cluster: fine.
        connect(a2.client_config().unwrap(), a.server_config().unwrap()).unwrap();

        // a dials b: a's client verifier refuses b's certificate.
        let err = connect(a.client_config().unwrap(), b.server_config().unwrap()).unwrap_err();
        assert_eq!(Refusal::of(&err), Refusal::WrongCluster, "{err}");
        assert!(err.to_string().contains("\"c2\""), "{err}");
        assert_eq!(a.stats().refused(Refusal::WrongCluster), 1);

        // b dials a without checking a at all: a's server verifier refuses.
        let err = connect(
            rogue_client(b.certs.clone(), b.key.clone_key()),
            a.server_config().unwrap(),
        )
        .unwrap_err();
        assert_eq!(Refusal::of(&err), Refusal::WrongCluster, "{err}");
        assert!(
            err.to_string()
                .contains("peer certificate is for cluster \"c2\""),
            "{err}"
        );
        assert_eq!(a.stats().refused(Refusal::WrongCluster), 2);
        let err = a.check_peer(&b.certs).unwrap_err();
        assert!(format!("{err:#}").contains("cluster \"c2\""), "{err:#}");
        // Not a handshake: not counted.
        assert_eq!(a.stats().refused(Refusal::WrongCluster), 2);

        // And gossip identities of the other cluster are refused too.
        let signer = a.gossip_signer().unwrap();
        assert!(signer.check_identity("a2", &a2.certs[0]));
        assert!(!signer.check_identity("b", &b.certs[0]));
    }

    #[test]
    fn certificate_without_cluster_id_is_refused() {
        // What skein issued before the cluster URI: same CA, no URI SAN.
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        init_ca(&ca, "c1").unwrap();
        let a = issue_load(&ca, "a", &tmp.path().join("a"), None);
        let (issuer, _) = load_issuer(&ca).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name("old");
        params.subject_alt_names = vec![SanType::DnsName(SERVER_NAME.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut params, YEAR_DURATION);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let old = tmp.path().join("old");
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join(NODE_CERT_FILE), cert.pem()).unwrap();
        fs::write(old.join(NODE_KEY_FILE), key.serialize_pem()).unwrap();
        fs::copy(ca.join(CA_CERT_FILE), old.join(CA_CERT_FILE)).unwrap();

        let err = format!("{:#}", NodeTls::load(&old).unwrap_err());
        assert!(
            err.contains("no cluster id") && err.contains("skein cert issue"),
            "{err}"
        );

        let der = cert.der().clone();
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        assert!(connect(
            rogue_client(vec![der.clone()], key),
            a.server_config().unwrap()
        )
        .is_err());
        assert_eq!(a.stats().refused(Refusal::WrongCluster), 1);
        let err = format!("{:#}", a.check_peer(&[der]).unwrap_err());
        assert!(err.contains("carries no cluster id"), "{err}");
    }

    const YEAR_DURATION: Duration = Duration::from_secs(YEAR);

    #[test]
    fn revoked_peer_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        init_ca(&ca, "c1").unwrap();
        let a_dir = tmp.path().join("a");
        let a = issue_load(&ca, "a", &a_dir, None);
        let b = issue_load(&ca, "b", &tmp.path().join("b"), None);
        let c = issue_load(&ca, "c", &tmp.path().join("c"), None);
        connect(b.client_config().unwrap(), a.server_config().unwrap()).unwrap();

        let revoked = revoke(&ca, RevokeTarget::Node("b")).unwrap();
        assert_eq!(revoked.added.len(), 1);
        assert_eq!((revoked.total, revoked.crl_number), (1, 1));
        fs::copy(ca.join(CRL_FILE), a_dir.join(CRL_FILE)).unwrap();
        let a = NodeTls::load(&a_dir).unwrap();
        assert_eq!(a.crl_count(), 1);

        // b dials a: a's server verifier refuses the revoked certificate.
        let err = connect(
            rogue_client(b.certs.clone(), b.key.clone_key()),
            a.server_config().unwrap(),
        );
        assert!(err.is_err());
        assert_eq!(a.stats().refused(Refusal::Revoked), 1);
        // a dials b: a's client verifier refuses it too.
        let err = connect(a.client_config().unwrap(), b.server_config().unwrap()).unwrap_err();
        assert_eq!(Refusal::of(&err), Refusal::Revoked, "{err}");
        assert_eq!(a.stats().refused(Refusal::Revoked), 2);
        // c is untouched.
        connect(c.client_config().unwrap(), a.server_config().unwrap()).unwrap();
        connect(a.client_config().unwrap(), c.server_config().unwrap()).unwrap();
        assert!(!a.gossip_signer().unwrap().check_identity("b", &b.certs[0]));

        // Revoking again adds nothing but still bumps the CRL number.
        let again = revoke(&ca, RevokeTarget::Node("b")).unwrap();
        assert!(again.added.is_empty());
        assert_eq!((again.total, again.crl_number), (1, 2));

        // A node cannot start on a CRL that revokes itself; re-issued, it can.
        let b_dir = tmp.path().join("b");
        fs::copy(ca.join(CRL_FILE), b_dir.join(CRL_FILE)).unwrap();
        let err = format!("{:#}", NodeTls::load(&b_dir).unwrap_err());
        assert!(err.contains(CRL_FILE), "{err}");
        let b2 = issue_load(&ca, "b", &b_dir, None);
        assert_eq!(b2.crl_count(), 1, "issue copies the CA dir's CRL");
        connect(b2.client_config().unwrap(), a.server_config().unwrap()).unwrap();

        // Revoking by node id now takes both of b's certificates.
        let both = revoke(&ca, RevokeTarget::Node("b")).unwrap();
        assert_eq!((both.added.len(), both.total), (1, 2));
    }

    #[test]
    fn revoke_by_serial_and_unknown_node() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        init_ca(&ca, "c1").unwrap();
        let a_dir = tmp.path().join("a");
        let a = issue_load(&ca, "a", &a_dir, None);
        let issued = issue_node(&ca, "b", &tmp.path().join("b")).unwrap();
        let b = NodeTls::load(&tmp.path().join("b")).unwrap();
        let err = revoke(&ca, RevokeTarget::Node("nobody")).unwrap_err();
        assert!(err.to_string().contains("--serial"), "{err}");
        // As openssl prints it: upper case, colons.
        let openssl_style = issued
            .serial
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        let revoked = revoke(&ca, RevokeTarget::Serial(&openssl_style)).unwrap();
        assert_eq!(revoked.added, vec![issued.serial.clone()]);
        fs::copy(ca.join(CRL_FILE), a_dir.join(CRL_FILE)).unwrap();
        let a = NodeTls::load(a.dir()).unwrap();
        let err = format!("{:#}", a.check_peer(&b.certs).unwrap_err());
        assert!(err.to_lowercase().contains("revoked"), "{err}");
    }

    #[test]
    fn crl_of_another_ca_does_not_load() {
        // webpki would refuse every peer with it; refuse the file instead.
        let tmp = tempfile::tempdir().unwrap();
        let a_dir = tmp.path().join("a");
        let _a = cluster(&a_dir, "c1", "a");
        let other = tmp.path().join("other");
        init_ca(&other, "c1").unwrap();
        issue_node(&other, "x", &tmp.path().join("x")).unwrap();
        revoke(&other, RevokeTarget::Node("x")).unwrap();
        fs::copy(other.join(CRL_FILE), a_dir.join("a").join(CRL_FILE)).unwrap();
        let err = format!("{:#}", NodeTls::load(&a_dir.join("a")).unwrap_err());
        assert!(err.contains(CRL_FILE), "{err}");
    }

    #[test]
    fn watch_reloads_settled_changes_and_keeps_old_material_on_bad_files() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        init_ca(&ca, "c1").unwrap();
        let a_dir = tmp.path().join("a");
        let a = issue_load(&ca, "a", &a_dir, None);
        let b = issue_load(&ca, "b", &tmp.path().join("b"), None);
        let mut watch = TlsWatch::new();
        assert!(watch.poll(&a, false).is_none());
        assert!(watch.poll(&a, false).is_none());

        revoke(&ca, RevokeTarget::Node("b")).unwrap();
        fs::copy(ca.join(CRL_FILE), a_dir.join(CRL_FILE)).unwrap();
        // First sight: wait one poll for the files to settle.
        assert!(watch.poll(&a, false).is_none());
        let new = watch.poll(&a, false).unwrap().unwrap();
        assert_eq!(new.crl_count(), 1);
        assert!(new.check_peer(&b.certs).is_err());
        assert_eq!(a.stats().reloads_ok.load(Ordering::Relaxed), 1);
        let a = new;
        assert!(watch.poll(&a, false).is_none());

        // A broken CRL: reported once, counted, the old material stays.
        fs::write(a_dir.join(CRL_FILE), "-----BEGIN X509 CRL-----\ngarbage\n").unwrap();
        assert!(watch.poll(&a, false).is_none());
        let err = watch.poll(&a, false).unwrap().unwrap_err();
        assert!(format!("{err:#}").contains(CRL_FILE), "{err:#}");
        assert!(watch.poll(&a, false).is_none());
        assert!(watch.poll(&a, false).is_none());
        assert_eq!(a.stats().reloads_error.load(Ordering::Relaxed), 1);
        assert!(a.check_peer(&b.certs).is_err(), "still the old CRL");
        // SIGHUP retries at once.
        assert!(watch.poll(&a, true).unwrap().is_err());
        assert_eq!(a.stats().reloads_error.load(Ordering::Relaxed), 2);

        // A new key and certificate for the same node: picked up.
        let old_expiry = a.not_after();
        issue_node_with(
            &ca,
            "a",
            &a_dir,
            &IssueOptions {
                days: 10,
                cluster_id: None,
            },
        )
        .unwrap();
        let new = watch.poll(&a, true).unwrap().unwrap();
        assert!(new.not_after() < old_expiry);
        assert!((a.stats().cert_expiry_seconds() - 10 * 86_400).abs() < 86_400);

        // Another node's material in the dir is refused.
        issue_node(&ca, "z", &a_dir).unwrap();
        let err = watch.poll(&new, true).unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("\"z\""), "{err:#}");
    }

    proptest::proptest! {
        #[test]
        fn pct_roundtrip(s in "\\PC*") {
            let encoded = pct_encode(&s);
            proptest::prop_assert!(encoded.bytes().all(|b| b.is_ascii_graphic() && b != b'/'));
            proptest::prop_assert_eq!(pct_decode(&encoded), Some(s));
        }

        #[test]
        fn pct_decode_never_panics(s in "[%0-9a-fA-F+ä/]*") {
            let _ = pct_decode(&s);
        }
    }
}
