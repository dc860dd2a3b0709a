//! The machine a cloudlet runs on: what it has, what it lacks, and what to
//! do about it (`cloudlet doctor`).
//!
//! [`examine`] looks at the programs cloudlet runs (found on `PATH`, with
//! their versions; QEMU's programs must be one version), the guest kernel,
//! the accelerator a probe boot finds, whether `vm_dir` is on a tmpfs, free
//! memory and disk, the base VMs built and the ports the main job listens
//! on. Each [`Finding`] says what it saw and, when it is not fine, what to
//! run. A [`Report`] with a [`Level::Fail`] means the job it was asked about
//! ([`Purpose`]) cannot run here.

pub mod programs;

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use programs::{find_in_path, qemu_version, version_line, Need, PROGRAMS};
use serde::Serialize;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Works, but slower or with less than an operator would want.
    Warn,
    /// The job asked about cannot run.
    Fail,
}

/// One thing looked at.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was looked at: `program qemu-img`, `memory`, `port 7450`.
    pub check: String,
    pub level: Level,
    /// What was seen.
    pub detail: String,
    /// What to do about it, when it is not fine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            check: check.into(),
            level: Level::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn bad(
        level: Level,
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            check: check.into(),
            level,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Which job the report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    /// The main job (`make demo`): a cloudlet provisioning and moving an app.
    Run,
    /// The test suite (`make test`): also the test-only programs; the
    /// demo's ports need not be free (tests pick their own).
    Test,
}

/// What to examine.
#[derive(Debug, Clone)]
pub struct DoctorConfig {
    pub purpose: Purpose,
    /// `CLOUDLET_HOME`: base VMs and state.
    pub home: PathBuf,
    /// Where VMs' RAM files live.
    pub vm_dir: PathBuf,
    /// Ports the main job listens on (on 127.0.0.1).
    pub ports: Vec<u16>,
    /// Boot the guest kernel under KVM to see whether it works (up to
    /// [`KVM_PROBE_TIMEOUT`] where `/dev/kvm` opens but cannot run a guest).
    pub probe_accel: bool,
    /// The `PATH` to look for programs in (default: this process's).
    pub path: Option<OsString>,
}

/// How long the accelerator probe may take (the daemon's own choice).
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The ports `make demo` uses: two cloudlets and a registry.
pub const DEMO_PORTS: &[u16] = &[7450, 7451, 7460];

/// Below this, two 512 MiB VMs and the daemons do not fit.
const MIN_MEMORY: u64 = 2 << 30;
const WANT_MEMORY: u64 = 4 << 30;
/// A debian base VM, an overlay and the demo's work files.
const MIN_DISK: u64 = 4 << 30;
const WANT_DISK: u64 = 16 << 30;
/// RAM files of two small VMs on the tmpfs.
const WANT_VM_DIR: u64 = 2 << 30;

/// What was found, in the order looked at.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub purpose: Purpose,
    pub findings: Vec<Finding>,
}

impl Report {
    /// True when nothing stops the job asked about.
    pub fn ready(&self) -> bool {
        self.failures().next().is_none()
    }
    pub fn failures(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.level == Level::Fail)
    }
    /// The accelerator the probe found (`kvm` or `tcg`), if it ran.
    pub fn accel(&self) -> Option<&str> {
        self.findings
            .iter()
            .find(|f| f.check == "accelerator")
            .and_then(|f| f.detail.split_whitespace().next())
    }
}

/// Look at the machine.
pub async fn examine(cfg: &DoctorConfig) -> Report {
    let mut findings = Vec::new();
    let qemu = check_programs(cfg, &mut findings);
    let kernel = check_kernel(&mut findings);
    let (qemu_bin, qemu_line) = qemu.unzip();
    findings.push(check_accel(cfg, qemu_bin.as_deref(), kernel.as_deref()).await);
    findings.push(check_memory());
    findings.push(check_disk(&cfg.home));
    findings.push(check_vm_dir(&cfg.vm_dir));
    findings.push(check_bases(cfg, qemu_line.as_deref()));
    for &port in &cfg.ports {
        findings.push(check_port(cfg.purpose, port));
    }
    findings.push(check_root(cfg.purpose));
    findings.push(check_userfaultfd(
        read_sysctl("vm/unprivileged_userfaultfd").as_deref(),
    ));
    Report {
        purpose: cfg.purpose,
        findings,
    }
}

/// Every program, then one QEMU version. Returns the QEMU binary found and
/// the first line of its `--version`.
fn check_programs(cfg: &DoctorConfig, out: &mut Vec<Finding>) -> Option<(PathBuf, String)> {
    let path = cfg
        .path
        .clone()
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_default();
    let mut qemu_versions: Vec<(&str, String)> = Vec::new();
    let mut qemu_system = None;
    for p in PROGRAMS {
        let check = format!("program {}", p.name);
        // The daemon runs $CLOUDLET_QEMU when it is set.
        let found = match (p.name, std::env::var_os("CLOUDLET_QEMU")) {
            ("qemu-system-x86_64", Some(q)) => Some(PathBuf::from(q)).filter(|q| q.is_file()),
            _ => find_in_path(p.name, &path),
        };
        let Some(found) = found else {
            let level = if p.need == Need::Run || cfg.purpose == Purpose::Test {
                Level::Fail
            } else {
                Level::Warn
            };
            out.push(Finding::bad(
                level,
                check,
                format!("not found ({}; package {})", p.used_for, p.package),
                format!("run `make deps` as root, or: apt-get install {}", p.package),
            ));
            continue;
        };
        let line = version_line(&found, p.version_args).unwrap_or_else(|| "(no version)".into());
        if p.name.starts_with("qemu-") {
            if let Some(v) = qemu_version(&line) {
                qemu_versions.push((p.name, v.to_string()));
            }
            if p.name == "qemu-system-x86_64" {
                qemu_system = Some((found.clone(), line.clone()));
            }
        }
        out.push(Finding::ok(check, format!("{line} ({})", found.display())));
    }
    let mut distinct: Vec<&str> = qemu_versions.iter().map(|(_, v)| v.as_str()).collect();
    distinct.sort();
    distinct.dedup();
    if distinct.len() > 1 {
        let seen: Vec<String> = qemu_versions
            .iter()
            .map(|(n, v)| format!("{n} {v}"))
            .collect();
        out.push(Finding::bad(
            Level::Fail,
            "qemu versions",
            format!("not one version: {}", seen.join(", ")),
            "install the QEMU family at one version: run `make deps` as root \
             (./scripts/install-deps.sh pins qemu-utils to qemu-system-x86's version)",
        ));
    } else if let Some(v) = distinct.first() {
        out.push(Finding::ok("qemu versions", format!("all {v}")));
    }
    qemu_system
}

fn check_kernel(out: &mut Vec<Finding>) -> Option<PathBuf> {
    match cloudlet_base::kernel::find_kernel() {
        Ok(k) => {
            out.push(Finding::ok(
                "guest kernel",
                format!(
                    "{} (modules {})",
                    k.image.display(),
                    k.modules_dir.display()
                ),
            ));
            Some(k.image)
        }
        Err(e) => {
            out.push(Finding::bad(
                Level::Fail,
                "guest kernel",
                e.to_string(),
                "run `make deps` as root, or: apt-get install linux-image-amd64 \
                 (or set CLOUDLET_KERNEL to a vmlinuz with its /lib/modules tree)",
            ));
            None
        }
    }
}

async fn check_accel(cfg: &DoctorConfig, qemu: Option<&Path>, kernel: Option<&Path>) -> Finding {
    let forced = std::env::var("CLOUDLET_ACCEL").ok();
    if let Some(a @ ("tcg" | "kvm")) = forced.as_deref() {
        return Finding::ok(
            "accelerator",
            format!("{a} (CLOUDLET_ACCEL={a}, not probed)"),
        );
    }
    let Some(qemu) = qemu else {
        return Finding::bad(
            Level::Fail,
            "accelerator",
            "none: no qemu-system-x86_64",
            "install QEMU first (see above)",
        );
    };
    if !tcg_available(qemu) {
        return Finding::bad(
            Level::Fail,
            "accelerator",
            format!("{} -accel help lists no tcg", qemu.display()),
            "install Debian's qemu-system-x86 (make deps)",
        );
    }
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm_opens {
        return Finding::ok(
            "accelerator",
            "tcg (software emulation; /dev/kvm cannot be opened, so no KVM)",
        );
    }
    if !cfg.probe_accel {
        return Finding::ok("accelerator", "tcg or kvm (/dev/kvm opens; probe skipped)");
    }
    let Some(kernel) = kernel else {
        return Finding::ok("accelerator", "tcg (no guest kernel to probe KVM with)");
    };
    if cloudlet_qemu::accel::probe_kvm(kernel, KVM_PROBE_TIMEOUT).await {
        Finding::ok(
            "accelerator",
            "kvm (a probe boot reached its panic under KVM)",
        )
    } else {
        Finding::ok(
            "accelerator",
            format!(
                "tcg (software emulation: /dev/kvm opens, but a probe boot under KVM \
                 did not reach its panic in {} s)",
                KVM_PROBE_TIMEOUT.as_secs()
            ),
        )
    }
}

fn tcg_available(qemu: &Path) -> bool {
    std::process::Command::new(qemu)
        .args(["-accel", "help"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "tcg")
        })
        .unwrap_or(false)
}

fn check_memory() -> Finding {
    let Some(avail) = meminfo("MemAvailable:") else {
        return Finding::bad(
            Level::Warn,
            "memory",
            "cannot read MemAvailable from /proc/meminfo",
            "check that /proc is mounted",
        );
    };
    let detail = format!("{} available", gib(avail));
    if avail < MIN_MEMORY {
        Finding::bad(
            Level::Fail,
            "memory",
            detail,
            format!(
                "free memory: the demo runs two 512 MiB VMs ({} at least)",
                gib(MIN_MEMORY)
            ),
        )
    } else if avail < WANT_MEMORY {
        Finding::bad(
            Level::Warn,
            "memory",
            detail,
            format!(
                "{} or more leaves room for larger flavors",
                gib(WANT_MEMORY)
            ),
        )
    } else {
        Finding::ok("memory", detail)
    }
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn check_disk(home: &Path) -> Finding {
    let check = format!("disk at {}", home.display());
    let Some((at, fs)) = statfs_nearest(home) else {
        return Finding::bad(
            Level::Fail,
            check,
            "no existing directory on this path",
            "set CLOUDLET_HOME to a writable directory",
        );
    };
    let free = fs.f_bavail.saturating_mul(fs.f_bsize as u64);
    let detail = format!("{} free (on {})", gib(free), at.display());
    if free < MIN_DISK {
        Finding::bad(
            Level::Fail,
            check,
            detail,
            format!(
                "free space or set CLOUDLET_HOME elsewhere: a debian base VM and the demo need {}",
                gib(MIN_DISK)
            ),
        )
    } else if free < WANT_DISK {
        Finding::bad(
            Level::Warn,
            check,
            detail,
            format!(
                "{} or more holds several bases and cached overlays",
                gib(WANT_DISK)
            ),
        )
    } else {
        Finding::ok(check, detail)
    }
}

/// tmpfs's `f_type` (linux/magic.h).
const TMPFS_MAGIC: u64 = 0x0102_1994;

fn check_vm_dir(vm_dir: &Path) -> Finding {
    let check = format!("vm_dir {}", vm_dir.display());
    let Some((at, fs)) = statfs_nearest(vm_dir) else {
        return Finding::bad(
            Level::Fail,
            check,
            "no existing directory on this path",
            "give the daemon a --vm-dir on a tmpfs, e.g. /dev/shm/cloudlet",
        );
    };
    let free = fs.f_bavail.saturating_mul(fs.f_bsize as u64);
    if fs.f_type as u64 != TMPFS_MAGIC {
        return Finding::bad(
            Level::Warn,
            check,
            format!(
                "not on a tmpfs ({} is not): early start is off and restores are slower",
                at.display()
            ),
            "use a vm_dir on a tmpfs (/dev/shm/cloudlet, the default where /dev/shm exists)",
        );
    }
    let detail = format!("tmpfs, {} free", gib(free));
    if free < WANT_VM_DIR {
        Finding::bad(
            Level::Warn,
            check,
            detail,
            format!(
                "enlarge the tmpfs (mount -o remount,size=8G {}): each VM's RAM file lives there",
                at.display()
            ),
        )
    } else {
        Finding::ok(check, detail)
    }
}

/// `statfs` of `path`, or of its nearest ancestor that exists.
fn statfs_nearest(path: &Path) -> Option<(PathBuf, rustix::fs::StatFs)> {
    let mut p = Some(path);
    while let Some(dir) = p {
        if dir.exists() {
            return rustix::fs::statfs(dir).ok().map(|s| (dir.to_path_buf(), s));
        }
        p = dir.parent();
    }
    None
}

/// The bases built, and whether this QEMU built them (device state saved
/// by another QEMU version may not restore).
fn check_bases(cfg: &DoctorConfig, qemu_line: Option<&str>) -> Finding {
    let store = cloudlet_base::BaseStore::new(&cfg.home);
    let check = format!("base VMs in {}", store.bases_dir().display());
    match store.list() {
        Ok(list) if list.is_empty() => Finding::bad(
            Level::Warn,
            check,
            "none built yet",
            "`cloudlet base build debian` (make demo builds it; a few minutes the first time)",
        ),
        Ok(list) => {
            let names: Vec<String> = list
                .iter()
                .map(|b| format!("{} ({:.12})", b.name, b.id))
                .collect();
            let stale: Vec<&str> = list
                .iter()
                .filter(|b| qemu_line.is_some_and(|q| q != b.qemu_version))
                .map(|b| b.name.as_str())
                .collect();
            if stale.is_empty() {
                Finding::ok(check, names.join(", "))
            } else {
                Finding::bad(
                    Level::Warn,
                    check,
                    format!(
                        "{}; built by another QEMU than {}: {}",
                        names.join(", "),
                        qemu_line.unwrap_or_default(),
                        stale.join(", ")
                    ),
                    format!(
                        "rebuild them: cloudlet base build RECIPE --name NAME --force ({})",
                        stale.join(", ")
                    ),
                )
            }
        }
        Err(e) => Finding::bad(
            Level::Fail,
            check,
            e.to_string(),
            "fix the permissions of CLOUDLET_HOME or set it elsewhere",
        ),
    }
}

fn check_port(purpose: Purpose, port: u16) -> Finding {
    let check = format!("port {port}");
    match TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => Finding::ok(check, "free"),
        Err(e) => Finding::bad(
            // Tests pick free ports of their own.
            if purpose == Purpose::Run {
                Level::Fail
            } else {
                Level::Warn
            },
            check,
            format!("cannot listen on 127.0.0.1:{port}: {e}"),
            format!(
                "stop what listens there (ss -ltnp 'sport = :{port}' names it), \
                 e.g. a cloudletd left from an earlier run"
            ),
        ),
    }
}

fn check_root(purpose: Purpose) -> Finding {
    match (rustix::process::geteuid().is_root(), purpose) {
        (true, _) => Finding::ok("user", "root (network namespaces for the emulated WAN)"),
        // The demo's phone and cloudlets sit in network namespaces.
        (false, Purpose::Run) => Finding::bad(
            Level::Fail,
            "user",
            "not root: make demo puts the phone and the cloudlets in network namespaces",
            "run it as root (sudo make demo)",
        ),
        (false, Purpose::Test) => Finding::bad(
            Level::Warn,
            "user",
            "not root: the WAN tests and benchmarks cannot make network namespaces",
            "run the tests as root (make test)",
        ),
    }
}

fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(name))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether a confined QEMU (cloudletd's default as root) can take an early
/// start: QEMU 7.2 asks for a userfaultfd without `UFFD_USER_MODE_ONLY`,
/// which a process without privileges gets where the sysctl says 1.
fn check_userfaultfd(sysctl: Option<&str>) -> Finding {
    const CHECK: &str = "userfaultfd";
    match sysctl {
        Some("1") | None => Finding::ok(
            CHECK,
            "confined QEMUs may use userfaultfd: early start (postcopy) for synthesized VMs",
        ),
        Some(v) => Finding::bad(
            Level::Warn,
            CHECK,
            format!(
                "vm.unprivileged_userfaultfd = {v}: a confined QEMU takes no early start, \
                 a synthesis waits for the whole memory"
            ),
            "make deps (or: sysctl -w vm.unprivileged_userfaultfd=1, kept in /etc/sysctl.d/60-cloudlet.conf)",
        ),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userfaultfd_off_is_a_warning_with_its_fix() {
        let off = check_userfaultfd(Some("0"));
        assert_eq!(off.level, Level::Warn);
        assert!(off.detail.contains("no early start"), "{}", off.detail);
        assert!(off.fix.unwrap().contains("vm.unprivileged_userfaultfd=1"));
        assert_eq!(check_userfaultfd(Some("1")).level, Level::Ok);
    }

    #[test]
    fn a_port_in_use_fails_the_main_job_but_not_the_tests() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let f = check_port(Purpose::Run, port);
        assert_eq!(f.level, Level::Fail, "{f:?}");
        assert!(f.fix.unwrap().contains(&port.to_string()));
        assert_eq!(check_port(Purpose::Test, port).level, Level::Warn);
        drop(l);
        assert_eq!(check_port(Purpose::Run, port).level, Level::Ok);
    }

    #[test]
    fn vm_dir_on_dev_shm_is_a_tmpfs_and_a_missing_dir_is_judged_by_its_parent() {
        if !Path::new("/dev/shm").is_dir() {
            return;
        }
        let f = check_vm_dir(Path::new("/dev/shm/no/such/dir"));
        assert_ne!(f.level, Level::Fail, "{f:?}");
        assert!(f.detail.starts_with("tmpfs"), "{f:?}");
        let f = check_vm_dir(Path::new("/proc"));
        assert!(f.detail.contains("not on a tmpfs"), "{f:?}");
    }

    #[test]
    fn memory_is_read_from_proc() {
        assert!(meminfo("MemAvailable:").unwrap() > 0);
        assert!(meminfo("NoSuchKey:").is_none());
    }
}
