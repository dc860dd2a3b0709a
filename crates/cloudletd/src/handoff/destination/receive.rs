//! `POST /v1/handoff/{id}/stream`: the session read frame by frame: disk
//! chunks written into the VM's disk, the migration stream decoded (against
//! the base) into QEMU's socket, the source's memory digest kept, then the
//! END frame. As soon as QEMU has its whole stream it loads the VM (paused)
//! while the rest arrives; then `verify` decides.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cloudlet_api::HandoffLoaded;
use cloudlet_handoff::memcheck::{self, IncrementalDigest, MemoryDigest, RamFile};
use cloudlet_handoff::session::{SessionFrame, SessionReader};
use cloudlet_handoff::{Decoder, DecoderConfig};
use cloudlet_qemu::{QmpEvent, Vm};
use futures::Stream;
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast;

use super::verify::{load_and_digest, socket_unread, verdict, SourceDigest, StopDigestOnDrop};
use super::{next_chunk, Arrivals, Stage};
use crate::core::cloudlet::Cloudlet;
use crate::handoff::{base_memory, drop_later, mark, AbortOnDrop, ReceiveHandoffError};

/// The RAM block of the guest's memory (the RAM file) in QEMU's stream.
const MEMORY_BLOCK: &str = "mem";
/// How far QEMU may have read the stream ahead of what it applied (its
/// buffer is 32 KiB in 7.2), with a wide margin.
const QEMU_READ_AHEAD: u64 = 1 << 20;

/// Destination: `POST /v1/handoff/{id}/stream`: the session of a prepared
/// arrival, or the repair of one whose memory differs. On any error the
/// arrival is discarded; a session that does not fit where the arrival
/// stands is refused and changes nothing.
pub async fn receive_stream<S, E>(
    c: &Arc<Cloudlet>,
    arrivals: &Arrivals,
    hid: &str,
    body: S,
) -> Result<HandoffLoaded, ReceiveHandoffError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let r = match arrivals.stage(hid)? {
        Stage::Prepared => {
            arrivals.advance(hid, "a session", Stage::Streaming)?;
            receive_migration(c, arrivals, hid, body).await
        }
        Stage::Differs(_) => {
            arrivals.advance(hid, "a repair", Stage::Repairing)?;
            super::repair::receive_repair(arrivals, hid, body).await
        }
        other => {
            return Err(ReceiveHandoffError::WrongStage {
                hid: hid.into(),
                stage: other.name(),
                what: "a session",
            })
        }
    };
    if let Err(e) = &r {
        tracing::warn!(handoff = hid, "arrival discarded: {e}");
        let _ = arrivals.abort(c, hid).await;
    }
    r
}

/// The first session: read, loaded, verified.
async fn receive_migration<S, E>(
    c: &Arc<Cloudlet>,
    arrivals: &Arrivals,
    hid: &str,
    body: S,
) -> Result<HandoffLoaded, ReceiveHandoffError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut r = Receiver::open(c, arrivals, hid).await?;
    r.read(body).await?;
    let (vm_id, vm) = (r.vm_id.clone(), r.vm.clone());
    let (raw, disk_bytes) = (r.raw, r.disk_bytes);
    let (ours, theirs) = r.finish().await?;
    let v = verdict(c, &vm, &vm_id, theirs, ours).await?;
    arrivals.set_memory(hid, v.memory);
    arrivals.advance(hid, "loading", v.stage)?;
    mark(&vm_id, "dst_answer");
    tracing::info!(vm_id = %vm_id, raw, disk_bytes, "handoff loaded, waiting for commit");
    Ok(HandoffLoaded {
        raw_bytes: raw,
        disk_bytes,
        memory_digest: v.digest,
    })
}

/// One session being read.
struct Receiver {
    c: Arc<Cloudlet>,
    vm_id: String,
    vm: Arc<Vm>,
    decoder: Decoder,
    disk: std::fs::File,
    qemu: tokio::net::UnixStream,
    /// QEMU's events, until the load starts (it waits on them).
    events: Option<broadcast::Receiver<QmpEvent>>,
    reader: SessionReader,
    out: Vec<u8>,
    /// Migration stream bytes given to QEMU.
    raw: u64,
    disk_bytes: u64,
    source_digest: Option<SourceDigest>,
    /// Verifying: the memory is digested while the stream arrives, each
    /// chunk once QEMU has applied what was written to it so far
    /// (`memcheck::IncrementalDigest`); after the load only the chunks
    /// touched since are digested again.
    inc: Option<Arc<IncrementalDigest>>,
    _stop_digest: Option<StopDigestOnDrop>,
    digesting: Option<tokio::task::JoinHandle<memcheck::DigestProgress>>,
    /// Started as soon as QEMU has its whole stream (the digest and the
    /// END frame may still be on their way).
    loading: Option<AbortOnDrop<Result<Option<MemoryDigest>, ReceiveHandoffError>>>,
    received: Arc<AtomicU64>,
}

impl Receiver {
    async fn open(
        c: &Arc<Cloudlet>,
        arrivals: &Arrivals,
        hid: &str,
    ) -> Result<Self, ReceiveHandoffError> {
        let parts = arrivals.parts(hid)?;
        let base_id = c
            .registry()
            .get(&parts.vm_id)
            .map(|e| e.record.base_id.clone())
            .unwrap_or_default();
        let base = c
            .bases
            .get_by_id(&base_id)
            .map_err(|_| ReceiveHandoffError::BaseNotHeld(base_id.clone()))?;
        let mut decoder = Decoder::new(
            DecoderConfig {
                max_guest_ram: base.manifest.memory_bytes() + (64 << 20),
            },
            Some(base_memory(&base)?),
        );
        let vm = parts.vm;
        let disk = std::fs::OpenOptions::new()
            .write(true)
            .open(parts.paths.disk())?;
        let sock = vm.spec().socket_dir().join("migrate-in.sock");
        let qemu = tokio::net::UnixStream::connect(&sock).await?;
        let events = Some(vm.qmp().events());
        let inc = if c.config.verify_memory {
            let rf = Arc::new(RamFile::open(&vm.spec().ram_path)?);
            decoder.track_pages(MEMORY_BLOCK);
            Some(Arc::new(IncrementalDigest::new(rf)?))
        } else {
            None
        };
        let digesting = inc
            .clone()
            .map(|inc| tokio::task::spawn_blocking(move || inc.run(Duration::from_millis(500))));
        Ok(Self {
            c: c.clone(),
            vm_id: parts.vm_id,
            vm,
            decoder,
            disk,
            qemu,
            events,
            reader: SessionReader::new(),
            out: Vec::new(),
            raw: 0,
            disk_bytes: 0,
            source_digest: None,
            _stop_digest: inc.as_ref().map(|i| StopDigestOnDrop(Arc::downgrade(i))),
            inc,
            digesting,
            loading: None,
            received: parts.received,
        })
    }

    /// Every frame of the body, to its END.
    async fn read<S, E>(&mut self, mut body: S) -> Result<(), ReceiveHandoffError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        while let Some(chunk) = next_chunk(&mut body).await? {
            self.received
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            for f in self.reader.feed(&chunk)? {
                self.frame(f).await?;
            }
        }
        if !self.reader.is_ended() {
            return Err(ReceiveHandoffError::Truncated);
        }
        tracing::info!(vm_id = %self.vm_id, raw = self.raw, "handoff stream ended");
        Ok(())
    }

    async fn frame(&mut self, f: SessionFrame) -> Result<(), ReceiveHandoffError> {
        match f {
            SessionFrame::Disk { offset, data } => {
                self.disk.write_all_at(&data, offset)?;
                self.disk_bytes += data.len() as u64;
            }
            SessionFrame::Migration(wire) => self.migration(&wire).await?,
            SessionFrame::MemoryDigest {
                ram_len,
                chunk_bytes,
                chunks,
            } => {
                self.source_digest = Some(SourceDigest {
                    ram_len,
                    chunk_bytes,
                    chunks,
                })
            }
            SessionFrame::MemoryPages { .. } => {
                return Err(ReceiveHandoffError::UnexpectedFrame {
                    frame: "memory pages",
                    during: "outside a repair",
                })
            }
            SessionFrame::End { .. } => mark(&self.vm_id, "dst_end_frame"),
        }
        Ok(())
    }

    /// Decoded into QEMU's socket; once QEMU has all of it, the load starts.
    async fn migration(&mut self, wire: &[u8]) -> Result<(), ReceiveHandoffError> {
        self.decoder.feed(wire, &mut self.out)?;
        if !self.out.is_empty() {
            if let Some(inc) = &self.inc {
                inc.touched(
                    &self.decoder.take_touched(),
                    self.raw + self.out.len() as u64,
                );
            }
            self.qemu.write_all(&self.out).await?;
            self.raw += self.out.len() as u64;
            self.out.clear();
            if let (Some(inc), Some(unread)) = (&self.inc, socket_unread(&self.qemu)) {
                inc.set_applied(self.raw.saturating_sub(unread + QEMU_READ_AHEAD));
            }
        }
        if self.decoder.is_complete() && self.loading.is_none() {
            self.qemu.shutdown().await?;
            mark(&self.vm_id, "dst_qemu_fed");
            self.loading = self.events.take().map(|ev| {
                AbortOnDrop(tokio::spawn(load_and_digest(
                    self.c.clone(),
                    self.vm.clone(),
                    ev,
                    self.vm_id.clone(),
                    self.inc.clone().zip(self.digesting.take()),
                )))
            });
        }
        Ok(())
    }

    /// The session has ended: the disk synced, the load awaited. Returns
    /// our digest (when verifying) and the source's.
    async fn finish(
        self,
    ) -> Result<(Option<MemoryDigest>, Option<SourceDigest>), ReceiveHandoffError> {
        let Receiver {
            vm_id,
            mut decoder,
            disk,
            loading,
            inc,
            source_digest,
            _stop_digest,
            ..
        } = self;
        decoder.finish()?;
        drop_later(decoder);
        disk.sync_data()?;
        mark(&vm_id, "dst_disk_synced");
        let Some(mut loading) = loading else {
            return Err(ReceiveHandoffError::MigrationIncomplete);
        };
        let ours = (&mut loading.0).await??;
        // Unmapping 1 GiB of populated mapping holds the process's memory
        // map lock for ~20 ms (the waiting commit woke that late): later.
        drop_later(inc);
        Ok((ours, source_digest))
    }
}
