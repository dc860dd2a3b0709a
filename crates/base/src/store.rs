//! The base VM store on a cloudlet's disk.

use std::path::{Path, PathBuf};

use cloudlet_qemu::files::copy_sparse;
use cloudlet_qemu::image::create_top;
use cloudlet_qemu::{MachineConfig, PortForward, RestoreVmError, Vm, VmSpec};

use crate::{BaseManifest, FileEntry, BASE_FILES, BASE_FORMAT};

/// `$CLOUDLET_HOME`, else `/var/lib/cloudlet` for root, else
/// `~/.local/share/cloudlet`.
pub fn default_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CLOUDLET_HOME") {
        return PathBuf::from(h);
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/cloudlet");
    }
    home_dir().join(".local/share/cloudlet")
}

/// `$CLOUDLET_CACHE`, else `~/.cache/cloudlet`: build inputs that are slow
/// to fetch (the debootstrap tree), outside any repository.
pub fn default_cache() -> PathBuf {
    std::env::var_os("CLOUDLET_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home_dir().join(".cache/cloudlet"))
}

/// Where a cloudlet keeps running VMs' files (RAM files above all):
/// `/dev/shm/cloudlet` (a tmpfs) where `/dev/shm` exists, else `HOME/vms`.
pub fn default_vm_dir() -> PathBuf {
    if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm/cloudlet")
    } else {
        default_home().join("vms")
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("No base VM named {0:?} (see `cloudlet base list`)")]
    NotFound(String),
    #[error("Base VM {name} is damaged: {detail}")]
    Damaged { name: String, detail: String },
    #[error("Base format {found} of {name} is not supported (this build reads {BASE_FORMAT})")]
    Version { name: String, found: u32 },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The base's files live outside this store's home (reached through a
    /// symbolic link, e.g. bases shared by several cloudlets on one host):
    /// deleting them here would take them from the others too.
    #[error("Base VM {name} lives in {} (outside {}, shared through a link): delete it where it lives", .real.display(), .home.display())]
    Shared {
        name: String,
        real: PathBuf,
        home: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreFromBaseError {
    #[error("Cannot prepare {path}: {detail}")]
    Prepare { path: PathBuf, detail: String },
    #[error(transparent)]
    Restore(#[from] RestoreVmError),
}

/// The bases a cloudlet holds.
#[derive(Debug, Clone)]
pub struct BaseStore {
    home: PathBuf,
}

impl BaseStore {
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self { home: home.into() }
    }
    pub fn home(&self) -> &Path {
        &self.home
    }
    pub fn bases_dir(&self) -> PathBuf {
        self.home.join("bases")
    }
    pub fn base_dir(&self, name: &str) -> PathBuf {
        self.bases_dir().join(name)
    }

    /// Every base in the store, by name.
    pub fn list(&self) -> Result<Vec<BaseManifest>, BaseError> {
        let dir = self.bases_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => return Err(BaseError::Io { path: dir, source }),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // builds and imports in progress
            }
            if let Ok(b) = self.get(&name) {
                out.push(b.manifest);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<BaseVm, BaseError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(BaseError::NotFound(name.into()));
        }
        let dir = self.base_dir(name);
        let path = dir.join("manifest.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BaseError::NotFound(name.into()))
            }
            Err(source) => return Err(BaseError::Io { path, source }),
        };
        let manifest = parse_manifest(name, &bytes)?;
        Ok(BaseVm { dir, manifest })
    }

    /// The base with content id `id`, whatever its local name.
    pub fn get_by_id(&self, id: &str) -> Result<BaseVm, BaseError> {
        self.list()?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| BaseError::NotFound(id.into()))
            .and_then(|m| self.get(&m.name))
    }

    /// Remove a base's files; never through a link that leads out of the
    /// store's home ([`BaseError::Shared`]).
    pub fn delete(&self, name: &str) -> Result<(), BaseError> {
        let b = self.get(name)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BaseError::Io { path, source }
        };
        let home = std::fs::canonicalize(&self.home).map_err(io(&self.home))?;
        let real = std::fs::canonicalize(&b.dir).map_err(io(&b.dir))?;
        if !real.starts_with(&home) {
            return Err(BaseError::Shared {
                name: name.into(),
                real,
                home,
            });
        }
        std::fs::remove_dir_all(&real).map_err(io(&real))
    }
}

pub(crate) fn parse_manifest(name: &str, bytes: &[u8]) -> Result<BaseManifest, BaseError> {
    let m: BaseManifest = serde_json::from_slice(bytes).map_err(|e| BaseError::Damaged {
        name: name.into(),
        detail: format!("manifest: {e}"),
    })?;
    if m.format != BASE_FORMAT {
        return Err(BaseError::Version {
            name: name.into(),
            found: m.format,
        });
    }
    Ok(m)
}

/// Hash the base files in `dir` into manifest entries.
pub(crate) fn hash_files(dir: &Path) -> std::io::Result<Vec<FileEntry>> {
    BASE_FILES
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let size = std::fs::metadata(&path)?.len();
            let mut h = blake3::Hasher::new();
            h.update_mmap_rayon(&path)?;
            Ok(FileEntry {
                name: name.to_string(),
                size,
                blake3: h.finalize().to_hex().to_string(),
            })
        })
        .collect()
}

/// One base VM in the store.
#[derive(Debug, Clone)]
pub struct BaseVm {
    pub dir: PathBuf,
    pub manifest: BaseManifest,
}

impl BaseVm {
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join("memory.ram")
    }
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The machine with absolute kernel and initramfs paths.
    pub fn machine(&self) -> MachineConfig {
        let mut m = self.manifest.machine.clone();
        m.kernel = self.dir.join(&m.kernel);
        m.initrd = self.dir.join(&m.initrd);
        m
    }

    /// Check every file against the manifest's hashes and the id.
    pub fn verify(&self) -> Result<(), BaseError> {
        let name = &self.manifest.name;
        let files = hash_files(&self.dir).map_err(|e| BaseError::Damaged {
            name: name.clone(),
            detail: e.to_string(),
        })?;
        for (got, want) in files.iter().zip(&self.manifest.files) {
            if got != want {
                return Err(BaseError::Damaged {
                    name: name.clone(),
                    detail: format!("{} does not match its hash", want.name),
                });
            }
        }
        if self.manifest.compute_id() != self.manifest.id {
            return Err(BaseError::Damaged {
                name: name.clone(),
                detail: "id does not match the content".into(),
            });
        }
        Ok(())
    }

    /// A VM spec running this base's machine with the given files.
    pub fn spec(
        &self,
        name: &str,
        ram: &Path,
        disk: &Path,
        run_dir: &Path,
        ports: Vec<PortForward>,
    ) -> VmSpec {
        VmSpec {
            name: name.to_string(),
            machine: self.machine(),
            accel: self.manifest.accel,
            ram_path: ram.to_path_buf(),
            disk_path: disk.to_path_buf(),
            disk_format: cloudlet_qemu::spec::DiskFormat::Qcow2,
            lazy_disk: None,
            ports,
            run_dir: run_dir.to_path_buf(),
            confine: None,
        }
    }

    /// Resume a new VM in this base's booted state: its own RAM file (a
    /// copy), its own disk top (a qcow2 over the base disk).
    pub async fn restore(
        &self,
        name: &str,
        ram: &Path,
        disk: &Path,
        run_dir: &Path,
        ports: Vec<PortForward>,
    ) -> Result<Vm, RestoreFromBaseError> {
        let prep = |path: &Path, detail: String| RestoreFromBaseError::Prepare {
            path: path.to_path_buf(),
            detail,
        };
        for p in [ram, disk] {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| prep(parent, e.to_string()))?;
            }
        }
        copy_sparse(&self.memory_path(), ram).map_err(|e| prep(ram, e.to_string()))?;
        if let Err(e) = create_top(&self.disk_path(), disk) {
            let _ = std::fs::remove_file(ram);
            return Err(prep(disk, e.to_string()));
        }
        let spec = self.spec(name, ram, disk, run_dir, ports);
        match Vm::restore(spec, &self.state_path()).await {
            Ok(vm) => Ok(vm),
            Err(e) => {
                let _ = std::fs::remove_file(ram);
                let _ = std::fs::remove_file(disk);
                Err(e.into())
            }
        }
    }
}
