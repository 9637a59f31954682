//! [`Bytes`]: a payload's encoded bytes, shared instead of copied.
//!
//! A tensor part is megabytes. A sender keeps one copy for every recipient
//! and retry (clones share it), and a receiver decoding a frame with
//! [`crate::wire::decode_shared`] keeps the payload where it lies in the
//! frame instead of copying it out.

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::RefCell;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use super::Encoding;

/// Byte strings shorter than this are copied out of a shared frame: the copy
/// is cheap. (Nor does one share less than half its frame: a small value kept
/// for long should not pin a large frame.)
const SHARE_FROM_BYTES: usize = 4096;

/// Raw bytes that serialize as one length-prefixed blob (`serialize_bytes`), not element by
/// element, so large tensors encode and decode with a single copy, or none (see the module
/// docs). Shared: a clone (a message kept for re-sending, one reduced part sent to every
/// member) copies nothing. Their blake3 hash is computed once and remembered, and so is a
/// passed content check, so a receiver that validates a message and then decodes it hashes
/// and checks its bytes once.
#[derive(Clone, Default)]
pub struct Bytes {
    data: Arc<Vec<u8>>,
    /// Where the bytes lie in `data` when they are a payload inside a received frame;
    /// `None`: all of `data`.
    range: Option<Range<usize>>,
    hash: OnceLock<[u8; 32]>,
    /// The value count and encoding these bytes passed the content checks for.
    checked_as: OnceLock<(u32, Encoding)>,
}

impl Bytes {
    /// The bytes, writable (copied first if a clone or the rest of a frame shares them);
    /// forgets the hash and any passed content check.
    pub fn make_mut(&mut self) -> &mut Vec<u8> {
        self.hash = OnceLock::new();
        self.checked_as = OnceLock::new();
        if let Some(range) = self.range.take() {
            self.data = Arc::new(self.data[range].to_vec());
        }
        Arc::make_mut(&mut self.data)
    }

    /// blake3 of the bytes, computed on first use.
    pub fn blake3(&self) -> [u8; 32] {
        *self.hash.get_or_init(|| *blake3::hash(self).as_bytes())
    }

    /// Remembers that the bytes passed the content checks as `len` values in `encoding`.
    pub(super) fn mark_checked(&self, len: u32, encoding: Encoding) {
        // A second, different verdict is not kept: the first still holds for its own key.
        let _ = self.checked_as.set((len, encoding));
    }

    /// Whether the bytes passed the content checks as `len` values in `encoding`.
    pub(super) fn checked_as(&self, len: u32, encoding: Encoding) -> bool {
        self.checked_as.get() == Some(&(len, encoding))
    }

    /// Whether these bytes are a view into `frame` rather than a buffer of their own, so
    /// callers can check that decoding did not copy them.
    pub fn is_view_of(&self, frame: &Arc<Vec<u8>>) -> bool {
        Arc::ptr_eq(&self.data, frame) && self.range.is_some()
    }

    /// `slice` as bytes sharing `frame`, if it lies inside it.
    fn view(frame: &Arc<Vec<u8>>, slice: &[u8]) -> Option<Bytes> {
        let base = frame.as_ptr() as usize;
        let start = (slice.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(slice.len())?;
        (end <= frame.len()).then(|| Bytes {
            data: frame.clone(),
            range: Some(start..end),
            hash: OnceLock::new(),
            checked_as: OnceLock::new(),
        })
    }
}

thread_local! {
    /// The frame [`with_shared_frame`] is decoding on this thread.
    static SHARED_FRAME: RefCell<Option<Arc<Vec<u8>>>> = const { RefCell::new(None) };
}

/// Runs `decode`, during which [`Bytes`] deserialized on this thread from byte strings that
/// lie inside `frame` share it instead of copying (serde's visitor has no other way to learn
/// which buffer a borrowed slice belongs to).
pub(crate) fn with_shared_frame<R>(frame: &Arc<Vec<u8>>, decode: impl FnOnce() -> R) -> R {
    /// Puts back the previous frame however `decode` ends.
    struct Restore(Option<Arc<Vec<u8>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            let _ = SHARED_FRAME.try_with(|f| *f.borrow_mut() = previous);
        }
    }
    // `try_with`: during thread teardown there is no slot, and bytes are copied.
    let previous = SHARED_FRAME.try_with(|f| f.replace(Some(frame.clone())));
    let _restore = previous.ok().map(Restore);
    decode()
}

impl PartialEq for Bytes {
    /// Clones sharing one buffer are equal without comparing their bytes.
    fn eq(&self, other: &Self) -> bool {
        (Arc::ptr_eq(&self.data, &other.data) && self.range == other.range) || **self == **other
    }
}

impl Eq for Bytes {}

impl From<Vec<u8>> for Bytes {
    fn from(bytes: Vec<u8>) -> Self {
        Bytes {
            data: Arc::new(bytes),
            range: None,
            hash: OnceLock::new(),
            checked_as: OnceLock::new(),
        }
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.range {
            Some(range) => &self.data[range.clone()],
            None => &self.data,
        }
    }
}

impl fmt::Debug for Bytes {
    /// Prints only the length: a tensor's bytes in a log line help nobody.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // `deserialize_bytes`: postcard then lends the bytes in place (`visit_borrowed_bytes`),
        // which a shared frame can keep without a copy. (A format whose `deserialize_bytes`
        // limits lengths, such as ciborium's 4 KiB scratch buffer, would need
        // `deserialize_byte_buf` here; only postcard and serde_json read `Bytes` today.)
        deserializer.deserialize_bytes(BytesVisitor)
    }
}

/// Accepts a byte string (binary formats) or a sequence of integers (self-describing formats
/// such as JSON) as [`Bytes`].
struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
        let shared = (v.len() >= SHARE_FROM_BYTES)
            .then(|| {
                SHARED_FRAME
                    .try_with(|f| {
                        f.borrow()
                            .as_ref()
                            .filter(|f| v.len() >= f.len() / 2)
                            .and_then(|f| Bytes::view(f, v))
                    })
                    .ok()
                    .flatten()
            })
            .flatten();
        Ok(shared.unwrap_or_else(|| Bytes::from(v.to_vec())))
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::from(v.to_vec()))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        // Never trust a claimed length for pre-allocation.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(byte) = seq.next_element::<u8>()? {
            out.push(byte);
        }
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_byte_strings_large_against_their_frame_share_it() {
        // A 5000-byte string next to a 20000-byte one: the small one is under half
        // the frame and is copied; the large one is shared; a short one is copied.
        let small = Bytes::from(vec![1u8; 5000]);
        let large = Bytes::from(vec![2u8; 20_000]);
        let tiny = Bytes::from(vec![3u8; 100]);
        let frame = Arc::new(postcard::to_allocvec(&(&small, &large, &tiny)).unwrap());
        let (s, l, t): (Bytes, Bytes, Bytes) =
            with_shared_frame(&frame, || postcard::from_bytes(&frame).unwrap());
        assert_eq!((&s, &l, &t), (&small, &large, &tiny));
        assert!(!s.is_view_of(&frame));
        assert!(l.is_view_of(&frame));
        assert!(!t.is_view_of(&frame));
        // Outside `with_shared_frame` nothing is shared.
        let (_, l2, _): (Bytes, Bytes, Bytes) = postcard::from_bytes(&frame).unwrap();
        assert!(!l2.is_view_of(&frame));
    }
}
