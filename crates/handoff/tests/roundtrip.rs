//! Encode -> decode gives back the migration stream byte for byte; damaged
//! wire streams are refused with an error, never a panic.

use cloudlet_handoff::synth::{Rng, SynthOptions, SynthStream};
use cloudlet_handoff::{
    BaseMemory, Codec, DecodeStreamError, Decoder, DecoderConfig, Encoder, EncoderConfig, Mode,
    PolicyConfig,
};
use proptest::prelude::*;

fn base_of(s: &SynthStream) -> BaseMemory {
    BaseMemory::new(s.base.clone(), "mem", BaseMemory::content_id(&s.base))
}

fn encode(
    input: &[u8],
    chunks: &[usize],
    config: EncoderConfig,
    base: Option<BaseMemory>,
) -> (Vec<u8>, Encoder) {
    let mut enc = Encoder::new(config, base);
    let mut wire = Vec::new();
    let mut rest = input;
    let mut i = 0;
    while !rest.is_empty() {
        let n = chunks
            .get(i % chunks.len().max(1))
            .copied()
            .unwrap_or(4096)
            .clamp(1, rest.len());
        enc.feed(&rest[..n], &mut wire).unwrap();
        if i % 7 == 3 {
            enc.flush(&mut wire).unwrap();
        }
        rest = &rest[n..];
        i += 1;
    }
    enc.finish(&mut wire).unwrap();
    (wire, enc)
}

fn decode(
    wire: &[u8],
    chunks: &[usize],
    base: Option<BaseMemory>,
) -> Result<Vec<u8>, DecodeStreamError> {
    let mut dec = Decoder::new(DecoderConfig::default(), base);
    let mut out = Vec::new();
    let mut rest = wire;
    let mut i = 0;
    while !rest.is_empty() {
        let n = chunks
            .get(i % chunks.len().max(1))
            .copied()
            .unwrap_or(4096)
            .clamp(1, rest.len());
        dec.feed(&rest[..n], &mut out)?;
        rest = &rest[n..];
        i += 1;
    }
    dec.finish()?;
    Ok(out)
}

fn fixed(codec: Codec, delta: bool) -> EncoderConfig {
    EncoderConfig {
        policy: PolicyConfig::fixed(Mode::new(codec, delta)),
        ..EncoderConfig::default()
    }
}

#[test]
fn every_mode_roundtrips_with_and_without_base() {
    let s = SynthStream::generate(&SynthOptions::default(), 11);
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(9)] {
        for delta in [false, true] {
            for with_base in [false, true] {
                let base = with_base.then(|| base_of(&s));
                let (wire, enc) = encode(
                    &s.bytes,
                    &[1000, 3, 70000],
                    fixed(codec, delta),
                    base.clone(),
                );
                let out = decode(&wire, &[5000, 1, 333], base).unwrap();
                assert!(out == s.bytes, "{codec} delta={delta} base={with_base}");
                let st = enc.stats();
                assert_eq!(st.raw_bytes, s.bytes.len() as u64);
                assert_eq!(st.wire_bytes, wire.len() as u64);
                let pages = st.base_pages
                    + st.base_other_pages
                    + st.dup_pages
                    + st.delta_pages
                    + st.plain_pages;
                assert_eq!(pages, s.pages);
                assert_eq!(st.zero_pages, s.zero_pages);
                if with_base {
                    assert!(st.base_pages > 0 && st.base_other_pages > 0);
                    if delta {
                        assert!(st.delta_pages > 0);
                    }
                } else {
                    assert_eq!(st.base_pages + st.delta_pages, 0);
                }
                assert!(st.dup_pages > 0);
            }
        }
    }
}

#[test]
fn base_makes_the_wire_small() {
    let s = SynthStream::generate(&SynthOptions::default(), 12);
    let base = base_of(&s);
    let (plain, _) = encode(&s.bytes, &[65536], fixed(Codec::Zstd(3), false), None);
    let (with_base, _) = encode(&s.bytes, &[65536], fixed(Codec::Zstd(3), true), Some(base));
    assert!(
        with_base.len() * 2 < plain.len(),
        "{} vs {}",
        with_base.len(),
        plain.len()
    );
}

#[test]
fn adaptive_encoder_roundtrips_and_switches_modes() {
    let s = SynthStream::generate(
        &SynthOptions {
            records_per_iteration: 2000,
            ..SynthOptions::default()
        },
        13,
    );
    let mut config = EncoderConfig {
        batch_bytes: 32 << 10,
        ..EncoderConfig::default()
    };
    config.policy.decide_every = std::time::Duration::ZERO;
    config.policy.sample_every = std::time::Duration::ZERO;
    config.policy.candidates = vec![Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(6)];
    config.policy.initial = Mode::new(Codec::None, false);
    let base = base_of(&s);
    let mut enc = Encoder::new(config, Some(base.clone()));
    enc.report_link_rate(1e6); // a slow link: compression must win
    let mut wire = Vec::new();
    for c in s.bytes.chunks(10_000) {
        enc.feed(c, &mut wire).unwrap();
    }
    let sum = enc.finish(&mut wire).unwrap();
    assert!(sum.stats.samples > 0);
    assert!(sum.stats.mode_switches > 0);
    assert_ne!(sum.final_mode.codec, Codec::None);
    assert_eq!(decode(&wire, &[777], Some(base)).unwrap(), s.bytes);
}

#[test]
fn streams_the_parser_gives_up_on_still_roundtrip() {
    let opts = SynthOptions {
        xbzrle_at: Some(10),
        ..SynthOptions::small()
    };
    let s = SynthStream::generate(&opts, 14);
    let base = base_of(&s);
    let (wire, enc) = encode(
        &s.bytes,
        &[100],
        EncoderConfig::default(),
        Some(base.clone()),
    );
    assert!(enc
        .parse_summary()
        .passthrough
        .as_deref()
        .unwrap()
        .contains("RAM record flags"));
    assert_eq!(decode(&wire, &[100], Some(base)).unwrap(), s.bytes);
    let junk: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let (wire, _) = encode(&junk, &[999], EncoderConfig::default(), None);
    assert_eq!(decode(&wire, &[999], None).unwrap(), junk);
    let (wire, _) = encode(&[], &[1], EncoderConfig::default(), None);
    assert_eq!(decode(&wire, &[1], None).unwrap(), Vec::<u8>::new());
}

#[test]
fn wrong_or_missing_base_is_refused() {
    let s = SynthStream::generate(&SynthOptions::small(), 15);
    let base = base_of(&s);
    let (wire, _) = encode(&s.bytes, &[4096], EncoderConfig::default(), Some(base));
    let err = decode(&wire, &[4096], None).unwrap_err();
    assert!(matches!(err, DecodeStreamError::BaseMismatch(_)), "{err}");
    let mut other = s.base.clone();
    other[0] ^= 1;
    let other = BaseMemory::new(other.clone(), "mem", BaseMemory::content_id(&other));
    let err = decode(&wire, &[4096], Some(other)).unwrap_err();
    assert!(matches!(err, DecodeStreamError::BaseMismatch(_)), "{err}");
}

#[test]
fn corrupted_frame_and_truncation_are_refused() {
    let s = SynthStream::generate(&SynthOptions::small(), 16);
    let base = base_of(&s);
    let (wire, _) = encode(
        &s.bytes,
        &[4096],
        fixed(Codec::Zstd(3), true),
        Some(base.clone()),
    );
    // A bit flipped in the middle of a frame.
    let mut bad = wire.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x10;
    let err = decode(&bad, &[1000], Some(base.clone())).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeStreamError::Checksum { .. }
                | DecodeStreamError::TooLarge { .. }
                | DecodeStreamError::Sequence { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("offset"), "{err}");
    // Cut anywhere: refused at finish (or earlier), never a panic.
    for cut in [0, 10, 70, wire.len() / 3, wire.len() - 1] {
        let err = decode(&wire[..cut], &[1000], Some(base.clone())).unwrap_err();
        assert!(
            matches!(err, DecodeStreamError::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }
    // Bytes after END.
    let mut long = wire.clone();
    long.push(0);
    let err = decode(&long, &[1000], Some(base)).unwrap_err();
    assert!(
        matches!(err, DecodeStreamError::TrailingData { .. }),
        "{err}"
    );
}

#[test]
fn decoder_emits_nothing_of_a_refused_frame() {
    let s = SynthStream::generate(&SynthOptions::small(), 17);
    let config = EncoderConfig {
        batch_bytes: 8192,
        ..fixed(Codec::None, false)
    };
    let (wire, _) = encode(&s.bytes, &[1 << 20], config, None);
    let mut bad = wire.clone();
    let n = bad.len();
    bad[n / 2] ^= 1;
    let mut dec = Decoder::new(DecoderConfig::default(), None);
    let mut out = Vec::new();
    assert!(dec.feed(&bad, &mut out).is_err());
    assert!(
        s.bytes.starts_with(&out),
        "only verified frames are emitted"
    );
    assert!(!out.is_empty() && out.len() < s.bytes.len());
    assert_eq!(dec.feed(&[], &mut out), Err(DecodeStreamError::Failed));
}

#[test]
fn guest_ram_limit_bounds_the_decoder() {
    let s = SynthStream::generate(&SynthOptions::small(), 18);
    let (wire, _) = encode(&s.bytes, &[4096], EncoderConfig::default(), None);
    let mut dec = Decoder::new(
        DecoderConfig {
            max_guest_ram: 4096,
        },
        None,
    );
    let err = dec.feed(&wire, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("allowed"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn synthetic_streams_roundtrip(seed in any::<u64>(), enc_chunk in 1usize..20000, dec_chunk in 1usize..20000, codec in 0u8..4, delta in any::<bool>(), with_base in any::<bool>(), ignore_shared in any::<bool>()) {
        let opts = SynthOptions { ignore_shared, ..SynthOptions::small() };
        let s = SynthStream::generate(&opts, seed);
        let codec = [Codec::None, Codec::Lz4, Codec::Zstd(1), Codec::Zstd(5)][codec as usize];
        let base = with_base.then(|| base_of(&s));
        let config = EncoderConfig { batch_bytes: 16 << 10, ..fixed(codec, delta) };
        let (wire, _) = encode(&s.bytes, &[enc_chunk, 1, 4097], config, base.clone());
        let out = decode(&wire, &[dec_chunk, 3], base).unwrap();
        prop_assert!(out == s.bytes);
    }

    /// Garbage in front of the decoder: an error, never a panic.
    #[test]
    fn garbage_wire_is_refused(data in proptest::collection::vec(any::<u8>(), 0..5000)) {
        prop_assert!(decode(&data, &[97], None).is_err());
    }

    /// Mutated wire streams: an error or the exact stream (a mutation the
    /// checksums cannot see must still not produce a wrong stream).
    #[test]
    fn mutated_wire_never_panics_nor_lies(seed in any::<u64>(), muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let s = SynthStream::generate(&SynthOptions::small(), seed % 8);
        let base = base_of(&s);
        let (wire, _) = encode(&s.bytes, &[3000], fixed(Codec::Lz4, true), Some(base.clone()));
        let mut bad = wire.clone();
        for (at, b) in muts {
            let i = at % bad.len();
            bad[i] = b;
        }
        if let Ok(out) = decode(&bad, &[511], Some(base)) {
            prop_assert!(out == s.bytes);
        }
    }

    /// Garbage migration streams go through the whole pipeline unchanged.
    #[test]
    fn garbage_migration_stream_roundtrips(data in proptest::collection::vec(any::<u8>(), 0..30000), chunk in 1usize..5000) {
        let (wire, _) = encode(&data, &[chunk], EncoderConfig::default(), None);
        prop_assert_eq!(decode(&wire, &[chunk], None).unwrap(), data);
    }
}

/// A fuzz-style loop: many mutations of real-looking input, through both ends.
#[test]
fn fuzz_mutated_migration_streams() {
    let s = SynthStream::generate(&SynthOptions::small(), 99);
    let base = base_of(&s);
    let mut rng = Rng::new(5);
    for round in 0..150 {
        let mut data = s.bytes.clone();
        for _ in 0..=rng.below(4) {
            let i = rng.below(data.len() as u64) as usize;
            match rng.below(3) {
                0 => data[i] = rng.next_u64() as u8,
                1 => data.truncate(i),
                _ => {
                    let n = rng.below(100) as usize;
                    let junk: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                    data.splice(i..i, junk);
                }
            }
            if data.is_empty() {
                break;
            }
        }
        let chunk = 1 + rng.below(9000) as usize;
        let (wire, _) = encode(&data, &[chunk], fixed(Codec::Lz4, true), Some(base.clone()));
        let out = decode(&wire, &[chunk], Some(base.clone())).unwrap();
        assert!(out == data, "round {round}");
    }
}

/// `flush` holds nothing back but an unfinished record: after it, the
/// decoder has rebuilt everything fed so far, up to the last record boundary.
/// And the encoder's buffered state stays bounded by the batch size.
#[test]
fn flush_delivers_everything_but_a_partial_record_and_buffers_stay_bounded() {
    let s = SynthStream::generate(&SynthOptions::default(), 21);
    let base = base_of(&s);
    let config = EncoderConfig {
        batch_bytes: 64 << 10,
        ..EncoderConfig::default()
    };
    let mut enc = Encoder::new(config, Some(base.clone()));
    let mut dec = Decoder::new(DecoderConfig::default(), Some(base));
    let mut rng = Rng::new(3);
    let (mut fed, mut out, mut wire) = (0usize, Vec::new(), Vec::new());
    while fed < s.bytes.len() {
        let n = (1 + rng.below(50_000) as usize).min(s.bytes.len() - fed);
        enc.feed(&s.bytes[fed..fed + n], &mut wire).unwrap();
        fed += n;
        assert!(enc.pending_bytes() < (64 << 10) + 2 * 4096 + 300);
        enc.flush(&mut wire).unwrap();
        assert_eq!(enc.pending_bytes(), 0);
        dec.feed(&wire, &mut out).unwrap();
        wire.clear();
        assert!(s.bytes[..fed].starts_with(&out));
        // At most one RAM record (header + page) is held by the parser.
        assert!(
            fed - out.len() <= 9 + 255 + 4096,
            "{} held back",
            fed - out.len()
        );
    }
    enc.finish(&mut wire).unwrap();
    dec.feed(&wire, &mut out).unwrap();
    dec.finish().unwrap();
    assert!(out == s.bytes);
}
