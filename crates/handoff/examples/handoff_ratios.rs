//! Wire size and throughput of the handoff codec, per mode, on a real QEMU
//! migration stream of a VM freshly restored from its base.
//!
//! ```text
//! cargo run --release -p cloudlet-handoff --example handoff_ratios            # tiny base
//! CLOUDLET_HOME=/tmp/clhome cargo run --release -p cloudlet-handoff --example handoff_ratios -- debian
//! cargo run --release -p cloudlet-handoff --example handoff_ratios -- tiny /path/to/stream
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cloudlet_base::BaseStore;
use cloudlet_handoff::{
    BaseMemory, Codec, Decoder, DecoderConfig, Encoder, EncoderConfig, Mode, PolicyConfig,
};

fn run(data: &[u8], base: Option<BaseMemory>, config: EncoderConfig) -> (u64, f64, f64, String) {
    let t = Instant::now();
    let mut enc = Encoder::new(config, base.clone());
    let index_time = t.elapsed();
    enc.report_link_rate(25e6 / 8.0);
    let mut wire = Vec::new();
    let t = Instant::now();
    for c in data.chunks(256 << 10) {
        enc.feed(c, &mut wire).expect("encode");
    }
    let sum = enc.finish(&mut wire).expect("finish");
    let enc_time = t.elapsed();
    let mut dec = Decoder::new(DecoderConfig::default(), base);
    let mut out = Vec::with_capacity(data.len());
    let t = Instant::now();
    for c in wire.chunks(64 << 10) {
        dec.feed(c, &mut out).expect("decode");
    }
    dec.finish().expect("complete");
    let dec_time = t.elapsed();
    assert!(out == data, "decoded stream differs");
    let mb = data.len() as f64 / 1e6;
    let s = &sum.stats;
    let kinds = format!(
        "zero {} base {} base@ {} dup {} delta {} plain {} (index {:.0} ms, final {})",
        s.zero_pages,
        s.base_pages,
        s.base_other_pages,
        s.dup_pages,
        s.delta_pages,
        s.plain_pages,
        index_time.as_secs_f64() * 1e3,
        sum.final_mode
    );
    (
        wire.len() as u64,
        mb / enc_time.as_secs_f64(),
        mb / dec_time.as_secs_f64(),
        kinds,
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map(String::as_str).unwrap_or("tiny");
    let base = if name == "tiny" {
        cloudlet_testkit::tiny_base().await.1
    } else {
        let home = std::env::var("CLOUDLET_HOME").unwrap_or_else(|_| "/tmp/clhome".into());
        BaseStore::new(home).get(name).expect("base")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = match args.get(2) {
        Some(p) => p.into(),
        None => common::capture_stream(&base, dir.path(), Duration::from_secs(2), false).await,
    };
    let data = std::fs::read(&path).expect("stream");
    let memory = common::base_memory(&base);
    println!(
        "base {name}: {} MiB RAM; migration stream {:.1} MB",
        base.manifest.memory_bytes() >> 20,
        data.len() as f64 / 1e6
    );
    println!(
        "{:<16} {:>5} {:>12} {:>9} {:>10} {:>10}  pages",
        "mode", "base", "wire bytes", "raw/wire", "enc MB/s", "dec MB/s"
    );
    let modes = [
        Codec::None,
        Codec::Lz4,
        Codec::Zstd(1),
        Codec::Zstd(3),
        Codec::Zstd(9),
    ];
    for with_base in [false, true] {
        for codec in modes {
            let mode = Mode::new(codec, with_base);
            let config = EncoderConfig {
                policy: PolicyConfig::fixed(mode),
                ..EncoderConfig::default()
            };
            let b = with_base.then(|| memory.clone());
            let (wire, e, d, kinds) = run(&data, b, config);
            println!(
                "{:<16} {:>5} {:>12} {:>9.1} {:>10.0} {:>10.0}  {kinds}",
                mode.to_string(),
                if with_base { "yes" } else { "no" },
                wire,
                data.len() as f64 / wire as f64,
                e,
                d
            );
        }
    }
    let (wire, e, d, kinds) = run(&data, Some(memory), EncoderConfig::default());
    println!(
        "{:<16} {:>5} {:>12} {:>9.1} {:>10.0} {:>10.0}  {kinds}",
        "adaptive@25Mbit",
        "yes",
        wire,
        data.len() as f64 / wire as f64,
        e,
        d
    );
}
