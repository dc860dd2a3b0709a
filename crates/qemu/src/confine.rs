//! QEMU confined, after Firecracker's jailer: each VM's QEMU runs under a
//! uid (and gid) of its own taken from a range, in a cgroup of its own with
//! the flavor's memory and CPU limits, under QEMU's seccomp sandbox (no
//! obsolete syscalls, no privilege changes, no fork/exec, no scheduler or
//! resource changes), and with `no_new_privs`. Its own files (RAM file,
//! disk, run and socket directories) belong to its uid, mode 0600/0700;
//! the shared inputs (kernel, initrd) are readable but not writable by it.
//! A guest that escaped into QEMU can then open neither another VM's RAM
//! file nor its disk.
//!
//! Why not QEMU's `-runas`: QEMU 7.2 installs its seccomp filter before it
//! drops privileges, so with `elevateprivileges=deny` its own `setgid` is
//! killed. We drop privileges ourselves between fork and exec
//! ([`Jail::enter`]), after joining the cgroup as root: QEMU starts
//! unprivileged and never holds root.
//!
//! A uid is claimed host-wide (two daemons on one host share the range) by
//! creating `<claims>/<uid>` exclusively; the file names the VM's run
//! directory, so the same VM takes its uid again after a restart or an
//! adoption. A claim is stale (taken over) when it is older than
//! [`CLAIM_GRACE`] and no process runs under its uid: a crashed daemon's
//! claims free themselves.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// QEMU's `-sandbox` argument for a confined VM. `spawn=deny` is why save
/// and restore stream device state through sockets, not `exec:`.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// What QEMU itself needs beyond the guest's RAM (which is charged to the
/// cgroup as QEMU touches it): its own heap and threads (~60 MiB under TCG
/// with our devices), the TCG translation cache (a few tens of MiB for a
/// small guest; it is a reserve, touched as it fills), page cache of the
/// disk and log I/O (reclaimable). 256 MiB leaves room for all of it.
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u64 = 256;

/// The CFS period of the CPU limit (the kernels' default): the quota is
/// `vcpus` periods per period.
pub const CPU_PERIOD_US: u64 = 100_000;

/// How long a fresh claim counts as live even with no process under its
/// uid (QEMU is being spawned).
pub const CLAIM_GRACE: Duration = Duration::from_secs(60);

/// Where uid claims go unless configured: `/run` is per boot, as the
/// processes the claims are for.
pub const DEFAULT_CLAIMS_DIR: &str = "/run/cloudlet/uids";

/// How one VM is confined: the policy it was started under and, once
/// started, the uid it has (kept in the VM's record through restarts and
/// adoption).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// The uid (= gid) QEMU runs under; set by [`claim`] at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The range uids are taken from: `[first, last]`.
    pub uids: [u32; 2],
    /// Where uid claims are kept ([`DEFAULT_CLAIMS_DIR`]).
    pub claims: PathBuf,
    /// The flavor's memory (the limit is this, at least the machine's
    /// memory, plus `overhead_mib`).
    pub memory_mib: u64,
    pub overhead_mib: u64,
    /// The flavor's vCPUs: the CPU quota is this many CPUs.
    pub vcpus: u32,
}

impl Confinement {
    /// The cgroup of the VM holding `uid`, under each controller: named by
    /// the uid, which no two live VMs of the host share (a VM id can be on
    /// both ends of a handoff on one host).
    pub fn cgroup_name(uid: u32) -> String {
        format!("cloudlet/vm-{uid}")
    }

    /// The memory limit in bytes for a machine of `machine_mib`.
    pub fn memory_limit(&self, machine_mib: u64) -> u64 {
        (self.memory_mib.max(machine_mib) + self.overhead_mib) * 1024 * 1024
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("No free uid in [{0}, {1}] (every one is claimed by a live VM)")]
    NoFreeUid(u32, u32),
    #[error("Cannot claim a uid in {path}: {source}")]
    Claim {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot prepare {path} for the VM's uid: {source}")]
    Files {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Path {0} has a NUL byte")]
    Nul(PathBuf),
}

/// Claims a uid of `c.uids` for the VM whose run directory is `owner`:
/// `c.uid` again when it is free or already this VM's, else the first free.
pub fn claim(c: &Confinement, owner: &Path) -> Result<u32, ConfineError> {
    let err = |source| ConfineError::Claim {
        path: c.claims.clone(),
        source,
    };
    std::fs::create_dir_all(&c.claims).map_err(err)?;
    let [first, last] = c.uids;
    let preferred = c.uid.filter(|u| (first..=last).contains(u));
    for uid in preferred.into_iter().chain(first..=last) {
        if try_claim(&c.claims.join(uid.to_string()), uid, owner).map_err(err)? {
            return Ok(uid);
        }
    }
    Err(ConfineError::NoFreeUid(first, last))
}

fn try_claim(path: &Path, uid: u32, owner: &Path) -> std::io::Result<bool> {
    use std::io::Write;
    let me = owner.as_os_str().as_bytes();
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(mut f) => {
                f.write_all(me)?;
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let held_by = std::fs::read(path).unwrap_or_default();
        if held_by == me {
            // Ours (a restart or an adoption): renew it.
            std::fs::write(path, me)?;
            return Ok(true);
        }
        let age = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if age < CLAIM_GRACE || uid_has_processes(uid) {
            return Ok(false);
        }
        tracing::info!(uid, "taking over a stale uid claim");
        let _ = std::fs::remove_file(path);
    }
    Ok(false)
}

/// Gives up `uid`'s claim if it is still the VM's at `owner`.
pub fn release(c: &Confinement, uid: u32, owner: &Path) {
    let path = c.claims.join(uid.to_string());
    if std::fs::read(&path).unwrap_or_default() == owner.as_os_str().as_bytes() {
        let _ = std::fs::remove_file(path);
    }
}

/// Whether some process runs under real uid `uid` (from `/proc`).
pub fn uid_has_processes(uid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.flatten()
        .filter(|e| e.file_name().as_bytes().iter().all(u8::is_ascii_digit))
        .any(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.uid() == uid))
}

/// A confined VM's uid claim and cgroup, given up once its QEMU has
/// exited ([`Held::release`]).
#[derive(Debug, Clone)]
pub struct Held {
    conf: Confinement,
    uid: u32,
    owner: PathBuf,
    cgroups: Option<Cgroups>,
}

impl Held {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Removes the cgroup and the uid claim (blocks up to a second while
    /// the kernel empties the cgroup).
    pub fn release(&self) {
        if let Some(cg) = &self.cgroups {
            cg.remove(&Confinement::cgroup_name(self.uid));
        }
        release(&self.conf, self.uid, &self.owner);
    }
}

/// Confines the QEMU-to-be of the VM `name` whose run directory is
/// `owner`: claims a uid, lets `prepare` give it the VM's files (see
/// [`prepare_files`]) and makes its cgroup with the limits for
/// `memory_mib` of guest RAM. Returns what to give up after QEMU exits,
/// and what the child must do before exec. A VM spec calls it through
/// `VmSpec::confine_qemu`.
pub fn enter(
    c: &Confinement,
    name: &str,
    owner: &Path,
    memory_mib: u64,
    prepare: impl FnOnce(u32) -> Result<(), ConfineError>,
) -> Result<(Held, Jail), ConfineError> {
    let uid = claim(c, owner)?;
    let held = Held {
        conf: c.clone(),
        uid,
        owner: owner.to_path_buf(),
        cgroups: Cgroups::host(),
    };
    let jail = (|| {
        prepare(uid)?;
        let procs = match &held.cgroups {
            Some(cg) => cg.create(
                &Confinement::cgroup_name(uid),
                c.memory_limit(memory_mib),
                c.vcpus,
            )?,
            None => {
                tracing::warn!(vm = %name, "no cgroup with memory and cpu: QEMU runs without limits");
                Vec::new()
            }
        };
        Jail::new(&procs, uid)
    })();
    match jail {
        Ok(jail) => Ok((held, jail)),
        Err(e) => {
            held.release();
            Err(e)
        }
    }
}

/// What an adopted confined QEMU (the VM `name`, run directory `owner`,
/// started under `c` with its uid) holds: its claim renewed.
pub fn adopted(c: &Confinement, name: &str, owner: &Path) -> Option<Held> {
    let uid = c.uid?;
    if let Err(e) = claim(c, owner) {
        tracing::warn!(vm = %name, "renewing the uid claim: {e}");
    }
    Some(Held {
        conf: c.clone(),
        uid,
        owner: owner.to_path_buf(),
        cgroups: Cgroups::host(),
    })
}

/// The cgroup hierarchy of the host, detected at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// A unified hierarchy whose root offers `memory` and `cpu`
    /// (`memory.max`, `cpu.max`).
    V2 { root: PathBuf },
    /// Separate `memory` and `cpu` hierarchies (`memory.limit_in_bytes`,
    /// `cpu.cfs_quota_us` / `cpu.cfs_period_us`).
    V1 { memory: PathBuf, cpu: PathBuf },
}

impl Cgroups {
    /// The hierarchy under `root` (normally `/sys/fs/cgroup`), if it has
    /// memory and CPU controllers: v2 first, then v1.
    pub fn detect(root: &Path) -> Option<Cgroups> {
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).ok();
        if let Some(c) = controllers {
            let has = |n: &str| c.split_whitespace().any(|w| w == n);
            if has("memory") && has("cpu") {
                return Some(Cgroups::V2 {
                    root: root.to_path_buf(),
                });
            }
        }
        let (memory, cpu) = (root.join("memory"), root.join("cpu"));
        (memory.join("memory.limit_in_bytes").is_file() && cpu.join("cpu.cfs_quota_us").is_file())
            .then_some(Cgroups::V1 { memory, cpu })
    }

    /// The host's ([`Cgroups::detect`] on `/sys/fs/cgroup`).
    pub fn host() -> Option<Cgroups> {
        Cgroups::detect(Path::new("/sys/fs/cgroup"))
    }

    /// The directories of cgroup `name`, one per hierarchy.
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { root } => vec![root.join(name)],
            Cgroups::V1 { memory, cpu } => vec![memory.join(name), cpu.join(name)],
        }
    }

    /// Creates cgroup `name` with a memory limit of `memory` bytes and a
    /// CPU quota of `vcpus` CPUs; returns its `cgroup.procs` files.
    pub fn create(
        &self,
        name: &str,
        memory: u64,
        vcpus: u32,
    ) -> Result<Vec<PathBuf>, ConfineError> {
        let quota = CPU_PERIOD_US * vcpus.max(1) as u64;
        let write = |path: PathBuf, v: String| {
            std::fs::write(&path, v).map_err(|source| ConfineError::Cgroup { path, source })
        };
        let mkdir = |path: &Path| {
            std::fs::create_dir_all(path).map_err(|source| ConfineError::Cgroup {
                path: path.to_path_buf(),
                source,
            })
        };
        match self {
            Cgroups::V2 { root } => {
                // Each level hands memory and cpu down to its children.
                let mut at = root.clone();
                let parents: Vec<&str> = name.split('/').collect();
                for part in &parents[..parents.len() - 1] {
                    write(at.join("cgroup.subtree_control"), "+memory +cpu".into())?;
                    at.push(part);
                    mkdir(&at)?;
                }
                write(at.join("cgroup.subtree_control"), "+memory +cpu".into())?;
                let dir = root.join(name);
                mkdir(&dir)?;
                write(dir.join("memory.max"), memory.to_string())?;
                write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
                Ok(vec![dir.join("cgroup.procs")])
            }
            Cgroups::V1 { memory: m, cpu } => {
                let (md, cd) = (m.join(name), cpu.join(name));
                mkdir(&md)?;
                mkdir(&cd)?;
                write(md.join("memory.limit_in_bytes"), memory.to_string())?;
                write(cd.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                write(cd.join("cpu.cfs_quota_us"), quota.to_string())?;
                Ok(vec![md.join("cgroup.procs"), cd.join("cgroup.procs")])
            }
        }
    }

    /// Removes cgroup `name` (empty once its QEMU has exited; the kernel
    /// may take a moment after the exit).
    pub fn remove(&self, name: &str) {
        for dir in self.dirs(name) {
            for _ in 0..50 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

/// What the child does between fork and exec: join the cgroup (as root),
/// then become the VM's uid for good. Everything is prepared before the
/// fork: [`Jail::enter`] does not allocate.
pub struct Jail {
    procs: Vec<CString>,
    uid: libc::uid_t,
}

impl Jail {
    pub fn new(procs: &[PathBuf], uid: u32) -> Result<Jail, ConfineError> {
        let procs = procs
            .iter()
            .map(|p| {
                CString::new(p.as_os_str().as_bytes()).map_err(|_| ConfineError::Nul(p.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Jail { procs, uid })
    }

    /// Runs in the forked child: async-signal-safe calls only.
    ///
    /// # Safety
    /// Only between fork and exec (`pre_exec`).
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let fail = || Err(std::io::Error::last_os_error());
        for p in &self.procs {
            // "0": the writing process itself (v1 and v2).
            let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return fail();
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return fail();
            }
        }
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(self.uid) != 0
            || libc::setuid(self.uid) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            return fail();
        }
        Ok(())
    }
}

/// Makes the VM's files its uid's, before QEMU starts: `own`, the VM's
/// own directories (the directories of its RAM file and disk, its run and
/// socket directories: the daemon gives each VM its own), and what is in
/// them; the directories above made traversable (search, not list) by
/// others; the shared `inputs` (kernel, initrd) readable by others.
pub fn prepare_files(
    mut own: Vec<PathBuf>,
    inputs: &[&Path],
    uid: u32,
) -> Result<(), ConfineError> {
    own.sort();
    own.dedup();
    for dir in &own {
        let meta = std::fs::metadata(dir).map_err(files_err(dir))?;
        // Never a shared directory (`/tmp`, `/dev/shm`): sticky ones.
        if meta.permissions().mode() & 0o1000 != 0 {
            continue;
        }
        give(dir, uid, 0o700)?;
        for e in std::fs::read_dir(dir).map_err(files_err(dir))?.flatten() {
            let path = e.path();
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if !is_dir {
                give(&path, uid, 0o600)?;
            }
        }
        traversable(dir)?;
    }
    for input in inputs {
        readable(input)?;
    }
    Ok(())
}

/// Gives `path` (a file or socket the daemon made for the VM) to the VM's
/// uid, mode 0600; nothing when the VM is not confined (`uid` None).
pub fn hand_over(uid: Option<u32>, path: &Path) -> std::io::Result<()> {
    match uid {
        Some(uid) => give(path, uid, 0o600).map_err(|e| match e {
            ConfineError::Files { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        }),
        None => Ok(()),
    }
}

fn give(path: &Path, uid: u32, mode: u32) -> Result<(), ConfineError> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(files_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(files_err(path))
}

/// Adds search permission for others to every directory above `path`
/// that lacks it.
fn traversable(path: &Path) -> Result<(), ConfineError> {
    for dir in path.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            tracing::debug!(dir = %dir.display(), "made searchable for confined QEMU");
            std::fs::set_permissions(
                dir,
                std::fs::Permissions::from_mode((mode & 0o7777) | 0o001),
            )
            .map_err(files_err(dir))?;
        }
    }
    Ok(())
}

/// Makes a shared input readable (not writable) by others, and the way to it.
fn readable(path: &Path) -> Result<(), ConfineError> {
    let real = std::fs::canonicalize(path).map_err(files_err(path))?;
    let mode = std::fs::metadata(&real)
        .map_err(files_err(&real))?
        .permissions()
        .mode();
    if mode & 0o004 == 0 {
        std::fs::set_permissions(
            &real,
            std::fs::Permissions::from_mode((mode & 0o7777) | 0o004),
        )
        .map_err(files_err(&real))?;
    }
    traversable(&real)?;
    if real != path {
        traversable(path)?;
    }
    Ok(())
}

fn files_err(path: &Path) -> impl Fn(std::io::Error) -> ConfineError + '_ {
    move |source| ConfineError::Files {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(dir: &Path) -> Confinement {
        Confinement {
            uid: None,
            uids: [4_000_100, 4_000_102],
            claims: dir.join("claims"),
            memory_mib: 512,
            overhead_mib: 256,
            vcpus: 2,
        }
    }

    #[test]
    fn two_vms_never_share_a_uid_and_a_vm_gets_its_own_back() {
        let d = tempfile::tempdir().unwrap();
        let mut c = conf(d.path());
        let a = claim(&c, Path::new("/vm/a")).unwrap();
        let b = claim(&c, Path::new("/vm/b")).unwrap();
        assert_ne!(a, b);
        // After a restart, a's record names its uid: it gets it again.
        c.uid = Some(a);
        assert_eq!(claim(&c, Path::new("/vm/a")).unwrap(), a);
        // b's uid is b's, even when asked for.
        c.uid = Some(b);
        let other = claim(&c, Path::new("/vm/c")).unwrap();
        assert!(other != a && other != b);
        assert!(matches!(
            claim(&c, Path::new("/vm/d")),
            Err(ConfineError::NoFreeUid(..))
        ));
        release(&c, a, Path::new("/vm/a"));
        // Not b's to release by another VM.
        release(&c, b, Path::new("/vm/a"));
        c.uid = None;
        assert_eq!(claim(&c, Path::new("/vm/d")).unwrap(), a);
    }

    #[test]
    fn memory_limit_is_the_flavor_at_least_the_machine_plus_overhead() {
        let c = conf(Path::new("/x"));
        assert_eq!(c.memory_limit(256), (512 + 256) << 20);
        assert_eq!(c.memory_limit(1024), (1024 + 256) << 20);
        assert_eq!(Confinement::cgroup_name(200_001), "cloudlet/vm-200001");
    }

    #[test]
    fn cgroups_are_detected_v2_then_v1() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        assert_eq!(Cgroups::detect(root), None);
        std::fs::create_dir_all(root.join("memory")).unwrap();
        std::fs::create_dir_all(root.join("cpu")).unwrap();
        std::fs::write(root.join("memory/memory.limit_in_bytes"), "").unwrap();
        std::fs::write(root.join("cpu/cpu.cfs_quota_us"), "").unwrap();
        let v1 = Cgroups::detect(root).unwrap();
        assert_eq!(
            v1.dirs("cloudlet/vm-1"),
            vec![
                root.join("memory/cloudlet/vm-1"),
                root.join("cpu/cloudlet/vm-1")
            ]
        );
        // A unified root without memory (a hybrid host's `unified`): v1.
        std::fs::write(root.join("cgroup.controllers"), "hugetlb\n").unwrap();
        assert_eq!(Cgroups::detect(root), Some(v1));
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let v2 = Cgroups::detect(root).unwrap();
        assert_eq!(v2.dirs("cloudlet/vm-1"), vec![root.join("cloudlet/vm-1")]);
    }

    #[test]
    fn v1_limits_are_written() {
        let d = tempfile::tempdir().unwrap();
        let cg = Cgroups::V1 {
            memory: d.path().join("memory"),
            cpu: d.path().join("cpu"),
        };
        let procs = cg.create("cloudlet/vm-7", 768 << 20, 2).unwrap();
        let read = |p: &str| std::fs::read_to_string(d.path().join(p)).unwrap();
        assert_eq!(
            read("memory/cloudlet/vm-7/memory.limit_in_bytes"),
            "805306368"
        );
        assert_eq!(read("cpu/cloudlet/vm-7/cpu.cfs_quota_us"), "200000");
        assert_eq!(read("cpu/cloudlet/vm-7/cpu.cfs_period_us"), "100000");
        assert_eq!(procs.len(), 2);
        let v2 = Cgroups::V2 {
            root: d.path().join("v2"),
        };
        std::fs::create_dir_all(d.path().join("v2")).unwrap();
        v2.create("cloudlet/vm-7", 1 << 30, 3).unwrap();
        let read2 = |p: &str| std::fs::read_to_string(d.path().join("v2").join(p)).unwrap();
        assert_eq!(read2("cloudlet/vm-7/cpu.max"), "300000 100000");
        assert_eq!(read2("cloudlet/vm-7/memory.max"), "1073741824");
        assert_eq!(read2("cloudlet/cgroup.subtree_control"), "+memory +cpu");
    }
}
