//! The source side of a handoff (`POST /v1/vms/{id}/handoff`): a
//! [`Source`] walks the phases in order, one method each:
//!
//! 1. [`Source::offer`]: the destination prepares (protocol, generation
//!    and base checked there before its QEMU starts);
//! 2. [`Source::send_disk_live`]: disk chunks that differ from the base,
//!    while the VM runs (`disk`);
//! 3. [`Source::start_migration`]: QEMU migrates into a socket of ours; a
//!    reader encodes the stream into session frames (`stream`, `flow`);
//! 4. [`Source::precopy`]: follow QEMU, throttle the guest if its memory
//!    would not converge over this link, drain the link, let QEMU stop
//!    (`precopy`);
//! 5. [`Source::switchover`]: QEMU paused: digest the memory, send the disk
//!    writes made meanwhile, let QEMU send its last pass (`switchover`);
//! 6. [`Source::commit`]: record the move (generation + 1), commit until a
//!    definite answer, repair a memory difference (`commit`);
//! 7. on failure, [`rollback`]: resume here unless the commit was sent.

mod commit;
mod disk;
mod flow;
mod precopy;
mod rollback;
mod stream;
mod switchover;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_api::events::{HandoffOutcome, HandoffRecord, HANDOFF_HISTORY_VERSION};
use cloudlet_api::{HandoffOffer, HandoffReport, HandoffRequest, StageTiming, VmState};
use cloudlet_handoff::converge::{ConvergeConfig, Convergence};
use cloudlet_handoff::session::SESSION_MAGIC;
use cloudlet_qemu::{MigrationParameters, QmpEvent, Vm};
use tokio::sync::{broadcast, OnceCell};
use tracing::Instrument;

use self::disk::{DiskSync, DIRTY_BITMAP};
use self::flow::Session;
use self::stream::{MigrationReader, SourceDigest};
use super::peer::Peer;
use super::{base_memory, phase, HandoffError};
use crate::core::cloudlet::Cloudlet;
use crate::core::lifecycle::VmLifecycle;
use crate::core::store::VmRecord;
use crate::progress::{Ending, LiveProgress, Watch};
use crate::synth::STAGE_STREAMING;
use crate::throttle::DutyCycle;

/// How long the whole handoff may take.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a VM still receiving its memory (early start) may take to have
/// all of it before it can move.
const STREAMING_WAIT: Duration = Duration::from_secs(600);
/// QEMU's downtime limit until we let it switch over (ms); see `precopy`.
const HOLD_DOWNTIME_MS: u64 = 300;
/// Not capped (QEMU's `max-bandwidth`).
const UNCAPPED: u64 = 1_000_000_000_000;

/// One handoff, source side.
pub struct Source {
    c: Arc<Cloudlet>,
    id: String,
    vm: Arc<Vm>,
    /// The record as the handoff began (state `handing_off`).
    rec: VmRecord,
    peer: Peer,
    progress: Arc<LiveProgress>,
    start: Instant,
    phases: Vec<StageTiming>,
    /// QEMU's events (STOP, MIGRATION).
    events: broadcast::Receiver<QmpEvent>,
    /// The last STOP before the switchover: the downtime starts there (µs).
    stop_us: i64,
    /// When QEMU paused before the switchover.
    switch_at: Option<Instant>,
}

/// What moves once the memory does: the session, the disk, the reader.
struct Moving {
    session: Session,
    disk: DiskSync,
    digest: SourceDigest,
    /// Set while the link drains before the switchover: the reader holds
    /// QEMU's writes back.
    hold: Arc<AtomicBool>,
    reader: Option<tokio::task::JoinHandle<Result<u64, HandoffError>>>,
    conv: Convergence,
    t_memory: Instant,
    /// QEMU measures the guest's dirty rate (`calc-dirty-rate`).
    sampling: bool,
}

/// [`handoff_vm`], its outcome counted in the metrics (what the API and
/// a drain call).
pub async fn handoff_vm_recorded(
    c: &Arc<Cloudlet>,
    id: &str,
    req: HandoffRequest,
) -> Result<HandoffReport, HandoffError> {
    let result = handoff_vm(c, id, req).await;
    match &result {
        Ok(report) => c.metrics.record_handoff(report),
        Err(e) => c.metrics.handoff_failed(
            crate::metrics::HandoffSide::Source,
            crate::metrics::HandoffFailure::of(e.is_refusal()),
        ),
    }
    result
}

/// The source side: `POST /v1/vms/{id}/handoff`.
pub async fn handoff_vm(
    c: &Arc<Cloudlet>,
    id: &str,
    req: HandoffRequest,
) -> Result<HandoffReport, HandoffError> {
    let start = Instant::now();
    let started_unix_ms = crate::progress::unix_ms();
    wait_until_streamed(c, id, start + STREAMING_WAIT).await?;
    // A URL or a name the directory knows; its token from the request,
    // the static peers or the directory.
    let (dest, known) = c.peer_for(&req.destination);
    let handoff_id = hex::encode(rand::random::<[u8; 8]>());
    let (id, vm, rec, progress) = claim(c, id, &handoff_id, &dest)?;
    let (name, tenant) = (rec.name.clone(), rec.tenant.clone());
    let result = hand_off(
        c,
        (start, &handoff_id),
        (id.clone(), vm, rec),
        (dest.clone(), req.token.or(known)),
        progress.clone(),
    )
    .await;
    // The end, told and kept in the history.
    let (outcome, stage, ending) = match &result {
        Ok(r) => (
            HandoffOutcome::Moved,
            "moved",
            Ending {
                downtime_ms: Some(r.downtime_ms()),
                destination: Some(r.destination_url.clone()),
                error: None,
            },
        ),
        Err(e) => (
            HandoffOutcome::Failed,
            "failed",
            Ending {
                error: Some(e.to_string()),
                ..Ending::default()
            },
        ),
    };
    progress.finish(stage, ending);
    let samples = progress.samples();
    let report = result.as_ref().ok();
    c.handoffs.record(HandoffRecord {
        version: HANDOFF_HISTORY_VERSION,
        handoff_id,
        vm_id: id,
        name,
        destination: report.map_or(dest, |r| r.destination_url.clone()),
        started_unix_ms,
        total_ms: start.elapsed().as_millis() as u64,
        outcome,
        error: result.as_ref().err().map(|e| e.to_string()),
        downtime_ms: report.map(|r| r.downtime_ms()),
        wire_bytes: report.map_or(0, |r| r.wire_bytes),
        raw_bytes: report.map_or(0, |r| r.raw_bytes),
        disk_bytes: report.map_or(0, |r| r.disk_bytes),
        phases: report.map(|r| r.phases.clone()).unwrap_or_default(),
        switchover_ms: samples
            .iter()
            .find(|s| s.stage == "switchover")
            .map(|s| s.t_ms),
        samples,
        tenant,
    });
    result
}

/// The handoff of a claimed VM (state `handing_off`, stored here).
async fn hand_off(
    c: &Arc<Cloudlet>,
    (start, handoff_id): (Instant, &str),
    (id, vm, rec): (String, Arc<Vm>, VmRecord),
    (dest, token): (String, Option<String>),
    progress: Arc<LiveProgress>,
) -> Result<HandoffReport, HandoffError> {
    let Some(token) = token else {
        if let Some(rec) = c.update(&id, |e| e.record.set_state_or_log(VmState::Running)) {
            let _ = c.store.put(&rec);
        }
        return Err(HandoffError::NoToken(dest));
    };
    let span =
        tracing::info_span!("handoff", side = "source", vm_id = %id, handoff_id = %handoff_id);
    let peer = Peer::new(&dest, &token, handoff_id);
    let duty = DutyCycle::start(vm.qmp().clone());
    let refusal = Arc::new(OnceCell::new());
    let mut source = Source {
        c: c.clone(),
        events: vm.qmp().events(),
        id,
        vm,
        rec,
        peer,
        progress,
        start,
        phases: Vec::new(),
        stop_us: 0,
        switch_at: None,
    };
    let run = source.run(&duty, &refusal).instrument(span.clone());
    let result = match tokio::time::timeout(HANDOFF_TIMEOUT, run).await {
        Ok(r) => r,
        Err(_) => Err(HandoffError::Timeout(HANDOFF_TIMEOUT)),
    };
    // Before anything else touches the run state: no pause of ours may
    // follow a resume after a failure.
    duty.stop().await;
    match result {
        Ok(report) => Ok(report),
        Err(err) => {
            let err = flow::with_refusal(err, &refusal).await;
            source.rollback(err).instrument(span).await
        }
    }
}

/// A VM that is still receiving its memory (early start) moves once it
/// has all of it.
async fn wait_until_streamed(
    c: &Cloudlet,
    id: &str,
    deadline: Instant,
) -> Result<(), HandoffError> {
    loop {
        let streaming = {
            let m = c.registry();
            crate::core::cloudlet::key_of(&m, id, |_| true)
                .and_then(|k| m.get(&k))
                .is_some_and(|e| e.progress.snapshot().stage == STAGE_STREAMING)
        };
        if !streaming {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HandoffError::StillStarting(id.into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Mark the VM as handing off, stored (only a running VM with all its
/// memory may), then watch the handoff's progress.
fn claim(
    c: &Cloudlet,
    id: &str,
    handoff_id: &str,
    dest: &str,
) -> Result<(String, Arc<Vm>, VmRecord, Arc<LiveProgress>), HandoffError> {
    let mut m = c.registry();
    let key = crate::core::cloudlet::key_of(&m, id, |_| true)
        .ok_or_else(|| HandoffError::NotFound(id.into()))?;
    let e = m
        .get_mut(&key)
        .ok_or_else(|| HandoffError::NotFound(id.into()))?;
    let state = e.record.state();
    let Some(vm) = e.vm.clone().filter(|_| state.can_hand_off()) else {
        return Err(HandoffError::NotRunning { id: key, state });
    };
    if e.progress.snapshot().stage == STAGE_STREAMING {
        return Err(HandoffError::StillStarting(key));
    }
    e.record.set_state_or_log(VmState::HandingOff);
    if let Err(err) = c.store.put(&e.record) {
        e.record.set_state_or_log(VmState::Running);
        return Err(err.into());
    }
    e.progress = LiveProgress::watched(
        Watch::handoff_out(
            (&key, &e.record.name),
            handoff_id,
            dest,
            c.store.event_sender(),
        ),
        "preparing",
    );
    Ok((key, vm, e.record.clone(), e.progress.clone()))
}

impl Source {
    async fn run(
        &mut self,
        duty: &DutyCycle,
        refusal: &Arc<OnceCell<String>>,
    ) -> Result<HandoffReport, HandoffError> {
        let base = self
            .c
            .bases
            .get_by_id(&self.rec.base_id)
            .map_err(|source| HandoffError::Base {
                base_id: self.rec.base_id.clone(),
                source,
            })?;
        self.offer().await?;
        let session = Session::open(&self.peer, refusal.clone());
        session.send(SESSION_MAGIC.to_vec()).await?;
        // The guest's dirty rate, sampled while the disk moves (QEMU hashes
        // a sample of pages now and after a second); see `converge`.
        let sampling = self.vm.qmp().calc_dirty_rate(1, Some(4096)).await.is_ok();
        let disk = self.send_disk_live(&session, &base).await?;

        // Memory and devices: QEMU migrates into our socket.
        self.progress.set_stage("memory");
        let t_memory = Instant::now();
        let conn = self.start_migration().await?;
        let (digest, digest_rx) =
            SourceDigest::start(self.c.config.verify_memory, &self.vm.spec().ram_path)?;
        let hold = Arc::new(AtomicBool::new(false));
        let reader = MigrationReader::new(
            &session,
            conn,
            &self.progress,
            &hold,
            &self.id,
            base_memory(&base)?,
            digest_rx,
        )?
        .spawn();
        let mut m = Moving {
            session,
            disk,
            digest,
            hold,
            reader: Some(reader),
            conv: Convergence::new(ConvergeConfig::default()),
            t_memory,
            sampling,
        };
        let switched = self.precopy(&mut m, duty).await?;
        let raw_bytes = self.end_stream(&mut m, switched, duty).await?;
        self.commit(&mut m, raw_bytes).await
    }

    /// `POST /v1/handoff/prepare` at the destination.
    async fn offer(&mut self) -> Result<(), HandoffError> {
        let c = &self.c;
        let offer = HandoffOffer {
            protocol: c.handoff_protocol(),
            handoff_id: self.peer_hid(),
            vm_id: self.id.clone(),
            name: self.rec.name.clone(),
            generation: self.rec.generation,
            base_id: self.rec.base_id.clone(),
            flavor: self.rec.flavor.clone(),
            app: self.rec.app.clone(),
            overlay: self.rec.overlay.clone(),
            source: c
                .config
                .advertise_url
                .clone()
                .unwrap_or_else(|| c.config.name.clone()),
            session_hash: self.rec.session_hash.clone(),
            tenant: self.rec.tenant.clone(),
        };
        let t = Instant::now();
        self.peer.prepare(&offer).await?;
        self.phases.push(phase("prepare", t));
        Ok(())
    }

    fn peer_hid(&self) -> String {
        self.peer.hid().to_string()
    }

    /// The disk, live: what differs from the base; QEMU's dirty bitmap
    /// records the writes from here on.
    async fn send_disk_live(
        &mut self,
        session: &Session,
        base: &cloudlet_base::BaseVm,
    ) -> Result<DiskSync, HandoffError> {
        self.progress.set_stage("disk");
        let t = Instant::now();
        self.vm
            .qmp()
            .add_dirty_bitmap("disk0", DIRTY_BITMAP)
            .await?;
        let mut disk = DiskSync::new(self.vm.spec().disk_path.clone(), base.disk_path());
        disk.send_changes(&session.frames()?, None).await?;
        // Bytes sent, as the memory stage counts them (the session's).
        self.progress
            .bytes_fetched
            .store(session.sent(), std::sync::atomic::Ordering::Relaxed);
        self.phases.push(phase("disk", t));
        Ok(disk)
    }

    /// QEMU migrates into a Unix socket of ours, paused before the
    /// switchover (`pause-before-switchover`).
    async fn start_migration(&mut self) -> Result<tokio::net::UnixStream, HandoffError> {
        const CONNECT: Duration = Duration::from_secs(10);
        let q = self.vm.qmp();
        let sock = self.vm.spec().socket_dir().join("migrate-out.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)?;
        // A confined QEMU connects as its own uid.
        self.vm.spec().hand_over(&sock)?;
        q.set_migration_capabilities(&[
            ("x-ignore-shared", false),
            ("pause-before-switchover", true),
            // Our duty cycle (`throttle`) replaces QEMU's vCPU throttling.
            ("auto-converge", false),
            // MIGRATION events: the switchover starts when QEMU pauses, not
            // at our next poll.
            ("events", true),
        ])
        .await?;
        // QEMU judges the link by what it wrote into our socket over the
        // last 100 ms (pages equal to the base cost nothing on the link):
        // the flow window keeps that close to the WAN's rate. We also switch
        // over ourselves, after draining the link, as soon as the remainder
        // fits our downtime target (raising this limit).
        q.set_migration_parameters(&MigrationParameters {
            max_bandwidth: Some(UNCAPPED),
            downtime_limit: Some(HOLD_DOWNTIME_MS),
            ..Default::default()
        })
        .await?;
        q.migrate(&format!("unix:{}", sock.display())).await?;
        let (conn, _) = tokio::time::timeout(CONNECT, listener.accept())
            .await
            .map_err(|_| HandoffError::QemuDidNotConnect(CONNECT))??;
        let _ = std::fs::remove_file(&sock);
        Ok(conn)
    }
}
