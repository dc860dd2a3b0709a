//! Early start: what must arrive before a VM can be launched from a
//! partially applied overlay, and in which order to fetch the segments.
//!
//! A [`LaunchPlan`] is a pure function of the [`Manifest`]. It says, for the
//! launch disk as a whole and for every 4 KiB page of the launch memory,
//! which segment has to be applied before that part of the launch state is
//! final, so that a VM can be started (QEMU postcopy: device state and disk
//! first, memory pages on demand) while the rest of the overlay is still on
//! the way.
//!
//! # What "ready" means
//!
//! It follows how [`Applier`](crate::Applier) (in `apply.rs`) writes its
//! outputs:
//!
//! - [`Applier::new`](crate::Applier::new) copies the base images to the
//!   outputs (unchanged chunks; a grown disk reads as zeros past the base),
//!   then writes every chunk that needs no payload: zero chunks and
//!   references to the *base* disk or memory. When it returns, all of these
//!   are final: they have no segment here ([`LaunchPlan::page_segment`] is
//!   `None`).
//! - [`Applier::apply_segment`](crate::Applier::apply_segment) for segment
//!   `s` writes every payload chunk stored in `s` and every *self reference*
//!   (a reference to the launch disk or memory) whose target payload is
//!   stored in `s`. When it returns, those chunks are final: their segment
//!   here is `s` (for a self reference, the segment of its target).
//!
//! Nothing else ever rewrites a chunk, so a chunk that is final stays final.
//! The outputs are written in place (under temporary names until
//! [`Applier::finish`](crate::Applier::finish) renames them), with
//! positional writes: a reader of the same file sees a final chunk as soon
//! as the call that made it final returned.
//!
//! The device state segment ([`Manifest::device_state_segment`]) holds no
//! chunks; it is needed to start the VM at all and comes first in
//! [`LaunchPlan::fetch_order`], but it is not one of
//! [`LaunchPlan::disk_segments`].
//!
//! Early start needs one chunk per guest page: the plan refuses manifests
//! whose chunk size is not 4096 bytes or whose memory size is not a whole
//! number of pages.

use crate::format::{ChunkKind, Image, Manifest, SegmentKind};

/// Size of a guest page, and the only chunk size early start supports.
pub const PAGE_SIZE: u64 = 4096;

/// Marks a page that needs no segment in [`LaunchPlan::page_segments`].
pub const NO_SEGMENT: u32 = u32::MAX;

/// Why a manifest cannot be launched early.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EarlyStartError {
    #[error("Chunk size is {chunk_size} bytes; early start needs {PAGE_SIZE}-byte chunks (one guest page each)")]
    ChunkSize { chunk_size: u32 },
    #[error("Memory size {mem_size} is not a multiple of {PAGE_SIZE}")]
    MemSize { mem_size: u64 },
    #[error("Device state segment {segment} is not a device state segment of this overlay ({count} segments)")]
    DeviceStateSegment { segment: u32, count: usize },
    #[error("Manifest entry {entry} ({image} chunk {index}): {reason}")]
    InvalidEntry {
        entry: usize,
        image: Image,
        index: u64,
        reason: String,
    },
}

/// What must arrive before the launch disk, and each launch memory page, is
/// final; and the order to fetch segments in. See the [module
/// documentation](self) for what "final" means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Segments to apply before the launch disk is complete, ascending,
    /// unique: those holding payloads of disk chunks, and those holding the
    /// targets of disk chunks that are self references. Never the device
    /// state segment.
    pub disk_segments: Vec<u32>,
    /// Every segment exactly once: the device state segment, then
    /// [`disk_segments`](Self::disk_segments), then all others in file order.
    pub fetch_order: Vec<u32>,
    /// The device state segment (first in `fetch_order`).
    pub device_state_segment: u32,
    /// Disk chunks that wait on a segment: (chunk index, segment), ascending
    /// by chunk index. Every other disk chunk is final as soon as the
    /// [`Applier`](crate::Applier) exists.
    disk_chunks: Vec<(u64, u32)>,
    /// Per memory page: the segment it waits on, or [`NO_SEGMENT`].
    page_segments: Vec<u32>,
    /// Per memory page, one bit: a zero chunk.
    zero_pages: Vec<u64>,
    /// Pages per segment, ascending within each segment: the pages of segment
    /// `s` are `segment_pages[segment_start[s]..segment_start[s + 1]]`.
    segment_start: Vec<usize>,
    segment_pages: Vec<u64>,
}

impl LaunchPlan {
    /// Builds the plan of `manifest`.
    pub fn new(manifest: &Manifest) -> Result<LaunchPlan, EarlyStartError> {
        let m = manifest;
        if m.chunk_size as u64 != PAGE_SIZE {
            return Err(EarlyStartError::ChunkSize {
                chunk_size: m.chunk_size,
            });
        }
        if m.mem_size % PAGE_SIZE != 0 {
            return Err(EarlyStartError::MemSize {
                mem_size: m.mem_size,
            });
        }
        let nseg = m.segments.len();
        let ds = m.device_state_segment;
        if m.segments.get(ds as usize).map(|s| s.kind) != Some(SegmentKind::DeviceState) {
            return Err(EarlyStartError::DeviceStateSegment {
                segment: ds,
                count: nseg,
            });
        }
        let pages = m.mem_size / PAGE_SIZE;
        let npages = usize::try_from(pages).map_err(|_| EarlyStartError::MemSize {
            mem_size: m.mem_size,
        })?;
        let disk_chunks = crate::format::chunk_count(m.disk_size, m.chunk_size);

        let mut page_segments = vec![NO_SEGMENT; npages];
        let mut zero_pages = vec![0u64; npages.div_ceil(64)];
        let mut disk = vec![false; nseg];
        let mut waiting_disk = Vec::new();
        for (n, e) in m.entries.iter().enumerate() {
            let bad = |reason: String| EarlyStartError::InvalidEntry {
                entry: n,
                image: e.image,
                index: e.index,
                reason,
            };
            let limit = match e.image {
                Image::Disk => disk_chunks,
                Image::Mem => pages,
            };
            if e.index >= limit {
                return Err(bad(format!("past the end of the image ({limit} chunks)")));
            }
            let segment = match e.kind {
                ChunkKind::Zero => {
                    if e.image == Image::Mem {
                        zero_pages[(e.index / 64) as usize] |= 1 << (e.index % 64);
                    }
                    None
                }
                ChunkKind::Ref { source, index } => match source.launch_image() {
                    None => None,
                    Some(img) => {
                        let target = m.find_entry(img, index).map(|t| m.entries[t].kind);
                        match target {
                            Some(ChunkKind::Payload { segment, .. }) => Some(segment),
                            _ => {
                                return Err(bad(format!(
                                    "self reference to launch {img} chunk {index}, which is not a payload chunk"
                                )))
                            }
                        }
                    }
                },
                ChunkKind::Payload { segment, .. } => Some(segment),
            };
            let Some(segment) = segment else { continue };
            if m.segments.get(segment as usize).map(|s| s.kind) != Some(SegmentKind::Chunks) {
                return Err(bad(format!(
                    "payload in segment {segment}, which is not a chunk segment"
                )));
            }
            match e.image {
                Image::Disk => {
                    disk[segment as usize] = true;
                    waiting_disk.push((e.index, segment));
                }
                Image::Mem => page_segments[e.index as usize] = segment,
            }
        }
        waiting_disk.sort_unstable();

        let disk_segments: Vec<u32> = (0..nseg as u32).filter(|&s| disk[s as usize]).collect();
        let mut rest: Vec<u32> = (0..nseg as u32)
            .filter(|&s| s != ds && !disk[s as usize])
            .collect();
        rest.sort_by_key(|&s| m.segments[s as usize].offset);
        let mut fetch_order = Vec::with_capacity(nseg);
        fetch_order.push(ds);
        fetch_order.extend_from_slice(&disk_segments);
        fetch_order.extend_from_slice(&rest);

        // Pages per segment (counting sort: pages stay ascending).
        let mut segment_start = vec![0usize; nseg + 1];
        for &s in page_segments.iter().filter(|&&s| s != NO_SEGMENT) {
            segment_start[s as usize + 1] += 1;
        }
        for i in 0..nseg {
            segment_start[i + 1] += segment_start[i];
        }
        let mut fill = segment_start.clone();
        let mut segment_pages = vec![0u64; segment_start[nseg]];
        for (page, &s) in page_segments.iter().enumerate() {
            if s != NO_SEGMENT {
                segment_pages[fill[s as usize]] = page as u64;
                fill[s as usize] += 1;
            }
        }

        Ok(LaunchPlan {
            disk_segments,
            fetch_order,
            device_state_segment: ds,
            disk_chunks: waiting_disk,
            page_segments,
            zero_pages,
            segment_start,
            segment_pages,
        })
    }

    /// Number of guest memory pages.
    pub fn pages(&self) -> u64 {
        self.page_segments.len() as u64
    }

    /// The segment that must be applied before memory page `page` of the
    /// launch state is final; `None` if the page is final as soon as the
    /// [`Applier`](crate::Applier) exists (unchanged, zero, or a reference to
    /// the base), or if `page` is past the end of memory.
    pub fn page_segment(&self, page: u64) -> Option<u32> {
        let s = *self.page_segments.get(usize::try_from(page).ok()?)?;
        (s != NO_SEGMENT).then_some(s)
    }

    /// [`page_segment`](Self::page_segment) for every page at once, with
    /// [`NO_SEGMENT`] for `None`.
    pub fn page_segments(&self) -> &[u32] {
        &self.page_segments
    }

    /// Whether memory page `page` of the launch state is known to be all
    /// zeros without any data: only pages with a zero chunk entry. An
    /// unchanged page whose base page happens to be zero is not reported:
    /// the manifest alone cannot tell (the base is not part of it).
    pub fn page_is_zero(&self, page: u64) -> bool {
        page < self.pages() && self.zero_pages[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Memory pages that become final when `segment` has been applied,
    /// ascending (empty for an unknown segment).
    pub fn pages_ready_with(&self, segment: u32) -> &[u64] {
        let s = segment as usize;
        if s + 1 >= self.segment_start.len() {
            return &[];
        }
        &self.segment_pages[self.segment_start[s]..self.segment_start[s + 1]]
    }

    /// How many memory pages wait on `segment`.
    pub fn pages_waiting_on(&self, segment: u32) -> usize {
        self.pages_ready_with(segment).len()
    }

    /// Whether the launch disk is complete once `applied` segments have
    /// been applied (a predicate on segment indices).
    pub fn disk_ready(&self, applied: impl Fn(u32) -> bool) -> bool {
        self.disk_segments.iter().all(|&s| applied(s))
    }

    /// The segments that must be applied before the launch disk's bytes
    /// `[offset, offset + len)` are final (with repeats, in chunk order).
    pub fn disk_range_segments(&self, offset: u64, len: u64) -> impl Iterator<Item = u32> + '_ {
        let first = offset / PAGE_SIZE;
        let end = offset.saturating_add(len).div_ceil(PAGE_SIZE);
        let start = self.disk_chunks.partition_point(|&(c, _)| c < first);
        self.disk_chunks[start..]
            .iter()
            .take_while(move |&&(c, _)| c < end)
            .map(|&(_, s)| s)
    }

    /// A fetch order for a VM whose disk is served lazily (it may run before
    /// its disk is complete): the device state, then the segments that
    /// memory pages wait on (a running guest's working set is mostly in its
    /// memory, and its page cache holds what it read from the disk), then
    /// the others; each group in file order.
    pub fn memory_first_order(&self) -> Vec<u32> {
        let mut order = vec![self.device_state_segment];
        let (mut mem, mut rest): (Vec<u32>, Vec<u32>) = self
            .fetch_order
            .iter()
            .copied()
            .filter(|&s| s != self.device_state_segment)
            .partition(|&s| self.pages_waiting_on(s) > 0);
        mem.sort_unstable();
        rest.sort_unstable();
        order.extend(mem);
        order.extend(rest);
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{ChunkEntry, ChunkSource, SegmentCodec, SegmentInfo, Transform};

    fn seg(kind: SegmentKind, offset: u64) -> SegmentInfo {
        SegmentInfo {
            kind,
            codec: SegmentCodec::Store,
            offset,
            stored_len: 10,
            raw_len: 10,
            hash: [0; 32],
        }
    }

    fn entry(image: Image, index: u64, kind: ChunkKind) -> ChunkEntry {
        ChunkEntry {
            image,
            index,
            kind,
            hash: [0; 32],
        }
    }

    fn payload(segment: u32) -> ChunkKind {
        ChunkKind::Payload {
            segment,
            offset: 0,
            transform: Transform::Literal,
        }
    }

    fn manifest(entries: Vec<ChunkEntry>) -> Manifest {
        Manifest {
            chunk_size: 4096,
            base_id: String::new(),
            metadata: Vec::new(),
            base_disk_size: 8 * 4096,
            base_mem_size: 130 * 4096,
            disk_size: 8 * 4096,
            mem_size: 130 * 4096,
            base_disk_hash: [0; 32],
            base_mem_hash: [0; 32],
            disk_hash: [0; 32],
            mem_hash: [0; 32],
            device_state_hash: [0; 32],
            launch_hash: [0; 32],
            codec_id: 0,
            codec_level: 0,
            device_state_segment: 0,
            segments: vec![
                seg(SegmentKind::DeviceState, 0),
                seg(SegmentKind::Chunks, 10),
                seg(SegmentKind::Chunks, 20),
                seg(SegmentKind::Chunks, 30),
                seg(SegmentKind::Chunks, 40),
            ],
            entries,
            data_offset: 0,
        }
    }

    #[test]
    fn plan_of_a_hand_made_manifest() {
        let m = manifest(vec![
            entry(Image::Disk, 0, payload(4)),
            entry(
                Image::Disk,
                1,
                ChunkKind::Ref {
                    source: ChunkSource::LaunchMem,
                    index: 3,
                },
            ),
            entry(
                Image::Disk,
                2,
                ChunkKind::Ref {
                    source: ChunkSource::BaseMem,
                    index: 5,
                },
            ),
            entry(Image::Disk, 3, ChunkKind::Zero),
            entry(Image::Mem, 1, ChunkKind::Zero),
            entry(Image::Mem, 3, payload(2)),
            entry(Image::Mem, 4, payload(1)),
            entry(
                Image::Mem,
                5,
                ChunkKind::Ref {
                    source: ChunkSource::LaunchDisk,
                    index: 0,
                },
            ),
            entry(
                Image::Mem,
                6,
                ChunkKind::Ref {
                    source: ChunkSource::BaseDisk,
                    index: 0,
                },
            ),
            entry(Image::Mem, 129, payload(2)),
        ]);
        let p = LaunchPlan::new(&m).unwrap();
        assert_eq!(p.disk_segments, vec![2, 4]);
        assert_eq!(p.fetch_order, vec![0, 2, 4, 1, 3]);
        assert_eq!(p.pages(), 130);
        assert_eq!(p.page_segment(0), None);
        assert_eq!(p.page_segment(1), None);
        assert!(p.page_is_zero(1));
        assert!(!p.page_is_zero(0));
        assert!(!p.page_is_zero(3));
        assert!(!p.page_is_zero(1000));
        assert_eq!(p.page_segment(3), Some(2));
        assert_eq!(p.page_segment(4), Some(1));
        assert_eq!(p.page_segment(5), Some(4));
        assert_eq!(p.page_segment(6), None);
        assert_eq!(p.page_segment(129), Some(2));
        assert_eq!(p.page_segment(130), None);
        assert_eq!(p.pages_ready_with(2), &[3, 129]);
        assert_eq!(p.pages_ready_with(4), &[5]);
        assert_eq!(p.pages_waiting_on(1), 1);
        assert_eq!(p.pages_waiting_on(0), 0);
        assert_eq!(p.pages_waiting_on(3), 0);
        assert_eq!(p.pages_waiting_on(99), 0);
        assert!(p.disk_ready(|s| s == 2 || s == 4));
        assert!(!p.disk_ready(|s| s == 2));
        // Disk chunk 0 waits on its payload, chunk 1 on its target's;
        // chunks 2 (a base reference) and 3 (zero) on nothing.
        let segs = |off, len| p.disk_range_segments(off, len).collect::<Vec<_>>();
        assert_eq!(segs(0, 4096), vec![4]);
        assert_eq!(segs(100, 1), vec![4]);
        assert_eq!(segs(4095, 2), vec![4, 2]);
        assert_eq!(segs(0, 4 * 4096), vec![4, 2]);
        assert_eq!(segs(2 * 4096, 2 * 4096), Vec::<u32>::new());
        assert_eq!(segs(u64::MAX - 10, 100), Vec::<u32>::new());
        // Segments that memory pages wait on (1, 2, 4) come first.
        assert_eq!(p.memory_first_order(), vec![0, 1, 2, 4, 3]);
    }

    #[test]
    fn refuses_what_it_cannot_plan() {
        let mut m = manifest(vec![]);
        m.chunk_size = 8192;
        assert_eq!(
            LaunchPlan::new(&m),
            Err(EarlyStartError::ChunkSize { chunk_size: 8192 })
        );
        let mut m = manifest(vec![]);
        m.mem_size = 4096 * 3 + 1;
        assert!(matches!(
            LaunchPlan::new(&m),
            Err(EarlyStartError::MemSize { .. })
        ));
        let mut m = manifest(vec![]);
        m.device_state_segment = 1;
        assert!(matches!(
            LaunchPlan::new(&m),
            Err(EarlyStartError::DeviceStateSegment { segment: 1, .. })
        ));
        let m = manifest(vec![entry(
            Image::Mem,
            0,
            ChunkKind::Ref {
                source: ChunkSource::LaunchMem,
                index: 7,
            },
        )]);
        assert!(matches!(
            LaunchPlan::new(&m),
            Err(EarlyStartError::InvalidEntry { entry: 0, .. })
        ));
        let m = manifest(vec![entry(Image::Mem, 0, payload(0))]);
        assert!(matches!(
            LaunchPlan::new(&m),
            Err(EarlyStartError::InvalidEntry { entry: 0, .. })
        ));
        let m = manifest(vec![entry(Image::Mem, 0, payload(9))]);
        assert!(matches!(
            LaunchPlan::new(&m),
            Err(EarlyStartError::InvalidEntry { entry: 0, .. })
        ));
    }

    #[test]
    fn empty_memory_and_no_entries() {
        let mut m = manifest(vec![]);
        m.mem_size = 0;
        let p = LaunchPlan::new(&m).unwrap();
        assert_eq!(p.pages(), 0);
        assert!(p.disk_segments.is_empty());
        assert_eq!(p.fetch_order, vec![0, 1, 2, 3, 4]);
        assert!(!p.page_is_zero(0));
    }
}
