//! One QUIC connection as libp2p sees it: a muxer of bidirectional streams,
//! named by the peer id in the certificate its handshake presented.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::PeerId;
use quinn::rustls::pki_types::CertificateDer;

use super::QuicError;

/// Waits for `connecting`'s handshake, at most `timeout`, and names the peer.
pub(super) async fn handshake(
    connecting: quinn::Connecting,
    timeout: Duration,
) -> Result<(PeerId, Connection), QuicError> {
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| QuicError::HandshakeTimedOut(timeout))??;
    let peer = remote_peer(&connection)?;
    Ok((peer, Connection::new(connection)))
}

/// The peer id in the certificate the remote end presented. The handshake
/// already checked that the certificate is a valid libp2p one signed by
/// that peer's key ([`super::tls`]).
fn remote_peer(connection: &quinn::Connection) -> Result<PeerId, QuicError> {
    let refuse = |why: &str| QuicError::Certificate(why.to_string());
    let identity = connection
        .peer_identity()
        .ok_or_else(|| refuse("the peer presented none"))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| refuse("not an X.509 certificate chain"))?;
    let end_entity = chain.first().ok_or_else(|| refuse("empty chain"))?;
    let certificate =
        libp2p_tls::certificate::parse(end_entity).map_err(|e| refuse(&e.to_string()))?;
    Ok(certificate.peer_id())
}

/// A stream pair being opened or accepted.
type OpeningStream =
    BoxFuture<'static, Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>;

/// A QUIC connection the swarm opens and accepts substreams on.
pub struct Connection {
    inner: quinn::Connection,
    accepting: Option<OpeningStream>,
    opening: Option<OpeningStream>,
    closing: Option<BoxFuture<'static, quinn::ConnectionError>>,
}

impl Connection {
    fn new(inner: quinn::Connection) -> Self {
        Self {
            inner,
            accepting: None,
            opening: None,
            closing: None,
        }
    }

    /// The largest UDP payload the path carries now, as path-MTU discovery
    /// found it.
    #[cfg(test)]
    pub(super) fn path_mtu(&self) -> u16 {
        self.inner.stats().path.current_mtu
    }
}

impl StreamMuxer for Connection {
    type Substream = Stream;
    type Error = QuicError;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        let connection = &this.inner;
        poll_opening(&mut this.accepting, cx, || {
            let connection = connection.clone();
            async move { connection.accept_bi().await }.boxed()
        })
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        let connection = &this.inner;
        poll_opening(&mut this.opening, cx, || {
            let connection = connection.clone();
            async move { connection.open_bi().await }.boxed()
        })
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        let closing = this.closing.get_or_insert_with(|| {
            this.inner.close(0u32.into(), &[]);
            let connection = this.inner.clone();
            async move { connection.closed().await }.boxed()
        });
        match futures::ready!(closing.poll_unpin(cx)) {
            // What closing it ourselves ends with.
            quinn::ConnectionError::LocallyClosed => Poll::Ready(Ok(())),
            other => Poll::Ready(Err(other.into())),
        }
    }

    fn poll(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        // Nothing to report: connections do not migrate (the server
        // configuration refuses it), and a closed connection shows as an
        // error from `poll_inbound`, which the swarm always polls.
        Poll::Pending
    }
}

/// Polls the stream pair in `slot`, started by `start` if none is under way.
fn poll_opening(
    slot: &mut Option<OpeningStream>,
    cx: &mut Context<'_>,
    start: impl FnOnce() -> OpeningStream,
) -> Poll<Result<Stream, QuicError>> {
    let result = futures::ready!(slot.get_or_insert_with(start).poll_unpin(cx));
    *slot = None;
    let (send, recv) = result?;
    Poll::Ready(Ok(Stream::new(send, recv)))
}

/// One bidirectional stream of a [`Connection`].
pub struct Stream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// How closing the sending half ended, once it has: closing again
    /// returns the same.
    closed: Option<Result<(), io::ErrorKind>>,
}

impl Stream {
    fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self {
            send,
            recv,
            closed: None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send)
            .poll_write(cx, buf)
            .map_err(io::Error::from)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(closed) = self.closed {
            return Poll::Ready(closed.map_err(io::Error::from));
        }
        let result = futures::ready!(Pin::new(&mut self.send).poll_close(cx));
        self.closed = Some(result.as_ref().map(|_| ()).map_err(io::Error::kind));
        Poll::Ready(result)
    }
}
