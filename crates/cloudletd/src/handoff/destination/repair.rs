//! A repair session (`POST /v1/handoff/{id}/stream` again, after the commit
//! was refused because the memory differs): the source's pages that
//! differ, written into the loaded VM's RAM file (QEMU keeps it paused
//! until the commit, and maps the file shared), then those chunks digested
//! again; the VM is ready only if all its memory now equals the source's.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use cloudlet_api::HandoffLoaded;
use cloudlet_handoff::memcheck::{self, RamFile};
use cloudlet_handoff::session::{SessionFrame, SessionReader};
use futures::Stream;

use super::{next_chunk, Arrivals, Stage};
use crate::handoff::{digest_name, read_full, ReceiveHandoffError};

/// What a repair wrote.
#[derive(Default)]
struct Written {
    /// Chunks touched, to digest again.
    chunks: BTreeSet<usize>,
    pages: u64,
    /// Pages whose bytes were not the source's (a check of the digests:
    /// the others differed only by their digests, which would be a bug).
    changed: u64,
    /// Where (the first few), for the record: a clue to QEMU's page loss.
    at: Vec<String>,
}

pub(super) async fn receive_repair<S, E>(
    arrivals: &Arrivals,
    hid: &str,
    mut body: S,
) -> Result<HandoffLoaded, ReceiveHandoffError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let parts = arrivals.parts(hid)?;
    let (theirs, mut ours) = arrivals
        .take_memory(hid)
        .ok_or(ReceiveHandoffError::WrongStage {
            hid: hid.into(),
            stage: "repairing",
            what: "a repair without the digests",
        })?;
    let path = parts.vm.spec().ram_path.clone();
    let ram = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    let mut reader = SessionReader::new();
    let mut w = Written::default();
    while let Some(chunk) = next_chunk(&mut body).await? {
        for f in reader.feed(&chunk)? {
            match f {
                SessionFrame::MemoryPages { offset, data } => {
                    write_pages(&ram, ours.ram_len, offset, &data, &mut w)?
                }
                SessionFrame::End { .. } => {}
                _ => {
                    return Err(ReceiveHandoffError::UnexpectedFrame {
                        frame: "non-page",
                        during: "in a repair",
                    })
                }
            }
        }
    }
    if !reader.is_ended() {
        return Err(ReceiveHandoffError::Truncated);
    }
    drop(ram);
    let touched: Vec<usize> = w.chunks.iter().copied().collect();
    let ours = tokio::task::spawn_blocking(move || {
        RamFile::open(&path)?.redigest_chunks(&mut ours, &touched)?;
        Ok::<_, std::io::Error>(ours)
    })
    .await?
    .map_err(ReceiveHandoffError::Digest)?;
    let diff = ours.differing_chunks(&theirs);
    if !diff.is_empty() {
        return Err(ReceiveHandoffError::TooDifferent(diff.len()));
    }
    tracing::warn!(vm_id = %parts.vm_id, pages = w.pages, changed = w.changed, at = ?w.at, digest = %digest_name(&ours), "moved memory repaired and verified");
    arrivals.advance(hid, "a repaired memory", Stage::Ready)?;
    Ok(HandoffLoaded {
        raw_bytes: 0,
        disk_bytes: 0,
        memory_digest: Some(digest_name(&ours)),
    })
}

/// Pages of the source written over ours (inside the memory, page-aligned).
fn write_pages(
    ram: &std::fs::File,
    ram_len: u64,
    offset: u64,
    data: &[u8],
    w: &mut Written,
) -> Result<(), ReceiveHandoffError> {
    let end = offset.checked_add(data.len() as u64);
    if !offset.is_multiple_of(memcheck::PAGE as u64)
        || data.is_empty()
        || end.is_none_or(|e| e > ram_len)
    {
        return Err(ReceiveHandoffError::RepairOutside {
            offset,
            len: data.len(),
        });
    }
    let mut old = vec![0u8; data.len()];
    read_full(ram, &mut old, offset)?;
    w.changed += old
        .chunks(memcheck::PAGE)
        .zip(data.chunks(memcheck::PAGE))
        .filter(|(a, b)| a != b)
        .count() as u64;
    ram.write_all_at(data, offset)?;
    if w.at.len() < 16 {
        w.at.push(format!("{offset:#x}+{}", data.len()));
    }
    let last = offset + data.len() as u64 - 1;
    w.chunks.extend(
        (offset / memcheck::CHUNK as u64) as usize..=(last / memcheck::CHUNK as u64) as usize,
    );
    w.pages += data.len().div_ceil(memcheck::PAGE) as u64;
    Ok(())
}
