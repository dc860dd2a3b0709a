//! One error enum per side of a handoff. `crate::api` maps them to status
//! codes; a refusal the source must understand (the destination's
//! `memory_differs`, `stale_generation`, ...) has its own variant.

use std::time::Duration;

use cloudlet_api::VmState;
use cloudlet_handoff::memcheck::DiffReport;
use cloudlet_handoff::session;

/// Why `POST /v1/vms/{id}/handoff` failed (the source's side).
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("No VM {0}")]
    NotFound(String),
    #[error("VM {id} is {state:?}, only a running VM can be handed off")]
    NotRunning { id: String, state: VmState },
    #[error(
        "VM {0} is still receiving its memory (early start): try again once its stage is \"ready\""
    )]
    StillStarting(String),
    #[error("No token for destination {0} (give one, or configure it as a peer)")]
    NoToken(String),
    #[error("The VM's base {base_id} is not here any more: {source}")]
    Base {
        base_id: String,
        source: cloudlet_base::BaseError,
    },
    #[error("Destination {url} refused: {status} {message}")]
    Refused {
        url: String,
        status: u16,
        /// The API error's `kind` (`not_found`, `memory_differs`, ...).
        kind: String,
        message: String,
    },
    /// The destination's memory differs from ours: its report says in which
    /// pages (a definite refusal of the commit; the source may repair).
    #[error("Destination {url}: the moved memory differs from the source's in {} MiB chunk(s)", .report.chunks.len())]
    MemoryDiffers { url: String, report: DiffReport },
    #[error("The destination's memory differs from the source's in {chunks} MiB chunk(s), {why}: not committing")]
    NotRepaired { chunks: usize, why: &'static str },
    /// The commit was sent but no definite answer came back: the VM may
    /// run at the destination, so it is not resumed here.
    #[error("Destination {url} did not confirm the commit ({detail}): the VM stays stopped here, it may run there")]
    CommitUnknown { url: String, detail: String },
    #[error("Cannot reach destination {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("Destination {url} answered with a body that is not a {what}: {detail}")]
    BadAnswer {
        url: String,
        what: &'static str,
        detail: String,
    },
    #[error("The destination stopped reading the stream{}", .why.as_deref().map(|w| format!(": {w}")).unwrap_or_default())]
    StoppedReading { why: Option<String> },
    #[error("The stream was held for over {0:?}: the handoff was abandoned")]
    Abandoned(Duration),
    #[error("QEMU did not connect to the migration socket within {0:?}")]
    QemuDidNotConnect(Duration),
    #[error("QEMU migration {status}: {detail}")]
    Migration {
        status: cloudlet_qemu::MigrationStatus,
        detail: String,
    },
    #[error("QEMU never paused before the switchover")]
    NeverPaused,
    #[error("No memory digest: {0}")]
    NoDigest(&'static str),
    #[error("Digesting the memory: {0}")]
    Digest(String),
    #[error("Encoding the migration stream: {0}")]
    Encode(#[from] cloudlet_handoff::EncodeStreamError),
    #[error("QEMU: {0}")]
    Qemu(#[from] cloudlet_qemu::QmpError),
    #[error("A handoff task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("Handoff timed out after {0:?}")]
    Timeout(Duration),
    #[error("State store: {0}")]
    Store(#[from] crate::core::store::StoreError),
}

impl HandoffError {
    /// The handoff was refused (by this cloudlet or the destination)
    /// rather than failed on the way.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            HandoffError::NotFound(_)
                | HandoffError::NotRunning { .. }
                | HandoffError::StillStarting(_)
                | HandoffError::NoToken(_)
                | HandoffError::Refused { .. }
                | HandoffError::MemoryDiffers { .. }
                | HandoffError::NotRepaired { .. }
        )
    }
}

/// Why a call of the destination's side (`/v1/handoff/...`) failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveHandoffError {
    #[error("This cloudlet does not hold base VM {0}")]
    BaseNotHeld(String),
    #[error("No handoff {0} in progress here")]
    UnknownHandoff(String),
    #[error("A VM with id {0} exists here already")]
    Exists(String),
    #[error("The source speaks handoff protocol {theirs}, this cloudlet {ours}: they cannot move VMs between them")]
    Protocol { ours: u32, theirs: u32 },
    #[error("VM {id} has generation {known} here: an arrival of generation {offered} is stale")]
    StaleGeneration {
        id: String,
        known: u64,
        offered: u64,
    },
    /// A call that does not fit where the arrival stands (a second stream
    /// while one is read, a repair of a VM that does not differ, ...).
    #[error("Handoff {hid} is {stage}: {what} is not possible now")]
    WrongStage {
        hid: String,
        stage: &'static str,
        what: &'static str,
    },
    /// A definite no to a commit: the VM was not resumed here, and will
    /// not be.
    #[error("The VM was not resumed here: {0}")]
    NotCommitted(String),
    #[error("Cannot create VM: {0}")]
    Create(#[from] crate::core::cloudlet::CreateVmError),
    #[error("Cannot start QEMU: {0}")]
    Start(#[from] cloudlet_qemu::StartVmError),
    #[error("QEMU: {0}")]
    Qemu(#[from] cloudlet_qemu::QmpError),
    #[error("Bad session stream: {0}")]
    Session(#[from] session::ReadSessionError),
    #[error("Bad migration stream: {0}")]
    Decode(#[from] cloudlet_handoff::DecodeStreamError),
    #[error("The session ended before its END frame")]
    Truncated,
    #[error("The migration stream ended before QEMU had all of it")]
    MigrationIncomplete,
    #[error("Nothing arrived for {0:?}")]
    Idle(Duration),
    #[error("Reading the request body: {0}")]
    Body(String),
    #[error("A {frame} frame cannot come {during}")]
    UnexpectedFrame {
        frame: &'static str,
        during: &'static str,
    },
    #[error("Repair pages at {offset} (+{len}) lie outside the memory")]
    RepairOutside { offset: u64, len: usize },
    #[error("Memory digest in chunks of {got} bytes, expected {expected}")]
    DigestChunk { got: u32, expected: usize },
    #[error("The source's memory is {theirs} bytes, ours {ours}")]
    MemorySize { theirs: u64, ours: u64 },
    /// The commit's refusal when the moved memory differs; the report
    /// lets the source repair it.
    #[error("The moved memory differs from the source's in {} MiB chunk(s)", .0.chunks.len())]
    MemoryDiffers(DiffReport),
    #[error("The moved memory differs from the source's in {0} MiB chunks, too many to repair")]
    TooDifferent(usize),
    #[error("The source sent no digest of its memory, and this cloudlet verifies moved memory")]
    Unverified,
    #[error("Digesting the memory: {0}")]
    Digest(std::io::Error),
    #[error("A handoff task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("State store: {0}")]
    Store(#[from] crate::core::store::StoreError),
}

impl ReceiveHandoffError {
    /// A definite no from this cloudlet (the offer or the commit refused),
    /// rather than a failure on the way.
    pub fn is_refusal(&self) -> bool {
        use ReceiveHandoffError as R;
        matches!(
            self,
            R::BaseNotHeld(_)
                | R::Create(
                    crate::core::cloudlet::CreateVmError::Draining
                        | crate::core::cloudlet::CreateVmError::OverCapacity { .. }
                        | crate::core::cloudlet::CreateVmError::OverQuota { .. }
                        | crate::core::cloudlet::CreateVmError::UnknownTenant(_)
                )
                | R::Exists(_)
                | R::Protocol { .. }
                | R::StaleGeneration { .. }
                | R::WrongStage { .. }
                | R::NotCommitted(_)
                | R::MemoryDiffers(_)
                | R::TooDifferent(_)
                | R::Unverified
        )
    }
}
