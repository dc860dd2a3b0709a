//! A saved VM on disk, and bringing it back.
//!
//! Layout of a snapshot directory (format [`SNAPSHOT_FORMAT`]):
//!
//! ```text
//! snapshot.json   SnapshotState: format, machine, accelerator
//! state           QEMU device state (migration stream, x-ignore-shared: no RAM)
//! ram             the guest's RAM, byte for byte (offset = guest-physical address)
//! disk            the disk: a qcow2 top over the base image, or raw
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files::{copy_sparse, write_atomic};
use crate::spec::{Accel, DiskFormat, MachineConfig, PortForward, VmSpec};
use crate::vm::{RestoreVmError, SaveVmError, StartVmError, Vm};

/// Version of the snapshot directory layout.
pub const SNAPSHOT_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotState {
    pub format: u32,
    pub machine: MachineConfig,
    pub accel: Accel,
    #[serde(default)]
    pub disk_format: DiskFormat,
}

/// Where a restored VM's own files go.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    pub name: String,
    pub ram_path: PathBuf,
    pub disk_path: PathBuf,
    pub run_dir: PathBuf,
    pub ports: Vec<PortForward>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("Cannot read snapshot {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Snapshot {path} is not valid: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("Snapshot format {found} is not supported (this build reads {SNAPSHOT_FORMAT})")]
    Version { found: u32 },
    #[error("Cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Save(#[from] SaveVmError),
    #[error(transparent)]
    Restore(#[from] RestoreVmError),
}

/// Pause `vm` and save it into `dir` (created). The VM stays paused.
pub async fn save_snapshot(vm: &Vm, dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Read { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    vm.save_device_state(&dir.join("state")).await?;
    let spec = vm.spec();
    copy(&spec.ram_path, &dir.join("ram"))?;
    copy(&spec.disk_path, &dir.join("disk"))?;
    let state = SnapshotState {
        format: SNAPSHOT_FORMAT,
        machine: spec.machine.clone(),
        accel: spec.accel,
        disk_format: spec.disk_format,
    };
    let json = serde_json::to_vec_pretty(&state).map_err(|e| SnapshotError::Invalid {
        path: dir.to_path_buf(),
        detail: e.to_string(),
    })?;
    write_atomic(&dir.join("snapshot.json"), &json).map_err(io(dir))?;
    Ok(state)
}

/// Read and check a snapshot's description.
pub fn read_snapshot(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let path = dir.join("snapshot.json");
    let bytes = std::fs::read(&path).map_err(|source| SnapshotError::Read {
        path: path.clone(),
        source,
    })?;
    let state: SnapshotState =
        serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Invalid {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    if state.format != SNAPSHOT_FORMAT {
        return Err(SnapshotError::Version {
            found: state.format,
        });
    }
    Ok(state)
}

/// Restore the snapshot in `dir` into a new QEMU process with its own copy
/// of the RAM file and disk top.
pub async fn restore_snapshot(dir: &Path, target: RestoreTarget) -> Result<Vm, SnapshotError> {
    let state = read_snapshot(dir)?;
    let ram = dir.join("ram");
    let expected = state.machine.memory_bytes();
    let actual = std::fs::metadata(&ram)
        .map_err(|source| SnapshotError::Read {
            path: ram.clone(),
            source,
        })?
        .len();
    if actual != expected {
        return Err(RestoreVmError::Start(StartVmError::RamSizeMismatch {
            path: ram,
            expected,
            actual,
        })
        .into());
    }
    if let Some(parent) = target.run_dir.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    copy(&ram, &target.ram_path)?;
    if let Err(e) = copy(&dir.join("disk"), &target.disk_path) {
        let _ = std::fs::remove_file(&target.ram_path);
        return Err(e);
    }
    let spec = VmSpec {
        name: target.name,
        machine: state.machine,
        accel: state.accel,
        ram_path: target.ram_path.clone(),
        disk_path: target.disk_path.clone(),
        disk_format: state.disk_format,
        lazy_disk: None,
        ports: target.ports,
        run_dir: target.run_dir,
        confine: None,
    };
    match Vm::restore(spec, &dir.join("state")).await {
        Ok(vm) => Ok(vm),
        Err(e) => {
            let _ = std::fs::remove_file(&target.ram_path);
            let _ = std::fs::remove_file(&target.disk_path);
            Err(e.into())
        }
    }
}

fn copy(from: &Path, to: &Path) -> Result<u64, SnapshotError> {
    copy_sparse(from, to).map_err(|source| SnapshotError::Copy {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    })
}
