//! Every truncated or bit-flipped overlay is refused with an error, never a
//! panic, and never leaves output files behind.

mod common;

use std::sync::OnceLock;

use cloudlet_overlay::{
    apply_overlay, apply_overlay_from_reader, create_overlay, format, inspect, Codec,
};
use common::{overlay_path, random_vm, Vm};
use proptest::prelude::*;

struct Fixture {
    vm: Vm,
    overlay: Vec<u8>,
}

/// One small overlay with every chunk kind and several segments.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut vm = random_vm(42, 24, 24, 1, 0);
        let cs = common::CS;
        for i in 0..12 {
            vm.launch_mem[i * cs + 5] ^= 0x5a; // small edits: delta
            vm.launch_disk[i * cs + 9] = vm.launch_disk[i * cs + 9].wrapping_add(1);
        }
        vm.launch_mem[12 * cs..14 * cs].fill(0); // zeros
        let block = vm.base_disk[..cs].to_vec();
        vm.launch_mem[14 * cs..15 * cs].copy_from_slice(&block); // base disk ref
        let first = vm.launch_mem[..cs].to_vec();
        vm.launch_mem[15 * cs..16 * cs].copy_from_slice(&first); // self ref
        vm.write();
        let ov = overlay_path(vm.dir.path());
        let mut config = vm.create_config(Codec::default());
        config.segment_size = 2 * common::CS as u32;
        create_overlay(&config, &ov).unwrap();
        let overlay = std::fs::read(&ov).unwrap();
        Fixture { vm, overlay }
    })
}

/// Applies `bytes` through the file and the reader paths; both must fail and
/// leave nothing behind.
fn refused(bytes: &[u8], what: &str) -> Result<(), TestCaseError> {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.clo");
    std::fs::write(&path, bytes).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut config = f.vm.apply_config();
    config.out_disk = out.path().join("disk");
    config.out_mem = out.path().join("mem");
    let r = apply_overlay(&path, &config);
    prop_assert!(r.is_err(), "{what}: apply accepted a corrupted overlay");
    let msg = r.unwrap_err().to_string();
    prop_assert!(
        msg.starts_with(|c: char| c.is_uppercase()),
        "{what}: message {msg:?}"
    );
    prop_assert!(
        std::fs::read_dir(out.path()).unwrap().next().is_none(),
        "{what}: output left behind"
    );
    let r = apply_overlay_from_reader(bytes, &config);
    prop_assert!(
        r.is_err(),
        "{what}: streaming apply accepted a corrupted overlay"
    );
    prop_assert!(
        std::fs::read_dir(out.path()).unwrap().next().is_none(),
        "{what}: output left behind by the streaming apply"
    );
    Ok(())
}

#[test]
fn intact_fixture_applies() {
    let f = fixture();
    let ov = overlay_path(f.vm.dir.path());
    let dir = tempfile::tempdir().unwrap();
    let mut config = f.vm.apply_config();
    config.out_disk = dir.path().join("disk");
    config.out_mem = dir.path().join("mem");
    apply_overlay(&ov, &config).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("mem")).unwrap(),
        f.vm.launch_mem
    );
    let info = inspect(&ov).unwrap();
    assert!(info.segments > 3, "{info}");
}

#[test]
fn every_truncation_is_refused() {
    let f = fixture();
    let (header, manifest) = format::parse_prefix(&f.overlay).unwrap();
    // Every length in the header and manifest, then every segment boundary
    // and a stride through the segments.
    let mut cuts: Vec<usize> = (0..header.manifest_range().end as usize).collect();
    for i in 0..manifest.segments.len() as u32 {
        let r = manifest.segment_range(i).unwrap();
        cuts.extend([r.start as usize, r.start as usize + 1, r.end as usize - 1]);
    }
    cuts.extend((0..f.overlay.len()).step_by(97));
    cuts.retain(|&c| c < f.overlay.len());
    cuts.sort();
    cuts.dedup();
    for cut in cuts {
        refused(&f.overlay[..cut], &format!("truncated at {cut}")).unwrap();
    }
    // Trailing data too.
    let mut longer = f.overlay.clone();
    longer.push(0);
    refused(&longer, "one byte appended").unwrap();
}

#[test]
fn truncation_names_the_offset() {
    let f = fixture();
    let cut = f.overlay.len() - 10;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.clo");
    std::fs::write(&path, &f.overlay[..cut]).unwrap();
    let err = inspect(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("Overlay truncated at byte {cut}, in segment ")),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_bit_flip_is_refused(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let f = fixture();
        let mut bytes = f.overlay.clone();
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        refused(&bytes, &format!("bit {bit} of byte {i} flipped"))?;
    }

    #[test]
    fn random_prefixes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = format::parse_prefix(&bytes);
        let _ = format::Manifest::decode(&bytes);
    }
}
