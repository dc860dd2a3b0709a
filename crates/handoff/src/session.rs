//! The handoff session: what one source daemon sends to one destination
//! daemon in the body of `POST /v1/handoff/{id}/stream`, version 2.
//!
//! ```text
//!  source cloudletd                                 destination cloudletd
//!   | POST /v1/handoff/prepare (offer) ----------------------> | base held? capacity?
//!   | <------------------------- 201 (ports; QEMU -incoming) -- | QEMU waits
//!   | POST /v1/handoff/{id}/stream, body:                       |
//!   |   "CLHSESS2"                                              |
//!   |   DISK frames (disk chunks that differ from the base) ->  | pwrite into its disk
//!   |   MIGRATION frames (wire of cloudlet_handoff::Encoder) -> | Decoder -> QEMU
//!   |   [VM paused at pre-switchover: DISK frames written since]|
//!   |   [MEMORY_DIGEST: the source's RAM at the switchover]     |
//!   |   END ------------------------------------------------->  | QEMU loaded, paused;
//!   |                                                           | its RAM digested, compared
//!   | source QEMU completed: record = Moved (generation + 1)    |
//!   | POST /v1/handoff/{id}/commit (sent at once) ------------> | waits: loaded and equal?
//!   | <------------------------------------ 200 VmInfo -------- | cont: the VM runs here
//!   | source QEMU killed                                        |
//! ```
//!
//! The commit does not wait for the stream's answer (`200 {loaded}`): the
//! destination resumes only a VM that loaded and, when a MEMORY_DIGEST came,
//! whose memory equals the source's. If it differs, the commit is refused
//! with a report of the differing chunks (`memcheck::DiffReport`); the source
//! may then repair: a second `POST .../stream` whose body holds MEMORY_PAGES
//! frames (the source's pages that differ) and END; the destination writes
//! them into the paused VM's RAM file, digests again and answers; then the
//! source commits again.
//!
//! Any failure before the source has stopped its QEMU for good ends in
//! `POST /v1/handoff/{id}/abort` (or a broken stream): the destination
//! discards what it got and the source resumes its VM.
//!
//! Frame: `u8 type, u32 payload length (LE), payload, u32 CRC-32 of type,
//! length and payload`. Types: 1 DISK (`u64 offset, u32 raw length, zstd
//! payload`), 2 MIGRATION (opaque wire bytes), 3 END (`u64` migration bytes
//! as QEMU wrote them), 4 MEMORY_DIGEST (`u64 RAM length, u32 chunk bytes,
//! u32 count`, then `count` XXH3-128 chunk digests, 16 bytes LE each; see
//! `memcheck`), 5 MEMORY_PAGES (as DISK: guest pages at a RAM file offset).
//! Compatibility: a reader refuses an unknown magic or frame type; a change
//! of layout bumps the magic's version digit (2: frames 4 and 5, the
//! destination decides on the digest).

use std::io::Write;

/// Magic at the start of a session body.
pub const SESSION_MAGIC: &[u8; 8] = b"CLHSESS2";
/// Largest frame payload a reader accepts.
pub const MAX_FRAME: usize = 16 << 20;

const DISK: u8 = 1;
const MIGRATION: u8 = 2;
const END: u8 = 3;
const MEMORY_DIGEST: u8 = 4;
const MEMORY_PAGES: u8 = 5;
/// Most chunk digests a MEMORY_DIGEST frame may hold (1 TiB of RAM).
const MAX_DIGESTS: usize = 1 << 20;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionFrame {
    Disk {
        offset: u64,
        data: Vec<u8>,
    },
    Migration(Vec<u8>),
    End {
        migration_bytes: u64,
    },
    /// The source's RAM digest at the switchover (`memcheck`).
    MemoryDigest {
        ram_len: u64,
        chunk_bytes: u32,
        chunks: Vec<u128>,
    },
    /// Guest pages for a repair: `data` at `offset` of the RAM file.
    MemoryPages {
        offset: u64,
        data: Vec<u8>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadSessionError {
    #[error("Not a handoff session (bad magic)")]
    Magic,
    #[error("Frame at byte {offset}: unknown type {kind}")]
    UnknownType { offset: u64, kind: u8 },
    #[error("Frame at byte {offset}: length {len} over the limit")]
    TooLong { offset: u64, len: usize },
    #[error("Frame at byte {offset}: checksum mismatch")]
    Checksum { offset: u64 },
    #[error("Frame at byte {offset}: {detail}")]
    Invalid { offset: u64, detail: String },
    #[error("Data after the END frame")]
    AfterEnd,
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 9);
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A DISK frame: `data` at `offset` of the disk, compressed.
pub fn disk_frame(offset: u64, data: &[u8]) -> Vec<u8> {
    frame(DISK, &offset_data(offset, data))
}

/// A MEMORY_PAGES frame: guest pages `data` at `offset` of the RAM file.
pub fn memory_pages_frame(offset: u64, data: &[u8]) -> Vec<u8> {
    frame(MEMORY_PAGES, &offset_data(offset, data))
}

fn offset_data(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(data.len() / 2 + 12);
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let mut enc = zstd::Encoder::new(&mut p, 1).expect("zstd level 1");
    let _ = enc.write_all(data);
    let _ = enc.finish();
    p
}

/// A MEMORY_DIGEST frame.
pub fn memory_digest_frame(ram_len: u64, chunk_bytes: u32, chunks: &[u128]) -> Vec<u8> {
    let mut p = Vec::with_capacity(16 + chunks.len() * 16);
    p.extend_from_slice(&ram_len.to_le_bytes());
    p.extend_from_slice(&chunk_bytes.to_le_bytes());
    p.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for c in chunks {
        p.extend_from_slice(&c.to_le_bytes());
    }
    frame(MEMORY_DIGEST, &p)
}

pub fn migration_frame(wire: &[u8]) -> Vec<u8> {
    frame(MIGRATION, wire)
}

pub fn end_frame(migration_bytes: u64) -> Vec<u8> {
    frame(END, &migration_bytes.to_le_bytes())
}

/// Incremental reader of a session body.
#[derive(Debug, Default)]
pub struct SessionReader {
    buf: Vec<u8>,
    offset: u64,
    magic_seen: bool,
    ended: bool,
}

impl SessionReader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Feed bytes; returns the frames completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SessionFrame>, ReadSessionError> {
        if self.ended && !bytes.is_empty() {
            return Err(ReadSessionError::AfterEnd);
        }
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        if !self.magic_seen {
            if self.buf.len() < SESSION_MAGIC.len() {
                return Ok(out);
            }
            if &self.buf[..8] != SESSION_MAGIC {
                return Err(ReadSessionError::Magic);
            }
            self.buf.drain(..8);
            self.offset = 8;
            self.magic_seen = true;
        }
        loop {
            if self.buf.len() < 5 {
                break;
            }
            let kind = self.buf[0];
            let len =
                u32::from_le_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
            let at = self.offset;
            if !(DISK..=MEMORY_PAGES).contains(&kind) {
                return Err(ReadSessionError::UnknownType { offset: at, kind });
            }
            if len > MAX_FRAME {
                return Err(ReadSessionError::TooLong { offset: at, len });
            }
            let total = 5 + len + 4;
            if self.buf.len() < total {
                break;
            }
            let crc = u32::from_le_bytes([
                self.buf[5 + len],
                self.buf[6 + len],
                self.buf[7 + len],
                self.buf[8 + len],
            ]);
            if crc32fast::hash(&self.buf[..5 + len]) != crc {
                return Err(ReadSessionError::Checksum { offset: at });
            }
            let payload = &self.buf[5..5 + len];
            let f = parse_payload(kind, payload)
                .map_err(|detail| ReadSessionError::Invalid { offset: at, detail })?;
            let end = matches!(f, SessionFrame::End { .. });
            out.push(f);
            self.buf.drain(..total);
            self.offset += total as u64;
            if end {
                self.ended = true;
                if !self.buf.is_empty() {
                    return Err(ReadSessionError::AfterEnd);
                }
                break;
            }
        }
        Ok(out)
    }
}

fn parse_payload(kind: u8, p: &[u8]) -> Result<SessionFrame, String> {
    match kind {
        DISK => {
            let (offset, data) = parse_offset_data(p, "DISK")?;
            Ok(SessionFrame::Disk { offset, data })
        }
        MEMORY_PAGES => {
            let (offset, data) = parse_offset_data(p, "MEMORY_PAGES")?;
            Ok(SessionFrame::MemoryPages { offset, data })
        }
        MEMORY_DIGEST => {
            if p.len() < 16 {
                return Err("short MEMORY_DIGEST frame".into());
            }
            let ram_len = u64::from_le_bytes(p[..8].try_into().map_err(|_| "length")?);
            let chunk_bytes = u32::from_le_bytes(p[8..12].try_into().map_err(|_| "chunk")?);
            let n = u32::from_le_bytes(p[12..16].try_into().map_err(|_| "count")?) as usize;
            if n > MAX_DIGESTS || p.len() != 16 + n * 16 {
                return Err(format!(
                    "MEMORY_DIGEST of {} bytes for {n} digests",
                    p.len()
                ));
            }
            let chunks = p[16..]
                .chunks_exact(16)
                .map(|c| u128::from_le_bytes(c.try_into().unwrap_or([0; 16])))
                .collect();
            Ok(SessionFrame::MemoryDigest {
                ram_len,
                chunk_bytes,
                chunks,
            })
        }
        MIGRATION => Ok(SessionFrame::Migration(p.to_vec())),
        END => {
            let b: [u8; 8] = p.try_into().map_err(|_| "END frame length".to_string())?;
            Ok(SessionFrame::End {
                migration_bytes: u64::from_le_bytes(b),
            })
        }
        _ => Err(format!("type {kind}")),
    }
}

fn parse_offset_data(p: &[u8], what: &str) -> Result<(u64, Vec<u8>), String> {
    if p.len() < 12 {
        return Err(format!("short {what} frame"));
    }
    let offset = u64::from_le_bytes(p[..8].try_into().map_err(|_| "offset")?);
    let raw = u32::from_le_bytes(p[8..12].try_into().map_err(|_| "length")?) as usize;
    if raw > MAX_FRAME {
        return Err(format!("{what} chunk of {raw} bytes"));
    }
    let data = zstd::bulk::decompress(&p[12..], raw).map_err(|e| format!("{what} payload: {e}"))?;
    if data.len() != raw {
        return Err(format!(
            "{what} payload is {} bytes, expected {raw}",
            data.len()
        ));
    }
    Ok((offset, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Vec<u8> {
        let mut s = SESSION_MAGIC.to_vec();
        s.extend(disk_frame(4096, &[7u8; 65536]));
        s.extend(migration_frame(b"wire bytes"));
        s.extend(memory_digest_frame(
            3 << 20,
            1 << 20,
            &[1, u128::MAX, 7 << 100],
        ));
        s.extend(memory_pages_frame(8192, &[3u8; 8192]));
        s.extend(end_frame(1234));
        s
    }

    #[test]
    fn frames_round_trip_in_any_slicing() {
        let s = session();
        for step in [1, 3, 7, 64, 1000, s.len()] {
            let mut r = SessionReader::new();
            let mut got = Vec::new();
            for chunk in s.chunks(step) {
                got.extend(r.feed(chunk).unwrap());
            }
            assert_eq!(
                got,
                vec![
                    SessionFrame::Disk {
                        offset: 4096,
                        data: vec![7u8; 65536]
                    },
                    SessionFrame::Migration(b"wire bytes".to_vec()),
                    SessionFrame::MemoryDigest {
                        ram_len: 3 << 20,
                        chunk_bytes: 1 << 20,
                        chunks: vec![1, u128::MAX, 7 << 100]
                    },
                    SessionFrame::MemoryPages {
                        offset: 8192,
                        data: vec![3u8; 8192]
                    },
                    SessionFrame::End {
                        migration_bytes: 1234
                    }
                ]
            );
            assert!(r.is_ended());
        }
    }

    #[test]
    fn every_flipped_byte_is_refused_or_harmless() {
        let s = session();
        for i in 0..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 0x41;
            let mut r = SessionReader::new();
            // Never panics; a flip in the frames is always caught.
            let res = r.feed(&bad);
            if i >= 8 {
                assert!(res.is_err() || !r.is_ended(), "flip at {i} went unnoticed");
            }
        }
    }

    #[test]
    fn garbage_and_trailing_data_are_refused() {
        assert_eq!(
            SessionReader::new().feed(b"NOTASESSION"),
            Err(ReadSessionError::Magic)
        );
        let mut s = session();
        s.push(0);
        assert!(SessionReader::new().feed(&s).is_err());
    }
}
