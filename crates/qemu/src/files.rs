//! File helpers shared by snapshot and base-image code: sparse copies, sizes,
//! atomic writes.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Copy `src` to `dst` (created or truncated), keeping holes: only the data
/// ranges found with `SEEK_DATA`/`SEEK_HOLE` are copied, in-kernel.
pub fn copy_sparse(src: &Path, dst: &Path) -> std::io::Result<u64> {
    let input = File::open(src)?;
    let len = input.metadata()?.len();
    let output = File::create(dst)?;
    output.set_len(len)?;
    let (ifd, ofd) = (input.as_raw_fd(), output.as_raw_fd());
    let mut pos: i64 = 0;
    let mut copied = 0u64;
    while (pos as u64) < len {
        // SAFETY: lseek on an open fd.
        let data = unsafe { libc::lseek(ifd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(ifd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            let want = (hole - off_in) as usize;
            // SAFETY: valid fds and offset pointers.
            let n = unsafe { libc::copy_file_range(ifd, &mut off_in, ofd, &mut off_out, want, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // Across file systems, or not supported: copy by hand.
                    Some(libc::EXDEV)
                    | Some(libc::EINVAL)
                    | Some(libc::ENOSYS)
                    | Some(libc::EOPNOTSUPP) => {
                        copied += copy_range(&input, &output, off_in as u64, hole as u64)?;
                        off_in = hole;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                break;
            }
            copied += n as u64;
        }
        pos = hole;
    }
    output.sync_data()?;
    Ok(copied)
}

/// Copy `[from, to)` of `input` to the same offsets of `output`.
fn copy_range(input: &File, output: &File, from: u64, to: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = from;
    while pos < to {
        let want = ((to - pos) as usize).min(buf.len());
        let n = input.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            break;
        }
        output.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(pos - from)
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    #[test]
    fn sparse_copy_keeps_data_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        f.seek(SeekFrom::Start((8 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        copy_sparse(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
