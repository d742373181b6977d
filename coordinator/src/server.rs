//! The coordinator's network edge: a QUIC endpoint and a TLS-over-TCP listener on the same
//! port (for offices whose firewalls block UDP), one task per connection (in a span naming
//! the peer), every stream turned into [`Event`]s for the federation task. A failing session is
//! logged and dropped while every other peer is served.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fedstat_core::audit::AuditEvent;
use fedstat_net::identity::{PeerIdentity, Role};
pub use fedstat_net::session::close;
use fedstat_net::session::{Connection, RecvStream, SendStream};
use fedstat_net::tls;
use fedstat_net::transport::{
    read_frame, read_frame_payload, read_masked, read_tensor, write_frame, write_tensor,
};
use fedstat_proto::secure::{MaskedHeader, SecureUp};
use fedstat_proto::wire::{decode_payload, CoordMsg, NodeMsg, Request, Response, Upload, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::Instrument;

use crate::config::CoordinatorConfig;
use crate::federation::{self, Event, NodeCmd};
use crate::{Error, Result};

/// A node that sends nothing (not even a heartbeat) for this long is considered gone.
const NODE_SILENCE: Duration = Duration::from_secs(30);
/// Longest pause inside an upload before it is abandoned.
const UPLOAD_IDLE: Duration = Duration::from_secs(60);
/// How long a departing node's uploads may take to land before the federation hears it left.
/// An answer the node finished sending counts even if the node then vanished; one still
/// arriving after this is abandoned (the engine already treats the node as gone).
const DEPARTURE_GRACE: Duration = Duration::from_secs(3);
/// Update streams a node may have open at once (one per experiment it works for, with room).
const NODE_UPLOAD_STREAMS: u32 = 8;
/// Requests a researcher may have in flight at once.
const RESEARCHER_STREAMS: u32 = 8;
/// Most datasets a node may announce, and the longest name.
const MAX_DATASETS: usize = 256;
const MAX_DATASET_NAME: usize = 128;

#[derive(Clone)]
struct Shared {
    events: mpsc::Sender<Event>,
    uploads: Arc<Semaphore>,
    max_params: u64,
    handshake_timeout: Duration,
    max_per_identity: usize,
    /// Live authenticated connections by id, with their certificate serial, so that a reloaded
    /// revocation list can close the ones it revokes. Edge bookkeeping, not round state.
    live: Arc<std::sync::Mutex<LiveConnections>>,
    /// Audit records of refused handshakes in the current minute, and how many were left out.
    refusals: Arc<std::sync::Mutex<RefusalWindow>>,
    /// `record_received`: where copies of received answers go (see the config).
    record: Option<Arc<std::path::Path>>,
}

/// Keep a copy of something a node sent, as received (`record_received`). A failure to write
/// it is logged and changes nothing else.
async fn record(shared: &Shared, name: String, bytes: &[u8]) {
    let Some(dir) = &shared.record else { return };
    let path = dir.join(name);
    if let Err(e) = tokio::fs::write(&path, bytes).await {
        tracing::warn!("cannot record a received message in {}: {e}", path.display());
    }
}

/// A file name for a recorded message: experiment, round, phase, node, what.
fn record_name(
    experiment: u64,
    round: u32,
    phase: fedstat_proto::wire::Phase,
    node: &str,
    what: &str,
) -> String {
    let node: String = node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("e{experiment}-r{round}-{phase:?}-{node}-{what}")
}

/// Anyone can fail a handshake, so refusals are audited one by one only up to a rate; the rest
/// are counted and summarised, so that no stranger can make the coordinator write without end.
#[derive(Debug, Default)]
struct RefusalWindow {
    started: Option<std::time::Instant>,
    written: u32,
    suppressed: u64,
}

/// Refusals audited one by one per minute.
const REFUSALS_PER_MINUTE: u32 = 60;

/// Connection id -> (certificate serial, identity, connection).
type LiveConnections = std::collections::HashMap<u64, (Vec<u8>, PeerIdentity, Connection)>;

impl Shared {
    async fn audit_refusal(&self, peer: SocketAddr, reason: String) {
        let now = std::time::Instant::now();
        let (write, summary) = match self.refusals.lock() {
            Ok(mut w) => {
                let mut summary = None;
                if w.started
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
                {
                    if w.suppressed > 0 {
                        summary = Some(w.suppressed);
                    }
                    *w = RefusalWindow {
                        started: Some(now),
                        ..RefusalWindow::default()
                    };
                }
                let write = w.written < REFUSALS_PER_MINUTE;
                if write {
                    w.written += 1;
                } else {
                    w.suppressed += 1;
                }
                (write, summary)
            }
            Err(_) => (false, None),
        };
        if let Some(count) = summary {
            let event = AuditEvent::ConnectionsRefusedUnlogged {
                count,
                window_secs: 60,
            };
            let _ = self.events.send(Event::Audit(event)).await;
        }
        if write {
            let event = AuditEvent::ConnectionRefused {
                peer: None,
                peer_address: Some(peer.to_string()),
                reason: reason.to_string(),
            };
            let _ = self.events.send(Event::Audit(event)).await;
        }
    }

    /// Record a live connection; false (and nothing recorded) when its identity already holds
    /// `max_per_identity` connections: one stolen or buggy certificate cannot take every slot.
    fn register(&self, id: u64, who: &PeerIdentity, conn: &Connection) -> bool {
        let serial = conn.peer_serial().unwrap_or_default();
        let Ok(mut live) = self.live.lock() else {
            return false;
        };
        if live.values().filter(|(_, w, _)| w == who).count() >= self.max_per_identity {
            return false;
        }
        live.insert(id, (serial, who.clone(), conn.clone()));
        true
    }

    fn unregister(&self, id: u64) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&id);
        }
    }
}

/// The bound listeners: QUIC on UDP and TLS-over-TCP, on the same port number (each may be
/// switched off in the config).
#[derive(Debug)]
pub struct Listeners {
    pub quic: Option<quinn::Endpoint>,
    pub tcp: Option<tokio::net::TcpListener>,
    /// The address both listen on (the actual port when the config says 0).
    pub addr: SocketAddr,
}

/// Bind the listeners (inside the runtime); the config may say port 0, and then the TCP
/// listener takes the port the UDP socket got (tried a few times, in case it is taken).
pub fn bind(config: &CoordinatorConfig) -> Result<Listeners> {
    let listen_err = |source| Error::Listen {
        addr: config.listen,
        source,
    };
    let attempts = if config.listen.port() == 0 { 10 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let quic = config.quic.then(|| bind_quic(config)).transpose()?;
        let mut addr = config.listen;
        if let Some(ep) = &quic {
            addr = ep.local_addr().map_err(listen_err)?;
        }
        if !config.tcp {
            return Ok(Listeners {
                quic,
                tcp: None,
                addr,
            });
        }
        let tcp = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std);
        match tcp {
            Ok(tcp) => {
                let addr = tcp.local_addr().map_err(listen_err)?;
                return Ok(Listeners {
                    quic,
                    tcp: Some(tcp),
                    addr,
                });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(listen_err(
        last.unwrap_or_else(|| std::io::Error::other("cannot bind")),
    ))
}

fn bind_quic(config: &CoordinatorConfig) -> Result<quinn::Endpoint> {
    let server_config = tls::server_config_with_crl(&config.tls, config.crl.as_deref())?;
    let listen_err = |source| Error::Listen {
        addr: config.listen,
        source,
    };
    let socket = std::net::UdpSocket::bind(config.listen).map_err(listen_err)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| listen_err(std::io::Error::other("no async runtime for the QUIC endpoint")))?;
    quinn::Endpoint::new(endpoint_config(config)?, Some(server_config), socket, runtime).map_err(listen_err)
}

/// The next QUIC connection attempt, or never when QUIC is switched off.
async fn next_quic(endpoint: Option<&quinn::Endpoint>) -> Option<quinn::Incoming> {
    match endpoint {
        Some(e) => e.accept().await,
        None => std::future::pending().await,
    }
}

/// The next TCP connection, or never when TCP is switched off.
async fn next_tcp(
    listener: Option<&tokio::net::TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// The endpoint's stateless-reset and connection-ID keys, derived from the coordinator's private
/// key so that they survive restarts: after a crash, the restarted coordinator answers packets of the old
/// connections with a valid stateless reset, and nodes reconnect at once instead of waiting
/// for their idle timeout.
fn endpoint_config(config: &CoordinatorConfig) -> Result<quinn::EndpointConfig> {
    use sha2::Digest;
    let key = std::fs::read(&config.tls.key).map_err(|e| Error::io("cannot read", &config.tls.key, e))?;
    let mut h = sha2::Sha256::new();
    h.update(b"fedstat stateless-reset key v1\0");
    h.update(&key);
    let secret = h.finalize();
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret[..16]);
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(reset_key));
    // Connection IDs must also validate across restarts, or packets of old connections are
    // dropped before a reset can be sent.
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&secret[16..24]);
    let cid_key = u64::from_le_bytes(cid_key);
    endpoint.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    Ok(endpoint)
}

/// Open the store and rebuild the federation from it: start-up errors surface here, before
/// the coordinator accepts anyone.
pub fn federation(config: &CoordinatorConfig) -> Result<federation::Federation> {
    let store = match &config.data_dir {
        Some(dir) => crate::store::Store::open(dir)?,
        None => crate::store::Store::in_memory(),
    };
    let audit = config
        .audit_log
        .as_deref()
        .map(fedstat_core::audit::AuditLog::open)
        .transpose()?;
    tokio::task::block_in_place(|| {
        federation::Federation::new(store, audit, &config.limits, std::time::Instant::now())
    })
}

/// Serve until `shutdown` resolves, then close every connection with a reason and drain.
pub async fn serve(
    listeners: Listeners,
    fed: federation::Federation,
    config: &CoordinatorConfig,
    shutdown: impl Future<Output = ()>,
) {
    let (events, rx) = mpsc::channel(4096);
    let fed = tokio::spawn(federation::run(fed, rx));
    if let Some(dir) = &config.record_received {
        // A folder that cannot be made shows in the log at each write; nothing else depends on it.
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::error!("cannot create the record_received folder {}: {e}", dir.display());
        }
    }
    let shared = Shared {
        events,
        uploads: Arc::new(Semaphore::new(config.limits.max_concurrent_updates)),
        max_params: config.limits.max_params,
        handshake_timeout: config.limits.handshake_timeout,
        max_per_identity: config.limits.max_connections_per_identity,
        live: Arc::default(),
        refusals: Arc::default(),
        record: config.record_received.as_deref().map(Arc::from),
    };
    let connections = Arc::new(Semaphore::new(config.limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(config.limits.max_handshakes));
    let per_address = PerAddress::default();
    let connections_per_address = PerAddress::default();
    let next_conn = AtomicU64::new(1);
    let Listeners {
        quic: endpoint, tcp, ..
    } = listeners;
    let mut acceptor = match tls::tcp_server_config_with_crl(&config.tls, config.crl.as_deref()) {
        Ok(c) => tokio_rustls::TlsAcceptor::from(c),
        Err(e) => {
            // `bind` built the same configuration moments ago; files changed in between.
            tracing::error!("cannot build the TLS configuration: {e}");
            return;
        }
    };
    tokio::pin!(shutdown);
    let mut hangup = Hangup::new();
    loop {
        tokio::select! {
            incoming = next_quic(endpoint.as_ref()) => {
                let Some(incoming) = incoming else { break };
                let source = incoming.remote_address().ip();
                let attempt = Attempt {
                    connections: config.limits.max_connections - connections.available_permits(),
                    handshakes: config.limits.max_handshakes - handshakes.available_permits(),
                    from_address: per_address.count(source),
                    connections_from_address: connections_per_address.count(source),
                    address_validated: incoming.remote_address_validated(),
                };
                match admit(&attempt, &config.limits) {
                    Admission::Accept => {}
                    Admission::Retry => {
                        // Stateless: the peer must echo the token from its real address.
                        if let Err(e) = incoming.retry() {
                            e.into_incoming().refuse();
                        }
                        continue;
                    }
                    Admission::Refuse(why) => {
                        tracing::warn!(peer = %incoming.remote_address(), "{why}; refusing");
                        incoming.refuse();
                        continue;
                    }
                }
                let (Ok(permit), Ok(handshake)) = (
                    connections.clone().try_acquire_owned(),
                    handshakes.clone().try_acquire_owned(),
                ) else {
                    incoming.refuse();
                    continue;
                };
                let handshake = (handshake, per_address.enter(source));
                let permit = (permit, connections_per_address.enter(source));
                let id = next_conn.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                let peer = incoming.remote_address();
                tokio::spawn(async move {
                    connection(incoming, id, shared, handshake).instrument(tracing::info_span!("conn", %peer, id, transport = "quic")).await;
                    drop(permit);
                });
            }
            accepted = next_tcp(tcp.as_ref()) => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!("cannot accept a TCP connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let source = peer.ip();
                // The same caps as QUIC; a completed TCP handshake has proved the address.
                let attempt = Attempt {
                    connections: config.limits.max_connections - connections.available_permits(),
                    handshakes: config.limits.max_handshakes - handshakes.available_permits(),
                    from_address: per_address.count(source),
                    connections_from_address: connections_per_address.count(source),
                    address_validated: true,
                };
                if let Admission::Refuse(why) = admit(&attempt, &config.limits) {
                    tracing::warn!(%peer, "{why}; refusing");
                    continue;
                }
                let (Ok(permit), Ok(handshake)) = (
                    connections.clone().try_acquire_owned(),
                    handshakes.clone().try_acquire_owned(),
                ) else {
                    continue;
                };
                let handshake = (handshake, per_address.enter(source));
                let permit = (permit, connections_per_address.enter(source));
                let id = next_conn.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    tcp_connection(acceptor, stream, peer, id, shared, handshake)
                        .instrument(tracing::info_span!("conn", %peer, id, transport = "tcp"))
                        .await;
                    drop(permit);
                });
            }
            () = &mut shutdown => break,
            _ = hangup.recv() => {
                if let Some(tcp_config) = reload(endpoint.as_ref(), config, &shared).await {
                    acceptor = tokio_rustls::TlsAcceptor::from(tcp_config);
                }
            }
        }
    }
    tracing::info!("shutting down: closing connections");
    if let Some(endpoint) = &endpoint {
        endpoint.close(close::SHUTDOWN.into(), b"coordinator shutting down");
    }
    // TCP connections have no endpoint to close them all: close each live one.
    let tcp_live: Vec<Connection> = match shared.live.lock() {
        Ok(live) => live
            .values()
            .filter(|(_, _, c)| matches!(c, Connection::Tcp(_)))
            .map(|(_, _, c)| c.clone())
            .collect(),
        Err(_) => Vec::new(),
    };
    drop(shared);
    let closing = futures_util::future::join_all(
        tcp_live
            .iter()
            .map(|c| c.close_and_wait(close::SHUTDOWN, b"coordinator shutting down")),
    );
    let idle = async {
        if let Some(endpoint) = &endpoint {
            endpoint.wait_idle().await;
        }
    };
    // The federation task ends once every connection task has dropped its sender.
    let _ = tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(closing, idle) }).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), fed).await;
}

/// What the accept loop knows about a new connection attempt.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    /// Connections open (authenticated or not).
    connections: usize,
    /// TLS handshakes in progress, all sources.
    handshakes: usize,
    /// TLS handshakes in progress from this attempt's IP address.
    from_address: usize,
    /// Connections open from this attempt's IP address.
    connections_from_address: usize,
    /// The attempt answered a QUIC retry, so its source address is real.
    address_validated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Accept,
    /// Ask the peer to prove its address first (QUIC retry).
    Retry,
    Refuse(&'static str),
}

/// Admit, make prove its address, or refuse a connection attempt: a pure function of counts.
/// Under load, address validation comes before the per-address limit, so that a spoofed
/// source cannot use up the quota of a real office's address.
fn admit(a: &Attempt, limits: &crate::config::Limits) -> Admission {
    if a.connections >= limits.max_connections {
        return Admission::Refuse("connection limit reached");
    }
    if a.handshakes >= limits.retry_above_handshakes && !a.address_validated {
        return Admission::Retry;
    }
    if a.connections_from_address >= limits.max_connections_per_address {
        return Admission::Refuse("too many connections from this address");
    }
    if a.from_address >= limits.max_handshakes_per_address {
        return Admission::Refuse("too many handshakes in progress from this address");
    }
    if a.handshakes >= limits.max_handshakes {
        return Admission::Refuse("too many handshakes in progress");
    }
    Admission::Accept
}

/// Handshakes in progress per source IP address. Edge bookkeeping, shared by the accept loop
/// (which reads it) and the connection tasks (whose [`AddressSlot`]s release it).
#[derive(Debug, Clone, Default)]
struct PerAddress(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>);

impl PerAddress {
    fn count(&self, ip: std::net::IpAddr) -> usize {
        self.0
            .lock()
            .map(|m| m.get(&ip).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn enter(&self, ip: std::net::IpAddr) -> AddressSlot {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(ip).or_insert(0) += 1;
        }
        AddressSlot {
            map: self.clone(),
            ip,
        }
    }
}

/// One handshake in progress from `ip`; released when dropped (handshake done or failed).
#[derive(Debug)]
struct AddressSlot {
    map: PerAddress,
    ip: std::net::IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.0.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    // No entry outlives its handshakes: the map stays as small as the flood.
                    m.remove(&self.ip);
                }
            }
        }
    }
}

/// SIGHUP, or nothing where it cannot be installed.
struct Hangup(Option<tokio::signal::unix::Signal>);

impl Hangup {
    fn new() -> Self {
        Hangup(tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok())
    }

    async fn recv(&mut self) -> Option<()> {
        match self.0.as_mut() {
            Some(s) => s.recv().await,
            None => std::future::pending().await,
        }
    }
}

/// Reload the certificate revocation list: new handshakes use it (QUIC and TCP; the new TCP
/// configuration is returned), and connected peers whose certificate it revokes are
/// disconnected at once, whatever their transport.
async fn reload(
    endpoint: Option<&quinn::Endpoint>,
    config: &CoordinatorConfig,
    shared: &Shared,
) -> Option<Arc<rustls::ServerConfig>> {
    let Some(crl) = config.crl.as_deref() else {
        tracing::info!("SIGHUP: no `crl` in the config; nothing to reload");
        return None;
    };
    let loaded = tls::server_config_with_crl(&config.tls, Some(crl)).and_then(|cfg| {
        Ok((
            cfg,
            tls::tcp_server_config_with_crl(&config.tls, Some(crl))?,
            tls::revoked_serials(crl)?,
        ))
    });
    let (server_config, tcp_config, revoked) = match loaded {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("SIGHUP: keeping the previous revocation list: {e}");
            return None;
        }
    };
    if let Some(endpoint) = endpoint {
        endpoint.set_server_config(Some(server_config));
    }
    let kicked: Vec<(PeerIdentity, Connection)> = match shared.live.lock() {
        Ok(live) => live
            .values()
            .filter(|(serial, _, _)| revoked.contains(serial))
            .map(|(_, who, conn)| (who.clone(), conn.clone()))
            .collect(),
        Err(_) => Vec::new(),
    };
    tracing::info!(
        revoked = revoked.len(),
        disconnected = kicked.len(),
        "reloaded the revocation list"
    );
    for (who, conn) in kicked {
        tracing::warn!(peer = %who, "certificate revoked: disconnecting");
        conn.close(close::REVOKED, b"certificate revoked");
        let _ = shared
            .events
            .send(Event::Audit(AuditEvent::PeerRevoked {
                peer: who.to_string(),
            }))
            .await;
    }
    Some(tcp_config)
}

async fn connection(
    incoming: quinn::Incoming,
    id: u64,
    shared: Shared,
    handshake: (tokio::sync::OwnedSemaphorePermit, AddressSlot),
) {
    let peer = incoming.remote_address();
    let accepting = async { incoming.await.map(Connection::quic) };
    if let Some(conn) = handshaken(&shared, peer, accepting).await {
        authenticated(conn, peer, id, shared, handshake).await;
    }
}

async fn tcp_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    id: u64,
    shared: Shared,
    handshake: (tokio::sync::OwnedSemaphorePermit, AddressSlot),
) {
    let accepting = async {
        fedstat_net::tcp::accept(&acceptor, stream, peer)
            .await
            .map(Connection::Tcp)
    };
    if let Some(conn) = handshaken(&shared, peer, accepting).await {
        authenticated(conn, peer, id, shared, handshake).await;
    }
}

/// The TLS handshake of either transport, within `handshake_timeout`; a failure or a timeout
/// is logged and audited, and ends the connection.
async fn handshaken<E: std::fmt::Display>(
    shared: &Shared,
    peer: SocketAddr,
    accepting: impl std::future::Future<Output = Result<Connection, E>>,
) -> Option<Connection> {
    match tokio::time::timeout(shared.handshake_timeout, accepting).await {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            tracing::warn!("refused connection: TLS handshake failed: {e}");
            shared
                .audit_refusal(peer, format!("TLS handshake failed: {e}"))
                .await;
            None
        }
        Err(_) => {
            tracing::warn!(
                "refused connection: no TLS handshake within {:?}",
                shared.handshake_timeout
            );
            shared
                .audit_refusal(peer, "TLS handshake timed out".to_owned())
                .await;
            None
        }
    }
}

/// Everything after the TLS handshake, the same on both transports: identity, per-identity
/// cap, role.
async fn authenticated(
    conn: Connection,
    peer: SocketAddr,
    id: u64,
    shared: Shared,
    handshake: (tokio::sync::OwnedSemaphorePermit, AddressSlot),
) {
    let who = match conn.peer_identity() {
        Ok(who) => who,
        Err(e) => {
            tracing::warn!("refused connection: {e}");
            shared.audit_refusal(peer, e.to_string()).await;
            conn.close(close::REFUSED, b"certificate carries no fedstat identity");
            return;
        }
    };
    drop(handshake);
    let span = tracing::info_span!("peer", %who);
    if !shared.register(id, &who, &conn) {
        let reason = format!(
            "{who} already has {} connections open (limits.max_connections_per_identity)",
            shared.max_per_identity
        );
        tracing::warn!("refused connection: {reason}");
        shared.audit_refusal(peer, reason).await;
        conn.close(close::REFUSED, b"too many connections for this certificate");
        return;
    }
    let edge = shared.clone();
    async move {
        match who.role {
            Role::Node => node_session(conn, id, who, shared).await,
            Role::Researcher | Role::Admin => researcher_session(conn, who, shared).await,
            Role::Coordinator => {
                tracing::warn!("refused connection: a coordinator certificate cannot connect as a client");
                conn.close(close::REFUSED, b"coordinator certificates cannot connect here");
            }
        }
    }
    .instrument(span)
    .await;
    edge.unregister(id);
}

async fn node_session(conn: Connection, id: u64, who: PeerIdentity, shared: Shared) {
    // A node needs its control stream and a few update streams; every open stream may hold a
    // frame buffer, so keep the count small.
    conn.set_max_concurrent_streams(1, NODE_UPLOAD_STREAMS);
    let handshake = async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let payload = read_frame_payload(&mut recv, "hello")
            .await
            .map_err(|e| e.to_string())?;
        let hello = match payload.as_deref().map(|p| decode_payload::<NodeMsg>(p, "hello")) {
            Some(Ok(msg)) => Some(msg),
            None => None,
            Some(Err(e)) => {
                // Say plainly when a node certificate is used for researcher requests.
                if payload
                    .as_deref()
                    .is_some_and(|p| decode_payload::<Request>(p, "request").is_ok())
                {
                    let message = format!(
                        "{who} holds a node certificate, which may only take part in rounds; \
                         researcher requests need a researcher or admin certificate"
                    );
                    let _ = write_frame(
                        &mut send,
                        &Response::Error {
                            message: message.clone(),
                        },
                    )
                    .await;
                    let _ = send.finish().await;
                    return Err(format!("role refused: {message}"));
                }
                return Err(e.to_string());
            }
        };
        Ok::<_, String>((send_hello_answer(&mut send, hello, &who).await?, send, recv))
    };
    let (datasets, send, mut recv) = match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!("node refused: {e}");
            let _ = shared
                .events
                .send(Event::Audit(AuditEvent::ConnectionRefused {
                    peer: Some(who.to_string()),
                    peer_address: None,
                    reason: e.to_string(),
                }))
                .await;
            // Give a refusal message time to reach the peer before the connection closes.
            tokio::time::sleep(Duration::from_millis(100)).await;
            conn.close(close::PROTOCOL, b"refused in hello");
            return;
        }
        Err(_) => {
            tracing::warn!("node refused: no hello within {:?}", shared.handshake_timeout);
            conn.close(close::PROTOCOL, b"no hello in time");
            return;
        }
    };
    let (tx, cmds) = mpsc::unbounded_channel();
    let name = who.name.clone();
    if shared
        .events
        .send(Event::NodeUp {
            conn: id,
            name: name.clone(),
            datasets,
            tx,
        })
        .await
        .is_err()
    {
        return;
    }
    let writer = tokio::spawn(node_writer(conn.clone(), send, cmds).in_current_span());
    let (stop_uploads, stop) = oneshot::channel();
    let uploads =
        tokio::spawn(accept_updates(conn.clone(), name.clone(), shared.clone(), stop).in_current_span());
    loop {
        match tokio::time::timeout(NODE_SILENCE, read_frame::<NodeMsg>(&mut recv, "node message")).await {
            Ok(Ok(Some(msg))) => {
                if let NodeMsg::Secure(up) = &msg {
                    if shared.record.is_some() {
                        let at = up.at();
                        let what = match up {
                            SecureUp::Keys { .. } => "keys",
                            SecureUp::Shares { .. } => "shares",
                            SecureUp::Reveal { .. } => "reveal",
                        };
                        let bytes = fedstat_proto::wire::encode_frame(&msg).unwrap_or_default();
                        let file = record_name(
                            at.experiment,
                            at.round,
                            at.phase,
                            &name,
                            &format!("a{}-{what}.frame", at.attempt),
                        );
                        record(&shared, file, &bytes).await;
                    }
                }
                if shared
                    .events
                    .send(Event::FromNode {
                        name: name.clone(),
                        msg,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok(Ok(None)) => {
                tracing::info!("node closed its control stream");
                break;
            }
            Ok(Err(e)) => {
                tracing::warn!("dropping node: {e}");
                conn.close(close::PROTOCOL, b"malformed control message");
                break;
            }
            Err(_) => {
                tracing::warn!("dropping node: silent for {NODE_SILENCE:?}");
                conn.close(close::PROTOCOL, b"no heartbeat");
                break;
            }
        }
    }
    // The uploads it already sent reach the engine before its departure does: otherwise a
    // masked answer that arrived whole would be refused as late, and the sum lose a member.
    let _ = stop_uploads.send(());
    let _ = uploads.await;
    writer.abort();
    let _ = shared.events.send(Event::NodeDown { conn: id, name }).await;
}

/// Check the hello and answer it; returns the datasets the node offers.
async fn send_hello_answer(
    send: &mut SendStream,
    hello: Option<NodeMsg>,
    who: &PeerIdentity,
) -> Result<Vec<String>, String> {
    let (answer, result) = answer_hello(hello, who);
    write_frame(send, &answer).await.map_err(|e| e.to_string())?;
    result
}

/// The decision on a node's first control message: a `Hello` of this protocol version offering
/// at most `MAX_DATASETS` printable dataset names is welcomed (its datasets returned);
/// anything else is refused with the reason, which the node is told.
fn answer_hello(hello: Option<NodeMsg>, who: &PeerIdentity) -> (CoordMsg, Result<Vec<String>, String>) {
    let refuse = |reason: String| {
        (
            CoordMsg::Refused {
                reason: reason.clone(),
            },
            Err(reason),
        )
    };
    match hello {
        Some(NodeMsg::Hello {
            protocol, datasets, ..
        }) if protocol == PROTOCOL_VERSION => {
            if datasets.len() > MAX_DATASETS
                || datasets.iter().any(|d| {
                    d.is_empty()
                        || d.len() > MAX_DATASET_NAME
                        || d.chars().any(fedstat_core::text::is_unprintable)
                })
            {
                refuse(format!(
                    "at most {MAX_DATASETS} dataset names of 1 to {MAX_DATASET_NAME} printable characters may be offered"
                ))
            } else {
                let welcome = CoordMsg::Welcome {
                    protocol: PROTOCOL_VERSION,
                    name: who.name.clone(),
                };
                (welcome, Ok(datasets))
            }
        }
        Some(NodeMsg::Hello { protocol, .. }) => refuse(format!(
            "protocol version {protocol} is not supported; this coordinator speaks {PROTOCOL_VERSION}"
        )),
        _ => refuse("the first message must be a hello".to_owned()),
    }
}

async fn node_writer(conn: Connection, mut control: SendStream, mut cmds: mpsc::UnboundedReceiver<NodeCmd>) {
    while let Some(cmd) = cmds.recv().await {
        match cmd {
            NodeCmd::Send(msg) => {
                if let Err(e) = write_frame(&mut control, &msg).await {
                    tracing::warn!("cannot write to node: {e}");
                    break;
                }
            }
            NodeCmd::Task { task, model } => {
                // Each task on its own stream and task, so a slow transfer holds up nothing else.
                let conn = conn.clone();
                tokio::spawn(
                    async move {
                        let sent = async {
                            let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
                            write_frame(&mut s, &*task).await.map_err(|e| e.to_string())?;
                            if let Some(m) = model {
                                write_tensor(&mut s, &m).await.map_err(|e| e.to_string())?;
                            }
                            s.finish().await.map_err(|e| e.to_string())
                        };
                        if let Err(e) = sent.await {
                            tracing::warn!(round = task.round, "cannot send {} task: {e}", task.phase);
                        }
                    }
                    .in_current_span(),
                );
            }
            NodeCmd::Close(reason) => {
                conn.close(close::REPLACED, reason.as_bytes());
                break;
            }
        }
    }
}

/// Accept the node's upload streams until its session ends (`stop`). Then, for at most
/// `DEPARTURE_GRACE`, accept the streams it had already opened and let every upload in flight
/// land; whatever is still arriving after that is abandoned.
async fn accept_updates(conn: Connection, name: String, shared: Shared, mut stop: oneshot::Receiver<()>) {
    let mut inflight = tokio::task::JoinSet::new();
    let mut accepting = true;
    loop {
        tokio::select! {
            accepted = conn.accept_uni() => match accepted {
                Ok(recv) => {
                    inflight.spawn(update(recv, name.clone(), shared.clone()).in_current_span());
                }
                Err(_) => {
                    accepting = false;
                    break;
                }
            },
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    if shared.events.is_closed() {
        return; // the coordinator is shutting down: nobody to deliver to
    }
    let departing = async {
        loop {
            tokio::select! {
                // A closed connection still yields the streams that arrived before the close.
                accepted = conn.accept_uni(), if accepting => match accepted {
                    Ok(recv) => {
                        inflight.spawn(update(recv, name.clone(), shared.clone()).in_current_span());
                    }
                    Err(_) => accepting = false,
                },
                Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                else => break,
            }
        }
    };
    let _ = tokio::time::timeout(DEPARTURE_GRACE, departing).await;
    if !inflight.is_empty() {
        tracing::warn!(
            uploads = inflight.len(),
            "abandoning uploads still arriving from a departed node"
        );
    }
    // Dropping the set aborts whatever is left.
}

/// Receive one update: header, admission by the federation, then the bytes into a staging slot.
async fn update(mut recv: RecvStream, name: String, shared: Shared) {
    let header = match tokio::time::timeout(
        shared.handshake_timeout,
        read_frame::<Upload>(&mut recv, "update header"),
    )
    .await
    {
        Ok(Ok(Some(Upload::Answer(h)))) => h,
        Ok(Ok(Some(Upload::Masked(h)))) => return masked(recv, name, h, shared).await,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!("bad update stream: {e}");
            recv.stop(close::PROTOCOL);
            return;
        }
        Err(_) => {
            tracing::warn!("update header not received in time");
            recv.stop(close::PROTOCOL);
            return;
        }
    };
    let (reply, answer) = oneshot::channel();
    let begin = Event::AnswerBegin {
        name: name.clone(),
        header: header.clone(),
        reply,
    };
    if shared.events.send(begin).await.is_err() {
        return;
    }
    let meta = match answer.await {
        Ok(Ok(meta)) => meta,
        _ => {
            recv.stop(close::REFUSED);
            return;
        }
    };
    // Bounded staging: memory stays flat however many nodes upload at once.
    let Ok(permit) = shared.uploads.clone().acquire_owned().await else {
        return;
    };
    let values =
        match tokio::time::timeout(UPLOAD_IDLE * 10, read_tensor(&mut recv, meta, shared.max_params)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("upload took longer than {:?}", UPLOAD_IDLE * 10)),
        };
    match &values {
        Err(_) => recv.stop(close::REFUSED),
        Ok(v) if shared.record.is_some() => {
            let file = record_name(header.experiment, header.round, header.phase, &name, "answer");
            record(&shared, format!("{file}.bin"), &v.to_le_bytes()).await;
            let meta = serde_json::to_vec(&header).unwrap_or_default();
            record(&shared, format!("{file}.json"), &meta).await;
        }
        Ok(_) => {}
    }
    let _ = shared
        .events
        .send(Event::AnswerDone {
            name,
            header,
            values,
            permit,
        })
        .await;
}

/// Receive one masked answer of a secure step: admission by the federation (which knows
/// its exact length), then its bytes into a staging slot.
async fn masked(mut recv: RecvStream, name: String, header: MaskedHeader, shared: Shared) {
    let (reply, answer) = oneshot::channel();
    let begin = Event::MaskedBegin {
        name: name.clone(),
        header,
        reply,
    };
    if shared.events.send(begin).await.is_err() {
        return;
    }
    let len = match answer.await {
        Ok(Ok(len)) => len,
        _ => {
            recv.stop(close::REFUSED);
            return;
        }
    };
    let Ok(permit) = shared.uploads.clone().acquire_owned().await else {
        return;
    };
    let bytes = match tokio::time::timeout(UPLOAD_IDLE * 10, read_masked(&mut recv, len as usize)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("upload took longer than {:?}", UPLOAD_IDLE * 10)),
    };
    match &bytes {
        Err(_) => recv.stop(close::REFUSED),
        Ok(b) => {
            let at = header.at;
            let file = record_name(
                at.experiment,
                at.round,
                at.phase,
                &name,
                &format!("a{}-masked.bin", at.attempt),
            );
            record(&shared, file, b).await;
        }
    }
    let _ = shared
        .events
        .send(Event::MaskedDone {
            name,
            header,
            bytes,
            permit,
        })
        .await;
}

async fn researcher_session(conn: Connection, who: PeerIdentity, shared: Shared) {
    tracing::info!("researcher connected");
    conn.set_max_concurrent_streams(RESEARCHER_STREAMS, 0);
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(request(send, recv, who.clone(), shared.clone()).in_current_span());
    }
}

async fn request(mut send: SendStream, mut recv: RecvStream, who: PeerIdentity, shared: Shared) {
    let payload = match tokio::time::timeout(
        shared.handshake_timeout,
        read_frame_payload(&mut recv, "request"),
    )
    .await
    {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(e)) => {
            tracing::warn!("bad request: {e}");
            let _ = write_frame(
                &mut send,
                &Response::Error {
                    message: e.to_string(),
                },
            )
            .await;
            let _ = send.finish().await;
            return;
        }
    };
    let req = match decode_payload::<Request>(&payload, "request") {
        Ok(r) => r,
        Err(e) => {
            // Say plainly when a researcher or admin certificate is used to join as a node.
            let as_node = matches!(
                decode_payload::<NodeMsg>(&payload, "hello"),
                Ok(NodeMsg::Hello { .. })
            );
            let reason = if as_node {
                let reason = format!(
                    "{who} holds a {} certificate, which cannot take part in rounds; nodes need a node certificate",
                    who.role
                );
                let _ = write_frame(
                    &mut send,
                    &CoordMsg::Refused {
                        reason: reason.clone(),
                    },
                )
                .await;
                reason
            } else {
                let _ = write_frame(
                    &mut send,
                    &Response::Error {
                        message: e.to_string(),
                    },
                )
                .await;
                e.to_string()
            };
            tracing::warn!("request refused: {reason}");
            let _ = shared
                .events
                .send(Event::Audit(AuditEvent::RequestRefused {
                    peer: who.to_string(),
                    request: None,
                    reason,
                }))
                .await;
            let _ = send.finish().await;
            return;
        }
    };
    let (reply, answer) = oneshot::channel();
    if shared
        .events
        .send(Event::Request {
            who,
            request: req,
            reply,
        })
        .await
        .is_err()
    {
        return;
    }
    let Ok(reply) = answer.await else { return };
    let sent = async {
        write_frame(&mut send, &reply.response).await?;
        if let Some(t) = reply.tensor {
            write_tensor(&mut send, &t).await?;
        }
        Ok::<_, fedstat_net::Error>(())
    };
    if let Err(e) = sent.await {
        tracing::warn!("cannot answer request: {e}");
    }
    let _ = send.finish().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of first message a node can send, and what the coordinator answers.
    #[test]
    fn a_node_is_welcomed_only_with_a_hello_of_this_protocol_and_sane_datasets() {
        let who = PeerIdentity {
            role: Role::Node,
            name: "ons".into(),
        };
        let hello = |protocol: u32, datasets: Vec<String>| {
            Some(NodeMsg::Hello {
                protocol,
                software: "fedstat-node".into(),
                datasets,
            })
        };
        let many: Vec<String> = (0..=MAX_DATASETS).map(|i| format!("d{i}")).collect();
        // (first message, welcomed?, words of the refusal)
        let cases = [
            (hello(PROTOCOL_VERSION, vec!["lfs".into()]), true, ""),
            (hello(PROTOCOL_VERSION, vec![]), true, ""),
            (
                hello(PROTOCOL_VERSION - 1, vec!["lfs".into()]),
                false,
                "is not supported",
            ),
            (hello(PROTOCOL_VERSION, many), false, "dataset names"),
            (
                hello(PROTOCOL_VERSION, vec![String::new()]),
                false,
                "dataset names",
            ),
            (
                hello(PROTOCOL_VERSION, vec!["a\u{202e}b".into()]),
                false,
                "printable",
            ),
            (
                hello(PROTOCOL_VERSION, vec!["x".repeat(MAX_DATASET_NAME + 1)]),
                false,
                "dataset names",
            ),
            (Some(NodeMsg::Heartbeat), false, "must be a hello"),
            (None, false, "must be a hello"),
        ];
        for (first, welcomed, words) in cases {
            let shown = format!("{first:?}");
            let (answer, result) = answer_hello(first, &who);
            assert_eq!(result.is_ok(), welcomed, "{shown}");
            match (answer, result) {
                (CoordMsg::Welcome { name, protocol }, Ok(_)) => {
                    assert_eq!((name.as_str(), protocol), ("ons", PROTOCOL_VERSION));
                }
                (CoordMsg::Refused { reason }, Err(told)) => {
                    assert_eq!(reason, told, "the node is told what is logged");
                    assert!(reason.contains(words), "{shown}: {reason}");
                }
                other => panic!("{shown}: inconsistent answer {other:?}"),
            }
        }
    }

    #[test]
    fn admission_under_load() {
        let limits = crate::config::Limits {
            max_connections: 100,
            max_handshakes: 64,
            max_handshakes_per_address: 8,
            retry_above_handshakes: 16,
            max_connections_per_address: 40,
            max_connections_per_identity: 4,
            max_concurrent_updates: 4,
            max_params: 1000,
            handshake_timeout: Duration::from_secs(10),
            max_experiments_per_researcher: 4,
        };
        let check = |connections, handshakes, from_address, address_validated, expected| {
            let a = Attempt {
                connections,
                handshakes,
                from_address,
                connections_from_address: connections / 2,
                address_validated,
            };
            assert_eq!(admit(&a, &limits), expected, "{a:?}");
        };
        use Admission::*;
        check(0, 0, 0, false, Accept);
        check(10, 15, 7, false, Accept);
        // Busy: prove your address first; a validated attempt goes on to the other checks.
        check(10, 16, 0, false, Retry);
        check(10, 16, 0, true, Accept);
        // One address cannot take every handshake slot, validated or not.
        check(
            10,
            3,
            8,
            false,
            Refuse("too many handshakes in progress from this address"),
        );
        check(
            10,
            20,
            8,
            true,
            Refuse("too many handshakes in progress from this address"),
        );
        check(10, 64, 0, true, Refuse("too many handshakes in progress"));
        check(100, 0, 0, true, Refuse("connection limit reached"));
        // Connections from one address (here half of all open ones).
        check(80, 0, 0, true, Refuse("too many connections from this address"));
        check(78, 0, 0, true, Accept);
    }
}
