//! Creating an overlay from a base VM and a launch VM.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::codec::{self, Codec};
use crate::format::{
    self, chunk_count, chunk_len, ChunkEntry, ChunkKind, ChunkSource, Hash, Header, Image,
    Manifest, SegmentCodec, SegmentInfo, SegmentKind, Transform, DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION, HEADER_LEN, MAX_DEVICE_STATE_LEN, MAX_SEGMENT_RAW_LEN,
};
use crate::fsutil::TempOutput;
use crate::inspect::{chunk_stats, ChunkStats};

/// Default decompressed size of a payload segment: large enough for zstd's
/// long-distance matching to find repeats across pages (8 MiB gave 5-15%
/// smaller overlays than 2 MiB on real app launch states), small enough to
/// stream.
pub const DEFAULT_SEGMENT_SIZE: u32 = 8 << 20;

/// What to build an overlay from.
#[derive(Debug, Clone)]
pub struct CreateConfig {
    /// Raw image of the base disk.
    pub base_disk: PathBuf,
    /// Raw RAM file of the base VM (file offset == guest physical address).
    pub base_mem: PathBuf,
    /// Raw image of the launch disk, at least as large as the base disk.
    pub launch_disk: PathBuf,
    /// Raw RAM file of the launch VM, as large as the base memory.
    pub launch_mem: PathBuf,
    /// Opaque device state (QEMU migration stream without RAM).
    pub device_state: Vec<u8>,
    /// Opaque identifier of the base VM.
    pub base_id: String,
    /// App metadata stored in the manifest (at most 64 KiB): empty, or JSON
    /// of [`crate::AppMetadata`] (the daemon's `cloudlet_api::AppInfo`);
    /// anything else is refused.
    pub metadata: Vec<u8>,
    /// Chunk codec.
    pub codec: Codec,
    /// Chunk size for disk and memory: a power of two, 512..=1 MiB.
    pub chunk_size: u32,
    /// Target decompressed size of one payload segment.
    pub segment_size: u32,
}

impl CreateConfig {
    /// A configuration with the default codec, chunk and segment sizes.
    pub fn new(
        base_disk: impl Into<PathBuf>,
        base_mem: impl Into<PathBuf>,
        launch_disk: impl Into<PathBuf>,
        launch_mem: impl Into<PathBuf>,
        device_state: Vec<u8>,
        base_id: impl Into<String>,
    ) -> CreateConfig {
        CreateConfig {
            base_disk: base_disk.into(),
            base_mem: base_mem.into(),
            launch_disk: launch_disk.into(),
            launch_mem: launch_mem.into(),
            device_state,
            base_id: base_id.into(),
            metadata: Vec::new(),
            codec: Codec::default(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            segment_size: DEFAULT_SEGMENT_SIZE,
        }
    }
}

/// Why an overlay could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateOverlayError {
    #[error("Cannot read {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Launch memory is {launch} bytes but base memory is {base} bytes")]
    MemSizeMismatch { base: u64, launch: u64 },
    #[error("Launch disk is {launch} bytes, smaller than the base disk ({base} bytes)")]
    DiskShrunk { base: u64, launch: u64 },
    #[error("Invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("Compression of segment {segment} failed")]
    Compress {
        segment: u32,
        #[source]
        source: io::Error,
    },
    #[error("Cannot write the overlay")]
    Write(#[source] io::Error),
}

/// What create produced.
#[derive(Debug, Clone, Serialize)]
pub struct OverlayStats {
    /// Chunks and bytes that differ from the base.
    pub changed_chunks: u64,
    pub changed_bytes: u64,
    /// Counts and bytes by chunk kind.
    pub chunks: ChunkStats,
    /// Payload bytes before and after compression.
    pub payload_raw_bytes: u64,
    pub payload_stored_bytes: u64,
    pub device_state_bytes: u64,
    pub device_state_stored_bytes: u64,
    pub manifest_bytes: u64,
    pub segments: u32,
    /// Size of the whole overlay file.
    pub overlay_bytes: u64,
    /// Hex launch-state hash.
    pub launch_hash: String,
    pub create_time: Duration,
}

/// Creates an overlay at `out`, atomically (temporary file, then rename).
pub fn create_overlay(
    config: &CreateConfig,
    out: &Path,
) -> Result<OverlayStats, CreateOverlayError> {
    let tmp = TempOutput::create(out).map_err(CreateOverlayError::Write)?;
    let mut w = BufWriter::with_capacity(1 << 20, &tmp.file);
    let stats = create_overlay_to_writer(config, &mut w)?;
    w.flush().map_err(CreateOverlayError::Write)?;
    drop(w);
    tmp.commit(false).map_err(CreateOverlayError::Write)?;
    Ok(stats)
}

/// A read-only memory map (empty files map to an empty slice).
struct Mapped {
    map: Option<memmap2::Mmap>,
}

impl Mapped {
    fn open(path: &Path) -> Result<Mapped, CreateOverlayError> {
        let err = |source| CreateOverlayError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        if len == 0 {
            return Ok(Mapped { map: None });
        }
        // SAFETY: the caller must not truncate the images while we read them;
        // they are inputs we only read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(err)?;
        Ok(Mapped { map: Some(map) })
    }
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

struct Images<'a> {
    base_disk: &'a [u8],
    base_mem: &'a [u8],
    launch_disk: &'a [u8],
    launch_mem: &'a [u8],
    cs: u32,
}

impl<'a> Images<'a> {
    fn base(&self, image: Image) -> &'a [u8] {
        match image {
            Image::Disk => self.base_disk,
            Image::Mem => self.base_mem,
        }
    }
    fn launch(&self, image: Image) -> &'a [u8] {
        match image {
            Image::Disk => self.launch_disk,
            Image::Mem => self.launch_mem,
        }
    }
    fn range(&self, size: usize, index: u64) -> std::ops::Range<usize> {
        let start = index as usize * self.cs as usize;
        start..(start + self.cs as usize).min(size)
    }
    fn launch_chunk(&self, image: Image, index: u64) -> &'a [u8] {
        let l = self.launch(image);
        &l[self.range(l.len(), index)]
    }
    /// The part of the base that lies under a launch chunk (may be short or
    /// empty: the rest of the base view is zeros).
    fn base_under(&self, image: Image, index: u64) -> &'a [u8] {
        let b = self.base(image);
        let r = self.range(self.launch(image).len(), index);
        &b[r.start.min(b.len())..r.end.min(b.len())]
    }
    fn changed(&self, image: Image, index: u64) -> bool {
        let l = self.launch_chunk(image, index);
        let b = self.base_under(image, index);
        l[..b.len()] != *b || !codec::is_zero(&l[b.len()..])
    }
}

struct Changed {
    image: Image,
    index: u64,
    zero: bool,
    hash: Hash,
}

enum Plan {
    Zero,
    Ref(ChunkSource, u64),
    Payload,
}

struct BuiltSegment {
    stored: Vec<u8>,
    raw_len: u32,
    /// (offset, transform) per chunk of the group.
    placed: Vec<(u32, Transform)>,
}

fn hash_chunk(c: &[u8], cs: u32, full_zero: &Hash) -> (bool, Hash) {
    if codec::is_zero(c) {
        let h = if c.len() == cs as usize {
            *full_zero
        } else {
            format::zero_chunk_hash(c.len())
        };
        (true, h)
    } else {
        (false, *blake3::hash(c).as_bytes())
    }
}

/// Creates an overlay and writes it to `out`.
pub fn create_overlay_to_writer<W: Write>(
    config: &CreateConfig,
    mut out: W,
) -> Result<OverlayStats, CreateOverlayError> {
    let started = Instant::now();
    let cs = config.chunk_size;
    if !cs.is_power_of_two() || !(512..=1 << 20).contains(&cs) {
        return Err(CreateOverlayError::InvalidConfig(format!(
            "chunk size {cs}"
        )));
    }
    config
        .codec
        .validate()
        .map_err(CreateOverlayError::InvalidConfig)?;
    if config.base_id.len() > 1024 {
        return Err(CreateOverlayError::InvalidConfig(
            "base id longer than 1024 bytes".into(),
        ));
    }
    if config.metadata.len() > format::MAX_METADATA_LEN {
        return Err(CreateOverlayError::InvalidConfig(format!(
            "metadata is {} bytes, more than {}",
            config.metadata.len(),
            format::MAX_METADATA_LEN
        )));
    }
    // What every reader refuses is not written (see `validate`).
    crate::validate::check_metadata(&config.metadata)
        .map_err(|e| CreateOverlayError::InvalidConfig(e.to_string()))?;
    if config.device_state.len() > MAX_DEVICE_STATE_LEN as usize {
        return Err(CreateOverlayError::InvalidConfig(
            "device state too large".into(),
        ));
    }
    let maps = [
        Mapped::open(&config.base_disk)?,
        Mapped::open(&config.base_mem)?,
        Mapped::open(&config.launch_disk)?,
        Mapped::open(&config.launch_mem)?,
    ];
    let im = Images {
        base_disk: maps[0].bytes(),
        base_mem: maps[1].bytes(),
        launch_disk: maps[2].bytes(),
        launch_mem: maps[3].bytes(),
        cs,
    };
    if im.launch_mem.len() != im.base_mem.len() {
        return Err(CreateOverlayError::MemSizeMismatch {
            base: im.base_mem.len() as u64,
            launch: im.launch_mem.len() as u64,
        });
    }
    if im.launch_disk.len() < im.base_disk.len() {
        return Err(CreateOverlayError::DiskShrunk {
            base: im.base_disk.len() as u64,
            launch: im.launch_disk.len() as u64,
        });
    }
    let full_zero = format::zero_chunk_hash(cs as usize);
    let nchunks = |img: Image| chunk_count(im.launch(img).len() as u64, cs);

    // 1. Changed chunks, memory first (the order apply needs them), with hashes.
    let mut changed: Vec<Changed> = Vec::new();
    for img in [Image::Mem, Image::Disk] {
        let part: Vec<Changed> = (0..nchunks(img) as usize)
            .into_par_iter()
            .with_min_len(64)
            .map(|i| i as u64)
            .filter(|&i| im.changed(img, i))
            .map(|i| {
                let (zero, hash) = hash_chunk(im.launch_chunk(img, i), cs, &full_zero);
                Changed {
                    image: img,
                    index: i,
                    zero,
                    hash,
                }
            })
            .collect();
        changed.extend(part);
    }

    // 2. Hashes of every base chunk: dedup sources and base image hashes.
    let base_hashes = |img: Image| -> Vec<Hash> {
        let b = im.base(img);
        (0..chunk_count(b.len() as u64, cs) as usize)
            .into_par_iter()
            .with_min_len(64)
            .map(|i| hash_chunk(&b[im.range(b.len(), i as u64)], cs, &full_zero).1)
            .collect()
    };
    let (bd_hashes, bm_hashes) =
        rayon::join(|| base_hashes(Image::Disk), || base_hashes(Image::Mem));
    let mut base_index: HashMap<Hash, Option<(ChunkSource, u64)>> = changed
        .iter()
        .filter(|c| !c.zero && im.launch_chunk(c.image, c.index).len() == cs as usize)
        .map(|c| (c.hash, None))
        .collect();
    for (src, hashes, size) in [
        (ChunkSource::BaseMem, &bm_hashes, im.base_mem.len()),
        (ChunkSource::BaseDisk, &bd_hashes, im.base_disk.len()),
    ] {
        for (i, h) in hashes.iter().enumerate() {
            if chunk_len(size as u64, cs, i as u64) != cs as usize {
                continue;
            }
            if let Some(slot @ None) = base_index.get_mut(h) {
                *slot = Some((src, i as u64));
            }
        }
    }

    // 3. Dedup in one space: zero, base, earlier chunk of the overlay.
    let mut seen: HashMap<Hash, (Image, u64)> = HashMap::new();
    let mut plans = Vec::with_capacity(changed.len());
    let mut payload: Vec<usize> = Vec::new();
    for (n, c) in changed.iter().enumerate() {
        let full = im.launch_chunk(c.image, c.index).len() == cs as usize;
        let plan = if c.zero {
            Plan::Zero
        } else if let Some(Some((src, i))) = base_index.get(&c.hash).filter(|_| full) {
            Plan::Ref(*src, *i)
        } else if let Some(&(img, i)) = seen.get(&c.hash).filter(|_| full) {
            let src = match img {
                Image::Disk => ChunkSource::LaunchDisk,
                Image::Mem => ChunkSource::LaunchMem,
            };
            Plan::Ref(src, i)
        } else {
            if full {
                seen.insert(c.hash, (c.image, c.index));
            }
            payload.push(n);
            Plan::Payload
        };
        plans.push(plan);
    }
    drop(seen);
    drop(base_index);

    // 4. Payload segments, compressed in parallel.
    let seg_codec = config.codec.segment_codec();
    let level = config.codec.level();
    let per_segment = (config.segment_size.clamp(cs, MAX_SEGMENT_RAW_LEN) / cs).max(1) as usize;
    let groups: Vec<&[usize]> = payload.chunks(per_segment).collect();
    let built: Vec<BuiltSegment> = groups
        .par_iter()
        .enumerate()
        .map(|(g, group)| {
            build_segment(&im, &changed, group, config.codec, seg_codec, level).map_err(|source| {
                CreateOverlayError::Compress {
                    segment: g as u32 + 1,
                    source,
                }
            })
        })
        .collect::<Result<_, _>>()?;

    // 5. Device state segment, then the manifest.
    let ds_stored = codec::compress(seg_codec, level, &config.device_state)
        .map_err(|source| CreateOverlayError::Compress { segment: 0, source })?;
    let mut segments = vec![SegmentInfo {
        kind: SegmentKind::DeviceState,
        codec: seg_codec,
        offset: 0,
        stored_len: ds_stored.len() as u64,
        raw_len: config.device_state.len() as u32,
        hash: *blake3::hash(&ds_stored).as_bytes(),
    }];
    let mut offset = ds_stored.len() as u64;
    for b in &built {
        segments.push(SegmentInfo {
            kind: SegmentKind::Chunks,
            codec: seg_codec,
            offset,
            stored_len: b.stored.len() as u64,
            raw_len: b.raw_len,
            hash: *blake3::hash(&b.stored).as_bytes(),
        });
        offset += b.stored.len() as u64;
    }
    let mut placed = vec![None; changed.len()];
    for (g, (group, b)) in groups.iter().zip(&built).enumerate() {
        for (&n, &p) in group.iter().zip(&b.placed) {
            placed[n] = Some((g as u32 + 1, p));
        }
    }
    let mut entries: Vec<ChunkEntry> = changed
        .iter()
        .zip(&plans)
        .zip(&placed)
        .map(|((c, plan), place)| {
            let kind = match (plan, place) {
                (Plan::Zero, _) => ChunkKind::Zero,
                (Plan::Ref(source, index), _) => ChunkKind::Ref {
                    source: *source,
                    index: *index,
                },
                (Plan::Payload, Some((segment, (offset, transform)))) => ChunkKind::Payload {
                    segment: *segment,
                    offset: *offset,
                    transform: *transform,
                },
                (Plan::Payload, None) => unreachable!("every payload chunk is placed"),
            };
            ChunkEntry {
                image: c.image,
                index: c.index,
                kind,
                hash: c.hash,
            }
        })
        .collect();
    entries.sort_by_key(|e| (e.image, e.index));

    let base_disk_hash = format::image_hash(im.base_disk.len() as u64, cs, &bd_hashes);
    let base_mem_hash = format::image_hash(im.base_mem.len() as u64, cs, &bm_hashes);
    let disk_hash = launch_image_hash(&im, Image::Disk, &entries, &bd_hashes);
    let mem_hash = launch_image_hash(&im, Image::Mem, &entries, &bm_hashes);
    let device_state_hash = *blake3::hash(&config.device_state).as_bytes();
    let manifest = Manifest {
        chunk_size: cs,
        base_id: config.base_id.clone(),
        metadata: config.metadata.clone(),
        base_disk_size: im.base_disk.len() as u64,
        base_mem_size: im.base_mem.len() as u64,
        disk_size: im.launch_disk.len() as u64,
        mem_size: im.launch_mem.len() as u64,
        base_disk_hash,
        base_mem_hash,
        disk_hash,
        mem_hash,
        device_state_hash,
        launch_hash: format::launch_hash(&disk_hash, &mem_hash, &device_state_hash),
        codec_id: config.codec.id(),
        codec_level: level,
        device_state_segment: 0,
        segments,
        entries,
        data_offset: 0,
    };
    let raw_manifest = manifest.encode();
    let stored_manifest = codec::compress(SegmentCodec::Zstd, 3, &raw_manifest)
        .map_err(|source| CreateOverlayError::Compress { segment: 0, source })?;
    let data_offset = (HEADER_LEN + stored_manifest.len()) as u64;
    let file_len = data_offset + offset;
    let header = Header {
        format_version: FORMAT_VERSION,
        manifest_offset: HEADER_LEN as u64,
        manifest_len: stored_manifest.len() as u64,
        manifest_raw_len: raw_manifest.len() as u64,
        file_len,
        manifest_hash: *blake3::hash(&stored_manifest).as_bytes(),
    };

    // 6. Write: header, manifest, segments in apply order.
    let w = |r: io::Result<()>| r.map_err(CreateOverlayError::Write);
    w(out.write_all(&header.encode()))?;
    w(out.write_all(&stored_manifest))?;
    w(out.write_all(&ds_stored))?;
    for b in &built {
        w(out.write_all(&b.stored))?;
    }
    w(out.flush())?;

    let chunks = chunk_stats(&manifest);
    let changed_bytes = changed
        .iter()
        .map(|c| manifest.chunk_len(c.image, c.index) as u64)
        .sum();
    Ok(OverlayStats {
        changed_chunks: changed.len() as u64,
        changed_bytes,
        chunks,
        payload_raw_bytes: built.iter().map(|b| b.raw_len as u64).sum(),
        payload_stored_bytes: built.iter().map(|b| b.stored.len() as u64).sum(),
        device_state_bytes: config.device_state.len() as u64,
        device_state_stored_bytes: ds_stored.len() as u64,
        manifest_bytes: stored_manifest.len() as u64,
        segments: manifest.segments.len() as u32,
        overlay_bytes: file_len,
        launch_hash: hex::encode(manifest.launch_hash),
        create_time: started.elapsed(),
    })
}

/// Image hash of a launch image: changed chunks from the entries, the others
/// from the base view (base hashes, or zeros past the end of the base).
fn launch_image_hash(im: &Images, img: Image, entries: &[ChunkEntry], base: &[Hash]) -> Hash {
    let cs = im.cs;
    let size = im.launch(img).len() as u64;
    let base_size = im.base(img).len() as u64;
    let mut changed = entries.iter().filter(|e| e.image == img).peekable();
    let full_zero = format::zero_chunk_hash(cs as usize);
    let hashes: Vec<Hash> = (0..chunk_count(size, cs))
        .map(|i| {
            if let Some(e) = changed.next_if(|e| e.index == i) {
                return e.hash;
            }
            let len = chunk_len(size, cs, i);
            if chunk_len(base_size, cs, i) == len {
                base[i as usize]
            } else if len == cs as usize && i * cs as u64 >= base_size {
                full_zero
            } else {
                *blake3::hash(im.launch_chunk(img, i)).as_bytes()
            }
        })
        .collect();
    format::image_hash(size, cs, &hashes)
}

fn build_segment(
    im: &Images,
    changed: &[Changed],
    group: &[usize],
    codec: Codec,
    seg_codec: SegmentCodec,
    level: i32,
) -> io::Result<BuiltSegment> {
    let mut raw = Vec::with_capacity(group.len() * im.cs as usize);
    let mut placed = Vec::with_capacity(group.len());
    let mut tmp = vec![0u8; im.cs as usize];
    for &n in group {
        let c = &changed[n];
        let launch = im.launch_chunk(c.image, c.index);
        let base = im.base_under(c.image, c.index);
        let offset = raw.len() as u32;
        let xor = codec.uses_xor() && !codec::is_zero(base) && xor_pays(launch, base, &mut tmp);
        if xor {
            let t = &mut tmp[..launch.len()];
            codec::xor_into(t, launch, base);
            raw.extend_from_slice(t);
            placed.push((offset, Transform::Xor));
        } else {
            raw.extend_from_slice(launch);
            placed.push((offset, Transform::Literal));
        }
    }
    let stored = codec::compress(seg_codec, level, &raw)?;
    Ok(BuiltSegment {
        stored,
        raw_len: raw.len() as u32,
        placed,
    })
}

/// Whether storing `launch ^ base` is likely smaller than `launch` itself.
fn xor_pays(launch: &[u8], base: &[u8], tmp: &mut [u8]) -> bool {
    let tail = &launch[base.len()..];
    let eq = codec::equal_bytes(launch, base) + tail.iter().filter(|&&x| x == 0).count();
    let len = launch.len();
    if eq * 8 >= len * 7 {
        return true;
    }
    if eq * 8 <= len {
        return false;
    }
    // Unclear: compare both compressed alone at a fast level.
    let t = &mut tmp[..len];
    codec::xor_into(t, launch, base);
    let size = |b: &[u8]| {
        zstd::bulk::compress(b, 1)
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
    };
    size(t) < size(launch)
}
