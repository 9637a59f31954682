//! Join proofs signed with the node's identity key, so a hostile averaging leader cannot
//! list members that never joined its round (see the protocol's
//! `averaging::join_proof`).
//!
//! A proof is the member's Ed25519 public key (32 bytes) and its signature (64 bytes)
//! over the swarm's gossip topic (which carries the secret's tag under
//! `--secret-file`), the pipeline stage averaged (if any), the round and the vector
//! length. Anyone can check it against the member's id (the hash of the peer id the key
//! gives), and nobody without the key can make one. A leader signs its `Group` the same
//! way, over the member list too, so members can pass it on.

use libp2p::identity::{ed25519, Keypair, PublicKey};
use p2ptrain_protocol::averaging::{join_proof::group_digest, JoinAttestor};
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

    /// What a join proof signs.
    fn statement(&self, round: u64, len: u64) -> Vec<u8> {
        self.scoped(b"p2ptrain join proof v1\0", round, len)
    }

    /// What a leader's signature over its group signs: members and proofs by digest.
    fn group_statement(
        &self,
        round: u64,
        len: u64,
        members: &[NodeId],
        proofs: &[Bytes],
    ) -> Vec<u8> {
        let mut s = self.scoped(b"p2ptrain group signature v1\0", round, len);
        s.extend_from_slice(&group_digest(members, proofs));
        s
    }

    /// `domain`, then the swarm, stage, round and length a signature is bound to.
    fn scoped(&self, domain: &[u8], round: u64, len: u64) -> Vec<u8> {
        let mut s = Vec::with_capacity(64 + self.topic.len());
        s.extend_from_slice(domain);
        s.extend_from_slice(&(self.topic.len() as u64).to_le_bytes());
        s.extend_from_slice(self.topic.as_bytes());
        s.extend_from_slice(&self.stage.get().to_le_bytes());
        s.extend_from_slice(&round.to_le_bytes());
        s.extend_from_slice(&len.to_le_bytes());
        s
    }
}

impl SignedJoins {
    /// Our public key and our signature over `statement`.
    fn sign(&self, statement: &[u8]) -> Bytes {
        let mut proof = Vec::with_capacity(PROOF_BYTES);
        proof.extend_from_slice(&self.key.public().to_bytes());
        proof.extend_from_slice(&self.key.sign(statement));
        Bytes::from(proof)
    }

    /// Whether `proof` is `signer`'s key and its signature over `statement`.
    fn check(signer: NodeId, statement: &[u8], proof: &[u8]) -> bool {
        if proof.len() != PROOF_BYTES {
            return false;
        }
        let (key, signature) = proof.split_at(32);
        let Ok(key) = ed25519::PublicKey::try_from_bytes(key) else {
            return false;
        };
        let peer = PublicKey::from(key.clone()).to_peer_id();
        crate::identity::node_id_of(&peer) == signer && key.verify(statement, signature)
    }
}

impl JoinAttestor for SignedJoins {
    fn attest(&self, _me: NodeId, round: u64, len: u64) -> Bytes {
        self.sign(&self.statement(round, len))
    }

    fn verify(&self, member: NodeId, round: u64, len: u64, proof: &[u8]) -> bool {
        Self::check(member, &self.statement(round, len), proof)
    }

    fn sign_group(
        &self,
        _me: NodeId,
        round: u64,
        len: u64,
        members: &[NodeId],
        proofs: &[Bytes],
    ) -> Bytes {
        self.sign(&self.group_statement(round, len, members, proofs))
    }

    fn verify_group(
        &self,
        leader: NodeId,
        round: u64,
        len: u64,
        members: &[NodeId],
        proofs: &[Bytes],
        signature: &[u8],
    ) -> bool {
        let statement = self.group_statement(round, len, members, proofs);
        Self::check(leader, &statement, signature)
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

    #[test]
    fn a_group_signature_checks_only_for_its_leader_and_exact_group() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let topic = "p2ptrain/s/control/1";
        let signer = SignedJoins::new(&a, topic, StageScope::default()).unwrap();
        let checker = SignedJoins::new(&b, topic, StageScope::default()).unwrap();
        let members = [node_id(&a), node_id(&b)];
        let proofs = [
            signer.attest(node_id(&a), 3, 10),
            checker.attest(node_id(&b), 3, 10),
        ];
        let sig = signer.sign_group(node_id(&a), 3, 10, &members, &proofs);
        let ok = |leader, round, len, members: &[NodeId], proofs: &[Bytes]| {
            checker.verify_group(leader, round, len, members, proofs, &sig)
        };
        assert!(ok(node_id(&a), 3, 10, &members, &proofs));
        assert!(!ok(node_id(&b), 3, 10, &members, &proofs), "another leader");
        assert!(!ok(node_id(&a), 4, 10, &members, &proofs), "another round");
        assert!(!ok(node_id(&a), 3, 11, &members, &proofs), "another length");
        assert!(
            !ok(node_id(&a), 3, 10, &members[..1], &proofs),
            "other members"
        );
        let swapped = [proofs[0].clone(), proofs[0].clone()];
        assert!(!ok(node_id(&a), 3, 10, &members, &swapped), "another proof");
        // A join proof is no group signature, nor the other way round.
        let proof = signer.attest(node_id(&a), 3, 10);
        assert!(!checker.verify_group(node_id(&a), 3, 10, &members, &proofs, &proof));
        assert!(!checker.verify(node_id(&a), 3, 10, &sig));
    }
}
