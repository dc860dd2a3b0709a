//! Real QEMU 7.2 migration streams: parsed and rebuilt byte for byte, and a
//! VM freshly restored from its base crosses the wire as a few references.

mod common;

use std::time::Duration;

use cloudlet_handoff::stream::write_event;
use cloudlet_handoff::synth::Rng;
use cloudlet_handoff::{
    BaseMemory, DecodeStreamError, Decoder, DecoderConfig, Encoder, EncoderConfig, StreamParser,
};
use cloudlet_testkit::tiny_base;

fn chunked<'a>(data: &'a [u8], rng: &mut Rng, max: u64) -> Vec<&'a [u8]> {
    let mut v = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (1 + rng.below(max) as usize).min(rest.len());
        v.push(&rest[..n]);
        rest = &rest[n..];
    }
    v
}

fn reparse(data: &[u8], rng: &mut Rng) -> (Vec<u8>, cloudlet_handoff::ParseSummary) {
    let mut p = StreamParser::new();
    let mut out = Vec::with_capacity(data.len());
    for c in chunked(data, rng, 70_000) {
        p.feed(c, &mut |ev| write_event(&ev, &mut out));
    }
    let s = p.finish(&mut |ev| write_event(&ev, &mut out));
    (out, s)
}

fn roundtrip(
    data: &[u8],
    base: Option<BaseMemory>,
    rng: &mut Rng,
) -> (Vec<u8>, cloudlet_handoff::EncodeSummary) {
    let mut enc = Encoder::new(EncoderConfig::default(), base.clone());
    enc.report_link_rate(25e6 / 8.0);
    let mut wire = Vec::new();
    for (i, c) in chunked(data, rng, 200_000).into_iter().enumerate() {
        enc.feed(c, &mut wire).expect("encode");
        if i % 5 == 0 {
            enc.flush(&mut wire).expect("flush");
        }
    }
    let sum = enc.finish(&mut wire).expect("finish");
    assert_eq!(sum.stats.wire_bytes, wire.len() as u64);
    let mut dec = Decoder::new(DecoderConfig::default(), base);
    let mut out = Vec::with_capacity(data.len());
    for c in chunked(&wire, rng, 100_000) {
        dec.feed(c, &mut out).expect("decode");
    }
    dec.finish().expect("complete");
    assert!(out == data, "decoded stream differs");
    (wire, sum)
}

/// The base's own device state is a real x-ignore-shared stream (no pages).
#[tokio::test]
async fn base_state_stream_is_understood() {
    let (_store, base) = tiny_base().await;
    let data = std::fs::read(base.state_path()).unwrap();
    let mut rng = Rng::new(1);
    let (out, sum) = reparse(&data, &mut rng);
    assert!(out == data);
    assert!(sum.ram_complete, "{sum:?}");
    // x-ignore-shared leaves out the shared `mem` block; the ROMs are sent.
    assert!(sum.pages < 1000, "{sum:?}");
    let (_, enc) = roundtrip(&data, Some(common::base_memory(&base)), &mut rng);
    eprintln!("state: {} -> {} bytes", data.len(), enc.stats.wire_bytes);
}

#[tokio::test]
async fn handoff_of_a_vm_restored_from_its_base() {
    let (_store, base) = tiny_base().await;
    let dir = tempfile::tempdir().unwrap();
    let path = common::capture_stream(&base, dir.path(), Duration::from_millis(500), false).await;
    let data = std::fs::read(&path).unwrap();
    let mut rng = Rng::new(2);

    // Parse and re-serialize, in random slices.
    let (out, sum) = reparse(&data, &mut rng);
    assert!(out == data, "re-serialized stream differs");
    assert!(sum.ram_complete, "{sum:?}");
    let ram_pages = sum.pages + sum.zero_pages;
    assert!(ram_pages >= base.manifest.memory_bytes() / 4096, "{sum:?}");
    eprintln!("stream: {} bytes, {sum:?}", data.len());

    // With the base: most pages are references and the wire is tiny.
    let memory = common::base_memory(&base);
    let (wire, s) = roundtrip(&data, Some(memory.clone()), &mut rng);
    let st = &s.stats;
    eprintln!("with base: {st:?}, final mode {}", s.final_mode);
    assert!(
        st.base_pages > 10 * (st.delta_pages + st.plain_pages),
        "{st:?}"
    );
    assert!(st.wire_bytes * 50 < st.raw_bytes, "{st:?}");

    // Without the base: still exact.
    let (_, s2) = roundtrip(&data, None, &mut rng);
    eprintln!("without base: {:?}", s2.stats);
    assert!(s2.stats.wire_bytes > st.wire_bytes);

    // A damaged frame is refused; so is a cut stream.
    let mut bad = wire.clone();
    let at = wire.len() / 2;
    bad[at] ^= 0x01;
    let mut dec = Decoder::new(DecoderConfig::default(), Some(memory.clone()));
    let err = dec.feed(&bad, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeStreamError::Checksum { .. }
                | DecodeStreamError::TooLarge { .. }
                | DecodeStreamError::Sequence { .. }
        ),
        "{err}"
    );
    let mut dec = Decoder::new(DecoderConfig::default(), Some(memory));
    dec.feed(&wire[..wire.len() - 30], &mut Vec::new()).unwrap();
    assert!(matches!(
        dec.finish(),
        Err(DecodeStreamError::Truncated { .. })
    ));
}
