//! Property-based fuzzing of the wire codec (proptest), the fuzz target kept in the repo.
//!
//! The hand-rolled fuzz tests in `wire.rs` start from a few fixed messages; these generate
//! every message kind with arbitrary fields (valid or not) and then damage their encodings, so
//! `decode` — the single gate for untrusted bytes — faces structured garbage as well as noise.
//! Run more cases with `PROPTEST_CASES=100000 cargo test -p p2ptrain-protocol --test wire_props`.

use p2ptrain_protocol::averaging::{AvgMessage, MAX_JOIN_PROOF_BYTES};
use p2ptrain_protocol::pipe::{
    PipeBackward, PipeForward, StageHello, StagePhase, StageState, StageStateRequest,
};
use p2ptrain_protocol::statesync::{Claim, Manifest};
use p2ptrain_protocol::tensor::{Bytes, Encoding, Payload};
use p2ptrain_protocol::wire::{decode, encode, Message, Progress, WireError, PROTOCOL_VERSION};
use p2ptrain_protocol::NodeId;
use proptest::prelude::*;

/// Floats including the values peers must refuse (NaN, infinities) and extremes codecs clip.
fn any_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        200 => -1e3f32..1e3,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::MAX),
        1 => Just(-0.0f32),
    ]
}

fn any_encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        Just(Encoding::F32),
        Just(Encoding::F16),
        Just(Encoding::Bf16),
        (0u32..130).prop_map(|block| Encoding::Int8 { block }),
        (0u32..20).prop_map(|k| Encoding::TopK { k }),
    ]
}

/// Payloads as an honest encoder makes them (NaN included: encoders do not validate).
fn honest_payload() -> impl Strategy<Value = Payload> {
    (prop::collection::vec(any_value(), 0..48), any_encoding())
        .prop_map(|(values, encoding)| Payload::encode(&values, encoding))
}

/// Payloads as honest encoders make them, plus forged ones whose length, body or digest lie.
fn any_payload() -> impl Strategy<Value = Payload> {
    let honest = honest_payload();
    let forged =
        (honest_payload(), 0u8..4, any::<u32>(), any::<u8>()).prop_map(|(mut p, how, n, byte)| {
            match how {
                0 => p.len = n % 4096,
                1 => p.bytes.make_mut().push(byte),
                2 => {
                    if let Some(b) = p.bytes.make_mut().first_mut() {
                        *b ^= byte | 1;
                    }
                }
                _ => p.encoding = Encoding::TopK { k: n % 64 },
            }
            p
        });
    prop_oneof![4 => honest, 1 => forged]
}

fn any_ids() -> impl Strategy<Value = Vec<NodeId>> {
    let sorted = prop::collection::btree_set(any::<[u8; 32]>(), 1..6)
        .prop_map(|s| s.into_iter().map(NodeId).collect::<Vec<_>>());
    let raw = prop::collection::vec(any::<[u8; 32]>().prop_map(NodeId), 0..6);
    prop_oneof![4 => sorted, 1 => raw]
}

/// 1: one proof per member; 0 and 2: one too few or one too many.
fn proof_count_skew() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(1usize), 1 => Just(0usize), 1 => Just(2usize)]
}

/// Join proofs up to a little past the longest allowed.
fn any_proof() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..MAX_JOIN_PROOF_BYTES + 8).prop_map(Bytes::from)
}

fn any_avg() -> impl Strategy<Value = AvgMessage> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any_proof())
            .prop_map(|(round, len, proof)| { AvgMessage::Join { round, len, proof } }),
        (
            any::<u64>(),
            0u64..1 << 40,
            any_ids(),
            any_proof(),
            proof_count_skew(),
            any_proof()
        )
            .prop_map(|(round, len, members, proof, skew, signature)| {
                // Mostly one proof per member; sometimes one too few or too many.
                let count = (members.len() + skew).saturating_sub(1);
                AvgMessage::Group {
                    round,
                    len,
                    members,
                    proofs: vec![proof; count],
                    signature,
                }
            }),
        (any::<u64>(), 0u32..300, any_payload()).prop_map(|(round, part, payload)| {
            AvgMessage::Part {
                round,
                part,
                payload,
            }
        }),
        (any::<u64>(), 0u32..300, any_ids(), any_payload()).prop_map(
            |(round, part, contributors, payload)| AvgMessage::Reduced {
                round,
                part,
                contributors,
                payload,
            }
        ),
    ]
}

fn any_phase() -> impl Strategy<Value = StagePhase> {
    prop_oneof![
        Just(StagePhase::Training),
        Just(StagePhase::Trained),
        Just(StagePhase::Done)
    ]
}

/// Manifests, mostly consistent, sometimes with a chunk count or sizes no honest peer sends.
fn any_manifest() -> impl Strategy<Value = Option<Manifest>> {
    prop::option::of(
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..5000),
            // Mostly a valid size (a power of two: 1 or 2 KiB), sometimes any other.
            prop_oneof![
                3 => prop_oneof![Just(1024u32), Just(2048u32)],
                1 => prop_oneof![0u32..4096, Just(u32::MAX)],
            ],
            prop::collection::vec(any::<[u8; 32]>(), 0..4),
        )
            .prop_map(|(round, total_steps, bytes, chunk_bytes, extra)| {
                let mut manifest = Manifest::build(round, total_steps, &bytes, chunk_bytes);
                manifest.chunk_bytes = chunk_bytes;
                manifest.chunks.extend(extra);
                manifest
            }),
    )
}

fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        any_avg().prop_map(Message::Avg),
        (any::<u64>(), any::<u64>(), any_value(), any::<u64>()).prop_map(
            |(round, step, loss, samples)| Message::Progress(Progress {
                round,
                step,
                loss,
                samples,
            })
        ),
        Just(Message::StateRequest),
        (any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(round, root)| Message::StateAnnounce(Some(Claim { round, root }))),
        Just(Message::StateAnnounce(None)),
        any::<[u8; 32]>().prop_map(|root| Message::ManifestRequest { root }),
        (any::<[u8; 32]>(), any_manifest())
            .prop_map(|(root, manifest)| Message::Manifest { root, manifest }),
        (any::<[u8; 32]>(), any::<u32>())
            .prop_map(|(root, index)| Message::ChunkRequest { root, index }),
        (
            any::<[u8; 32]>(),
            0u32..5000,
            prop::option::of(prop::collection::vec(any::<u8>(), 0..600))
        )
            .prop_map(|(root, index, data)| Message::Chunk {
                root,
                index,
                data: data.map(Bytes::from),
            }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            prop::collection::vec(0u32..300, 0..40),
            any_payload()
        )
            .prop_map(|(id, to_stage, train, tokens, activations)| {
                Message::PipeForward(PipeForward {
                    id,
                    to_stage,
                    train,
                    tokens,
                    activations,
                })
            }),
        (any::<u64>(), any_value(), any::<u32>(), any_payload()).prop_map(
            |(id, loss, predicted, grad)| Message::PipeBackward(PipeBackward {
                id,
                loss,
                predicted,
                grad,
            })
        ),
        (
            0u32..300,
            0u32..300,
            any_phase(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(
                |(stage, stages, phase, step, throughput)| Message::StageHello(StageHello {
                    stage,
                    stages,
                    phase,
                    step,
                    throughput,
                })
            ),
        (
            0u32..300,
            0u32..300,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any_payload(),
            any::<bool>()
        )
            .prop_map(|(stage, stages, round, step, total_steps, params, last)| {
                Message::StageState(StageState {
                    stage,
                    stages,
                    round,
                    step,
                    total_steps,
                    params,
                    last,
                })
            }),
        (0u32..300, 0u32..300).prop_map(|(stage, stages)| Message::StageStateRequest(
            StageStateRequest { stage, stages }
        )),
        (any::<u32>(), any_avg()).prop_map(|(stage, msg)| Message::StageAvg { stage, msg }),
    ]
}

/// Damage done to an encoded message on its way in.
#[derive(Clone, Debug)]
enum Damage {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Truncate { at: usize },
    Insert { at: usize, byte: u8 },
    Remove { at: usize },
}

fn any_damage() -> impl Strategy<Value = Vec<Damage>> {
    let one = prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Damage::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Damage::Set { at, byte }),
        any::<usize>().prop_map(|at| Damage::Truncate { at }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Damage::Insert { at, byte }),
        any::<usize>().prop_map(|at| Damage::Remove { at }),
    ];
    prop::collection::vec(one, 1..4)
}

fn apply(bytes: &mut Vec<u8>, damage: &[Damage]) {
    for d in damage {
        let n = bytes.len().max(1);
        match *d {
            Damage::Flip { at, bit } => {
                if let Some(b) = bytes.get_mut(at % n) {
                    *b ^= 1 << bit;
                }
            }
            Damage::Set { at, byte } => {
                if let Some(b) = bytes.get_mut(at % n) {
                    *b = byte;
                }
            }
            Damage::Truncate { at } => bytes.truncate(at % n),
            Damage::Insert { at, byte } => bytes.insert(at % (bytes.len() + 1), byte),
            Damage::Remove { at } => {
                if !bytes.is_empty() {
                    bytes.remove(at % n);
                }
            }
        }
    }
}

/// What any accepted message must satisfy: it is valid and survives a second trip unchanged.
fn check_accepted(msg: &Message) {
    assert_eq!(msg.validate(), Ok(()), "decode accepted an invalid message");
    let again = encode(msg).expect("an accepted message re-encodes");
    assert_eq!(decode(&again).as_ref(), Ok(msg));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 10_000,
        // Failures print their minimal input; no regression files beside the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Whatever a peer encodes, the receiver gets exactly it back when it is valid, and
    /// exactly the validation error when it is not (encode does not validate).
    #[test]
    fn decode_is_encode_inverse_or_names_the_invalid_content(msg in any_message()) {
        let bytes = encode(&msg).expect("small messages encode");
        match msg.validate() {
            Ok(()) => prop_assert_eq!(decode(&bytes), Ok(msg)),
            // Compared as text: errors may quote a NaN, which equals nothing.
            Err(e) => prop_assert_eq!(
                format!("{:?}", decode(&bytes)),
                format!("{:?}", Err::<Message, _>(WireError::Content(e)))
            ),
        }
    }

    /// Damaged encodings of any message never panic the decoder, and what it still accepts
    /// is valid and stable.
    #[test]
    fn damaged_messages_are_refused_or_valid(msg in any_message(), damage in any_damage()) {
        let mut bytes = encode(&msg).expect("small messages encode");
        apply(&mut bytes, &damage);
        if let Ok(got) = decode(&bytes) {
            check_accepted(&got);
        }
    }

    /// Noise behind a correct version header reaches the body parser and must never panic it.
    #[test]
    fn noise_after_a_valid_header_never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = PROTOCOL_VERSION.to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        if let Ok(got) = decode(&bytes) {
            check_accepted(&got);
        }
    }
}

/// The generators must mostly make valid messages, or the round-trip property above would
/// only ever test refusals.
#[test]
fn generated_messages_are_mostly_valid() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = any_message();
    let total = 2000;
    let valid = (0..total)
        .filter(|_| {
            let msg = strategy
                .new_tree(&mut runner)
                .expect("generate a message")
                .current();
            msg.validate().is_ok()
        })
        .count();
    assert!(
        valid * 10 > total * 4 && valid < total,
        "{valid} of {total} generated messages are valid"
    );
}
