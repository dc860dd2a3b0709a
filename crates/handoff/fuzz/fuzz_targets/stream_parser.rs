#![no_main]
//! The migration-stream parser re-serializes any input byte for byte,
//! whatever the slicing (the first byte picks the slice size).

use cloudlet_handoff::stream::write_event;
use cloudlet_handoff::StreamParser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&k, input)) = data.split_first() else {
        return;
    };
    let chunk = 1 + k as usize * 37;
    let mut p = StreamParser::new();
    let mut out = Vec::new();
    for c in input.chunks(chunk) {
        p.feed(c, &mut |ev| write_event(&ev, &mut out));
    }
    p.finish(&mut |ev| write_event(&ev, &mut out));
    assert_eq!(out, input);
});
