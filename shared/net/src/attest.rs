//! Signatures by a party's certificate key over application statements (secure
//! aggregation's key advertisements): the node signs with its certificate's key ([`Signer`]),
//! and every peer checks the certificate against the federation CA, its revocation, its role
//! and name, then the signature ([`Verifier`]).
//!
//! Keys are ECDSA P-256 (what [`crate::pki`] issues), signatures ASN.1 DER
//! (`ECDSA_P256_SHA256_ASN1`, ring). The certificate's chain, validity, client usage and
//! revocation are checked by webpki exactly as the coordinator checks a connecting node
//! (see [`crate::tls`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING,
};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

use crate::identity::{identity_from_cert_der, PeerIdentity, Role};
use crate::{Error, Result};

/// Why a signed statement was refused. Rendered after the node's name by [`Error::Attest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The certificate does not chain to the federation CA (or is not a valid certificate).
    NotFromCa(String),
    /// The certificate has expired, or is not valid yet.
    OutsideValidity,
    /// The certificate is listed in the revocation list.
    Revoked,
    /// The certificate carries no usable fedstat identity (CN, OU).
    NoIdentity(String),
    /// The certificate is another role's.
    WrongRole(Role),
    /// The certificate names another party.
    WrongName(String),
    /// The certificate's key is not ECDSA P-256.
    UnsupportedKey,
    /// The signature does not verify with the certificate's key over the statement.
    BadSignature,
    /// Signing failed (the system's randomness was unavailable).
    SigningFailed,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotFromCa(why) => write!(f, "its certificate is not from the federation CA ({why})"),
            Problem::OutsideValidity => f.write_str("its certificate has expired or is not valid yet"),
            Problem::Revoked => f.write_str("its certificate is revoked"),
            Problem::NoIdentity(why) => write!(f, "its certificate carries no fedstat identity ({why})"),
            Problem::WrongRole(role) => {
                write!(
                    f,
                    "its certificate is a {role} certificate, a node certificate is required"
                )
            }
            Problem::WrongName(other) => write!(f, "its certificate names `{other}`"),
            Problem::UnsupportedKey => f.write_str("its certificate key is not ECDSA P-256"),
            Problem::BadSignature => f.write_str("the signature does not verify with its certificate key"),
            Problem::SigningFailed => f.write_str("signing failed"),
        }
    }
}

/// Signs with a party's certificate key (ECDSA P-256, PKCS#8 PEM as [`crate::pki`] writes it).
pub struct Signer {
    key: EcdsaKeyPair,
    certificate: CertificateDer<'static>,
    identity: PeerIdentity,
    rng: SystemRandom,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({})", self.identity)
    }
}

impl Signer {
    /// Load the key at `key_pem` (owner-only permissions required, as for TLS) and the
    /// certificate at `cert_pem` (leaf first); refuses a key that does not belong to the
    /// certificate.
    pub fn load(key_pem: &Path, cert_pem: &Path) -> Result<Signer> {
        fedstat_core::files::check_private_key(key_pem)?;
        let der = match PrivateKeyDer::from_pem_file(key_pem) {
            Ok(PrivateKeyDer::Pkcs8(der)) => der,
            Ok(_) => {
                return Err(Error::Pki(format!(
                    "{}: signing needs a PKCS#8 (`PRIVATE KEY`) ECDSA P-256 key, as `pki` issues",
                    key_pem.display()
                )))
            }
            Err(_) => {
                return Err(Error::Pki(format!(
                    "{} is not a readable PEM private key",
                    key_pem.display()
                )))
            }
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der.secret_pkcs8_der(), &rng)
            .map_err(|_| {
                Error::Pki(format!(
                    "{} is not an ECDSA P-256 key: signing needs the key `pki` issues",
                    key_pem.display()
                ))
            })?;
        let certificate = CertificateDer::pem_file_iter(cert_pem)
            .ok()
            .and_then(|mut certs| certs.next())
            .and_then(|first| first.ok())
            .ok_or_else(|| Error::Pki(format!("{} is not a PEM certificate", cert_pem.display())))?;
        let identity = identity_from_cert_der(&certificate)?;
        if p256_point(&certificate).as_deref() != Some(key.public_key().as_ref()) {
            return Err(Error::Pki(format!(
                "{} does not belong to the certificate {}; check that the key belongs to the certificate",
                key_pem.display(),
                cert_pem.display()
            )));
        }
        Ok(Signer {
            key,
            certificate,
            identity,
            rng,
        })
    }

    /// An ASN.1 DER ECDSA P-256 SHA-256 signature over `msg`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        let signature = self.key.sign(&self.rng, msg).map_err(|_| Error::Attest {
            node: self.identity.name.clone(),
            problem: Problem::SigningFailed,
        })?;
        Ok(signature.as_ref().to_vec())
    }

    /// The certificate (DER) to send with signatures.
    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate
    }

    /// Role and name of the certificate.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }
}

/// Checks statements signed by nodes: certificate from the federation CA, valid now, not
/// revoked, role `node`, the expected name; then the signature.
pub struct Verifier {
    webpki: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Verifier { .. }")
    }
}

impl Verifier {
    /// Trust the CA certificate(s) at `ca_cert`; refuse certificates listed in the PEM CRL at
    /// `crl`, when given (checked like a TLS peer's: the end certificate only).
    pub fn load(ca_cert: &Path, crl: Option<&Path>) -> Result<Verifier> {
        let certs = CertificateDer::pem_file_iter(ca_cert)
            .and_then(|iter| iter.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|_| {
                Error::Pki(format!(
                    "{} is not a readable PEM certificate file",
                    ca_cert.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(Error::Pki(format!(
                "{} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
                ca_cert.display()
            )));
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| {
                Error::Pki(format!(
                    "{} is not a usable CA certificate: {e}",
                    ca_cert.display()
                ))
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        if let Some(path) = crl {
            builder = builder
                .with_crls(crate::tls::load_crls(path)?)
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
        let webpki = builder
            .build()
            .map_err(|e| Error::Pki(format!("cannot use {} as trust anchor: {e}", ca_cert.display())))?;
        Ok(Verifier { webpki })
    }

    /// Check that `signature` over `msg` was made by node `name` with the key of `cert_der`,
    /// a certificate of the federation CA, valid now and not revoked.
    pub fn verify(&self, cert_der: &[u8], name: &str, msg: &[u8], signature: &[u8]) -> Result<()> {
        self.verify_at(cert_der, name, msg, signature, UnixTime::now())
    }

    fn verify_at(
        &self,
        cert_der: &[u8],
        name: &str,
        msg: &[u8],
        signature: &[u8],
        now: UnixTime,
    ) -> Result<()> {
        // `name` comes from the wire: shortened and without control characters in messages.
        let shown: String = name
            .chars()
            .take(crate::identity::MAX_NAME_LEN)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        let refuse = |problem| Error::Attest {
            node: shown.clone(),
            problem,
        };
        let cert = CertificateDer::from(cert_der);
        self.webpki
            .verify_client_cert(&cert, &[], now)
            .map_err(|e| refuse(chain_problem(e)))?;
        let id = identity_from_cert_der(cert_der).map_err(|e| refuse(Problem::NoIdentity(e.to_string())))?;
        if id.role != Role::Node {
            return Err(refuse(Problem::WrongRole(id.role)));
        }
        if id.name != name {
            return Err(refuse(Problem::WrongName(id.name)));
        }
        let point = p256_point(cert_der).ok_or_else(|| refuse(Problem::UnsupportedKey))?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
            .verify(msg, signature)
            .map_err(|_| refuse(Problem::BadSignature))
    }
}

fn chain_problem(e: rustls::Error) -> Problem {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Revoked => Problem::Revoked,
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => Problem::OutsideValidity,
            other => Problem::NotFromCa(format!("{other:?}")),
        },
        other => Problem::NotFromCa(other.to_string()),
    }
}

/// A certificate's key fingerprint, `sha256:` and 64 lowercase hex digits: SHA-256 of its
/// DER SubjectPublicKeyInfo (as `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der
/// | sha256sum` prints). A renewal keeps the key (`pki renew`), so it keeps the fingerprint;
/// offices pin each other's with `policy.secure_peers`. `None` if `cert_der` is no certificate.
pub fn key_fingerprint(cert_der: &[u8]) -> Option<String> {
    use std::fmt::Write as _;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    Some(out)
}

/// The identity and key fingerprint of the first certificate in a PEM file: what another
/// office pins in `policy.secure_peers` (`fedstat-node fingerprint`).
pub fn certificate_pin(cert_pem: &Path) -> Result<(PeerIdentity, String)> {
    let unreadable = || {
        Error::Pki(format!(
            "{} is not a readable PEM certificate file",
            cert_pem.display()
        ))
    };
    let cert = CertificateDer::pem_file_iter(cert_pem)
        .map_err(|_| unreadable())?
        .next()
        .ok_or_else(unreadable)?
        .map_err(|_| unreadable())?;
    let id = identity_from_cert_der(cert.as_ref())?;
    let print = key_fingerprint(cert.as_ref()).ok_or_else(unreadable)?;
    Ok((id, print))
}

/// The uncompressed point of a certificate's ECDSA P-256 key, if that is its key.
fn p256_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let spki = cert.public_key();
    let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
    (spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY && curve == OID_EC_P256)
        .then(|| spki.subject_public_key.data.to_vec())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pki;

    use crate::test_ca::TestCa as Fed;

    impl Fed {
        fn signer(&self, role: Role, name: &str) -> Signer {
            let (cert, key) =
                pki::issue(&pki::CaDir::new(&self.dir), role, name, &self.dir, 30).expect("issue");
            Signer::load(&key, &cert).expect("signer")
        }

        fn verifier(&self, crl: bool) -> Verifier {
            let crl = crl.then(|| self.dir.join("crl.pem"));
            Verifier::load(&self.dir.join("ca.pem"), crl.as_deref()).expect("verifier")
        }
    }

    fn check(result: Result<()>, expected: Problem) {
        match result {
            Err(Error::Attest { problem, .. }) => assert_eq!(problem, expected),
            other => panic!("expected {expected:?}, got {other:?}"),
        }
    }

    const MSG: &[u8] = b"fedstat-secagg/keys/v1 ...";

    fn not_from_ca(result: &Result<()>) -> bool {
        matches!(
            result,
            Err(Error::Attest {
                problem: Problem::NotFromCa(_),
                ..
            })
        )
    }

    #[test]
    fn a_node_signature_verifies() {
        let fed = Fed::new("fed");
        let ons = fed.signer(Role::Node, "ons");
        assert_eq!(ons.identity().name, "ons");
        let sig = ons.sign(MSG).expect("sign");
        fed.verifier(true)
            .verify(ons.certificate_der(), "ons", MSG, &sig)
            .expect("verifies");
        fed.verifier(false)
            .verify(ons.certificate_der(), "ons", MSG, &sig)
            .expect("verifies without a crl");
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let fed = Fed::new("fed");
        let verifier = fed.verifier(true);
        let ons = fed.signer(Role::Node, "ons");
        let sig = ons.sign(MSG).expect("sign");

        // Another node's name.
        let err = verifier.verify(ons.certificate_der(), "destatis", MSG, &sig);
        check(err, Problem::WrongName("ons".into()));

        // A tampered message or signature.
        check(
            verifier.verify(ons.certificate_der(), "ons", b"fedstat-secagg/keys/v2 ...", &sig),
            Problem::BadSignature,
        );
        let mut bad = sig.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        check(
            verifier.verify(ons.certificate_der(), "ons", MSG, &bad),
            Problem::BadSignature,
        );

        // Someone else's certificate with ons's signature.
        let other = fed.signer(Role::Node, "other");
        check(
            verifier.verify(other.certificate_der(), "other", MSG, &sig),
            Problem::BadSignature,
        );

        // A researcher's certificate.
        let researcher = fed.signer(Role::Researcher, "alice");
        let sig = researcher.sign(MSG).expect("sign");
        check(
            verifier.verify(researcher.certificate_der(), "alice", MSG, &sig),
            Problem::WrongRole(Role::Researcher),
        );

        // A certificate of another CA, under the same name.
        let foreign = Fed::new("other").signer(Role::Node, "ons");
        let sig = foreign.sign(MSG).expect("sign");
        let err = verifier.verify(foreign.certificate_der(), "ons", MSG, &sig);
        assert!(not_from_ca(&err), "{err:?}");
        let text = err.expect_err("refused").to_string();
        assert!(
            text.contains("`ons`") && text.contains("not from the federation CA"),
            "{text}"
        );

        // Expired: verified as of a date after its 30 days.
        let later = UnixTime::since_unix_epoch(Duration::from_secs(UnixTime::now().as_secs() + 40 * 86_400));
        let sig = ons.sign(MSG).expect("sign");
        check(
            verifier.verify_at(ons.certificate_der(), "ons", MSG, &sig, later),
            Problem::OutsideValidity,
        );

        // Garbage.
        let err = verifier.verify(b"not a certificate", "ons", MSG, &sig);
        assert!(not_from_ca(&err), "{err:?}");
    }

    #[test]
    fn a_revoked_certificate_is_refused() {
        let fed = Fed::new("fed");
        let ons = fed.signer(Role::Node, "ons");
        let sig = ons.sign(MSG).expect("sign");
        pki::revoke(&pki::CaDir::new(&fed.dir), "ons", None).expect("revoke");
        check(
            fed.verifier(true).verify(ons.certificate_der(), "ons", MSG, &sig),
            Problem::Revoked,
        );
        // Without the list the revocation is unknown.
        fed.verifier(false)
            .verify(ons.certificate_der(), "ons", MSG, &sig)
            .expect("no crl given");
    }

    #[test]
    fn a_key_must_belong_to_its_certificate() {
        let fed = Fed::new("fed");
        let ca = pki::CaDir::new(&fed.dir);
        let (cert, _) = pki::issue(&ca, Role::Node, "ons", &fed.dir, 30).expect("issue");
        let (_, other_key) = pki::issue(&ca, Role::Node, "other", &fed.dir, 30).expect("issue");
        let err = Signer::load(&other_key, &cert).expect_err("mismatch");
        assert!(
            err.to_string().contains("does not belong to the certificate"),
            "{err}"
        );
        let err = Signer::load(&cert, &cert).expect_err("a certificate is not a key");
        assert!(err.to_string().contains("ons.pem"), "{err}");
    }

    #[test]
    fn the_key_fingerprint_is_the_sha256_of_the_public_key_and_survives_renewal() {
        let fed = Fed::new("fed");
        let ca = pki::CaDir::new(&fed.dir);
        let (cert, key) = pki::issue(&ca, Role::Node, "ons", &fed.dir, 30).expect("issue");
        let der = |path: &std::path::Path| {
            CertificateDer::from_pem_file(path)
                .expect("cert")
                .as_ref()
                .to_vec()
        };
        let printed = key_fingerprint(&der(&cert)).expect("fingerprint");

        // The same digest, computed from the private key's own public half.
        let pem = std::fs::read_to_string(&key).expect("key");
        use rcgen::PublicKeyData as _;
        let spki = rcgen::KeyPair::from_pem(&pem)
            .expect("key pair")
            .subject_public_key_info();
        let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(printed, format!("sha256:{hex}"));

        // A renewal keeps it; another key does not.
        let renewed_dir = fed.dir.join("renewed");
        std::fs::create_dir_all(&renewed_dir).expect("dir");
        let (renewed, _) = pki::renew(&ca, &cert, &renewed_dir, 60).expect("renew");
        assert_ne!(der(&renewed), der(&cert));
        assert_eq!(key_fingerprint(&der(&renewed)).as_deref(), Some(printed.as_str()));
        let (other, _) = pki::issue(&ca, Role::Node, "other", &fed.dir, 30).expect("issue");
        assert_ne!(key_fingerprint(&der(&other)).as_deref(), Some(printed.as_str()));
        assert_eq!(key_fingerprint(b"not a certificate"), None);
    }
}
