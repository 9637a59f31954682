//! The versioned wire format.
//!
//! Every message is a 2-byte little-endian protocol version followed by the postcard encoding
//! of a [`Message`]. [`decode`] is the single gate for untrusted bytes: it refuses oversized
//! input before parsing, a foreign version, a malformed or padded body, and content that no
//! honest peer sends (bad digests, NaN/inf, unsorted or oversized id lists, compressed
//! payloads whose size does not match their encoding, bad int8 block sizes or scales, top-k
//! indices out of range or not ascending), so the state machines only ever see well-formed
//! messages. It never panics on any byte string, and checking a payload allocates nothing.
//!
//! The size limit applies to the encoded message whatever the payload's encoding, so a
//! compressed payload carries proportionally more values per message (f16/bf16 2x, int8
//! about 4x; [`Encoding::encoded_bytes`](crate::tensor::Encoding::encoded_bytes) gives the
//! exact size).

use crate::averaging::{AvgMessage, MAX_GROUP_MEMBERS, MAX_VECTOR_LEN};
use crate::pipe::{
    PipeBackward, PipeError, PipeForward, StageHello, StageState, StageStateRequest,
};
use crate::statesync::{Claim, Digest, Manifest, StateError, MAX_CHUNKS, MAX_CHUNK_BYTES};
use crate::tensor::{Bytes, TensorError};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Version of the message format; bumped on any incompatible change so old and new peers
/// refuse each other with a clear error instead of misreading bytes.
pub const PROTOCOL_VERSION: u16 = 10;

/// Hard limit on one encoded message (header included): bounds what a peer can make us
/// buffer and parse.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Everything peers send to each other.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Message {
    /// An averaging-round message.
    Avg(AvgMessage),
    /// A training-progress announcement.
    Progress(Progress),
    /// A starting node asks a member which state it holds (answered with
    /// [`Message::StateAnnounce`]).
    StateRequest,
    /// The state the sender holds and serves: gossiped after each round it
    /// finishes, sent directly in answer to [`Message::StateRequest`].
    /// `None`: no state yet (the swarm has not finished a round).
    StateAnnounce(Option<Claim>),
    /// Asks for the manifest of the state with this root.
    ManifestRequest {
        /// The state's manifest root.
        root: Digest,
    },
    /// The answer to [`Message::ManifestRequest`]; `None` if not held.
    Manifest {
        /// The root asked for.
        root: Digest,
        /// Its manifest.
        manifest: Option<Manifest>,
    },
    /// Asks for one chunk of a state.
    ChunkRequest {
        /// The state's manifest root.
        root: Digest,
        /// The chunk.
        index: u32,
    },
    /// The answer to [`Message::ChunkRequest`]; `None` if not held.
    Chunk {
        /// The root asked for.
        root: Digest,
        /// The chunk.
        index: u32,
        /// Its bytes (checked against the manifest by the receiver).
        data: Option<Bytes>,
    },
    /// Pipeline: a micro-batch's activations for the next stage.
    PipeForward(PipeForward),
    /// Pipeline: a micro-batch's loss and input gradient, back to its sender.
    PipeBackward(PipeBackward),
    /// Pipeline: which stage the sender serves and how far it is (gossip).
    StageHello(StageHello),
    /// Pipeline: an averaging-round message among the replicas of `stage` only.
    StageAvg {
        /// The stage whose replicas average.
        stage: u32,
        /// The averaging message.
        msg: AvgMessage,
    },
    /// Pipeline: a stage's parameters after an averaging round (a backup for the first stage).
    StageState(StageState),
    /// Pipeline: a node taking over a stage asks for its backup.
    StageStateRequest(StageStateRequest),
}

/// A node's gossip announcement of its training progress, so peers can tell who is alive and
/// how far the swarm has come.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Progress {
    /// The last averaging round the node finished.
    pub round: u64,
    /// Local optimizer steps taken.
    pub step: u64,
    /// Recent training loss (must be finite).
    pub loss: f32,
    /// Training samples processed.
    pub samples: u64,
}

/// Why a message could not be encoded or was refused on receipt.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WireError {
    /// The message is larger than [`MAX_MESSAGE_BYTES`].
    #[error(
        "message of {size} bytes exceeds the {max}-byte limit; send large tensors in smaller parts"
    )]
    TooLarge {
        /// Size of the message in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks protocol version {got}, we speak {PROTOCOL_VERSION}; upgrade the older peer"
    )]
    Version {
        /// The version in the message header.
        got: u16,
    },
    /// The bytes are not a message of this version (truncated, garbage, trailing bytes).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message parsed but its content is invalid.
    #[error("invalid message content: {0}")]
    Content(#[from] ContentError),
    /// Serialization failed while encoding (a bug, not a peer's fault).
    #[error("could not encode message: {0}")]
    Encode(String),
}

/// Content no honest peer sends, found by [`Message::validate`] / [`AvgMessage::validate`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ContentError {
    /// A declared vector length beyond [`MAX_VECTOR_LEN`].
    #[error("vector length {len} exceeds the maximum of {max} values")]
    VectorTooLong {
        /// The declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// An id list longer than [`MAX_GROUP_MEMBERS`].
    #[error("{field} lists {count} peers, more than the maximum of {max}")]
    TooManyIds {
        /// Which list.
        field: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An id list that must name at least one peer is empty.
    #[error("{field} is empty")]
    NoIds {
        /// Which list.
        field: &'static str,
    },
    /// An id list that is not strictly ascending (unsorted or with duplicates).
    #[error("{field} must be sorted ascending without duplicates")]
    IdsNotSorted {
        /// Which list.
        field: &'static str,
    },
    /// A `Group` whose join proofs do not pair up with its members.
    #[error("Group lists {members} members but carries {proofs} join proofs")]
    ProofCount {
        /// Number of members.
        members: usize,
        /// Number of proofs.
        proofs: usize,
    },
    /// A join proof longer than any key type needs.
    #[error("join proof of {len} bytes, more than the maximum of {max}")]
    ProofTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A part index no group can have.
    #[error("part index {part} is out of range (groups have at most {max} parts)")]
    PartOutOfRange {
        /// The index.
        part: u32,
        /// The number of parts the largest group has.
        max: usize,
    },
    /// A tensor payload failed its checks.
    #[error("payload: {0}")]
    Payload(#[from] TensorError),
    /// A pipeline message's content is invalid.
    #[error(transparent)]
    Pipe(#[from] PipeError),
    /// A state-transfer message's content is invalid.
    #[error("state transfer: {0}")]
    State(#[from] StateError),
    /// A progress report with a NaN or infinite loss.
    #[error("progress loss {loss} is not finite")]
    NonFiniteLoss {
        /// The reported loss.
        loss: f32,
    },
}

impl Progress {
    /// Checks that the report is usable (finite loss).
    pub fn validate(&self) -> Result<(), ContentError> {
        if self.loss.is_finite() {
            Ok(())
        } else {
            Err(ContentError::NonFiniteLoss { loss: self.loss })
        }
    }
}

impl Message {
    /// Checks everything about the message that does not depend on receiver state: payload
    /// sizes, digests and content in every encoding, vector lengths, id lists sorted, unique
    /// and bounded.
    pub fn validate(&self) -> Result<(), ContentError> {
        match self {
            Message::Avg(m) => m.validate(),
            Message::Progress(p) => p.validate(),
            Message::StateRequest | Message::ManifestRequest { .. } => Ok(()),
            Message::StateAnnounce(claim) => match claim {
                Some(c) if c.round == 0 => Err(StateError::RoundZero.into()),
                _ => Ok(()),
            },
            Message::Manifest { manifest, .. } => match manifest {
                Some(m) => Ok(m.validate()?),
                None => Ok(()),
            },
            Message::ChunkRequest { index, .. } => Ok(check_chunk_index(*index)?),
            Message::Chunk { index, data, .. } => {
                check_chunk_index(*index)?;
                match data {
                    Some(d) if d.len() > MAX_CHUNK_BYTES as usize => {
                        Err(StateError::ChunkTooLong {
                            len: d.len(),
                            max: MAX_CHUNK_BYTES,
                        }
                        .into())
                    }
                    _ => Ok(()),
                }
            }
            Message::PipeForward(f) => Ok(f.validate()?),
            Message::PipeBackward(b) => Ok(b.validate()?),
            Message::StageHello(h) => Ok(h.validate()?),
            Message::StageAvg { msg, .. } => msg.validate(),
            Message::StageState(state) => {
                check_vector_len(u64::from(state.params.len))?;
                Ok(state.validate()?)
            }
            Message::StageStateRequest(r) => Ok(r.validate()?),
        }
    }
}

/// Checks a declared vector length against [`MAX_VECTOR_LEN`].
pub(crate) fn check_vector_len(len: u64) -> Result<(), ContentError> {
    if len > MAX_VECTOR_LEN {
        return Err(ContentError::VectorTooLong {
            len,
            max: MAX_VECTOR_LEN,
        });
    }
    Ok(())
}

/// Checks a chunk index against the largest possible manifest.
fn check_chunk_index(index: u32) -> Result<(), StateError> {
    if index as usize >= MAX_CHUNKS {
        return Err(StateError::ChunkIndex {
            index,
            max: MAX_CHUNKS,
        });
    }
    Ok(())
}

/// Checks a part index against the largest possible group.
pub(crate) fn check_part(part: u32) -> Result<(), ContentError> {
    if part as usize >= MAX_GROUP_MEMBERS {
        return Err(ContentError::PartOutOfRange {
            part,
            max: MAX_GROUP_MEMBERS,
        });
    }
    Ok(())
}

/// Checks an id list: non-empty, at most [`MAX_GROUP_MEMBERS`], strictly ascending.
pub(crate) fn check_ids(field: &'static str, ids: &[crate::NodeId]) -> Result<(), ContentError> {
    if ids.is_empty() {
        return Err(ContentError::NoIds { field });
    }
    if ids.len() > MAX_GROUP_MEMBERS {
        return Err(ContentError::TooManyIds {
            field,
            count: ids.len(),
            max: MAX_GROUP_MEMBERS,
        });
    }
    if ids.windows(2).any(|w| w.first() >= w.get(1)) {
        return Err(ContentError::IdsNotSorted { field });
    }
    Ok(())
}

/// Spare capacity [`encode`] leaves after a message, so a transport can append
/// a trailer (a 32-byte MAC) without copying a large message again.
pub const TRAILER_ROOM: usize = 32;

/// Encodes `msg` as version header + postcard body, refusing results over
/// [`MAX_MESSAGE_BYTES`] so we never send what peers would refuse.
///
/// Sizes the message first and writes it once into a buffer of that size
/// (plus [`TRAILER_ROOM`]): a tensor part is tens of megabytes, and growing
/// a buffer by doubling, then copying the body behind the header, cost
/// about 20 ms per 20 MB part.
pub fn encode(msg: &Message) -> Result<Vec<u8>, WireError> {
    let body_len: usize =
        postcard::serialize_with_flavor(msg, postcard::ser_flavors::Size::default())
            .map_err(|e| WireError::Encode(e.to_string()))?;
    let size = body_len.saturating_add(2);
    if size > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge {
            size,
            max: MAX_MESSAGE_BYTES,
        });
    }
    let mut out = Vec::with_capacity(size + TRAILER_ROOM);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    postcard::serialize_with_flavor(msg, SliceCopies(out))
        .map_err(|e| WireError::Encode(e.to_string()))
}

/// A postcard output that appends byte strings with one `memcpy`: postcard's
/// own `to_extend` pushes them byte by byte through `Extend`, which cost a
/// tensor part's frame a loop several times slower than a copy.
struct SliceCopies(Vec<u8>);

impl postcard::ser_flavors::Flavor for SliceCopies {
    type Output = Vec<u8>;

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// [`decode`] of a received frame the message may keep: payload bytes in it stay where they
/// lie in `frame` (shared, see [`Bytes`]) instead of being copied out, one copy fewer of
/// every tensor part a node receives.
pub fn decode_shared(frame: Arc<Vec<u8>>) -> Result<Message, WireError> {
    crate::tensor::with_shared_frame(&frame, || decode(&frame))
}

/// Decodes and validates a message from untrusted bytes. See the module docs for what is
/// refused; never panics.
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let Some((header, body)) = bytes.split_first_chunk::<2>() else {
        return Err(WireError::Malformed(format!(
            "{} bytes is shorter than the 2-byte version header",
            bytes.len()
        )));
    };
    let got = u16::from_le_bytes(*header);
    if got != PROTOCOL_VERSION {
        return Err(WireError::Version { got });
    }
    let (msg, rest) = postcard::take_from_bytes::<Message>(body)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} unexpected bytes after the message",
            rest.len()
        )));
    }
    msg.validate()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::averaging::MAX_JOIN_PROOF_BYTES;
    use crate::rng::Rng;
    use crate::tensor::{Bytes, Encoding, Payload};
    use crate::NodeId;

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn proof() -> Bytes {
        Bytes::from(vec![7; 96])
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Avg(AvgMessage::Join {
                round: 3,
                len: 10,
                proof: proof(),
            }),
            Message::Avg(AvgMessage::Group {
                round: 3,
                len: 10,
                members: vec![id(1), id(2), id(5)],
                proofs: vec![proof(); 3],
                signature: proof(),
            }),
            Message::Avg(AvgMessage::Part {
                round: 3,
                part: 1,
                payload: Payload::from_f32(&[1.0, 2.0, 3.0]),
            }),
            Message::Avg(AvgMessage::Reduced {
                round: 3,
                part: 2,
                contributors: vec![id(1), id(5)],
                payload: Payload::from_f32(&[0.5, -0.25]),
            }),
            Message::Progress(Progress {
                round: 1,
                step: 200,
                loss: 0.7,
                samples: 25_600,
            }),
            Message::StateRequest,
            Message::PipeForward(PipeForward {
                id: 4,
                to_stage: 1,
                train: true,
                tokens: vec![72, 105, 33],
                activations: Payload::from_f32(&[0.5, -0.25]),
            }),
            Message::PipeBackward(PipeBackward {
                id: 4,
                loss: 2.5,
                predicted: 3,
                grad: Payload::from_f32(&[0.125, 1.0]),
            }),
            Message::StageHello(StageHello {
                stage: 1,
                stages: 2,
                phase: crate::pipe::StagePhase::Trained,
                step: 40,
                throughput: 1750,
            }),
            Message::StageState(StageState {
                // The first stage: the one that plans the run's length.
                stage: 0,
                stages: 2,
                round: 8,
                step: 40,
                total_steps: 80,
                params: Payload::encode(&[0.25, -2.0, 3.5], Encoding::F32),
                last: true,
            }),
            Message::StageStateRequest(StageStateRequest {
                stage: 1,
                stages: 3,
            }),
            Message::StageAvg {
                stage: 1,
                msg: AvgMessage::Join {
                    round: 2,
                    len: 5,
                    proof: proof(),
                },
            },
            Message::StateAnnounce(None),
            Message::StateAnnounce(Some(Claim {
                round: 9,
                root: [7; 32],
            })),
            Message::ManifestRequest { root: [3; 32] },
            Message::Manifest {
                root: [3; 32],
                manifest: Some(Manifest::build(9, 200, &[1, 2, 3, 4, 5], 2)),
            },
            Message::Manifest {
                root: [3; 32],
                manifest: None,
            },
            Message::ChunkRequest {
                root: [3; 32],
                index: 2,
            },
            Message::Chunk {
                root: [3; 32],
                index: 2,
                data: Some(Bytes::from(vec![5])),
            },
            compressed(Encoding::F16),
            compressed(Encoding::Bf16),
            compressed(Encoding::Int8 { block: 3 }),
            compressed(Encoding::TopK { k: 3 }),
        ]
    }

    /// A `Part` carrying seven values in `encoding`.
    fn compressed(encoding: Encoding) -> Message {
        Message::Avg(AvgMessage::Part {
            round: 4,
            part: 2,
            payload: Payload::encode(&[1.5, -0.25, 0.0, 1e3, -7.0, 0.125, 3.0], encoding),
        })
    }

    /// A payload with a correct digest over arbitrary bytes.
    fn forged(len: u32, encoding: Encoding, bytes: Vec<u8>) -> Payload {
        Payload {
            len,
            encoding,
            digest: *blake3::hash(&bytes).as_bytes(),
            bytes: Bytes::from(bytes),
        }
    }

    #[test]
    fn every_message_kind_roundtrips() {
        for msg in samples() {
            let bytes = encode(&msg).expect("encode");
            assert_eq!(bytes[..2], PROTOCOL_VERSION.to_le_bytes());
            assert_eq!(decode(&bytes), Ok(msg));
        }
    }

    #[test]
    fn payload_bytes_are_one_blob_on_the_wire() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let msg = Message::Avg(AvgMessage::Part {
            round: 1,
            part: 0,
            payload: Payload::from_f32(&values),
        });
        let bytes = encode(&msg).expect("encode");
        // header 2 + variant tags 2 + round 1 + part 1 + len 2 + encoding 1 + blob len 2
        // + 4000 bytes + digest 32.
        assert_eq!(bytes.len(), 2 + 2 + 1 + 1 + 2 + 1 + 2 + 4000 + 32);
        // Written once into a buffer sized for it, with room for a trailer.
        assert!(bytes.capacity() >= bytes.len() + TRAILER_ROOM);
        assert!(bytes.capacity() <= bytes.len() + TRAILER_ROOM + 16);
    }

    #[test]
    fn compressed_payloads_cost_their_encoded_size_on_the_wire() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.01).collect();
        // header 2 + variant tags 2 + round 1 + part 1 + len 2 + encoding tag 1 (+ parameter)
        // + blob length + body + digest 32.
        for (encoding, param, blob_len, body) in [
            (Encoding::F16, 0, 2, 2000),
            (Encoding::Bf16, 0, 2, 2000),
            (Encoding::Int8 { block: 64 }, 1, 2, 1000 + 16 * 4),
            (Encoding::Int8 { block: 1000 }, 2, 2, 1000 + 4),
            (Encoding::TopK { k: 10 }, 1, 1, 80),
        ] {
            let msg = Message::Avg(AvgMessage::Part {
                round: 1,
                part: 0,
                payload: Payload::encode(&values, encoding),
            });
            let bytes = encode(&msg).expect("encode");
            assert_eq!(
                bytes.len(),
                2 + 2 + 1 + 1 + 2 + 1 + param + blob_len + body + 32,
                "{encoding}"
            );
            assert_eq!(encoding.encoded_bytes(1000), Ok(body as u64));
            assert_eq!(decode(&bytes), Ok(msg));
        }
    }

    #[test]
    fn wrong_version_short_input_and_trailing_bytes_are_refused() {
        let mut bytes = encode(&samples()[0]).expect("encode");
        let other = PROTOCOL_VERSION + 1;
        bytes[..2].copy_from_slice(&other.to_le_bytes());
        assert_eq!(decode(&bytes), Err(WireError::Version { got: other }));
        assert!(matches!(decode(&[]), Err(WireError::Malformed(_))));
        assert!(matches!(decode(&[1]), Err(WireError::Malformed(_))));
        let header = PROTOCOL_VERSION.to_le_bytes();
        assert!(matches!(decode(&header), Err(WireError::Malformed(_))));
        let mut bytes = encode(&samples()[0]).expect("encode");
        bytes.push(0);
        assert!(matches!(decode(&bytes), Err(WireError::Malformed(_))));
    }

    #[test]
    fn too_large_input_is_refused_before_parsing() {
        let bytes = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            decode(&bytes),
            Err(WireError::TooLarge {
                size: MAX_MESSAGE_BYTES + 1,
                max: MAX_MESSAGE_BYTES
            })
        );
    }

    #[test]
    fn a_shared_decode_keeps_large_payloads_in_the_frame_and_checks_them_the_same() {
        let values: Vec<f32> = (0..5000).map(|i| i as f32 * 0.5).collect();
        let part = |values: &[f32]| {
            Message::Avg(AvgMessage::Part {
                round: 3,
                part: 1,
                payload: Payload::from_f32(values),
            })
        };
        let payload_of = |msg: &Message| match msg {
            Message::Avg(AvgMessage::Part { payload, .. }) => payload.clone(),
            other => panic!("not a part: {other:?}"),
        };
        let frame = Arc::new(encode(&part(&values)).unwrap());
        let shared = decode_shared(frame.clone()).unwrap();
        assert_eq!(shared, decode(&frame).unwrap());
        let payload = payload_of(&shared);
        assert!(payload.bytes.is_view_of(&frame), "20 kB payload was copied");
        assert_eq!(payload.decode().unwrap(), values);
        // Writing to the bytes copies them out and leaves the frame as it was.
        let mut changed = payload.clone();
        changed.bytes.make_mut()[0] ^= 1;
        assert!(!changed.bytes.is_view_of(&frame));
        assert_eq!(changed.validate(), Err(TensorError::DigestMismatch));
        assert_eq!(decode(&frame).unwrap(), shared);
        // Nothing else holds the frame once the message and its copies are gone.
        drop((shared, payload));
        assert_eq!(Arc::strong_count(&frame), 1);

        // A small payload is copied: it must not pin a large frame.
        let small = Arc::new(encode(&part(&values[..8])).unwrap());
        assert!(!payload_of(&decode_shared(small.clone()).unwrap())
            .bytes
            .is_view_of(&small));

        // A corrupted payload is refused as by `decode`.
        let mut bad = (*frame).clone();
        let at = bad.len() - 40;
        bad[at] ^= 1;
        assert_eq!(
            decode_shared(Arc::new(bad.clone())),
            Err(WireError::Content(ContentError::Payload(
                TensorError::DigestMismatch
            )))
        );
        assert_eq!(decode_shared(Arc::new(bad.clone())), decode(&bad));
    }

    #[test]
    fn encode_refuses_oversized_messages() {
        let values = vec![0.0f32; MAX_MESSAGE_BYTES / 4];
        let msg = Message::Avg(AvgMessage::Part {
            round: 1,
            part: 0,
            payload: Payload::from_f32(&values),
        });
        assert!(matches!(encode(&msg), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn content_validation_rejects_what_honest_peers_never_send() {
        let mut bad_digest = Payload::from_f32(&[1.0, 2.0]);
        bad_digest.bytes.make_mut()[0] ^= 1;
        let cases: Vec<(Message, ContentError)> = vec![
            (
                Message::Avg(AvgMessage::Part {
                    round: 1,
                    part: 0,
                    payload: bad_digest,
                }),
                ContentError::Payload(TensorError::DigestMismatch),
            ),
            (
                Message::Avg(AvgMessage::Reduced {
                    round: 1,
                    part: 0,
                    contributors: vec![id(1)],
                    payload: Payload::from_f32(&[f32::NAN]),
                }),
                ContentError::Payload(TensorError::NonFinite { index: 0 }),
            ),
            (
                Message::Avg(AvgMessage::Group {
                    round: 1,
                    len: 4,
                    members: vec![id(1), id(1)],
                    proofs: vec![proof(); 2],
                    signature: proof(),
                }),
                ContentError::IdsNotSorted { field: "members" },
            ),
            (
                Message::Avg(AvgMessage::Group {
                    round: 1,
                    len: 4,
                    members: vec![id(2), id(1)],
                    proofs: vec![proof(); 2],
                    signature: proof(),
                }),
                ContentError::IdsNotSorted { field: "members" },
            ),
            (
                Message::Avg(AvgMessage::Group {
                    round: 1,
                    len: 4,
                    members: vec![],
                    proofs: vec![],
                    signature: proof(),
                }),
                ContentError::NoIds { field: "members" },
            ),
            (
                Message::Avg(AvgMessage::Group {
                    round: 1,
                    len: 4,
                    members: vec![id(1), id(2)],
                    proofs: vec![proof()],
                    signature: proof(),
                }),
                ContentError::ProofCount {
                    members: 2,
                    proofs: 1,
                },
            ),
            (
                Message::Avg(AvgMessage::Group {
                    round: 1,
                    len: 4,
                    members: vec![id(1)],
                    proofs: vec![Bytes::from(vec![0; MAX_JOIN_PROOF_BYTES + 1])],
                    signature: proof(),
                }),
                ContentError::ProofTooLong {
                    len: MAX_JOIN_PROOF_BYTES + 1,
                    max: MAX_JOIN_PROOF_BYTES,
                },
            ),
            (
                Message::Avg(AvgMessage::Join {
                    round: 1,
                    len: 4,
                    proof: Bytes::from(vec![0; MAX_JOIN_PROOF_BYTES + 1]),
                }),
                ContentError::ProofTooLong {
                    len: MAX_JOIN_PROOF_BYTES + 1,
                    max: MAX_JOIN_PROOF_BYTES,
                },
            ),
            (
                Message::Avg(AvgMessage::Reduced {
                    round: 1,
                    part: 0,
                    contributors: (0..=MAX_GROUP_MEMBERS as u32)
                        .map(|i| {
                            let mut b = [0u8; 32];
                            b[..4].copy_from_slice(&i.to_be_bytes());
                            NodeId(b)
                        })
                        .collect(),
                    payload: Payload::from_f32(&[]),
                }),
                ContentError::TooManyIds {
                    field: "contributors",
                    count: MAX_GROUP_MEMBERS + 1,
                    max: MAX_GROUP_MEMBERS,
                },
            ),
            (
                Message::Avg(AvgMessage::Part {
                    round: 1,
                    part: MAX_GROUP_MEMBERS as u32,
                    payload: Payload::from_f32(&[]),
                }),
                ContentError::PartOutOfRange {
                    part: MAX_GROUP_MEMBERS as u32,
                    max: MAX_GROUP_MEMBERS,
                },
            ),
            (
                Message::Avg(AvgMessage::Join {
                    round: 1,
                    len: MAX_VECTOR_LEN + 1,
                    proof: proof(),
                }),
                ContentError::VectorTooLong {
                    len: MAX_VECTOR_LEN + 1,
                    max: MAX_VECTOR_LEN,
                },
            ),
            (
                Message::StateAnnounce(Some(Claim {
                    round: 0,
                    root: [1; 32],
                })),
                ContentError::State(StateError::RoundZero),
            ),
            (
                Message::Manifest {
                    root: [1; 32],
                    manifest: Some({
                        let mut m = Manifest::build(1, 1, &[1, 2, 3], 1024);
                        m.chunks.push([0; 32]);
                        m
                    }),
                },
                ContentError::State(StateError::ChunkCount {
                    listed: 2,
                    total_bytes: 3,
                    chunk_bytes: 1024,
                }),
            ),
            (
                Message::ChunkRequest {
                    root: [1; 32],
                    index: MAX_CHUNKS as u32,
                },
                ContentError::State(StateError::ChunkIndex {
                    index: MAX_CHUNKS as u32,
                    max: MAX_CHUNKS,
                }),
            ),
            (
                Message::Chunk {
                    root: [1; 32],
                    index: 0,
                    data: Some(Bytes::from(vec![0; MAX_CHUNK_BYTES as usize + 1])),
                },
                ContentError::State(StateError::ChunkTooLong {
                    len: MAX_CHUNK_BYTES as usize + 1,
                    max: MAX_CHUNK_BYTES,
                }),
            ),
            (
                Message::Progress(Progress {
                    round: 1,
                    step: 1,
                    loss: f32::INFINITY,
                    samples: 1,
                }),
                ContentError::NonFiniteLoss {
                    loss: f32::INFINITY,
                },
            ),
            (
                part_with(forged(2, Encoding::F16, vec![0, 0x3c, 0, 0x7c])),
                ContentError::Payload(TensorError::NonFinite { index: 1 }),
            ),
            (
                part_with(forged(3, Encoding::Bf16, vec![0; 4])),
                ContentError::Payload(TensorError::LengthMismatch {
                    expected: 6,
                    got: 4,
                }),
            ),
            (
                part_with(forged(1, Encoding::Int8 { block: 0 }, vec![0; 5])),
                ContentError::Payload(TensorError::BadBlock { block: 0 }),
            ),
            (
                part_with(forged(
                    1,
                    Encoding::Int8 { block: 1 },
                    [f32::NAN.to_le_bytes().as_slice(), &[1]].concat(),
                )),
                ContentError::Payload(TensorError::BadScale {
                    block: 0,
                    scale_bits: f32::NAN.to_bits(),
                }),
            ),
            (
                part_with(forged(
                    4,
                    Encoding::TopK { k: 2 },
                    [
                        2u32.to_le_bytes(),
                        1f32.to_le_bytes(),
                        1u32.to_le_bytes(),
                        1f32.to_le_bytes(),
                    ]
                    .concat(),
                )),
                ContentError::Payload(TensorError::IndicesNotAscending { entry: 1, index: 1 }),
            ),
            (
                part_with(forged(4, Encoding::TopK { k: 5 }, vec![0; 40])),
                ContentError::Payload(TensorError::TooManyEntries { k: 5, len: 4 }),
            ),
        ];
        for (msg, want) in cases {
            let bytes = encode(&msg).expect("encode does not validate content");
            assert_eq!(decode(&bytes), Err(WireError::Content(want)), "{msg:?}");
        }
    }

    fn part_with(payload: Payload) -> Message {
        Message::Avg(AvgMessage::Part {
            round: 1,
            part: 0,
            payload,
        })
    }

    /// Decoding must never panic, whatever the bytes; and whatever it accepts must be valid
    /// and re-encode to a message that decodes to the same value.
    fn decode_survives(bytes: &[u8]) -> bool {
        match decode(bytes) {
            Ok(msg) => {
                assert_eq!(msg.validate(), Ok(()));
                let again = encode(&msg).expect("re-encode an accepted message");
                assert_eq!(decode(&again), Ok(msg));
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn decode_never_panics_on_random_truncated_or_bit_flipped_input() {
        let mut rng = Rng::new(0xdec0de);
        let valid: Vec<Vec<u8>> = samples()
            .iter()
            .map(|m| encode(m).expect("encode"))
            .collect();
        let mut cases = 0u32;
        let mut accepted = 0u32;
        // Pure noise, with and without a correct version header.
        for _ in 0..4000 {
            let len = rng.range(0..200) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if rng.chance(0.7) && bytes.len() >= 2 {
                bytes[..2].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            }
            accepted += u32::from(decode_survives(&bytes));
            cases += 1;
        }
        // Every truncation of every valid message: all must be refused.
        for bytes in &valid {
            for cut in 0..bytes.len() {
                assert!(!decode_survives(&bytes[..cut]), "accepted a truncation");
                cases += 1;
            }
        }
        // Random bit flips and byte overwrites of valid messages.
        for _ in 0..6000 {
            let mut bytes = valid[rng.range(0..valid.len() as u64) as usize].clone();
            let flips = rng.range(1..4);
            for _ in 0..flips {
                let at = rng.range(0..bytes.len() as u64) as usize;
                if rng.chance(0.5) {
                    bytes[at] ^= 1 << rng.range(0..8);
                } else {
                    bytes[at] = rng.next_u64() as u8;
                }
            }
            accepted += u32::from(decode_survives(&bytes));
            cases += 1;
        }
        assert!(cases > 10_000);
        // Flips in ids, rounds or the loss can still produce valid messages; most must not be.
        assert!(accepted < cases / 2, "accepted {accepted} of {cases}");
    }

    #[test]
    fn a_flip_inside_payload_bytes_is_always_caught() {
        for encoding in [
            Encoding::F32,
            Encoding::F16,
            Encoding::Bf16,
            Encoding::Int8 { block: 2 },
            Encoding::TopK { k: 2 },
        ] {
            let payload = Payload::encode(&[1.0, 2.0, 3.0, 4.0], encoding);
            let body = payload.bytes.len();
            let msg = Message::Avg(AvgMessage::Part {
                round: 9,
                part: 0,
                payload,
            });
            let bytes = encode(&msg).expect("encode");
            // Payload bytes sit right before the 32-byte digest at the end.
            let start = bytes.len() - 32 - body;
            for at in start..bytes.len() {
                for bit in 0..8 {
                    let mut b = bytes.clone();
                    b[at] ^= 1 << bit;
                    assert!(
                        decode(&b).is_err(),
                        "{encoding}: flip at byte {at} bit {bit} accepted"
                    );
                }
            }
        }
    }

    /// Random encodings and bodies with correct digests: the fuzz above rarely gets past the
    /// digest, this one always does, so the codecs' content checks face the noise.
    #[test]
    fn decode_survives_random_compressed_payloads_with_valid_digests() {
        let mut rng = Rng::new(0xc0de);
        let mut accepted = 0u32;
        let cases = 5_000u32;
        for _ in 0..cases {
            let len = rng.range(0..40) as u32;
            let encoding = match rng.range(0..5) {
                0 => Encoding::F32,
                1 => Encoding::F16,
                2 => Encoding::Bf16,
                3 => Encoding::Int8 {
                    block: rng.range(0..8) as u32,
                },
                _ => Encoding::TopK {
                    k: rng.range(0..u64::from(len) + 2) as u32,
                },
            };
            let n = match encoding.encoded_bytes(len) {
                Ok(n) if rng.chance(0.9) => n as usize,
                _ => rng.range(0..200) as usize,
            };
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            let msg = part_with(forged(len, encoding, bytes));
            let wire = encode(&msg).expect("encode does not validate content");
            accepted += u32::from(decode_survives(&wire));
        }
        // Random f16/bf16/int8 bodies are mostly valid; random top-k indices almost never.
        assert!(
            accepted > cases / 10 && accepted < cases,
            "accepted {accepted}"
        );
    }
}
