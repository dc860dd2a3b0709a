//! Early start: restore a saved VM whose memory has not fully arrived yet.
//!
//! The daemon plays the *source* of a QEMU 7.2 postcopy migration. The
//! destination QEMU (`-incoming`, capability `postcopy-ram`) gets the device
//! state at once and starts the guest; every page the guest touches before we
//! sent it traps in the destination (userfaultfd) and comes back to us as a
//! page request on the return path. Meanwhile we push the other pages in
//! the background as they become ready. The memory itself comes from a
//! [`PageSource`] (for synthesis: the overlay being applied).
//!
//! # What we send (QEMU 7.2 stream, all integers big-endian)
//!
//! ```text
//! "QEVM" 3                       header
//! 0x07 configuration            machine type only (the saved state's
//!                               x-ignore-shared capability list is dropped:
//!                               the destination runs without it)
//! 0x08 OPEN_RETURN_PATH (1)     the destination answers on the same socket
//! 0x08 POSTCOPY_ADVISE (3)      be64 page size summary, be64 target page size
//! 0x01 START "ram"              MEM_SIZE record and the block list, without
//!                               the per-block addresses of x-ignore-shared
//! 0x02 PART "ram"               the saved state's own page records (ROMs,
//!                               video RAM: every block but the main one)
//! 0x08 POSTCOPY_RAM_DISCARD (6) u8 0, u8 n, block id, u8 0, be64 start,
//!                               be64 length: one empty page of the main
//!                               block, so that QEMU enters its DISCARD state
//! 0x08 PACKAGED (7)             be32 length, then a nested stream:
//!        0x08 POSTCOPY_LISTEN (4)  destination registers its RAM (uffd)
//!        0x04 FULL ...             the saved device sections, verbatim
//!        0x08 POSTCOPY_RUN (5)     the guest starts
//! 0x02 PART "ram" ...           main-block pages: requested ones first,
//!                               the rest in the background, each exactly
//!                               once (a second copy would fail UFFDIO_COPY)
//! 0x03 END "ram", EOS, 0x00 EOF  then the destination completes
//! ```
//!
//! Return path messages (be16 type, be16 length, data): 1 SHUT (be32),
//! 2 PONG (be32), 3 REQ_PAGES_ID (be64 offset, be32 length, u8 n, block id),
//! 4 REQ_PAGES (be64 offset, be32 length; the block of the last request).
//!
//! Pages that are zero in the launch memory are not pushed: the destination
//! discarded its RAM at ADVISE, so a page never placed reads as zero once
//! postcopy ends. A zero page the guest asks for is sent as a ZERO record.
//!
//! # Where things are
//!
//! - `saved`: parse the saved device state into the parts we send;
//! - `stream`: write them (and page records) as a postcopy stream (above
//!   `saved`: the record headers both write are `cloudlet-qemu-format`'s);
//! - `serve`: the loop that serves pages, requested ones first;
//! - `return_path`: read the destination's page requests.
//!
//! The wire constants are `cloudlet-qemu-format`'s, shared with the
//! precopy codec of `cloudlet-handoff`.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

mod return_path;
mod saved;
mod serve;
mod stream;

pub use saved::SavedState;
pub use serve::serve;

/// The page size of x86 guests and of this host.
pub const PAGE: usize = cloudlet_qemu_format::PAGE_SIZE;

/// Why a saved device state cannot seed a postcopy restore.
#[derive(Debug, thiserror::Error)]
pub enum ParseSavedStateError {
    #[error("Saved device state truncated at byte {0}")]
    Truncated(usize),
    #[error("Not a QEMU migration stream (magic/version)")]
    Header,
    #[error("Unsupported content at byte {at}: {what}")]
    Unsupported { at: usize, what: String },
    #[error("The saved state has no RAM block {0:?}")]
    NoMainBlock(String),
}

/// Why a postcopy restore failed.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("Postcopy stream to QEMU failed: {0}")]
    Io(#[from] io::Error),
    #[error("The page source failed for page {page}: {detail}")]
    Source { page: u64, detail: String },
    #[error("QEMU asked for {offset:#x}+{len:#x} of unknown RAM block {block:?}")]
    BadRequest {
        block: String,
        offset: u64,
        len: u32,
    },
    #[error("Before the guest could start: {0}")]
    BeforeRun(String),
    #[error("The postcopy restore was cancelled")]
    Cancelled,
}

/// A RAM block of the saved VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    pub id: String,
    pub length: u64,
}

/// Where the main block's pages come from.
pub trait PageSource: Send + Sync {
    /// Copy page `page` of the launch memory into `buf` if it is final
    /// (`Ok(true)`), or say that it has not arrived yet (`Ok(false)`).
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> io::Result<bool>;
    /// The guest is waiting for `page`: fetch what holds it first.
    fn demand(&self, page: u64);
}

/// What a postcopy restore did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PostcopyStats {
    /// Main-block pages sent with data.
    pub pages_sent: u64,
    /// Zero pages sent because the guest asked for them.
    pub zero_pages_sent: u64,
    /// Zero pages not sent at all.
    pub zero_pages_skipped: u64,
    /// Pages the guest asked for (faults that reached us).
    pub requests: u64,
    /// Of those, the ones that had to wait for their data to arrive.
    pub requests_waited: u64,
    /// Longest wait of a requested page, in milliseconds.
    pub max_wait_ms: u64,
    /// From the start to the guest's start (RUN sent), in milliseconds.
    pub run_ms: u64,
    /// From the start to the last page sent, in milliseconds.
    pub done_ms: u64,
}

/// Shared progress of a running postcopy restore (for status displays).
#[derive(Debug, Default)]
pub struct PostcopyProgress {
    pub pages_sent: AtomicU64,
    pub requests: AtomicU64,
    pub running: AtomicBool,
}

/// A [`PageSource`] over a complete memory image (a RAM file): every page
/// is ready. For tests and for restoring local snapshots lazily.
pub struct FilePages {
    file: std::fs::File,
}

impl FilePages {
    pub fn open(path: &std::path::Path) -> io::Result<FilePages> {
        Ok(FilePages {
            file: std::fs::File::open(path)?,
        })
    }
}

impl PageSource for FilePages {
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> io::Result<bool> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, page * PAGE as u64)?;
        Ok(true)
    }
    fn demand(&self, _page: u64) {}
}

/// Keep `Arc<dyn PageSource>` usable where `&dyn PageSource` is expected.
impl<T: PageSource + ?Sized> PageSource for Arc<T> {
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> io::Result<bool> {
        (**self).read_page(page, buf)
    }
    fn demand(&self, page: u64) {
        (**self).demand(page)
    }
}
