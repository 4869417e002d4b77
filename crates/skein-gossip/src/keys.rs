//! The protocol core's [`Keys`] with the node's real key and the cluster CA.

use skein_proto::{Identity, Keys, Sig};
use skein_tls::GossipSigner;

pub struct CertKeys(pub GossipSigner);

impl Keys for CertKeys {
    fn sign(&self, msg: &[u8]) -> Sig {
        // ring signs with a valid key; a failure would be a broken RNG, and
        // an all-zero signature is then refused by every peer.
        Sig(self.0.sign(msg).unwrap_or([0; skein_tls::GOSSIP_SIG_LEN]))
    }

    fn check_identity(&self, node: &str, identity: &Identity) -> bool {
        self.0.check_identity(node, &identity.0)
    }

    fn verify(&self, identity: &Identity, msg: &[u8], sig: &Sig) -> bool {
        GossipSigner::verify(&identity.0, msg, &sig.0)
    }
}
