//! The programs cloudlet runs, the Debian package of each, and their versions.
//!
//! Kept in step with `scripts/install-deps.sh`, which installs the packages
//! named here (a test reads the script and checks that it does).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a program is needed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Need {
    /// The main job: a cloudlet, its base VMs, synthesis and handoff.
    Run,
    /// Only the test suite and the benchmarks.
    Test,
}

/// A program cloudlet runs.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    pub name: &'static str,
    pub package: &'static str,
    pub used_for: &'static str,
    pub need: Need,
    /// What makes it print its version (`--version` for most).
    pub version_args: &'static [&'static str],
}

/// Every program cloudlet, its tests and its benchmarks run.
pub const PROGRAMS: &[Program] = &[
    Program {
        name: "qemu-system-x86_64",
        package: "qemu-system-x86",
        used_for: "runs every VM",
        need: Need::Run,
        version_args: &["--version"],
    },
    Program {
        name: "qemu-img",
        package: "qemu-utils",
        used_for: "makes VM disk images",
        need: Need::Run,
        version_args: &["--version"],
    },
    Program {
        name: "qemu-io",
        package: "qemu-utils",
        used_for: "tests the NBD server against QEMU's own client",
        need: Need::Test,
        version_args: &["--version"],
    },
    Program {
        name: "debootstrap",
        package: "debootstrap",
        used_for: "builds the debian base VM",
        need: Need::Run,
        version_args: &["--version"],
    },
    Program {
        name: "mkfs.ext4",
        package: "e2fsprogs",
        used_for: "makes base VM file systems",
        need: Need::Run,
        version_args: &["-V"],
    },
    Program {
        name: "busybox",
        package: "busybox-static",
        used_for: "the user land of the tiny base VM and of initramfs",
        need: Need::Run,
        version_args: &[],
    },
    Program {
        name: "tar",
        package: "tar",
        used_for: "unpacks the cached debootstrap tree",
        need: Need::Run,
        version_args: &["--version"],
    },
    Program {
        name: "curl",
        package: "curl",
        used_for: "make demo's calls to the daemons",
        need: Need::Run,
        version_args: &["--version"],
    },
    Program {
        name: "strip",
        package: "binutils",
        used_for: "builds the static guest binaries (make guest)",
        need: Need::Run,
        version_args: &["--version"],
    },
    Program {
        name: "zstd",
        package: "zstd",
        used_for: "the baselines of the benchmarks",
        need: Need::Test,
        version_args: &["--version"],
    },
    Program {
        name: "xz",
        package: "xz-utils",
        used_for: "the baseline of overlay-bench",
        need: Need::Test,
        version_args: &["--version"],
    },
    Program {
        name: "ip",
        package: "iproute2",
        used_for: "the WAN emulator's network namespaces (make demo's phone and cloudlets)",
        need: Need::Run,
        version_args: &["-V"],
    },
    Program {
        name: "tc",
        package: "iproute2",
        used_for: "the WAN emulator's rate limit",
        need: Need::Run,
        version_args: &["-V"],
    },
    Program {
        name: "sha256sum",
        package: "coreutils",
        used_for: "a postcopy test's check of guest memory",
        need: Need::Test,
        version_args: &["--version"],
    },
    Program {
        name: "chromium",
        package: "chromium",
        used_for: "the dashboard's test opens /ui in a headless browser",
        need: Need::Test,
        version_args: &["--version"],
    },
];

/// The first `name` in the directories of `path` (a `PATH` value) that is
/// an executable file.
pub fn find_in_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// The first line `program ARGS` prints (stdout, else stderr), if it runs.
pub fn version_line(program: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let line = String::from_utf8_lossy(&text)
        .lines()
        .next()?
        .trim()
        .to_string();
    (!line.is_empty()).then_some(line)
}

/// `7.2.22` out of `QEMU emulator version 7.2.22 (Debian ...)` or
/// `qemu-img version 10.0.2 (...)`.
pub fn qemu_version(line: &str) -> Option<&str> {
    let rest = &line[line.find("version ")? + "version ".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let v = rest[..end].trim_end_matches('.');
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_are_read_from_both_kinds_of_line() {
        assert_eq!(
            qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some("7.2.22")
        );
        assert_eq!(
            qemu_version("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            Some("10.0.2")
        );
        assert_eq!(qemu_version("qemu-img version 8.0.0"), Some("8.0.0"));
        assert_eq!(qemu_version("busybox v1.35"), None);
        assert_eq!(qemu_version("version x"), None);
    }

    #[test]
    fn the_install_script_installs_every_package_named_here() {
        let script = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/install-deps.sh"),
        )
        .unwrap();
        let packages = script
            .split("packages=(")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .expect("a packages=(...) list in install-deps.sh");
        let listed: Vec<&str> = packages.split_whitespace().collect();
        for p in PROGRAMS {
            assert!(
                listed.contains(&p.package),
                "install-deps.sh does not install {} (for {})",
                p.package,
                p.name
            );
            assert!(
                script.contains(&format!("\"{} {}\"", p.name, p.package)),
                "install-deps.sh does not check program {}",
                p.name
            );
        }
    }
}
