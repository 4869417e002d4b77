//! Noticing new TLS material: the agent polls [`TlsWatch::poll`] every few
//! seconds (and on SIGHUP) and switches to what it returns.

use crate::{NodeTls, Result, TlsFiles};

/// Compares the TLS dir's files with what the material in use was loaded
/// from. A change is loaded only once the files have stayed the same for
/// one poll, so an operator copying four files one by one is not caught
/// halfway (unless forced, as on SIGHUP); a change that fails to load is
/// reported once, not on every poll, and the old material stays in use.
#[derive(Debug, Default)]
pub struct TlsWatch {
    /// What the files looked like at the previous poll.
    pending: Option<[u8; 32]>,
    /// Contents that failed to load (already reported).
    failed: Option<[u8; 32]>,
}

impl TlsWatch {
    pub fn new() -> TlsWatch {
        TlsWatch::default()
    }

    /// `None`: nothing to do. `Some(Ok(new))`: material to switch to.
    /// `Some(Err(e))`: the files changed and do not load (counted in
    /// `reloads_error`; the caller logs it). `force` skips the wait for the
    /// files to settle and retries contents that failed before.
    pub fn poll(&mut self, current: &NodeTls, force: bool) -> Option<Result<NodeTls>> {
        // An unreadable file (mid-copy, say) is a state of its own; it
        // settles into whatever the copy ends with.
        let seen = match TlsFiles::read(current.dir()) {
            Ok(files) => files.fingerprint(),
            Err(e) => {
                if force {
                    current
                        .stats
                        .reloads_error
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Some(Err(e));
                }
                self.pending = None;
                return None;
            }
        };
        if seen == current.fingerprint {
            self.pending = None;
            self.failed = None;
            return None;
        }
        let settled = self.pending == Some(seen);
        self.pending = Some(seen);
        if !force && (!settled || self.failed == Some(seen)) {
            return None;
        }
        let result = current.reload();
        if result.is_err() {
            self.failed = Some(seen);
        }
        Some(result)
    }
}
