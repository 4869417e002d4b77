//! Keys for simulated nodes: a keyed hash in place of ECDSA, with the same
//! signature length and a certificate-sized identity, so byte counts match
//! the real thing while 10,000 nodes sign and verify in one process.

use skein_proto::name::{hash64, mix};
use skein_proto::{Identity, Keys, Sig};

/// Size of a real node certificate (DER), which the identity stands for.
pub const IDENTITY_LEN: usize = 450;

/// The key a simulated CA would have issued to `name`.
pub fn key_of(name: &str, ca_secret: u64) -> u64 {
    mix(hash64(name.as_bytes()) ^ ca_secret)
}

pub fn identity_of(name: &str, ca_secret: u64) -> Identity {
    let mut bytes = vec![0u8; IDENTITY_LEN];
    bytes[..8].copy_from_slice(&key_of(name, ca_secret).to_le_bytes());
    Identity(bytes)
}

fn mac(key: u64, msg: &[u8]) -> u64 {
    let mut h = mix(key);
    for chunk in msg.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = mix(h ^ u64::from_le_bytes(w));
    }
    mix(h ^ msg.len() as u64)
}

#[derive(Clone)]
pub struct SimKeys {
    /// This node's own key (what its identity proves).
    pub key: u64,
    pub ca_secret: u64,
}

impl Keys for SimKeys {
    fn sign(&self, msg: &[u8]) -> Sig {
        let mut sig = [0u8; 64];
        sig[..8].copy_from_slice(&mac(self.key, msg).to_le_bytes());
        Sig(sig)
    }

    fn check_identity(&self, node: &str, identity: &Identity) -> bool {
        identity.0.len() >= 8 && identity.0[..8] == key_of(node, self.ca_secret).to_le_bytes()
    }

    fn verify(&self, identity: &Identity, msg: &[u8], sig: &Sig) -> bool {
        let Some(key) = identity.0.get(..8) else {
            return false;
        };
        let mut k = [0u8; 8];
        k.copy_from_slice(key);
        sig.0[..8] == mac(u64::from_le_bytes(k), msg).to_le_bytes()
    }
}
