//! Encoding of outgoing averaging messages, once per message however many
//! peers it goes to.

use p2ptrain_protocol::wire::{self, Message, WireError};
use std::sync::Arc;

/// Remembers the last message encoded and its frame: a reduced part goes to
/// every other member of the group in a row, and its frame (megabytes) is
/// encoded once and shared by all those sends.
#[derive(Default)]
pub(super) struct FrameOnce {
    last: Option<(Message, Arc<Vec<u8>>)>,
}

impl FrameOnce {
    /// The frame of `msg`: the last one's when `msg` equals the last message
    /// (a payload shared between clones compares without reading its bytes).
    pub(super) fn encode(&mut self, msg: Message) -> Result<Arc<Vec<u8>>, WireError> {
        let frame = match self.last.take() {
            Some((last, frame)) if last == msg => frame,
            _ => Arc::new(wire::encode(&msg)?),
        };
        self.last = Some((msg, frame.clone()));
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
    use p2ptrain_protocol::averaging::AvgMessage;
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
        // Another part, or the same values in a buffer of their own, is encoded anew.
        let other = frames.encode(reduced(2, &payload)).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(wire::decode(&other).unwrap(), reduced(2, &payload));
        let copy = Payload::from_f32(&values);
        let same_bytes = frames.encode(reduced(2, &copy)).unwrap();
        assert_eq!(same_bytes, other);
        // Forgotten: the caller's frame is its alone.
        frames.forget();
        let mut alone = frames.encode(reduced(2, &copy)).unwrap();
        frames.forget();
        assert!(Arc::get_mut(&mut alone).is_some());
    }
}
