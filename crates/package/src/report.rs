//! What took the space in an overlay: changed chunks by image and kind, with
//! the stored bytes they cost.

use cloudlet_overlay::format::{ChunkKind, ChunkSource, SegmentKind, Transform};
use cloudlet_overlay::{Image, Manifest};
use serde::Serialize;

/// One kind of changed chunk in one image (or the device state).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contributor {
    /// `disk`, `memory` or `device state`.
    pub image: &'static str,
    /// `zero`, `ref base disk`, `ref base memory`, `ref self`, `delta (xor)`,
    /// `literal`, or `state`.
    pub kind: &'static str,
    pub chunks: u64,
    /// Logical bytes (what the chunks hold once rebuilt).
    pub bytes: u64,
    /// Bytes of the overlay file they cost: their share of the compressed
    /// segments they sit in, plus their share of the manifest.
    pub stored_bytes: u64,
}

const KINDS: [&str; 6] = [
    "zero",
    "ref base disk",
    "ref base memory",
    "ref self",
    "delta (xor)",
    "literal",
];

fn kind_index(kind: &ChunkKind) -> usize {
    match kind {
        ChunkKind::Zero => 0,
        ChunkKind::Ref { source, .. } => match source {
            ChunkSource::BaseDisk => 1,
            ChunkSource::BaseMem => 2,
            ChunkSource::LaunchDisk | ChunkSource::LaunchMem => 3,
        },
        ChunkKind::Payload { transform, .. } => match transform {
            Transform::Xor => 4,
            Transform::Literal => 5,
        },
    }
}

/// Encoded manifest bytes of one entry (see `cloudlet_overlay::format`).
fn entry_raw_len(kind: &ChunkKind) -> f64 {
    match kind {
        ChunkKind::Zero => 10.0,
        ChunkKind::Ref { .. } => 51.0,
        ChunkKind::Payload { .. } => 51.0,
    }
}

/// Changed chunks by image and kind, biggest stored cost first; empty kinds
/// are left out.
pub fn contributors(m: &Manifest) -> Vec<Contributor> {
    // [image][kind] -> (chunks, bytes, stored)
    let mut acc = [[(0u64, 0u64, 0f64); 6]; 2];
    // Per segment: raw bytes, to apportion its stored bytes.
    let manifest_stored = m.data_offset.saturating_sub(128) as f64;
    let manifest_raw: f64 = m.entries.iter().map(|e| entry_raw_len(&e.kind)).sum();
    let per_entry = if manifest_raw > 0.0 {
        // Entries make most of the manifest; the fixed part is negligible.
        manifest_stored / manifest_raw
    } else {
        0.0
    };
    for e in &m.entries {
        let len = m.chunk_len(e.image, e.index) as u64;
        let k = kind_index(&e.kind);
        let slot = &mut acc[e.image as usize][k];
        slot.0 += 1;
        slot.1 += len;
        slot.2 += entry_raw_len(&e.kind) * per_entry;
        if let ChunkKind::Payload { segment, .. } = e.kind {
            if let Some(s) = m.segments.get(segment as usize) {
                if s.raw_len > 0 {
                    slot.2 += s.stored_len as f64 * len as f64 / s.raw_len as f64;
                }
            }
        }
    }
    let mut out = Vec::new();
    for (img, kinds) in [(Image::Disk, &acc[0]), (Image::Mem, &acc[1])] {
        for (k, &(chunks, bytes, stored)) in kinds.iter().enumerate() {
            if chunks > 0 {
                out.push(Contributor {
                    image: match img {
                        Image::Disk => "disk",
                        Image::Mem => "memory",
                    },
                    kind: KINDS[k],
                    chunks,
                    bytes,
                    stored_bytes: stored.round() as u64,
                });
            }
        }
    }
    if let Some(ds) = m
        .segments
        .iter()
        .find(|s| s.kind == SegmentKind::DeviceState)
    {
        out.push(Contributor {
            image: "device state",
            kind: "state",
            chunks: 1,
            bytes: ds.raw_len as u64,
            stored_bytes: ds.stored_len,
        });
    }
    out.sort_by(|a, b| {
        b.stored_bytes
            .cmp(&a.stored_bytes)
            .then(b.bytes.cmp(&a.bytes))
    });
    out
}
