//! The guest's file systems: the initramfs that loads modules and mounts the
//! root disk, and the root trees of the `tiny` and `debian` bases.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::Cpio;
use crate::kernel::{Kernel, GUEST_MODULES};
use crate::BuildBaseError;

/// `/init` of the initramfs: modules, network, root disk, then the agent as
/// PID 1 of the root file system. Guest network is QEMU user networking.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules.order); do
  insmod "/lib/cloudlet-modules/$m" || echo "cloudlet-init: insmod $m failed"
done
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
n=0
while [ ! -b /dev/vda ] && [ $n -lt 200 ]; do sleep 0.05; n=$((n+1)); done
if ! mount -t ext4 -o rw,discard /dev/vda /newroot; then
  echo "cloudlet-init: cannot mount the root disk"; exec sh
fi
for d in proc sys dev; do mkdir -p /newroot/$d; mount --move /$d /newroot/$d; done
echo "cloudlet-init: starting the agent"
exec switch_root /newroot /sbin/cloudlet-agent --init
"#;

/// Write the initramfs for `kernel` to `out`.
pub fn write_initramfs(kernel: &Kernel, busybox: &Path, out: &Path) -> Result<(), BuildBaseError> {
    let mut c = Cpio::default();
    for d in [
        "/bin",
        "/sbin",
        "/etc",
        "/lib",
        "/lib/cloudlet-modules",
        "/proc",
        "/sys",
        "/dev",
        "/newroot",
    ] {
        c.dir(d);
    }
    c.file("/bin/busybox", 0o755, &read(busybox)?);
    c.file("/init", 0o755, INIT_SCRIPT.as_bytes());
    let mut order = String::new();
    for path in kernel.resolve_modules(GUEST_MODULES)? {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| BuildBaseError::MissingModule(path.display().to_string()))?
            .to_string();
        if name.ends_with(".xz") || name.ends_with(".zst") || name.ends_with(".gz") {
            return Err(BuildBaseError::CompressedModule(path));
        }
        c.file(
            &format!("/lib/cloudlet-modules/{name}"),
            0o644,
            &read(&path)?,
        );
        order.push_str(&name);
        order.push('\n');
    }
    c.file("/etc/modules.order", 0o644, order.as_bytes());
    let mut f = std::fs::File::create(out).map_err(|e| io(out, e))?;
    c.finish(&mut f).map_err(|e| io(out, e))
}

/// Files every root tree gets: the agent, name resolution, identity.
pub fn add_common_files(root: &Path, agent: &Path, hostname: &str) -> Result<(), BuildBaseError> {
    for d in [
        "sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "opt/apps",
        "var/lib/cloudlet",
    ] {
        mkdir(&root.join(d))?;
    }
    let dst = root.join("sbin/cloudlet-agent");
    let _ = std::fs::remove_file(&dst);
    std::fs::copy(agent, &dst).map_err(|e| io(&dst, e))?;
    set_mode(&dst, 0o755)?;
    write(&root.join("etc/resolv.conf"), "nameserver 10.0.2.3\n")?;
    write(&root.join("etc/hostname"), &format!("{hostname}\n"))?;
    write(
        &root.join("etc/hosts"),
        &format!("127.0.0.1 localhost\n127.0.1.1 {hostname}\n"),
    )?;
    Ok(())
}

/// The `tiny` root: busybox with its applets, and the agent.
pub fn stage_tiny(root: &Path, busybox: &Path, agent: &Path) -> Result<(), BuildBaseError> {
    for d in ["bin", "etc", "usr/bin", "usr/sbin", "root"] {
        mkdir(&root.join(d))?;
    }
    let bb = root.join("bin/busybox");
    std::fs::copy(busybox, &bb).map_err(|e| io(&bb, e))?;
    set_mode(&bb, 0o755)?;
    let list = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| io(busybox, e))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = root.join(applet);
        if link.exists() || applet.is_empty() {
            continue;
        }
        if let Some(p) = link.parent() {
            mkdir(p)?;
        }
        let depth = applet.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        std::os::unix::fs::symlink(&target, &link).map_err(|e| io(&link, e))?;
    }
    write(&root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    write(&root.join("etc/group"), "root:x:0:\n")?;
    add_common_files(root, agent, "tiny")
}

/// Run `mkfs.ext4 -d root` into a sparse image of `size` bytes. Inode tables
/// and the journal are initialised now, so that the guest does not write them
/// lazily later (those writes would land in every overlay).
pub fn make_ext4(root: &Path, image: &Path, size: u64) -> Result<(), BuildBaseError> {
    let f = std::fs::File::create(image).map_err(|e| io(image, e))?;
    f.set_len(size).map_err(|e| io(image, e))?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            "cloudlet-root",
            "-U",
            "clear",
        ])
        .args([
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
        ])
        .arg("-d")
        .arg(root)
        .arg(image)
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .output()
        .map_err(|e| BuildBaseError::Tool {
            tool: "mkfs.ext4".into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(BuildBaseError::Tool {
            tool: "mkfs.ext4".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// `$CLOUDLET_BUSYBOX` or Debian's `busybox-static`.
pub fn find_busybox() -> Result<PathBuf, BuildBaseError> {
    let p = std::env::var_os("CLOUDLET_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    if !p.is_file() {
        return Err(BuildBaseError::NoBusybox(p));
    }
    Ok(p)
}

pub(crate) fn io(path: &Path, source: std::io::Error) -> BuildBaseError {
    BuildBaseError::Io {
        path: path.to_path_buf(),
        source,
    }
}
fn read(p: &Path) -> Result<Vec<u8>, BuildBaseError> {
    std::fs::read(p).map_err(|e| io(p, e))
}
fn write(p: &Path, s: &str) -> Result<(), BuildBaseError> {
    std::fs::write(p, s).map_err(|e| io(p, e))
}
fn mkdir(p: &Path) -> Result<(), BuildBaseError> {
    std::fs::create_dir_all(p).map_err(|e| io(p, e))
}
fn set_mode(p: &Path, mode: u32) -> Result<(), BuildBaseError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|e| io(p, e))
}
