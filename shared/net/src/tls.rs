//! QUIC endpoint configuration: mutual TLS 1.3 against the federation CA, ALPN `fedstat/1`,
//! and the transport limits both sides rely on.
//!
//! The ring provider is passed explicitly everywhere; nothing depends on a process-wide
//! default provider being installed. Certificates and keys may come from `pki` or from an
//! office's own CA, as long as the leaf carries subject `CN=<name>` and `OU=<role>`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{client::WebPkiServerVerifier, DigitallySignedStruct, RootCertStore};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::identity::{identity_from_cert_der, PeerIdentity, Role};
use crate::{Error, Result};

/// The one application protocol spoken on fedstat connections.
pub const ALPN: &[u8] = b"fedstat/1";
/// A connection silent for this long is dead (clients ping every [`KEEP_ALIVE`]).
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Client keep-alive: well under the idle timeout, and under typical NAT UDP timeouts.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Streams a client may open before the coordinator knows its role: one bidirectional stream
/// (a node's control stream or a researcher's first request) and no unidirectional one. The
/// coordinator raises the credit per role once the peer is identified.
pub const INITIAL_BIDI_STREAMS: u32 = 1;
pub const INITIAL_UNI_STREAMS: u32 = 0;

/// The PEM files an endpoint needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The federation CA certificate(s): the only trust anchors.
    pub ca_cert: PathBuf,
    /// This party's certificate chain, leaf first.
    pub cert: PathBuf,
    /// This party's private key (PKCS#8, SEC1 or PKCS#1; unencrypted).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The identity this party's own certificate carries.
    pub fn identity(&self) -> Result<PeerIdentity> {
        let chain = load_certs(&self.cert)?;
        own_identity(&self.cert, &chain)
    }
}

/// Certificate revocation lists from a PEM file.
pub fn load_crls(path: &Path) -> Result<Vec<rustls_pki_types::CertificateRevocationListDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    let crls = rustls_pki_types::CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| Error::Pki(format!("cannot read the revocation list {}: {e}", path.display())))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Pki(format!("{} is not a PEM revocation list: {e}", path.display())))?;
    if crls.is_empty() {
        return Err(Error::Pki(format!(
            "{} holds no revocation list (expected -----BEGIN X509 CRL-----)",
            path.display()
        )));
    }
    for der in &crls {
        warn_if_stale(path, der, UnixTime::now());
    }
    Ok(crls)
}

/// How a CRL's next-update date compares with `now`.
#[derive(Debug, PartialEq, Eq)]
enum CrlFreshness {
    Fresh,
    /// Lapses within [`crate::pki::CRL_WARN_DAYS`]: days left.
    Lapsing(i64),
    /// Lapsed: days ago.
    Lapsed(i64),
}

fn crl_freshness(der: &[u8], now: UnixTime) -> Option<CrlFreshness> {
    let (_, crl) = x509_parser::parse_x509_crl(der).ok()?;
    let next = crl.next_update()?.timestamp();
    let days_left = (next - now.as_secs() as i64).div_euclid(86_400);
    Some(if days_left < 0 {
        CrlFreshness::Lapsed(-days_left)
    } else if days_left < crate::pki::CRL_WARN_DAYS {
        CrlFreshness::Lapsing(days_left)
    } else {
        CrlFreshness::Fresh
    })
}

/// A lapsed CRL is still used (refusing to start over an operational lapse would take the
/// federation down), but loudly, and well before it lapses.
fn warn_if_stale(path: &Path, der: &[u8], now: UnixTime) {
    match crl_freshness(der, now) {
        Some(CrlFreshness::Lapsing(days)) => tracing::warn!(
            path = %path.display(),
            "the revocation list's next update is in {days} day(s): run `fedstat-coordinator pki crl` and distribute the new crl.pem"
        ),
        Some(CrlFreshness::Lapsed(days)) => tracing::error!(
            path = %path.display(),
            "the revocation list lapsed {days} day(s) ago; revocations after it are unknown here: run `fedstat-coordinator pki crl` and distribute the new crl.pem"
        ),
        Some(CrlFreshness::Fresh) | None => {}
    }
}

/// Serial numbers revoked by the CRLs in a PEM file.
pub fn revoked_serials(path: &Path) -> Result<std::collections::HashSet<Vec<u8>>> {
    let mut out = std::collections::HashSet::new();
    for der in load_crls(path)? {
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| {
            Error::Pki(format!(
                "{}: cannot parse the revocation list: {e}",
                path.display()
            ))
        })?;
        out.extend(crl.iter_revoked_certificates().map(|r| r.raw_serial().to_vec()));
    }
    Ok(out)
}

/// Server configuration for the coordinator: requires a client certificate chaining to the
/// federation CA, TLS 1.3 only, ALPN `fedstat/1`. The own certificate must carry the
/// coordinator role.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig> {
    server_config_with_crl(files, None)
}

/// Like [`server_config`], also refusing client certificates listed in the PEM CRL at `crl`
/// (issued by the federation CA: `fedstat-coordinator pki revoke`).
pub fn server_config_with_crl(files: &TlsFiles, crl: Option<&Path>) -> Result<quinn::ServerConfig> {
    let tls = server_tls(files, crl)?;
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Pki(format!("tls config unusable for quic: {e}")))?;

    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout()))
        .max_concurrent_bidi_streams(VarInt::from_u32(INITIAL_BIDI_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(INITIAL_UNI_STREAMS));
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    // Connection attempts the accept loop has not taken yet: a short queue with small buffers
    // (quinn's defaults allow 65536 of them holding up to 100 MiB of packets).
    config
        .max_incoming(1024)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(4 << 20);
    Ok(config)
}

/// The coordinator's TLS-over-TCP configuration: the same rustls configuration as QUIC's
/// (certificates, client verifier with the CRL, TLS 1.3 only, ALPN `fedstat/1`).
pub fn tcp_server_config_with_crl(files: &TlsFiles, crl: Option<&Path>) -> Result<Arc<rustls::ServerConfig>> {
    Ok(Arc::new(server_tls(files, crl)?))
}

fn server_tls(files: &TlsFiles, crl: Option<&Path>) -> Result<rustls::ServerConfig> {
    let provider = provider();
    let roots = load_roots(&files.ca_cert)?;
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;

    let me = own_identity(&files.cert, &chain)?;
    if me.role != Role::Coordinator {
        return Err(Error::Pki(format!(
            "{} is the certificate of {me}, but serving requires a coordinator certificate \
             (subject OU=coordinator)",
            files.cert.display()
        )));
    }
    check_server_chain(files, &chain, &roots, &provider)?;

    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    if let Some(path) = crl {
        let crls = load_crls(path)?;
        // The CRL covers certificates the CA issued; the CA itself is trusted as a root.
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let verifier = builder.build().map_err(|e| {
        Error::Pki(format!(
            "cannot build the client verifier from {}: {e}",
            files.ca_cert.display()
        ))
    })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Pki(format!("tls 1.3 unavailable: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| key_mismatch(files, e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// Client configuration for nodes and the researcher/admin CLI: trusts only the federation
/// CA, accepts only a server certificate carrying the coordinator role, presents its own
/// certificate, ALPN `fedstat/1`, keep-alive every 5 s.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig> {
    client_config_with_crl(files, None)
}

/// Like [`client_config`], also refusing a coordinator certificate listed in the PEM CRL at
/// `crl`, so a stolen coordinator key can be revoked.
pub fn client_config_with_crl(files: &TlsFiles, crl: Option<&Path>) -> Result<quinn::ClientConfig> {
    let tls = client_tls(files, crl)?;
    let quic = QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Pki(format!("tls config unusable for quic: {e}")))?;

    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout()))
        .keep_alive_interval(Some(KEEP_ALIVE));
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The client's TLS-over-TCP configuration: the same rustls configuration as QUIC's.
pub fn tcp_client_config_with_crl(files: &TlsFiles, crl: Option<&Path>) -> Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(client_tls(files, crl)?))
}

fn client_tls(files: &TlsFiles, crl: Option<&Path>) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let roots = load_roots(&files.ca_cert)?;
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;

    let me = own_identity(&files.cert, &chain)?;
    if me.role == Role::Coordinator {
        return Err(Error::Pki(format!(
            "{} is the coordinator's certificate; a client needs a node, researcher or admin \
             certificate (`fedstat-coordinator pki issue`)",
            files.cert.display()
        )));
    }
    // Verify our own chain the way the coordinator will, so a certificate from the wrong CA
    // or an expired one fails at start instead of as an opaque handshake error.
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| {
            Error::Pki(format!(
                "cannot use {} as trust anchor: {e}",
                files.ca_cert.display()
            ))
        })?;
    let (leaf, intermediates) = split_leaf(&files.cert, &chain)?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map_err(|e| not_from_ca(files, e))?;

    let mut server = WebPkiServerVerifier::builder_with_provider(roots, provider.clone());
    if let Some(path) = crl {
        // As on the server: the CRL covers the certificates the CA issued.
        server = server
            .with_crls(load_crls(path)?)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let server = server.build().map_err(|e| {
        Error::Pki(format!(
            "cannot build the server verifier from {}: {e}",
            files.ca_cert.display()
        ))
    })?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Pki(format!("tls 1.3 unavailable: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CoordinatorVerifier { inner: server }))
        .with_client_auth_cert(chain, key)
        .map_err(|e| key_mismatch(files, e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// The client's check of the server: everything webpki checks (chain to the federation CA,
/// validity, server usage, the name dialled, the CRL), then the role. Chaining and the name
/// alone are not enough: a node or researcher certificate that happens to carry server usage
/// and the coordinator's name (an office's own CA may issue such) must not be able to pose as
/// the coordinator, so the certificate must say OU=coordinator.
#[derive(Debug)]
struct CoordinatorVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for CoordinatorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        check_coordinator_role(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The role half of [`CoordinatorVerifier`], as a pure function of the certificate.
fn check_coordinator_role(end_entity: &CertificateDer<'_>) -> std::result::Result<(), rustls::Error> {
    let problem = match identity_from_cert_der(end_entity) {
        Ok(id) if id.role == Role::Coordinator => return Ok(()),
        Ok(id) => format!(
            "the server presented the certificate of {id}, not a coordinator certificate \
             (subject OU=coordinator); it is not the federation's coordinator"
        ),
        Err(e) => format!("the server's certificate carries no coordinator identity: {e}"),
    };
    Err(rustls::Error::InvalidCertificate(
        rustls::CertificateError::Other(rustls::OtherError(Arc::new(Error::Identity(problem)))),
    ))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn idle_timeout() -> IdleTimeout {
    // IdleTimeout counts milliseconds; a u32 holds 30 s with room to spare.
    IdleTimeout::from(VarInt::from_u32(MAX_IDLE_TIMEOUT.as_millis() as u32))
}

/// Every certificate in a PEM file, in order; at least one.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| pem_err(path, e, "certificate"))?;
    if certs.is_empty() {
        return Err(Error::Pki(format!(
            "{} is not a PEM certificate: it contains no `-----BEGIN CERTIFICATE-----` block",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| Error::Pki(format!("{} is not a usable CA certificate: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

/// The first private key in a PEM file: PKCS#8, SEC1 or PKCS#1.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    // Before reading: a key others can read may already be copied, so refuse to rely on it.
    fedstat_core::files::check_private_key(path)?;
    let key = PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::NoItemsFound => Error::Pki(format!(
            "{} contains no private key: expected an unencrypted `PRIVATE KEY`, `EC PRIVATE KEY` \
             or `RSA PRIVATE KEY` PEM block",
            path.display()
        )),
        other => pem_err(path, other, "private key"),
    })?;
    Ok(key)
}

/// Map a PEM error without echoing file content (a key file's lines must not reach a log).
fn pem_err(path: &Path, e: pem::Error, what: &str) -> Error {
    let problem = match e {
        pem::Error::Io(source) => return Error::io("cannot read", path, source),
        pem::Error::MissingSectionEnd { .. } => "a PEM block has no END line",
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a PEM block is not valid base64",
        pem::Error::NoItemsFound => "it contains no PEM block",
        pem::Error::SectionTooLarge => "a PEM block is too large",
        _ => "it is not valid PEM",
    };
    Error::Pki(format!("{} is not a PEM {what} file: {problem}", path.display()))
}

/// Leaf and intermediates; [`load_certs`] never returns an empty chain, but stay total.
fn split_leaf<'c>(
    path: &Path,
    chain: &'c [CertificateDer<'static>],
) -> Result<(&'c CertificateDer<'static>, &'c [CertificateDer<'static>])> {
    chain
        .split_first()
        .ok_or_else(|| Error::Pki(format!("{} contains no certificate", path.display())))
}

fn own_identity(path: &Path, chain: &[CertificateDer<'static>]) -> Result<PeerIdentity> {
    let (leaf, _) = split_leaf(path, chain)?;
    identity_from_cert_der(leaf).map_err(|e| match e {
        Error::Identity(problem) => Error::Pki(format!("{}: {problem}", path.display())),
        other => other,
    })
}

/// The coordinator's certificate must verify for its own SAN, or no node can connect.
fn check_server_chain(
    files: &TlsFiles,
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<()> {
    let (leaf, intermediates) = split_leaf(&files.cert, chain)?;
    let name = first_san(leaf).ok_or_else(|| {
        Error::Pki(format!(
            "{} has no DNS name or IP address (subject alternative name), so nodes cannot verify it",
            files.cert.display()
        ))
    })?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| {
            Error::Pki(format!(
                "cannot use {} as trust anchor: {e}",
                files.ca_cert.display()
            ))
        })?;
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        .map_err(|e| not_from_ca(files, e))?;
    Ok(())
}

fn first_san(der: &CertificateDer<'_>) -> Option<ServerName<'static>> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(dns) => ServerName::try_from(dns.to_string()).ok(),
        GeneralName::IPAddress(&[a, b, c, d]) => Some(ServerName::from(IpAddr::from([a, b, c, d]))),
        GeneralName::IPAddress(bytes) => <[u8; 16]>::try_from(*bytes)
            .ok()
            .map(|v6| ServerName::from(IpAddr::from(v6))),
        _ => None,
    })
}

fn not_from_ca(files: &TlsFiles, e: rustls::Error) -> Error {
    Error::Pki(format!(
        "{} does not verify against the federation CA {}: {e}; use a certificate issued by this \
         federation's CA and check that it has not expired",
        files.cert.display(),
        files.ca_cert.display()
    ))
}

fn key_mismatch(files: &TlsFiles, e: rustls::Error) -> Error {
    Error::Pki(format!(
        "cannot use {} with {}: {e}; check that the key belongs to the certificate",
        files.key.display(),
        files.cert.display()
    ))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };

    use super::*;
    use crate::identity::peer_identity;
    use crate::pki;

    const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

    /// A fresh federation and the TLS files of its parties.
    use crate::test_ca::TestCa as Fed;

    impl Fed {
        fn server_files(&self) -> TlsFiles {
            self.files("coordinator")
        }

        fn issue(&self, role: Role, name: &str) -> TlsFiles {
            let (cert, key) =
                pki::issue(&pki::CaDir::new(&self.dir), role, name, &self.dir, 30).expect("issue");
            TlsFiles {
                ca_cert: self.dir.join("ca.pem"),
                cert,
                key,
            }
        }

        fn files(&self, name: &str) -> TlsFiles {
            TlsFiles {
                ca_cert: self.dir.join("ca.pem"),
                cert: self.dir.join(format!("{name}.pem")),
                key: self.dir.join(format!("{name}.key")),
            }
        }
    }

    fn server(files: &TlsFiles) -> (quinn::Endpoint, SocketAddr) {
        let config = server_config(files).expect("server config");
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = endpoint.local_addr().expect("local addr");
        (endpoint, addr)
    }

    /// Run one handshake; returns what the server and the client saw.
    async fn handshake(
        server_files: &TlsFiles,
        client: quinn::ClientConfig,
    ) -> (Result<PeerIdentity, String>, Result<(), String>) {
        let (endpoint, addr) = server(server_files);
        let accept = tokio::spawn(async move {
            let incoming = endpoint.accept().await.ok_or("endpoint closed")?;
            let conn = incoming
                .accept()
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            // A client rejected after its Finished learns it here, not from `connect`.
            let id = peer_identity(&conn).map_err(|e| e.to_string());
            let _ = conn.accept_bi().await;
            id
        });
        let mut client_ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        client_ep.set_default_client_config(client);
        let client_result = async {
            let conn = client_ep
                .connect(addr, "localhost")
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            // Round-trip a stream so the client also learns about a late rejection.
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(b"x").await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let _ = recv.read_to_end(16).await;
            conn.close(VarInt::from_u32(0), b"done");
            Ok::<_, String>(())
        };
        let client_result = tokio::time::timeout(HANDSHAKE_LIMIT, client_result)
            .await
            .unwrap_or_else(|_| Err("client timed out".into()));
        let server_result = tokio::time::timeout(HANDSHAKE_LIMIT, accept)
            .await
            .map_err(|_| "server timed out".to_string())
            .and_then(|joined| joined.map_err(|e| e.to_string()))
            .and_then(|r| r);
        (server_result, client_result)
    }

    #[tokio::test]
    async fn node_connects_and_is_identified() {
        let fed = Fed::new("fed");
        let node = fed.issue(Role::Node, "ons");
        assert_eq!(node.identity().expect("own identity").to_string(), "node `ons`");
        let (server, client) = handshake(&fed.server_files(), client_config(&node).expect("client")).await;
        assert_eq!(
            server.expect("server side"),
            PeerIdentity {
                role: Role::Node,
                name: "ons".into()
            }
        );
        client.expect("client side");
    }

    #[tokio::test]
    async fn client_from_another_ca_is_rejected() {
        let fed = Fed::new("fed");
        let other = Fed::new("other");
        let intruder = other.issue(Role::Node, "ons");
        // Trusts the real CA, presents a certificate from the other one; our own start-up check
        // refuses that, so build the config from the intruder's point of view.
        let mut files = intruder.clone();
        files.ca_cert = fed.dir.join("ca.pem");
        let err = client_config(&files).expect_err("start-up check");
        assert!(
            err.to_string()
                .contains("does not verify against the federation CA"),
            "{err}"
        );

        let client = raw_client_config(&fed.dir.join("ca.pem"), &intruder);
        let (server, _client) = handshake(&fed.server_files(), client).await;
        let err = server.expect_err("server accepted a foreign certificate");
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn client_trusting_another_ca_fails() {
        let fed = Fed::new("fed");
        let other = Fed::new("other");
        let node = other.issue(Role::Node, "ons");
        let (server, client) = handshake(&fed.server_files(), client_config(&node).expect("client")).await;
        let err = client.expect_err("client must not trust the server");
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(server.is_err());
    }

    /// A client config without the start-up self-check, to see what the server does.
    fn raw_client_config(ca: &Path, files: &TlsFiles) -> quinn::ClientConfig {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(load_roots(ca).expect("roots"))
            .with_client_auth_cert(
                load_certs(&files.cert).expect("certs"),
                load_key(&files.key).expect("key"),
            )
            .expect("client auth");
        tls.alpn_protocols = vec![ALPN.to_vec()];
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).expect("quic")))
    }

    #[tokio::test]
    async fn bring_your_own_certificates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: String| {
            let path = tmp.path().join(name);
            std::fs::write(&path, text).expect("write");
            // Keys must be owner-only to be loaded at all.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod");
            path
        };

        // An office's own CA, made without `pki`: no EKUs, different subject layout.
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Office Root");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |name: &str, role: &str, sans: Vec<String>| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name.remove(DnType::CommonName);
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, "IT");
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, role);
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ];
            let cert = params.signed_by(&key, &issuer).expect("sign");
            (
                write(&format!("{name}.pem"), cert.pem()),
                write(&format!("{name}.key"), key.serialize_pem()),
            )
        };
        let ca = write("ca.pem", ca_cert.pem());
        let (cert, key) = leaf("byo-node", "node", vec![]);
        let node = TlsFiles {
            ca_cert: ca.clone(),
            cert,
            key,
        };
        let (cert, key) = leaf("hub", "coordinator", vec!["localhost".into()]);
        let coordinator = TlsFiles {
            ca_cert: ca,
            cert,
            key,
        };

        let client = client_config(&node).expect("byo client config");
        let (server, client_result) = handshake(&coordinator, client).await;
        assert_eq!(server.expect("server").to_string(), "node `byo-node`");
        client_result.expect("client");

        // Without an OU role the certificate is refused at load time, with the reason.
        let (cert, key) = leaf("no-role", "statistics", vec![]);
        let err = client_config(&TlsFiles {
            ca_cert: node.ca_cert.clone(),
            cert,
            key,
        })
        .expect_err("no role");
        assert!(err.to_string().contains("OU=<role>"), "{err}");
    }

    #[test]
    fn crl_freshness_is_judged_from_next_update() {
        let fed = Fed::new("fed");
        let crls = load_crls(&fed.dir.join("crl.pem")).expect("crl");
        let day = 86_400;
        let issued = UnixTime::now().as_secs();
        let at = |secs: u64| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        let days = crate::pki::CRL_DAYS;
        let check = |now: UnixTime, expected: CrlFreshness| {
            assert_eq!(crl_freshness(&crls[0], now), Some(expected));
        };
        check(at(issued), CrlFreshness::Fresh);
        check(at(issued + (days - 10) * day + 3600), CrlFreshness::Lapsing(9));
        check(at(issued + (days + 3) * day), CrlFreshness::Lapsed(3));
    }

    #[test]
    fn only_a_coordinator_certificate_is_a_coordinator() {
        let fed = Fed::new("fed");
        let der = |files: &TlsFiles| load_certs(&files.cert).expect("certs").remove(0);
        check_coordinator_role(&der(&fed.server_files())).expect("the coordinator");
        for role in [Role::Node, Role::Researcher, Role::Admin] {
            let err =
                check_coordinator_role(&der(&fed.issue(role, &format!("hub-{role}")))).expect_err("not one");
            assert!(
                format!("{err}").contains("not a coordinator certificate"),
                "{err}"
            );
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let fed = Fed::new("fed");
        let node = fed.issue(Role::Node, "ons");
        let check = |files: TlsFiles, expected: &str| {
            let err = client_config(&files).expect_err(expected).to_string();
            assert!(err.contains(expected), "{err}");
        };

        let missing = fed.dir.join("missing.pem");
        check(
            TlsFiles {
                cert: missing.clone(),
                ..node.clone()
            },
            "cannot read",
        );
        check(
            TlsFiles {
                cert: missing,
                ..node.clone()
            },
            "missing.pem",
        );
        check(
            TlsFiles {
                cert: node.key.clone(),
                ..node.clone()
            },
            "is not a PEM certificate",
        );
        // A certificate given as the key: refused for its permissions first, then for content.
        check(
            TlsFiles {
                key: node.cert.clone(),
                ..node.clone()
            },
            "chmod 600",
        );
        let not_a_key = fed.dir.join("not-a-key.pem");
        std::fs::copy(&node.cert, &not_a_key).expect("copy");
        std::fs::set_permissions(&not_a_key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        check(
            TlsFiles {
                key: not_a_key,
                ..node.clone()
            },
            "contains no private key",
        );
        let garbage = fed.dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        check(
            TlsFiles {
                ca_cert: garbage,
                ..node.clone()
            },
            "garbage.pem",
        );
        let other = fed.issue(Role::Node, "other");
        check(
            TlsFiles {
                key: other.key,
                ..node.clone()
            },
            "key belongs to the certificate",
        );
        // The coordinator cannot use its certificate as a client, and a node cannot serve.
        check(fed.server_files(), "coordinator's certificate");
        let err = server_config(&node).expect_err("node cannot serve").to_string();
        assert!(err.contains("requires a coordinator certificate"), "{err}");
    }
}
