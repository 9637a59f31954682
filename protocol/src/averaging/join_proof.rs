//! Proofs that a peer joined a round, so a leader cannot list members that never did.
//!
//! A leader's `Group` fixes who reduces which part of the vector. Were its member list
//! taken on trust, a hostile leader could list made-up peers: every honest member would
//! then send parts to reducers that do not exist, wait for them until the reduce
//! deadline, and keep those parts local, round after round. So each `Join` carries its
//! sender's proof of joining that round with that vector length, the leader copies the
//! proofs of the peers it lists into its `Group`, and a member checks every proof it has
//! not already checked on a `Join` before following the group. A `Group` with a missing
//! or invalid proof is refused, and its leader is set aside for the round.
//!
//! The leader also signs its `Group` (members and proofs), so members can pass it on: a
//! hostile leader that lists a peer which did join but withholds the `Group` from it
//! would otherwise make the others wait for that peer until the reduce deadline. A
//! member that hears a listed peer still asking to join the round sends it the signed
//! `Group` (at most once per `Join` re-broadcast interval), which the peer follows as if
//! its leader had sent it. A passed-on copy that fails the signature is refused without
//! blaming the leader: the member that passed it on may have altered it.
//!
//! The protocol crate holds no keys: the caller supplies a [`JoinAttestor`]. The node signs
//! with its libp2p identity; [`OpenJoinProofs`] serves the simulator and tests.

use crate::tensor::Bytes;
use crate::NodeId;
use std::fmt;

/// Longest join proof a message may carry: room for a public key and a signature of the
/// common libp2p key types (an Ed25519 proof takes about 100 bytes).
pub const MAX_JOIN_PROOF_BYTES: usize = 256;

/// Makes and checks join proofs. Implementations bind a proof to the swarm (and whatever
/// else scopes a round, such as a pipeline stage), so a proof cannot be replayed elsewhere.
pub trait JoinAttestor: Send + Sync + fmt::Debug {
    /// Our proof (we are `me`) of joining `round` with a vector of `len` values.
    fn attest(&self, me: NodeId, round: u64, len: u64) -> Bytes;

    /// Whether `proof` shows that `member` joined `round` with a vector of `len` values.
    fn verify(&self, member: NodeId, round: u64, len: u64, proof: &[u8]) -> bool;

    /// Our signature (we lead, as `me`) over the group of `round` with a vector of `len`
    /// values that `members` make up, with their join `proofs`: a member passing the
    /// `Group` on can change nothing in it without breaking the signature.
    fn sign_group(
        &self,
        me: NodeId,
        round: u64,
        len: u64,
        members: &[NodeId],
        proofs: &[Bytes],
    ) -> Bytes;

    /// Whether `signature` shows that `leader` formed the group of `round` with `len`
    /// values that `members` make up, with their join `proofs`.
    fn verify_group(
        &self,
        leader: NodeId,
        round: u64,
        len: u64,
        members: &[NodeId],
        proofs: &[Bytes],
        signature: &[u8],
    ) -> bool;
}

/// Proofs anyone can compute from the member's id: they check the protocol's handling of
/// proofs (a made-up member without one is refused), not an attacker who knows the
/// scheme. For the simulator and tests; a node signs with its key instead.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenJoinProofs;

impl OpenJoinProofs {
    fn proof(member: NodeId, round: u64, len: u64) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"p2ptrain open join proof\0");
        h.update(&member.0);
        h.update(&round.to_le_bytes());
        h.update(&len.to_le_bytes());
        *h.finalize().as_bytes()
    }

    fn group_signature(
        leader: NodeId,
        round: u64,
        len: u64,
        members: &[NodeId],
        proofs: &[Bytes],
    ) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"p2ptrain open group signature\0");
        h.update(&leader.0);
        h.update(&round.to_le_bytes());
        h.update(&len.to_le_bytes());
        h.update(&group_digest(members, proofs));
        *h.finalize().as_bytes()
    }
}

impl JoinAttestor for OpenJoinProofs {
    fn attest(&self, me: NodeId, round: u64, len: u64) -> Bytes {
        Bytes::from(Self::proof(me, round, len).to_vec())
    }

    fn verify(&self, member: NodeId, round: u64, len: u64, proof: &[u8]) -> bool {
        proof == Self::proof(member, round, len)
    }

    fn sign_group(
        &self,
        me: NodeId,
        round: u64,
        len: u64,
        members: &[NodeId],
        proofs: &[Bytes],
    ) -> Bytes {
        Bytes::from(Self::group_signature(me, round, len, members, proofs).to_vec())
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
        signature == Self::group_signature(leader, round, len, members, proofs)
    }
}

/// A digest of a group's members and their join proofs, for the leader's signature.
pub fn group_digest(members: &[NodeId], proofs: &[Bytes]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&(members.len() as u64).to_le_bytes());
    for m in members {
        h.update(&m.0);
    }
    h.update(&(proofs.len() as u64).to_le_bytes());
    for p in proofs {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_proof_is_bound_to_member_round_and_length() {
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let p = OpenJoinProofs.attest(a, 7, 100);
        assert!(OpenJoinProofs.verify(a, 7, 100, &p));
        assert!(!OpenJoinProofs.verify(b, 7, 100, &p), "another member");
        assert!(!OpenJoinProofs.verify(a, 8, 100, &p), "another round");
        assert!(!OpenJoinProofs.verify(a, 7, 101, &p), "another length");
        assert!(!OpenJoinProofs.verify(a, 7, 100, &p[1..]), "cut short");
        assert!(p.len() <= MAX_JOIN_PROOF_BYTES);
    }

    #[test]
    fn an_open_group_signature_is_bound_to_leader_round_length_and_members() {
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let proofs = [Bytes::from(vec![1; 4]), Bytes::from(vec![2; 4])];
        let s = OpenJoinProofs.sign_group(a, 7, 100, &[a, b], &proofs);
        assert!(OpenJoinProofs.verify_group(a, 7, 100, &[a, b], &proofs, &s));
        let swapped = [proofs[0].clone(), Bytes::from(vec![3; 4])];
        assert!(
            !OpenJoinProofs.verify_group(a, 7, 100, &[a, b], &swapped, &s),
            "another proof"
        );
        assert!(
            !OpenJoinProofs.verify_group(b, 7, 100, &[a, b], &proofs, &s),
            "another leader"
        );
        assert!(
            !OpenJoinProofs.verify_group(a, 8, 100, &[a, b], &proofs, &s),
            "another round"
        );
        assert!(
            !OpenJoinProofs.verify_group(a, 7, 99, &[a, b], &proofs, &s),
            "another length"
        );
        assert!(
            !OpenJoinProofs.verify_group(a, 7, 100, &[a], &proofs, &s),
            "other members"
        );
    }
}
