//! Length-prefixed frames for direct peer-to-peer messages.
//!
//! request-response's stock codecs cap requests at 1 MiB; model parameter
//! parts are far larger, so we frame raw bytes ourselves with an explicit
//! limit taken from the wire format, and reject anything longer before
//! allocating for it.

use super::inbound_budget::{BudgetExhausted, Held, InboundBudget};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use p2ptrain_protocol::averaging::DEFAULT_PART_VALUES;
use p2ptrain_protocol::wire::MAX_MESSAGE_BYTES;
use std::io;
use std::sync::Arc;

/// Largest frame: a maximal message plus the swarm-secret MAC.
const MAX_FRAME_BYTES: usize = MAX_MESSAGE_BYTES + super::secret::MAC_LEN;

/// The protocol name negotiated for direct messages.
pub const DIRECT_PROTOCOL: StreamProtocol = StreamProtocol::new("/p2ptrain/direct/1");

/// Encoded protocol messages travel as opaque, size-limited byte frames;
/// inbound ones hold their bytes of the node's [`InboundBudget`].
#[derive(Debug, Clone, Default)]
pub struct FrameCodec {
    budget: InboundBudget,
}

impl FrameCodec {
    /// A codec whose inbound frames take their bytes from `budget`.
    pub fn new(budget: InboundBudget) -> Self {
        FrameCodec { budget }
    }
}

/// A direct message's bytes: shared, so the sender can keep them for a retry
/// without copying, and, received, holding their share of the inbound budget
/// until the driver has taken them.
#[derive(Debug)]
pub struct DirectFrame {
    /// The frame's bytes.
    pub bytes: Arc<Vec<u8>>,
    /// The budget they hold, for a received frame.
    pub held: Option<Held>,
}

impl DirectFrame {
    /// A frame to send.
    pub fn outbound(bytes: Arc<Vec<u8>>) -> Self {
        DirectFrame { bytes, held: None }
    }
}

/// Reads one frame of at most `limit` bytes, its memory held in `held` as it
/// grows.
async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
    held: &mut Held,
) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {limit} bytes"),
        ));
    }
    let over_budget = |e: BudgetExhausted| io::Error::other(e.to_string());
    // Memory and the budget follow the bytes that arrive, not the length
    // claimed: the buffer's capacity is reserved (a default-sized part at
    // once, so it arrives without reallocating; beyond that doubling what
    // was received), but its bytes are zeroed, counted and read a step at
    // a time. A peer (not yet known to be a member) that announces 256 MiB
    // and sends nothing more holds one step of the budget, not a part's
    // worth: streams that send only lengths cannot crowd out real messages.
    let mut buf = Vec::with_capacity(len.min(FIRST_READ_BYTES));
    while buf.len() < len {
        let have = buf.len();
        if have == buf.capacity() {
            // Exactly: the buffer is kept as long as the message, and
            // doubling capacity would hold up to twice its length.
            buf.reserve_exact(len.min(have * 2) - have);
        }
        let step = (buf.capacity() - have).min(CLAIM_STEP).min(len - have);
        held.grow(step).map_err(over_budget)?;
        buf.resize(have + step, 0);
        io.read_exact(&mut buf[have..]).await?;
    }
    Ok(buf)
}

/// Bytes of a frame counted against the budget (and zeroed, then read) at a
/// time: what a stream that stops sending holds at most beyond what it sent.
const CLAIM_STEP: usize = 256 << 10;

/// What a frame's buffer starts at before its bytes arrive: the largest
/// averaging part of the default size in f32, with its header. A vector is
/// cut into parts of at least [`DEFAULT_PART_VALUES`] and at most twice as
/// many values (10M values between 2 members: 8 parts of 1.25M; only
/// vectors of over a thousand default parts have larger ones), so a buffer
/// of one default part's bytes was reallocated, and 4 MB copied, for most
/// parts. Only reserved: the memory is touched as bytes arrive. A larger
/// frame still arrives whole, its buffer doubling as it grows.
const FIRST_READ_BYTES: usize = 2 * DEFAULT_PART_VALUES * 4 + 4096;

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|l| (*l as usize) <= MAX_FRAME_BYTES)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to send a frame of {} bytes", bytes.len()),
            )
        })?;
    io.write_all(&len.to_le_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

impl libp2p::request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = DirectFrame;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<DirectFrame>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut held = self.budget.claim();
        let bytes = read_frame(io, MAX_FRAME_BYTES, &mut held).await?;
        Ok(DirectFrame {
            bytes: Arc::new(bytes),
            held: Some(held),
        })
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        // Responses are acknowledgements only: at most a kilobyte, held
        // only while it is read.
        read_frame(io, 1024, &mut self.budget.claim()).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: DirectFrame,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req.bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    fn framed(bytes: &[u8]) -> Cursor<Vec<u8>> {
        let mut buf = Cursor::new(Vec::new());
        futures::executor::block_on(write_frame(&mut buf, bytes)).unwrap();
        Cursor::new(buf.into_inner())
    }

    #[test]
    fn frames_round_trip_and_oversize_is_rejected() {
        let budget = InboundBudget::new(usize::MAX);
        let read = |rd: &mut Cursor<Vec<u8>>, limit| {
            futures::executor::block_on(read_frame(rd, limit, &mut budget.claim()))
        };
        assert_eq!(read(&mut framed(b"hello"), 16).unwrap(), b"hello");

        let err = read(&mut framed(&[0u8; 64]), 16).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");

        let mut truncated = Cursor::new(vec![10, 0, 0, 0, 1, 2]);
        assert!(read(&mut truncated, 16).is_err());

        // Frames longer than the first read arrive whole, through the
        // growing buffer, which ends no larger than the frame.
        let long: Vec<u8> = (0..FIRST_READ_BYTES * 3 + 5).map(|i| i as u8).collect();
        let got = read(&mut framed(&long), usize::MAX).unwrap();
        assert_eq!(got, long);
        assert!(got.capacity() < long.len() + 4096, "{}", got.capacity());
        // A claimed length with too few bytes behind it is an error.
        let mut bytes = framed(&long).into_inner();
        bytes.truncate(FIRST_READ_BYTES * 2);
        assert!(read(&mut Cursor::new(bytes), usize::MAX).is_err());
        // Every claim went back with its frame.
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn the_largest_default_part_arrives_in_the_first_buffer() {
        use p2ptrain_protocol::averaging::{AveragingConfig, AvgMessage};
        use p2ptrain_protocol::tensor::{split_ranges, Payload};
        use p2ptrain_protocol::wire::{self, Message};
        use p2ptrain_protocol::NodeId;
        let cfg = AveragingConfig::default();
        let mut largest = 0;
        for members in 2..=8 {
            for len in [1_000_000, 4_000_000, 10_000_000, 25_000_000, 100_000_000] {
                let parts = split_ranges(len, cfg.part_count(len, members));
                largest = parts.iter().map(|r| r.len()).max().unwrap().max(largest);
            }
        }
        assert!(largest > DEFAULT_PART_VALUES, "parts do exceed the default");
        let mut contributors: Vec<NodeId> =
            (0..8u8).map(|i| NodeId::from_key_bytes(&[i])).collect();
        contributors.sort();
        let frame = wire::encode(&Message::Avg(AvgMessage::Reduced {
            round: u64::MAX,
            part: u32::MAX,
            contributors,
            payload: Payload::from_f32(&vec![0.5; largest]),
        }))
        .unwrap();
        assert!(
            frame.len() <= FIRST_READ_BYTES,
            "{} > {FIRST_READ_BYTES}",
            frame.len()
        );
    }

    #[test]
    fn frames_held_at_once_stay_within_the_budget() {
        let budget = InboundBudget::new(FIRST_READ_BYTES * 3);
        let long = vec![7u8; FIRST_READ_BYTES * 2];
        // One frame of two first reads fits and holds its bytes while kept.
        let mut first = budget.claim();
        let got =
            futures::executor::block_on(read_frame(&mut framed(&long), usize::MAX, &mut first))
                .unwrap();
        assert_eq!(got.len(), long.len());
        assert_eq!(budget.in_use(), long.len());
        // A second one, read while the first is held, is refused as it grows
        // past the budget, and what it had taken goes back.
        let mut second = budget.claim();
        let err =
            futures::executor::block_on(read_frame(&mut framed(&long), usize::MAX, &mut second))
                .unwrap_err();
        assert!(err.to_string().contains("budget exhausted"), "{err}");
        drop(second);
        assert_eq!(budget.in_use(), long.len());
        // Once the first is handled, the second fits.
        drop(first);
        let mut again = budget.claim();
        futures::executor::block_on(read_frame(&mut framed(&long), usize::MAX, &mut again))
            .unwrap();
        drop(again);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn a_stream_that_sends_only_a_length_holds_a_step_of_the_budget() {
        let budget = InboundBudget::new(usize::MAX);
        let mut prefix = (200u32 << 20).to_le_bytes().to_vec();
        prefix.extend_from_slice(b"ten bytes!");
        let mut held = budget.claim();
        let read = futures::executor::block_on(read_frame(
            &mut Cursor::new(prefix),
            usize::MAX,
            &mut held,
        ));
        assert!(read.is_err());
        assert_eq!(held.bytes(), CLAIM_STEP);
    }
}
