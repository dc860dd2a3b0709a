//! One QEMU process running one VM: start (boot or incoming), pause, resume,
//! save, restore, kill; and noticing when QEMU dies.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::agent::{AgentClient, AgentError};
use crate::confine::{self, ConfineError};
use crate::qmp::{QmpClient, QmpError};
use crate::spec::VmSpec;

/// How long QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long saving or loading device state may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);

/// The QEMU binary: `$CLOUDLET_QEMU` or `qemu-system-x86_64` from `PATH`.
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("CLOUDLET_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

#[derive(Debug, thiserror::Error)]
pub enum StartVmError {
    #[error("Kernel {0} does not exist")]
    MissingKernel(PathBuf),
    #[error("Initramfs {0} does not exist")]
    MissingInitrd(PathBuf),
    #[error("Disk {0} does not exist")]
    MissingDisk(PathBuf),
    #[error("RAM file {path} is {actual} bytes, the machine has {expected}")]
    RamSizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("RAM file {0} does not exist")]
    MissingRam(PathBuf),
    #[error("Cannot prepare run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot run {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU exited at start ({status}): {log}")]
    Exited { status: String, log: String },
    #[error("QEMU did not open its QMP socket within {0:?}")]
    NoQmp(Duration),
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    #[error("Confining QEMU: {0}")]
    Confine(#[from] ConfineError),
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreVmError {
    #[error("Device state {0} does not exist")]
    MissingState(PathBuf),
    #[error(transparent)]
    Start(#[from] StartVmError),
    #[error("Loading device state failed: {0}")]
    Load(QmpError),
    #[error("Resuming the restored VM failed: {0}")]
    Resume(QmpError),
}

#[derive(Debug, thiserror::Error)]
pub enum SaveVmError {
    #[error("Pausing the VM failed: {0}")]
    Pause(QmpError),
    #[error("Saving device state failed: {0}")]
    Migrate(QmpError),
    #[error("Cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How a QEMU process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    Exited {
        code: Option<i32>,
    },
    /// An adopted process that disappeared (its status is not ours to read).
    Vanished,
}

/// A running QEMU process and its control channel.
pub struct Vm {
    spec: VmSpec,
    pid: u32,
    qmp: QmpClient,
    exit: watch::Receiver<Option<VmExit>>,
}

impl Vm {
    /// Cold-boot the VM. The RAM file is created fresh.
    pub async fn boot(spec: VmSpec) -> Result<Vm, StartVmError> {
        check_boot_inputs(&spec)?;
        let _ = std::fs::remove_file(&spec.ram_path);
        let vm = start(spec, false).await?;
        vm.qmp.execute("cont", None).await.ok();
        Ok(vm)
    }

    /// Start QEMU waiting for incoming device state (`-S -incoming defer`),
    /// on the RAM file already at `spec.ram_path`.
    pub async fn start_incoming(spec: VmSpec) -> Result<Vm, StartVmError> {
        check_boot_inputs(&spec)?;
        let expected = spec.machine.memory_bytes();
        let actual = std::fs::metadata(&spec.ram_path)
            .map_err(|_| StartVmError::MissingRam(spec.ram_path.clone()))?
            .len();
        if actual != expected {
            return Err(StartVmError::RamSizeMismatch {
                path: spec.ram_path.clone(),
                expected,
                actual,
            });
        }
        start(spec, true).await
    }

    /// Restore a saved VM: its RAM file and disk are at the spec's paths,
    /// its device state in `state`. Returns the VM running.
    pub async fn restore(spec: VmSpec, state: &Path) -> Result<Vm, RestoreVmError> {
        if !state.is_file() {
            return Err(RestoreVmError::MissingState(state.to_path_buf()));
        }
        let vm = Vm::start_incoming(spec).await?;
        let loaded = async {
            vm.qmp
                .set_migration_capabilities(&[("x-ignore-shared", true)])
                .await?;
            // QEMU listens, we stream the file in: no `exec:` (the
            // sandbox denies QEMU fork and exec).
            let sock = vm.spec.socket_dir().join("restore.sock");
            let _ = std::fs::remove_file(&sock);
            vm.qmp
                .execute(
                    "migrate-incoming",
                    Some(json!({ "uri": format!("unix:{}", sock.display()) })),
                )
                .await?;
            let mut conn = tokio::net::UnixStream::connect(&sock).await?;
            let _ = std::fs::remove_file(&sock);
            let mut file = tokio::fs::File::open(state).await?;
            tokio::io::copy(&mut file, &mut conn).await?;
            tokio::io::AsyncWriteExt::shutdown(&mut conn).await?;
            vm.qmp.wait_migration(MIGRATE_TIMEOUT).await
        }
        .await;
        if let Err(e) = loaded {
            let e = match vm.exited() {
                Some(_) => QmpError::Command {
                    command: "migrate-incoming".into(),
                    class: "QEMU exited".into(),
                    desc: log_tail(&vm.spec.qemu_log()),
                },
                None => e,
            };
            vm.kill().await;
            return Err(RestoreVmError::Load(e));
        }
        if let Err(e) = vm.qmp.execute("cont", None).await {
            vm.kill().await;
            return Err(RestoreVmError::Resume(e));
        }
        Ok(vm)
    }

    /// Start a VM that will be restored by postcopy (see [`crate::postcopy`]):
    /// QEMU on a fresh, empty RAM file of the right size, listening for the
    /// migration stream on `socket`, with `postcopy-ram` on. `cont` is given
    /// at once, so the guest runs as soon as the stream's RUN command
    /// arrives. The caller then connects to `socket` and serves the stream
    /// ([`crate::postcopy::serve`]); [`QmpClient::wait_migration`] tells
    /// when every page has arrived.
    pub async fn start_postcopy(spec: VmSpec, socket: &Path) -> Result<Vm, RestoreVmError> {
        let io = |source| {
            RestoreVmError::Start(StartVmError::RunDir {
                path: spec.ram_path.clone(),
                source,
            })
        };
        let _ = std::fs::remove_file(&spec.ram_path);
        let f = std::fs::File::create(&spec.ram_path).map_err(io)?;
        f.set_len(spec.machine.memory_bytes()).map_err(io)?;
        drop(f);
        let _ = std::fs::remove_file(socket);
        let vm = Vm::start_incoming(spec).await?;
        let ready = async {
            vm.qmp
                .set_migration_capabilities(&[("postcopy-ram", true), ("x-ignore-shared", false)])
                .await?;
            vm.qmp
                .execute(
                    "migrate-incoming",
                    Some(json!({ "uri": format!("unix:{}", socket.display()) })),
                )
                .await?;
            vm.qmp.execute("cont", None).await
        }
        .await;
        if let Err(e) = ready {
            vm.kill().await;
            return Err(RestoreVmError::Load(e));
        }
        Ok(vm)
    }

    /// Take over a QEMU process started earlier (by a daemon that restarted).
    pub async fn adopt(spec: VmSpec, pid: u32) -> Result<Vm, StartVmError> {
        let qmp = QmpClient::connect(&spec.qmp_socket()).await?;
        let (tx, exit) = watch::channel(None);
        let q = qmp.clone();
        let held = spec.adopted_confinement();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = q.closed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                // SAFETY: signal 0 only checks the pid.
                if unsafe { libc::kill(pid as i32, 0) } != 0 || is_zombie(pid) {
                    release_confinement(held).await;
                    let _ = tx.send(Some(VmExit::Vanished));
                    return;
                }
            }
        });
        Ok(Vm {
            spec,
            pid,
            qmp,
            exit,
        })
    }

    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }
    pub fn pid(&self) -> u32 {
        self.pid
    }
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// `Some` once QEMU has exited.
    pub fn exited(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    /// Resolves when QEMU exits.
    pub async fn wait_exit(&self) -> VmExit {
        let mut rx = self.exit.clone();
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(VmExit::Vanished),
            Err(_) => VmExit::Vanished,
        };
        exit
    }

    pub async fn pause(&self) -> Result<(), QmpError> {
        self.qmp.execute("stop", None).await.map(|_| ())
    }

    pub async fn resume(&self) -> Result<(), QmpError> {
        self.qmp.execute("cont", None).await.map(|_| ())
    }

    /// Connect to the guest agent, waiting up to `timeout` for it to answer.
    pub async fn agent(&self, timeout: Duration) -> Result<AgentClient, AgentError> {
        AgentClient::connect(&self.spec.agent_socket(), timeout).await
    }

    /// Pause the VM and write its device state (everything but RAM, which is
    /// the RAM file) to `path`. The VM stays paused (`postmigrate`), and can
    /// be resumed with [`Vm::resume`].
    pub async fn save_device_state(&self, path: &Path) -> Result<(), SaveVmError> {
        let tmp = path.with_extension("partial");
        self.qmp
            .execute("stop", None)
            .await
            .map_err(SaveVmError::Pause)?;
        let run = async {
            self.qmp
                .set_migration_capabilities(&[("x-ignore-shared", true)])
                .await?;
            // QEMU writes into our socket, we into the file: no `exec:`.
            let sock = self.spec.socket_dir().join("save.sock");
            let _ = std::fs::remove_file(&sock);
            let listener = tokio::net::UnixListener::bind(&sock)?;
            self.spec.hand_over(&sock)?;
            self.qmp
                .execute(
                    "migrate",
                    Some(json!({ "uri": format!("unix:{}", sock.display()) })),
                )
                .await?;
            let accepted = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
            let _ = std::fs::remove_file(&sock);
            let (mut conn, _) = accepted.map_err(|_| QmpError::Timeout {
                command: "migrate (connect)".into(),
                timeout: Duration::from_secs(10),
            })??;
            let mut file = tokio::fs::File::create(&tmp).await?;
            tokio::io::copy(&mut conn, &mut file).await?;
            self.qmp.wait_migration(MIGRATE_TIMEOUT).await
        };
        if let Err(e) = run.await {
            let _ = std::fs::remove_file(&tmp);
            return Err(SaveVmError::Migrate(e));
        }
        let io = |source| SaveVmError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Stop QEMU at once (SIGKILL) and wait for it; remove its sockets.
    pub async fn kill(&self) {
        if self.exited().is_none() {
            // SAFETY: signalling our QEMU process.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            let _ = tokio::time::timeout(Duration::from_secs(10), self.wait_exit()).await;
        }
        self.remove_sockets();
    }

    /// Ask QEMU to quit; kill it if it does not within `timeout`.
    pub async fn quit(&self, timeout: Duration) {
        let _ = self
            .qmp
            .execute_with_timeout("quit", None, Duration::from_secs(5))
            .await;
        if tokio::time::timeout(timeout, self.wait_exit())
            .await
            .is_err()
        {
            tracing::warn!(pid = self.pid, "QEMU did not quit, killing it");
        }
        self.kill().await;
    }

    fn remove_sockets(&self) {
        for p in [
            self.spec.qmp_socket(),
            self.spec.agent_socket(),
            self.spec.pid_file(),
        ] {
            let _ = std::fs::remove_file(p);
        }
        if self.spec.socket_dir() != self.spec.run_dir {
            let _ = std::fs::remove_dir(self.spec.socket_dir());
        }
    }
}

fn check_boot_inputs(spec: &VmSpec) -> Result<(), StartVmError> {
    let m = &spec.machine;
    if !m.kernel.is_file() {
        return Err(StartVmError::MissingKernel(m.kernel.clone()));
    }
    if !m.initrd.is_file() {
        return Err(StartVmError::MissingInitrd(m.initrd.clone()));
    }
    if !spec.disk_path.is_file() {
        return Err(StartVmError::MissingDisk(spec.disk_path.clone()));
    }
    Ok(())
}

async fn start(spec: VmSpec, incoming: bool) -> Result<Vm, StartVmError> {
    let created_dir = !spec.run_dir.exists();
    for dir in [spec.run_dir.clone(), spec.socket_dir()] {
        std::fs::create_dir_all(&dir)
            .map_err(|source| StartVmError::RunDir { path: dir, source })?;
    }
    for p in [spec.qmp_socket(), spec.agent_socket(), spec.pid_file()] {
        let _ = std::fs::remove_file(p);
    }
    let cleanup = |spec: &VmSpec| {
        for p in [spec.qmp_socket(), spec.agent_socket(), spec.pid_file()] {
            let _ = std::fs::remove_file(p);
        }
        if !incoming {
            let _ = std::fs::remove_file(&spec.ram_path);
        }
        if created_dir {
            let _ = std::fs::remove_dir_all(&spec.run_dir);
        }
        if spec.socket_dir() != spec.run_dir {
            let _ = std::fs::remove_dir(spec.socket_dir());
        }
    };
    let log = std::fs::File::create(spec.qemu_log()).map_err(|source| StartVmError::RunDir {
        path: spec.qemu_log(),
        source,
    })?;
    let log2 = log.try_clone().map_err(|source| StartVmError::RunDir {
        path: spec.qemu_log(),
        source,
    })?;
    let mut spec = spec;
    let confined = match spec.confine_qemu() {
        Ok(c) => c,
        Err(e) => {
            cleanup(&spec);
            return Err(e.into());
        }
    };
    let binary = qemu_binary();
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.args(spec.to_args(incoming))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        // Own process group: QEMU outlives a daemon killed with its group.
        .process_group(0)
        .kill_on_drop(false);
    let held = confined.map(|(held, jail)| {
        // SAFETY: `enter` makes async-signal-safe calls only, on data
        // prepared before the fork.
        unsafe { cmd.pre_exec(move || jail.enter()) };
        held
    });
    tracing::debug!(name = %spec.name, args = ?spec.to_args(incoming), uid = ?held.as_ref().map(|h| h.uid()), "starting QEMU");
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(source) => {
            cleanup(&spec);
            release_confinement(held).await;
            return Err(StartVmError::Spawn { binary, source });
        }
    };
    let pid = child.id().unwrap_or(0);
    let (tx, exit) = watch::channel(None);
    let name = spec.name.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        let code = status.as_ref().ok().and_then(|s| s.code());
        tracing::info!(vm = %name, pid, ?code, "QEMU exited");
        release_confinement(held).await;
        let _ = tx.send(Some(VmExit::Exited { code }));
    });

    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    let qmp = loop {
        if let Some(VmExit::Exited { code }) = exit.borrow().clone() {
            let log = log_tail(&spec.qemu_log());
            cleanup(&spec);
            return Err(StartVmError::Exited {
                status: code.map_or("killed by a signal".into(), |c| format!("exit code {c}")),
                log,
            });
        }
        if spec.qmp_socket().exists() {
            match QmpClient::connect(&spec.qmp_socket()).await {
                Ok(q) => break q,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    kill_pid(pid, &exit).await;
                    cleanup(&spec);
                    return Err(e.into());
                }
                Err(_) => {}
            }
        }
        if tokio::time::Instant::now() > deadline {
            kill_pid(pid, &exit).await;
            cleanup(&spec);
            return Err(StartVmError::NoQmp(START_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    Ok(Vm {
        spec,
        pid,
        qmp,
        exit,
    })
}

/// Gives up a confined QEMU's cgroup and uid once it has exited.
async fn release_confinement(held: Option<confine::Held>) {
    if let Some(h) = held {
        let _ = tokio::task::spawn_blocking(move || h.release()).await;
    }
}

async fn kill_pid(pid: u32, exit: &watch::Receiver<Option<VmExit>>) {
    // SAFETY: signalling the QEMU we spawned.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let mut rx = exit.clone();
    let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some)).await;
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail
    }
}

/// Switches the disk of a VM started with [`VmSpec::lazy_disk`] from the NBD
/// server to the file at `disk_path`, while the guest runs: the file must
/// then hold the complete disk (every write the guest made through the
/// server is in it). QEMU drains the disk, swaps the raw node's file child
/// and drops the NBD client; the server can stop afterwards.
pub async fn pivot_disk_to_file(qmp: &QmpClient, spec: &VmSpec) -> Result<(), QmpError> {
    use crate::spec::DISK_FILE_NODE;
    qmp.execute(
        "blockdev-add",
        Some(json!({
            "driver": "file",
            "node-name": DISK_FILE_NODE,
            "filename": spec.disk_path,
        })),
    )
    .await?;
    let reopen = qmp
        .execute(
            "blockdev-reopen",
            Some(json!({ "options": [{
                "driver": spec.disk_format.as_str(),
                "node-name": "disk0",
                "file": DISK_FILE_NODE,
                "discard": "unmap",
            }]})),
        )
        .await;
    if let Err(e) = reopen {
        let _ = qmp
            .execute("blockdev-del", Some(json!({ "node-name": DISK_FILE_NODE })))
            .await;
        return Err(e);
    }
    Ok(())
}
