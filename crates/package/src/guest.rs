//! The steps that run inside the guest: copy the app in, install, start it,
//! wait until it answers, scrub, save the launch state.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudlet_agent_proto::{Op, Reply, AUTOSTART_PATH};
use cloudlet_qemu::{AgentClient, AgentError, Vm};

use crate::scrub::{scrub_guest, ScrubReport};
use crate::{
    PackageAppError, PackageConfig, PackageEvent, Result, Steps, WorkDir, APP_DIR, APP_LOG,
};

const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Environment of install and warm-up commands.
const ENV: &[(&str, &str)] = &[
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
];

fn agent_err(step: &'static str) -> impl FnOnce(AgentError) -> PackageAppError {
    move |source| PackageAppError::Agent { step, source }
}

/// Everything between the restored base and the saved launch state: on
/// return (Ok) the device state is in `work/state`, the VM is paused; what
/// scrubbing did, if it ran.
pub(crate) async fn prepare_launch(
    vm: &Vm,
    cfg: &PackageConfig,
    work: &WorkDir,
    steps: &mut Steps,
    progress: &impl Fn(PackageEvent),
) -> Result<Option<ScrubReport>> {
    let mut agent = vm
        .agent(AGENT_TIMEOUT)
        .await
        .map_err(agent_err("connecting"))?;
    run_checked(&mut agent, &["mkdir", "-p", APP_DIR], "creating /opt/app").await?;

    if let Some(dir) = &cfg.install_dir {
        copy_dir(&mut agent, dir, progress).await?;
        steps.finish("copy");
    }

    let total = cfg.install_commands.len();
    for (i, command) in cfg.install_commands.iter().enumerate() {
        progress(PackageEvent::Installing {
            index: i + 1,
            total,
            command: command.clone(),
        });
        let (code, output) = shell(&mut agent, command, cfg.install_timeout).await?;
        if code != Some(0) {
            return Err(PackageAppError::InstallFailed {
                command: command.clone(),
                status: status(code),
                output: tail(&output, 2000),
            });
        }
    }
    if total > 0 {
        steps.finish("install");
    }

    // Autostart, so that a cold boot of the launch disk starts the app too.
    let line = format!("cd {APP_DIR} && {}", cfg.run_command.trim());
    let existing = agent
        .exec(&["cat", AUTOSTART_PATH], Duration::from_secs(10))
        .await
        .map(|o| o.stdout)
        .unwrap_or_default();
    let mut autostart = existing;
    if !autostart.is_empty() && !autostart.ends_with('\n') {
        autostart.push('\n');
    }
    autostart.push_str(&line);
    autostart.push('\n');
    run_checked(&mut agent, &["mkdir", "-p", "/etc/cloudlet"], "autostart").await?;
    agent
        .put_bytes(autostart.as_bytes(), AUTOSTART_PATH, 0o644)
        .await
        .map_err(agent_err("writing the autostart file"))?;

    progress(PackageEvent::Syncing);
    agent
        .sync(false, true)
        .await
        .map_err(agent_err("syncing the disk"))?;
    steps.finish("sync");

    progress(PackageEvent::Starting {
        command: cfg.run_command.clone(),
    });
    let op = Op::Exec {
        argv: vec!["/bin/sh".into(), "-c".into(), cfg.run_command.clone()],
        env: env(),
        cwd: Some(APP_DIR.into()),
        background: true,
        log: Some(APP_LOG.into()),
        timeout_ms: 0,
    };
    match agent
        .call_with_timeout(op, Duration::from_secs(30))
        .await
        .map_err(agent_err("starting the app"))?
    {
        Reply::Started { .. } => {}
        other => {
            return Err(PackageAppError::Agent {
                step: "starting the app",
                source: AgentError::Unexpected {
                    op: "exec",
                    reply: Box::new(other),
                },
            })
        }
    }

    let port = cfg.ports[0];
    progress(PackageEvent::WaitingForPort {
        port,
        health_path: cfg.health_path.clone(),
    });
    let waited = agent
        .wait_port(port, cfg.health_path.as_deref(), cfg.ready_timeout)
        .await;
    if let Err(e) = waited {
        let log = agent
            .exec(&["tail", "-c", "2000", APP_LOG], Duration::from_secs(10))
            .await
            .map(|o| o.stdout.trim().to_string())
            .unwrap_or_else(|_| "(unavailable)".into());
        tracing::debug!("wait_port: {e}");
        return Err(PackageAppError::NotReady {
            port,
            health: cfg.health_path.clone(),
            waited: cfg.ready_timeout,
            log: if log.is_empty() {
                "(empty)".into()
            } else {
                log
            },
        });
    }
    steps.finish("start app");

    let total = cfg.warmup_commands.len();
    for (i, command) in cfg.warmup_commands.iter().enumerate() {
        progress(PackageEvent::WarmingUp {
            index: i + 1,
            total,
            command: command.clone(),
        });
        let (code, output) = shell(&mut agent, command, cfg.install_timeout).await?;
        if code != Some(0) {
            return Err(PackageAppError::WarmupFailed {
                command: command.clone(),
                status: status(code),
                output: tail(&output, 2000),
            });
        }
    }
    tokio::time::sleep(cfg.settle).await;
    let scrubbed = if cfg.scrub {
        progress(PackageEvent::Scrubbing);
        let r = scrub_guest(&mut agent).await?;
        steps.finish("scrub");
        Some(r)
    } else {
        None
    };
    drop(agent);

    progress(PackageEvent::Saving);
    vm.save_device_state(&work.path("state"))
        .await
        .map_err(PackageAppError::Save)?;
    steps.finish("save");
    Ok(scrubbed)
}

fn env() -> Vec<(String, String)> {
    ENV.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn status(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("exit status {c}"),
        None => "a signal or a timeout".into(),
    }
}

/// The last `n` bytes of `s`, on a character boundary.
fn tail(s: &str, n: usize) -> String {
    let s = s.trim();
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

/// Runs a shell command in [`APP_DIR`]; its exit code and output.
async fn shell(
    agent: &mut AgentClient,
    command: &str,
    timeout: Duration,
) -> Result<(Option<i32>, String)> {
    let op = Op::Exec {
        argv: vec!["/bin/sh".into(), "-c".into(), command.into()],
        env: env(),
        cwd: Some(APP_DIR.into()),
        background: false,
        log: None,
        timeout_ms: timeout.as_millis() as u64,
    };
    match agent
        .call_with_timeout(op, timeout + Duration::from_secs(10))
        .await
        .map_err(agent_err("running a command"))?
    {
        Reply::Exited {
            code,
            stdout,
            stderr,
            ..
        } => Ok((code, format!("{stdout}{stderr}"))),
        other => Err(PackageAppError::Agent {
            step: "running a command",
            source: AgentError::Unexpected {
                op: "exec",
                reply: Box::new(other),
            },
        }),
    }
}

async fn run_checked(agent: &mut AgentClient, argv: &[&str], step: &'static str) -> Result<()> {
    let out = agent
        .exec(argv, Duration::from_secs(60))
        .await
        .map_err(agent_err(step))?;
    if out.code != Some(0) {
        return Err(PackageAppError::Agent {
            step,
            source: AgentError::Refused {
                op: "exec",
                message: format!("{argv:?}: {} {}", status(out.code), out.stderr.trim()),
            },
        });
    }
    Ok(())
}

enum Entry {
    Dir(String, u32),
    File(PathBuf, String, u32, u64),
    Symlink(String, String),
}

/// Lists `root` recursively: guest paths under [`APP_DIR`], in creation order.
fn walk(root: &Path) -> std::io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), APP_DIR.to_string())];
    while let Some((dir, guest)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name = name.to_str().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("file name {name:?} is not UTF-8"),
                )
            })?;
            let path = e.path();
            let gpath = format!("{guest}/{name}");
            let meta = std::fs::symlink_metadata(&path)?;
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path)?;
                out.push(Entry::Symlink(target.to_string_lossy().into_owned(), gpath));
            } else if meta.is_dir() {
                out.push(Entry::Dir(gpath.clone(), mode));
                stack.push((path, gpath));
            } else if meta.is_file() {
                out.push(Entry::File(path, gpath, mode, meta.len()));
            }
        }
    }
    Ok(out)
}

/// Copies a host directory to [`APP_DIR`], keeping modes.
async fn copy_dir(
    agent: &mut AgentClient,
    dir: &Path,
    progress: &impl Fn(PackageEvent),
) -> Result<()> {
    let entries = walk(dir).map_err(|source| PackageAppError::ReadInstallDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let files_total = entries
        .iter()
        .filter(|e| matches!(e, Entry::File(..)))
        .count() as u64;
    let bytes_total: u64 = entries
        .iter()
        .map(|e| match e {
            Entry::File(_, _, _, len) => *len,
            _ => 0,
        })
        .sum();
    let (mut files_done, mut bytes_done) = (0u64, 0u64);
    let report = |files_done, bytes_done| {
        progress(PackageEvent::Copying {
            files_done,
            files_total,
            bytes_done,
            bytes_total,
        })
    };
    report(0, 0);
    // Directories first (one command), then files and links.
    let dirs: Vec<&str> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Dir(g, _) => Some(g.as_str()),
            _ => None,
        })
        .collect();
    for batch in dirs.chunks(200) {
        let mut argv = vec!["mkdir", "-p"];
        argv.extend(batch);
        run_checked(agent, &argv, "creating directories").await?;
    }
    for e in &entries {
        match e {
            Entry::Dir(..) => {}
            Entry::File(host, guest, mode, len) => {
                let data =
                    std::fs::read(host).map_err(|source| PackageAppError::ReadInstallDir {
                        path: host.clone(),
                        source,
                    })?;
                agent
                    .put_bytes(&data, guest, *mode)
                    .await
                    .map_err(agent_err("copying files"))?;
                files_done += 1;
                bytes_done += len;
                report(files_done, bytes_done);
            }
            Entry::Symlink(target, guest) => {
                run_checked(agent, &["ln", "-sfn", target, guest], "copying links").await?;
            }
        }
    }
    // Directory modes last (a read-only directory would refuse its files),
    // one command per mode.
    let mut by_mode: std::collections::BTreeMap<u32, Vec<&str>> = Default::default();
    for e in &entries {
        if let Entry::Dir(g, mode) = e {
            by_mode.entry(*mode).or_default().push(g);
        }
    }
    for (mode, dirs) in by_mode {
        let mode = format!("{mode:o}");
        for batch in dirs.chunks(200) {
            let mut argv = vec!["chmod", mode.as_str()];
            argv.extend(batch);
            run_checked(agent, &argv, "setting directory modes").await?;
        }
    }
    Ok(())
}
