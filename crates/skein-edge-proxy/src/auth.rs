//! `HAPROXY_{n}_AUTH`: HTTP basic authentication against a crypt(3)
//! SHA-256/SHA-512 hash.
//!
//! Checking such a hash costs thousands of SHA rounds (milliseconds), far
//! too much per request, so credentials that passed are remembered per
//! hash, and the check itself runs off the async threads.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use base64::Engine;
use skein_edge::labels::BasicAuth;

/// Remembered credentials in all, before the memory is cleared.
const MAX_REMEMBERED: usize = 10_000;

#[derive(Default)]
pub(crate) struct AuthCache {
    /// Password hash → `Authorization` header values that matched it.
    ok: Mutex<HashMap<String, HashSet<String>>>,
}

fn verify(password: &str, hash: &str) -> bool {
    if hash.starts_with("$6$") {
        sha_crypt::sha512_check(password, hash).is_ok()
    } else if hash.starts_with("$5$") {
        sha_crypt::sha256_check(password, hash).is_ok()
    } else {
        false
    }
}

impl AuthCache {
    /// Whether the request's `Authorization` header value passes `auth`.
    pub(crate) async fn check(&self, auth: &BasicAuth, header: Option<&str>) -> bool {
        let Some(header) = header else {
            return false;
        };
        {
            let ok = self.ok.lock().unwrap_or_else(|e| e.into_inner());
            if ok
                .get(&auth.password_hash)
                .is_some_and(|s| s.contains(header))
            {
                return true;
            }
        }
        let Some(encoded) = header
            .strip_prefix("Basic ")
            .or_else(|| header.strip_prefix("basic "))
        else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(text) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = text.split_once(':') else {
            return false;
        };
        if user != auth.user {
            return false;
        }
        let password = password.to_string();
        let hash = auth.password_hash.clone();
        let passed = tokio::task::spawn_blocking(move || verify(&password, &hash))
            .await
            .unwrap_or(false);
        if passed {
            let mut ok = self.ok.lock().unwrap_or_else(|e| e.into_inner());
            if ok.values().map(HashSet::len).sum::<usize>() >= MAX_REMEMBERED {
                ok.clear();
            }
            ok.entry(auth.password_hash.clone())
                .or_default()
                .insert(header.to_string());
        }
        passed
    }
}
