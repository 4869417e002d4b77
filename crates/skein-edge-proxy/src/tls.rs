//! The HTTPS port's certificates: `HAPROXY_{n}_SSL_CERT` files, chosen by
//! SNI.
//!
//! A backend's certificate serves the virtual hosts its routes claim (the
//! winner of a host is the route that wins it on the HTTP side too). Files
//! are read once and again only when their size or modification time
//! changes, so applying routes costs a `stat` per file. A name without a
//! certificate gets the `--default-cert`, or a handshake failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::state::Table;

type Stamp = Vec<(PathBuf, Option<(SystemTime, u64)>)>;
/// A backend's certificate files → what they were when read, and what
/// reading them gave.
type Loaded = HashMap<Vec<String>, (Stamp, Result<Arc<CertifiedKey>, String>)>;

#[derive(Default)]
struct SniMap {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.domain` certificates by `domain`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

pub(crate) struct CertStore {
    cache: Mutex<Loaded>,
    map: ArcSwap<SniMap>,
    default: Option<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertStore")
    }
}

fn stamp(paths: &[String]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            (PathBuf::from(p), m)
        })
        .collect()
}

/// Reads a certificate chain and its key from one or more PEM files: a
/// file may hold both, or a certificate file may be followed by its key's.
pub(crate) fn load(paths: &[impl AsRef<Path>]) -> Result<Arc<CertifiedKey>, String> {
    let mut certs: Vec<CertificateDer<'static>> = Vec::new();
    let mut key: Option<PrivateKeyDer<'static>> = None;
    for path in paths {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(&pem) {
            let (kind, der) = section.map_err(|e| format!("{}: {e}", path.display()))?;
            match kind {
                SectionKind::Certificate => certs.push(CertificateDer::from(der)),
                SectionKind::PrivateKey => {
                    key.get_or_insert(PrivateKeyDer::Pkcs8(der.into()));
                }
                SectionKind::RsaPrivateKey => {
                    key.get_or_insert(PrivateKeyDer::Pkcs1(der.into()));
                }
                SectionKind::EcPrivateKey => {
                    key.get_or_insert(PrivateKeyDer::Sec1(der.into()));
                }
                _ => {}
            }
        }
        if !certs.is_empty() && key.is_some() {
            break;
        }
    }
    let names = || {
        paths
            .iter()
            .map(|p| p.as_ref().display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if certs.is_empty() {
        return Err(format!("no certificate in {}", names()));
    }
    let key = key.ok_or_else(|| format!("no private key in {}", names()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: unusable key: {e}", names()))?;
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}

impl CertStore {
    pub(crate) fn new(default: Option<Arc<CertifiedKey>>) -> CertStore {
        CertStore {
            cache: Mutex::default(),
            map: ArcSwap::from_pointee(SniMap::default()),
            default,
        }
    }

    fn key_for(&self, paths: &[String], problems: &mut Vec<String>) -> Option<Arc<CertifiedKey>> {
        let now = stamp(paths);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match cache.get(paths) {
            Some((s, _)) => *s != now,
            None => true,
        };
        if fresh {
            let loaded = load(paths);
            if let Err(e) = &loaded {
                tracing::warn!(error = %e, "cannot load an SSL certificate");
            }
            cache.insert(paths.to_vec(), (now, loaded));
        }
        match cache.get(paths).map(|(_, r)| r) {
            Some(Ok(k)) => Some(k.clone()),
            Some(Err(e)) => {
                problems.push(format!("SSL certificate not loaded: {e}"));
                None
            }
            None => None,
        }
    }

    /// Re-derives the SNI map from a new table; returns what failed.
    pub(crate) fn update(&self, table: &Table) -> Vec<String> {
        let mut problems = Vec::new();
        let mut map = SniMap::default();
        let mut used: Vec<Vec<String>> = Vec::new();
        for r in &table.http_routes {
            let certs = &r.backend.spec.labels.ssl_certs;
            let Some(host) = &r.host else { continue };
            if certs.is_empty() {
                continue;
            }
            used.push(certs.clone());
            let Some(key) = self.key_for(certs, &mut problems) else {
                continue;
            };
            match host.strip_prefix("*.") {
                Some(domain) => {
                    map.wildcard.entry(domain.to_string()).or_insert(key);
                }
                None => {
                    map.exact.entry(host.to_string()).or_insert(key);
                }
            }
        }
        problems.sort();
        problems.dedup();
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| used.contains(k));
        self.map.store(Arc::new(map));
        problems
    }

    fn lookup(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let map = self.map.load();
        if let Some(k) = map.exact.get(&name) {
            return Some(k.clone());
        }
        let mut rest = name.as_str();
        while let Some((_, domain)) = rest.split_once('.') {
            if let Some(k) = map.wildcard.get(domain) {
                return Some(k.clone());
            }
            rest = domain;
        }
        None
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        hello
            .server_name()
            .and_then(|n| self.lookup(n))
            .or_else(|| self.default.clone())
    }
}

/// The HTTPS port's rustls configuration over the store.
pub(crate) fn server_config(store: Arc<CertStore>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
