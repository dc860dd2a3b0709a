//! Small real overlays for the tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cloudlet_overlay::{create_overlay, CreateConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CS: usize = 4096;

/// Writes a base and a launch VM under `dir` and creates an overlay of them
/// at `dir/NAME`; returns its path. Several segments, mixed content.
pub fn make_overlay(dir: &Path, name: &str, seed: u64) -> PathBuf {
    make_overlay_sized(dir, name, seed, 0)
}

/// As [`make_overlay`], with `extra_chunks` chunks of random data appended
/// to the launch disk (about 4 KiB of overlay each).
pub fn make_overlay_sized(dir: &Path, name: &str, seed: u64, extra_chunks: usize) -> PathBuf {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut base_disk = vec![0u8; 48 * CS];
    let mut base_mem = vec![0u8; 32 * CS];
    for (i, c) in base_disk.chunks_mut(CS).enumerate() {
        c.fill(i as u8);
    }
    rng.fill(&mut base_mem[..]);
    let mut launch_disk = base_disk.clone();
    launch_disk.resize(base_disk.len() + 8 * CS, 0);
    let grown = launch_disk.len();
    launch_disk.resize(grown + extra_chunks * CS, 0);
    rng.fill(&mut launch_disk[grown..]);
    let mut launch_mem = base_mem.clone();
    for _ in 0..24 {
        let i = rng.gen_range(0..launch_disk.len() / CS);
        rng.fill(&mut launch_disk[i * CS..i * CS + CS / 2]);
        let j = rng.gen_range(0..launch_mem.len() / CS);
        launch_mem[j * CS..(j + 1) * CS].fill(rng.gen());
    }
    let files = [
        ("base.disk", &base_disk),
        ("base.mem", &base_mem),
        ("launch.disk", &launch_disk),
        ("launch.mem", &launch_mem),
    ];
    let vm = dir.join(format!("{name}.vm"));
    std::fs::create_dir_all(&vm).unwrap();
    for (f, data) in files {
        std::fs::write(vm.join(f), data).unwrap();
    }
    let mut device_state = vec![0u8; 3000];
    rng.fill(&mut device_state[..]);
    let mut config = CreateConfig::new(
        vm.join("base.disk"),
        vm.join("base.mem"),
        vm.join("launch.disk"),
        vm.join("launch.mem"),
        device_state,
        format!("base-{seed}"),
    );
    config.segment_size = if extra_chunks > 0 {
        1 << 20
    } else {
        4 * CS as u32
    };
    let out = dir.join(name);
    create_overlay(&config, &out).unwrap();
    out
}
