//! Verification of the moved guest memory, cheap enough for the downtime.
//!
//! QEMU 7.2 under TCG was seen to lose dirty pages in some moves (the
//! destination's RAM then differs from the source's in a few pages): before
//! a handoff commits, both sides digest the guest's RAM file and the
//! destination resumes only an identical copy.
//!
//! A digest is an XXH3-128 per 4 KiB page (memory-bandwidth bound: ~30 ms
//! per GiB on 2 threads here, against 0.2-0.6 s for BLAKE3 of the whole file
//! with the daemons busy) and, per 1 MiB chunk, an XXH3-128 over its pages'
//! digests. The chunk digests (16 KiB per GiB) travel in the session stream
//! (`session::memory_digest_frame`); the destination compares them with its
//! own and names the chunks that differ ([`DiffReport`], with its page
//! digests of those chunks), so that the source can send the pages that
//! differ (`session::memory_page_frame`) instead of failing the move.
//!
//! This detects accidental differences (lost pages, codec or load bugs), not
//! an adversary: XXH3 is not a cryptographic hash. A real difference is
//! never hidden by the check itself: equal chunk digests need equal page
//! digests, and a page's digest covers all of its bytes.
//!
//! RAM files are read only where they hold data (`SEEK_DATA`): a hole reads
//! as zeros, and reading it through a mapping would allocate it on a tmpfs.

use std::fs::File;
use std::path::Path;

use xxhash_rust::xxh3::xxh3_128;

/// Guest page size the digests are made of.
pub const PAGE: usize = 4096;
/// Bytes per chunk digest (a multiple of `PAGE`).
pub const CHUNK: usize = 1 << 20;
/// Pages per chunk.
pub const CHUNK_PAGES: usize = CHUNK / PAGE;
/// More differing chunks than this: no repair (something is badly wrong;
/// the move fails and the VM stays at the source).
pub const MAX_REPAIR_CHUNKS: usize = 16;

/// Digests of a RAM image: one per page, and one per chunk over those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryDigest {
    /// Length of the RAM file.
    pub ram_len: u64,
    /// XXH3-128 per page (a short last page is hashed as it is).
    pub pages: Vec<u128>,
    /// XXH3-128 over the chunk's page digests (little endian).
    pub chunks: Vec<u128>,
}

impl MemoryDigest {
    /// One digest for logs and reports.
    pub fn root(&self) -> u128 {
        xxh3_128(&digest_bytes(&self.chunks))
    }

    /// The chunks whose digests differ from `other`'s (all of them when the
    /// RAM sizes differ).
    pub fn differing_chunks(&self, other: &[u128]) -> Vec<usize> {
        if other.len() != self.chunks.len() {
            return (0..self.chunks.len().max(other.len())).collect();
        }
        (0..self.chunks.len())
            .filter(|&i| self.chunks[i] != other[i])
            .collect()
    }

    /// The pages of `chunk`.
    pub fn chunk_pages(&self, chunk: usize) -> &[u128] {
        let a = (chunk * CHUNK_PAGES).min(self.pages.len());
        let b = ((chunk + 1) * CHUNK_PAGES).min(self.pages.len());
        &self.pages[a..b]
    }

    /// What the destination tells the source about `chunks`.
    pub fn report(&self, chunks: &[usize]) -> DiffReport {
        DiffReport {
            chunks: chunks
                .iter()
                .map(|&c| {
                    (
                        c as u64,
                        self.chunk_pages(c).iter().map(|p| short(*p)).collect(),
                    )
                })
                .collect(),
        }
    }

    /// Recompute the chunk digests of `chunks` from the page digests.
    fn rechunk(&mut self, chunks: impl IntoIterator<Item = usize>) {
        for c in chunks {
            if c < self.chunks.len() {
                self.chunks[c] = xxh3_128(&digest_bytes(self.chunk_pages(c)));
            }
        }
    }
}

fn digest_bytes(d: &[u128]) -> Vec<u8> {
    d.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A page digest as the diff report carries it.
fn short(d: u128) -> u64 {
    d as u64
}

const MADV_POPULATE_READ: libc::c_int = 22;

/// The digest of a page of zeros (a hole).
fn zero_page() -> u128 {
    static Z: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *Z.get_or_init(|| xxh3_128(&[0u8; PAGE]))
}

/// A guest RAM file, mapped once: a source maps it while the VM still runs
/// (`warm`), so that the digest at the switchover reads memory without page
/// faults.
pub struct RamFile {
    file: File,
    map: memmap2::Mmap,
    len: u64,
}

impl RamFile {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        // SAFETY: read-only shared mapping of a file that QEMU writes while
        // we read it; we only ever hash the bytes (a torn page gives a
        // digest that differs, which the caller treats as a difference).
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(RamFile { file, map, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Digest of the whole file on `threads` threads.
    pub fn digest(&self, threads: usize) -> std::io::Result<MemoryDigest> {
        let npages = self.len.div_ceil(PAGE as u64) as usize;
        let mut d = MemoryDigest {
            ram_len: self.len,
            pages: vec![zero_page(); npages],
            chunks: vec![0; npages.div_ceil(CHUNK_PAGES)],
        };
        let extents = cloudlet_sparse::data_extents(&self.file, 0..self.len)?;
        self.hash_extents(&extents, &mut d.pages, threads);
        let all = 0..d.chunks.len();
        d.rechunk(all);
        Ok(d)
    }

    /// Map the pages that hold data into our page tables now (the kernel
    /// does it in bulk), so that a digest later reads them without a page
    /// fault each. Holes stay holes. Best effort.
    pub fn populate(&self) {
        let Ok(extents) = cloudlet_sparse::data_extents(&self.file, 0..self.len) else {
            return;
        };
        let base = self.map.as_ptr() as usize;
        for (s, e) in extents {
            let a = s / PAGE as u64 * PAGE as u64;
            let b = e.min(self.len);
            if b <= a {
                continue;
            }
            // SAFETY: a range inside our own mapping; MADV_POPULATE_READ
            // (Linux 5.14) only faults pages in for reading.
            unsafe {
                libc::madvise(
                    (base + a as usize) as *mut libc::c_void,
                    (b - a) as usize,
                    MADV_POPULATE_READ,
                );
            }
        }
    }

    /// Re-digest the pages of `chunks` into `d` (after they were written).
    pub fn redigest_chunks(&self, d: &mut MemoryDigest, chunks: &[usize]) -> std::io::Result<()> {
        self.digest_chunks_into(&mut d.pages, chunks, 1)?;
        d.rechunk(chunks.iter().copied());
        Ok(())
    }

    /// Digest the pages of `chunks` (sorted) into `pages`.
    fn digest_chunks_into(
        &self,
        pages: &mut [u128],
        chunks: &[usize],
        threads: usize,
    ) -> std::io::Result<()> {
        let mut ext = Vec::new();
        // Runs of consecutive chunks: their data, found within the run only.
        let mut i = 0;
        while i < chunks.len() {
            let mut j = i + 1;
            while j < chunks.len() && chunks[j] == chunks[j - 1] + 1 {
                j += 1;
            }
            let (a, b) = (
                (chunks[i] * CHUNK) as u64,
                (((chunks[j - 1] + 1) * CHUNK) as u64).min(self.len),
            );
            for p in a / PAGE as u64..b.div_ceil(PAGE as u64) {
                if let Some(d) = pages.get_mut(p as usize) {
                    *d = zero_page();
                }
            }
            ext.extend(cloudlet_sparse::data_extents(&self.file, a..b)?);
            i = j;
        }
        self.hash_extents(&ext, pages, threads);
        Ok(())
    }

    /// The chunks that hold data.
    fn chunks_with_data(&self) -> std::io::Result<Vec<usize>> {
        let mut out: Vec<usize> = Vec::new();
        for (s, e) in cloudlet_sparse::data_extents(&self.file, 0..self.len)? {
            for c in s as usize / CHUNK..(e as usize).div_ceil(CHUNK) {
                if out.last() != Some(&c) {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    /// The bytes of page `page` (for a repair).
    pub fn page(&self, page: usize) -> &[u8] {
        let a = (page * PAGE).min(self.map.len());
        let b = (a + PAGE).min(self.map.len());
        &self.map[a..b]
    }

    /// Hash the pages of `extents` (page-aligned outward) into `pages`.
    fn hash_extents(&self, extents: &[(u64, u64)], pages: &mut [u128], threads: usize) {
        // Page ranges, split so that the threads get similar work.
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for &(s, e) in extents {
            let (mut a, b) = (
                (s / PAGE as u64) as usize,
                (e.div_ceil(PAGE as u64) as usize).min(pages.len()),
            );
            while a < b {
                let n = (b - a).min(CHUNK_PAGES);
                ranges.push((a, a + n));
                a += n;
            }
        }
        let map: &[u8] = &self.map;
        let hash_range = |(a, b): (usize, usize)| -> Vec<u128> {
            (a..b)
                .map(|p| {
                    let lo = (p * PAGE).min(map.len());
                    xxh3_128(&map[lo..(lo + PAGE).min(map.len())])
                })
                .collect()
        };
        let threads = threads.max(1).min(ranges.len().max(1));
        if threads == 1 {
            for r in ranges {
                let h = hash_range(r);
                pages[r.0..r.1].copy_from_slice(&h);
            }
            return;
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<Vec<Hashed>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&r) = ranges.get(i) else { break };
                            out.push((r, hash_range(r)));
                        }
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .collect()
        });
        let mut done = 0;
        for (r, h) in results.into_iter().flatten() {
            pages[r.0..r.1].copy_from_slice(&h);
            done += 1;
        }
        // A worker that panicked left its ranges out: hash them here rather
        // than leave zero-page digests standing for data.
        if done < ranges.len() {
            for r in ranges {
                let h = hash_range(r);
                pages[r.0..r.1].copy_from_slice(&h);
            }
        }
    }
}

/// The destination's digest, made while the stream arrives: a chunk is
/// digested in the background once QEMU has applied every record written
/// to it so far, and again at the end only if a later record touched it.
/// What is left at the end is then the last pass's chunks, not the whole
/// RAM.
///
/// Positions count the migration stream's bytes written to QEMU's socket.
/// The receive loop notes, before it writes a batch, the batch's end
/// position for every chunk the batch touches (`touched`), and after
/// writing, a position up to which QEMU has surely applied the stream
/// (`set_applied`: written, minus what still sits unread in the socket,
/// minus a margin for QEMU's own buffer, 32 KiB in 7.2; QEMU applies a
/// precopy stream in order as it reads it). A chunk digested when its
/// position was `t <= applied` holds every record up to `t`; if its
/// position is still `t` once QEMU has loaded everything, nothing touched
/// it since, and the digest stands. Anything else is digested again at the
/// end. Only records of the stream may write the RAM file meanwhile (QEMU
/// loading it).
pub struct IncrementalDigest {
    ram: std::sync::Arc<RamFile>,
    touch: Vec<std::sync::atomic::AtomicU64>,
    applied: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
}

/// What `IncrementalDigest::finish` did.
#[derive(Debug, Clone, Copy)]
pub struct FinishStats {
    /// Chunks digested again.
    pub chunks: usize,
    /// Time digesting their pages, and then all chunk digests (µs).
    pub pages_us: u64,
    pub chunks_us: u64,
}

/// What the background digest made (`IncrementalDigest::run`).
pub struct DigestProgress {
    pages: Vec<u128>,
    /// Per chunk, the position it was digested at.
    done_at: Vec<u64>,
    /// Bytes digested in the background.
    pub bytes: u64,
}

impl IncrementalDigest {
    /// For a RAM file that QEMU is about to load; chunks that already hold
    /// data count as touched.
    pub fn new(ram: std::sync::Arc<RamFile>) -> std::io::Result<Self> {
        let n = (ram.len().div_ceil(PAGE as u64) as usize).div_ceil(CHUNK_PAGES);
        let touch: Vec<_> = (0..n)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        for c in ram.chunks_with_data()? {
            if let Some(t) = touch.get(c) {
                t.store(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(IncrementalDigest {
            ram,
            touch,
            applied: Default::default(),
            stop: Default::default(),
        })
    }

    /// `pages` will be rewritten by the stream up to position `end` (call
    /// before writing them to QEMU).
    pub fn touched(&self, pages: &[u64], end: u64) {
        for p in pages {
            if let Some(t) = self.touch.get(*p as usize / CHUNK_PAGES) {
                t.fetch_max(end.max(1), std::sync::atomic::Ordering::AcqRel);
            }
        }
    }

    /// QEMU has surely applied the stream up to `pos`.
    pub fn set_applied(&self, pos: u64) {
        self.applied
            .fetch_max(pos, std::sync::atomic::Ordering::AcqRel);
    }

    /// Ends `run`.
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Background: every `period`, digest the chunks that were touched
    /// since they were digested and whose records are all applied; until
    /// `stop`.
    pub fn run(&self, period: std::time::Duration) -> DigestProgress {
        use std::sync::atomic::Ordering;
        let n = self.touch.len();
        let npages = self.ram.len().div_ceil(PAGE as u64) as usize;
        let mut p = DigestProgress {
            pages: vec![zero_page(); npages],
            done_at: vec![0; n],
            bytes: 0,
        };
        while !self.stop.load(Ordering::Acquire) {
            let applied = self.applied.load(Ordering::Acquire);
            let mut ready = Vec::new();
            let mut at = Vec::new();
            for c in 0..n {
                let t = self.touch[c].load(Ordering::Acquire);
                if t > p.done_at[c] && t <= applied {
                    ready.push(c);
                    at.push(t);
                }
            }
            // In batches, so that a stop is not kept waiting.
            for (cs, ts) in ready.chunks(8).zip(at.chunks(8)) {
                if self.stop.load(Ordering::Acquire) {
                    break;
                }
                if self.ram.digest_chunks_into(&mut p.pages, cs, 1).is_err() {
                    continue; // digested again at the end
                }
                for (c, t) in cs.iter().zip(ts) {
                    p.done_at[*c] = *t;
                }
                p.bytes += (cs.len() * CHUNK) as u64;
            }
            let until = std::time::Instant::now() + period;
            while std::time::Instant::now() < until && !self.stop.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        p
    }

    /// Once QEMU has loaded the whole stream: digest again what was touched
    /// since `run` digested it. Returns the digest and what it took.
    pub fn finish(
        &self,
        mut p: DigestProgress,
        threads: usize,
    ) -> std::io::Result<(MemoryDigest, FinishStats)> {
        use std::sync::atomic::Ordering;
        let t = std::time::Instant::now();
        let stale: Vec<usize> = (0..self.touch.len())
            .filter(|&c| self.touch[c].load(Ordering::Acquire) != p.done_at[c])
            .collect();
        self.ram.digest_chunks_into(&mut p.pages, &stale, threads)?;
        let pages = t.elapsed();
        let mut d = MemoryDigest {
            ram_len: self.ram.len(),
            pages: p.pages,
            chunks: vec![0; self.touch.len()],
        };
        d.rechunk(0..self.touch.len());
        Ok((
            d,
            FinishStats {
                chunks: stale.len(),
                pages_us: pages.as_micros() as u64,
                chunks_us: (t.elapsed() - pages).as_micros() as u64,
            },
        ))
    }
}

/// A range of pages and their digests.
type Hashed = ((usize, usize), Vec<u128>);

/// The hashing threads to use: all cores.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// What the destination found different: per chunk, its page digests (64
/// bits each), so that the source sends only the pages that differ.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiffReport {
    pub chunks: Vec<(u64, Vec<u64>)>,
}

/// Marks the report inside an error message (the destination refuses the
/// commit with it; the message crosses as text).
const TOKEN_START: &str = "[memdiff:";

impl DiffReport {
    /// `[memdiff:CHUNK=HEX;CHUNK=HEX]`, HEX the page digests.
    pub fn to_token(&self) -> String {
        let mut s = String::from(TOKEN_START);
        for (i, (c, pages)) in self.chunks.iter().enumerate() {
            if i > 0 {
                s.push(';');
            }
            s.push_str(&c.to_string());
            s.push('=');
            for p in pages {
                s.push_str(&format!("{p:016x}"));
            }
        }
        s.push(']');
        s
    }

    /// The report inside `message`, if there is a well-formed one.
    pub fn from_message(message: &str) -> Option<DiffReport> {
        let start = message.find(TOKEN_START)? + TOKEN_START.len();
        let body = &message[start..start + message[start..].find(']')?];
        let mut chunks = Vec::new();
        for part in body.split(';').filter(|p| !p.is_empty()) {
            let (c, hex) = part.split_once('=')?;
            if hex.len() % 16 != 0 || hex.len() / 16 > CHUNK_PAGES {
                return None;
            }
            let pages = (0..hex.len() / 16)
                .map(|i| u64::from_str_radix(hex.get(i * 16..i * 16 + 16)?, 16).ok())
                .collect::<Option<Vec<u64>>>()?;
            chunks.push((c.parse().ok()?, pages));
        }
        Some(DiffReport { chunks })
    }

    /// The pages of the source's `ours` that the destination lacks: those
    /// whose digests differ from the report's (every page of a chunk whose
    /// page count differs).
    pub fn pages_to_send(&self, ours: &MemoryDigest) -> Vec<usize> {
        let mut out = Vec::new();
        for (c, theirs) in &self.chunks {
            let c = *c as usize;
            if c * CHUNK_PAGES >= ours.pages.len() {
                continue;
            }
            let mine = ours.chunk_pages(c);
            for (i, p) in mine.iter().enumerate() {
                if theirs.get(i) != Some(&short(*p)) {
                    out.push(c * CHUNK_PAGES + i);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn ram(len: u64, writes: &[(u64, u8)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        for &(off, b) in writes {
            f.as_file().write_all_at(&[b; 100], off).unwrap();
        }
        f
    }

    #[test]
    fn equal_files_equal_digests_holes_or_zeros() {
        let a = ram(4 << 20, &[(5000, 1), (3 << 20, 9)]);
        let b = ram(4 << 20, &[(5000, 1), (3 << 20, 9)]);
        // Zeros written where `a` has a hole: same content, same digest.
        b.as_file().write_all_at(&[0u8; 8192], 2 << 20).unwrap();
        let da = RamFile::open(a.path()).unwrap().digest(2).unwrap();
        let db = RamFile::open(b.path()).unwrap().digest(1).unwrap();
        assert_eq!(da, db);
        assert_eq!(da.chunks.len(), 4);
        assert!(da.differing_chunks(&db.chunks).is_empty());
    }

    #[test]
    fn one_byte_differs_one_chunk_one_page() {
        let src = ram(4 << 20, &[(5000, 1), (3 << 20, 9)]);
        let dst = ram(4 << 20, &[(5000, 1), (3 << 20, 9)]);
        dst.as_file()
            .write_all_at(&[7], (2 << 20) + 4096 * 3 + 17)
            .unwrap();
        let s = RamFile::open(src.path()).unwrap().digest(2).unwrap();
        let d = RamFile::open(dst.path()).unwrap().digest(2).unwrap();
        let diff = d.differing_chunks(&s.chunks);
        assert_eq!(diff, vec![2]);
        // The report crosses as text inside an error message.
        let msg = format!("Refused: memory differs {}", d.report(&diff).to_token());
        let report = DiffReport::from_message(&msg).unwrap();
        assert_eq!(report, d.report(&diff));
        let pages = report.pages_to_send(&s);
        assert_eq!(pages, vec![2 * CHUNK_PAGES + 3]);
        // Repair: the source's page written over the destination's.
        let sf = RamFile::open(src.path()).unwrap();
        for p in &pages {
            dst.as_file()
                .write_all_at(sf.page(*p), (*p * PAGE) as u64)
                .unwrap();
        }
        let df = RamFile::open(dst.path()).unwrap();
        let mut d2 = d.clone();
        df.redigest_chunks(&mut d2, &diff).unwrap();
        assert!(d2.differing_chunks(&s.chunks).is_empty());
        assert_eq!(d2, s);
    }

    /// The incremental digest equals a full one, whatever was written
    /// before, during and after its background runs.
    #[test]
    fn incremental_digest_equals_the_full_one() {
        use std::sync::Arc;
        let f = ram(8 << 20, &[(3 << 20, 4)]); // data before the stream
        let rf = Arc::new(RamFile::open(f.path()).unwrap());
        let inc = Arc::new(IncrementalDigest::new(rf.clone()).unwrap());
        let bg = {
            let inc = inc.clone();
            std::thread::spawn(move || inc.run(std::time::Duration::from_millis(1)))
        };
        let mut pos = 0u64;
        let mut write = |page: u64, b: u8| {
            pos += 4096;
            inc.touched(&[page], pos);
            f.as_file().write_all_at(&[b; 4096], page * 4096).unwrap();
            inc.set_applied(pos);
            pos
        };
        for round in 0..5u8 {
            for page in (0..2048u64).step_by(97) {
                write(page, round + 1);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        write(5, 0); // a page back to zeros
        let pos = write(2047, 9) + 4096;
        // A record written but not known applied: digested at the end.
        inc.touched(&[1000], pos);
        f.as_file().write_all_at(&[7; 4096], 1000 * 4096).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        inc.stop();
        let p = bg.join().unwrap();
        assert!(p.bytes > 0);
        let (d, stats) = inc.finish(p, 2).unwrap();
        assert!(stats.chunks >= 1);
        assert_eq!(d, rf.digest(2).unwrap());
    }

    #[test]
    fn bad_reports_are_none() {
        for m in [
            "no token",
            "[memdiff:1=xyz]",
            "[memdiff:1=0123]",
            "[memdiff:x=0000000000000000]",
            "[memdiff:1=0000000000000000",
        ] {
            assert_eq!(DiffReport::from_message(m), None, "{m}");
        }
        assert_eq!(
            DiffReport::from_message("[memdiff:]"),
            Some(DiffReport::default())
        );
    }

    #[test]
    fn sizes_that_differ_differ_everywhere() {
        let a = RamFile::open(ram(2 << 20, &[]).path())
            .unwrap()
            .digest(1)
            .unwrap();
        let b = RamFile::open(ram(3 << 20, &[]).path())
            .unwrap()
            .digest(1)
            .unwrap();
        assert_eq!(a.differing_chunks(&b.chunks), vec![0, 1, 2]);
    }
}
