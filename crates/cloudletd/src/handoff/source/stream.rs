//! The migration stream: QEMU migrates into a Unix socket of ours; a task
//! reads it, encodes it against the base (`cloudlet_handoff::Encoder`) and
//! queues session frames, then the memory digest (when verifying) and the
//! END frame.
//!
//! The reader never waits for QMP: QEMU may hold its big lock while it
//! writes, and would not answer QMP until we read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cloudlet_handoff::memcheck::{self, MemoryDigest, RamFile};
use cloudlet_handoff::session;
use cloudlet_handoff::{BaseMemory, Encoder, EncoderConfig};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

use super::flow::{FrameSender, Session};
use crate::handoff::{drop_later, mark, HandoffError};
use crate::progress::LiveProgress;

/// How long the reader may be held (the control loop drains the link)
/// before it takes the handoff for abandoned.
const MAX_HOLD: Duration = Duration::from_secs(10);

/// Where the digest taken at the switchover arrives (or why it failed).
pub(super) type DigestRx = oneshot::Receiver<Result<Arc<MemoryDigest>, String>>;

/// The source's digest of its memory at the switchover (`memcheck`): the
/// RAM file is mapped now and read once while the VM runs, so that its
/// digest at the switchover (the VM stopped: the memory is final) reads it
/// without page faults; the reader sends that digest after QEMU's last
/// byte, and the destination resumes only a copy that matches it.
pub(super) struct SourceDigest {
    ram: Option<Arc<RamFile>>,
    warming: Arc<AtomicBool>,
    tx: Option<oneshot::Sender<Result<Arc<MemoryDigest>, String>>>,
    /// Ours, once taken (for a repair, and to check the destination's).
    pub(super) digest: Arc<OnceLock<Arc<MemoryDigest>>>,
}

impl Drop for SourceDigest {
    fn drop(&mut self) {
        self.warming.store(false, Ordering::Relaxed);
    }
}

impl SourceDigest {
    /// `verify`: digest the memory at the switchover; the receiver gets it
    /// (for the reader to send).
    pub(super) fn start(
        verify: bool,
        ram_path: &std::path::Path,
    ) -> Result<(Self, Option<DigestRx>), HandoffError> {
        let ram = if verify {
            Some(Arc::new(RamFile::open(ram_path)?))
        } else {
            None
        };
        let warming = Arc::new(AtomicBool::new(true));
        if let Some(rf) = ram.clone() {
            drop(tokio::task::spawn_blocking({
                let warming = warming.clone();
                move || keep_populated(&rf, &warming)
            }));
        }
        let (tx, rx) = oneshot::channel();
        let me = Self {
            ram,
            warming,
            tx: verify.then_some(tx),
            digest: Arc::default(),
        };
        Ok((me, verify.then_some(rx)))
    }

    /// The RAM file, when verifying (a repair reads pages from it).
    pub(super) fn ram(&self) -> Option<&RamFile> {
        self.ram.as_deref()
    }

    /// The memory is final (QEMU paused before the switchover): digest it
    /// while QEMU sends its last pass.
    pub(super) fn at_switchover(&mut self, vm_id: &str) {
        self.warming.store(false, Ordering::Relaxed);
        let (Some(tx), Some(rf)) = (self.tx.take(), self.ram.clone()) else {
            return;
        };
        let (cell, vm_id) = (self.digest.clone(), vm_id.to_string());
        tokio::spawn(async move {
            let log_id = vm_id.clone();
            let r = tokio::task::spawn_blocking(move || {
                // No last populate: it costs as much as the faults it
                // saves (~60 ms per GiB, per page).
                let t = Instant::now();
                let d = rf.digest(memcheck::threads());
                tracing::info!(
                    vm_id = %log_id,
                    digest_ms = t.elapsed().as_millis() as u64,
                    "memory digested at the switchover"
                );
                d
            })
            .await;
            let r = match r {
                Ok(Ok(d)) => Ok(Arc::new(d)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Ok(d) = &r {
                let _ = cell.set(d.clone());
            }
            mark(&vm_id, "src_digest_done");
            let _ = tx.send(r);
        });
    }
}

/// Keep `rf` populated (`RamFile::populate`, every 2 s) while `on`: the
/// source's digest at the switchover then reads its memory without page
/// faults.
fn keep_populated(rf: &RamFile, on: &AtomicBool) {
    while on.load(Ordering::Relaxed) {
        rf.populate();
        for _ in 0..20 {
            if !on.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The task that carries QEMU's migration stream into the session.
pub(super) struct MigrationReader {
    pub(super) conn: tokio::net::UnixStream,
    pub(super) frames: FrameSender,
    pub(super) sent: Arc<std::sync::atomic::AtomicU64>,
    pub(super) progress: Arc<LiveProgress>,
    /// Set while the link drains before the switchover: QEMU's writes wait.
    pub(super) hold: Arc<AtomicBool>,
    pub(super) vm_id: String,
    /// The base's memory, the encoder's dedup source (taken by it).
    pub(super) base: Option<BaseMemory>,
    pub(super) digest: Option<DigestRx>,
}

/// What the reader keeps between reads.
struct Pump {
    encoder: Encoder,
    out: Vec<u8>,
    raw_bytes: u64,
    last_rate: (Instant, u64),
}

impl MigrationReader {
    pub(super) fn new(
        session: &Session,
        conn: tokio::net::UnixStream,
        progress: &Arc<LiveProgress>,
        hold: &Arc<AtomicBool>,
        vm_id: &str,
        base: BaseMemory,
        digest: Option<DigestRx>,
    ) -> Result<Self, HandoffError> {
        Ok(Self {
            conn,
            frames: session.frames()?,
            sent: session.sent.clone(),
            progress: progress.clone(),
            hold: hold.clone(),
            vm_id: vm_id.to_string(),
            base: Some(base),
            digest,
        })
    }

    /// Run until QEMU's end of stream; the result is QEMU's bytes.
    pub(super) fn spawn(self) -> tokio::task::JoinHandle<Result<u64, HandoffError>> {
        tokio::spawn(self.run())
    }

    async fn run(mut self) -> Result<u64, HandoffError> {
        let mut pump = Pump {
            encoder: Encoder::new(EncoderConfig::default(), self.base.take()),
            out: Vec::new(),
            raw_bytes: 0,
            last_rate: (Instant::now(), 0),
        };
        let mut buf = vec![0u8; 256 * 1024];
        let mut held_since: Option<Instant> = None;
        loop {
            if self.hold.load(Ordering::Relaxed) {
                // The control loop lets go within seconds; if it is gone
                // (an error), so is this task.
                let since = *held_since.get_or_insert_with(Instant::now);
                if since.elapsed() > MAX_HOLD || self.frames.is_closed() {
                    return Err(HandoffError::Abandoned(MAX_HOLD));
                }
                self.flush(&mut pump).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            held_since = None;
            // Flush whenever QEMU pauses, so that small tails (the device
            // state) are never held back.
            let n = match tokio::time::timeout(Duration::from_millis(5), self.conn.read(&mut buf))
                .await
            {
                Ok(Ok(0)) => {
                    mark(&self.vm_id, "src_qemu_eof");
                    break;
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(HandoffError::Io(e)),
                Err(_) => {
                    pump.encoder.flush(&mut pump.out)?;
                    0
                }
            };
            if n > 0 {
                pump.raw_bytes += n as u64;
                pump.encoder.feed(&buf[..n], &mut pump.out)?;
            }
            self.send_out(&mut pump).await?;
            self.report_rate(&mut pump);
        }
        self.finish(pump).await
    }

    async fn flush(&self, pump: &mut Pump) -> Result<(), HandoffError> {
        pump.encoder.flush(&mut pump.out)?;
        self.send_out(pump).await
    }

    async fn send_out(&self, pump: &mut Pump) -> Result<(), HandoffError> {
        if !pump.out.is_empty() {
            self.frames
                .send(session::migration_frame(&pump.out))
                .await?;
            pump.out.clear();
        }
        Ok(())
    }

    /// The encoder learns how fast the link drains (its compression
    /// follows); the progress shows the rate and bytes sent.
    fn report_rate(&self, pump: &mut Pump) {
        let el = pump.last_rate.0.elapsed();
        if el > Duration::from_millis(500) {
            let now_sent = self.sent.load(Ordering::Relaxed);
            let delta = now_sent - pump.last_rate.1;
            pump.encoder.report_drained(delta, el);
            self.progress.rate_bps.store(
                (delta as f64 * 8.0 / el.as_secs_f64()) as u64,
                Ordering::Relaxed,
            );
            pump.last_rate = (Instant::now(), now_sent);
        }
        self.progress
            .bytes_fetched
            .store(self.sent.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// QEMU's end: the encoder's tail, the memory digest, the END frame.
    async fn finish(mut self, mut pump: Pump) -> Result<u64, HandoffError> {
        pump.encoder.finish(&mut pump.out)?;
        let Pump {
            encoder,
            mut out,
            raw_bytes,
            ..
        } = pump;
        drop_later(encoder);
        if !out.is_empty() {
            self.frames.send(session::migration_frame(&out)).await?;
            out.clear();
        }
        if let Some(rx) = self.digest.take() {
            let d = tokio::time::timeout(Duration::from_secs(30), rx)
                .await
                .map_err(|_| HandoffError::NoDigest("it took over 30 s"))?
                .map_err(|_| HandoffError::NoDigest("QEMU never paused"))?
                .map_err(HandoffError::Digest)?;
            self.frames
                .send(session::memory_digest_frame(
                    d.ram_len,
                    memcheck::CHUNK as u32,
                    &d.chunks,
                ))
                .await?;
            mark(&self.vm_id, "src_digest_queued");
        }
        self.frames.send(session::end_frame(raw_bytes)).await?;
        mark(&self.vm_id, "src_end_queued");
        Ok(raw_bytes)
    }
}
