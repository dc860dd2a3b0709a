#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cloudlet_overlay::fuzzing::decode_segment(data);
});
