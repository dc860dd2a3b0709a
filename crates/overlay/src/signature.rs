//! Signed overlays (format version 2): who made an overlay, and until when
//! it may be used, proven before any payload byte is fetched.
//!
//! A signature is an Ed25519 signature over a statement that names the
//! overlay's manifest by its hash. The manifest holds the base id, the app's
//! metadata, the image hashes of the launch disk and memory and the hash of
//! every segment, so the statement covers every byte of the overlay; a
//! reader that fetched the header and the manifest (and, in between, the
//! signature block) can judge the whole overlay before it fetches any
//! segment. Signing rewrites only the header and inserts the block: the
//! manifest and the segments are the same bytes, so a signed overlay has
//! the same manifest hash as the unsigned one.
//!
//! # Signature block (bytes `128..manifest_offset` of a version 2 overlay)
//!
//! | size | field |
//! |---|---|
//! | 8 | magic `b"CLOVSIG\n"` |
//! | 2 | block version (`1`) |
//! | 2 | algorithm (`1` = Ed25519) |
//! | 2 | signer id length, then the signer id (1 to 128 bytes: letters, digits, `.`, `_`, `-`, `@`) |
//! | 32 | the signer's public key |
//! | 8 | signed at (Unix seconds) |
//! | 8 | expires at (Unix seconds; after it the overlay is refused) |
//! | 64 | the signature of the statement |
//!
//! # Statement (what is signed)
//!
//! ```text
//! "cloudlet-overlay signature v1\0"
//! u32 format version (2)
//! [32] manifest hash (BLAKE3 of the stored manifest, as in the header)
//! u16 len, app name      (empty for an overlay without an app)
//! u16 len, app version   (empty when the app names none)
//! u16 len, signer id
//! [32] public key
//! u64 signed at, u64 expires at
//! ```
//!
//! All integers little-endian. A [`SignaturePolicy`] says what a reader
//! accepts: a signed overlay must always verify against the key it names
//! and be unexpired; with trusted keys, that key must be one of them; when
//! signatures are required, an unsigned overlay is refused.

use std::fmt;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::RangeInclusive;
use std::path::Path;

use ed25519_dalek::{Signer, Verifier};

use crate::format::{FormatError, Hash, Header, HEADER_LEN, SIGNED_FORMAT_VERSION};
use crate::validate::{AppMetadata, ValidOverlay, Validation};

const MAGIC: [u8; 8] = *b"CLOVSIG\n";
const BLOCK_VERSION: u16 = 1;
const ED25519: u16 = 1;
const STATEMENT_TAG: &[u8] = b"cloudlet-overlay signature v1\0";
const MAX_SIGNER_LEN: usize = 128;
/// Fixed part of a block: magic, version, algorithm, signer length, key,
/// times, signature.
const FIXED_LEN: u64 = 8 + 2 + 2 + 2 + 32 + 8 + 8 + 64;
/// How long a signature block may be.
pub const BLOCK_LEN_RANGE: RangeInclusive<u64> = FIXED_LEN + 1..=FIXED_LEN + MAX_SIGNER_LEN as u64;

/// One overlay's signature, as its block holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub signer: String,
    pub public_key: [u8; 32],
    pub signed_at: u64,
    pub expires_at: u64,
    pub signature: [u8; 64],
}

/// Why a signer id cannot be one.
pub fn check_signer(signer: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@');
    if signer.is_empty() || signer.len() > MAX_SIGNER_LEN || !signer.chars().all(ok) {
        return Err(format!(
            "signer id {signer:?}: 1 to {MAX_SIGNER_LEN} letters, digits, '.', '_', '-' or '@'"
        ));
    }
    Ok(())
}

/// A short, stable name of a public key: the first 8 bytes of its BLAKE3
/// hash, in hex.
pub fn fingerprint(key: &[u8; 32]) -> String {
    hex::encode(&blake3::hash(key).as_bytes()[..8])
}

impl Signature {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_LEN as usize + self.signer.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&BLOCK_VERSION.to_le_bytes());
        b.extend_from_slice(&ED25519.to_le_bytes());
        b.extend_from_slice(&(self.signer.len() as u16).to_le_bytes());
        b.extend_from_slice(self.signer.as_bytes());
        b.extend_from_slice(&self.public_key);
        b.extend_from_slice(&self.signed_at.to_le_bytes());
        b.extend_from_slice(&self.expires_at.to_le_bytes());
        b.extend_from_slice(&self.signature);
        b
    }

    /// Parses a whole block (exactly its bytes).
    pub fn parse(b: &[u8]) -> Result<Signature, FormatError> {
        let bad = |reason: String| FormatError::InvalidHeader {
            field: "signature block",
            reason,
        };
        if !BLOCK_LEN_RANGE.contains(&(b.len() as u64)) || b[..8] != MAGIC {
            return Err(bad(format!("{} bytes, not a signature block", b.len())));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if u16_at(8) != BLOCK_VERSION {
            return Err(bad(format!(
                "block version {} (this build reads 1)",
                u16_at(8)
            )));
        }
        if u16_at(10) != ED25519 {
            return Err(bad(format!(
                "algorithm {} (this build knows 1, Ed25519)",
                u16_at(10)
            )));
        }
        let n = u16_at(12) as usize;
        if b.len() as u64 != FIXED_LEN + n as u64 {
            return Err(bad(format!(
                "a signer id of {n} bytes in a block of {} bytes",
                b.len()
            )));
        }
        let signer = std::str::from_utf8(&b[14..14 + n])
            .map_err(|_| bad("the signer id is not UTF-8".into()))?
            .to_string();
        check_signer(&signer).map_err(bad)?;
        let o = 14 + n;
        Ok(Signature {
            signer,
            public_key: b[o..o + 32].try_into().expect("32 bytes"),
            signed_at: u64_at(o + 32),
            expires_at: u64_at(o + 40),
            signature: b[o + 48..o + 112].try_into().expect("64 bytes"),
        })
    }

    /// The block's length in bytes.
    pub fn len(&self) -> u64 {
        FIXED_LEN + self.signer.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public_key)
    }

    /// Whether the signature is the one its key made over this overlay's
    /// statement (tampering with the manifest, the app, the times or the
    /// signer breaks it).
    pub fn verifies(&self, manifest_hash: &Hash, app: Option<&AppMetadata>) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.public_key) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&self.signature);
        let msg = statement(
            manifest_hash,
            app,
            &self.signer,
            &self.public_key,
            self.signed_at,
            self.expires_at,
        );
        key.verify(&msg, &sig).is_ok()
    }
}

/// The bytes a signature signs (see the module's documentation).
pub fn statement(
    manifest_hash: &Hash,
    app: Option<&AppMetadata>,
    signer: &str,
    public_key: &[u8; 32],
    signed_at: u64,
    expires_at: u64,
) -> Vec<u8> {
    let mut m = STATEMENT_TAG.to_vec();
    let field = |m: &mut Vec<u8>, s: &str| {
        m.extend_from_slice(&(s.len() as u16).to_le_bytes());
        m.extend_from_slice(s.as_bytes());
    };
    m.extend_from_slice(&SIGNED_FORMAT_VERSION.to_le_bytes());
    m.extend_from_slice(manifest_hash);
    field(&mut m, app.map_or("", |a| a.name.as_str()));
    field(&mut m, app.and_then(|a| a.version.as_deref()).unwrap_or(""));
    field(&mut m, signer);
    m.extend_from_slice(public_key);
    m.extend_from_slice(&signed_at.to_le_bytes());
    m.extend_from_slice(&expires_at.to_le_bytes());
    m
}

/// Sign overlay `v` as `signer` with `key`, valid from `signed_at` to
/// `expires_at` (Unix seconds).
pub fn sign(
    v: &ValidOverlay,
    key: &ed25519_dalek::SigningKey,
    signer: &str,
    signed_at: u64,
    expires_at: u64,
) -> Signature {
    let public_key = key.verifying_key().to_bytes();
    let msg = statement(
        &v.header.manifest_hash,
        v.app.as_ref(),
        signer,
        &public_key,
        signed_at,
        expires_at,
    );
    Signature {
        signer: signer.to_string(),
        public_key,
        signed_at,
        expires_at,
        signature: key.sign(&msg).to_bytes(),
    }
}

/// A key a reader trusts: the one line of a public key file,
/// `cloudlet-ed25519 SIGNER HEX` (what `cloudlet overlay keygen` writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub signer: String,
    pub public_key: [u8; 32],
}

const KEY_LINE_TAG: &str = "cloudlet-ed25519";

impl std::str::FromStr for TrustedKey {
    type Err = String;
    fn from_str(s: &str) -> Result<TrustedKey, String> {
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [KEY_LINE_TAG, signer, key] = parts[..] else {
            return Err(format!(
                "{s:?}: a trusted key is one line `{KEY_LINE_TAG} SIGNER HEX` (a .pub file of `cloudlet overlay keygen`)"
            ));
        };
        check_signer(signer)?;
        let bytes = hex::decode(key).map_err(|e| format!("{s:?}: the key is not hex: {e}"))?;
        let public_key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| format!("{s:?}: an Ed25519 public key is 32 bytes"))?;
        ed25519_dalek::VerifyingKey::from_bytes(&public_key)
            .map_err(|_| format!("{s:?}: not an Ed25519 public key"))?;
        Ok(TrustedKey {
            signer: signer.to_string(),
            public_key,
        })
    }
}

impl fmt::Display for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{KEY_LINE_TAG} {} {}",
            self.signer,
            hex::encode(self.public_key)
        )
    }
}

impl serde::Serialize for TrustedKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TrustedKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TrustedKey, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a reader accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignaturePolicy {
    /// Refuse unsigned overlays.
    pub required: bool,
    /// When not empty, only these keys' signatures are accepted.
    pub trusted: Vec<TrustedKey>,
}

/// Why an overlay's signature is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "Unsigned overlay: this reader requires overlays signed by one of its trusted keys ({0})"
    )]
    Unsigned(String),
    #[error("Bad signature by {signer} (key {fingerprint}): the overlay or its signature was changed after signing")]
    BadSignature { signer: String, fingerprint: String },
    #[error("Signed by an unknown key: {signer} (key {fingerprint}) is not among the trusted keys ({trusted})")]
    UnknownKey {
        signer: String,
        fingerprint: String,
        trusted: String,
    },
    #[error(
        "Expired signature: signed by {signer}, valid until {}, now is {}", utc(*.expires_at), utc(*.now)
    )]
    Expired {
        signer: String,
        expires_at: u64,
        now: u64,
    },
}

impl SignaturePolicy {
    fn trusted_names(&self) -> String {
        if self.trusted.is_empty() {
            return "none configured".into();
        }
        self.trusted
            .iter()
            .map(|k| format!("{} {}", k.signer, fingerprint(&k.public_key)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Judge overlay `v` at Unix time `now`: its signature, if it is
    /// accepted (or `None` for an accepted unsigned overlay).
    pub fn check<'a>(
        &self,
        v: &'a ValidOverlay,
        now: u64,
    ) -> Result<Option<&'a Signature>, SignatureError> {
        let Some(sig) = &v.signature else {
            if self.required {
                return Err(SignatureError::Unsigned(self.trusted_names()));
            }
            return Ok(None);
        };
        if !sig.verifies(&v.header.manifest_hash, v.app.as_ref()) {
            return Err(SignatureError::BadSignature {
                signer: sig.signer.clone(),
                fingerprint: sig.fingerprint(),
            });
        }
        let known = self
            .trusted
            .iter()
            .any(|k| k.public_key == sig.public_key && k.signer == sig.signer);
        if !self.trusted.is_empty() && !known {
            return Err(SignatureError::UnknownKey {
                signer: sig.signer.clone(),
                fingerprint: sig.fingerprint(),
                trusted: self.trusted_names(),
            });
        }
        if sig.expires_at <= now {
            return Err(SignatureError::Expired {
                signer: sig.signer.clone(),
                expires_at: sig.expires_at,
                now,
            });
        }
        Ok(Some(sig))
    }
}

/// Unix time `secs` as a UTC date and time, `2026-12-03 20:05:00 UTC`.
pub fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why an overlay could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignOverlayError {
    #[error(transparent)]
    Invalid(#[from] crate::validate::ValidateOverlayError),
    #[error("{0}")]
    Signer(String),
    #[error("Writing {path}: {detail}")]
    Write { path: String, detail: String },
}

/// Sign the overlay file `input` (checked whole first) and write the
/// signed overlay to `output` (through a temporary file beside it, so that
/// `output` may be `input`): the header of version 2, the block, then the
/// same manifest and segments. A signature `input` already has is replaced.
pub fn sign_file(
    input: &Path,
    output: &Path,
    key: &ed25519_dalek::SigningKey,
    signer: &str,
    signed_at: u64,
    expires_at: u64,
) -> Result<Signature, SignOverlayError> {
    check_signer(signer).map_err(SignOverlayError::Signer)?;
    let v = Validation::full().check_file(input)?;
    let sig = sign(&v, key, signer, signed_at, expires_at);
    let write_err = |e: std::io::Error| SignOverlayError::Write {
        path: output.display().to_string(),
        detail: e.to_string(),
    };
    let block = sig.encode();
    let old = &v.header;
    let rest = old.file_len - old.manifest_offset;
    let header = Header {
        format_version: SIGNED_FORMAT_VERSION,
        manifest_offset: HEADER_LEN as u64 + block.len() as u64,
        file_len: HEADER_LEN as u64 + block.len() as u64 + rest,
        ..old.clone()
    };
    let tmp = output.with_extension("signing");
    let result = (|| {
        let mut src = std::fs::File::open(input)?;
        src.seek(SeekFrom::Start(old.manifest_offset))?;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        out.write_all(&header.encode())?;
        out.write_all(&block)?;
        let copied = std::io::copy(&mut src.take(rest), &mut out)?;
        if copied != rest {
            return Err(std::io::Error::other(
                "the overlay changed while it was signed",
            ));
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, output)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    Ok(sig)
}
