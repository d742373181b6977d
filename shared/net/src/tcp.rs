//! The TCP path: one TLS 1.3 connection (same certificates, verifiers, CRL and ALPN as QUIC)
//! carrying yamux streams, so the coordinator can open streams towards a node over the
//! connection the node dialled.
//!
//! yamux streams are all bidirectional, so the opener writes one kind byte first: a
//! bidirectional stream, a unidirectional one (the other half is never used), or the close
//! notice that carries QUIC's application close code and reason. Stream credit works like
//! QUIC's per-kind limits, except that a stream beyond the limit is reset on arrival instead
//! of waiting for credit. yamux pings every [`crate::tls::KEEP_ALIVE`] and drops a connection
//! whose pings go unanswered for 30 s, QUIC's idle timeout.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Mutex};
use tokio_yamux::StreamHandle;

use crate::{Error, Result};

const KIND_BI: u8 = 1;
const KIND_UNI: u8 = 2;
const KIND_CLOSE: u8 = 3;
/// Time an opener has to say what kind of stream it opened.
const KIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest close reason carried (QUIC allows more, but ours are short sentences).
const MAX_REASON: usize = 1024;
/// Streams yamux holds before we have read their kind byte; more are reset by yamux.
const MAX_UNCLASSIFIED: usize = 64;
/// Per-stream receive window, as QUIC's default (1.25 MB): one stream cannot buffer more.
const STREAM_WINDOW: u32 = 1_250_000;
/// Stream credit of a client before the peer changes it (quinn's default).
const CLIENT_STREAMS: u32 = 100;

fn yamux_config() -> tokio_yamux::Config {
    tokio_yamux::Config {
        max_stream_count: MAX_UNCLASSIFIED + 2 * CLIENT_STREAMS as usize,
        max_stream_window_size: STREAM_WINDOW,
        enable_keepalive: true,
        keepalive_interval: crate::tls::KEEP_ALIVE,
        accept_backlog: MAX_UNCLASSIFIED,
        ..tokio_yamux::Config::default()
    }
}

/// Streams of one kind open now and the most allowed at once.
#[derive(Debug, Default)]
struct Credit {
    limit: AtomicUsize,
    open: Arc<AtomicUsize>,
}

impl Credit {
    fn new(limit: u32) -> Self {
        Credit {
            limit: AtomicUsize::new(limit as usize),
            open: Arc::default(),
        }
    }

    /// A slot, or None when the peer already has `limit` streams of this kind open.
    fn enter(&self) -> Option<Arc<Slot>> {
        let limit = self.limit.load(Ordering::Relaxed);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(Arc::new(Slot(self.open.clone())))
    }
}

/// One open stream counted against its kind's credit until both halves are dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Inner {
    control: tokio_yamux::Control,
    remote: SocketAddr,
    peer_certs: Option<Vec<CertificateDer<'static>>>,
    bi: Mutex<mpsc::Receiver<(TcpSend, TcpRecv)>>,
    uni: Mutex<mpsc::Receiver<TcpRecv>>,
    bi_credit: Credit,
    uni_credit: Credit,
    /// Why the connection ended, once it has.
    closed: watch::Sender<Option<String>>,
    /// True once the yamux session has stopped.
    done: watch::Receiver<bool>,
}

/// A TLS-over-TCP connection with yamux streams; see the module doc.
#[derive(Clone)]
pub struct TcpConnection(Arc<Inner>);

impl TcpConnection {
    fn start<S>(
        tls: S,
        remote: SocketAddr,
        peer_certs: Option<Vec<CertificateDer<'static>>>,
        server: bool,
    ) -> Self
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let session = if server {
            tokio_yamux::Session::new_server(tls, yamux_config())
        } else {
            tokio_yamux::Session::new_client(tls, yamux_config())
        };
        let (bi_tx, bi_rx) = mpsc::channel(MAX_UNCLASSIFIED);
        let (uni_tx, uni_rx) = mpsc::channel(MAX_UNCLASSIFIED);
        let (done_tx, done_rx) = watch::channel(false);
        // The server knows nothing of a peer before its role: one bidirectional stream, as
        // on QUIC (`tls::INITIAL_*`).
        let (bi, uni) = if server {
            (crate::tls::INITIAL_BIDI_STREAMS, crate::tls::INITIAL_UNI_STREAMS)
        } else {
            (CLIENT_STREAMS, CLIENT_STREAMS)
        };
        let conn = TcpConnection(Arc::new(Inner {
            control: session.control(),
            remote,
            peer_certs,
            bi: Mutex::new(bi_rx),
            uni: Mutex::new(uni_rx),
            bi_credit: Credit::new(bi),
            uni_credit: Credit::new(uni),
            closed: watch::channel(None).0,
            done: done_rx,
        }));
        // The driver holds the connection weakly: it ends when the session does, and the
        // session ends when every handle is gone (see `Drop for Inner`) or the peer leaves.
        let weak = Arc::downgrade(&conn.0);
        tokio::spawn(async move {
            let mut session = session;
            let mut why = "connection lost".to_owned();
            while let Some(next) = session.next().await {
                let stream = match next {
                    Ok(s) => s,
                    Err(e) => {
                        // With TLS 1.3 a refused client certificate shows up here, as the
                        // server's alert after the client's handshake is done.
                        why = format!("connection lost: {e}");
                        break;
                    }
                };
                let Some(inner) = weak.upgrade() else { break };
                tokio::spawn(classify(
                    stream,
                    TcpConnection(inner),
                    bi_tx.clone(),
                    uni_tx.clone(),
                ));
            }
            if let Some(inner) = weak.upgrade() {
                inner.closed.send_if_modified(|c| {
                    if c.is_none() {
                        *c = Some(why);
                        true
                    } else {
                        false
                    }
                });
            }
            let _ = done_tx.send(true);
        });
        conn
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.0.remote
    }

    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.0.peer_certs.as_deref()
    }

    pub fn set_max_concurrent_streams(&self, bi: u32, uni: u32) {
        self.0.bi_credit.limit.store(bi as usize, Ordering::Relaxed);
        self.0.uni_credit.limit.store(uni as usize, Ordering::Relaxed);
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.0.closed.borrow().clone()
    }

    fn closed_error(&self) -> Option<Error> {
        self.0.closed.borrow().clone().map(Error::Connection)
    }

    async fn open(&self, kind: u8) -> Result<StreamHandle> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        let mut stream = self.0.control.clone().open_stream().await.map_err(|e| {
            self.closed_error()
                .unwrap_or_else(|| Error::Connection(format!("cannot open a stream: {e:?}")))
        })?;
        if let Err(e) = stream.write_all(&[kind]).await {
            // The session's own reason (a TLS alert, the peer's close) says more than the
            // stream's broken pipe; it follows within moments.
            let mut closed = self.0.closed.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(1), closed.wait_for(Option::is_some)).await;
            return Err(self
                .closed_error()
                .unwrap_or_else(|| Error::Connection(format!("cannot open a stream: {e}"))));
        }
        Ok(stream)
    }

    pub async fn open_uni(&self) -> Result<TcpSend> {
        let (r, w) = tokio::io::split(self.open(KIND_UNI).await?);
        Ok(TcpSend {
            half: w,
            reader: Some(r),
            _slot: None,
        })
    }

    pub async fn open_bi(&self) -> Result<(TcpSend, TcpRecv)> {
        let (r, w) = tokio::io::split(self.open(KIND_BI).await?);
        Ok((
            TcpSend {
                half: w,
                reader: None,
                _slot: None,
            },
            TcpRecv {
                half: Some(r),
                writer: None,
                _slot: None,
            },
        ))
    }

    async fn accept<T>(&self, rx: &Mutex<mpsc::Receiver<T>>) -> Result<T> {
        let mut closed = self.0.closed.subscribe();
        let mut rx = rx.lock().await;
        tokio::select! {
            s = rx.recv() => s.ok_or_else(|| self.closed_error().unwrap_or_else(|| Error::Connection("connection lost".into()))),
            _ = closed.wait_for(Option::is_some) => Err(self.closed_error().unwrap_or_else(|| Error::Connection("connection closed".into()))),
        }
    }

    pub async fn accept_uni(&self) -> Result<TcpRecv> {
        self.accept(&self.0.uni).await
    }

    pub async fn accept_bi(&self) -> Result<(TcpSend, TcpRecv)> {
        self.accept(&self.0.bi).await
    }

    /// Close: the peer gets the code and reason on a close stream, then the session ends.
    pub fn close(&self, code: u32, reason: &[u8]) {
        let reason = String::from_utf8_lossy(&reason[..reason.len().min(MAX_REASON)]).into_owned();
        let first = self.0.closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(format!("closed by us: {reason} (code {code})"));
                true
            } else {
                false
            }
        });
        if !first {
            return;
        }
        let conn = self.clone();
        tokio::spawn(async move {
            let notice = async {
                let mut s = conn.0.control.clone().open_stream().await.ok()?;
                let mut msg = vec![KIND_CLOSE];
                msg.extend_from_slice(&code.to_be_bytes());
                msg.extend_from_slice(&(reason.len() as u16).to_be_bytes());
                msg.extend_from_slice(reason.as_bytes());
                s.write_all(&msg).await.ok()?;
                s.shutdown().await.ok()?;
                // The peer resets the stream once it has read the notice.
                let mut sink = [0u8; 16];
                while s.read(&mut sink).await.ok()? > 0 {}
                Some(())
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), notice).await;
            conn.0.control.clone().close().await;
        });
    }

    /// Resolves once the session has stopped.
    pub async fn closed(&self) {
        let mut done = self.0.done.clone();
        let _ = done.wait_for(|d| *d).await;
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: end the session (its driver holds us only weakly).
        let mut control = self.control.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { control.close().await });
        }
    }
}

/// Read the kind byte of a stream the peer opened and hand it to the matching accept queue,
/// or reset it when the peer has no credit for it.
async fn classify(
    mut stream: StreamHandle,
    conn: TcpConnection,
    bi: mpsc::Sender<(TcpSend, TcpRecv)>,
    uni: mpsc::Sender<TcpRecv>,
) {
    let mut kind = [0u8; 1];
    match tokio::time::timeout(KIND_TIMEOUT, stream.read_exact(&mut kind)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    match kind[0] {
        KIND_BI => {
            let Some(slot) = conn.0.bi_credit.enter() else {
                tracing::debug!("peer exceeded its bidirectional stream credit; stream reset");
                return;
            };
            let (r, w) = tokio::io::split(stream);
            let pair = (
                TcpSend {
                    half: w,
                    reader: None,
                    _slot: Some(slot.clone()),
                },
                TcpRecv {
                    half: Some(r),
                    writer: None,
                    _slot: Some(slot),
                },
            );
            let _ = bi.try_send(pair);
        }
        KIND_UNI => {
            let Some(slot) = conn.0.uni_credit.enter() else {
                tracing::debug!("peer exceeded its unidirectional stream credit; stream reset");
                return;
            };
            let (r, w) = tokio::io::split(stream);
            // The write half is kept, unused, so the opener sees the stream end only when we
            // drop it (its `stopped`).
            let _ = uni.try_send(TcpRecv {
                half: Some(r),
                writer: Some(w),
                _slot: Some(slot),
            });
        }
        KIND_CLOSE => {
            let notice = async {
                let code = stream.read_u32().await.ok()?;
                let len = stream.read_u16().await.ok()? as usize;
                let mut reason = vec![0u8; len.min(MAX_REASON)];
                stream.read_exact(&mut reason).await.ok()?;
                Some((code, String::from_utf8_lossy(&reason).into_owned()))
            };
            let why = match tokio::time::timeout(KIND_TIMEOUT, notice).await {
                Ok(Some((code, reason))) => format!("closed by peer: {reason} (code {code})"),
                _ => "closed by peer".to_owned(),
            };
            conn.0.closed.send_if_modified(|c| {
                if c.is_none() {
                    *c = Some(why);
                    true
                } else {
                    false
                }
            });
            drop(stream);
            conn.0.control.clone().close().await;
        }
        other => {
            tracing::warn!("peer opened a stream of unknown kind {other}; closing");
            conn.close(crate::session::close::PROTOCOL, b"unknown stream kind");
        }
    }
}

/// The sending half of a yamux stream.
pub struct TcpSend {
    half: WriteHalf<StreamHandle>,
    /// Of a unidirectional stream we opened: ends when the peer is done with the stream.
    reader: Option<ReadHalf<StreamHandle>>,
    _slot: Option<Arc<Slot>>,
}

impl TcpSend {
    pub(crate) async fn stopped(&mut self) {
        if let Some(r) = self.reader.as_mut() {
            let mut sink = [0u8; 64];
            while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    }
}

impl AsyncWrite for TcpSend {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.half).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_shutdown(cx)
    }
}

/// The receiving half of a yamux stream.
pub struct TcpRecv {
    half: Option<ReadHalf<StreamHandle>>,
    writer: Option<WriteHalf<StreamHandle>>,
    _slot: Option<Arc<Slot>>,
}

impl TcpRecv {
    /// Reset the stream (when no other half holds it): the sender's writes fail.
    pub(crate) fn stop(&mut self) {
        self.half = None;
        self.writer = None;
    }
}

impl AsyncRead for TcpRecv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.half.as_mut() {
            Some(h) => Pin::new(h).poll_read(cx, buf),
            None => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream stopped"))),
        }
    }
}

fn own_certs(certs: Option<&[CertificateDer<'_>]>) -> Option<Vec<CertificateDer<'static>>> {
    certs.map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
}

/// Accept the TLS handshake of a TCP connection (the caller bounds it with a timeout).
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
) -> Result<TcpConnection> {
    let _ = tcp.set_nodelay(true);
    let tls = acceptor
        .accept(tcp)
        .await
        .map_err(|e| Error::Connection(e.to_string()))?;
    let certs = own_certs(tls.get_ref().1.peer_certificates());
    Ok(TcpConnection::start(tls, remote, certs, true))
}

/// Dial `addr` over TCP and make the TLS handshake (the caller bounds it with a timeout).
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
) -> Result<TcpConnection> {
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| Error::Connection(format!("`{server_name}` is not a valid server name: {e}")))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| Error::Connection(format!("cannot connect over tcp: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| Error::Connection(format!("tls handshake failed: {e}")))?;
    let certs = own_certs(tls.get_ref().1.peer_certificates());
    Ok(TcpConnection::start(tls, addr, certs, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client and a server session over an in-memory pipe (TLS plays no part in streams).
    fn pair() -> (TcpConnection, TcpConnection) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        (
            TcpConnection::start(a, addr, None, false),
            TcpConnection::start(b, addr, None, true),
        )
    }

    #[tokio::test]
    async fn streams_of_each_kind_and_the_close_reason_reach_the_peer() {
        let (client, server) = pair();
        // The server allows one bidirectional stream before the role is known, no uni.
        let (mut send, mut recv) = client.open_bi().await.expect("bi");
        send.write_all(b"hello").await.expect("write");
        let (mut s_send, mut s_recv) = server.accept_bi().await.expect("accept bi");
        let mut buf = [0u8; 5];
        s_recv.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello");
        s_send.write_all(b"welcome").await.expect("answer");
        s_send.shutdown().await.expect("finish");
        let mut answer = Vec::new();
        recv.read_to_end(&mut answer).await.expect("read answer");
        assert_eq!(answer, b"welcome");

        // A uni stream beyond the credit is reset; after raising it one gets through.
        let mut refused = client.open_uni().await.expect("uni");
        let _ = refused.write_all(b"x").await;
        let _ = refused.shutdown().await;
        refused.stopped().await;
        server.set_max_concurrent_streams(1, 8);
        let mut up = client.open_uni().await.expect("uni");
        up.write_all(&[7u8; 100_000]).await.expect("write");
        up.shutdown().await.expect("finish");
        let mut got = Vec::new();
        let mut r = server.accept_uni().await.expect("accept uni");
        r.read_to_end(&mut got).await.expect("read");
        assert_eq!(got.len(), 100_000);
        drop(r);
        tokio::time::timeout(Duration::from_secs(5), up.stopped())
            .await
            .expect("the sender learns the receiver is done");

        server.close(crate::session::close::REVOKED, b"certificate revoked");
        let err = tokio::time::timeout(Duration::from_secs(5), client.accept_uni())
            .await
            .expect("closed in time")
            .err()
            .expect("closed");
        assert_eq!(
            err.to_string(),
            "connection: closed by peer: certificate revoked (code 4)"
        );
        assert!(client.open_bi().await.is_err());
        tokio::time::timeout(Duration::from_secs(5), client.closed())
            .await
            .expect("session ends");
    }

    #[test]
    fn credit_counts_open_streams() {
        let c = Credit::new(2);
        let a = c.enter().expect("first");
        let b = c.enter().expect("second");
        assert!(c.enter().is_none());
        drop(a);
        let _c = c.enter().expect("a slot came free");
        drop(b);
        c.limit.store(0, Ordering::Relaxed);
        assert!(c.enter().is_none());
    }
}
