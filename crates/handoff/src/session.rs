//! The handoff session: what one source daemon sends to one destination
//! daemon in the body of `POST /v1/handoff/{id}/stream`, version 1.
//!
//! ```text
//!  source cloudletd                                 destination cloudletd
//!   | POST /v1/handoff/prepare (offer) ----------------------> | base held? capacity?
//!   | <------------------------- 201 (ports; QEMU -incoming) -- | QEMU waits
//!   | POST /v1/handoff/{id}/stream, body:                       |
//!   |   "CLHSESS1"                                              |
//!   |   DISK frames (disk chunks that differ from the base) ->  | pwrite into its disk
//!   |   MIGRATION frames (wire of cloudlet_handoff::Encoder) -> | Decoder -> QEMU
//!   |   [VM paused at pre-switchover: DISK frames written since]|
//!   |   END ------------------------------------------------->  | QEMU loaded, paused
//!   | <----------------------------------- 200 {loaded} ------- |
//!   | source QEMU killed, record = Moved (generation + 1)       |
//!   | POST /v1/handoff/{id}/commit ---------------------------> | cont: the VM runs here
//!   | <------------------------------------ 200 VmInfo -------- |
//! ```
//!
//! Any failure before the source has stopped its QEMU for good ends in
//! `POST /v1/handoff/{id}/abort` (or a broken stream): the destination
//! discards what it got and the source resumes its VM.
//!
//! Frame: `u8 type, u32 payload length (LE), payload, u32 CRC-32 of type,
//! length and payload`. Types: 1 DISK (`u64 offset, u32 raw length, zstd
//! payload`), 2 MIGRATION (opaque wire bytes), 3 END (`u64` migration bytes
//! as QEMU wrote them). Compatibility: a reader refuses an unknown magic or
//! frame type; a change of layout bumps the magic's version digit.

use std::io::Write;

/// Magic at the start of a session body.
pub const SESSION_MAGIC: &[u8; 8] = b"CLHSESS1";
/// Largest frame payload a reader accepts.
pub const MAX_FRAME: usize = 16 << 20;

const DISK: u8 = 1;
const MIGRATION: u8 = 2;
const END: u8 = 3;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionFrame {
    Disk { offset: u64, data: Vec<u8> },
    Migration(Vec<u8>),
    End { migration_bytes: u64 },
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
    let mut p = Vec::with_capacity(data.len() / 2 + 12);
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let mut enc = zstd::Encoder::new(&mut p, 1).expect("zstd level 1");
    let _ = enc.write_all(data);
    let _ = enc.finish();
    frame(DISK, &p)
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
            if !(DISK..=END).contains(&kind) {
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
            if p.len() < 12 {
                return Err("short DISK frame".into());
            }
            let offset = u64::from_le_bytes(p[..8].try_into().map_err(|_| "offset")?);
            let raw = u32::from_le_bytes(p[8..12].try_into().map_err(|_| "length")?) as usize;
            if raw > MAX_FRAME {
                return Err(format!("DISK chunk of {raw} bytes"));
            }
            let data =
                zstd::bulk::decompress(&p[12..], raw).map_err(|e| format!("DISK payload: {e}"))?;
            if data.len() != raw {
                return Err(format!(
                    "DISK payload is {} bytes, expected {raw}",
                    data.len()
                ));
            }
            Ok(SessionFrame::Disk { offset, data })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Vec<u8> {
        let mut s = SESSION_MAGIC.to_vec();
        s.extend(disk_frame(4096, &[7u8; 65536]));
        s.extend(migration_frame(b"wire bytes"));
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
