#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cloudlet_overlay::{ApplyConfig, Codec, CreateConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const CS: usize = 4096;

/// A base VM and a launch VM on disk, and where apply writes.
pub struct Vm {
    pub dir: tempfile::TempDir,
    pub base_disk: Vec<u8>,
    pub base_mem: Vec<u8>,
    pub launch_disk: Vec<u8>,
    pub launch_mem: Vec<u8>,
    pub device_state: Vec<u8>,
    /// App metadata stored in the manifest.
    pub metadata: Vec<u8>,
}

impl Vm {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self) {
        std::fs::write(self.path("base.disk"), &self.base_disk).unwrap();
        std::fs::write(self.path("base.mem"), &self.base_mem).unwrap();
        std::fs::write(self.path("launch.disk"), &self.launch_disk).unwrap();
        std::fs::write(self.path("launch.mem"), &self.launch_mem).unwrap();
        std::fs::create_dir_all(self.path("out")).unwrap();
    }

    pub fn create_config(&self, codec: Codec) -> CreateConfig {
        let mut c = CreateConfig::new(
            self.path("base.disk"),
            self.path("base.mem"),
            self.path("launch.disk"),
            self.path("launch.mem"),
            self.device_state.clone(),
            "base-1",
        );
        c.codec = codec;
        c.metadata = self.metadata.clone();
        c.segment_size = 16 * CS as u32;
        c
    }

    pub fn apply_config(&self) -> ApplyConfig {
        ApplyConfig::new(
            self.path("base.disk"),
            self.path("base.mem"),
            self.path("out/disk"),
            self.path("out/mem"),
        )
    }

    pub fn out_is_empty(&self) -> bool {
        std::fs::read_dir(self.path("out"))
            .unwrap()
            .next()
            .is_none()
    }

    pub fn check_output(&self) {
        let disk = std::fs::read(self.path("out/disk")).unwrap();
        let mem = std::fs::read(self.path("out/mem")).unwrap();
        assert!(disk == self.launch_disk, "disk differs");
        assert!(mem == self.launch_mem, "memory differs");
    }

    pub fn clear_output(&self) {
        for e in std::fs::read_dir(self.path("out")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
    }
}

fn fill_chunk(rng: &mut StdRng, c: &mut [u8]) {
    match rng.gen_range(0..4) {
        0 => c.fill(0),
        1 => rng.fill(c),
        2 => {
            // Text-like, compressible.
            for b in c.iter_mut() {
                *b = b"the quick brown fox jumps over "[rng.gen_range(0..31)];
            }
        }
        _ => {
            let v = rng.gen();
            c.fill(v);
            c[rng.gen_range(0..c.len())] = rng.gen();
        }
    }
}

/// A random base and a launch derived from it by random mutations.
pub fn random_vm(seed: u64, disk_chunks: usize, mem_chunks: usize, grow: usize, tail: usize) -> Vm {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut base_disk = vec![0u8; disk_chunks * CS + tail];
    let mut base_mem = vec![0u8; mem_chunks * CS];
    for c in base_disk.chunks_mut(CS) {
        fill_chunk(&mut rng, c);
    }
    for c in base_mem.chunks_mut(CS) {
        fill_chunk(&mut rng, c);
    }
    let mut launch_disk = base_disk.clone();
    launch_disk.resize(base_disk.len() + grow * CS, 0);
    let mut launch_mem = base_mem.clone();
    let nd = launch_disk.len().div_ceil(CS);
    let nm = mem_chunks;
    let mutations = rng.gen_range(0..(nd + nm) / 2 + 1);
    for _ in 0..mutations {
        let op = rng.gen_range(0..6);
        if op == 5 {
            // Duplicate a launch chunk (disk or memory) into memory.
            if nm == 0 {
                continue;
            }
            let k = rng.gen_range(0..nm) * CS;
            let chunk = if rng.gen_bool(0.5) {
                let j = rng.gen_range(0..nm) * CS;
                launch_mem[j..j + CS].to_vec()
            } else {
                let j = rng.gen_range(0..launch_disk.len() / CS) * CS;
                launch_disk[j..j + CS].to_vec()
            };
            launch_mem[k..k + CS].copy_from_slice(&chunk);
            continue;
        }
        let to_mem = rng.gen_bool(0.6) && nm > 0;
        let (img, n) = if to_mem {
            (&mut launch_mem, nm)
        } else {
            (&mut launch_disk, nd)
        };
        let i = rng.gen_range(0..n);
        let start = i * CS;
        let end = (start + CS).min(img.len());
        let full = end - start == CS;
        match op {
            0 => img[start..end].fill(0),
            1 if full && disk_chunks > 0 => {
                // Page cache: a base disk block in memory.
                let j = rng.gen_range(0..disk_chunks) * CS;
                img[start..end].copy_from_slice(&base_disk[j..j + CS]);
            }
            2 if full && nm > 0 => {
                let j = rng.gen_range(0..nm) * CS;
                img[start..end].copy_from_slice(&base_mem[j..j + CS]);
            }
            3 => {
                for _ in 0..rng.gen_range(1..20) {
                    let k = rng.gen_range(start..end);
                    img[k] = rng.gen();
                }
            }
            _ => fill_chunk(&mut rng, &mut img[start..end]),
        }
    }
    let mut device_state = vec![0u8; rng.gen_range(0..20_000)];
    for (i, b) in device_state.iter_mut().enumerate() {
        *b = (i % 7) as u8 ^ rng.gen_range(0..2);
    }
    Vm {
        dir: tempfile::tempdir().unwrap(),
        base_disk,
        base_mem,
        launch_disk,
        launch_mem,
        device_state,
        metadata: br#"{"name":"app","ports":[8080],"health_path":"/health"}"#.to_vec(),
    }
}

pub fn overlay_path(dir: &Path) -> PathBuf {
    dir.join("overlay.clo")
}
