//! `SegmentFetcher` over real sockets: the project's registry, and a tiny
//! throttled HTTP server with range support written here (slow enough that
//! a demanded segment visibly overtakes the sequential stream).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use common::{partial_content_head, read_range_request, RangeRequest};

use cloudlet_overlay::{create_overlay, CreateConfig, LaunchPlan, Manifest};
use cloudlet_registry::{RegistryConfig, RegistryState, StorageLocation};
use cloudletd::synth::fetch::{
    file_order, FetchConfig, FetchOverlayError, OverlaySource, SegmentFetcher,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;

const CS: usize = 4096;
const TOKEN: &str = "test-token-0123456789";

/// An overlay of mostly new random memory pages (incompressible, so
/// segments are about `segment_chunks` pages each), some new disk chunks and
/// a disk chunk that duplicates a memory page.
fn make_overlay(dir: &Path, seed: u64, mem_pages: usize, segment_chunks: u32) -> PathBuf {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut base_disk = vec![0u8; 64 * CS];
    let mut base_mem = vec![0u8; mem_pages * CS];
    rng.fill(&mut base_disk[..]);
    rng.fill(&mut base_mem[..]);
    let mut launch_mem = base_mem.clone();
    for p in 0..mem_pages {
        if p % 8 != 7 {
            rng.fill(&mut launch_mem[p * CS..(p + 1) * CS]);
        }
    }
    let mut launch_disk = base_disk.clone();
    rng.fill(&mut launch_disk[10 * CS..20 * CS]);
    launch_disk[30 * CS..31 * CS].copy_from_slice(&launch_mem[3 * CS..4 * CS]);
    let mut device_state = vec![0u8; 20_000];
    rng.fill(&mut device_state[..]);
    for (name, data) in [
        ("base.disk", &base_disk),
        ("base.mem", &base_mem),
        ("launch.disk", &launch_disk),
        ("launch.mem", &launch_mem),
    ] {
        std::fs::write(dir.join(name), data).unwrap();
    }
    let mut config = CreateConfig::new(
        dir.join("base.disk"),
        dir.join("base.mem"),
        dir.join("launch.disk"),
        dir.join("launch.mem"),
        device_state,
        "base",
    );
    config.segment_size = segment_chunks * CS as u32;
    let out = dir.join("overlay.clo");
    create_overlay(&config, &out).unwrap();
    out
}

fn manifest_of(file: &Path) -> Manifest {
    let bytes = std::fs::read(file).unwrap();
    cloudlet_overlay::read_manifest(&mut &bytes[..]).unwrap().1
}

/// How the test server misbehaves.
#[derive(Clone, Copy, Default)]
struct Serve {
    /// Bytes per second per response (0: unthrottled).
    rate: u64,
    /// Announce the full length but close the connection after this many
    /// body bytes.
    cut_after: Option<usize>,
}

/// What the test server saw.
#[derive(Default)]
struct Seen {
    /// Ranges asked for, `[start, end)`.
    ranges: Mutex<Vec<(u64, u64)>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
}

/// A minimal HTTP/1.1 server with range support serving `data` at any path
/// but `/missing` (404). One request per connection.
async fn serve(data: Vec<u8>, how: Serve) -> (String, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let data = Arc::new(data);
    let seen = Arc::new(Seen::default());
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let data = data.clone();
            let seen = seen2.clone();
            tokio::spawn(async move {
                let len = data.len() as u64;
                let Some(RangeRequest { text, start, end }) =
                    read_range_request(&mut sock, len).await
                else {
                    return;
                };
                if text.starts_with("get /missing ") {
                    let _ = sock
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                seen.ranges.lock().unwrap().push((start, end));
                if start >= len {
                    let head = format!(
                        "HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{len}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    return;
                }
                let n = seen.active.fetch_add(1, Ordering::SeqCst) + 1;
                seen.max_active.fetch_max(n, Ordering::SeqCst);
                let head = partial_content_head(start, end, len);
                let mut body = &data[start as usize..end as usize];
                if let Some(cut) = how.cut_after {
                    body = &body[..cut.min(body.len())];
                }
                let _ = sock.write_all(head.as_bytes()).await;
                let pieces = body.len().div_ceil(4096);
                let mut active = true;
                for (k, piece) in body.chunks(4096).enumerate() {
                    if let Some(us) = (piece.len() as u64 * 1_000_000).checked_div(how.rate) {
                        tokio::time::sleep(Duration::from_micros(us)).await;
                    }
                    if k + 1 == pieces {
                        // Done before the client can see the end.
                        seen.active.fetch_sub(1, Ordering::SeqCst);
                        active = false;
                    }
                    if sock.write_all(piece).await.is_err() {
                        break;
                    }
                }
                if active {
                    seen.active.fetch_sub(1, Ordering::SeqCst);
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

fn url(url: String) -> OverlaySource {
    OverlaySource::Url(url)
}

/// Receives everything; checks each segment comes once with its bytes.
/// Calls `on_first` after the first segment. Returns the arrival order.
async fn collect(
    f: &mut SegmentFetcher,
    m: &Manifest,
    mut on_first: impl FnMut(&SegmentFetcher),
) -> Vec<u32> {
    let mut got = Vec::new();
    while let Some((i, bytes)) = f.segments.recv().await {
        assert!(!got.contains(&i), "segment {i} delivered twice");
        let info = &m.segments[i as usize];
        assert_eq!(bytes.len() as u64, info.stored_len, "segment {i}");
        assert_eq!(blake3::hash(&bytes).as_bytes(), &info.hash, "segment {i}");
        got.push(i);
        if got.len() == 1 {
            on_first(f);
        }
    }
    got
}

fn data_bytes(m: &Manifest) -> u64 {
    m.segments.iter().map(|s| s.stored_len).sum()
}

#[tokio::test]
async fn registry_natural_order_is_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let file = make_overlay(dir.path(), 1, 64, 4);
    let m = manifest_of(&file);
    let reg_dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = RegistryConfig::new(addr, StorageLocation::Dir(reg_dir.path().to_path_buf()));
    cfg.push_tokens = vec![TOKEN.into()];
    let state = RegistryState::open(&cfg).unwrap();
    tokio::spawn(cloudlet_registry::serve_listener(listener, state));
    let registry = format!("http://{addr}");
    cloudlet_registry::push_overlay(&registry, TOKEN, "app", &file)
        .await
        .unwrap();

    let source = url(format!("{registry}/v1/overlays/app"));
    let (_h, fetched, _end) = source.manifest(&Default::default()).await.unwrap();
    assert_eq!(fetched, m);
    let order = file_order(&m);
    let mut f = SegmentFetcher::start(source, &m, &order, &FetchConfig::default()).unwrap();
    let got = collect(&mut f, &m, |_| {}).await;
    assert_eq!(got, order);
    let c = f.counters.clone();
    f.task.wait().await.unwrap();
    assert_eq!(c.requests.load(Ordering::Relaxed), 1);
    assert_eq!(c.demand_fetches.load(Ordering::Relaxed), 0);
    assert_eq!(c.bytes.load(Ordering::Relaxed), data_bytes(&m));
    assert_eq!(c.delivered_bytes.load(Ordering::Relaxed), data_bytes(&m));
    assert_eq!(c.segments.load(Ordering::Relaxed), m.segments.len() as u32);

    // A name the registry does not have: 404, nothing delivered.
    let source = url(format!("{registry}/v1/overlays/nope"));
    let mut f = SegmentFetcher::start(source, &m, &order, &FetchConfig::default()).unwrap();
    assert!(f.segments.recv().await.is_none());
    let err = f.task.wait().await.unwrap_err();
    assert!(
        matches!(err, FetchOverlayError::Status { status: 404, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn launch_plan_order_is_one_request_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = make_overlay(dir.path(), 2, 128, 4);
    let m = manifest_of(&file);
    let plan = LaunchPlan::new(&m).unwrap();
    assert!(plan.disk_segments.len() >= 2, "{:?}", plan.disk_segments);
    let order = plan.fetch_order.clone();
    assert_ne!(order, file_order(&m));
    let ranges: Vec<_> = order.iter().map(|&s| m.segment_range(s).unwrap()).collect();
    let contiguous_runs = 1 + ranges.windows(2).filter(|w| w[1].start != w[0].end).count();
    let (base, seen) = serve(std::fs::read(&file).unwrap(), Serve::default()).await;
    let config = FetchConfig {
        reopen_gap: 0,
        ..FetchConfig::default()
    };
    let mut f = SegmentFetcher::start(url(format!("{base}/o")), &m, &order, &config).unwrap();
    let got = collect(&mut f, &m, |_| {}).await;
    assert_eq!(got, order);
    let c = f.counters.clone();
    f.task.wait().await.unwrap();
    assert_eq!(c.requests.load(Ordering::Relaxed) as usize, contiguous_runs);
    let asked = seen.ranges.lock().unwrap().clone();
    assert_eq!(asked.len(), contiguous_runs, "{asked:?}");
    assert_eq!(c.bytes.load(Ordering::Relaxed), data_bytes(&m));
}

/// ~1 MiB of segments of ~16 KiB at 1 MB/s per connection.
async fn slow_setup(how: Serve) -> (tempfile::TempDir, Manifest, String, Arc<Seen>) {
    let dir = tempfile::tempdir().unwrap();
    let file = make_overlay(dir.path(), 3, 256, 4);
    let m = manifest_of(&file);
    assert!(m.segments.len() > 40, "{} segments", m.segments.len());
    let (base, seen) = serve(std::fs::read(&file).unwrap(), how).await;
    (dir, m, base, seen)
}

#[tokio::test]
async fn demanded_segments_overtake_the_stream() {
    let (_dir, m, base, seen) = slow_setup(Serve {
        rate: 1_000_000,
        ..Serve::default()
    })
    .await;
    let n = m.segments.len() as u32;
    let order = file_order(&m);
    let mut f = SegmentFetcher::start(
        url(format!("{base}/o")),
        &m,
        &order,
        &FetchConfig::default(),
    )
    .unwrap();
    let late = n - 1;
    let mid = n / 2;
    let demanded = [late, mid, n - 3, n - 5];
    let handle = f.demand.clone();
    let got = collect(&mut f, &m, |f| {
        for s in demanded {
            f.demand.demand(s);
        }
        // Again: no second fetch.
        f.demand.demand(late);
        // Unknown segment: ignored.
        f.demand.demand(n + 10);
    })
    .await;
    let c = f.counters.clone();
    f.task.wait().await.unwrap();
    let pos = |s: u32| got.iter().position(|&x| x == s).unwrap();
    assert_eq!(got.len(), n as usize);
    // All four came long before the stream would have reached them.
    for s in demanded {
        assert!(pos(s) < 12, "segment {s} arrived {}th: {got:?}", pos(s));
        assert!(pos(s) < pos(mid - 10), "{got:?}");
    }
    // The rest came in order.
    let rest: Vec<u32> = got
        .iter()
        .copied()
        .filter(|s| !demanded.contains(s))
        .collect();
    assert!(rest.windows(2).all(|w| w[0] < w[1]), "{rest:?}");
    assert_eq!(c.demand_fetches.load(Ordering::Relaxed), 4);
    // One sequential request (the skipped segments are small: read through),
    // one per demand, each for exactly its segment.
    let asked = seen.ranges.lock().unwrap().clone();
    assert_eq!(asked.len(), 5, "{asked:?}");
    for s in demanded {
        let r = m.segment_range(s).unwrap();
        assert!(asked.contains(&(r.start, r.end)), "{asked:?}");
    }
    // At most two demand fetches at a time, next to the stream.
    assert!(seen.max_active.load(Ordering::SeqCst) <= 3);
    // Skipped segments were read and dropped, except the last one (nothing
    // after it to reach).
    let skipped: u64 = [mid, n - 3, n - 5]
        .iter()
        .map(|&s| m.segments[s as usize].stored_len)
        .sum();
    assert_eq!(c.bytes.load(Ordering::Relaxed), data_bytes(&m) + skipped);
    assert_eq!(c.delivered_bytes.load(Ordering::Relaxed), data_bytes(&m));
    // The handle outlives the fetcher harmlessly.
    assert!(handle.is_claimed(mid));
    handle.demand(0);
}

#[tokio::test]
async fn large_skips_reopen_the_stream() {
    let (_dir, m, base, seen) = slow_setup(Serve {
        rate: 1_000_000,
        ..Serve::default()
    })
    .await;
    let n = m.segments.len() as u32;
    let order = file_order(&m);
    let config = FetchConfig {
        reopen_gap: 0,
        ..FetchConfig::default()
    };
    let target = n / 2;
    let mut f = SegmentFetcher::start(url(format!("{base}/o")), &m, &order, &config).unwrap();
    let got = collect(&mut f, &m, |f| f.demand.demand(target)).await;
    let c = f.counters.clone();
    f.task.wait().await.unwrap();
    assert!(got.iter().position(|&s| s == target).unwrap() < 10);
    // Sequential, demand, sequential again after the skipped segment.
    let asked = seen.ranges.lock().unwrap().clone();
    assert_eq!(asked.len(), 3, "{asked:?}");
    let after = m.segment_range(target + 1).unwrap();
    assert!(asked.contains(&(after.start, m.segment_range(n - 1).unwrap().end)));
    assert_eq!(c.bytes.load(Ordering::Relaxed), data_bytes(&m));
}

#[tokio::test]
async fn truncated_overlays_and_cut_connections_fail() {
    let dir = tempfile::tempdir().unwrap();
    let file = make_overlay(dir.path(), 4, 64, 4);
    let m = manifest_of(&file);
    let order = file_order(&m);
    let full = std::fs::read(&file).unwrap();
    let file_len = full.len() as u64;

    // The file is shorter than the manifest says.
    let short = full[..full.len() - 1000].to_vec();
    let (base, _) = serve(short.clone(), Serve::default()).await;
    let mut f = SegmentFetcher::start(
        url(format!("{base}/o")),
        &m,
        &order,
        &FetchConfig::default(),
    )
    .unwrap();
    let mut delivered = 0;
    while f.segments.recv().await.is_some() {
        delivered += 1;
    }
    assert!(delivered < m.segments.len());
    let err = f.task.wait().await.unwrap_err();
    assert!(
        matches!(err, FetchOverlayError::Truncated { got, expected }
            if got == file_len - 1000 && expected <= file_len),
        "{err}"
    );

    // The connection drops in the middle of the body.
    let (base, _) = serve(
        full.clone(),
        Serve {
            cut_after: Some(50_000),
            ..Serve::default()
        },
    )
    .await;
    let mut f = SegmentFetcher::start(
        url(format!("{base}/o")),
        &m,
        &order,
        &FetchConfig::default(),
    )
    .unwrap();
    while f.segments.recv().await.is_some() {}
    let err = f.task.wait().await.unwrap_err();
    assert!(
        matches!(
            err,
            FetchOverlayError::Read { .. } | FetchOverlayError::Truncated { .. }
        ),
        "{err}"
    );

    // A demand fetch that fails ends the fetcher too (404 for everything).
    let (base, _) = serve(full, Serve::default()).await;
    let mut f = SegmentFetcher::start(
        url(format!("{base}/missing")),
        &m,
        &order,
        &FetchConfig::default(),
    )
    .unwrap();
    f.demand.demand(3);
    while f.segments.recv().await.is_some() {}
    let err = f.task.wait().await.unwrap_err();
    assert!(
        matches!(err, FetchOverlayError::Status { status: 404, .. }),
        "{err}"
    );

    // A local file that is too short.
    let short_file = dir.path().join("short.clo");
    std::fs::write(&short_file, &short).unwrap();
    let mut f = SegmentFetcher::start(
        OverlaySource::File(short_file),
        &m,
        &order,
        &FetchConfig::default(),
    )
    .unwrap();
    while f.segments.recv().await.is_some() {}
    let err = f.task.wait().await.unwrap_err();
    assert!(matches!(err, FetchOverlayError::Truncated { .. }), "{err}");
}

#[tokio::test]
async fn local_file_with_plan_order_and_demand() {
    let dir = tempfile::tempdir().unwrap();
    let file = make_overlay(dir.path(), 5, 128, 4);
    let m = manifest_of(&file);
    let plan = LaunchPlan::new(&m).unwrap();
    let n = m.segments.len() as u32;
    // A memory segment far back in the order.
    let wanted = *plan.fetch_order.last().unwrap();
    assert!(plan.pages_waiting_on(wanted) > 0);
    let source = OverlaySource::File(file.clone());
    let (_h, fetched, _) = source.manifest(&Default::default()).await.unwrap();
    assert_eq!(fetched, m);
    let mut f =
        SegmentFetcher::start(source, &m, &plan.fetch_order, &FetchConfig::default()).unwrap();
    let got = collect(&mut f, &m, |f| f.demand.demand(wanted)).await;
    let c = f.counters.clone();
    f.task.wait().await.unwrap();
    assert_eq!(got.len(), n as usize);
    assert_eq!(got[0], plan.device_state_segment);
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    assert_eq!(c.delivered_bytes.load(Ordering::Relaxed), data_bytes(&m));

    // The receiver dropped early: the fetcher ends without an error.
    let source = OverlaySource::File(file);
    let mut f = SegmentFetcher::start(
        source,
        &m,
        &plan.fetch_order,
        &FetchConfig {
            channel_capacity: 1,
            ..FetchConfig::default()
        },
    )
    .unwrap();
    assert!(f.segments.recv().await.is_some());
    drop(f.segments);
    f.task.wait().await.unwrap();
}
