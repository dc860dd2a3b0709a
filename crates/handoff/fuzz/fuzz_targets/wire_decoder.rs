#![no_main]
//! Any handoff wire stream is refused with an error or decoded; never a panic.

use cloudlet_handoff::{BaseMemory, Decoder, DecoderConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let base = BaseMemory::new(vec![0x5au8; 64 * 4096], "mem", [0; 32]);
    let mut dec = Decoder::new(
        DecoderConfig {
            max_guest_ram: 1 << 30,
        },
        Some(base),
    );
    let mut out = Vec::new();
    for c in data.chunks(4096) {
        if dec.feed(c, &mut out).is_err() {
            return;
        }
    }
    let _ = dec.finish();
});
