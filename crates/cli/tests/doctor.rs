//! `cloudlet doctor` on this machine, and on copies of its PATH with a
//! program taken away or replaced.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output};

use cloudlet_host::programs::{find_in_path, PROGRAMS};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlet");

/// A directory with a link to every program cloudlet runs, as found on this
/// machine's PATH, except `leave_out`.
fn path_without(dir: &Path, leave_out: &str) {
    let path = std::env::var_os("PATH").unwrap();
    for p in PROGRAMS {
        if p.name == leave_out {
            continue;
        }
        if let Some(found) = find_in_path(p.name, &path) {
            symlink(found, dir.join(p.name)).unwrap();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn doctor(path: Option<&Path>, home: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["doctor", "--no-probe", "--ports", &free_port().to_string()])
        .args(extra)
        .env("CLOUDLET_HOME", home)
        .env_remove("CLOUDLET_QEMU")
        .env_remove("CLOUDLET_ACCEL");
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_missing_program_fails_with_a_line_naming_it_and_its_package() {
    let bin = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    path_without(bin.path(), "qemu-img");
    let out = doctor(Some(bin.path()), home.path(), &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("program qemu-img"))
        .unwrap_or_else(|| panic!("no FAIL line for qemu-img in:\n{text}"));
    assert!(line.contains("qemu-utils"), "{line}");
    assert!(text.contains("apt-get install qemu-utils"), "{text}");
    assert!(
        text.lines().last().unwrap().contains("cannot run"),
        "{text}"
    );
}

#[test]
fn a_test_only_program_fails_only_the_tests() {
    let bin = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    path_without(bin.path(), "qemu-io");
    let run = doctor(Some(bin.path()), home.path(), &["--output", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let finding = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "program qemu-io")
        .expect("a finding for qemu-io");
    assert_eq!(finding["level"], "warn", "{finding}");
    let tests = doctor(Some(bin.path()), home.path(), &["--tests"]);
    assert_eq!(tests.status.code(), Some(1), "{}", stdout(&tests));
    assert!(
        stdout(&tests)
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("program qemu-io")),
        "{}",
        stdout(&tests)
    );
}

#[test]
fn qemu_programs_of_two_versions_fail() {
    use std::os::unix::fs::PermissionsExt;
    let bin = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    path_without(bin.path(), "qemu-img");
    // What the machine image ships beside Debian 12's QEMU 7.2.
    let fake = bin.path().join("qemu-img");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)'\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = doctor(Some(bin.path()), home.path(), &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("qemu versions"))
        .unwrap_or_else(|| panic!("no FAIL line for the QEMU versions in:\n{text}"));
    assert!(line.contains("qemu-img 10.0.2"), "{line}");
}

/// After `make deps`, this machine has all it needs (the test suite runs
/// right after it in `make test`).
#[test]
fn this_machine_can_run_the_tests() {
    let home = tempfile::tempdir().unwrap();
    let out = doctor(None, home.path(), &["--tests"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("can run here"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("warn") && l.contains("base VMs")),
        "an empty home has no bases: {text}"
    );
}
