//! A fleet's own certificate authority (`cloudlet pki init|issue`).
//!
//! A fleet directory holds the CA: `ca.pem` (its certificate, given to
//! everything that must trust the fleet: cloudlets, the CLI, devices) and
//! `ca.key` (its private key, 0600, needed only to issue). Each issued
//! certificate, `NAME.pem` with `NAME.key` (0600), names the hosts it
//! serves (DNS names and IP addresses as subject alternative names) and is
//! good both as a server's (its API, the registry, the directory) and as a
//! client's (a cloudlet calling a peer in a handoff: mutual TLS). Keys are
//! ECDSA P-256; certificates are valid from an hour before they are made
//! (clock skew) for `days`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::secrets;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{} exists: not overwritten (certificates issued from it would be lost)", .0.display())]
    Exists(PathBuf),
    #[error("Cannot read {}: {detail}", path.display())]
    Read { path: PathBuf, detail: String },
    #[error("Cannot write {}: {detail}", path.display())]
    Write { path: PathBuf, detail: String },
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    #[error("{0}")]
    Invalid(String),
    #[error("Cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The files of a fleet CA in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), PkiError> {
    let r = if private {
        secrets::write_private(path, text)
    } else {
        std::fs::write(path, text)
    };
    r.map_err(|e| PkiError::Write {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Make a fleet CA named `name` in `dir` (created if missing); its
/// certificate's path.
pub fn init(dir: &Path, name: &str, days: u32) -> Result<PathBuf, PkiError> {
    let (cert_path, key_path) = ca_paths(dir);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| PkiError::Write {
        path: dir.to_path_buf(),
        detail: e.to_string(),
    })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} fleet CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

/// What [`issue`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub hosts: Vec<String>,
}

/// Issue a certificate for `name` serving `hosts` (DNS names or IP
/// addresses; `name` itself when empty) from the CA in `ca_dir`, written
/// to `out_dir/NAME.pem` and `out_dir/NAME.key`.
pub fn issue(
    ca_dir: &Path,
    name: &str,
    hosts: &[String],
    out_dir: &Path,
    days: u32,
) -> Result<Issued, PkiError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(PkiError::Invalid(format!(
            "certificate name {name:?}: letters, digits, '.', '_' or '-'"
        )));
    }
    let (ca_cert_path, ca_key_path) = ca_paths(ca_dir);
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| PkiError::Read {
            path: p.to_path_buf(),
            detail: format!("{e} (make the CA first: cloudlet pki init)"),
        })
    };
    let ca_pem = read(&ca_cert_path)?;
    let ca_key_pem = read(&ca_key_path)?;
    secrets::check_private(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let hosts: Vec<String> = if hosts.is_empty() {
        vec![name.to_string()]
    } else {
        hosts.to_vec()
    };
    let mut params = CertificateParams::new(hosts.clone())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out_dir).map_err(|e| PkiError::Write {
        path: out_dir.to_path_buf(),
        detail: e.to_string(),
    })?;
    let issued = Issued {
        cert: out_dir.join(format!("{name}.pem")),
        key: out_dir.join(format!("{name}.key")),
        hosts,
    };
    write(&issued.key, &key.serialize_pem(), true)?;
    write(&issued.cert, &cert.pem(), false)?;
    Ok(issued)
}
