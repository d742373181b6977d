//! The federation's small certificate authority: create the CA and the coordinator's server
//! certificate, and issue role certificates to nodes, researchers and admins.
//!
//! Layout of a PKI directory: `ca.pem`, `ca.key` (the CA; the key never leaves this machine,
//! and may live in a separate folder kept offline, see [`CaDir`]), `coordinator.pem`,
//! `coordinator.key`, `crl.pem`. Keys are ECDSA P-256 PKCS#8, written with mode 0600.
//!
//! Two ways to give a party its certificate. In production the party makes its own key and a
//! certificate signing request ([`keygen`]), and the secretariat signs the request ([`sign`]),
//! deciding the role itself: private keys never travel. For demos and tests, [`issue`] makes
//! key and certificate in one step at the CA.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber,
};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use fedstat_core::files::{atomic_write, Access};

use crate::identity::{validate_name, PeerIdentity, Role};
use crate::{Error, Result};

/// Default lifetime of an issued certificate: about a year (397 days, the CA/Browser Forum's
/// current maximum), so a lost key ages out within a year; renew with `pki renew`, which keeps
/// the party's name, role and key.
pub const DEFAULT_CERT_DAYS: u32 = 397;
/// Lifetime of the CA certificate.
const CA_DAYS: u32 = 3650;
/// Tolerated clock skew between the CA machine and the peers.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// File names inside a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const COORDINATOR_NAME: &str = "coordinator";

/// Where a CA lives: certificate, CRL and revocation list in `dir`, the signing key in
/// `key_dir` (by default `dir`; a separate folder can stay on removable media or an offline
/// machine and be mounted only to sign).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaDir {
    pub dir: PathBuf,
    pub key_dir: PathBuf,
}

impl CaDir {
    /// A CA whose key sits beside its certificate.
    pub fn new(dir: &Path) -> CaDir {
        CaDir {
            dir: dir.to_owned(),
            key_dir: dir.to_owned(),
        }
    }

    /// Take the CA key from `key_dir` instead, when given.
    pub fn with_key_dir(mut self, key_dir: Option<&Path>) -> CaDir {
        if let Some(k) = key_dir {
            k.clone_into(&mut self.key_dir);
        }
        self
    }

    /// The CA key's path.
    pub fn key_path(&self) -> PathBuf {
        self.key_dir.join(CA_KEY_FILE)
    }
}

/// Create `dir/ca.pem`, the CA key (`key_dir/ca.key`), `dir/coordinator.pem` and
/// `dir/coordinator.key`. `federation` goes into every subject O; `sans` are the DNS names and
/// IP addresses nodes use to reach the coordinator. Refuses to overwrite an existing CA.
pub fn init(ca: &CaDir, federation: &str, sans: &[String]) -> Result<()> {
    let dir = ca.dir.as_path();
    validate_federation(federation)?;
    if sans.is_empty() {
        return Err(Error::Pki(
            "the coordinator certificate needs at least one DNS name or IP address that nodes \
             connect to (e.g. localhost, 127.0.0.1, stats.example.org)"
                .into(),
        ));
    }
    let ca_cert_path = dir.join(CA_CERT_FILE);
    let ca_key_path = ca.key_path();
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
    fs::create_dir_all(&ca.key_dir).map_err(|e| Error::io("cannot create directory", &ca.key_dir, e))?;

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
    let key = KeyPair::generate().map_err(|e| rcgen_err("cannot generate a key", e))?;
    let params = leaf_params(
        Role::Coordinator,
        COORDINATOR_NAME,
        federation,
        DEFAULT_CERT_DAYS,
        sans_params,
    );
    let cert_pem = params
        .signed_by(&key, &issuer)
        .map_err(|e| rcgen_err("cannot sign the certificate", e))?
        .pem();
    let key_pem = key.serialize_pem();

    // The coordinator files first: if writing fails half-way, no CA exists yet and init can
    // simply be re-run.
    atomic_write(
        &dir.join(format!("{COORDINATOR_NAME}.pem")),
        cert_pem.as_bytes(),
        Access::Public,
    )?;
    atomic_write(
        &dir.join(format!("{COORDINATOR_NAME}.key")),
        key_pem.as_bytes(),
        Access::OwnerOnly,
    )?;
    atomic_write(
        &ca_key_path,
        issuer.key().serialize_pem().as_bytes(),
        Access::OwnerOnly,
    )?;
    atomic_write(&ca_cert_path, ca_cert.pem().as_bytes(), Access::Public)?;
    write_crl(dir, &issuer, &[])?;
    tracing::info!(dir = %dir.display(), federation, "created federation CA and coordinator certificate");
    Ok(())
}

/// Issue a certificate and key for `role`/`name`, signed by the CA: writes
/// `out_dir/NAME.pem` and `out_dir/NAME.key` (0600) and returns their paths. A coordinator
/// certificate gets `name` as its DNS name. Refuses to overwrite existing files.
///
/// The key is made at the CA, so it has to travel to its owner: for demos and tests. In
/// production use [`keygen`] at the party and [`sign`] at the CA.
pub fn issue(ca: &CaDir, role: Role, name: &str, out_dir: &Path, days: u32) -> Result<(PathBuf, PathBuf)> {
    validate_name(name)?;
    check_days(days)?;
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    refuse_existing(&[&cert_path, &key_path], name)?;
    let (issuer, federation) = load_ca(ca)?;
    let params = if role == Role::Coordinator {
        CertificateParams::new(vec![name.to_owned()])
            .map_err(|e| rcgen_err("invalid coordinator DNS name", e))?
    } else {
        CertificateParams::default()
    };
    let key = KeyPair::generate().map_err(|e| rcgen_err("cannot generate a key", e))?;
    let cert = leaf_params(role, name, &federation, days, params)
        .signed_by(&key, &issuer)
        .map_err(|e| rcgen_err("cannot sign the certificate", e))?;

    fs::create_dir_all(out_dir).map_err(|e| Error::io("cannot create directory", out_dir, e))?;
    atomic_write(&key_path, key.serialize_pem().as_bytes(), Access::OwnerOnly)?;
    atomic_write(&cert_path, cert.pem().as_bytes(), Access::Public)?;
    tracing::info!(%role, name, days, path = %cert_path.display(), "issued certificate");
    Ok((cert_path, key_path))
}

/// Largest certificate signing request read from a file (a P-256 CSR is under 1 KiB).
const MAX_CSR_BYTES: u64 = 64 << 10;

/// At the party: make a key pair and a certificate signing request for `name`. Writes
/// `out_dir/NAME.key` (0600, never leaves this machine) and `out_dir/NAME.csr` (send it to
/// the secretariat); returns their paths. The request carries only the name: the role is the
/// secretariat's decision. Refuses to overwrite existing files.
pub fn keygen(name: &str, out_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    validate_name(name)?;
    let key_path = out_dir.join(format!("{name}.key"));
    let csr_path = out_dir.join(format!("{name}.csr"));
    refuse_existing(&[&key_path, &csr_path], name)?;
    let key = KeyPair::generate().map_err(|e| rcgen_err("cannot generate a key", e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| rcgen_err("cannot make the certificate signing request", e))?;
    let csr_pem = csr
        .pem()
        .map_err(|e| rcgen_err("cannot encode the certificate signing request", e))?;
    fs::create_dir_all(out_dir).map_err(|e| Error::io("cannot create directory", out_dir, e))?;
    atomic_write(&key_path, key.serialize_pem().as_bytes(), Access::OwnerOnly)?;
    atomic_write(&csr_path, csr_pem.as_bytes(), Access::Public)?;
    tracing::info!(name, path = %csr_path.display(), "made a key and a certificate signing request");
    Ok((key_path, csr_path))
}

/// At the CA: sign the certificate signing request in `csr` as `role`. The name comes from the
/// request's subject CN; everything else in the request (other subject fields, extensions,
/// SANs) is ignored, so a party cannot ask for more than the secretariat grants. The
/// request's signature is checked (the party holds the key). Writes `out_dir/NAME.pem` and
/// returns its path and the identity it certifies. Coordinator certificates come from
/// [`init`] only.
pub fn sign(
    ca: &CaDir,
    csr: &Path,
    role: Role,
    out_dir: &Path,
    days: u32,
) -> Result<(PathBuf, PeerIdentity)> {
    use rustls_pki_types::CertificateSigningRequestDer;
    use x509_parser::prelude::FromDer;

    check_days(days)?;
    if role == Role::Coordinator {
        return Err(Error::Pki(
            "coordinator certificates are made by `pki init` (they need the coordinator's host \
             names); sign requests as node, researcher or admin"
                .into(),
        ));
    }
    let size = fs::metadata(csr)
        .map_err(|e| Error::io("cannot read", csr, e))?
        .len();
    if size > MAX_CSR_BYTES {
        return Err(fedstat_proto::Error::TooLarge {
            what: "certificate signing request file",
            size,
            limit: MAX_CSR_BYTES,
        }
        .into());
    }
    let pem = fs::read(csr).map_err(|e| Error::io("cannot read", csr, e))?;
    let not_csr = |problem: &str| {
        Error::Pki(format!(
            "{} is not a usable certificate signing request: {problem}; make one with \
             `fedstat-node keygen` or `fedstat keygen`",
            csr.display()
        ))
    };
    let der = CertificateSigningRequestDer::from_pem_slice(&pem)
        .map_err(|_| not_csr("no `-----BEGIN CERTIFICATE REQUEST-----` block"))?;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|_| not_csr("not DER PKCS#10"))?;
    let mut cns = parsed.certification_request_info.subject.iter_common_name();
    let name = match (cns.next(), cns.next()) {
        (Some(cn), None) => cn
            .as_str()
            .map_err(|_| not_csr("the subject CN is not text"))?
            .to_owned(),
        _ => return Err(not_csr("the subject must hold exactly one CN, the party's name")),
    };
    validate_name(&name).map_err(|e| not_csr(&format!("subject CN: {e}")))?;
    // Checks the request's self-signature: whoever sent it holds the private key.
    let request =
        rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| not_csr(&format!("{e}")))?;

    let cert_path = out_dir.join(format!("{name}.pem"));
    refuse_existing(&[&cert_path], &name)?;
    let (issuer, federation) = load_ca(ca)?;
    let request = rcgen::CertificateSigningRequestParams {
        params: leaf_params(role, &name, &federation, days, CertificateParams::default()),
        public_key: request.public_key,
    };
    let cert = request
        .signed_by(&issuer)
        .map_err(|e| rcgen_err("cannot sign the certificate", e))?;
    fs::create_dir_all(out_dir).map_err(|e| Error::io("cannot create directory", out_dir, e))?;
    atomic_write(&cert_path, cert.pem().as_bytes(), Access::Public)?;
    tracing::info!(%role, name, days, path = %cert_path.display(), "signed certificate request");
    Ok((cert_path, PeerIdentity { role, name }))
}

fn check_days(days: u32) -> Result<()> {
    if days == 0 {
        return Err(Error::Pki("certificate validity must be at least 1 day".into()));
    }
    Ok(())
}

fn refuse_existing(paths: &[&Path], name: &str) -> Result<()> {
    for path in paths {
        if path.exists() {
            return Err(Error::Pki(format!(
                "{} already exists: refusing to overwrite it; remove it first to re-issue `{name}`",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Load the CA's signing key and subject; returns the federation name from its subject O.
fn load_ca(ca: &CaDir) -> Result<(Issuer<'static, KeyPair>, String)> {
    let cert_path = ca.dir.join(CA_CERT_FILE);
    let key_path = ca.key_path();
    let cert_pem = fs::read_to_string(&cert_path).map_err(|e| Error::io("cannot read", &cert_path, e))?;
    fedstat_core::files::check_private_key(&key_path)?;
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

/// The parameters of a leaf certificate for `role`/`name`; `params` carries the SANs, if any.
fn leaf_params(
    role: Role,
    name: &str,
    federation: &str,
    days: u32,
    mut params: CertificateParams,
) -> CertificateParams {
    params.distinguished_name = dn(name, Some(role), federation);
    // A random 127-bit serial (RFC 5280 asks for unpredictable serials). rcgen's default
    // derives it from the public key, which a renewal keeps: revoking one certificate of a
    // key would then revoke all of them.
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
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
    params
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

/// The certificate revocation list `pki init` and `pki revoke` maintain beside the CA.
pub const CRL_FILE: &str = "crl.pem";
/// The revoked certificates, one per line: `serial-hex name revoked-at-unix-seconds`.
const REVOKED_FILE: &str = "revoked.txt";
/// How long a CRL claims to be current; `pki crl` re-signs it (so does `pki revoke`). Peers
/// warn from [`CRL_WARN_DAYS`] before it lapses.
pub const CRL_DAYS: u64 = 90;
/// Peers loading a CRL warn when its next update is closer than this.
pub const CRL_WARN_DAYS: i64 = 30;

/// Re-sign `dir/crl.pem` with the current revocations and a fresh next-update date. Returns its
/// path.
pub fn refresh_crl(ca: &CaDir) -> Result<PathBuf> {
    let (issuer, _) = load_ca(ca)?;
    let list = read_revoked(&ca.dir.join(REVOKED_FILE))?;
    write_crl(&ca.dir, &issuer, &list)?;
    Ok(ca.dir.join(CRL_FILE))
}

/// Re-sign the certificate in `cert` for another `days`: same name, role, public key (and, for
/// the coordinator, the same DNS names and addresses), new serial and validity. Writes
/// `out_dir/NAME.pem` (replacing it: the party keeps its key and only swaps the certificate)
/// and returns its path and identity. The old certificate stays valid until it expires unless
/// revoked.
pub fn renew(ca: &CaDir, cert: &Path, out_dir: &Path, days: u32) -> Result<(PathBuf, PeerIdentity)> {
    check_days(days)?;
    let pem = fs::read(cert).map_err(|e| Error::io("cannot read", cert, e))?;
    let not_cert = |problem: String| Error::Pki(format!("{}: {problem}", cert.display()));
    let der = CertificateDer::from_pem_slice(&pem).map_err(|_| not_cert("not a PEM certificate".into()))?;
    let who = crate::identity::identity_from_cert_der(&der).map_err(|e| not_cert(e.to_string()))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| not_cert(e.to_string()))?;
    let (issuer, federation) = load_ca(ca)?;
    let ca_pem = fs::read(ca.dir.join(CA_CERT_FILE))
        .map_err(|e| Error::io("cannot read", ca.dir.join(CA_CERT_FILE), e))?;
    let ca_der = CertificateDer::from_pem_slice(&ca_pem)
        .map_err(|_| not_cert("the CA certificate is not PEM".into()))?;
    let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| not_cert(e.to_string()))?;
    if x509.issuer() != ca_x509.subject() {
        return Err(not_cert(
            "was not issued by this federation's CA; renew it where it was issued".into(),
        ));
    }
    let key = rcgen::SubjectPublicKeyInfo::from_der(x509.public_key().raw)
        .map_err(|e| not_cert(format!("unusable public key: {e}")))?;
    let mut sans = Vec::new();
    if who.role == Role::Coordinator {
        use x509_parser::extensions::GeneralName;
        let names = x509
            .subject_alternative_name()
            .map_err(|e| not_cert(format!("cannot read its names: {e}")))?;
        for name in names.iter().flat_map(|n| n.value.general_names.iter()) {
            match name {
                GeneralName::DNSName(dns) => sans.push((*dns).to_owned()),
                GeneralName::IPAddress(&[a, b, c, d]) => {
                    sans.push(std::net::IpAddr::from([a, b, c, d]).to_string())
                }
                GeneralName::IPAddress(bytes) => {
                    if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        sans.push(std::net::IpAddr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let params =
        CertificateParams::new(sans).map_err(|e| not_cert(format!("cannot reuse its names: {e}")))?;
    let renewed = leaf_params(who.role, &who.name, &federation, days, params)
        .signed_by(&key, &issuer)
        .map_err(|e| rcgen_err("cannot sign the certificate", e))?;
    fs::create_dir_all(out_dir).map_err(|e| Error::io("cannot create directory", out_dir, e))?;
    let path = out_dir.join(format!("{}.pem", who.name));
    atomic_write(&path, renewed.pem().as_bytes(), Access::Public)?;
    tracing::info!(%who, days, path = %path.display(), "renewed certificate");
    Ok((path, who))
}

/// Revoke the certificate `cert` (default `dir/NAME.pem`) of `name` and rewrite `dir/crl.pem`.
/// Load the new CRL into a running coordinator with SIGHUP. Returns the CRL's path.
pub fn revoke(ca: &CaDir, name: &str, cert: Option<&Path>) -> Result<PathBuf> {
    let dir = ca.dir.as_path();
    validate_name(name)?;
    let default = dir.join(format!("{name}.pem"));
    let cert_path = cert.unwrap_or(&default);
    let pem = fs::read(cert_path).map_err(|e| Error::io("cannot read", cert_path, e))?;
    let der = CertificateDer::from_pem_slice(&pem)
        .map_err(|_| Error::Pki(format!("{} is not a PEM certificate", cert_path.display())))?;
    let serial = crate::identity::cert_serial(&der)?;
    let (issuer, _) = load_ca(ca)?;
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
            fedstat_proto::manifest::hex(&list[list.len() - 1].0)
        ));
        atomic_write(&list_path, text.as_bytes(), Access::Public)?;
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
    Ok(atomic_write(&dir.join(CRL_FILE), pem.as_bytes(), Access::Public)?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::identity::identity_from_cert_der;

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
        init(&CaDir::new(&dir), "Test Federation", &sans()).expect("init");
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
            let (cert, key) = issue(&CaDir::new(&dir), role, &name, &out, DEFAULT_CERT_DAYS).expect("issue");
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
        init(&CaDir::new(tmp.path()), "fed", &sans()).expect("init");
        let before = fs::read(tmp.path().join("ca.key")).expect("read");
        let err = init(&CaDir::new(tmp.path()), "fed", &sans()).expect_err("second init must fail");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(fs::read(tmp.path().join("ca.key")).expect("read"), before);
    }

    #[test]
    fn bad_input_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(init(&CaDir::new(tmp.path()), "fed", &[]).is_err());
        assert!(init(&CaDir::new(tmp.path()), "", &sans()).is_err());
        init(&CaDir::new(tmp.path()), "fed", &sans()).expect("init");
        for name in ["", "a b", "../x", "..", "ons/x", &"x".repeat(65)] {
            let err = issue(&CaDir::new(tmp.path()), Role::Node, name, tmp.path(), 10).expect_err(name);
            assert!(matches!(err, Error::Identity(_)), "{err}");
        }
        assert!(issue(&CaDir::new(tmp.path()), Role::Node, "ons", tmp.path(), 0).is_err());
        // `ca` would overwrite the CA itself.
        let err = issue(&CaDir::new(tmp.path()), Role::Node, "ca", tmp.path(), 10).expect_err("ca");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        issue(&CaDir::new(tmp.path()), Role::Node, "ons", tmp.path(), 10).expect("issue");
        assert!(issue(&CaDir::new(tmp.path()), Role::Node, "ons", tmp.path(), 10).is_err());
    }

    #[test]
    fn issue_without_a_ca_names_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = issue(&CaDir::new(tmp.path()), Role::Node, "ons", tmp.path(), 10).expect_err("no CA");
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn mismatched_ca_key_is_detected() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        init(&CaDir::new(&a), "fed", &sans()).expect("init a");
        init(&CaDir::new(&b), "fed", &sans()).expect("init b");
        fs::copy(b.join("ca.key"), a.join("ca.key")).expect("copy");
        let err = issue(&CaDir::new(&a), Role::Node, "ons", tmp.path(), 10).expect_err("mismatch");
        assert!(err.to_string().contains("do not match"), "{err}");
    }

    #[test]
    fn a_signed_request_keeps_the_key_at_the_party_and_the_role_at_the_ca() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = CaDir::new(&tmp.path().join("pki")).with_key_dir(Some(&tmp.path().join("offline")));
        init(&ca, "fed", &sans()).expect("init");
        assert!(
            !ca.dir.join("ca.key").exists(),
            "the CA key must be in the offline folder"
        );
        assert_eq!(mode(&ca.key_path()), 0o600);

        let party = tmp.path().join("at-ons");
        let (key, csr) = keygen("ons", &party).expect("keygen");
        assert_eq!(mode(&key), 0o600);
        assert!(keygen("ons", &party).is_err(), "keygen must not overwrite a key");

        let out = tmp.path().join("signed");
        let (cert, id) = sign(&ca, &csr, Role::Researcher, &out, 30).expect("sign");
        assert_eq!(
            id,
            PeerIdentity {
                role: Role::Researcher,
                name: "ons".into()
            }
        );
        assert_eq!(identity_of(&cert), id);
        assert_eq!(
            fs::read_dir(&out).expect("read_dir").count(),
            1,
            "only the certificate is written"
        );
        // The certificate is for the party's own key, and chains to the CA.
        let files = crate::tls::TlsFiles {
            ca_cert: ca.dir.join("ca.pem"),
            cert,
            key,
        };
        crate::tls::client_config(&files).expect("usable with the party's key");

        // Without the offline key folder, nothing can be signed.
        let err =
            sign(&CaDir::new(&ca.dir), &csr, Role::Node, &tmp.path().join("x"), 30).expect_err("no key");
        assert!(err.to_string().contains("ca.key"), "{err}");
        // Revocation takes the key from the offline folder too.
        revoke(&ca, "ons", Some(&files.cert)).expect("revoke");
    }

    #[test]
    fn requests_that_are_not_ours_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = CaDir::new(tmp.path());
        init(&ca, "fed", &sans()).expect("init");
        let out = tmp.path().join("out");
        let check = |text: &[u8], expected: &str| {
            let path = tmp.path().join("req.csr");
            fs::write(&path, text).expect("write");
            let err = sign(&ca, &path, Role::Node, &out, 30)
                .expect_err(expected)
                .to_string();
            assert!(err.contains(expected), "{err}");
        };
        check(b"hello", "no `-----BEGIN CERTIFICATE REQUEST-----` block");
        // A request for a name that is not a party name.
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "../ca");
        let pem = params.serialize_request(&key).expect("csr").pem().expect("pem");
        check(pem.as_bytes(), "subject CN");
        // A tampered request (signature no longer matches).
        let (_, csr) = keygen("ons", &tmp.path().join("k")).expect("keygen");
        let pem = fs::read_to_string(&csr).expect("read");
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).expect("der");
        let mut bytes = der.as_ref().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = rcgen::CertificateSigningRequestParams::from_der(&bytes.into());
        assert!(tampered.is_err(), "rcgen must check the request's signature");
        // Coordinator certificates are not signed from requests, and no role escalation by CSR.
        let err = sign(&ca, &csr, Role::Coordinator, &out, 30).expect_err("coordinator");
        assert!(err.to_string().contains("pki init"), "{err}");
        // Too large a file is not read.
        check(&vec![b'x'; 100 << 10], "exceeds the limit");
    }

    #[test]
    fn renewal_keeps_name_role_key_and_names() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = CaDir::new(tmp.path());
        init(&ca, "fed", &sans()).expect("init");
        let (cert, key) = issue(&ca, Role::Node, "ons", tmp.path(), 1).expect("issue");
        let serial = |p: &Path| {
            crate::identity::cert_serial(&CertificateDer::from_pem_file(p).expect("pem")).expect("serial")
        };
        let old_serial = serial(&cert);
        let (renewed, who) = renew(&ca, &cert, tmp.path(), 30).expect("renew");
        assert_eq!(renewed, cert);
        assert_eq!(
            who,
            PeerIdentity {
                role: Role::Node,
                name: "ons".into()
            }
        );
        assert_ne!(serial(&cert), old_serial);
        let files = crate::tls::TlsFiles {
            ca_cert: tmp.path().join("ca.pem"),
            cert,
            key,
        };
        crate::tls::client_config(&files).expect("the old key fits the renewed certificate");

        // The coordinator keeps the names nodes dial.
        let coordinator = tmp.path().join("coordinator.pem");
        renew(&ca, &coordinator, tmp.path(), 30).expect("renew coordinator");
        let files = crate::tls::TlsFiles {
            ca_cert: tmp.path().join("ca.pem"),
            cert: coordinator,
            key: tmp.path().join("coordinator.key"),
        };
        crate::tls::server_config(&files).expect("still serves localhost");

        // Not from this CA: refused.
        let other = tempfile::tempdir().expect("tempdir");
        init(&CaDir::new(other.path()), "other", &sans()).expect("init");
        let err = renew(&ca, &other.path().join("coordinator.pem"), tmp.path(), 30).expect_err("foreign");
        assert!(
            err.to_string().contains("not issued by this federation's CA"),
            "{err}"
        );
        refresh_crl(&ca).expect("refresh");
    }
}
