//! Early start plans checked against real overlays: applying the segments a
//! plan names makes exactly the parts it promises final.

mod common;

use std::path::PathBuf;

use cloudlet_overlay::format::{ChunkKind, ChunkSource, Image};
use cloudlet_overlay::{create_overlay, read_manifest, Applier, Codec, LaunchPlan, Manifest};
use common::{overlay_path, random_vm, Vm, CS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A VM with every kind of chunk, and a launch disk chunk that duplicates a
/// new launch memory page (a disk self reference into a memory segment).
fn crafted_vm() -> Vm {
    let mut rng = StdRng::seed_from_u64(7);
    let mut base_disk = vec![0u8; 64 * CS];
    let mut base_mem = vec![0u8; 256 * CS];
    rng.fill(&mut base_disk[..]);
    rng.fill(&mut base_mem[..]);
    let mut launch_disk = base_disk.clone();
    launch_disk.resize(72 * CS, 0);
    let mut launch_mem = base_mem.clone();
    let page = |i: usize| i * CS..(i + 1) * CS;
    // New memory pages 10..40: several memory payload segments.
    for i in 10..40 {
        rng.fill(&mut launch_mem[page(i)]);
    }
    // Zero pages, pages from the base disk and base memory.
    for i in [50, 51, 52, 200] {
        launch_mem[page(i)].fill(0);
    }
    launch_mem.copy_within(page(3), page(60).start); // base mem ref
    launch_mem[page(61)].copy_from_slice(&base_disk[page(5)]);
    // A memory self reference: page 70 = new page 12.
    launch_mem.copy_within(page(12), page(70).start);
    // A small change (xor payload).
    launch_mem[page(100).start + 17] ^= 0x5a;
    // Disk: new chunks, a zero chunk, a base reference, grown tail.
    for i in [2, 3, 40, 65, 66] {
        rng.fill(&mut launch_disk[page(i)]);
    }
    launch_disk[page(8)].fill(0);
    launch_disk[page(9)].copy_from_slice(&base_mem[page(200)]);
    // The disk self reference: disk chunk 20 = new memory page 25.
    let p25 = launch_mem[page(25)].to_vec();
    launch_disk[page(20)].copy_from_slice(&p25);
    let mut device_state = vec![0u8; 5000];
    rng.fill(&mut device_state[..]);
    Vm {
        dir: tempfile::tempdir().unwrap(),
        base_disk,
        base_mem,
        launch_disk,
        launch_mem,
        device_state,
        metadata: Vec::new(),
    }
}

fn make(vm: &Vm, segment_chunks: u32) -> (Vec<u8>, Manifest) {
    vm.write();
    let ov = overlay_path(vm.dir.path());
    let mut config = vm.create_config(Codec::default());
    config.segment_size = segment_chunks * CS as u32;
    create_overlay(&config, &ov).unwrap();
    let bytes = std::fs::read(&ov).unwrap();
    let (_h, m) = read_manifest(&mut &bytes[..]).unwrap();
    (bytes, m)
}

/// The temporary output the applier writes `name` to before `finish`.
fn partial(vm: &Vm, name: &str) -> PathBuf {
    let prefix = format!(".{name}.partial-");
    std::fs::read_dir(vm.path("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
        .unwrap_or_else(|| panic!("no partial output for {name}"))
}

/// Applies `plan.fetch_order` step by step and checks, after each step,
/// that every part the plan calls final equals the launch state (and that
/// every memory page still waiting differs from it).
fn check_plan(vm: &Vm, bytes: &[u8], m: &Manifest, plan: &LaunchPlan) {
    let n = m.segments.len();
    let mut sorted = plan.fetch_order.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..n as u32).collect::<Vec<_>>(),
        "each segment once"
    );
    assert_eq!(plan.fetch_order[0], m.device_state_segment);
    assert_eq!(
        &plan.fetch_order[1..1 + plan.disk_segments.len()],
        &plan.disk_segments[..]
    );
    let rest = &plan.fetch_order[1 + plan.disk_segments.len()..];
    assert!(rest.windows(2).all(|w| w[0] < w[1]), "rest in file order");
    assert!(!plan.disk_segments.contains(&m.device_state_segment));
    assert_eq!(plan.pages(), (vm.launch_mem.len() / CS) as u64);
    for p in 0..plan.pages() {
        if plan.page_is_zero(p) {
            let r = p as usize * CS..(p as usize + 1) * CS;
            assert!(vm.launch_mem[r].iter().all(|&b| b == 0), "page {p}");
        }
    }
    let total: usize = (0..n as u32).map(|s| plan.pages_waiting_on(s)).sum();
    let with_segment = (0..plan.pages())
        .filter(|&p| plan.page_segment(p).is_some())
        .count();
    assert_eq!(total, with_segment);

    let mut config = vm.apply_config();
    config.verify_launch_state = false;
    let applier = Applier::new(m.clone(), &config).unwrap();
    let disk_path = partial(vm, "disk");
    let mem_path = partial(vm, "mem");
    let mut applied = vec![false; n];
    let seg = |i: u32| {
        let r = m.segment_range(i).unwrap();
        &bytes[r.start as usize..r.end as usize]
    };
    let check_mem = |applied: &[bool]| {
        let mem = std::fs::read(&mem_path).unwrap();
        assert_eq!(mem.len(), vm.launch_mem.len());
        for p in 0..plan.pages() {
            let r = p as usize * CS..(p as usize + 1) * CS;
            let ready = plan.page_segment(p).map_or(true, |s| applied[s as usize]);
            if ready {
                assert!(mem[r.clone()] == vm.launch_mem[r], "page {p} not final");
            } else {
                assert!(
                    mem[r.clone()] != vm.launch_mem[r],
                    "page {p} needed nothing"
                );
            }
        }
    };
    check_mem(&applied);
    let disk_steps = 1 + plan.disk_segments.len();
    for (step, &s) in plan.fetch_order.iter().enumerate() {
        // The disk is complete exactly when the last disk segment arrived.
        let disk = std::fs::read(&disk_path).unwrap();
        assert_eq!(
            disk == vm.launch_disk,
            plan.disk_ready(|i| applied[i as usize])
        );
        if step >= disk_steps {
            assert!(disk == vm.launch_disk, "disk incomplete at step {step}");
        }
        applier.apply_segment(s, seg(s)).unwrap();
        applied[s as usize] = true;
        check_mem(&applied);
        for &p in plan.pages_ready_with(s) {
            assert_eq!(plan.page_segment(p), Some(s));
        }
    }
    assert!(std::fs::read(&disk_path).unwrap() == vm.launch_disk);
    let out = applier.finish().unwrap();
    assert_eq!(out.device_state, vm.device_state);
    vm.check_output();
    vm.clear_output();
}

#[test]
fn crafted_overlay_plan_is_exact() {
    let vm = crafted_vm();
    let (bytes, m) = make(&vm, 4);
    let plan = LaunchPlan::new(&m).unwrap();

    // The overlay has what the test is about.
    let kind = |img, i| m.entries[m.find_entry(img, i).unwrap()].kind;
    let ChunkKind::Ref { source, index } = kind(Image::Disk, 20) else {
        panic!(
            "disk chunk 20 is not a reference: {:?}",
            kind(Image::Disk, 20)
        );
    };
    assert_eq!((source, index), (ChunkSource::LaunchMem, 25));
    let ChunkKind::Payload { segment: s25, .. } = kind(Image::Mem, 25) else {
        panic!("memory page 25 has no payload");
    };
    let disk_payload_segments: Vec<u32> = m
        .entries
        .iter()
        .filter(|e| e.image == Image::Disk)
        .filter_map(|e| match e.kind {
            ChunkKind::Payload { segment, .. } => Some(segment),
            _ => None,
        })
        .collect();
    assert!(!disk_payload_segments.contains(&s25));
    assert!(plan.disk_segments.contains(&s25), "{plan:?}");
    assert!(plan.pages_ready_with(s25).contains(&25));
    assert_eq!(plan.page_segment(70), Some(plan.page_segment(12).unwrap()));
    for p in [50, 51, 52, 200] {
        assert!(plan.page_is_zero(p));
        assert_eq!(plan.page_segment(p), None);
    }
    for p in [0, 60, 61] {
        assert_eq!(plan.page_segment(p), None);
        assert!(!plan.page_is_zero(p));
    }
    assert!(plan.page_segment(100).is_some());
    // The disk needs some segments, not all: early start gains something.
    assert!(plan.disk_segments.len() + 1 < m.segments.len());

    check_plan(&vm, &bytes, &m, &plan);
}

#[test]
fn random_overlay_plans_are_exact() {
    for seed in 0..12 {
        let vm = random_vm(seed, 40 + seed as usize * 7, 30 + seed as usize * 11, 3, 0);
        let (bytes, m) = make(&vm, 3);
        let plan = LaunchPlan::new(&m).unwrap();
        check_plan(&vm, &bytes, &m, &plan);
    }
}

#[test]
fn disk_with_a_partial_last_chunk() {
    let vm = random_vm(99, 50, 40, 0, 1000);
    let (bytes, m) = make(&vm, 5);
    let plan = LaunchPlan::new(&m).unwrap();
    check_plan(&vm, &bytes, &m, &plan);
}

#[test]
fn chunk_size_other_than_a_page_is_refused() {
    let vm = random_vm(5, 20, 20, 0, 0);
    vm.write();
    let ov = overlay_path(vm.dir.path());
    let mut config = vm.create_config(Codec::default());
    config.chunk_size = 8192;
    create_overlay(&config, &ov).unwrap();
    let bytes = std::fs::read(&ov).unwrap();
    let (_h, m) = read_manifest(&mut &bytes[..]).unwrap();
    assert_eq!(
        LaunchPlan::new(&m),
        Err(cloudlet_overlay::EarlyStartError::ChunkSize { chunk_size: 8192 })
    );
}

/// Early start as the daemon runs it: outputs in place, no base memory copy
/// (`read_memory` reads unchanged pages from the base), segments in
/// `memory_first_order`. After each step every memory page and every disk
/// chunk the plan calls final reads back as the launch state.
fn check_lazy(vm: &Vm, bytes: &[u8], m: &Manifest, plan: &LaunchPlan, spare_disk: bool) {
    let order = plan.memory_first_order();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..m.segments.len() as u32).collect::<Vec<_>>());
    assert_eq!(order[0], m.device_state_segment);
    let mut config = vm.apply_config();
    config.verify_launch_state = false;
    config.in_place = true;
    config.copy_base_memory = false;
    let disk_path = vm.path("out/disk");
    if spare_disk {
        // A copy of the base made ahead of time: used as it is.
        std::fs::write(&disk_path, &vm.base_disk).unwrap();
        config.disk_holds_base = true;
    }
    let applier = Applier::new(m.clone(), &config).unwrap();
    let mut applied = vec![false; m.segments.len()];
    let seg = |i: u32| {
        let r = m.segment_range(i).unwrap();
        &bytes[r.start as usize..r.end as usize]
    };
    let check = |applied: &[bool]| {
        let mut page = vec![0u8; CS];
        for p in 0..plan.pages() {
            if plan.page_segment(p).map_or(true, |s| applied[s as usize]) {
                applier.read_memory(p * CS as u64, &mut page).unwrap();
                let r = p as usize * CS..(p as usize + 1) * CS;
                assert!(page[..] == vm.launch_mem[r], "memory page {p} not final");
            }
        }
        let disk = std::fs::read(&disk_path).unwrap();
        assert_eq!(disk.len(), vm.launch_disk.len());
        for c in 0..disk.len().div_ceil(CS) {
            let r = c * CS..((c + 1) * CS).min(disk.len());
            let ready = plan
                .disk_range_segments(r.start as u64, (r.end - r.start) as u64)
                .all(|s| applied[s as usize]);
            if ready {
                assert!(
                    disk[r.clone()] == vm.launch_disk[r],
                    "disk chunk {c} not final"
                );
            }
        }
    };
    check(&applied);
    for &s in &order {
        applier.apply_segment(s, seg(s)).unwrap();
        applied[s as usize] = true;
        check(&applied);
    }
    // A read across chunks, unaligned, mixing the output and the base.
    let mut buf = vec![0u8; 3 * CS + 100];
    applier.read_memory(9 * CS as u64 + 50, &mut buf).unwrap();
    assert!(buf[..] == vm.launch_mem[9 * CS + 50..12 * CS + 150]);
    // The memory output is not a complete image (only changed chunks).
    let out = applier.finish().unwrap();
    assert_eq!(out.device_state, vm.device_state);
    assert!(std::fs::read(&disk_path).unwrap() == vm.launch_disk);
}

#[test]
fn lazy_disk_and_memory_without_a_base_copy() {
    let vm = crafted_vm();
    vm.write();
    let (bytes, m) = make(&vm, 4);
    let plan = LaunchPlan::new(&m).unwrap();
    check_lazy(&vm, &bytes, &m, &plan, false);
    check_lazy(&vm, &bytes, &m, &plan, true);
    for seed in 0..6 {
        let vm = random_vm(seed, 40 + seed as usize * 7, 30 + seed as usize * 11, 3, 0);
        let (bytes, m) = make(&vm, 3);
        let plan = LaunchPlan::new(&m).unwrap();
        check_lazy(&vm, &bytes, &m, &plan, seed % 2 == 1);
    }
}

#[test]
fn a_spare_disk_is_used_as_it_is_not_copied_over() {
    let vm = crafted_vm();
    vm.write();
    let (bytes, m) = make(&vm, 4);
    // Disk chunk 30 is unchanged (the crafted VM changes 2, 3, 8, 9, 20, 40,
    // 65, 66): mark it in the spare; a base copy would erase the mark.
    assert!(m.find_entry(Image::Disk, 30).is_none());
    let mut spare = vm.base_disk.clone();
    spare[30 * CS..31 * CS].fill(0xee);
    let disk_path = vm.path("out/disk");
    std::fs::write(&disk_path, &spare).unwrap();
    let mut config = vm.apply_config();
    config.verify_launch_state = false;
    config.in_place = true;
    config.disk_holds_base = true;
    let applier = Applier::new(m.clone(), &config).unwrap();
    for s in 0..m.segments.len() as u32 {
        let r = m.segment_range(s).unwrap();
        applier
            .apply_segment(s, &bytes[r.start as usize..r.end as usize])
            .unwrap();
    }
    applier.finish().unwrap();
    let disk = std::fs::read(&disk_path).unwrap();
    assert!(disk[30 * CS..31 * CS].iter().all(|&b| b == 0xee));
    let mut expected = vm.launch_disk.clone();
    expected[30 * CS..31 * CS].fill(0xee);
    assert!(disk == expected);
}
