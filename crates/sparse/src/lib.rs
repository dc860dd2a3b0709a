//! Sparse files: where a file holds data, and a copy that keeps its holes.
//!
//! A VM's RAM file and disk are mostly holes. Reading only their data
//! extents (`lseek` with `SEEK_DATA`/`SEEK_HOLE`) is what makes a memory
//! digest, a disk sync or a snapshot copy cost what the guest wrote rather
//! than what it was given. Every crate that does so (overlay, qemu,
//! handoff, the daemon) uses this one: safe code on [`rustix::fs::seek`].
//!
//! The rules, the same for every caller:
//! - `ENXIO` from `SEEK_DATA` means no data after the offset: the rest is a
//!   hole (also for an offset at or past the end of the file);
//! - a file system that cannot tell (`EINVAL`, `EOPNOTSUPP`) has the rest
//!   of the range as data, so a caller reads too much, never too little;
//! - any other error is returned.
//!
//! The seeks move the file's position; callers read and write with
//! positional I/O (`read_at`, `copy_file_range` with offsets).
//!
//! Extents are `(start, end)` byte offsets, `end` exclusive, sorted and
//! not overlapping, clipped to the range asked for. Their boundaries are
//! the file system's blocks: a block holds data even where its bytes are
//! zero, so an extent may contain zeros but a hole never contains data.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use rustix::fs::{seek, SeekFrom};
use rustix::io::Errno;

/// A `(start, end)` byte range of a file that holds data, `end` exclusive.
pub type Extent = (u64, u64);

/// Whether an error of `SEEK_DATA`/`SEEK_HOLE` means the file system cannot
/// tell holes from data.
fn cannot_tell(e: Errno) -> bool {
    matches!(e, Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS)
}

/// The first offset at or after `from` that holds data; None when only a
/// hole (or the end of the file) follows. `Some(from)` when the file system
/// cannot tell.
pub fn next_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    match seek(file, SeekFrom::Data(from)) {
        Ok(at) => Ok(Some(at)),
        Err(Errno::NXIO) => Ok(None),
        Err(e) if cannot_tell(e) => Ok(Some(from)),
        Err(e) => Err(e.into()),
    }
}

/// The first hole at or after `from` (a file's end counts as a hole); the
/// end of the file when the file system cannot tell.
fn next_hole(file: &File, from: u64) -> io::Result<u64> {
    match seek(file, SeekFrom::Hole(from)) {
        Ok(at) => Ok(at),
        // `from` at or past the end: nothing follows.
        Err(Errno::NXIO) => Ok(from),
        Err(e) if cannot_tell(e) => Ok(file.metadata()?.len().max(from)),
        Err(e) => Err(e.into()),
    }
}

/// The data extents of `file` within `range` (see the module doc).
pub fn data_extents(file: &File, range: Range<u64>) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut pos = range.start;
    while pos < range.end {
        let Some(data) = next_data(file, pos)? else {
            break;
        };
        if data >= range.end {
            break;
        }
        let hole = next_hole(file, data)?;
        if hole <= data {
            // The file shrank between the two seeks: nothing more to read.
            break;
        }
        let end = hole.min(range.end);
        out.push((data, end));
        pos = end;
    }
    Ok(out)
}

/// Whether `[start, start + len)` of `file` is one hole (reads as zeros
/// without touching the disk). False when unknown (an error).
pub fn is_hole(file: &File, start: u64, len: u64) -> bool {
    match next_data(file, start) {
        Ok(None) => true,
        Ok(Some(data)) => data >= start.saturating_add(len),
        Err(_) => false,
    }
}

/// Copies the first `len` bytes of `src` into `dst` at the same offsets,
/// only its data extents (in-kernel where the file systems can), and sets
/// `dst`'s length to `len`. The holes of `src` stay holes in `dst` when
/// `dst` starts empty; what `dst` held in them is left as it was, so give
/// it an empty (new or truncated) file. Returns the bytes of data copied.
/// `dst` is not synced.
pub fn copy_sparse(src: &File, dst: &File, len: u64) -> io::Result<u64> {
    dst.set_len(len)?;
    let mut copied = 0;
    for (start, end) in data_extents(src, 0..len)? {
        copy_range(src, dst, start, end)?;
        copied += end - start;
    }
    Ok(copied)
}

/// Copies `[start, end)` with `copy_file_range`, by reading and writing
/// where that is not supported (across file systems, old kernels).
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (start, start);
    while off_in < end {
        let want = (end - off_in).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => return Err(shrank()),
            Ok(_) => {}
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                return copy_range_plain(src, dst, off_in, end);
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Copies `[start, end)` by reading and writing; blocks of zeros are not
/// written (they stay holes in an empty `dst`).
fn copy_range_plain(src: &File, dst: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = start;
    while pos < end {
        let n = ((end - pos) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], pos).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                shrank()
            } else {
                e
            }
        })?;
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], pos)?;
        }
        pos += n as u64;
    }
    Ok(())
}

fn shrank() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "Source file shrank while being copied",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    /// A file of `len` bytes, holes but for `writes` (offset, bytes).
    fn sparse(dir: &tempfile::TempDir, name: &str, len: u64, writes: &[(u64, &[u8])]) -> File {
        let path = dir.path().join(name);
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        f.set_len(len).unwrap();
        for (at, bytes) in writes {
            f.write_all_at(bytes, *at).unwrap();
        }
        f.sync_all().unwrap();
        f
    }

    /// A directory on the disk's file system, and one on a tmpfs (where
    /// RAM files live) if the machine has /dev/shm.
    fn dirs() -> Vec<tempfile::TempDir> {
        let mut d = vec![tempfile::tempdir().unwrap()];
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            d.push(shm);
        }
        d
    }

    /// Whether an extent covers `[a, b)`.
    fn covered(extents: &[Extent], a: u64, b: u64) -> bool {
        extents.iter().any(|&(s, e)| s <= a && b <= e)
    }

    fn well_formed(extents: &[Extent], range: Range<u64>) {
        for w in extents.windows(2) {
            assert!(w[0].1 <= w[1].0, "{extents:?}");
        }
        for &(s, e) in extents {
            assert!(s < e && range.start <= s && e <= range.end, "{extents:?}");
        }
    }

    #[test]
    fn finds_data_between_holes() {
        for dir in dirs() {
            finds_data_between_holes_in(&dir);
        }
    }

    fn finds_data_between_holes_in(dir: &tempfile::TempDir) {
        let f = sparse(dir, "f", 8 * MIB, &[(3 * MIB, b"middle")]);
        let ext = data_extents(&f, 0..8 * MIB).unwrap();
        well_formed(&ext, 0..8 * MIB);
        assert!(covered(&ext, 3 * MIB, 3 * MIB + 6), "{ext:?}");
        // Holes before and after: at most the file system's block holds data.
        assert_eq!(ext.len(), 1, "{ext:?}");
        assert!(ext[0].1 - ext[0].0 <= MIB, "{ext:?}");
        assert!(is_hole(&f, 0, 3 * MIB));
        assert!(!is_hole(&f, 0, 3 * MIB + 1));
        assert!(is_hole(&f, 4 * MIB, 4 * MIB));
    }

    #[test]
    fn finds_data_at_the_start_and_at_the_end() {
        for dir in dirs() {
            finds_data_at_the_start_and_at_the_end_in(&dir);
        }
    }

    fn finds_data_at_the_start_and_at_the_end_in(dir: &tempfile::TempDir) {
        let len = 8 * MIB;
        let f = sparse(dir, "f", len, &[(0, b"start"), (len - 3, b"end")]);
        let ext = data_extents(&f, 0..len).unwrap();
        well_formed(&ext, 0..len);
        assert_eq!(ext.len(), 2, "{ext:?}");
        assert_eq!(ext[0].0, 0);
        assert_eq!(ext[1].1, len);
        // A range in the middle sees none; one that cuts an extent is clipped.
        assert!(data_extents(&f, MIB..7 * MIB).unwrap().is_empty());
        let tail = data_extents(&f, len - 2..len).unwrap();
        assert_eq!(tail, vec![(len - 2, len)]);
        assert!(!is_hole(&f, 0, 1));
    }

    #[test]
    fn an_empty_file_and_a_file_all_hole_have_no_data() {
        for dir in dirs() {
            an_empty_file_and_a_file_all_hole_have_no_data_in(&dir);
        }
    }

    fn an_empty_file_and_a_file_all_hole_have_no_data_in(dir: &tempfile::TempDir) {
        let empty = sparse(dir, "empty", 0, &[]);
        assert!(data_extents(&empty, 0..0).unwrap().is_empty());
        assert!(data_extents(&empty, 0..MIB).unwrap().is_empty());
        assert_eq!(next_data(&empty, 0).unwrap(), None);
        let hole = sparse(dir, "hole", 16 * MIB, &[]);
        assert!(data_extents(&hole, 0..16 * MIB).unwrap().is_empty());
        assert!(is_hole(&hole, 0, 16 * MIB));
        // Past the end: nothing, not an error.
        assert!(data_extents(&hole, 32 * MIB..64 * MIB).unwrap().is_empty());
    }

    #[test]
    fn a_file_all_data_is_one_extent() {
        for dir in dirs() {
            a_file_all_data_is_one_extent_in(&dir);
        }
    }

    fn a_file_all_data_is_one_extent_in(dir: &tempfile::TempDir) {
        let f = sparse(dir, "f", 0, &[(0, &vec![1u8; 3 * MIB as usize])]);
        assert_eq!(data_extents(&f, 0..3 * MIB).unwrap(), vec![(0, 3 * MIB)]);
    }

    #[test]
    fn a_sparse_copy_keeps_the_data_the_size_and_the_holes() {
        for dir in dirs() {
            a_sparse_copy_keeps_the_data_the_size_and_the_holes_in(&dir);
        }
    }

    fn a_sparse_copy_keeps_the_data_the_size_and_the_holes_in(dir: &tempfile::TempDir) {
        let len = 64 * MIB + 5;
        let src = sparse(
            dir,
            "src",
            len,
            &[(0, b"first"), (20 * MIB, &[7u8; 4096]), (len - 3, b"end")],
        );
        let dst = sparse(dir, "dst", 0, &[]);
        let copied = copy_sparse(&src, &dst, len).unwrap();
        assert!((4096 + 8..4 * MIB).contains(&copied), "{copied}");
        let (a, b) = (
            std::fs::read(dir.path().join("src")).unwrap(),
            std::fs::read(dir.path().join("dst")).unwrap(),
        );
        assert_eq!(a.len() as u64, len);
        assert!(a == b);
        // Still sparse: a few blocks allocated, not 64 MiB.
        let blocks = dst.metadata().unwrap().blocks() * 512;
        assert!(blocks < 4 * MIB, "{blocks} bytes allocated");
        assert_eq!(
            data_extents(&dst, 0..len).unwrap(),
            data_extents(&src, 0..len).unwrap()
        );
    }

    #[test]
    fn a_sparse_copy_of_a_prefix_stops_at_len() {
        for dir in dirs() {
            a_sparse_copy_of_a_prefix_stops_at_len_in(&dir);
        }
    }

    fn a_sparse_copy_of_a_prefix_stops_at_len_in(dir: &tempfile::TempDir) {
        let src = sparse(dir, "src", 8 * MIB, &[(MIB, b"in"), (6 * MIB, b"out")]);
        let dst = sparse(dir, "dst", 0, &[]);
        copy_sparse(&src, &dst, 4 * MIB).unwrap();
        let b = std::fs::read(dir.path().join("dst")).unwrap();
        assert_eq!(b.len() as u64, 4 * MIB);
        assert_eq!(&b[MIB as usize..MIB as usize + 2], b"in");
        let plain = sparse(dir, "plain", 0, &[]);
        copy_range_plain(&src, &plain, MIB, MIB + 4096).unwrap();
        assert_eq!(
            &std::fs::read(dir.path().join("plain")).unwrap()[MIB as usize..][..2],
            b"in"
        );
    }
}
