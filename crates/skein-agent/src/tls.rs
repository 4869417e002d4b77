//! Reloading the TLS dir while the agent runs, and its metrics.
//!
//! The files are compared every [`POLL`] (content digests, so an editor's
//! or `cp`'s mtime games don't matter) and on SIGHUP. A change is applied
//! once it has held for one poll (SIGHUP: at once): gossip accepts and
//! dials with the new material, and open connections whose peer it refuses
//! (a CRL revoking it) are closed. Material that does not load (unparsable,
//! a key that does not match, a CRL not from the CA, another node's
//! certificate) is logged and counted once; the old material stays in use.
//!
//! Not reloaded: the key gossip signs with and the CRL it checks relayed
//! facts' origins against (`GossipSigner`, made at start), and the QUIC
//! stateless-reset key; a restart picks those up.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use skein_gossip::QuicTransport;
use skein_tls::{Refusal, TlsStats, TlsWatch};

/// How often the TLS dir is compared with the material in use.
pub const POLL: Duration = Duration::from_secs(2);

/// Watches the TLS dir of `transport`'s material until the transport is
/// dropped.
pub async fn watch(transport: Weak<QuicTransport>) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(error = %err, "no SIGHUP handler; TLS reloads by polling only");
            None
        }
    };
    let mut watch = TlsWatch::new();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let force = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let Some(transport) = transport.upgrade() else {
            return;
        };
        if force {
            tracing::info!("SIGHUP: reloading TLS material");
        }
        reload_once(&transport, &mut watch, force);
    }
}

/// One comparison of the TLS dir with the material in use, applied if it
/// changed and loads.
pub fn reload_once(transport: &QuicTransport, watch: &mut TlsWatch, force: bool) {
    let current = transport.tls();
    match watch.poll(&current, force) {
        None => {}
        Some(Ok(new)) => {
            let crls = new.crl_count();
            match transport.apply_tls(Arc::new(new)) {
                Ok(closed) => tracing::info!(
                    dir = %current.dir().display(),
                    crls,
                    cert_expires_in_s = current.stats().cert_expiry_seconds(),
                    closed_connections = closed,
                    "TLS material reloaded"
                ),
                Err(err) => {
                    current
                        .stats()
                        .reloads_error
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %err, "reloaded TLS material unusable; keeping the old");
                }
            }
        }
        Some(Err(err)) => tracing::error!(
            dir = %current.dir().display(),
            error = %format!("{err:#}"),
            "TLS files changed but do not load; keeping the material in use"
        ),
    }
}

/// The `skein_tls_*` metrics.
pub fn render(out: &mut String, stats: &TlsStats) {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP skein_tls_cert_expiry_seconds Seconds until the certificate in use expires \
         (negative once expired).\n# TYPE skein_tls_cert_expiry_seconds gauge\n\
         skein_tls_cert_expiry_seconds{{cert=\"node\"}} {}\n\
         skein_tls_cert_expiry_seconds{{cert=\"ca\"}} {}",
        stats.cert_expiry_seconds(),
        stats.ca_expiry_seconds()
    );
    let _ = writeln!(
        out,
        "# HELP skein_tls_reloads_total Changes of the TLS dir applied (ok) or refused, \
         keeping the old material (error).\n# TYPE skein_tls_reloads_total counter\n\
         skein_tls_reloads_total{{result=\"ok\"}} {}\n\
         skein_tls_reloads_total{{result=\"error\"}} {}",
        load(&stats.reloads_ok),
        load(&stats.reloads_error)
    );
    let _ = writeln!(
        out,
        "# HELP skein_tls_handshakes_refused_total Peer certificates this node refused at \
         a gossip handshake, by reason.\n# TYPE skein_tls_handshakes_refused_total counter"
    );
    for reason in Refusal::ALL {
        let _ = writeln!(
            out,
            "skein_tls_handshakes_refused_total{{reason=\"{}\"}} {}",
            reason.label(),
            stats.refused(reason)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_expiry_within_a_day_of_the_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        skein_tls::init_ca(&tmp.path().join("ca"), "c1").unwrap();
        skein_tls::issue_node_with(
            &tmp.path().join("ca"),
            "n1",
            &tmp.path().join("n1"),
            &skein_tls::IssueOptions {
                days: 90,
                cluster_id: None,
            },
        )
        .unwrap();
        let tls = skein_tls::NodeTls::load(&tmp.path().join("n1")).unwrap();
        let mut out = String::new();
        render(&mut out, tls.stats());
        let value = |prefix: &str| -> i64 {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or_else(|| panic!("{prefix} missing in\n{out}"))
                .trim()
                .parse()
                .unwrap()
        };
        let node = value("skein_tls_cert_expiry_seconds{cert=\"node\"}");
        assert!((node - 90 * 86_400).abs() < 86_400, "{node}");
        let ca = value("skein_tls_cert_expiry_seconds{cert=\"ca\"}");
        assert!(ca > 19 * 365 * 86_400, "{ca}");
        assert_eq!(value("skein_tls_reloads_total{result=\"ok\"}"), 0);
        assert_eq!(
            value("skein_tls_handshakes_refused_total{reason=\"revoked\"}"),
            0
        );
    }
}
