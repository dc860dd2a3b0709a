//! File helpers: hole punching, temporary outputs (sparse copies and
//! holes: `cloudlet-sparse`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file written under a temporary name next to its destination, renamed
/// into place by `commit` and removed on drop otherwise.
pub(crate) struct TempOutput {
    pub(crate) file: File,
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl TempOutput {
    pub(crate) fn create(dest: &Path) -> io::Result<TempOutput> {
        let name = dest.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "destination has no file name")
        })?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = dest.with_file_name(format!(
            ".{}.partial-{}-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        Ok(TempOutput {
            file,
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Write straight at `dest` (no rename at commit; removed if dropped
    /// uncommitted), for readers that open the file while it is written.
    pub(crate) fn create_in_place(dest: &Path) -> io::Result<TempOutput> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dest)?;
        Ok(TempOutput {
            file,
            tmp: dest.to_path_buf(),
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Like [`create_in_place`](Self::create_in_place), but `dest` exists
    /// and its contents are kept (it already holds a copy of the base).
    pub(crate) fn open_in_place(dest: &Path) -> io::Result<TempOutput> {
        let file = OpenOptions::new().read(true).write(true).open(dest)?;
        Ok(TempOutput {
            file,
            tmp: dest.to_path_buf(),
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub(crate) fn dest(&self) -> &Path {
        &self.dest
    }

    /// Renames the file into place.
    pub(crate) fn commit(mut self, sync: bool) -> io::Result<()> {
        if sync {
            self.file.sync_all()?;
        }
        if self.tmp != self.dest {
            std::fs::rename(&self.tmp, &self.dest)?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Makes `[offset, offset + len)` read as zeros, punching a hole if possible.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut pos = offset;
    while pos < offset + len {
        let n = ((offset + len - pos) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes at `offset` from a file of `size` bytes;
/// bytes past the end read as zero.
pub(crate) fn read_padded(file: &File, size: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    file.read_exact_at(&mut buf[..avail], offset)?;
    buf[avail..].fill(0);
    Ok(())
}
