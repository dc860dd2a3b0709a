//! Runs the fuzz targets' functions over mutations of a real overlay, so the
//! parsers are exercised even where `cargo fuzz` is not installed.

mod common;

use cloudlet_overlay::{create_overlay, format, fuzzing, Codec};
use common::{overlay_path, random_vm};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.gen_range(1..4) {
        if v.is_empty() {
            v.push(rng.gen());
            continue;
        }
        let i = rng.gen_range(0..v.len());
        match rng.gen_range(0..6) {
            0 => v[i] ^= 1 << rng.gen_range(0..8),
            1 => v[i] = [0, 1, 0x7f, 0x80, 0xff][rng.gen_range(0..5)],
            2 => v.truncate(i),
            3 => {
                let b: u8 = rng.gen();
                v.insert(i, b);
            }
            4 => {
                // An interesting 32-bit value, little-endian.
                let x: u32 = [0, 1, 4096, u32::MAX, 1 << 31][rng.gen_range(0..5)];
                let end = (i + 4).min(v.len());
                v[i..end].copy_from_slice(&x.to_le_bytes()[..end - i]);
            }
            _ => {
                let j = rng.gen_range(0..v.len());
                let (a, b) = (i.min(j), i.max(j));
                let part = v[a..b].to_vec();
                v.splice(a..a, part);
            }
        }
    }
    v
}

#[test]
fn parsers_survive_mutated_inputs() {
    let vm = random_vm(9, 40, 40, 1, 100);
    vm.write();
    let ov = overlay_path(vm.dir.path());
    let mut config = vm.create_config(Codec::default());
    config.segment_size = 4 * common::CS as u32;
    create_overlay(&config, &ov).unwrap();
    let bytes = std::fs::read(&ov).unwrap();
    let (header, manifest) = format::parse_prefix(&bytes).unwrap();

    // The raw manifest, behind the prefix the target expects.
    let mut raw = Vec::new();
    raw.extend_from_slice(&manifest.data_offset.to_le_bytes());
    raw.extend_from_slice(&header.file_len.to_le_bytes());
    raw.extend_from_slice(&manifest.encode());
    assert!(
        format::Manifest::from_raw(&raw[16..], manifest.data_offset, header.file_len).is_ok(),
        "the unmutated manifest parses"
    );

    let mut rng = StdRng::seed_from_u64(1);
    let mut accepted = 0;
    for _ in 0..3000 {
        let m = mutate(&mut rng, &raw);
        fuzzing::parse_raw_manifest(&m);
        if m.len() >= 16
            && format::Manifest::from_raw(&m[16..], manifest.data_offset, header.file_len).is_ok()
        {
            accepted += 1;
        }
    }
    // Some mutations (in hashes, say) still parse: the checks past the
    // decoder were reached.
    assert!(
        accepted > 0 && accepted < 3000,
        "{accepted} of 3000 accepted"
    );
    let prefix = &bytes[..header.manifest_range().end as usize];
    for _ in 0..500 {
        fuzzing::parse_prefix(&mutate(&mut rng, prefix));
    }
    for i in 0..manifest.segments.len() as u32 {
        let r = manifest.segment_range(i).unwrap();
        let s = &manifest.segments[i as usize];
        let mut seg = vec![s.codec as u8];
        seg.extend_from_slice(&s.raw_len.to_le_bytes());
        seg.extend_from_slice(&bytes[r.start as usize..r.end as usize]);
        for _ in 0..100 {
            fuzzing::decode_segment(&mutate(&mut rng, &seg));
        }
    }
}
