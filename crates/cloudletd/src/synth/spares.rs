//! Spare disks: for each base VM, one copy of its disk made ahead of time,
//! so that an early-start synthesis takes it with a rename instead of
//! copying the base disk while the user waits (a few hundred MB even for a
//! small Debian base; seconds when other work is writing to the disk).
//!
//! Layout: `HOME/spares/<base content id>.disk`, on the same file system as
//! the VM directories (`HOME/vms`), so that taking one is a rename. A spare
//! is written under a temporary name (`.<id>.disk.partial`) and renamed when
//! complete: a crash never leaves a partial copy that looks whole. Base
//! images never change under a content id, so a spare stays valid until its
//! base is deleted; spares of bases that are gone are removed on refill.

use std::path::{Path, PathBuf};

use cloudlet_base::{BaseStore, BaseVm};

pub struct Spares {
    dir: PathBuf,
    /// One refill at a time (they would write the same temporary files).
    refilling: std::sync::Mutex<()>,
}

impl Spares {
    pub fn new(home: &Path) -> Spares {
        Spares {
            dir: home.join("spares"),
            refilling: std::sync::Mutex::new(()),
        }
    }

    fn path(&self, base_id: &str) -> PathBuf {
        self.dir.join(format!("{base_id}.disk"))
    }

    /// Moves the spare disk of `base` to `dest`; false if there is none
    /// (the caller copies the base itself).
    pub fn take(&self, base: &BaseVm, dest: &Path) -> bool {
        let spare = self.path(&base.manifest.id);
        match std::fs::rename(&spare, dest) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::warn!(error = %e, spare = %spare.display(), "cannot take a spare disk");
                false
            }
        }
    }

    /// Removes the spare of a base being deleted, at once (a copy under way
    /// goes on from its open file and is removed by the next refill, which
    /// the caller starts).
    /// A spare of base `base_id` is ready.
    pub fn ready(&self, base_id: &str) -> bool {
        self.path(base_id).is_file()
    }

    pub fn discard(&self, base_id: &str) {
        match std::fs::remove_file(self.path(base_id)) {
            Ok(()) => tracing::info!(base_id, "spare disk removed with its base"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(base_id, error = %e, "cannot remove a spare disk"),
        }
    }

    /// Makes the missing spares and removes those of bases that are gone.
    /// Blocking (copies whole disks): run it off the async threads.
    pub fn refill(&self, bases: &BaseStore) {
        let Ok(_one) = self.refilling.try_lock() else {
            return; // another refill is at it
        };
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            tracing::warn!(error = %e, dir = %self.dir.display(), "cannot create the spares directory");
            return;
        }
        let list = bases.list().unwrap_or_default();
        let ids: Vec<&str> = list.iter().map(|m| m.id.as_str()).collect();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let id = name
                .trim_start_matches('.')
                .split(".disk")
                .next()
                .unwrap_or_default()
                .to_string();
            // Stale partial copies (a crash mid-copy) and spares of deleted
            // bases.
            if name.ends_with(".partial") || !ids.contains(&id.as_str()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for m in &list {
            let spare = self.path(&m.id);
            if spare.exists() {
                continue;
            }
            let Ok(base) = bases.get(&m.name) else {
                continue;
            };
            let tmp = self.dir.join(format!(".{}.disk.partial", m.id));
            let t = std::time::Instant::now();
            // Synced before the rename: after a host crash a spare is
            // either whole or absent.
            let made = cloudlet_qemu::files::copy_sparse(&base.disk_path(), &tmp)
                .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|_| std::fs::rename(&tmp, &spare));
            match made {
                Ok(()) => {
                    tracing::debug!(base = %m.name, ms = t.elapsed().as_millis() as u64, "spare disk ready")
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    tracing::warn!(base = %m.name, error = %e, "cannot make a spare disk");
                }
            }
        }
    }
}
