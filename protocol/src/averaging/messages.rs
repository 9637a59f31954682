//! What peers say to each other during an averaging round.

use super::join_proof::MAX_JOIN_PROOF_BYTES;
use crate::tensor::{Bytes, Payload};
use crate::wire::{check_ids, check_part, check_vector_len, ContentError};
use crate::NodeId;
use serde::{Deserialize, Serialize};

/// An averaging-round message. Every variant names its round so stale and early messages
/// can be told apart.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum AvgMessage {
    /// "I am ready for round `round` with a vector of `len` values." Broadcast, repeated
    /// while matchmaking.
    Join {
        /// The round.
        round: u64,
        /// Number of values in the sender's vector; only equal lengths average together.
        len: u64,
        /// The sender's proof of joining this round with this length (see
        /// [`join_proof`](super::join_proof)); the leader passes it on in its `Group`.
        proof: Bytes,
    },
    /// The leader fixes the group: `members` sorted ascending, `members[0]` is the leader
    /// (and the sender, or a member passing on the leader's signed `Group`).
    Group {
        /// The round.
        round: u64,
        /// Vector length of the group.
        len: u64,
        /// The members, strictly ascending.
        members: Vec<NodeId>,
        /// Each member's join proof, in the order of `members`.
        proofs: Vec<Bytes>,
        /// The leader's signature over round, length and members, so that members can
        /// pass the `Group` on to a member the leader did not reach.
        signature: Bytes,
    },
    /// Member to the reducer of `part`: the sender's values for that part.
    Part {
        /// The round.
        round: u64,
        /// Index of the part (= index of its reducer in the member list).
        part: u32,
        /// The sender's values for that part's range.
        payload: Payload,
    },
    /// Reducer to members: the mean of `part` over `contributors`. Doubles as the
    /// acknowledgement of the receiver's `Part`.
    Reduced {
        /// The round.
        round: u64,
        /// Index of the part.
        part: u32,
        /// Whose values were averaged, strictly ascending.
        contributors: Vec<NodeId>,
        /// The averaged values.
        payload: Payload,
    },
}

/// A join proof must fit [`MAX_JOIN_PROOF_BYTES`].
fn check_join_proof(proof: &[u8]) -> Result<(), ContentError> {
    if proof.len() > MAX_JOIN_PROOF_BYTES {
        return Err(ContentError::ProofTooLong {
            len: proof.len(),
            max: MAX_JOIN_PROOF_BYTES,
        });
    }
    Ok(())
}

impl AvgMessage {
    /// The round the message belongs to.
    pub fn round(&self) -> u64 {
        match self {
            AvgMessage::Join { round, .. }
            | AvgMessage::Group { round, .. }
            | AvgMessage::Part { round, .. }
            | AvgMessage::Reduced { round, .. } => *round,
        }
    }

    /// The variant's name, for log lines and rejection reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            AvgMessage::Join { .. } => "Join",
            AvgMessage::Group { .. } => "Group",
            AvgMessage::Part { .. } => "Part",
            AvgMessage::Reduced { .. } => "Reduced",
        }
    }

    /// The cheap checks that do not touch payload bytes: vector lengths, part indices, id
    /// lists non-empty, bounded and strictly ascending.
    pub fn validate_structure(&self) -> Result<(), ContentError> {
        match self {
            AvgMessage::Join { len, proof, .. } => {
                check_vector_len(*len)?;
                check_join_proof(proof)
            }
            AvgMessage::Group {
                len,
                members,
                proofs,
                signature,
                ..
            } => {
                check_vector_len(*len)?;
                check_ids("members", members)?;
                if proofs.len() != members.len() {
                    return Err(ContentError::ProofCount {
                        members: members.len(),
                        proofs: proofs.len(),
                    });
                }
                proofs.iter().try_for_each(|p| check_join_proof(p))?;
                check_join_proof(signature)
            }
            AvgMessage::Part { part, .. } => check_part(*part),
            AvgMessage::Reduced {
                part, contributors, ..
            } => {
                check_part(*part)?;
                check_ids("contributors", contributors)
            }
        }
    }

    /// All receiver-independent checks: [`AvgMessage::validate_structure`] plus
    /// [`Payload::validate`] (encoding parameters, length, digest, content). Any encoding is
    /// accepted here; whether it suits the round is the receiving state machine's call.
    pub fn validate(&self) -> Result<(), ContentError> {
        self.validate_structure()?;
        match self {
            AvgMessage::Part { payload, .. } | AvgMessage::Reduced { payload, .. } => {
                payload.validate()?;
            }
            AvgMessage::Join { .. } | AvgMessage::Group { .. } => {}
        }
        Ok(())
    }
}
