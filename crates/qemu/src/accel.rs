//! Choosing the accelerator: KVM only where a probe boot shows it works.
//!
//! On some hosts `/dev/kvm` opens but cannot run a Linux guest (it hangs
//! right after decompression). The probe boots the guest kernel with no root
//! file system: a working accelerator reaches the kernel's "VFS: Unable to
//! mount root fs" panic within seconds, and with `panic=-1 -no-reboot` QEMU
//! exits. A hang is a failed probe.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::spec::Accel;
use crate::vm::qemu_binary;

/// `$CLOUDLET_ACCEL` (`tcg`, `kvm` or `auto`); `auto` and unset probe.
pub async fn choose_accel(kernel: &Path, cache: &Path) -> Accel {
    match std::env::var("CLOUDLET_ACCEL").as_deref() {
        Ok("tcg") => return Accel::Tcg,
        Ok("kvm") => return Accel::Kvm,
        _ => {}
    }
    let key = format!("{}", kernel.display());
    if let Ok(s) = std::fs::read_to_string(cache) {
        if let Some((k, v)) = s.trim().rsplit_once(' ') {
            if k == key {
                return if v == "kvm" { Accel::Kvm } else { Accel::Tcg };
            }
        }
    }
    let accel = if probe_kvm(kernel, Duration::from_secs(10)).await {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    tracing::info!(accel = accel.as_str(), "accelerator probe");
    if let Some(dir) = cache.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(cache, format!("{key} {}\n", accel.as_str()));
    accel
}

/// Boot `kernel` under KVM with no root; true if it got to its panic.
pub async fn probe_kvm(kernel: &Path, timeout: Duration) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Ok(dir) = tempdir() else { return false };
    let console = dir.join("console.log");
    let child = tokio::process::Command::new(qemu_binary())
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-accel", "kvm", "-m", "128M", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let finished = tokio::time::timeout(timeout, child.wait()).await.is_ok();
    if !finished {
        let _ = child.kill().await;
    }
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    finished && text.contains("Kernel panic")
}

fn tempdir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "cloudlet-kvm-probe-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
