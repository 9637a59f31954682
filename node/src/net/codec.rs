//! Length-prefixed frames for direct peer-to-peer messages.
//!
//! request-response's stock codecs cap requests at 1 MiB; model parameter
//! parts are far larger, so we frame raw bytes ourselves with an explicit
//! limit taken from the wire format, and reject anything longer before
//! allocating for it.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use p2ptrain_protocol::wire::MAX_MESSAGE_BYTES;

/// Largest frame: a maximal message plus the swarm-secret MAC.
const MAX_FRAME_BYTES: usize = MAX_MESSAGE_BYTES + super::secret::MAC_LEN;
use std::io;
use std::sync::Arc;

/// The protocol name negotiated for direct messages.
pub const DIRECT_PROTOCOL: StreamProtocol = StreamProtocol::new("/p2ptrain/direct/1");

/// Encoded protocol messages travel as opaque, size-limited byte frames.
#[derive(Debug, Clone, Default)]
pub struct FrameCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, limit: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {limit} bytes"),
        ));
    }
    // Memory follows the bytes that arrive, not the length claimed: a peer
    // (not yet known to be a member) that announces 256 MiB and sends
    // nothing more costs one default part's worth, and past that the buffer
    // at most doubles what was received. Default-sized parts come in one read.
    let mut buf = vec![0u8; len.min(FIRST_READ_BYTES)];
    io.read_exact(&mut buf).await?;
    while buf.len() < len {
        let have = buf.len();
        buf.resize(len.min(have * 2), 0);
        io.read_exact(&mut buf[have..]).await?;
    }
    Ok(buf)
}

/// What a frame's buffer starts at before its bytes arrive: an averaging
/// part of the default size (2^20 values) in f32, with its header.
const FIRST_READ_BYTES: usize = (4 << 20) + 4096;

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
    /// Shared, so the sender can keep it for a retry without copying it.
    type Request = Arc<Vec<u8>>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Arc<Vec<u8>>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, MAX_FRAME_BYTES).await.map(Arc::new)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        // Responses are acknowledgements only.
        read_frame(io, 1024).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Arc<Vec<u8>>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
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

    #[test]
    fn frames_round_trip_and_oversize_is_rejected() {
        futures::executor::block_on(async {
            let mut buf = Cursor::new(Vec::new());
            write_frame(&mut buf, b"hello").await.unwrap();
            let mut rd = Cursor::new(buf.into_inner());
            assert_eq!(read_frame(&mut rd, 16).await.unwrap(), b"hello");

            let mut big = Cursor::new(Vec::new());
            write_frame(&mut big, &[0u8; 64]).await.unwrap();
            let mut rd = Cursor::new(big.into_inner());
            let err = read_frame(&mut rd, 16).await.unwrap_err();
            assert!(err.to_string().contains("exceeds the limit"), "{err}");

            let mut truncated = Cursor::new(vec![10, 0, 0, 0, 1, 2]);
            assert!(read_frame(&mut truncated, 16).await.is_err());

            // Frames longer than the first read arrive whole, through the
            // growing buffer.
            let long: Vec<u8> = (0..FIRST_READ_BYTES * 3 + 5).map(|i| i as u8).collect();
            let mut buf = Cursor::new(Vec::new());
            write_frame(&mut buf, &long).await.unwrap();
            let mut rd = Cursor::new(buf.into_inner());
            assert_eq!(read_frame(&mut rd, usize::MAX).await.unwrap(), long);
            // A claimed length with too few bytes behind it is an error.
            let mut short = Cursor::new(Vec::new());
            write_frame(&mut short, &long).await.unwrap();
            let mut bytes = short.into_inner();
            bytes.truncate(FIRST_READ_BYTES * 2);
            assert!(read_frame(&mut Cursor::new(bytes), usize::MAX)
                .await
                .is_err());
        });
    }
}
