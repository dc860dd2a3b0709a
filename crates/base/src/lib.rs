//! Base VMs: every cloudlet keeps a few booted, idle, paused VMs that app
//! overlays are made against and applied to.
//!
//! A base VM is a directory in the store (format [`BASE_FORMAT`]):
//!
//! ```text
//! <home>/bases/<name>/
//!   manifest.json   BaseManifest: id, machine, files with BLAKE3 hashes
//!   kernel          the guest kernel (Debian's linux-image-amd64)
//!   initrd.img      our initramfs: busybox, virtio modules, /init
//!   disk.raw        the root disk (ext4), as the booted guest left it
//!   memory.ram      the guest's RAM after boot, paused (offset = guest-physical)
//!   state           QEMU device state (migration stream without RAM)
//! ```
//!
//! The id is a BLAKE3 hash over the machine description and the hashes of
//! every file, so two cloudlets holding the same id hold the same bytes.

mod archive;
mod build;
pub mod cpio;
pub mod kernel;
pub mod rootfs;
mod store;

pub use archive::{export_base, import_base, ArchiveError};
pub use build::{build_base, BuildOptions, Recipe};
pub use store::{
    default_cache, default_home, default_vm_dir, BaseError, BaseStore, BaseVm, RestoreFromBaseError,
};

use std::path::PathBuf;

use cloudlet_qemu::{Accel, MachineConfig};
use serde::{Deserialize, Serialize};

/// Version of the base directory layout and manifest.
pub const BASE_FORMAT: u32 = 1;

/// Files of a base VM, in the order they are hashed.
pub const BASE_FILES: &[&str] = &["kernel", "initrd.img", "disk.raw", "memory.ram", "state"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

/// What describes a base VM. `machine.kernel` and `machine.initrd` are file
/// names relative to the base directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseManifest {
    pub format: u32,
    pub name: String,
    /// BLAKE3 over machine + file hashes (see [`BaseManifest::compute_id`]).
    pub id: String,
    pub recipe: String,
    /// Hash of the build inputs; a rebuild with equal inputs is skipped.
    pub inputs: String,
    pub machine: MachineConfig,
    pub accel: Accel,
    pub disk_size: u64,
    pub devices: Vec<String>,
    pub qemu_version: String,
    pub kernel_release: String,
    pub built_unix: u64,
    pub files: Vec<FileEntry>,
}

impl BaseManifest {
    /// The content id: BLAKE3 of the machine description and file hashes.
    pub fn compute_id(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"cloudlet-base-v1\0");
        let machine = serde_json::to_vec(&self.machine).unwrap_or_default();
        h.update(&machine);
        h.update(self.accel.as_str().as_bytes());
        for f in &self.files {
            h.update(f.name.as_bytes());
            h.update(&f.size.to_le_bytes());
            h.update(f.blake3.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }

    pub fn memory_bytes(&self) -> u64 {
        self.machine.memory_bytes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildBaseError {
    #[error("No guest kernel found at {0} (install Debian's linux-image-amd64)")]
    NoKernel(PathBuf),
    #[error("No kernel modules at {0}")]
    NoModules(PathBuf),
    #[error("Kernel module {0} not found in modules.dep")]
    MissingModule(String),
    #[error("Kernel module {0} is compressed; this build only packs plain .ko files")]
    CompressedModule(PathBuf),
    #[error("No static busybox at {0} (install Debian's busybox-static)")]
    NoBusybox(PathBuf),
    #[error("The guest agent binary was not found (looked in {0}); build it with `make guest`")]
    NoAgent(String),
    #[error("Unknown base recipe {0:?} (known: tiny, debian)")]
    UnknownRecipe(String),
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Booting the base VM failed: {0}")]
    Boot(#[from] cloudlet_qemu::StartVmError),
    #[error("The base VM's agent did not come up: {detail} (console: {console})")]
    Agent { detail: String, console: String },
    #[error("Saving the booted base VM failed: {0}")]
    Save(#[from] cloudlet_qemu::SaveVmError),
    #[error("Disk image: {0}")]
    Image(#[from] cloudlet_qemu::image::ImageError),
}
