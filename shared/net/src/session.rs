//! One session interface over both transports: QUIC, and TLS 1.3 over TCP multiplexed with
//! yamux for networks that block UDP ([`crate::tcp`]). Both sides of the protocol speak to a
//! [`Connection`] and to [`SendStream`]/[`RecvStream`] halves (tokio `AsyncWrite`/`AsyncRead`),
//! so the frame and tensor functions of [`crate::transport`], their byte caps, timeouts and the
//! process-wide frame budget are the same whatever carries the bytes.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::identity::PeerIdentity;
use crate::tcp::{TcpConnection, TcpRecv, TcpSend};
use crate::{Error, Result};

/// Application close codes, the same on both transports.
pub mod close {
    pub const SHUTDOWN: u32 = 0;
    pub const REFUSED: u32 = 1;
    pub const PROTOCOL: u32 = 2;
    pub const REPLACED: u32 = 3;
    pub const REVOKED: u32 = 4;
}

/// How a client reaches the coordinator (`transport = "quic" | "tcp" | "auto"` in node and
/// researcher configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC over UDP only.
    Quic,
    /// TLS 1.3 over TCP (yamux streams) only.
    Tcp,
    /// QUIC first; TCP on the same host and port when the QUIC handshake gets no answer
    /// within [`crate::dial::QUIC_ANSWER_TIMEOUT`].
    #[default]
    Auto,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
            Transport::Auto => "auto",
        })
    }
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quic" => Ok(Transport::Quic),
            "tcp" => Ok(Transport::Tcp),
            "auto" => Ok(Transport::Auto),
            other => Err(format!("unknown transport `{other}`: use quic, tcp or auto")),
        }
    }
}

/// An authenticated connection to one peer, over QUIC or over TCP. Cloning is cheap and
/// every clone speaks for the same connection.
#[derive(Clone)]
pub enum Connection {
    Quic {
        conn: quinn::Connection,
        /// The client's own endpoint, drained on [`Connection::close_and_wait`]; the server's
        /// endpoint is shared by all its connections and drained by the server.
        endpoint: Option<quinn::Endpoint>,
    },
    Tcp(TcpConnection),
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("transport", &self.transport_name())
            .field("remote", &self.remote_address())
            .finish()
    }
}

fn quic_err(e: impl std::error::Error) -> Error {
    Error::Connection(e.to_string())
}

impl Connection {
    /// A server-side QUIC connection.
    pub fn quic(conn: quinn::Connection) -> Self {
        Connection::Quic { conn, endpoint: None }
    }

    /// `quic` or `tcp`, for logs.
    pub fn transport_name(&self) -> &'static str {
        match self {
            Connection::Quic { .. } => "quic",
            Connection::Tcp(_) => "tcp",
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Connection::Quic { conn, .. } => conn.remote_address(),
            Connection::Tcp(c) => c.remote_address(),
        }
    }

    /// Who the peer is, from its (verified) certificate.
    pub fn peer_identity(&self) -> Result<PeerIdentity> {
        match self {
            Connection::Quic { conn, .. } => crate::identity::peer_identity(conn),
            Connection::Tcp(c) => crate::identity::identity_from_chain(c.peer_certificates()),
        }
    }

    /// The serial number of the peer's leaf certificate (to match a revocation list).
    pub fn peer_serial(&self) -> Option<Vec<u8>> {
        match self {
            Connection::Quic { conn, .. } => crate::identity::peer_serial(conn),
            Connection::Tcp(c) => crate::identity::cert_serial(c.peer_certificates()?.first()?).ok(),
        }
    }

    pub async fn open_uni(&self) -> Result<SendStream> {
        match self {
            Connection::Quic { conn, .. } => Ok(SendStream::Quic(conn.open_uni().await.map_err(quic_err)?)),
            Connection::Tcp(c) => Ok(SendStream::Tcp(c.open_uni().await?)),
        }
    }

    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream)> {
        match self {
            Connection::Quic { conn, .. } => {
                let (s, r) = conn.open_bi().await.map_err(quic_err)?;
                Ok((SendStream::Quic(s), RecvStream::Quic(r)))
            }
            Connection::Tcp(c) => {
                let (s, r) = c.open_bi().await?;
                Ok((SendStream::Tcp(s), RecvStream::Tcp(r)))
            }
        }
    }

    pub async fn accept_uni(&self) -> Result<RecvStream> {
        match self {
            Connection::Quic { conn, .. } => Ok(RecvStream::Quic(conn.accept_uni().await.map_err(quic_err)?)),
            Connection::Tcp(c) => Ok(RecvStream::Tcp(c.accept_uni().await?)),
        }
    }

    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream)> {
        match self {
            Connection::Quic { conn, .. } => {
                let (s, r) = conn.accept_bi().await.map_err(quic_err)?;
                Ok((SendStream::Quic(s), RecvStream::Quic(r)))
            }
            Connection::Tcp(c) => {
                let (s, r) = c.accept_bi().await?;
                Ok((SendStream::Tcp(s), RecvStream::Tcp(r)))
            }
        }
    }

    /// Streams of each kind the peer may have open at once (QUIC stream credit; on TCP,
    /// streams beyond it are reset on arrival).
    pub fn set_max_concurrent_streams(&self, bi: u32, uni: u32) {
        match self {
            Connection::Quic { conn, .. } => {
                conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(bi));
                conn.set_max_concurrent_uni_streams(quinn::VarInt::from_u32(uni));
            }
            Connection::Tcp(c) => c.set_max_concurrent_streams(bi, uni),
        }
    }

    /// Why the connection ended (the peer's close code and reason, a lost link), once it has.
    /// A stream that ends with the connection may report a plain end first; this says why.
    pub fn close_reason(&self) -> Option<String> {
        match self {
            Connection::Quic { conn, .. } => conn.close_reason().map(|e| e.to_string()),
            Connection::Tcp(c) => c.close_reason(),
        }
    }

    /// Bytes this side has put on the wire so far (QUIC: UDP payload bytes sent, handshake,
    /// retransmissions and acknowledgements included); None over TCP, which does not count.
    pub fn bytes_sent(&self) -> Option<u64> {
        match self {
            Connection::Quic { conn, .. } => Some(conn.stats().udp_tx.bytes),
            Connection::Tcp(_) => None,
        }
    }

    /// Close with an application code and a reason the peer sees.
    pub fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Connection::Quic { conn, .. } => conn.close(code.into(), reason),
            Connection::Tcp(c) => c.close(code, reason),
        }
    }

    /// Close, then wait briefly until the peer has the close, so it drops us at once instead
    /// of at its idle timeout.
    pub async fn close_and_wait(&self, code: u32, reason: &[u8]) {
        self.close(code, reason);
        let wait = async {
            match self {
                Connection::Quic { endpoint, .. } => {
                    if let Some(e) = endpoint {
                        e.wait_idle().await;
                    }
                }
                Connection::Tcp(c) => c.closed().await,
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
    }
}

/// The sending half of a stream.
pub enum SendStream {
    Quic(quinn::SendStream),
    Tcp(TcpSend),
}

impl SendStream {
    /// No more bytes will be written; the peer reads the end of the stream.
    pub async fn finish(&mut self) -> Result<()> {
        match self {
            SendStream::Quic(s) => s.finish().map_err(quic_err),
            SendStream::Tcp(s) => tokio::io::AsyncWriteExt::shutdown(s)
                .await
                .map_err(|e| Error::Connection(format!("cannot finish the stream: {e}"))),
        }
    }

    /// Wait until the peer has taken every byte or given up on the stream (or the connection
    /// is gone).
    pub async fn stopped(&mut self) {
        match self {
            SendStream::Quic(s) => {
                let _ = s.stopped().await;
            }
            SendStream::Tcp(s) => s.stopped().await,
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_write(cx, buf).map_err(io::Error::from),
            SendStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_flush(cx),
            SendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_shutdown(cx),
            SendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The receiving half of a stream.
pub enum RecvStream {
    Quic(quinn::RecvStream),
    Tcp(TcpRecv),
}

impl RecvStream {
    /// Tell the peer to stop sending (QUIC STOP_SENDING with `code`; on TCP the stream is
    /// reset).
    pub fn stop(&mut self, code: u32) {
        match self {
            RecvStream::Quic(s) => {
                let _ = s.stop(code.into());
            }
            RecvStream::Tcp(s) => s.stop(),
        }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RecvStream::Quic(s) => Pin::new(s).poll_read(cx, buf),
            RecvStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}
