//! The QEMU driver: the only crate of cloudlet that spawns QEMU.
//!
//! - [`spec`]: a VM as a value and its QEMU command line;
//! - [`qmp`]: an async QMP client (typed helpers, events, timeouts);
//! - [`migration`]: typed migration commands (status, statistics,
//!   parameters, capabilities, start, continue);
//! - [`dirty`]: what the guest changed (memory dirty rate, disk dirty
//!   bitmaps, the export of the dirty disk blocks), block nodes;
//! - [`vm`]: one QEMU process: boot, restore, pause, save, kill, exit watch;
//! - [`postcopy`]: early start, a restore whose memory arrives while the
//!   guest already runs (we are the postcopy migration source);
//! - [`snapshot`]: saved VMs on disk (device state + RAM file + disk top);
//! - [`agent`]: the host side of the guest agent protocol;
//! - [`confine`]: each QEMU under its own uid and cgroup, sandboxed;
//! - [`accel`]: KVM where a probe boot shows it works, else TCG.

pub mod accel;
pub mod agent;
pub mod confine;
pub mod dirty;
pub mod files;
pub mod image;
pub mod migration;
pub mod postcopy;
pub mod qmp;
pub mod snapshot;
pub mod spec;
pub mod vm;

pub use agent::{AgentClient, AgentError, ExecOutput};
pub use dirty::{
    BlockDeviceInfo, BlockDirtyInfo, BlockInfo, DirtyExportConfig, DirtyRateInfo, DirtyRateStatus,
    ExportDirtyExtentsError,
};
pub use migration::{
    MigrationCapability, MigrationCapabilityState, MigrationInfo, MigrationParameters,
    MigrationStatus, MultifdCompression, RamStats,
};
pub use qmp::{QmpClient, QmpError, QmpEvent};
pub use snapshot::{
    read_snapshot, restore_snapshot, save_snapshot, RestoreTarget, SnapshotError, SnapshotState,
};
pub use spec::{Accel, DiskFormat, MachineConfig, PortForward, VmSpec};
pub use vm::{RestoreVmError, SaveVmError, StartVmError, Vm, VmExit};
