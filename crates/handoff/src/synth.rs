//! Synthetic QEMU-like migration streams, for tests, fuzzing and benchmarks.
//!
//! The generator writes what QEMU 7.2 writes for a precopy migration of a
//! `pc` machine: header, configuration, RAM setup with the block list, RAM
//! iterations of zero and page records (with QEMU's `CONTINUE` rule), device
//! sections, EOF and the JSON description. It also returns the "base memory"
//! the pages were derived from, so that codec tests can exercise base refs,
//! deltas and duplicates.

use crate::stream::{ram_flag, section, write_ram_header, PAGE_SIZE};
use cloudlet_qemu_format::command;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// `(ramblock id, length)`; the first block is the one the base describes.
    pub blocks: Vec<(String, u64)>,
    /// Number of PART sections (precopy iterations) before END.
    pub iterations: usize,
    /// RAM records per iteration.
    pub records_per_iteration: usize,
    /// Write the `x-ignore-shared` capability and per-block addresses.
    pub ignore_shared: bool,
    /// Send an OPEN_RETURN_PATH command after the configuration.
    pub return_path: bool,
    /// Replace the n-th RAM record by an XBZRLE record (unknown to the parser).
    pub xbzrle_at: Option<usize>,
    /// Bytes of device state after the RAM END section.
    pub device_bytes: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            blocks: vec![
                ("mem".into(), 4 << 20),
                ("pc.bios".into(), 256 << 10),
                ("/rom@etc/acpi/tables".into(), 128 << 10),
            ],
            iterations: 3,
            records_per_iteration: 300,
            ignore_shared: false,
            return_path: true,
            xbzrle_at: None,
            device_bytes: 20_000,
        }
    }
}

impl SynthOptions {
    /// A small stream, for tests that run many cases.
    pub fn small() -> Self {
        SynthOptions {
            blocks: vec![("mem".into(), 1 << 20), ("pc.rom".into(), 64 << 10)],
            iterations: 2,
            records_per_iteration: 40,
            device_bytes: 3000,
            ..SynthOptions::default()
        }
    }
}

/// A generated stream and the base memory of its first block.
#[derive(Debug, Clone)]
pub struct SynthStream {
    pub bytes: Vec<u8>,
    pub base: Vec<u8>,
    pub pages: u64,
    pub zero_pages: u64,
}

/// A small deterministic PRNG (splitmix64), so the generator needs no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A page of guest-like content: text, small integers, or random bytes.
pub fn guest_like_page(rng: &mut Rng, page: &mut [u8; PAGE_SIZE]) {
    match rng.below(4) {
        0 => rng.fill(page),
        1 => {
            const WORDS: &[&[u8]] = &[
                b"kernel ",
                b"memory ",
                b"cloudlet ",
                b"page ",
                b"\n",
                b"0x7f ",
            ];
            let mut i = 0;
            while i < PAGE_SIZE {
                let w = WORDS[rng.below(WORDS.len() as u64) as usize];
                let n = w.len().min(PAGE_SIZE - i);
                page[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        }
        2 => {
            for c in page.chunks_mut(8) {
                c.copy_from_slice(&(rng.below(1000)).to_le_bytes());
            }
        }
        _ => {
            page.fill(0);
            let n = rng.below(64) as usize;
            rng.fill(&mut page[..n]);
        }
    }
}

impl SynthStream {
    pub fn generate(opts: &SynthOptions, seed: u64) -> SynthStream {
        let mut rng = Rng::new(seed);
        let base_len = opts.blocks.first().map(|b| b.1).unwrap_or(0) as usize;
        let mut base = vec![0u8; base_len];
        for chunk in base.chunks_mut(PAGE_SIZE) {
            if rng.below(3) > 0 {
                let mut p = [0u8; PAGE_SIZE];
                guest_like_page(&mut rng, &mut p);
                chunk.copy_from_slice(&p[..chunk.len()]);
            }
        }
        let mut out = Vec::new();
        let ram_id: u32 = 2;
        out.extend_from_slice(&cloudlet_qemu_format::stream_header());
        out.push(section::CONFIGURATION);
        let machine = b"pc-i440fx-7.2";
        out.extend_from_slice(&(machine.len() as u32).to_be_bytes());
        out.extend_from_slice(machine);
        if opts.ignore_shared {
            out.push(section::SUBSECTION);
            let name = b"configuration/capabilities";
            out.push(name.len() as u8);
            out.extend_from_slice(name);
            out.extend_from_slice(&1u32.to_be_bytes());
            out.extend_from_slice(&1u32.to_be_bytes());
            out.push(15);
            out.extend_from_slice(b"x-ignore-shared");
        }
        if opts.return_path {
            out.push(section::COMMAND);
            out.extend_from_slice(&command::OPEN_RETURN_PATH.to_be_bytes());
            out.extend_from_slice(&0u16.to_be_bytes());
        }
        // RAM setup.
        section_header(&mut out, section::START, ram_id, Some("ram"));
        let total: u64 = opts.blocks.iter().map(|b| b.1).sum();
        out.extend_from_slice(&(total | ram_flag::MEM_SIZE).to_be_bytes());
        for (i, (id, len)) in opts.blocks.iter().enumerate() {
            out.push(id.len() as u8);
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            if opts.ignore_shared {
                out.extend_from_slice(&((i as u64) << 32).to_be_bytes());
            }
        }
        out.extend_from_slice(&ram_flag::EOS.to_be_bytes());
        footer(&mut out, ram_id);

        let mut last_block: Option<usize> = None;
        let mut sent: Vec<[u8; PAGE_SIZE]> = Vec::new();
        let (mut pages, mut zero_pages) = (0u64, 0u64);
        let mut record = 0usize;
        for it in 0..=opts.iterations {
            let kind = if it == opts.iterations {
                section::END
            } else {
                section::PART
            };
            section_header(&mut out, kind, ram_id, None);
            for _ in 0..opts.records_per_iteration {
                let b = if rng.below(10) < 8 || opts.blocks.len() < 2 {
                    0
                } else {
                    rng.below(opts.blocks.len() as u64) as usize
                };
                let (id, len) = &opts.blocks[b];
                let offset = rng.below(len / PAGE_SIZE as u64) * PAGE_SIZE as u64;
                let continued = last_block == Some(b);
                if Some(record) == opts.xbzrle_at {
                    write_ram_header(&mut out, id, offset, ram_flag::XBZRLE, continued);
                    out.extend_from_slice(&[0, 0, 3, 1, 2, 3]);
                }
                record += 1;
                last_block = Some(b);
                if rng.below(5) == 0 {
                    write_ram_header(&mut out, id, offset, ram_flag::ZERO, continued);
                    out.push(0);
                    zero_pages += 1;
                    continue;
                }
                let mut page = [0u8; PAGE_SIZE];
                let o = offset as usize;
                let from_base = b == 0 && o + PAGE_SIZE <= base.len();
                match rng.below(6) {
                    0 | 1 if from_base => page.copy_from_slice(&base[o..o + PAGE_SIZE]),
                    2 if from_base => {
                        page.copy_from_slice(&base[o..o + PAGE_SIZE]);
                        for _ in 0..rng.below(20) + 1 {
                            let i = rng.below(PAGE_SIZE as u64) as usize;
                            page[i] = page[i].wrapping_add(1 + rng.below(200) as u8);
                        }
                    }
                    3 if !sent.is_empty() => {
                        page = sent[rng.below(sent.len() as u64) as usize];
                    }
                    4 if base.len() >= PAGE_SIZE => {
                        let p = rng.below((base.len() / PAGE_SIZE) as u64) as usize * PAGE_SIZE;
                        page.copy_from_slice(&base[p..p + PAGE_SIZE]);
                    }
                    _ => guest_like_page(&mut rng, &mut page),
                }
                write_ram_header(&mut out, id, offset, ram_flag::PAGE, continued);
                out.extend_from_slice(&page);
                if sent.len() < 256 {
                    sent.push(page);
                }
                pages += 1;
            }
            out.extend_from_slice(&ram_flag::EOS.to_be_bytes());
            footer(&mut out, ram_id);
        }
        // Device sections: no length, opaque to the parser.
        let mut dev = 0;
        let mut id = ram_id + 1;
        while dev < opts.device_bytes {
            section_header(&mut out, section::FULL, id, Some("virtio-net"));
            let n = (rng.below(4000) as usize + 1).min(opts.device_bytes - dev);
            let start = out.len();
            out.resize(start + n, 0);
            rng.fill(&mut out[start..]);
            footer(&mut out, id);
            dev += n;
            id += 1;
        }
        out.push(section::EOF);
        let json = br#"{"page_size": 4096, "devices": [{"name": "ram"}]}"#;
        out.push(section::VMDESCRIPTION);
        out.extend_from_slice(&(json.len() as u32).to_be_bytes());
        out.extend_from_slice(json);
        SynthStream {
            bytes: out,
            base,
            pages,
            zero_pages,
        }
    }
}

fn section_header(out: &mut Vec<u8>, kind: u8, id: u32, name: Option<&str>) {
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    if let Some(name) = name {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&4u32.to_be_bytes());
    }
}

fn footer(out: &mut Vec<u8>, id: u32) {
    out.push(section::FOOTER);
    out.extend_from_slice(&id.to_be_bytes());
}
