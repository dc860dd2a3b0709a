//! Recovery: what a daemon that starts finds of the one before it. QEMU
//! processes still running are re-adopted (a VM paused by a commit that
//! was stored but not carried out is resumed); dead ones are recorded;
//! work cut short by a crash (a synthesis, an arrival, a delete) is
//! cleaned up. No record of a running VM is lost.

use std::path::Path;
use std::sync::Arc;

use cloudlet_api::VmState;
use cloudlet_qemu::Vm;

use super::cloudlet::Cloudlet;

impl Cloudlet {
    /// Re-adopt QEMU processes still running; mark dead ones; clean up
    /// work that was cut short by a crash.
    pub(super) async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        for mut rec in self.store.list()? {
            let id = rec.id.clone();
            let paths = self.paths(&id);
            match rec.state {
                VmState::Synthesizing => {
                    // QEMU may already run (restore, or an early start
                    // waiting for its memory): its pid is only in its pid
                    // file, not yet in the record.
                    kill_pid(qemu_in(&paths.run_dir()));
                    paths.remove();
                    rec.set_state_or_log(VmState::Failed);
                    rec.error = Some("The daemon restarted during synthesis".into());
                    rec.ports.clear();
                    self.store.put(&rec)?;
                }
                VmState::Receiving => {
                    // An arrival that was not committed: the source keeps it.
                    if let Some(spec) = &rec.spec {
                        kill_pid(rec.pid.filter(|p| qemu_alive(*p, spec)));
                    }
                    paths.remove();
                    self.store.delete(&id)?;
                    continue;
                }
                VmState::Moved => {
                    if let Some(spec) = &rec.spec {
                        kill_pid(rec.pid.filter(|p| qemu_alive(*p, spec)));
                    }
                    paths.remove();
                }
                VmState::Deleting => {
                    kill_pid(rec.pid);
                    paths.remove();
                    self.store.delete(&id)?;
                    continue;
                }
                VmState::Running | VmState::HandingOff => {
                    let mut adopted = match (&rec.spec, rec.pid) {
                        (Some(spec), Some(pid)) if qemu_alive(pid, spec) => {
                            match Vm::adopt(spec.clone(), pid).await {
                                Ok(vm) => Some(vm),
                                Err(e) => {
                                    // Alive but unmanageable (an early start
                                    // whose main loop waits on a page the
                                    // dead daemon had does not answer QMP):
                                    // it must not run on unrecorded.
                                    tracing::warn!(vm_id = %id, pid, error = %e, "QEMU runs but does not answer on QMP: stopping it");
                                    kill_pid(Some(pid));
                                    None
                                }
                            }
                        }
                        _ => None,
                    };
                    // An early start whose memory was still streaming from
                    // the daemon that died: the guest waits on pages nobody
                    // will send. It cannot be saved; stop it.
                    if let Some(vm) = &adopted {
                        if incoming_unfinished(vm).await {
                            tracing::warn!(vm_id = %id, "VM was still receiving its memory (early start) when the daemon stopped: stopping it");
                            vm.kill().await;
                            adopted = None;
                        }
                    }
                    match adopted {
                        Some(vm) => {
                            resume_adopted(&id, &vm).await;
                            tracing::info!(vm_id = %id, pid = vm.pid(), "re-adopted running VM");
                            let vm = Arc::new(vm);
                            rec.set_state_or_log(VmState::Running);
                            self.store.put(&rec)?;
                            self.insert(rec, Some(vm.clone()));
                            self.watch(id, vm);
                            continue;
                        }
                        None => {
                            tracing::warn!(vm_id = %id, "VM died while the daemon was away");
                            rec.set_state_or_log(VmState::Dead);
                            rec.error = Some("QEMU exited while the daemon was not running".into());
                            self.store.put(&rec)?;
                        }
                    }
                }
                _ => {}
            }
            self.insert(rec, None);
        }
        Ok(())
    }
}

pub fn kill_pid(pid: Option<u32>) {
    if let Some(pid) = pid {
        // SAFETY: signalling a pid we recorded as our QEMU.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// The QEMU whose run directory is `run_dir`, from its pid file, if it
/// still runs (checked on its command line: pids get reused).
fn qemu_in(run_dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(run_dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let c = String::from_utf8_lossy(&cmdline);
    (c.contains("qemu-system") && c.contains(&run_dir.display().to_string())).then_some(pid)
}

/// Whether `pid` is still the QEMU that runs `spec` (pids get reused).
pub fn qemu_alive(pid: u32, spec: &cloudlet_qemu::VmSpec) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("qemu-system") && c.contains(&spec.qmp_socket().display().to_string())
        })
        .unwrap_or(false)
}

/// Whether an adopted QEMU was still being synthesized by early start: in a
/// postcopy migration (only early starts use postcopy: handoffs are
/// precopy), or with its disk still on the daemon's NBD server.
/// A re-adopted VM its record calls running (or leaving) that QEMU holds
/// paused runs again: a destination that died between storing its commit
/// and resuming the VM, or a source that died while it throttled its guest
/// or waited at the switchover (a move not yet committed: a committed one
/// is recorded moved, and never comes here).
async fn resume_adopted(id: &str, vm: &Vm) {
    let state = match vm.qmp().run_state().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(vm_id = %id, "reading the re-adopted VM's run state: {e}");
            return;
        }
    };
    if state == "running" {
        return;
    }
    let _ = vm.qmp().cancel_migration().await;
    match vm.resume().await {
        Ok(()) => tracing::info!(vm_id = %id, was = %state, "re-adopted VM was paused: resumed"),
        Err(e) => {
            tracing::error!(vm_id = %id, was = %state, "cannot resume the re-adopted VM: {e}")
        }
    }
}

async fn incoming_unfinished(vm: &Vm) -> bool {
    let postcopy = vm
        .qmp()
        .query_migrate()
        .await
        .is_ok_and(|i| i.status.is_postcopy());
    let lazy_disk = vm
        .qmp()
        .find_block_node(cloudlet_qemu::spec::LAZY_DISK_NODE)
        .await
        .is_ok_and(|n| n.is_some());
    postcopy || lazy_disk
}
