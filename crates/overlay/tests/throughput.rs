//! One measurement of create and apply on a synthetic 512 MiB memory +
//! 256 MiB disk VM. Not a benchmark suite: run it by hand, in release:
//!
//! ```text
//! cargo test --release -p cloudlet-overlay --test throughput -- --ignored --nocapture
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use cloudlet_overlay::{apply_overlay, create_overlay, ApplyConfig, CreateConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CS: usize = 4096;
const MIB: usize = 1 << 20;

fn page(rng: &mut StdRng, kind: u32, buf: &mut [u8]) {
    match kind {
        0 => buf.fill(0),
        1 => rng.fill(buf),
        _ => {
            // Compressible: words from a small vocabulary.
            for w in buf.chunks_mut(8) {
                let v: u64 = rng.gen_range(0..64);
                w.copy_from_slice(&(v * 0x0101_0101).to_le_bytes()[..w.len()]);
            }
        }
    }
}

/// Writes an image, leaving zero pages as holes.
fn write_image(path: &Path, data: &[u8]) {
    let f = File::create(path).unwrap();
    f.set_len(data.len() as u64).unwrap();
    for (i, c) in data.chunks(MIB).enumerate() {
        if c.iter().any(|&b| b != 0) {
            f.write_all_at(c, (i * MIB) as u64).unwrap();
        }
    }
}

#[test]
#[ignore = "measurement: run by hand in release"]
fn apply_throughput_512m_mem_256m_disk() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let mut rng = StdRng::seed_from_u64(1);
    let (disk_len, mem_len) = (256 * MIB, 512 * MIB);
    let mut disk = vec![0u8; disk_len];
    let mut mem = vec![0u8; mem_len];
    // Base: disk half data (runs of files), memory 40% zero pages.
    for c in disk.chunks_mut(64 * CS) {
        let kind = rng.gen_range(0..4);
        for pg in c.chunks_mut(CS) {
            page(&mut rng, kind.min(2), pg);
        }
    }
    for pg in mem.chunks_mut(CS) {
        let k = rng.gen_range(0..10);
        page(&mut rng, if k < 4 { 0 } else { 1 + k % 2 }, pg);
    }
    write_image(&p("base.disk"), &disk);
    write_image(&p("base.mem"), &mem);
    // Launch: 25% of memory pages change, 5% of disk blocks.
    let nd = disk_len / CS;
    for i in 0..mem_len / CS {
        let r = i * CS..(i + 1) * CS;
        match rng.gen_range(0..100) {
            0..=4 => mem[r].fill(0),
            5..=11 => {
                let j = rng.gen_range(0..nd) * CS;
                let src = disk[j..j + CS].to_vec();
                mem[r].copy_from_slice(&src);
            }
            12..=19 => {
                for _ in 0..8 {
                    let k = rng.gen_range(r.clone());
                    mem[k] = rng.gen();
                }
            }
            20..=24 => {
                let kind = 1 + rng.gen_range(0..2);
                page(&mut rng, kind, &mut mem[r])
            }
            _ => {}
        }
    }
    for i in 0..nd {
        if rng.gen_range(0..100) < 5 {
            let r = i * CS..(i + 1) * CS;
            page(&mut rng, 2, &mut disk[r]);
        }
    }
    write_image(&p("launch.disk"), &disk);
    write_image(&p("launch.mem"), &mem);
    let device_state: Vec<u8> = (0..MIB).map(|i| (i % 97) as u8).collect();

    let config = CreateConfig::new(
        p("base.disk"),
        p("base.mem"),
        p("launch.disk"),
        p("launch.mem"),
        device_state.clone(),
        "synthetic",
    );
    let stats = create_overlay(&config, &p("overlay")).unwrap();
    println!("{stats:#?}");
    println!(
        "create: {:.2} s, overlay {:.1} MiB for {:.1} MiB changed",
        stats.create_time.as_secs_f64(),
        stats.overlay_bytes as f64 / MIB as f64,
        stats.changed_bytes as f64 / MIB as f64
    );
    let launch = (disk_len + mem_len) as f64 / MIB as f64;
    // Let the writeback of the images written above finish first: a real
    // base is old and clean.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    for verify in [true, false] {
        for _ in 0..3 {
            let _ = std::fs::remove_file(p("out.disk"));
            let _ = std::fs::remove_file(p("out.mem"));
            let mut ac =
                ApplyConfig::new(p("base.disk"), p("base.mem"), p("out.disk"), p("out.mem"));
            ac.verify_launch_state = verify;
            let t = Instant::now();
            let out = apply_overlay(&p("overlay"), &ac).unwrap();
            let s = t.elapsed().as_secs_f64();
            assert_eq!(out.device_state, device_state);
            println!(
                "apply (verify launch state: {verify}): {s:.3} s, {:.0} MiB/s of launch state",
                launch / s
            );
        }
    }
    assert!(std::fs::read(p("out.mem")).unwrap() == mem);
    assert!(std::fs::read(p("out.disk")).unwrap() == disk);
}
