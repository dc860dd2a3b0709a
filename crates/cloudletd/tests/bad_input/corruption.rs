//! The corruption matrix through synthesis (the other tools' side is in
//! `crates/cli/tests/corruption.rs`): each of the 28 damaged copies of the
//! kvstore overlay is refused by a real daemon with a 4xx that names the
//! cause (422 `invalid_overlay` in the same words as `cloudlet overlay
//! inspect`; 409 `base_not_held` naming the base for the overlay of a base
//! this cloudlet lacks), leaving no VM running and no RAM or disk file
//! behind; then a good copy still runs.
//!
//! One daemon for every case. Damage seen in the header, manifest, metadata
//! or length is refused before any segment is fetched, through an upload and
//! through a URL. Damage inside a segment is found when that segment
//! arrives, possibly after the VM has started (early start); how fast it is
//! then reported is the segment pipeline's part (`src/synth`, which ends
//! the synthesis as soon as a segment stays bad), so each such case is
//! allowed 60 s here and runs once, through the URL.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{kvstore_overlay_with, start_registry, Daemon};
use cloudlet_api::{CreateVmRequest, VmState};
use cloudlet_client::{Client, ClientError};
use cloudlet_testkit::damage::{matrix, Area, Damaged, Expect};

const PREFIX_LIMIT: Duration = Duration::from_secs(10);
const SEGMENT_LIMIT: Duration = Duration::from_secs(60);

fn api_err(e: ClientError) -> (u16, String, String) {
    match e {
        ClientError::Api {
            status,
            kind,
            message,
        } => (status, kind, message),
        other => panic!("expected an API error, got {other}"),
    }
}

/// Synthesizes `case` one way (an upload of `path`, or the registry URL),
/// and checks the verdict and that nothing is left behind. A description of
/// what went wrong, if anything did.
async fn refused(d: &Daemon, case: &Damaged, path: &Path, url: Option<&str>) -> Result<(), String> {
    let c: Client = d.client();
    let how = if url.is_some() { "url" } else { "upload" };
    let name = format!("{}-{how}", case.name).replace('_', "-");
    let name = &name[..name.len().min(63)];
    let limit = match case.area {
        Area::Prefix => PREFIX_LIMIT,
        Area::Segment => SEGMENT_LIMIT,
    };
    let start = Instant::now();
    let answer = match url {
        Some(u) => {
            let req = CreateVmRequest {
                overlay: u.into(),
                name: Some(name.into()),
                flavor: None,
            };
            tokio::time::timeout(limit, c.create_vm(&req)).await
        }
        None => tokio::time::timeout(limit, c.create_vm_upload(path, Some(name), None)).await,
    };
    let took = start.elapsed();
    let answer = answer.map_err(|_| format!("no answer within {limit:?}"))?;
    let (status, kind, msg) = match answer {
        Ok(vm) => {
            let _ = c.delete_vm(&vm.id).await;
            return Err("accepted".into());
        }
        Err(e) => api_err(e),
    };
    let verdict = match &case.expect {
        Expect::Refused { says } => {
            status == 422 && kind == "invalid_overlay" && msg.contains(says.as_str())
        }
        Expect::OtherBase { base_id } => {
            status == 409 && kind == "base_not_held" && msg.contains(base_id.as_str())
        }
        Expect::Valid => false,
    };
    if !verdict {
        return Err(format!(
            "{how}: answered {status} {kind} {msg:?} after {took:?}, expected {:?}",
            case.expect
        ));
    }
    // Nothing left: no QEMU of this daemon, no file in its VM directories
    // (cleanup may finish just after the answer), a failed record at most.
    let settle = Instant::now();
    while !d.vm_files().is_empty() || qemu_of(d) {
        if settle.elapsed() > Duration::from_secs(5) {
            return Err(format!(
                "{how}: left behind: files {:?}, QEMU running: {}",
                d.vm_files(),
                qemu_of(d)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match c.get_vm(name).await {
        Err(e) if e.status() == Some(404) => {}
        Ok(vm) if vm.state == VmState::Failed => {}
        other => return Err(format!("{how}: record {other:?}")),
    }
    Ok(())
}

fn qemu_of(d: &Daemon) -> bool {
    cloudlet_testkit::process_running_with(&d.vm_dir.display().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn synthesis_refuses_every_damaged_copy_and_leaves_nothing() {
    // Payload segments of 128 KiB: several segments to damage (the same
    // file as `crates/cli/tests/corruption.rs` uses).
    let good_path = kvstore_overlay_with(Some(128 << 10)).await;
    let good = std::fs::read(&good_path).unwrap();
    let store = tempfile::tempdir().unwrap();
    let registry = start_registry(store.path()).await;
    let d = Daemon::start("").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cases = matrix(&good);
    assert_eq!(cases.len(), 28);
    // The fast ones first.
    cases.sort_by_key(|c| c.area == Area::Segment);
    let mut failures = Vec::new();
    for case in &cases {
        let path = dir.path().join(&case.name);
        std::fs::write(&path, &case.bytes).unwrap();
        // Served as is (a registry refuses to store such a push): the
        // daemon reads the length from the answer's Content-Range.
        let served = store.path().join("overlays").join(&case.name);
        std::fs::create_dir_all(served.parent().unwrap()).unwrap();
        std::fs::write(&served, &case.bytes).unwrap();
        let url = format!("{registry}/v1/overlays/{}", case.name);
        let ways: &[Option<&str>] = match (case.area, case.bytes.is_empty()) {
            // Segment damage is found only as segments arrive (slow for
            // now): once, through the URL.
            (Area::Segment, _) => &[Some(&url)],
            // An empty object has no byte range to serve (416).
            (_, true) => &[None],
            _ => &[None, Some(&url)],
        };
        for way in ways {
            if let Err(e) = refused(&d, case, &path, *way).await {
                failures.push(format!("{}: {e}", case.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        d.log()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The daemon still serves, and a good copy runs.
    let c = d.client();
    let vm = c
        .create_vm_upload(&good_path, Some("good"), None)
        .await
        .expect("a good copy synthesizes");
    assert_eq!(
        cloudlet_testkit::http(vm.ports[0].host, "GET", "/health", None)
            .await
            .unwrap()
            .status,
        200
    );
    c.delete_vm(&vm.id).await.unwrap();
}
