//! Dialling the coordinator from a node or a researcher: over QUIC, over TLS-over-TCP, or
//! (`auto`) over QUIC first and over TCP on the same host and port when the QUIC handshake gets
//! no answer within [`QUIC_ANSWER_TIMEOUT`], as where a firewall drops outbound UDP.
//!
//! `auto` tries QUIC first on every dial, reconnects included: remembering TCP would keep a
//! node on TCP after the firewall opens UDP, and the price of trying is a few seconds per
//! reconnect only where UDP is blocked.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::session::{Connection, Transport};
use crate::tls::{self, TlsFiles};
use crate::{Error, Result};

/// How long `auto` waits for any answer to its QUIC handshake before it tries TCP.
pub const QUIC_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a handshake may take on the transport that is used.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// What became of a QUIC handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicOutcome {
    Connected,
    /// Nothing came back in time (or no UDP socket could be opened): UDP may be blocked.
    NoAnswer,
    /// The coordinator answered and the handshake failed (refused certificate, wrong CA...):
    /// TCP would meet the same refusal, and trying it would hide the reason.
    Failed,
}

/// What to do after a QUIC handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    UseQuic,
    FallBackToTcp,
    GiveUp,
}

/// The fallback rule, as a pure function.
pub fn after_quic(transport: Transport, outcome: QuicOutcome) -> Next {
    match (transport, outcome) {
        (_, QuicOutcome::Connected) => Next::UseQuic,
        (Transport::Auto, QuicOutcome::NoAnswer) => Next::FallBackToTcp,
        _ => Next::GiveUp,
    }
}

/// Everything needed to dial the coordinator, built once from the config files.
#[derive(Clone)]
pub struct Dialer {
    transport: Transport,
    server_name: String,
    quic: quinn::ClientConfig,
    tcp: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("transport", &self.transport)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl Dialer {
    pub fn new(
        files: &TlsFiles,
        crl: Option<&Path>,
        transport: Transport,
        server_name: &str,
    ) -> Result<Self> {
        Ok(Dialer {
            transport,
            server_name: server_name.to_owned(),
            quic: tls::client_config_with_crl(files, crl)?,
            tcp: tls::tcp_client_config_with_crl(files, crl)?,
        })
    }

    /// Connect to `addr` with the configured transport.
    pub async fn dial(&self, addr: SocketAddr) -> Result<Connection> {
        if self.transport == Transport::Tcp {
            return self.dial_tcp(addr).await;
        }
        let wait = match self.transport {
            Transport::Auto => QUIC_ANSWER_TIMEOUT,
            _ => HANDSHAKE_TIMEOUT,
        };
        let (outcome, result) = self.dial_quic(addr, wait).await;
        match after_quic(self.transport, outcome) {
            Next::UseQuic | Next::GiveUp => result,
            Next::FallBackToTcp => {
                tracing::warn!(
                    %addr,
                    "no QUIC answer from {addr} within {wait:?} (is outbound UDP blocked?); \
                     falling back to TCP on {addr}"
                );
                let conn = self.dial_tcp(addr).await?;
                tracing::info!(%addr, "connected over TCP after the fallback");
                Ok(conn)
            }
        }
    }

    async fn dial_tcp(&self, addr: SocketAddr) -> Result<Connection> {
        let conn = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            crate::tcp::connect(self.tcp.clone(), addr, &self.server_name),
        )
        .await
        .map_err(|_| {
            Error::Connection(format!(
                "no TCP/TLS answer from {addr} within {HANDSHAKE_TIMEOUT:?}: is the coordinator running, \
                 and is TCP open?"
            ))
        })??;
        Ok(Connection::Tcp(conn))
    }

    async fn dial_quic(&self, addr: SocketAddr, wait: Duration) -> (QuicOutcome, Result<Connection>) {
        let bind: SocketAddr = if addr.is_ipv6() {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([0u8; 4], 0))
        };
        let mut endpoint = match quinn::Endpoint::client(bind) {
            Ok(e) => e,
            Err(e) => {
                let err = Error::Connection(format!("cannot open a UDP socket: {e}"));
                return (QuicOutcome::NoAnswer, Err(err));
            }
        };
        endpoint.set_default_client_config(self.quic.clone());
        let connecting = match endpoint.connect(addr, &self.server_name) {
            Ok(c) => c,
            Err(e) => return (QuicOutcome::Failed, Err(Error::Connection(e.to_string()))),
        };
        match tokio::time::timeout(wait, connecting).await {
            Ok(Ok(conn)) => (
                QuicOutcome::Connected,
                Ok(Connection::Quic {
                    conn,
                    endpoint: Some(endpoint),
                }),
            ),
            Ok(Err(quinn::ConnectionError::TimedOut)) | Err(_) => {
                endpoint.close(0u32.into(), b"");
                let err = Error::Connection(format!(
                    "no QUIC answer from {addr} within {wait:?}: is the coordinator running, and is UDP open?"
                ));
                (QuicOutcome::NoAnswer, Err(err))
            }
            Ok(Err(e)) => (
                QuicOutcome::Failed,
                Err(Error::Connection(format!("handshake failed: {e}"))),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_auto_falls_back_and_only_on_silence() {
        use Next::*;
        use QuicOutcome::*;
        let check = |t, o, expected| assert_eq!(after_quic(t, o), expected, "{t} {o:?}");
        check(Transport::Auto, Connected, UseQuic);
        check(Transport::Auto, NoAnswer, FallBackToTcp);
        // An answer that refused us would be the same answer over TCP.
        check(Transport::Auto, Failed, GiveUp);
        check(Transport::Quic, Connected, UseQuic);
        check(Transport::Quic, NoAnswer, GiveUp);
        check(Transport::Quic, Failed, GiveUp);
    }

    #[test]
    fn transports_parse_from_config_text() {
        for t in [Transport::Quic, Transport::Tcp, Transport::Auto] {
            assert_eq!(t.to_string().parse::<Transport>(), Ok(t));
        }
        assert!("udp".parse::<Transport>().is_err());
        assert_eq!(Transport::default(), Transport::Auto);
    }
}
