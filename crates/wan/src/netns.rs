//! Network namespaces: naming, `ip`/`tc` invocations, `setns`, and stale cleanup.
//!
//! Every namespace this crate creates is named `clw-<prefix>-<pid>-<seq>-<a|b>`, where
//! `<pid>` is the process that owns the delay line. A namespace whose owner is no longer
//! alive is stale: nothing moves its packets any more, and [`cleanup_stale`] deletes it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

use crate::WanError;

/// Start of every namespace name this crate creates.
pub const NS_PREFIX: &str = "clw-";

/// Where `ip netns add` mounts named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// A namespace name parsed back into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsName {
    /// The user's `name_prefix`.
    pub prefix: String,
    /// The process that owns the link.
    pub pid: u32,
    /// Link number within that process.
    pub seq: u32,
    /// `'a'` or `'b'`.
    pub side: char,
}

impl NsName {
    /// The full namespace name.
    pub fn render(&self) -> String {
        format!(
            "{NS_PREFIX}{}-{}-{}-{}",
            self.prefix, self.pid, self.seq, self.side
        )
    }

    /// Parses a name made by [`NsName::render`]; `None` for anything else.
    pub fn parse(name: &str) -> Option<NsName> {
        let rest = name.strip_prefix(NS_PREFIX)?;
        let mut parts = rest.split('-');
        let prefix = parts.next()?.to_string();
        let pid = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        let side = match parts.next()? {
            "a" => 'a',
            "b" => 'b',
            _ => return None,
        };
        if parts.next().is_some() || prefix.is_empty() {
            return None;
        }
        Some(NsName {
            prefix,
            pid,
            seq,
            side,
        })
    }

    /// Whether the owning process is still alive.
    pub fn owner_alive(&self) -> bool {
        pid_alive(self.pid)
    }
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Runs a command to completion; an error carries its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), WanError> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_command(cmd, format!("{program} {}", args.join(" ")))
}

/// Runs a command to completion inside `ns` (entered with `setns` between fork and
/// exec, so it works through the open handle even after the namespace's name has been
/// deleted); an error carries its stderr.
pub(crate) fn run_inside(ns: &NsHandle, program: &str, args: &[&str]) -> Result<(), WanError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    cmd.args(args);
    let fd = ns.raw_fd();
    // SAFETY: the closure only calls setns, which is async-signal-safe; `ns` is
    // borrowed, so the descriptor stays open until the child has run.
    unsafe {
        cmd.pre_exec(move || setns_fd(fd));
    }
    run_command(
        cmd,
        format!("{program} {} (in {})", args.join(" "), ns.name),
    )
}

fn run_command(mut cmd: Command, command: String) -> Result<(), WanError> {
    tracing::debug!(%command, "wan: run");
    let out = cmd.output().map_err(|source| WanError::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(WanError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `ip netns add NAME`.
pub(crate) fn add(name: &str) -> Result<(), WanError> {
    run("ip", &["netns", "add", name])
}

/// `ip netns delete NAME`.
pub(crate) fn delete(name: &str) -> Result<(), WanError> {
    run("ip", &["netns", "delete", name])
}

/// Names of all named namespaces (the entries of `/run/netns`).
pub fn list_all() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Namespaces created by this crate (any process, alive or not).
pub fn list_ours() -> Vec<NsName> {
    list_all().iter().filter_map(|n| NsName::parse(n)).collect()
}

/// Deletes every namespace of this crate whose owning process is gone, and returns
/// their names. Links of live processes (other tests, a running `cloudlet-wan up`)
/// are left alone.
pub fn cleanup_stale() -> Result<Vec<String>, WanError> {
    let mut removed = Vec::new();
    for ns in list_ours() {
        if !ns.owner_alive() {
            let name = ns.render();
            delete(&name)?;
            tracing::info!(ns = %name, "wan: removed stale namespace");
            removed.push(name);
        }
    }
    Ok(removed)
}

/// An open handle on a named namespace, for `setns`.
#[derive(Debug)]
pub(crate) struct NsHandle {
    pub name: String,
    file: File,
}

impl NsHandle {
    pub fn open(name: &str) -> Result<NsHandle, WanError> {
        let path: PathBuf = [NETNS_DIR, name].iter().collect();
        let file = File::open(&path).map_err(|source| WanError::Namespace {
            ns: name.to_string(),
            source,
        })?;
        Ok(NsHandle {
            name: name.to_string(),
            file,
        })
    }

    pub fn try_clone(&self) -> Result<NsHandle, WanError> {
        Ok(NsHandle {
            name: self.name.clone(),
            file: self
                .file
                .try_clone()
                .map_err(|source| WanError::Namespace {
                    ns: self.name.clone(),
                    source,
                })?,
        })
    }

    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Moves the calling thread into this namespace. Only for threads this crate
    /// spawned for the purpose: a thread never leaves again.
    pub fn enter(&self) -> Result<(), WanError> {
        setns_fd(self.raw_fd()).map_err(|source| WanError::Namespace {
            ns: self.name.clone(),
            source,
        })
    }
}

/// `setns(fd, CLONE_NEWNET)`; async-signal-safe, usable between fork and exec.
pub(crate) fn setns_fd(fd: i32) -> std::io::Result<()> {
    // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
    let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        let n = NsName {
            prefix: "bench_1".into(),
            pid: 4242,
            seq: 7,
            side: 'b',
        };
        assert_eq!(n.render(), "clw-bench_1-4242-7-b");
        assert_eq!(NsName::parse(&n.render()), Some(n));
        for other in [
            "clw-",
            "clw-x-1-2",
            "clw-x-1-2-c",
            "clw-x-y-2-a",
            "clw-x-1-2-a-b",
            "clw--1-2-a",
            "other-x-1-2-a",
        ] {
            assert_eq!(NsName::parse(other), None, "{other}");
        }
    }

    #[test]
    fn own_pid_is_alive() {
        assert!(pid_alive(std::process::id()));
    }
}
