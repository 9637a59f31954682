//! Encoding of outgoing averaging messages, once per message however many
//! peers it goes to.

use p2ptrain_protocol::averaging::AvgMessage;
use p2ptrain_protocol::wire::{self, Message, WireError};
use std::sync::Arc;

/// Remembers the last reduced part encoded and its frame: a reduced part goes
/// to every other member of the group in a row, and its frame (megabytes) is
/// encoded once and shared by all those sends. Other messages go to one peer
/// and are not kept (a frame held here too would look shared to the network,
/// which then seals a copy of it instead of sealing it in place).
#[derive(Default)]
pub(super) struct FrameOnce {
    last: Option<(Message, Arc<Vec<u8>>)>,
}

impl FrameOnce {
    /// The frame of `msg`: the last one's when `msg` equals the last reduced
    /// part (a payload shared between clones compares without reading its bytes).
    pub(super) fn encode(&mut self, msg: Message) -> Result<Arc<Vec<u8>>, WireError> {
        let frame = match self.last.take() {
            Some((last, frame)) if last == msg => frame,
            _ => Arc::new(wire::encode(&msg)?),
        };
        let reduced = matches!(
            msg,
            Message::Avg(AvgMessage::Reduced { .. })
                | Message::StageAvg {
                    msg: AvgMessage::Reduced { .. },
                    ..
                }
        );
        if reduced {
            self.last = Some((msg, frame.clone()));
        }
        Ok(frame)
    }

    /// Drops the remembered frame, so the caller holds the only reference to
    /// the one it has (and can take it without a copy).
    pub(super) fn forget(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2ptrain_protocol::tensor::Payload;
    use p2ptrain_protocol::NodeId;

    fn reduced(part: u32, payload: &Payload) -> Message {
        let mut contributors = vec![NodeId::from_key_bytes(b"a"), NodeId::from_key_bytes(b"b")];
        contributors.sort();
        Message::Avg(AvgMessage::Reduced {
            round: 3,
            part,
            contributors,
            payload: payload.clone(),
        })
    }

    #[test]
    fn one_message_for_several_peers_is_encoded_once() {
        let values: Vec<f32> = (0..50_000).map(|i| i as f32 * 0.25).collect();
        let payload = Payload::from_f32(&values);
        let mut frames = FrameOnce::default();
        let first = frames.encode(reduced(1, &payload)).unwrap();
        let again = frames.encode(reduced(1, &payload)).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(wire::decode(&first).unwrap(), reduced(1, &payload));
        // Another part is encoded anew; the same part with its values in a
        // buffer of their own is the same message (compared byte by byte).
        let other = frames.encode(reduced(2, &payload)).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(wire::decode(&other).unwrap(), reduced(2, &payload));
        let copy = Payload::from_f32(&values);
        let same_bytes = frames.encode(reduced(2, &copy)).unwrap();
        assert!(Arc::ptr_eq(&same_bytes, &other));
        // Forgotten: the caller's frame is its alone.
        frames.forget();
        let mut alone = frames.encode(reduced(2, &copy)).unwrap();
        frames.forget();
        assert!(Arc::get_mut(&mut alone).is_some());
        // A part for one reducer is not kept: its frame is the caller's alone.
        let part = Message::Avg(AvgMessage::Part {
            round: 3,
            part: 1,
            payload: payload.clone(),
        });
        let mut lone = frames.encode(part.clone()).unwrap();
        assert!(Arc::get_mut(&mut lone).is_some());
        assert!(!Arc::ptr_eq(&lone, &frames.encode(part).unwrap()));
    }
}
