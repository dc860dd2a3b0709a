//! Explaining an overlay without its base, and verifying it against one.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::apply::{self, ApplyOverlayError};
use crate::codec::Codec;
use crate::format::{
    self, chunk_count, ChunkKind, ChunkSource, Image, Manifest, SegmentCodec, SegmentKind,
    Transform,
};
use crate::validate::{ValidOverlay, ValidateOverlayError, Validation};

/// Chunks and logical bytes of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KindStats {
    pub chunks: u64,
    pub bytes: u64,
}

impl KindStats {
    fn add(&mut self, bytes: u64) {
        self.chunks += 1;
        self.bytes += bytes;
    }
}

/// Changed chunks by how they are rebuilt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ChunkStats {
    pub zero: KindStats,
    pub ref_base_disk: KindStats,
    pub ref_base_mem: KindStats,
    pub ref_self: KindStats,
    /// Payload stored as XOR with the base chunk.
    pub delta: KindStats,
    /// Payload stored as is.
    pub literal: KindStats,
}

/// Counts the chunks of a manifest by kind.
pub fn chunk_stats(m: &Manifest) -> ChunkStats {
    let mut s = ChunkStats::default();
    for e in &m.entries {
        let len = m.chunk_len(e.image, e.index) as u64;
        match e.kind {
            ChunkKind::Zero => s.zero.add(len),
            ChunkKind::Ref { source, .. } => match source {
                ChunkSource::BaseDisk => s.ref_base_disk.add(len),
                ChunkSource::BaseMem => s.ref_base_mem.add(len),
                ChunkSource::LaunchDisk | ChunkSource::LaunchMem => s.ref_self.add(len),
            },
            ChunkKind::Payload { transform, .. } => match transform {
                Transform::Xor => s.delta.add(len),
                Transform::Literal => s.literal.add(len),
            },
        }
    }
    s
}

/// What an overlay holds, read from its header and manifest only.
#[derive(Debug, Clone, Serialize)]
pub struct OverlayInfo {
    pub format_version: u32,
    pub base_id: String,
    /// App metadata length, and the metadata itself when it is UTF-8 text.
    pub metadata_len: u64,
    pub metadata_text: Option<String>,
    /// The raw app metadata.
    #[serde(skip)]
    pub metadata: Vec<u8>,
    pub chunk_size: u32,
    pub base_disk_size: u64,
    pub base_mem_size: u64,
    pub disk_size: u64,
    pub mem_size: u64,
    pub file_len: u64,
    pub manifest_len: u64,
    pub manifest_raw_len: u64,
    /// Codec create used, if known.
    pub codec: Option<Codec>,
    pub segments: usize,
    /// (codec, segments, stored bytes, raw bytes) for chunk segments.
    pub segment_codecs: Vec<(SegmentCodec, usize, u64, u64)>,
    pub device_state_len: u64,
    pub device_state_stored_len: u64,
    /// Changed chunks per image.
    pub changed_disk_chunks: u64,
    pub changed_mem_chunks: u64,
    pub chunks: ChunkStats,
    pub launch_hash: String,
    pub base_disk_hash: String,
    pub base_mem_hash: String,
    /// Its signature, if signed (set by [`inspect`] and [`verify`]).
    pub signature: Option<SignatureInfo>,
}

/// An overlay's signature, as inspect tells it.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureInfo {
    pub signer: String,
    /// The key's line as a reader trusts it (`cloudlet-ed25519 SIGNER HEX`).
    pub public_key: String,
    pub fingerprint: String,
    /// Unix seconds.
    pub signed_at: u64,
    pub expires_at: u64,
    /// The signature is the one its key made over this overlay.
    pub verifies: bool,
}

impl SignatureInfo {
    pub fn of(v: &ValidOverlay) -> Option<SignatureInfo> {
        let s = v.signature.as_ref()?;
        Some(SignatureInfo {
            signer: s.signer.clone(),
            public_key: crate::signature::TrustedKey {
                signer: s.signer.clone(),
                public_key: s.public_key,
            }
            .to_string(),
            fingerprint: s.fingerprint(),
            signed_at: s.signed_at,
            expires_at: s.expires_at,
            verifies: s.verifies(&v.header.manifest_hash, v.app.as_ref()),
        })
    }
}

/// Why an overlay could not be inspected: it is unreadable or not valid
/// ([`Validation::full`]).
pub type InspectOverlayError = ValidateOverlayError;

/// Validates the overlay at `path` ([`Validation::full`]: structure, length
/// and every segment's hash, no base needed) and explains it.
pub fn inspect(path: &Path) -> Result<OverlayInfo, InspectOverlayError> {
    let v = Validation::full().check_file(path)?;
    Ok(OverlayInfo {
        signature: SignatureInfo::of(&v),
        ..info(&v.header, &v.manifest)
    })
}

/// Explains a parsed header and manifest.
pub fn info(header: &format::Header, m: &Manifest) -> OverlayInfo {
    let mut segment_codecs: Vec<(SegmentCodec, usize, u64, u64)> = Vec::new();
    for s in m.segments.iter().filter(|s| s.kind == SegmentKind::Chunks) {
        match segment_codecs.iter_mut().find(|c| c.0 == s.codec) {
            Some(c) => {
                c.1 += 1;
                c.2 += s.stored_len;
                c.3 += s.raw_len as u64;
            }
            None => segment_codecs.push((s.codec, 1, s.stored_len, s.raw_len as u64)),
        }
    }
    let ds = &m.segments[m.device_state_segment as usize];
    OverlayInfo {
        format_version: header.format_version,
        base_id: m.base_id.clone(),
        metadata_len: m.metadata.len() as u64,
        metadata_text: String::from_utf8(m.metadata.clone()).ok(),
        metadata: m.metadata.clone(),
        chunk_size: m.chunk_size,
        base_disk_size: m.base_disk_size,
        base_mem_size: m.base_mem_size,
        disk_size: m.disk_size,
        mem_size: m.mem_size,
        file_len: header.file_len,
        manifest_len: header.manifest_len,
        manifest_raw_len: header.manifest_raw_len,
        codec: Codec::from_id(m.codec_id, m.codec_level),
        segments: m.segments.len(),
        segment_codecs,
        device_state_len: ds.raw_len as u64,
        device_state_stored_len: ds.stored_len,
        changed_disk_chunks: m.entries.iter().filter(|e| e.image == Image::Disk).count() as u64,
        changed_mem_chunks: m.entries.iter().filter(|e| e.image == Image::Mem).count() as u64,
        chunks: chunk_stats(m),
        launch_hash: hex::encode(m.launch_hash),
        base_disk_hash: hex::encode(m.base_disk_hash),
        base_mem_hash: hex::encode(m.base_mem_hash),
        signature: None,
    }
}

impl fmt::Display for OverlayInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "format version   {}", self.format_version)?;
        writeln!(f, "base id          {}", self.base_id)?;
        match (&self.metadata_text, self.metadata_len) {
            (_, 0) => writeln!(f, "app metadata     none")?,
            (Some(t), _) => writeln!(f, "app metadata     {t}")?,
            (None, n) => writeln!(f, "app metadata     {n} bytes (binary)")?,
        }
        match &self.signature {
            None => writeln!(f, "signature        none (unsigned)")?,
            Some(s) => writeln!(
                f,
                "signature        {} by {} (key {}), signed {}, expires {}\n                 {}",
                if s.verifies { "valid" } else { "BAD" },
                s.signer,
                s.fingerprint,
                crate::signature::utc(s.signed_at),
                crate::signature::utc(s.expires_at),
                s.public_key
            )?,
        }
        writeln!(f, "chunk size       {}", self.chunk_size)?;
        writeln!(
            f,
            "disk             {} bytes (base {})",
            self.disk_size, self.base_disk_size
        )?;
        writeln!(
            f,
            "memory           {} bytes (base {})",
            self.mem_size, self.base_mem_size
        )?;
        writeln!(
            f,
            "overlay          {} bytes, manifest {} ({} raw)",
            self.file_len, self.manifest_len, self.manifest_raw_len
        )?;
        writeln!(f, "codec            {:?}", self.codec)?;
        writeln!(
            f,
            "device state     {} bytes ({} stored)",
            self.device_state_len, self.device_state_stored_len
        )?;
        writeln!(
            f,
            "changed chunks   disk {}, memory {}",
            self.changed_disk_chunks, self.changed_mem_chunks
        )?;
        let c = &self.chunks;
        for (name, k) in [
            ("zero", c.zero),
            ("ref base disk", c.ref_base_disk),
            ("ref base memory", c.ref_base_mem),
            ("ref self", c.ref_self),
            ("delta (xor)", c.delta),
            ("literal", c.literal),
        ] {
            writeln!(
                f,
                "  {name:<15}{:>10} chunks {:>14} bytes",
                k.chunks, k.bytes
            )?;
        }
        for (codec, n, stored, raw) in &self.segment_codecs {
            writeln!(
                f,
                "segments {codec:?}: {n}, {stored} bytes stored, {raw} raw"
            )?;
        }
        writeln!(f, "launch hash      {}", self.launch_hash)
    }
}

/// Why an overlay failed verification.
#[derive(Debug, thiserror::Error)]
pub enum VerifyOverlayError {
    #[error(transparent)]
    Invalid(#[from] ValidateOverlayError),
    #[error("Base {image} image is not the overlay's base (image hash mismatch)")]
    BaseMismatch { image: Image },
    #[error("Cannot read base {image} image {}", path.display())]
    ReadBase {
        image: Image,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Overlay(#[from] ApplyOverlayError),
}

/// The paths of a base VM.
#[derive(Debug, Clone)]
pub struct BaseImages {
    /// The base's id: when given, the overlay must name it.
    pub id: Option<String>,
    pub disk: PathBuf,
    pub mem: PathBuf,
}

/// Checks everything: the overlay's validity ([`Validation::full`], for
/// the base `base.id`), that the base images are the overlay's base, every
/// chunk and the launch-state hash. Writes nothing. Returns what inspect
/// returns.
pub fn verify(path: &Path, base: &BaseImages) -> Result<OverlayInfo, VerifyOverlayError> {
    let mut check = Validation::full();
    if let Some(id) = &base.id {
        check = check.base(id.clone());
    }
    let v = check.check_file(path)?;
    let signature = SignatureInfo::of(&v);
    let ValidOverlay {
        header, manifest, ..
    } = v;
    for (image, p, size, expected) in [
        (
            Image::Disk,
            &base.disk,
            manifest.base_disk_size,
            manifest.base_disk_hash,
        ),
        (
            Image::Mem,
            &base.mem,
            manifest.base_mem_size,
            manifest.base_mem_hash,
        ),
    ] {
        let h = base_image_hash(p, size, manifest.chunk_size).map_err(|source| {
            VerifyOverlayError::ReadBase {
                image,
                path: p.clone(),
                source,
            }
        })?;
        if h != Some(expected) {
            return Err(VerifyOverlayError::BaseMismatch { image });
        }
    }
    apply::verify_against_base(path, &base.disk, &base.mem)?;
    Ok(OverlayInfo {
        signature,
        ..info(&header, &manifest)
    })
}

/// Image hash of a file, or None when its size is not `size`.
fn base_image_hash(path: &Path, size: u64, cs: u32) -> io::Result<Option<format::Hash>> {
    let file = File::open(path)?;
    if file.metadata()?.len() != size {
        return Ok(None);
    }
    let n = chunk_count(size, cs) as usize;
    const BLOCK: usize = 256;
    let mut hashes = vec![[0u8; 32]; n];
    hashes.par_chunks_mut(BLOCK).enumerate().try_for_each_init(
        || vec![0u8; BLOCK * cs as usize],
        |buf, (b, hs)| {
            let start = (b * BLOCK) as u64 * cs as u64;
            let len = ((size - start) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..len], start)?;
            for (i, h) in hs.iter_mut().enumerate() {
                let c = &buf[i * cs as usize..((i + 1) * cs as usize).min(len)];
                *h = *blake3::hash(c).as_bytes();
            }
            Ok::<_, io::Error>(())
        },
    )?;
    Ok(Some(format::image_hash(size, cs, &hashes)))
}
