//! Applying an overlay to a base VM: rebuilds the launch disk and memory.
//!
//! [`Applier`] is the streaming form: build it from a parsed manifest, feed
//! it segments as they arrive (in any order, from any thread), then
//! [`Applier::finish`]. Outputs are written under temporary names next to
//! their destinations and renamed into place only when everything verified.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::codec;
use crate::format::{
    self, chunk_count, ChunkKind, ChunkSource, FormatError, Hash, Header, Image, Manifest,
    SegmentKind, Transform, HEADER_LEN,
};
use crate::fsutil::{self, TempOutput};

/// Where the base is and where the launch images go.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    pub base_disk: PathBuf,
    pub base_mem: PathBuf,
    pub out_disk: PathBuf,
    pub out_mem: PathBuf,
    /// Check the hash of the whole launch state, which proves that the base
    /// images are the overlay's base (costs one read of the base). Default on.
    pub verify_launch_state: bool,
    /// fsync the outputs before renaming them into place. Default off.
    pub sync: bool,
    /// Write the outputs at their final paths from the start instead of
    /// temporary files renamed at the end, so that a VM can open them while
    /// the apply runs (early start). They are removed if the apply fails.
    /// Default off.
    pub in_place: bool,
    /// Copy the base memory into the memory output before applying. Off
    /// (early start, where the memory output is only read back through
    /// [`Applier::read_memory`]): the output holds only the changed chunks,
    /// and `read_memory` reads the others from the base, which saves copying
    /// the whole base memory before the VM can start. The memory output is
    /// then not a complete image. Default on.
    pub copy_base_memory: bool,
    /// With `in_place`: `out_disk` exists and already holds an exact copy of
    /// the base disk (a copy prepared ahead of time), so it is used as it is
    /// instead of copying the base into it. Default off.
    pub disk_holds_base: bool,
}

impl ApplyConfig {
    pub fn new(
        base_disk: impl Into<PathBuf>,
        base_mem: impl Into<PathBuf>,
        out_disk: impl Into<PathBuf>,
        out_mem: impl Into<PathBuf>,
    ) -> ApplyConfig {
        ApplyConfig {
            base_disk: base_disk.into(),
            base_mem: base_mem.into(),
            out_disk: out_disk.into(),
            out_mem: out_mem.into(),
            verify_launch_state: true,
            sync: false,
            in_place: false,
            copy_base_memory: true,
            disk_holds_base: false,
        }
    }
}

/// What apply returns.
#[derive(Debug, Clone)]
pub struct ApplyOutput {
    /// The device state, to restore with the memory image.
    pub device_state: Vec<u8>,
    pub launch_hash: Hash,
    pub apply_time: Duration,
}

/// Why an overlay could not be applied (or verified).
#[derive(Debug, thiserror::Error)]
pub enum ApplyOverlayError {
    #[error("Cannot read the overlay")]
    ReadOverlay(#[source] io::Error),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("Cannot read base {image} image {}", path.display())]
    ReadBase {
        image: Image,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Base {image} image is {found} bytes, the overlay expects {expected}")]
    BaseSizeMismatch {
        image: Image,
        expected: u64,
        found: u64,
    },
    #[error("Cannot write {}", path.display())]
    WriteOutput {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Segment {segment} does not exist (the overlay has {count})")]
    UnknownSegment { segment: u32, count: usize },
    #[error("Segment {segment} is {found} bytes, expected {expected}")]
    SegmentLength {
        segment: u32,
        expected: u64,
        found: u64,
    },
    #[error("Segment {segment} hash mismatch")]
    SegmentHashMismatch { segment: u32 },
    #[error("Segment {segment} was applied twice")]
    DuplicateSegment { segment: u32 },
    #[error("Segment {segment} cannot be decoded: {reason}")]
    SegmentDecode { segment: u32, reason: String },
    #[error("Chunk {entry} ({image} chunk {index}) hash mismatch")]
    ChunkHashMismatch {
        entry: usize,
        image: Image,
        index: u64,
    },
    #[error("Chunk {entry} ({image} chunk {index}) differs from the base chunk it refers to: wrong base?")]
    BaseChunkMismatch {
        entry: usize,
        image: Image,
        index: u64,
    },
    #[error("Device state hash mismatch")]
    DeviceStateHashMismatch,
    #[error("Segments never applied: {missing:?}")]
    MissingSegments { missing: Vec<u32> },
    #[error("Launch {image} hash mismatch: the base {image} image is not the overlay's base")]
    LaunchImageHashMismatch { image: Image },
    #[error("Launch state hash mismatch")]
    LaunchHashMismatch,
    #[error("An earlier error stopped this apply")]
    Poisoned,
}

impl ApplyOverlayError {
    /// The segment's stored bytes are not the ones the manifest names (a
    /// wrong length or hash): damaged at rest or on the way. Such a segment
    /// was refused before it had any effect, and a new fetch of it may
    /// heal. (A segment whose hash matched but that does not decode is
    /// damaged at its source: the same bytes come again.)
    pub fn may_heal_on_refetch(&self) -> bool {
        matches!(
            self,
            ApplyOverlayError::SegmentLength { .. } | ApplyOverlayError::SegmentHashMismatch { .. }
        )
    }
}

type Result<T, E = ApplyOverlayError> = std::result::Result<T, E>;

/// Read-only state shared with the background hashing thread.
struct Shared {
    manifest: Manifest,
    base_disk: File,
    base_mem: File,
    base_paths: [PathBuf; 2],
    cancel: AtomicBool,
}

impl Shared {
    fn read_base_error(&self, image: Image, source: io::Error) -> ApplyOverlayError {
        ApplyOverlayError::ReadBase {
            image,
            path: self.base_paths[image as usize].clone(),
            source,
        }
    }
    fn base(&self, image: Image) -> (&File, u64) {
        match image {
            Image::Disk => (&self.base_disk, self.manifest.base_disk_size),
            Image::Mem => (&self.base_mem, self.manifest.base_mem_size),
        }
    }
    fn source(&self, source: ChunkSource) -> (&File, u64) {
        match source {
            ChunkSource::BaseDisk | ChunkSource::LaunchDisk => self.base(Image::Disk),
            ChunkSource::BaseMem | ChunkSource::LaunchMem => self.base(Image::Mem),
        }
    }
}

struct Outputs {
    disk: TempOutput,
    mem: TempOutput,
}

impl Outputs {
    fn file(&self, image: Image) -> &TempOutput {
        match image {
            Image::Disk => &self.disk,
            Image::Mem => &self.mem,
        }
    }
    fn write(&self, image: Image, data: &[u8], offset: u64) -> Result<()> {
        let o = self.file(image);
        o.file
            .write_all_at(data, offset)
            .map_err(|source| ApplyOverlayError::WriteOutput {
                path: o.dest().to_path_buf(),
                source,
            })
    }
}

/// Applies an overlay segment by segment.
pub struct Applier {
    shared: Arc<Shared>,
    outputs: Option<Outputs>,
    /// Without a base memory copy: one bit per memory chunk, set for those
    /// the memory output holds (every chunk with a manifest entry).
    mem_in_output: Option<Vec<u64>>,
    /// Entries with a payload, per segment.
    by_segment: Vec<Vec<u32>>,
    /// Self references per segment: (entry, position of its target in
    /// `by_segment[segment]`).
    self_refs: Vec<Vec<(u32, u32)>>,
    received: Vec<AtomicBool>,
    poisoned: AtomicBool,
    device_state: Mutex<Option<Vec<u8>>>,
    hasher: Option<JoinHandle<Result<(Hash, Hash)>>>,
    sync: bool,
    started: Instant,
}

impl Applier {
    /// Opens the base, copies it to the temporary outputs and applies every
    /// chunk that needs no payload (zeros and references to the base).
    pub fn new(manifest: Manifest, config: &ApplyConfig) -> Result<Applier> {
        Self::build(manifest, config, Some((&config.out_disk, &config.out_mem)))
    }

    fn build(
        manifest: Manifest,
        config: &ApplyConfig,
        out: Option<(&Path, &Path)>,
    ) -> Result<Applier> {
        let started = Instant::now();
        let open = |image, path: &Path, expected| -> Result<File> {
            let err = |source| ApplyOverlayError::ReadBase {
                image,
                path: path.to_path_buf(),
                source,
            };
            let f = File::open(path).map_err(err)?;
            let found = f.metadata().map_err(err)?.len();
            if found != expected {
                return Err(ApplyOverlayError::BaseSizeMismatch {
                    image,
                    expected,
                    found,
                });
            }
            Ok(f)
        };
        let base_disk = open(Image::Disk, &config.base_disk, manifest.base_disk_size)?;
        let base_mem = open(Image::Mem, &config.base_mem, manifest.base_mem_size)?;
        let nseg = manifest.segments.len();
        let mut by_segment = vec![Vec::new(); nseg];
        for (n, e) in manifest.entries.iter().enumerate() {
            if let ChunkKind::Payload { segment, .. } = e.kind {
                by_segment[segment as usize].push(n as u32);
            }
        }
        let mut self_refs = vec![Vec::new(); nseg];
        for (n, e) in manifest.entries.iter().enumerate() {
            if let ChunkKind::Ref { source, index } = e.kind {
                if let Some(img) = source.launch_image() {
                    // Checked by the manifest parser: the target has a payload.
                    let t = manifest.find_entry(img, index).unwrap_or(0);
                    if let ChunkKind::Payload { segment, .. } = manifest.entries[t].kind {
                        let list = &by_segment[segment as usize];
                        let pos = list.binary_search(&(t as u32)).unwrap_or(0);
                        self_refs[segment as usize].push((n as u32, pos as u32));
                    }
                }
            }
        }
        let shared = Arc::new(Shared {
            manifest,
            base_disk,
            base_mem,
            base_paths: [config.base_disk.clone(), config.base_mem.clone()],
            cancel: AtomicBool::new(false),
        });
        let hasher = if config.verify_launch_state {
            let s = shared.clone();
            Some(std::thread::spawn(move || {
                Ok((
                    launch_image_hash(&s, Image::Disk)?,
                    launch_image_hash(&s, Image::Mem)?,
                ))
            }))
        } else {
            None
        };
        let t0 = Instant::now();
        let outputs = match out {
            Some((disk, mem)) => match prepare_outputs(&shared, (disk, mem), config) {
                Ok(o) => Some(o),
                Err(e) => {
                    shared.cancel.store(true, Ordering::Release);
                    if let Some(h) = hasher {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            },
            None => None,
        };
        tracing::debug!(elapsed = ?t0.elapsed(), "apply: base copied to the outputs");
        // Memory chunks the output holds when the base memory is not copied.
        let mem_in_output = (!config.copy_base_memory).then(|| {
            let m = &shared.manifest;
            let n = chunk_count(m.mem_size, m.chunk_size) as usize;
            let mut bits = vec![0u64; n.div_ceil(64)];
            for e in m.entries.iter().filter(|e| e.image == Image::Mem) {
                bits[(e.index / 64) as usize] |= 1 << (e.index % 64);
            }
            bits
        });
        let applier = Applier {
            shared,
            outputs,
            mem_in_output,
            by_segment,
            self_refs,
            received: (0..nseg).map(|_| AtomicBool::new(false)).collect(),
            poisoned: AtomicBool::new(false),
            device_state: Mutex::new(None),
            hasher,
            sync: config.sync,
            started,
        };
        let t0 = Instant::now();
        applier.apply_without_payload()?;
        tracing::debug!(elapsed = ?t0.elapsed(), "apply: zero and base-reference chunks written");
        Ok(applier)
    }

    /// The manifest being applied.
    pub fn manifest(&self) -> &Manifest {
        &self.shared.manifest
    }

    /// The device state, once its segment has been applied.
    pub fn device_state(&self) -> Option<Vec<u8>> {
        self.device_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Read from the memory output as written so far. A chunk is final once
    /// `Applier::new` returned (unchanged, zero and base-reference chunks) or
    /// once the segment holding its payload (or its self reference's target
    /// payload) was applied: see [`crate::early`].
    pub fn read_memory(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let Some(o) = &self.outputs else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this applier writes no outputs",
            ));
        };
        let Some(bits) = &self.mem_in_output else {
            return o.mem.file.read_exact_at(buf, offset);
        };
        // Chunk by chunk: changed ones from the output, the others from
        // the base (zeros past its end).
        let cs = self.shared.manifest.chunk_size as u64;
        let (base, base_size) = self.shared.base(Image::Mem);
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let chunk = at / cs;
            let len = ((chunk + 1) * cs - at).min((buf.len() - done) as u64) as usize;
            let part = &mut buf[done..done + len];
            let in_output = bits
                .get((chunk / 64) as usize)
                .is_some_and(|w| w & (1 << (chunk % 64)) != 0);
            if in_output {
                o.mem.file.read_exact_at(part, at)?;
            } else {
                fsutil::read_padded(base, base_size, at, part)?;
            }
            done += len;
        }
        Ok(())
    }

    /// Segments not applied yet.
    pub fn missing_segments(&self) -> Vec<u32> {
        (0..self.received.len() as u32)
            .filter(|&i| !self.received[i as usize].load(Ordering::Acquire))
            .collect()
    }

    fn apply_without_payload(&self) -> Result<()> {
        let m = &self.shared.manifest;
        let cs = m.chunk_size as u64;
        // Zero chunks: coalesce runs.
        if let Some(out) = &self.outputs {
            let mut run: Option<(Image, u64, u64)> = None;
            for e in m.entries.iter().filter(|e| e.kind == ChunkKind::Zero) {
                let len = m.chunk_len(e.image, e.index) as u64;
                match &mut run {
                    Some((img, start, end)) if *img == e.image && *end == e.index * cs => {
                        *end += len
                    }
                    _ => {
                        if let Some((img, start, end)) = run.take() {
                            zero(out, img, start, end)?;
                        }
                        run = Some((e.image, e.index * cs, e.index * cs + len));
                    }
                }
            }
            if let Some((img, start, end)) = run {
                zero(out, img, start, end)?;
            }
        }
        // References to the base: read, check, write.
        let refs: Vec<usize> = m
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                matches!(e.kind, ChunkKind::Ref { source, .. } if source.launch_image().is_none())
            })
            .map(|(n, _)| n)
            .collect();
        refs.par_iter().with_min_len(16).try_for_each_init(
            || vec![0u8; cs as usize],
            |buf, &n| {
                let e = &m.entries[n];
                let ChunkKind::Ref { source, index } = e.kind else {
                    return Ok(());
                };
                let len = m.chunk_len(e.image, e.index);
                let (file, size) = self.shared.source(source);
                let img = if source == ChunkSource::BaseDisk {
                    Image::Disk
                } else {
                    Image::Mem
                };
                fsutil::read_padded(file, size, index * cs, &mut buf[..len])
                    .map_err(|source| self.read_base_error(img, source))?;
                if blake3::hash(&buf[..len]).as_bytes() != &e.hash {
                    return Err(ApplyOverlayError::BaseChunkMismatch {
                        entry: n,
                        image: e.image,
                        index: e.index,
                    });
                }
                if let Some(out) = &self.outputs {
                    out.write(e.image, &buf[..len], e.index * cs)?;
                }
                Ok(())
            },
        )
    }

    fn read_base_error(&self, image: Image, source: io::Error) -> ApplyOverlayError {
        self.shared.read_base_error(image, source)
    }

    /// Verifies, decodes and applies one segment as stored in the file.
    /// Thread-safe: segments may be applied concurrently and in any order.
    ///
    /// A segment refused for its length or its hash
    /// ([`ApplyOverlayError::may_heal_on_refetch`]) was refused before
    /// anything was written: the applier stays usable and the same segment
    /// may be given again (fetched anew: an error in transit heals). Any
    /// other error stops this apply ([`ApplyOverlayError::Poisoned`] from
    /// then on).
    pub fn apply_segment(&self, segment: u32, stored: &[u8]) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(ApplyOverlayError::Poisoned);
        }
        let r = self.apply_segment_inner(segment, stored);
        if let Err(e) = &r {
            if !e.may_heal_on_refetch() {
                self.poisoned.store(true, Ordering::Release);
            }
        }
        r
    }

    fn apply_segment_inner(&self, segment: u32, stored: &[u8]) -> Result<()> {
        let m = &self.shared.manifest;
        let info = m
            .segments
            .get(segment as usize)
            .ok_or(ApplyOverlayError::UnknownSegment {
                segment,
                count: m.segments.len(),
            })?;
        if stored.len() as u64 != info.stored_len {
            return Err(ApplyOverlayError::SegmentLength {
                segment,
                expected: info.stored_len,
                found: stored.len() as u64,
            });
        }
        if blake3::hash(stored).as_bytes() != &info.hash {
            return Err(ApplyOverlayError::SegmentHashMismatch { segment });
        }
        if self.received[segment as usize].swap(true, Ordering::AcqRel) {
            return Err(ApplyOverlayError::DuplicateSegment { segment });
        }
        let raw = codec::decompress(info.codec, stored, info.raw_len)
            .map_err(|reason| ApplyOverlayError::SegmentDecode { segment, reason })?;
        if info.kind == SegmentKind::DeviceState {
            if blake3::hash(&raw).as_bytes() != &m.device_state_hash {
                return Err(ApplyOverlayError::DeviceStateHashMismatch);
            }
            *self.device_state.lock().unwrap_or_else(|p| p.into_inner()) = Some(raw);
            return Ok(());
        }
        let cs = m.chunk_size as usize;
        let list = &self.by_segment[segment as usize];
        let mut buf = vec![0u8; list.len() * cs];
        buf.par_chunks_mut(cs)
            .zip(list.par_iter())
            .with_min_len(32)
            .try_for_each(|(slot, &n)| self.decode_chunk(n as usize, &raw, slot))?;
        if let Some(out) = &self.outputs {
            // Write runs of consecutive chunks with one call each.
            let mut i = 0;
            while i < list.len() {
                let first = &m.entries[list[i] as usize];
                let mut j = i + 1;
                let mut len = m.chunk_len(first.image, first.index);
                while j < list.len() && len % cs == 0 {
                    let e = &m.entries[list[j] as usize];
                    if e.image != first.image || e.index != first.index + (j - i) as u64 {
                        break;
                    }
                    len += m.chunk_len(e.image, e.index);
                    j += 1;
                }
                let data = &buf[i * cs..i * cs + len];
                out.write(first.image, data, first.index * cs as u64)?;
                i = j;
            }
            for &(n, pos) in &self.self_refs[segment as usize] {
                let e = &m.entries[n as usize];
                let len = m.chunk_len(e.image, e.index);
                let start = pos as usize * cs;
                out.write(e.image, &buf[start..start + len], e.index * cs as u64)?;
            }
        }
        Ok(())
    }

    fn decode_chunk(&self, n: usize, raw: &[u8], slot: &mut [u8]) -> Result<()> {
        let m = &self.shared.manifest;
        let e = &m.entries[n];
        let ChunkKind::Payload {
            offset, transform, ..
        } = e.kind
        else {
            return Ok(());
        };
        let len = m.chunk_len(e.image, e.index);
        let slot = &mut slot[..len];
        // Offsets were checked against the segment's raw length by the parser.
        let src = &raw[offset as usize..offset as usize + len];
        match transform {
            Transform::Literal => slot.copy_from_slice(src),
            Transform::Xor => {
                let (file, size) = self.shared.base(e.image);
                fsutil::read_padded(file, size, e.index * m.chunk_size as u64, slot)
                    .map_err(|source| self.read_base_error(e.image, source))?;
                codec::xor_in_place(slot, src);
            }
        }
        if blake3::hash(slot).as_bytes() != &e.hash {
            return Err(ApplyOverlayError::ChunkHashMismatch {
                entry: n,
                image: e.image,
                index: e.index,
            });
        }
        Ok(())
    }

    /// Checks that everything arrived and verified, renames the outputs into
    /// place and returns the device state.
    pub fn finish(mut self) -> Result<ApplyOutput> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(ApplyOverlayError::Poisoned);
        }
        let missing = self.missing_segments();
        if !missing.is_empty() {
            return Err(ApplyOverlayError::MissingSegments { missing });
        }
        let m = &self.shared.manifest;
        tracing::debug!(elapsed = ?self.started.elapsed(), "apply: all segments applied");
        if let Some(h) = self.hasher.take() {
            let (disk, mem) = h.join().map_err(|_| ApplyOverlayError::Poisoned)??;
            if disk != m.disk_hash {
                return Err(ApplyOverlayError::LaunchImageHashMismatch { image: Image::Disk });
            }
            if mem != m.mem_hash {
                return Err(ApplyOverlayError::LaunchImageHashMismatch { image: Image::Mem });
            }
        }
        if format::launch_hash(&m.disk_hash, &m.mem_hash, &m.device_state_hash) != m.launch_hash {
            return Err(ApplyOverlayError::LaunchHashMismatch);
        }
        let device_state = self
            .device_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        let launch_hash = m.launch_hash;
        tracing::debug!(elapsed = ?self.started.elapsed(), "apply: launch state verified");
        if let Some(out) = self.outputs.take() {
            let Outputs { disk, mem } = out;
            let mem_dest = mem.dest().to_path_buf();
            mem.commit(self.sync)
                .map_err(|source| ApplyOverlayError::WriteOutput {
                    path: mem_dest.clone(),
                    source,
                })?;
            let disk_dest = disk.dest().to_path_buf();
            if let Err(source) = disk.commit(self.sync) {
                // Never leave half a VM behind.
                let _ = std::fs::remove_file(&mem_dest);
                return Err(ApplyOverlayError::WriteOutput {
                    path: disk_dest,
                    source,
                });
            }
        }
        Ok(ApplyOutput {
            device_state,
            launch_hash,
            apply_time: self.started.elapsed(),
        })
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        self.shared.cancel.store(true, Ordering::Release);
        if let Some(h) = self.hasher.take() {
            let _ = h.join();
        }
    }
}

fn zero(out: &Outputs, image: Image, start: u64, end: u64) -> Result<()> {
    let o = out.file(image);
    fsutil::zero_range(&o.file, start, end - start).map_err(|source| {
        ApplyOverlayError::WriteOutput {
            path: o.dest().to_path_buf(),
            source,
        }
    })
}

fn prepare_outputs(
    shared: &Shared,
    (disk, mem): (&Path, &Path),
    config: &ApplyConfig,
) -> Result<Outputs> {
    let m = &shared.manifest;
    let disk_holds_base = config.in_place && config.disk_holds_base;
    let create = |path: &Path| {
        let out = if disk_holds_base && path == disk {
            TempOutput::open_in_place(path)
        } else if config.in_place {
            TempOutput::create_in_place(path)
        } else {
            TempOutput::create(path)
        };
        out.map_err(|source| ApplyOverlayError::WriteOutput {
            path: path.to_path_buf(),
            source,
        })
    };
    let out = Outputs {
        disk: create(disk)?,
        mem: create(mem)?,
    };
    let copy = |image: Image| -> Result<()> {
        let (src, size) = shared.base(image);
        let o = out.file(image);
        let err = |source| ApplyOverlayError::WriteOutput {
            path: o.dest().to_path_buf(),
            source,
        };
        let copy = match image {
            Image::Disk => !disk_holds_base,
            Image::Mem => config.copy_base_memory,
        };
        if copy {
            cloudlet_sparse::copy_sparse(src, &o.file, size).map_err(err)?;
        }
        o.file.set_len(m.image_size(image)).map_err(err)
    };
    let (a, b) = rayon::join(|| copy(Image::Disk), || copy(Image::Mem));
    a?;
    b?;
    Ok(out)
}

/// Image hash of a launch image: unchanged chunks hashed from the base view,
/// changed chunks from the manifest (each is checked when written). Works
/// through the image a window at a time, so memory stays bounded.
fn launch_image_hash(s: &Shared, image: Image) -> Result<Hash> {
    let m = &s.manifest;
    let cs = m.chunk_size as usize;
    let size = m.image_size(image);
    let n = chunk_count(size, m.chunk_size);
    let (file, base_size) = s.base(image);
    let full_zero = format::zero_chunk_hash(cs);
    const BLOCK: usize = 256;
    const WINDOW: u64 = 64 * BLOCK as u64;
    let mut entries = m.entries.iter().filter(|e| e.image == image).peekable();
    let mut image_hasher = format::ImageHasher::new(size, m.chunk_size);
    let mut hashes = Vec::new();
    let mut changed = Vec::new();
    let mut first = 0u64;
    while first < n {
        if s.cancel.load(Ordering::Relaxed) {
            return Err(ApplyOverlayError::Poisoned);
        }
        let wn = (n - first).min(WINDOW) as usize;
        hashes.clear();
        hashes.resize(wn, [0u8; 32]);
        changed.clear();
        changed.resize(wn, false);
        while let Some(e) = entries.next_if(|e| e.index < first + wn as u64) {
            let i = (e.index - first) as usize;
            changed[i] = true;
            hashes[i] = e.hash;
        }
        hashes
            .par_chunks_mut(BLOCK)
            .zip(changed.par_chunks(BLOCK))
            .enumerate()
            .try_for_each_init(
                || vec![0u8; BLOCK * cs],
                |buf, (b, (hs, ch))| -> Result<()> {
                    if ch.iter().all(|&c| c) {
                        return Ok(());
                    }
                    let start = (first + (b * BLOCK) as u64) * cs as u64;
                    let len = ((size - start) as usize).min(BLOCK * cs);
                    if start >= base_size || cloudlet_sparse::is_hole(file, start, len as u64) {
                        // Past the end of the base, or a hole: zeros, nothing
                        // to read (most of a sparse base disk).
                        buf[..len].fill(0);
                    } else {
                        fsutil::read_padded(file, base_size, start, &mut buf[..len])
                            .map_err(|source| s.read_base_error(image, source))?;
                    }
                    for (i, (h, &c)) in hs.iter_mut().zip(ch).enumerate() {
                        if c {
                            continue;
                        }
                        let chunk = &buf[i * cs..((i + 1) * cs).min(len)];
                        *h = if chunk.len() == cs && codec::is_zero(chunk) {
                            full_zero
                        } else {
                            *blake3::hash(chunk).as_bytes()
                        };
                    }
                    Ok(())
                },
            )?;
        for h in &hashes {
            image_hasher.update(h);
        }
        first += wn as u64;
    }
    Ok(image_hasher.finalize())
}

/// Reads and parses the header and manifest at the start of an overlay.
pub fn read_manifest<R: Read>(reader: &mut R) -> Result<(Header, Manifest)> {
    let mut head = [0u8; HEADER_LEN];
    let n = read_full(reader, &mut head)?;
    let header = Header::parse(&head[..n])?;
    // A signed overlay's signature block (judged by `Validation`, not here).
    let block = header.manifest_offset - HEADER_LEN as u64;
    io::copy(&mut reader.take(block), &mut io::sink()).map_err(ApplyOverlayError::ReadOverlay)?;
    let mut stored = Vec::new();
    reader
        .take(header.manifest_len)
        .read_to_end(&mut stored)
        .map_err(ApplyOverlayError::ReadOverlay)?;
    let manifest = Manifest::parse(&header, &stored)?;
    Ok((header, manifest))
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ApplyOverlayError::ReadOverlay(e)),
        }
    }
    Ok(n)
}

/// Applies the overlay file at `overlay`, decoding segments in parallel.
pub fn apply_overlay(overlay: &Path, config: &ApplyConfig) -> Result<ApplyOutput> {
    let (file, _header, manifest) = open_overlay(overlay)?;
    let applier = Applier::new(manifest, config)?;
    apply_file_segments(&applier, &file)?;
    applier.finish()
}

pub(crate) fn open_overlay(path: &Path) -> Result<(File, Header, Manifest)> {
    let mut file = File::open(path).map_err(ApplyOverlayError::ReadOverlay)?;
    let len = file
        .metadata()
        .map_err(ApplyOverlayError::ReadOverlay)?
        .len();
    let (header, manifest) = read_manifest(&mut file)?;
    if len < header.file_len {
        return Err(FormatError::Truncated {
            offset: len,
            needed: header.file_len - len,
        }
        .into());
    }
    if len > header.file_len {
        return Err(FormatError::TrailingData {
            offset: header.file_len,
            extra: len - header.file_len,
        }
        .into());
    }
    Ok((file, header, manifest))
}

pub(crate) fn apply_file_segments(applier: &Applier, file: &File) -> Result<()> {
    let m = applier.manifest();
    (0..m.segments.len() as u32)
        .into_par_iter()
        .with_max_len(1)
        .try_for_each(|i| {
            let r = m.segment_range(i).unwrap_or(0..0);
            let mut buf = vec![0u8; (r.end - r.start) as usize];
            file.read_exact_at(&mut buf, r.start)
                .map_err(ApplyOverlayError::ReadOverlay)?;
            applier.apply_segment(i, &buf)
        })
}

/// Applies an overlay read sequentially from `reader` (a pipe, an HTTP
/// body): segments are decoded in parallel while the next ones are read.
pub fn apply_overlay_from_reader<R: Read + Send>(
    mut reader: R,
    config: &ApplyConfig,
) -> Result<ApplyOutput> {
    let (_header, manifest) = read_manifest(&mut reader)?;
    let applier = Applier::new(manifest, config)?;
    let m = applier.manifest();
    let batch = rayon::current_num_threads().max(1) * 2;
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(u32, Vec<u8>)>>(batch);
        let reader = &mut reader;
        scope.spawn(move || {
            for i in 0..m.segments.len() as u32 {
                let r = m.segment_range(i).unwrap_or(0..0);
                let mut buf = vec![0u8; (r.end - r.start) as usize];
                let item = match read_full(reader, &mut buf) {
                    Ok(n) if n == buf.len() => Ok((i, buf)),
                    Ok(n) => Err(FormatError::Truncated {
                        offset: r.start + n as u64,
                        needed: (r.end - r.start) - n as u64,
                    }
                    .into()),
                    Err(e) => Err(e),
                };
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    return;
                }
            }
            let end = m
                .segment_range(m.segments.len() as u32 - 1)
                .map_or(0, |r| r.end);
            let mut extra = [0u8; 1];
            let trailing = match read_full(reader, &mut extra) {
                Ok(0) => return,
                Ok(_) => Err(FormatError::TrailingData {
                    offset: end,
                    extra: 1,
                }
                .into()),
                Err(e) => Err(e),
            };
            let _ = tx.send(trailing);
        });
        let mut pending = Vec::with_capacity(batch);
        let mut rx = rx.into_iter().peekable();
        while rx.peek().is_some() {
            pending.clear();
            while pending.len() < batch {
                match rx.next() {
                    Some(item) => pending.push(item?),
                    None => break,
                }
            }
            pending
                .par_iter()
                .try_for_each(|(i, buf)| applier.apply_segment(*i, buf))?;
        }
        Ok(())
    })?;
    applier.finish()
}

/// Verifies an overlay against a base without writing anything: every
/// segment, chunk and image hash. Returns the device state.
pub(crate) fn verify_against_base(
    overlay: &Path,
    base_disk: &Path,
    base_mem: &Path,
) -> Result<ApplyOutput> {
    let (file, _header, manifest) = open_overlay(overlay)?;
    let config = ApplyConfig::new(base_disk, base_mem, PathBuf::new(), PathBuf::new());
    let applier = Applier::build(manifest, &config, None)?;
    apply_file_segments(&applier, &file)?;
    applier.finish()
}
