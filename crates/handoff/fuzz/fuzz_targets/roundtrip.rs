#![no_main]
//! encode -> decode gives back any migration stream, valid or not.

use cloudlet_handoff::{BaseMemory, Decoder, DecoderConfig, Encoder, EncoderConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let base = BaseMemory::new(vec![0u8; 64 * 4096], "mem", [1; 32]);
    let mut enc = Encoder::new(EncoderConfig::default(), Some(base.clone()));
    let mut wire = Vec::new();
    for c in data.chunks(1000) {
        enc.feed(c, &mut wire).expect("encode");
    }
    enc.finish(&mut wire).expect("finish");
    let mut dec = Decoder::new(DecoderConfig::default(), Some(base));
    let mut out = Vec::new();
    dec.feed(&wire, &mut out).expect("decode");
    dec.finish().expect("complete");
    assert_eq!(out, data);
});
