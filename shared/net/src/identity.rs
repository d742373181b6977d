//! Who a peer is: the role and name a federation certificate carries (subject OU and CN).
//!
//! The certificate is the only source of identity: a peer never gets to claim a name on the
//! wire, so everything the coordinator logs or authorises keys on what the CA signed.

use std::fmt;

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use fedstat_proto::Role;

/// Longest accepted name; also the X.520 upper bound for a CN, so every name fits a certificate.
pub const MAX_NAME_LEN: usize = 64;

/// A verified peer: role and name as signed by the federation CA.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`", self.role, self.name)
    }
}

/// Check a party name: 1..=64 characters of `[A-Za-z0-9._-]`, so names are safe in file
/// names, log lines and DNS SANs alike.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Error::Identity(format!(
            "name must be 1 to {MAX_NAME_LEN} characters long, got {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::Identity(format!(
            "name `{}` contains {c:?}: only letters, digits, `.`, `_` and `-` are allowed",
            printable(name)
        )));
    }
    if name == "." || name == ".." {
        // Would escape the output directory when used as a file stem.
        return Err(Error::Identity(format!("name `{name}` is reserved")));
    }
    Ok(())
}

/// Read the fedstat identity from a DER certificate: subject CN is the name, subject OU the
/// role. Certificates from another CA (bring-your-own) must carry both to be usable.
pub fn identity_from_cert_der(der: &[u8]) -> Result<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Identity(format!("certificate is not valid DER X.509: {e}")))?;
    let subject = cert.subject();

    let mut names = subject.iter_common_name();
    let name = match (names.next(), names.next()) {
        (Some(cn), None) => cn
            .as_str()
            .map_err(|_| Error::Identity("subject CN is not a text string".into()))?,
        (None, _) => {
            return Err(missing(
                "no subject CN (common name), which must hold the party name",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(missing(
                "several subject CNs; exactly one must hold the party name",
            ))
        }
    };
    validate_name(name).map_err(|e| match e {
        Error::Identity(p) => Error::Identity(format!("subject CN: {p}")),
        other => other,
    })?;

    // Other OUs are tolerated (an office's own CA may add its department), but exactly one
    // role must be named, or two roles could be claimed by one certificate.
    let mut role = None;
    for ou in subject.iter_organizational_unit() {
        let Ok(text) = ou.as_str() else { continue };
        if let Ok(r) = text.parse::<Role>() {
            if role.is_some_and(|prev| prev != r) {
                return Err(missing("subject OU names more than one role"));
            }
            role = Some(r);
        }
    }
    let role =
        role.ok_or_else(|| missing("no subject OU naming a role (node, researcher, admin or coordinator)"))?;

    Ok(PeerIdentity {
        role,
        name: name.to_owned(),
    })
}

/// The identity of the peer of an established quinn connection (mutual TLS is mandatory, so
/// a missing certificate means a misconfigured endpoint, not an anonymous peer).
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| Error::Identity("peer presented no certificate".into()))?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| Error::Identity("peer identity is not an X.509 certificate chain".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| Error::Identity("peer presented an empty certificate chain".into()))?;
    identity_from_cert_der(leaf)
}

/// The identity of a peer from the certificate chain its TLS session presented (leaf first).
pub fn identity_from_chain(chain: Option<&[CertificateDer<'static>]>) -> Result<PeerIdentity> {
    let leaf = chain
        .ok_or_else(|| Error::Identity("peer presented no certificate".into()))?
        .first()
        .ok_or_else(|| Error::Identity("peer presented an empty certificate chain".into()))?;
    identity_from_cert_der(leaf)
}

/// The serial number of a DER certificate (big-endian bytes, as in a CRL).
pub fn cert_serial(der: &[u8]) -> Result<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| Error::Identity("not a DER X.509 certificate".into()))?;
    Ok(cert.raw_serial().to_vec())
}

/// The serial number of the peer's leaf certificate.
pub fn peer_serial(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    cert_serial(chain.first()?).ok()
}

fn missing(problem: &str) -> Error {
    Error::Identity(format!(
        "certificate has {problem}; certificates not issued by `fedstat-coordinator pki issue` \
         must carry subject CN=<name> and OU=<role>"
    ))
}

/// Shorten and sanitise untrusted text before it goes into an error message.
fn printable(s: &str) -> String {
    s.chars()
        .take(MAX_NAME_LEN)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_round_trips_through_text() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>().expect("parse"), role);
        }
        assert!("Node".parse::<Role>().is_err());
        assert!("".parse::<Role>().is_err());
    }

    #[test]
    fn display_names_role_and_name() {
        let id = PeerIdentity {
            role: Role::Node,
            name: "ons".into(),
        };
        assert_eq!(id.to_string(), "node `ons`");
    }

    #[test]
    fn names_are_checked() {
        fn check(name: &str, ok: bool) {
            assert_eq!(validate_name(name).is_ok(), ok, "{name:?}");
        }
        check("ons", true);
        check("statistik-austria_2.at", true);
        check(&"a".repeat(64), true);
        check(&"a".repeat(65), false);
        check("", false);
        check("a b", false);
        check("a/b", false);
        check("é", false);
        check("..", false);
        check(".", false);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let err = identity_from_cert_der(b"not a certificate").expect_err("must fail");
        assert!(err.to_string().contains("not valid DER"), "{err}");
    }
}
