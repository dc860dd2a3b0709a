//! What a VM is, as a value: [`VmSpec`], and how it becomes a QEMU command
//! line.
//!
//! Two QEMU processes built from equal specs have equal machines, which is
//! what save/restore and migration need: only the host-side paths and port
//! forwards may differ between the saving and the restoring side.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::confine::{self, ConfineError, Confinement, Held, Jail};

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Software emulation: works everywhere.
    #[default]
    Tcg,
    /// Hardware virtualization, where a probe boot shows it works.
    Kvm,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// A host TCP port forwarded to a guest port (QEMU user networking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    pub guest: u16,
    pub host: u16,
    /// The host address it listens on (none: every address of the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<std::net::IpAddr>,
}

/// The machine: what must be identical on both sides of a save/restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// QEMU machine type, e.g. `pc-i440fx-7.2`.
    pub machine: String,
    /// CPU model, e.g. `qemu64`.
    pub cpu: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

impl MachineConfig {
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib * 1024 * 1024
    }
}

/// The NBD export name of a lazily served disk ([`VmSpec::lazy_disk`]).
pub const LAZY_DISK_EXPORT: &str = "disk";
/// The node of the NBD client under `disk0` while the disk is lazy.
pub const LAZY_DISK_NODE: &str = "disk0-lazy";
/// The file node that replaces it.
pub const DISK_FILE_NODE: &str = "disk0-file";

/// How the disk file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A qcow2 top whose backing file is the base image.
    #[default]
    Qcow2,
    /// A full raw image (what overlay synthesis writes).
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// Everything needed to run one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Short name, used in logs and as QEMU's `-name`.
    pub name: String,
    pub machine: MachineConfig,
    pub accel: Accel,
    /// The guest's RAM as a plain file (`memory-backend-file,share=on`).
    pub ram_path: PathBuf,
    /// The disk: a qcow2 whose backing file is the base image, or raw.
    pub disk_path: PathBuf,
    #[serde(default)]
    pub disk_format: DiskFormat,
    /// Early start: QEMU reaches the disk through an NBD server on this
    /// Unix socket (export [`LAZY_DISK_EXPORT`]) that holds back requests
    /// until their range has arrived; [`pivot_disk_to_file`](crate::vm::pivot_disk_to_file)
    /// later switches to `disk_path` itself. Raw format only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_disk: Option<PathBuf>,
    pub ports: Vec<PortForward>,
    /// Where QEMU's sockets, pid file and logs go.
    pub run_dir: PathBuf,
    /// Run QEMU confined ([`crate::confine`]): its own uid and cgroup, the
    /// seccomp sandbox. None: as the daemon's user, unconfined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confine: Option<Confinement>,
}

impl VmSpec {
    /// Confines this VM's QEMU-to-be, if the spec asks for it
    /// ([`confine::enter`]): a uid (recorded in `self.confine.uid`), the
    /// VM's files given to it, its cgroup with the limits.
    pub fn confine_qemu(&mut self) -> Result<Option<(Held, Jail)>, ConfineError> {
        let Some(c) = self.confine.clone() else {
            return Ok(None);
        };
        let mut own = vec![self.run_dir.clone(), self.socket_dir()];
        own.extend(self.ram_path.parent().map(Path::to_path_buf));
        own.extend(self.disk_path.parent().map(Path::to_path_buf));
        let inputs = [self.machine.kernel.as_path(), self.machine.initrd.as_path()];
        let (held, jail) = confine::enter(
            &c,
            &self.name,
            &self.run_dir,
            self.machine.memory_mib,
            |uid| confine::prepare_files(own, &inputs, uid),
        )?;
        if let Some(c) = self.confine.as_mut() {
            c.uid = Some(held.uid());
        }
        Ok(Some((held, jail)))
    }

    /// What an adopted confined QEMU of this spec holds ([`confine::adopted`]).
    pub fn adopted_confinement(&self) -> Option<Held> {
        confine::adopted(self.confine.as_ref()?, &self.name, &self.run_dir)
    }

    /// Gives `path` (a file or socket made for the VM) to the VM's uid when
    /// it is confined ([`confine::hand_over`]).
    pub fn hand_over(&self, path: &Path) -> std::io::Result<()> {
        confine::hand_over(self.confine.as_ref().and_then(|c| c.uid), path)
    }

    /// Where the sockets go: the run directory, or, when its path is too
    /// long for a Unix socket address (108 bytes), a short directory under
    /// the system temp dir derived from it (so it is found again on adopt).
    pub fn socket_dir(&self) -> PathBuf {
        if self.run_dir.join("agent.sock").as_os_str().len() < 100 {
            return self.run_dir.clone();
        }
        // FNV-1a: stable across builds and processes.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in self.run_dir.as_os_str().as_encoded_bytes() {
            h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
        }
        std::env::temp_dir().join(format!("cloudlet-sock-{h:016x}"))
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.socket_dir().join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.socket_dir().join("agent.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.run_dir.join("qemu.log")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join("qemu.pid")
    }

    /// QEMU's arguments (without the binary). With `incoming`, QEMU waits
    /// for `migrate-incoming` instead of booting.
    pub fn to_args(&self, incoming: bool) -> Vec<String> {
        let m = &self.machine;
        let mem = format!("{}M", m.memory_mib);
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&["-name", &self.name]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        push(&["-no-reboot"]);
        push(&[
            "-machine",
            &format!("{},memory-backend=mem", m.machine),
            "-accel",
            &match self.accel {
                Accel::Tcg => "tcg,thread=multi".to_string(),
                Accel::Kvm => "kvm".to_string(),
            },
        ]);
        push(&["-cpu", &m.cpu, "-smp", &m.vcpus.to_string(), "-m", &mem]);
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=on",
                path_arg(&self.ram_path)
            ),
        ]);
        push(&[
            "-kernel",
            &path_arg(&m.kernel),
            "-initrd",
            &path_arg(&m.initrd),
            "-append",
            &m.cmdline,
        ]);
        push(&[
            "-chardev",
            &format!("file,id=serial0,path={}", path_arg(&self.console_log())),
            "-serial",
            "chardev:serial0",
        ]);
        let file = match &self.lazy_disk {
            None => format!(
                "file.driver=file,file.filename={}",
                path_arg(&self.disk_path)
            ),
            Some(sock) => format!(
                "file.driver=nbd,file.node-name={LAZY_DISK_NODE},file.server.type=unix,\
                 file.server.path={},file.export={LAZY_DISK_EXPORT}",
                path_arg(sock)
            ),
        };
        push(&[
            "-blockdev",
            &format!(
                "driver={},node-name=disk0,discard=unmap,{file}",
                self.disk_format.as_str(),
            ),
            "-device",
            "virtio-blk-pci,drive=disk0,id=vblk0",
        ]);
        let mut netdev = "user,id=net0".to_string();
        for p in &self.ports {
            // Where clients come from (no address: every address).
            let addr = p.bind.map(|a| a.to_string()).unwrap_or_default();
            netdev.push_str(&format!(",hostfwd=tcp:{addr}:{}-:{}", p.host, p.guest));
        }
        push(&[
            "-netdev",
            &netdev,
            "-device",
            "virtio-net-pci,netdev=net0,romfile=,id=vnet0",
        ]);
        push(&[
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-pci,rng=rng0,id=vrng0",
        ]);
        push(&[
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            &format!(
                "socket,id=agent0,path={},server=on,wait=off",
                path_arg(&self.agent_socket())
            ),
            "-device",
            &format!(
                "virtserialport,chardev=agent0,name={},id=agentport0",
                cloudlet_agent_proto::PORT_NAME
            ),
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", path_arg(&self.qmp_socket())),
            "-pidfile",
            &path_arg(&self.pid_file()),
        ]);
        if self.confine.is_some() {
            push(&["-sandbox", confine::SANDBOX]);
        }
        if incoming {
            // -S: the caller decides when the restored guest runs.
            push(&["-S", "-incoming", "defer"]);
        }
        a
    }
}

/// A path as QEMU's option parser wants it: commas doubled.
fn path_arg(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "t".into(),
            machine: MachineConfig {
                machine: "pc-i440fx-7.2".into(),
                cpu: "qemu64".into(),
                vcpus: 1,
                memory_mib: 256,
                kernel: "/k".into(),
                initrd: "/i".into(),
                cmdline: "console=ttyS0".into(),
            },
            accel: Accel::Tcg,
            ram_path: "/run/a,b/ram".into(),
            disk_path: "/d.qcow2".into(),
            disk_format: DiskFormat::Qcow2,
            lazy_disk: None,
            ports: vec![PortForward {
                guest: 8080,
                host: 40000,
                bind: None,
            }],
            run_dir: "/run/vm".into(),
            confine: None,
        }
    }

    #[test]
    fn command_line_has_the_machine_and_devices() {
        let a = spec().to_args(false).join(" ");
        assert!(a.contains("mem-path=/run/a,,b/ram,share=on"), "{a}");
        assert!(a.contains("hostfwd=tcp::40000-:8080"));
        let mut bound = spec();
        bound.ports[0].bind = Some([10, 0, 0, 7].into());
        let a = bound.to_args(false).join(" ");
        assert!(a.contains("hostfwd=tcp:10.0.0.7:40000-:8080"), "{a}");
        assert!(a.contains("romfile="));
        // Guest discards (fstrim before a save) must reach the disk file:
        // trimmed clusters then read back as zeros.
        assert!(a.contains("node-name=disk0,discard=unmap,"), "{a}");
        assert!(a.contains("-accel tcg"));
        assert!(!a.contains("-incoming"));
        assert!(!a.contains("-sandbox"));
        assert!(spec()
            .to_args(true)
            .join(" ")
            .ends_with("-S -incoming defer"));
    }

    #[test]
    fn a_lazy_disk_goes_through_nbd() {
        let mut s = spec();
        s.disk_format = DiskFormat::Raw;
        s.lazy_disk = Some("/run/vm/disk.sock".into());
        let a = s.to_args(false).join(" ");
        assert!(
            a.contains(
                "driver=raw,node-name=disk0,discard=unmap,file.driver=nbd,file.node-name=disk0-lazy,\
                 file.server.type=unix,file.server.path=/run/vm/disk.sock,file.export=disk "
            ),
            "{a}"
        );
        assert!(!a.contains("file.driver=file"), "{a}");
    }
}
