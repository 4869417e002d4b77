//! Revocation: the CA dir keeps a copy of every certificate it issued
//! (`issued/<serial>.pem`, so a node can be revoked by its id) and the
//! cluster's CRL (`ca.crl.pem`), which `skein cert revoke` rewrites with one
//! more entry and a higher CRL number. Operators copy the CRL into every
//! node's TLS dir (next to `node.pem`); agents reload it on change.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::{load_issuer, peer_node_id, read, write_replace, Context, Result, CRL_FILE};

/// Subdirectory of the CA dir holding a copy of each issued certificate.
pub const ISSUED_DIR: &str = "issued";

/// How long a CRL says it is good for. Agents do not enforce it (rustls is
/// told to ignore a CRL's next update), so an operator who never revokes
/// again is not locked out; it only informs other tools.
const CRL_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// What to revoke.
#[derive(Debug, Clone, Copy)]
pub enum RevokeTarget<'a> {
    /// Every certificate the CA dir recorded for this node id.
    Node(&'a str),
    /// One certificate by serial number, in hex (colons and case ignored,
    /// as `openssl x509 -serial` prints it).
    Serial(&'a str),
}

/// The outcome of [`revoke`].
#[derive(Debug)]
pub struct Revoked {
    /// Serials (lowercase hex) newly added to the CRL.
    pub added: Vec<String>,
    /// Serials the CRL lists in all.
    pub total: usize,
    pub crl_number: u64,
    pub crl_path: PathBuf,
}

/// Adds `target` to the CRL in `ca_dir` (creating it), signed by the CA.
/// Revoking what is already revoked is not an error: `added` is empty.
pub fn revoke(ca_dir: &Path, target: RevokeTarget<'_>) -> Result<Revoked> {
    let (issuer, _) = load_issuer(ca_dir)?;
    let serials = match target {
        RevokeTarget::Serial(hex) => vec![parse_serial(hex)?],
        RevokeTarget::Node(node_id) => {
            let found = issued_serials(ca_dir, node_id)?;
            if found.is_empty() {
                bail!(
                    "no certificate for node {node_id:?} recorded in {}; revoke it by serial \
                     (`--serial`, see `openssl x509 -noout -serial -in node.pem`)",
                    ca_dir.join(ISSUED_DIR).display()
                );
            }
            found
        }
    };

    let crl_path = ca_dir.join(CRL_FILE);
    let (mut entries, number) = if crl_path.exists() {
        read_crl(&crl_path)?
    } else {
        (Vec::new(), 0)
    };
    let now = SystemTime::now();
    let mut added = Vec::new();
    for serial in serials {
        if !entries.iter().any(|(s, _)| *s == serial) {
            added.push(hex(&serial));
            entries.push((serial, now));
        }
    }
    let crl_number = number.saturating_add(1);
    let params = CertificateRevocationListParams {
        this_update: now.into(),
        next_update: (now + CRL_VALIDITY).into(),
        crl_number: SerialNumber::from(crl_number.to_be_bytes().to_vec()),
        issuing_distribution_point: None,
        revoked_certs: entries
            .iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: (*at).into(),
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).context("signing the CRL")?;
    let pem = crl.pem().context("encoding the CRL")?;
    write_replace(&crl_path, pem.as_bytes(), 0o644)?;
    Ok(Revoked {
        added,
        total: entries.len(),
        crl_number,
        crl_path,
    })
}

/// Records a copy of an issued certificate in the CA dir.
pub(crate) fn record_issued(ca_dir: &Path, serial: &[u8], cert_pem: &str) -> Result<()> {
    let dir = ca_dir.join(ISSUED_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_replace(
        &dir.join(format!("{}.pem", hex(serial))),
        cert_pem.as_bytes(),
        0o644,
    )
}

/// Serials of the certificates recorded for `node_id`.
fn issued_serials(ca_dir: &Path, node_id: &str) -> Result<Vec<Vec<u8>>> {
    let dir = ca_dir.join(ISSUED_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut serials = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.extension().is_none_or(|ext| ext != "pem") {
            continue;
        }
        let Ok(cert) = CertificateDer::from_pem_slice(&read(&path)?) else {
            tracing::warn!(path = %path.display(), "not a certificate; skipped");
            continue;
        };
        if peer_node_id(&cert).as_deref() != Some(node_id) {
            continue;
        }
        if let Some(serial) = cert_serial(&cert) {
            serials.push(serial);
        }
    }
    serials.sort();
    Ok(serials)
}

/// The serial number of a certificate, minimal big-endian bytes.
pub(crate) fn cert_serial(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(minimal(cert.tbs_certificate.raw_serial()))
}

/// The revoked serials (with their revocation times) and the CRL number of
/// the CRL at `path`.
/// A revoked serial and when it was revoked.
type Entry = (Vec<u8>, SystemTime);

fn read_crl(path: &Path) -> Result<(Vec<Entry>, u64)> {
    let der = CertificateRevocationListDer::from_pem_slice(&read(path)?)
        .map_err(|e| anyhow!("{}: not a PEM CRL: {e}", path.display()))?;
    let (_, crl) = x509_parser::parse_x509_crl(&der)
        .map_err(|e| anyhow!("{}: not a valid CRL: {e}", path.display()))?;
    let entries = crl
        .iter_revoked_certificates()
        .map(|revoked| {
            let secs = u64::try_from(revoked.revocation_date.timestamp()).unwrap_or(0);
            (
                minimal(revoked.raw_serial()),
                UNIX_EPOCH + Duration::from_secs(secs),
            )
        })
        .collect();
    // A number beyond u64 would be someone else's CRL; start over at its cap.
    let number = crl.crl_number().map_or(0, |n| {
        n.to_bytes_be()
            .iter()
            .try_fold(0u64, |acc, &b| {
                acc.checked_mul(256).map(|a| a | u64::from(b))
            })
            .unwrap_or(u64::MAX - 1)
    });
    Ok((entries, number))
}

/// Parses a serial written in hex, with or without colons.
fn parse_serial(text: &str) -> Result<Vec<u8>> {
    let digits: String = text
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if digits.is_empty() || digits.len() > 40 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("{text:?} is not a certificate serial number (hex, at most 20 bytes)");
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|e| anyhow!("{text:?}: {e}"))?;
    Ok(minimal(&bytes))
}

/// Leading zero bytes dropped: DER adds one where the sign needs it, and
/// `openssl` prints serials without; compare the number, not the encoding.
fn minimal(bytes: &[u8]) -> Vec<u8> {
    let start = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    bytes[start..].to_vec()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_parse_like_openssl_prints_them() {
        assert_eq!(parse_serial("0A:ff").unwrap(), vec![0x0a, 0xff]);
        assert_eq!(parse_serial("00aff").unwrap(), vec![0x0a, 0xff]);
        assert_eq!(parse_serial("0x1").unwrap(), vec![1]);
        assert_eq!(parse_serial("0").unwrap(), vec![0]);
        assert!(parse_serial("").is_err());
        assert!(parse_serial("xyz").is_err());
        assert!(parse_serial(&"f".repeat(41)).is_err());
    }

    #[test]
    fn hex_and_parse_roundtrip() {
        for bytes in [vec![1u8], vec![0x7f, 0, 3], vec![0xff; 20]] {
            assert_eq!(parse_serial(&hex(&bytes)).unwrap(), bytes);
        }
    }
}
