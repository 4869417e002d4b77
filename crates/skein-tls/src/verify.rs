//! The handshake checks on top of webpki's: the chain to the cluster CA, the
//! CRL (if the TLS dir has one), and then the cluster id in the peer's
//! certificate, which must be this node's. A refusal is counted by reason in
//! [`TlsStats`].

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::{peer_cluster_id, provider, Context, Result, TlsError};

/// Counters and gauges of a node's TLS material, shared by every config
/// built from it (and its reloads) with whoever exports metrics.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Reloads of the TLS dir that were applied.
    pub reloads_ok: AtomicU64,
    /// Reloads refused (unreadable, unparsable or inconsistent files): the
    /// old material stays in use.
    pub reloads_error: AtomicU64,
    /// Peer certificates refused at the handshake, by reason (either side).
    pub refused_wrong_cluster: AtomicU64,
    pub refused_revoked: AtomicU64,
    pub refused_unknown_ca: AtomicU64,
    pub refused_expired: AtomicU64,
    pub refused_other: AtomicU64,
    /// Open connections closed because reloaded material refuses the peer
    /// (a CRL that revokes it, say).
    pub closed_on_reload: AtomicU64,
    /// Unix seconds at which the node certificate and the CA in use expire.
    pub cert_not_after: AtomicI64,
    pub ca_not_after: AtomicI64,
}

/// Why a peer certificate was refused, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    WrongCluster,
    Revoked,
    UnknownCa,
    Expired,
    Other,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::WrongCluster,
        Refusal::Revoked,
        Refusal::UnknownCa,
        Refusal::Expired,
        Refusal::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::WrongCluster => "wrong_cluster",
            Refusal::Revoked => "revoked",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::Other => "other",
        }
    }

    /// The refusal a rustls certificate error stands for.
    pub fn of(err: &rustls::Error) -> Refusal {
        match err {
            rustls::Error::InvalidCertificate(e) => match e {
                CertificateError::Revoked => Refusal::Revoked,
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    Refusal::UnknownCa
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Refusal::Expired,
                CertificateError::Other(other) if other.0.is::<WrongCluster>() => {
                    Refusal::WrongCluster
                }
                _ => Refusal::Other,
            },
            _ => Refusal::Other,
        }
    }
}

impl TlsStats {
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused_counter(reason).load(Ordering::Relaxed)
    }

    fn refused_counter(&self, reason: Refusal) -> &AtomicU64 {
        match reason {
            Refusal::WrongCluster => &self.refused_wrong_cluster,
            Refusal::Revoked => &self.refused_revoked,
            Refusal::UnknownCa => &self.refused_unknown_ca,
            Refusal::Expired => &self.refused_expired,
            Refusal::Other => &self.refused_other,
        }
    }

    fn count(&self, err: &rustls::Error) {
        self.refused_counter(Refusal::of(err))
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Seconds until the node certificate expires (negative once expired).
    pub fn cert_expiry_seconds(&self) -> i64 {
        self.cert_not_after.load(Ordering::Relaxed) - unix_now()
    }

    /// Seconds until the CA certificate expires (negative once expired).
    pub fn ca_expiry_seconds(&self) -> i64 {
        self.ca_not_after.load(Ordering::Relaxed) - unix_now()
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A peer certificate of another cluster (or of none: issued before
/// certificates carried the cluster id).
pub struct WrongCluster {
    pub expected: String,
    pub found: Option<String>,
}

// rustls formats `CertificateError::Other` with `Debug`, and that is what
// quinn logs for a failed handshake: make it the sentence, not the struct.
impl std::fmt::Debug for WrongCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for WrongCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.found {
            Some(found) => write!(
                f,
                "peer certificate is for cluster {found:?}, this node is in cluster {:?}",
                self.expected
            ),
            None => write!(
                f,
                "peer certificate carries no cluster id (issued before skein put one in; \
                 re-issue it with `skein cert issue`), this node is in cluster {:?}",
                self.expected
            ),
        }
    }
}

impl std::error::Error for WrongCluster {}

/// `Ok` if `cert_der` carries `expected` as its cluster id.
pub(crate) fn check_cluster(expected: &str, cert_der: &[u8]) -> Result<(), rustls::Error> {
    let found = peer_cluster_id(cert_der);
    if found.as_deref() == Some(expected) {
        return Ok(());
    }
    Err(rustls::Error::InvalidCertificate(CertificateError::Other(
        OtherError(Arc::new(WrongCluster {
            expected: expected.to_owned(),
            found,
        })),
    )))
}

pub(crate) fn webpki_server(
    roots: &Arc<RootCertStore>,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<WebPkiServerVerifier>> {
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls.iter().cloned())
        .build()
        .context("building server certificate verifier")
}

pub(crate) fn webpki_client(
    roots: &Arc<RootCertStore>,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls.iter().cloned())
        .build()
        .context("building client certificate verifier")
}

/// Server side: webpki's client verifier, then the cluster id.
#[derive(Debug)]
pub(crate) struct ClusterClientVerifier {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub cluster_id: String,
    /// `None` for checks that are not handshakes (re-checking open
    /// connections after a reload).
    pub stats: Option<Arc<TlsStats>>,
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let result = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .and_then(|ok| check_cluster(&self.cluster_id, end_entity).map(|()| ok));
        if let (Err(err), Some(stats)) = (&result, &self.stats) {
            stats.count(err);
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: webpki's server verifier (chain, CRL, the shared
/// [`crate::SERVER_NAME`]), then the cluster id.
#[derive(Debug)]
pub(crate) struct ClusterServerVerifier {
    pub inner: Arc<WebPkiServerVerifier>,
    pub cluster_id: String,
    pub stats: Option<Arc<TlsStats>>,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .and_then(|ok| check_cluster(&self.cluster_id, end_entity).map(|()| ok));
        if let (Err(err), Some(stats)) = (&result, &self.stats) {
            stats.count(err);
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A rustls error as this crate's, keeping the message.
pub(crate) fn tls_error(context: &str, err: rustls::Error) -> TlsError {
    TlsError::Context {
        context: context.to_owned(),
        source: Box::new(err),
    }
}
