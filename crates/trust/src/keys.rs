//! Signing keys of overlay developers (Ed25519).
//!
//! A key file (mode 0600, written by [`generate`], refused by [`load`] when
//! others may read it), version 1, three lines:
//!
//! ```text
//! cloudlet-ed25519-secret v1
//! signer SIGNER
//! secret HEX          (the 32-byte Ed25519 seed)
//! ```
//!
//! Its public half, `KEY.pub`, is the one line a reader trusts
//! ([`cloudlet_overlay::signature::TrustedKey`]): `cloudlet-ed25519 SIGNER
//! HEX`, pasted into a daemon's or a registry's `trusted_keys`.

use std::path::{Path, PathBuf};

use cloudlet_overlay::signature::{check_signer, TrustedKey};
use rand::RngCore;

use crate::secrets::{self, SecretError};

const TAG: &str = "cloudlet-ed25519-secret v1";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{} exists: not overwritten (a key in use would be lost)", .0.display())]
    Exists(PathBuf),
    #[error("Writing {}: {detail}", path.display())]
    Write { path: PathBuf, detail: String },
}

/// A developer's signing key, with the id it signs as.
pub struct SigningKey {
    pub signer: String,
    pub key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// The public half, as readers trust it.
    pub fn public(&self) -> TrustedKey {
        TrustedKey {
            signer: self.signer.clone(),
            public_key: self.key.verifying_key().to_bytes(),
        }
    }
}

/// Where the public half of key file `path` goes: `path` + `.pub`.
pub fn public_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// A new key for `signer`, written to `path` (0600, not over an existing
/// file) and its public half to `path.pub`.
pub fn generate(signer: &str, path: &Path) -> Result<SigningKey, KeyError> {
    check_signer(signer).map_err(|reason| KeyError::Invalid {
        path: path.to_path_buf(),
        reason,
    })?;
    if path.exists() {
        return Err(KeyError::Exists(path.to_path_buf()));
    }
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let k = SigningKey {
        signer: signer.to_string(),
        key: ed25519_dalek::SigningKey::from_bytes(&seed),
    };
    let write = |p: &Path, r: std::io::Result<()>| {
        r.map_err(|e| KeyError::Write {
            path: p.to_path_buf(),
            detail: e.to_string(),
        })
    };
    let text = format!("{TAG}\nsigner {signer}\nsecret {}\n", hex::encode(seed));
    write(path, secrets::write_private(path, &text))?;
    let public = public_path(path);
    write(
        &public,
        std::fs::write(&public, format!("{}\n", k.public())),
    )?;
    Ok(k)
}

/// The key in `path` (which must be private to its owner).
pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| SecretError::Read {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    secrets::check_private(path)?;
    let invalid = |reason: &str| KeyError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut lines = text.lines();
    if lines.next() != Some(TAG) {
        return Err(invalid(&format!(
            "not a signing key (its first line is not `{TAG}`)"
        )));
    }
    let signer = lines
        .next()
        .and_then(|l| l.strip_prefix("signer "))
        .ok_or_else(|| invalid("no `signer` line"))?
        .trim()
        .to_string();
    check_signer(&signer).map_err(|r| invalid(&r))?;
    let seed: [u8; 32] = lines
        .next()
        .and_then(|l| l.strip_prefix("secret "))
        .and_then(|h| hex::decode(h.trim()).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| invalid("no `secret` line of 64 hex digits"))?;
    Ok(SigningKey {
        signer,
        key: ed25519_dalek::SigningKey::from_bytes(&seed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_made_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("acme.key");
        let k = generate("acme", &p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let line = std::fs::read_to_string(public_path(&p)).unwrap();
        assert_eq!(line.trim().parse::<TrustedKey>().unwrap(), k.public());
        let again = load(&p).unwrap();
        assert_eq!(again.signer, "acme");
        assert_eq!(again.public(), k.public());
        assert!(matches!(generate("acme", &p), Err(KeyError::Exists(_))));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&p).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let junk = dir.path().join("junk");
        crate::secrets::write_private(&junk, "hello\n").unwrap();
        assert!(load(&junk)
            .err()
            .unwrap()
            .to_string()
            .contains("not a signing key"));
        assert!(generate("no spaces", &dir.path().join("x")).is_err());
    }
}
