//! Join proofs signed with the node's identity key, so a hostile averaging leader cannot
//! list members that never joined its round (see the protocol's
//! `averaging::join_proof`).
//!
//! A proof is the member's Ed25519 public key (32 bytes) and its signature (64 bytes)
//! over the swarm's gossip topic (which carries the secret's tag under
//! `--secret-file`), the pipeline stage averaged (if any), the round and the vector
//! length. Anyone can check it against the member's id (the hash of the peer id the key
//! gives), and nobody without the key can make one.

use libp2p::identity::{ed25519, Keypair, PublicKey};
use p2ptrain_protocol::averaging::JoinAttestor;
use p2ptrain_protocol::tensor::Bytes;
use p2ptrain_protocol::NodeId;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of a proof: public key, then signature.
const PROOF_BYTES: usize = 32 + 64;
/// The stage field of a data-parallel round's statement.
const NO_STAGE: u64 = u64::MAX;

/// Why a node cannot sign join proofs.
#[derive(Debug, thiserror::Error)]
pub enum JoinProofError {
    /// Only Ed25519 identities are built in.
    #[error("the node's identity key is not an Ed25519 key")]
    NotEd25519,
}

/// The pipeline stage a node averages now, shared with its [`SignedJoins`] so proofs
/// name the stage: a replica of one stage cannot be listed in another's group.
#[derive(Clone, Debug)]
pub struct StageScope(Arc<AtomicU64>);

impl Default for StageScope {
    /// Data-parallel rounds, until a stage is set.
    fn default() -> Self {
        StageScope(Arc::new(AtomicU64::new(NO_STAGE)))
    }
}

impl StageScope {
    /// Proofs from now on are for averaging `stage` (`None`: data-parallel rounds).
    pub fn set(&self, stage: Option<u32>) {
        self.0
            .store(stage.map_or(NO_STAGE, u64::from), Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Makes this node's join proofs and checks its peers'.
pub struct SignedJoins {
    key: ed25519::Keypair,
    topic: String,
    stage: StageScope,
}

impl fmt::Debug for SignedJoins {
    /// The topic and stage only: the key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedJoins")
            .field("topic", &self.topic)
            .field("stage", &self.stage.get())
            .finish_non_exhaustive()
    }
}

impl SignedJoins {
    /// Proofs for rounds of the swarm whose gossip topic is `topic`, signed with
    /// `keypair`; `stage` says which pipeline stage they are for.
    pub fn new(keypair: &Keypair, topic: &str, stage: StageScope) -> Result<Self, JoinProofError> {
        let key = keypair
            .clone()
            .try_into_ed25519()
            .map_err(|_| JoinProofError::NotEd25519)?;
        Ok(SignedJoins {
            key,
            topic: topic.to_owned(),
            stage,
        })
    }

    /// What a proof signs.
    fn statement(&self, round: u64, len: u64) -> Vec<u8> {
        let mut s = Vec::with_capacity(64 + self.topic.len());
        s.extend_from_slice(b"p2ptrain join proof v1\0");
        s.extend_from_slice(&(self.topic.len() as u64).to_le_bytes());
        s.extend_from_slice(self.topic.as_bytes());
        s.extend_from_slice(&self.stage.get().to_le_bytes());
        s.extend_from_slice(&round.to_le_bytes());
        s.extend_from_slice(&len.to_le_bytes());
        s
    }
}

impl JoinAttestor for SignedJoins {
    fn attest(&self, _me: NodeId, round: u64, len: u64) -> Bytes {
        let mut proof = Vec::with_capacity(PROOF_BYTES);
        proof.extend_from_slice(&self.key.public().to_bytes());
        proof.extend_from_slice(&self.key.sign(&self.statement(round, len)));
        Bytes::from(proof)
    }

    fn verify(&self, member: NodeId, round: u64, len: u64, proof: &[u8]) -> bool {
        if proof.len() != PROOF_BYTES {
            return false;
        }
        let (key, signature) = proof.split_at(32);
        let Ok(key) = ed25519::PublicKey::try_from_bytes(key) else {
            return false;
        };
        let peer = PublicKey::from(key.clone()).to_peer_id();
        crate::identity::node_id_of(&peer) == member
            && key.verify(&self.statement(round, len), signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_id(key: &Keypair) -> NodeId {
        crate::identity::node_id_of(&key.public().to_peer_id())
    }

    #[test]
    fn a_proof_checks_only_for_its_signer_swarm_stage_round_and_length() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let stage = StageScope::default();
        let signer = SignedJoins::new(&a, "p2ptrain/s/control/1", stage.clone()).unwrap();
        let checker = SignedJoins::new(&b, "p2ptrain/s/control/1", StageScope::default());
        let checker = checker.unwrap();
        let proof = signer.attest(node_id(&a), 5, 100);
        assert_eq!(proof.len(), PROOF_BYTES);
        assert!(proof.len() <= p2ptrain_protocol::averaging::MAX_JOIN_PROOF_BYTES);
        assert!(checker.verify(node_id(&a), 5, 100, &proof));
        assert!(
            !checker.verify(node_id(&b), 5, 100, &proof),
            "another member"
        );
        assert!(
            !checker.verify(node_id(&a), 6, 100, &proof),
            "another round"
        );
        assert!(
            !checker.verify(node_id(&a), 5, 101, &proof),
            "another length"
        );
        let mut flipped = proof.to_vec();
        flipped[40] ^= 1;
        assert!(
            !checker.verify(node_id(&a), 5, 100, &flipped),
            "a bad signature"
        );
        assert!(
            !checker.verify(node_id(&a), 5, 100, &proof[..95]),
            "cut short"
        );
        assert!(
            !checker.verify(node_id(&a), 5, 100, &[0; 96]),
            "no valid key"
        );
        // B's key with A's signature: the key matches B's id, not the signature.
        let mut swapped = b.public().try_into_ed25519().unwrap().to_bytes().to_vec();
        swapped.extend_from_slice(&proof[32..]);
        assert!(!checker.verify(node_id(&b), 5, 100, &swapped));

        let elsewhere = SignedJoins::new(&b, "p2ptrain/t/control/1", StageScope::default());
        let elsewhere = elsewhere.unwrap();
        assert!(
            !elsewhere.verify(node_id(&a), 5, 100, &proof),
            "another swarm"
        );
        checker.stage.set(Some(1));
        assert!(
            !checker.verify(node_id(&a), 5, 100, &proof),
            "a stage's round"
        );
        stage.set(Some(1));
        let staged = signer.attest(node_id(&a), 5, 100);
        assert!(checker.verify(node_id(&a), 5, 100, &staged));
    }
}
