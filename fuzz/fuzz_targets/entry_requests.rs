//! What the entry point reads from a client before it knows who it is: the
//! `Authorization` and `Cookie` headers, the login form's value, the path
//! (mapped onto the API, or a service's with its prefix stripped). Never
//! panics; a credential found is a part of the header it came from; a
//! mapped path is one of the API's read routes; a stripped service path
//! starts with `/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_entry::auth::{self, Credential};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (a, b, c) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    if let Some(Credential::Token(t)) = auth::from_authorization(a) {
        assert!(a.contains(t));
    }
    if let Some(Credential::Session(s)) = auth::from_cookie(b) {
        assert!(b.contains(s) && !s.is_empty());
    }
    if let Some(v) = auth::form_value(c) {
        // Encoded again byte by byte, it decodes to itself.
        let encoded: String = v.bytes().map(|b| format!("%{b:02X}")).collect();
        assert_eq!(auth::form_value(&encoded).as_deref(), Some(v.as_str()));
    }
    if let Some(target) = skein_entry::mapped_path(a) {
        assert!(
            target.starts_with("/v1/") || target == "/overlay-master/state" || target == "/metrics",
            "{a:?} mapped to {target:?}"
        );
    }
    let path = format!("/service/{b}");
    if let Ok(uri) = path.parse::<axum::http::Uri>() {
        let name = b.split('/').next().unwrap_or("");
        assert!(skein_entry::service::strip(&uri, name).starts_with('/'));
    }
});
