mod common;

use cloudlet_overlay::{
    apply_overlay, apply_overlay_from_reader, create_overlay, inspect, read_manifest, verify,
    Applier, ApplyOverlayError, BaseImages, Codec, VerifyOverlayError,
};
use common::{overlay_path, random_vm, Vm};
use proptest::prelude::*;

fn roundtrip(vm: &Vm, codec: Codec) {
    vm.write();
    let ov = overlay_path(vm.dir.path());
    let stats = create_overlay(&vm.create_config(codec), &ov).unwrap();
    assert_eq!(stats.overlay_bytes, std::fs::metadata(&ov).unwrap().len());
    let out = apply_overlay(&ov, &vm.apply_config()).unwrap();
    assert_eq!(out.device_state, vm.device_state);
    vm.check_output();
    let info = inspect(&ov).unwrap();
    assert_eq!(info.chunks, stats.chunks);
    assert_eq!(info.launch_hash, stats.launch_hash);
    assert_eq!(info.metadata, vm.metadata);
    assert_eq!(info.metadata_len, vm.metadata.len() as u64);
    assert_eq!(
        info.metadata_text,
        String::from_utf8(vm.metadata.clone()).ok()
    );
    vm.clear_output();
    let file = std::fs::File::open(&ov).unwrap();
    let out = apply_overlay_from_reader(std::io::BufReader::new(file), &vm.apply_config()).unwrap();
    assert_eq!(out.device_state, vm.device_state);
    vm.check_output();
    vm.clear_output();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn apply_of_create_is_launch(
        seed in any::<u64>(),
        disk in 1usize..160,
        mem in 0usize..160,
        grow in 0usize..8,
        tail in prop_oneof![Just(0usize), 1usize..4096],
        codec in prop_oneof![
            Just(Codec::XorZstd { level: 3 }),
            Just(Codec::Zstd { level: 1 }),
            Just(Codec::Store),
        ],
        metadata in prop_oneof![
            Just(Vec::new()),
            ("[a-z][a-z0-9 ._-]{0,40}", prop::collection::btree_set(1u16..=u16::MAX, 0..6), prop::option::of("/[a-z0-9/]{0,30}"), prop::option::of(".{0,200}"))
                .prop_map(|(name, ports, health_path, command)| {
                    serde_json::to_vec(&cloudlet_overlay::AppMetadata {
                        name,
                        ports: ports.into_iter().collect(),
                        health_path,
                        command,
                        version: None,
                    })
                    .unwrap()
                }),
        ],
    ) {
        let mut vm = random_vm(seed, disk, mem, grow, tail);
        vm.metadata = metadata;
        roundtrip(&vm, codec);
    }
}

#[test]
fn dedup_kinds_are_found() {
    let mut vm = random_vm(7, 64, 64, 0, 0);
    vm.launch_disk = vm.base_disk.clone();
    vm.launch_mem = vm.base_mem.clone();
    let cs = common::CS;
    // A base disk block in memory (page cache), zeros, a duplicate, an edit.
    let block: Vec<u8> = (0..cs).map(|i| (i * 7 + 1) as u8).collect();
    vm.base_disk[3 * cs..4 * cs].copy_from_slice(&block);
    vm.launch_disk[3 * cs..4 * cs].copy_from_slice(&block);
    vm.launch_mem[5 * cs..6 * cs].copy_from_slice(&block);
    vm.base_mem[6 * cs..7 * cs].fill(0x55);
    vm.launch_mem[6 * cs..7 * cs].fill(0);
    let fresh: Vec<u8> = (0..cs).map(|i| (i * 13 % 251) as u8).collect();
    vm.launch_mem[8 * cs..9 * cs].copy_from_slice(&fresh);
    vm.launch_mem[9 * cs..10 * cs].copy_from_slice(&fresh);
    vm.launch_disk[10 * cs..11 * cs].copy_from_slice(&fresh);
    let mut edited = vm.base_mem[20 * cs..21 * cs].to_vec();
    edited[100] ^= 0xff;
    if edited == fresh || edited.iter().all(|&b| b == 0) {
        edited[200] ^= 0x0f;
    }
    vm.launch_mem[20 * cs..21 * cs].copy_from_slice(&edited);
    vm.write();
    let ov = overlay_path(vm.dir.path());
    let stats = create_overlay(&vm.create_config(Codec::default()), &ov).unwrap();
    assert_eq!(stats.chunks.ref_base_disk.chunks, 1, "{stats:?}");
    assert_eq!(stats.chunks.zero.chunks, 1, "{stats:?}");
    assert_eq!(stats.chunks.ref_self.chunks, 2, "{stats:?}");
    assert_eq!(stats.chunks.delta.chunks, 1, "{stats:?}");
    assert_eq!(stats.chunks.literal.chunks, 1, "{stats:?}");
    apply_overlay(&ov, &vm.apply_config()).unwrap();
    vm.check_output();
    let mut base = BaseImages {
        id: Some("base-1".into()),
        disk: vm.path("base.disk"),
        mem: vm.path("base.mem"),
    };
    verify(&ov, &base).unwrap();
    // Images that are the base, under another id: not this overlay's base.
    base.id = Some("base-2".into());
    let err = verify(&ov, &base).unwrap_err().to_string();
    assert_eq!(err, "Overlay is for base base-1, this base is base-2");
}

#[test]
fn wrong_base_is_refused() {
    let vm = random_vm(11, 32, 32, 0, 0);
    vm.write();
    let ov = overlay_path(vm.dir.path());
    create_overlay(&vm.create_config(Codec::default()), &ov).unwrap();
    // Change a base chunk that the launch left alone.
    let mut other = vm.base_mem.clone();
    let i = (0..32)
        .find(|&i| {
            let r = i * common::CS..(i + 1) * common::CS;
            vm.base_mem[r.clone()] == vm.launch_mem[r]
        })
        .expect("an unchanged chunk");
    other[i * common::CS] ^= 1;
    std::fs::write(vm.path("base.mem"), &other).unwrap();
    let err = apply_overlay(&ov, &vm.apply_config()).unwrap_err();
    assert!(
        matches!(
            err,
            ApplyOverlayError::LaunchImageHashMismatch { .. }
                | ApplyOverlayError::BaseChunkMismatch { .. }
                | ApplyOverlayError::ChunkHashMismatch { .. }
        ),
        "{err}"
    );
    assert!(vm.out_is_empty());
    let base = BaseImages {
        id: Some("base-1".into()),
        disk: vm.path("base.disk"),
        mem: vm.path("base.mem"),
    };
    let err = verify(&ov, &base).unwrap_err();
    assert!(
        matches!(err, VerifyOverlayError::BaseMismatch { .. }),
        "{err}"
    );
}

#[test]
fn applier_takes_segments_in_any_order() {
    let vm = random_vm(3, 100, 100, 2, 0);
    vm.write();
    let ov = overlay_path(vm.dir.path());
    let mut config = vm.create_config(Codec::default());
    config.segment_size = 2 * common::CS as u32;
    create_overlay(&config, &ov).unwrap();
    let bytes = std::fs::read(&ov).unwrap();
    let (_h, m) = read_manifest(&mut &bytes[..]).unwrap();
    let n = m.segments.len() as u32;
    assert!(n > 2, "want several segments, got {n}");
    let seg = |i: u32| {
        let r = m.segment_range(i).unwrap();
        bytes[r.start as usize..r.end as usize].to_vec()
    };

    // Missing segment: finish refuses, nothing left behind.
    let a = Applier::new(m.clone(), &vm.apply_config()).unwrap();
    for i in 1..n {
        a.apply_segment(i, &seg(i)).unwrap();
    }
    let err = a.finish().unwrap_err();
    assert!(
        matches!(err, ApplyOverlayError::MissingSegments { ref missing } if missing == &[0]),
        "{err}"
    );
    assert!(vm.out_is_empty());

    // Duplicate segment.
    let a = Applier::new(m.clone(), &vm.apply_config()).unwrap();
    a.apply_segment(1, &seg(1)).unwrap();
    let err = a.apply_segment(1, &seg(1)).unwrap_err();
    assert!(
        matches!(err, ApplyOverlayError::DuplicateSegment { segment: 1 }),
        "{err}"
    );
    drop(a);
    assert!(vm.out_is_empty());

    // A segment that arrives damaged (a flipped byte, a short read) is
    // refused without effect: the applier takes it again, intact, and
    // finishes. A segment that fails to decode poisons it.
    let a = Applier::new(m.clone(), &vm.apply_config()).unwrap();
    let mut bad = seg(1);
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    let err = a.apply_segment(1, &bad).unwrap_err();
    assert!(
        matches!(err, ApplyOverlayError::SegmentHashMismatch { segment: 1 }),
        "{err}"
    );
    assert!(err.may_heal_on_refetch());
    let err = a.apply_segment(1, &bad[1..]).unwrap_err();
    assert!(
        matches!(err, ApplyOverlayError::SegmentLength { segment: 1, .. }),
        "{err}"
    );
    assert!(err.may_heal_on_refetch());
    for i in 0..n {
        a.apply_segment(i, &seg(i)).unwrap();
    }
    let out = a.finish().unwrap();
    assert_eq!(out.device_state, vm.device_state);
    vm.check_output();
    vm.clear_output();
    let a = Applier::new(m.clone(), &vm.apply_config()).unwrap();
    let err = a.apply_segment(n + 3, &seg(1)).unwrap_err();
    assert!(!err.may_heal_on_refetch(), "{err}");
    assert!(matches!(
        a.apply_segment(1, &seg(1)).unwrap_err(),
        ApplyOverlayError::Poisoned
    ));
    drop(a);
    assert!(vm.out_is_empty());

    // Reverse order works.
    let a = Applier::new(m.clone(), &vm.apply_config()).unwrap();
    for i in (0..n).rev() {
        a.apply_segment(i, &seg(i)).unwrap();
    }
    let out = a.finish().unwrap();
    assert_eq!(out.device_state, vm.device_state);
    vm.check_output();
}

#[test]
fn mismatched_sizes_are_refused() {
    let mut vm = random_vm(5, 8, 8, 0, 0);
    vm.launch_mem.truncate(4 * common::CS);
    vm.write();
    let ov = overlay_path(vm.dir.path());
    let err = create_overlay(&vm.create_config(Codec::default()), &ov).unwrap_err();
    assert!(err.to_string().starts_with("Launch memory"), "{err}");
    assert!(!ov.exists());
}

#[test]
fn metadata_is_bounded_and_kept() {
    let mut vm = random_vm(13, 8, 8, 0, 0);
    let head = br#"{"name":"x","ports":[],"command":""#;
    let mut meta = head.to_vec();
    meta.resize(cloudlet_overlay::format::MAX_METADATA_LEN - 2, b'x');
    meta.extend_from_slice(br#""}"#);
    vm.metadata = meta;
    vm.write();
    let ov = overlay_path(vm.dir.path());
    create_overlay(&vm.create_config(Codec::default()), &ov).unwrap();
    let info = inspect(&ov).unwrap();
    assert_eq!(info.metadata, vm.metadata);
    assert!(
        info.to_string().contains(r#"app metadata     {"name":"x""#),
        "{info}"
    );
    std::fs::remove_file(&ov).unwrap();
    vm.metadata.insert(head.len(), b'x');
    let err = create_overlay(&vm.create_config(Codec::default()), &ov).unwrap_err();
    assert!(err.to_string().contains("metadata"), "{err}");
    assert!(!ov.exists());
    // Metadata every reader would refuse is not written either.
    vm.metadata = br#"{"name":"x","ports":[0]}"#.to_vec();
    let err = create_overlay(&vm.create_config(Codec::default()), &ov).unwrap_err();
    assert!(err.to_string().contains("port 0"), "{err}");
    assert!(!ov.exists());
}

#[test]
fn large_segments_use_long_distance_matching_and_roundtrip() {
    // Segments over 1 MiB are compressed with a segment-sized window and
    // long-distance matching: the reader must take them.
    let mut vm = random_vm(21, 700, 700, 0, 0);
    // 2.4 MiB of fresh, somewhat compressible memory, with far repeats.
    let mut x: u64 = 1;
    for (i, b) in vm.launch_mem[..600 * common::CS].iter_mut().enumerate() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = if i % 3 == 0 {
            (x >> 59) as u8
        } else {
            b'a' + (i % 23) as u8
        };
    }
    let far = vm.launch_mem[..64 * common::CS].to_vec();
    vm.launch_mem[500 * common::CS + 100..564 * common::CS + 100].copy_from_slice(&far);
    vm.write();
    let ov = overlay_path(vm.dir.path());
    let mut config = vm.create_config(Codec::default());
    config.segment_size = cloudlet_overlay::DEFAULT_SEGMENT_SIZE;
    let stats = create_overlay(&config, &ov).unwrap();
    assert!(stats.payload_raw_bytes > 1 << 20, "{stats:?}");
    apply_overlay(&ov, &vm.apply_config()).unwrap();
    vm.check_output();
}

#[test]
fn sparse_base_disk_applies() {
    // A base disk that is mostly a hole (as a real one is): the launch hash
    // skips the holes without reading them, and the result is the same.
    let mut vm = random_vm(31, 4, 16, 0, 0);
    let cs = common::CS;
    vm.base_disk = vec![0u8; 1024 * cs];
    vm.base_disk[700 * cs..701 * cs].fill(7);
    vm.launch_disk = vm.base_disk.clone();
    vm.launch_disk[3 * cs] = 1;
    vm.launch_disk[900 * cs..901 * cs].fill(9);
    vm.write();
    // Rewrite the base disk sparse: a hole but for one block.
    let f = std::fs::File::create(vm.path("base.disk")).unwrap();
    f.set_len(vm.base_disk.len() as u64).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &f,
        &vm.base_disk[700 * cs..701 * cs],
        700 * cs as u64,
    )
    .unwrap();
    drop(f);
    let ov = overlay_path(vm.dir.path());
    create_overlay(&vm.create_config(Codec::default()), &ov).unwrap();
    apply_overlay(&ov, &vm.apply_config()).unwrap();
    vm.check_output();
}
