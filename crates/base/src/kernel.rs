//! The guest kernel from Debian's `linux-image-amd64`, and the modules the
//! guest needs, resolved through `modules.dep`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::BuildBaseError;

/// Modules the guest loads at boot, in this order (dependencies first are
/// added from `modules.dep`).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "virtio_console",
    "virtio-rng",
    "crc16",
    "crc32c_generic",
    "mbcache",
    "jbd2",
    "ext4",
];

/// A kernel image and its module tree.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub release: String,
    pub modules_dir: PathBuf,
}

/// `$CLOUDLET_KERNEL` or the newest `/boot/vmlinuz-*` with a module tree.
pub fn find_kernel() -> Result<Kernel, BuildBaseError> {
    if let Some(p) = std::env::var_os("CLOUDLET_KERNEL") {
        return kernel_at(Path::new(&p));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map_err(|_| BuildBaseError::NoKernel("/boot".into()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    let image = found
        .pop()
        .ok_or_else(|| BuildBaseError::NoKernel("/boot/vmlinuz-*".into()))?;
    kernel_at(&image)
}

fn kernel_at(image: &Path) -> Result<Kernel, BuildBaseError> {
    if !image.is_file() {
        return Err(BuildBaseError::NoKernel(image.to_path_buf()));
    }
    let release = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .ok_or_else(|| BuildBaseError::NoKernel(image.to_path_buf()))?
        .to_string();
    let modules_dir = PathBuf::from("/lib/modules").join(&release);
    if !modules_dir.join("modules.dep").is_file() {
        return Err(BuildBaseError::NoModules(modules_dir));
    }
    Ok(Kernel {
        image: image.to_path_buf(),
        release,
        modules_dir,
    })
}

impl Kernel {
    /// The module files to load, dependencies first, each once.
    pub fn resolve_modules(&self, wanted: &[&str]) -> Result<Vec<PathBuf>, BuildBaseError> {
        let dep = std::fs::read_to_string(self.modules_dir.join("modules.dep"))
            .map_err(|_| BuildBaseError::NoModules(self.modules_dir.clone()))?;
        let mut deps = std::collections::HashMap::new();
        for line in dep.lines() {
            if let Some((m, rest)) = line.split_once(':') {
                let list: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
                deps.insert(module_name(m), (m.to_string(), list));
            }
        }
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        fn visit(
            name: &str,
            deps: &std::collections::HashMap<String, (String, Vec<String>)>,
            seen: &mut HashSet<String>,
            order: &mut Vec<String>,
        ) -> bool {
            let Some((path, ds)) = deps.get(name) else {
                return false;
            };
            if !seen.insert(name.to_string()) {
                return true;
            }
            for d in ds {
                visit(&module_name(d), deps, seen, order);
            }
            order.push(path.clone());
            true
        }
        for w in wanted {
            let key = w.replace('-', "_");
            if !visit(&key, &deps, &mut seen, &mut order) {
                return Err(BuildBaseError::MissingModule(w.to_string()));
            }
        }
        Ok(order
            .into_iter()
            .map(|rel| self.modules_dir.join(rel))
            .collect())
    }
}

/// `kernel/drivers/virtio/virtio_pci.ko[.xz]` -> `virtio_pci`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_normalise() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio_rng"
        );
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.xz"), "ext4");
    }

    #[test]
    fn dependencies_come_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/a.ko: kernel/b.ko kernel/c.ko\nkernel/b.ko: kernel/c.ko\nkernel/c.ko:\n",
        )
        .unwrap();
        let k = Kernel {
            image: "/x".into(),
            release: "r".into(),
            modules_dir: dir.path().into(),
        };
        let order = k.resolve_modules(&["a", "b"]).unwrap();
        let names: Vec<String> = order
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["c.ko", "b.ko", "a.ko"]);
        assert!(matches!(
            k.resolve_modules(&["nope"]),
            Err(BuildBaseError::MissingModule(_))
        ));
    }
}
