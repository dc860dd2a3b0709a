//! QEMU confined (issue 15, part 4), on real QEMU: each VM's QEMU under a
//! uid of its own, in a cgroup of its own with the flavor's limits, under
//! the seccomp sandbox; one VM's uid cannot open another VM's RAM file.
//! The daemons run as root here, with the default `[confine]` (on). A
//! confined VM also moves between two cloudlets: its QEMU at the
//! destination is confined the same way, and the source's uid and cgroup
//! are given back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cloudlet_api::CreateVmRequest;
use cloudlet_qemu::confine::{Cgroups, Confinement};
use cloudlet_testkit::http;
use common::{kvstore_overlay, qemu_running, start_registry, Daemon, TOKEN};

/// Two flavors, so the two VMs' limits differ.
const FLAVORS: &str = "[[flavors]]\nname = \"small\"\nvcpus = 1\nmemory_mib = 512\n\
                       \n[[flavors]]\nname = \"duo\"\nvcpus = 2\nmemory_mib = 640\n";

/// One `Key:` line of `/proc/PID/status`, its fields.
fn status_field(pid: u32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in the status of {pid}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn qemu_pid(d: &Daemon, id: &str) -> u32 {
    let f = d.vm_dir.join(id).join("run").join("qemu.pid");
    std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        .trim()
        .parse()
        .unwrap()
}

/// The uid QEMU `pid` runs under: the same real, effective, saved and fs
/// uid and gid, no supplementary groups, `no_new_privs`, seccomp filter.
fn confined_uid(pid: u32) -> u32 {
    let uids = status_field(pid, "Uid");
    let gids = status_field(pid, "Gid");
    assert!(uids.iter().all(|u| *u == uids[0]), "uids {uids:?}");
    assert_eq!(uids, gids, "gid = uid");
    assert!(status_field(pid, "Groups").is_empty(), "no groups");
    assert_eq!(status_field(pid, "NoNewPrivs"), ["1"]);
    assert_eq!(status_field(pid, "Seccomp"), ["2"], "seccomp filter mode");
    let uid: u32 = uids[0].parse().unwrap();
    assert!((200_000..=200_999).contains(&uid), "uid {uid} of the range");
    uid
}

/// Reads cgroup `name`'s limits and processes: (memory bytes, CPU quota
/// in periods of 100 ms, pids).
fn cgroup_limits(cg: &Cgroups, name: &str) -> (u64, f64, Vec<u32>) {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };
    let pids = |dir: &Path| -> Vec<u32> {
        read(dir.join("cgroup.procs"))
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    };
    match cg {
        Cgroups::V2 { root } => {
            let dir = root.join(name);
            let cpu = read(dir.join("cpu.max"));
            let (q, p) = cpu.split_once(' ').unwrap();
            let quota = q.parse::<f64>().unwrap() / p.parse::<f64>().unwrap();
            (
                read(dir.join("memory.max")).parse().unwrap(),
                quota,
                pids(&dir),
            )
        }
        Cgroups::V1 { memory, cpu } => {
            let (md, cd) = (memory.join(name), cpu.join(name));
            let q: f64 = read(cd.join("cpu.cfs_quota_us")).parse().unwrap();
            let p: f64 = read(cd.join("cpu.cfs_period_us")).parse().unwrap();
            let mut procs = pids(&md);
            assert_eq!(procs, pids(&cd), "the same processes in memory and cpu");
            procs.sort();
            let mem = read(md.join("memory.limit_in_bytes")).parse().unwrap();
            (mem, q / p, procs)
        }
    }
}

/// Reads the first page of `file` as `uid`: the error output on failure.
fn read_as(uid: u32, file: &Path) -> Result<(), String> {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "head",
            "-c",
            "4096",
        ])
        .arg(file)
        .output()
        .unwrap();
    if out.status.success() && out.stdout.len() == 4096 {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_qemu_has_its_uid_and_cgroup_and_cannot_read_another_vms_ram() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
    let cg = Cgroups::host().expect("a cgroup hierarchy with memory and cpu");
    let overlay = kvstore_overlay().await;
    let reg_dir = tempfile::tempdir().unwrap();
    let registry = start_registry(reg_dir.path()).await;
    cloudlet_registry::push_overlay(&registry, TOKEN, "kvstore", &overlay)
        .await
        .unwrap();
    let d = Daemon::start(FLAVORS).await;
    assert!(
        d.log().contains("QEMU confinement on"),
        "the start log says what is in effect: {}",
        d.log()
    );
    let c = d.client();
    let mut vms = Vec::new();
    for (name, flavor) in [("one", "small"), ("two", "duo")] {
        let vm = c
            .create_vm(&CreateVmRequest {
                overlay: format!("{registry}/v1/overlays/kvstore"),
                name: Some(name.into()),
                flavor: Some(flavor.into()),
            })
            .await
            .unwrap_or_else(|e| panic!("synthesis of {name}: {e}\n{}", d.log()));
        vms.push(vm);
    }
    let pids: Vec<u32> = vms.iter().map(|v| qemu_pid(&d, &v.id)).collect();
    let uids: Vec<u32> = pids.iter().map(|p| confined_uid(*p)).collect();
    assert_ne!(uids[0], uids[1], "two live VMs never share a uid");

    for (i, (mib, vcpus)) in [(512u64, 1.0), (640, 2.0)].into_iter().enumerate() {
        let name = Confinement::cgroup_name(uids[i]);
        let (mem, quota, procs) = cgroup_limits(&cg, &name);
        let limit = (mib + cloudlet_qemu::confine::DEFAULT_MEMORY_OVERHEAD_MIB) << 20;
        assert_eq!(mem, limit, "VM {i}: the flavor's memory + QEMU's overhead");
        assert_eq!(quota, vcpus, "VM {i}: the flavor's vCPUs");
        assert!(
            procs.contains(&pids[i]),
            "QEMU {} in {name}: {procs:?}",
            pids[i]
        );
    }

    // The RAM files: each its own uid's; the other uid cannot open it.
    let ram: Vec<PathBuf> = vms
        .iter()
        .map(|v| d.vm_dir.join(&v.id).join("ram"))
        .collect();
    read_as(uids[0], &ram[0]).expect("a VM's uid reads its own RAM file");
    let denied = read_as(uids[0], &ram[1]).expect_err("another VM's RAM file");
    assert!(denied.contains("Permission denied"), "{denied}");
    let denied = read_as(uids[1], &ram[0]).expect_err("another VM's RAM file");
    assert!(denied.contains("Permission denied"), "{denied}");
    let disk1 = d.home.join("vms").join(&vms[1].id).join("disk.raw");
    assert!(read_as(uids[0], &disk1).is_err(), "nor its disk");

    // The confined VMs work.
    for vm in &vms {
        let port = vm.ports[0].host;
        let r = http(port, "PUT", "/kv/k", Some(vm.id.clone().into_bytes()))
            .await
            .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(
            http(port, "GET", "/kv/k", None).await.unwrap().text(),
            vm.id
        );
    }

    for (vm, uid) in vms.iter().zip(&uids) {
        c.delete_vm(&vm.id).await.unwrap();
        for dir in cg.dirs(&Confinement::cgroup_name(*uid)) {
            assert!(!dir.exists(), "{} removed with the VM", dir.display());
        }
        let claim = Path::new(cloudlet_qemu::confine::DEFAULT_CLAIMS_DIR).join(uid.to_string());
        assert!(!claim.exists(), "the uid {uid} is free again");
    }
}

/// Checks that VM `id` of `d` runs confined with the limits of a flavor of
/// `mib` MiB and `vcpus` vCPUs; its uid.
fn assert_confined(d: &Daemon, id: &str, mib: u64, vcpus: f64) -> u32 {
    let cg = Cgroups::host().expect("a cgroup hierarchy with memory and cpu");
    let pid = qemu_pid(d, id);
    let uid = confined_uid(pid);
    let (mem, quota, procs) = cgroup_limits(&cg, &Confinement::cgroup_name(uid));
    let limit = (mib + cloudlet_qemu::confine::DEFAULT_MEMORY_OVERHEAD_MIB) << 20;
    assert_eq!((mem, quota), (limit, vcpus), "the flavor's limits");
    assert!(procs.contains(&pid), "QEMU {pid} in its cgroup: {procs:?}");
    uid
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confined_vm_moves_to_a_confined_qemu_and_gives_back_its_uid() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
    let cg = Cgroups::host().expect("a cgroup hierarchy with memory and cpu");
    let overlay = kvstore_overlay().await;
    let a = Daemon::start_named("confined-a", FLAVORS).await;
    let b = Daemon::start_named("confined-b", FLAVORS).await;
    for d in [&a, &b] {
        assert!(d.log().contains("QEMU confinement on"), "{}", d.log());
    }
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("mover"), Some("duo"))
        .await
        .unwrap_or_else(|e| panic!("synthesis: {e}\n{}", a.log()));
    let uid_a = assert_confined(&a, &vm.id, 640, 2.0);
    let port = vm.ports[0].host;
    let r = http(port, "PUT", "/kv/k", Some(b"moved".to_vec()))
        .await
        .unwrap();
    assert_eq!(r.status, 201);

    let report = a
        .client()
        .handoff("mover", &b.url(), Some(TOKEN))
        .await
        .unwrap_or_else(|e| panic!("{e}\n--- source\n{}\n--- destination\n{}", a.log(), b.log()));
    let there = b.client().get_vm(&report.vm.id).await.unwrap();
    assert_eq!(there.flavor, "duo");
    let uid_b = assert_confined(&b, &there.id, 640, 2.0);
    assert_ne!(uid_a, uid_b, "both QEMUs lived at once: two uids");
    // The destination's files are its QEMU's, out of reach of others.
    let ram = b.vm_dir.join(&there.id).join("ram");
    read_as(uid_b, &ram).expect("the VM's uid reads its RAM file");
    assert!(read_as(uid_a, &ram).is_err(), "the source's old uid cannot");
    let port = there.ports[0].host;
    assert_eq!(
        http(port, "GET", "/kv/k", None).await.unwrap().text(),
        "moved"
    );

    // The source's QEMU is gone and its confinement given back.
    assert!(!qemu_running(&a, &vm.id), "the source's QEMU stopped");
    for dir in cg.dirs(&Confinement::cgroup_name(uid_a)) {
        assert!(!dir.exists(), "{} removed after the move", dir.display());
    }
    let claim = Path::new(cloudlet_qemu::confine::DEFAULT_CLAIMS_DIR).join(uid_a.to_string());
    assert!(!claim.exists(), "the source's uid {uid_a} is free again");
    b.client().delete_vm(&there.id).await.unwrap();
}
