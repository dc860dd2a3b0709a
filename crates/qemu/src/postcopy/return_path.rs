//! The return path: the destination's page requests, read on their own
//! thread and handed to the serving loop.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

use cloudlet_qemu_format::return_path as rp;

use super::RamBlock;

/// A request the serving loop acts on.
pub(super) enum Request {
    Pages {
        block: usize,
        offset: u64,
        len: u32,
    },
    Bad {
        block: String,
        offset: u64,
        len: u32,
    },
}

/// Read the destination's return path until SHUT or EOF.
pub(super) fn return_path(mut s: UnixStream, blocks: &[RamBlock], tx: mpsc::Sender<Request>) {
    let mut last: Option<usize> = None;
    let mut hdr = [0u8; 4];
    loop {
        if s.read_exact(&mut hdr).is_err() {
            return;
        }
        let kind = u16::from_be_bytes([hdr[0], hdr[1]]);
        let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
        tracing::trace!(kind, len, "postcopy return path message");
        let mut data = vec![0u8; len];
        if s.read_exact(&mut data).is_err() {
            return;
        }
        match kind {
            rp::SHUT => return,
            rp::REQ_PAGES | rp::REQ_PAGES_ID if len >= 12 => {
                let offset = u64::from_be_bytes(data[0..8].try_into().unwrap_or([0; 8]));
                let n = u32::from_be_bytes(data[8..12].try_into().unwrap_or([0; 4]));
                if kind == rp::REQ_PAGES_ID && len > 12 {
                    let idlen = data[12] as usize;
                    let id = String::from_utf8_lossy(&data[13..(13 + idlen).min(len)]).into_owned();
                    last = blocks.iter().position(|b| b.id == id);
                    if last.is_none() {
                        let _ = tx.send(Request::Bad {
                            block: id,
                            offset,
                            len: n,
                        });
                        return;
                    }
                }
                let Some(block) = last else {
                    let _ = tx.send(Request::Bad {
                        block: String::new(),
                        offset,
                        len: n,
                    });
                    return;
                };
                if tx
                    .send(Request::Pages {
                        block,
                        offset,
                        len: n,
                    })
                    .is_err()
                {
                    // The sender finished; keep draining until SHUT.
                    continue;
                }
            }
            _ => {} // PONG and others: nothing to do
        }
    }
}
