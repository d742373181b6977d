//! The federation's small certificate authority: create the CA and the coordinator's server
//! certificate, and issue role certificates to nodes, researchers and admins.
//!
//! Layout of a PKI directory: `ca.pem`, `ca.key` (the CA; the key never leaves this machine),
//! `coordinator.pem`, `coordinator.key`. Keys are ECDSA P-256 PKCS#8, written with mode 0600.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber,
};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::identity::{validate_name, Role};
use crate::{Error, Result};

/// Default lifetime of an issued certificate (the CA/Browser Forum's old maximum; long enough
/// for a statistical programme, short enough that lost keys age out).
pub const DEFAULT_CERT_DAYS: u32 = 825;
/// Lifetime of the CA certificate.
const CA_DAYS: u32 = 3650;
/// Tolerated clock skew between the CA machine and the peers.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// File names inside a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const COORDINATOR_NAME: &str = "coordinator";

/// Create `dir/ca.pem`, `dir/ca.key`, `dir/coordinator.pem` and `dir/coordinator.key`.
/// `federation` goes into every subject O; `sans` are the DNS names and IP addresses nodes
/// use to reach the coordinator. Refuses to overwrite an existing CA.
pub fn init(dir: &Path, federation: &str, sans: &[String]) -> Result<()> {
    validate_federation(federation)?;
    if sans.is_empty() {
        return Err(Error::Pki(
            "the coordinator certificate needs at least one DNS name or IP address that nodes \
             connect to (e.g. localhost, 127.0.0.1, stats.example.org)"
                .into(),
        ));
    }
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    for path in [&ca_cert_path, &ca_key_path] {
        if path.exists() {
            return Err(Error::Pki(format!(
                "{} already exists: refusing to overwrite an existing CA (every certificate it \
                 issued would stop working); choose another directory or remove it deliberately",
                path.display()
            )));
        }
    }
    fs::create_dir_all(dir).map_err(|e| Error::io("cannot create directory", dir, e))?;

    let ca_key = KeyPair::generate().map_err(|e| rcgen_err("cannot generate the CA key", e))?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = dn(&format!("{federation} fedstat CA"), None, federation);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca_params, CA_DAYS);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| rcgen_err("cannot create the CA certificate", e))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let sans_params = CertificateParams::new(sans.to_vec())
        .map_err(|e| rcgen_err("invalid coordinator DNS name or IP address", e))?;
    let (cert_pem, key_pem) = leaf(
        &issuer,
        Role::Coordinator,
        COORDINATOR_NAME,
        federation,
        DEFAULT_CERT_DAYS,
        sans_params,
    )?;

    // The coordinator files first: if writing fails half-way, no CA exists yet and init can
    // simply be re-run.
    write_file(
        &dir.join(format!("{COORDINATOR_NAME}.pem")),
        cert_pem.as_bytes(),
        false,
    )?;
    write_file(
        &dir.join(format!("{COORDINATOR_NAME}.key")),
        key_pem.as_bytes(),
        true,
    )?;
    write_file(&ca_key_path, issuer.key().serialize_pem().as_bytes(), true)?;
    write_file(&ca_cert_path, ca_cert.pem().as_bytes(), false)?;
    write_crl(dir, &issuer, &[])?;
    tracing::info!(dir = %dir.display(), federation, "created federation CA and coordinator certificate");
    Ok(())
}

/// Issue a certificate and key for `role`/`name`, signed by the CA in `dir`: writes
/// `out_dir/NAME.pem` and `out_dir/NAME.key` (0600) and returns their paths. A coordinator
/// certificate gets `name` as its DNS name. Refuses to overwrite existing files.
pub fn issue(dir: &Path, role: Role, name: &str, out_dir: &Path, days: u32) -> Result<(PathBuf, PathBuf)> {
    validate_name(name)?;
    if days == 0 {
        return Err(Error::Pki("certificate validity must be at least 1 day".into()));
    }
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(Error::Pki(format!(
                "{} already exists: refusing to overwrite it; remove it first to re-issue `{name}`",
                path.display()
            )));
        }
    }
    let (issuer, federation) = load_ca(dir)?;
    let params = if role == Role::Coordinator {
        CertificateParams::new(vec![name.to_owned()])
            .map_err(|e| rcgen_err("invalid coordinator DNS name", e))?
    } else {
        CertificateParams::default()
    };
    let (cert_pem, key_pem) = leaf(&issuer, role, name, &federation, days, params)?;

    fs::create_dir_all(out_dir).map_err(|e| Error::io("cannot create directory", out_dir, e))?;
    write_file(&key_path, key_pem.as_bytes(), true)?;
    write_file(&cert_path, cert_pem.as_bytes(), false)?;
    tracing::info!(%role, name, days, path = %cert_path.display(), "issued certificate");
    Ok((cert_path, key_path))
}

/// Load the CA's signing key and subject; returns the federation name from its subject O.
fn load_ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, String)> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert_pem = fs::read_to_string(&cert_path).map_err(|e| Error::io("cannot read", &cert_path, e))?;
    let key_pem = fs::read_to_string(&key_path).map_err(|e| Error::io("cannot read", &key_path, e))?;

    let key = KeyPair::from_pem(&key_pem).map_err(|_| {
        Error::Pki(format!(
            "{} is not a PKCS#8 PEM private key (as written by `pki init`)",
            key_path.display()
        ))
    })?;
    let not_pem = || Error::Pki(format!("{} is not a PEM CA certificate", cert_path.display()));
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| not_pem())?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|_| not_pem())?;

    // A mismatched pair would issue certificates that no peer can verify; catch it here.
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(Error::Pki(format!(
            "{} does not belong to {}: the CA key and certificate do not match",
            key_path.display(),
            cert_path.display()
        )));
    }
    let federation = x509
        .subject()
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::Pki(format!(
                "{} has no subject O (federation name)",
                cert_path.display()
            ))
        })?;
    let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|_| not_pem())?;
    Ok((issuer, federation))
}

/// Make a leaf certificate for `role`/`name`; `params` carries the SANs, if any.
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    role: Role,
    name: &str,
    federation: &str,
    days: u32,
    mut params: CertificateParams,
) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(|e| rcgen_err("cannot generate a key", e))?;
    params.distinguished_name = dn(name, Some(role), federation);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Only the coordinator may serve: webpki refuses a client-only EKU in a server certificate,
    // so a stolen node key cannot impersonate the coordinator.
    params.extended_key_usages = match role {
        Role::Coordinator => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Node | Role::Researcher | Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, days);
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|e| rcgen_err("cannot sign the certificate", e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn dn(common_name: &str, role: Option<Role>, federation: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, federation);
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.as_str());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + DAY * days).into();
}

fn validate_federation(federation: &str) -> Result<()> {
    if federation.trim().is_empty()
        || federation.chars().count() > 64
        || federation.chars().any(char::is_control)
    {
        return Err(Error::Pki(
            "federation name must be 1 to 64 printable characters (it becomes the subject O)".into(),
        ));
    }
    Ok(())
}

fn rcgen_err(what: &str, e: rcgen::Error) -> Error {
    Error::Pki(format!("{what}: {e}"))
}

/// Write via a temporary file and rename, so a crash never leaves a truncated key or
/// certificate; private files are created 0600 from the start, never chmod-ed afterwards.
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<()> {
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("cannot remove", &tmp, e)),
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 });
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(contents)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io("cannot write", &tmp, e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io("cannot write", path, e)
    })
}

/// The certificate revocation list `pki init` and `pki revoke` maintain beside the CA.
pub const CRL_FILE: &str = "crl.pem";
/// The revoked certificates, one per line: `serial-hex name revoked-at-unix-seconds`.
const REVOKED_FILE: &str = "revoked.txt";
/// How long a CRL claims to be current; re-run `pki revoke` or `pki crl` before it lapses.
const CRL_DAYS: u64 = 365;

/// Revoke the certificate `cert` (default `dir/NAME.pem`) of `name` and rewrite `dir/crl.pem`.
/// Load the new CRL into a running coordinator with SIGHUP. Returns the CRL's path.
pub fn revoke(dir: &Path, name: &str, cert: Option<&Path>) -> Result<PathBuf> {
    validate_name(name)?;
    let default = dir.join(format!("{name}.pem"));
    let cert_path = cert.unwrap_or(&default);
    let pem = fs::read(cert_path).map_err(|e| Error::io("cannot read", cert_path, e))?;
    let der = CertificateDer::from_pem_slice(&pem)
        .map_err(|_| Error::Pki(format!("{} is not a PEM certificate", cert_path.display())))?;
    let serial = crate::identity::cert_serial(&der)?;
    let (issuer, _) = load_ca(dir)?;
    let list_path = dir.join(REVOKED_FILE);
    let mut list = read_revoked(&list_path)?;
    if !list.iter().any(|(s, _)| *s == serial) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        list.push((serial, now));
        let mut text = fs::read_to_string(&list_path).unwrap_or_default();
        text.push_str(&format!(
            "{} {name} {now}\n",
            crate::manifest::hex(&list[list.len() - 1].0)
        ));
        write_file(&list_path, text.as_bytes(), false)?;
    }
    write_crl(dir, &issuer, &list)?;
    tracing::info!(name, "revoked certificate");
    Ok(dir.join(CRL_FILE))
}

fn read_revoked(path: &Path) -> Result<Vec<(Vec<u8>, u64)>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("cannot read", path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let bad = || {
                Error::Pki(format!(
                    "{} line {}: expected `serial name seconds`",
                    path.display(),
                    i + 1
                ))
            };
            let mut parts = line.split_whitespace();
            let serial = parts.next().ok_or_else(bad)?;
            let at = parts.nth(1).and_then(|t| t.parse().ok()).ok_or_else(bad)?;
            let bytes = (0..serial.len())
                .step_by(2)
                .map(|j| serial.get(j..j + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(bad)?;
            Ok((bytes, at))
        })
        .collect()
}

fn write_crl(dir: &Path, issuer: &Issuer<'_, KeyPair>, revoked: &[(Vec<u8>, u64)]) -> Result<()> {
    let now = SystemTime::now();
    let params = CertificateRevocationListParams {
        this_update: now.into(),
        next_update: (now + Duration::from_secs(CRL_DAYS * 86_400)).into(),
        crl_number: SerialNumber::from(revoked.len() as u64 + 1),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: (SystemTime::UNIX_EPOCH + Duration::from_secs(*at)).into(),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(issuer)
        .map_err(|e| rcgen_err("cannot sign the revocation list", e))?;
    let pem = crl
        .pem()
        .map_err(|e| rcgen_err("cannot encode the revocation list", e))?;
    write_file(&dir.join(CRL_FILE), pem.as_bytes(), false)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::identity::{identity_from_cert_der, PeerIdentity};

    fn sans() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into()]
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    fn identity_of(path: &Path) -> PeerIdentity {
        let der = CertificateDer::from_pem_file(path).expect("pem");
        identity_from_cert_der(&der).expect("identity")
    }

    #[test]
    fn init_then_issue_every_role() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        init(&dir, "Test Federation", &sans()).expect("init");
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(mode(&dir.join("coordinator.key")), 0o600);
        assert_eq!(
            identity_of(&dir.join("coordinator.pem")),
            PeerIdentity {
                role: Role::Coordinator,
                name: "coordinator".into()
            }
        );

        let out = tmp.path().join("issued");
        for (i, role) in Role::ALL.into_iter().enumerate() {
            let name = format!("party-{i}");
            let (cert, key) = issue(&dir, role, &name, &out, DEFAULT_CERT_DAYS).expect("issue");
            assert_eq!(cert, out.join(format!("{name}.pem")));
            assert_eq!(mode(&key), 0o600);
            assert_eq!(identity_of(&cert), PeerIdentity { role, name });

            let der = CertificateDer::from_pem_file(&cert).expect("pem");
            let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("x509");
            let org = x509.subject().iter_organization().next().expect("O");
            assert_eq!(org.as_str().expect("utf8"), "Test Federation");
        }
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(&out).expect("read_dir").count(), 8);
    }

    #[test]
    fn init_refuses_to_overwrite_a_ca() {
        let tmp = tempfile::tempdir().expect("tempdir");
        init(tmp.path(), "fed", &sans()).expect("init");
        let before = fs::read(tmp.path().join("ca.key")).expect("read");
        let err = init(tmp.path(), "fed", &sans()).expect_err("second init must fail");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(fs::read(tmp.path().join("ca.key")).expect("read"), before);
    }

    #[test]
    fn bad_input_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(init(tmp.path(), "fed", &[]).is_err());
        assert!(init(tmp.path(), "", &sans()).is_err());
        init(tmp.path(), "fed", &sans()).expect("init");
        for name in ["", "a b", "../x", "..", "ons/x", &"x".repeat(65)] {
            let err = issue(tmp.path(), Role::Node, name, tmp.path(), 10).expect_err(name);
            assert!(matches!(err, Error::Identity(_)), "{err}");
        }
        assert!(issue(tmp.path(), Role::Node, "ons", tmp.path(), 0).is_err());
        // `ca` would overwrite the CA itself.
        let err = issue(tmp.path(), Role::Node, "ca", tmp.path(), 10).expect_err("ca");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        issue(tmp.path(), Role::Node, "ons", tmp.path(), 10).expect("issue");
        assert!(issue(tmp.path(), Role::Node, "ons", tmp.path(), 10).is_err());
    }

    #[test]
    fn issue_without_a_ca_names_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = issue(tmp.path(), Role::Node, "ons", tmp.path(), 10).expect_err("no CA");
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn mismatched_ca_key_is_detected() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        init(&a, "fed", &sans()).expect("init a");
        init(&b, "fed", &sans()).expect("init b");
        fs::copy(b.join("ca.key"), a.join("ca.key")).expect("copy");
        let err = issue(&a, Role::Node, "ons", tmp.path(), 10).expect_err("mismatch");
        assert!(err.to_string().contains("do not match"), "{err}");
    }
}
