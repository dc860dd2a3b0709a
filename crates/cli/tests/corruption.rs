//! The corruption matrix through every tool but the daemon (that side is
//! in `crates/cloudletd/tests/corruption.rs`): 28 damaged copies of the
//! real kvstore overlay, and the library validation, `cloudlet overlay
//! inspect`, `cloudlet overlay verify` (the real binary) and `cloudlet
//! registry push` to a real registry give the same verdict on each, with a
//! message that says what and where; a good copy passes them all.

use std::path::{Path, PathBuf};
use std::process::Output;

use cloudlet_overlay::Validation;
use cloudlet_testkit::damage::{matrix, Damaged, Expect};
use cloudlet_testkit::{test_home, tiny_base};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlet");
const TOKEN: &str = "matrix-token-0123456789";

/// Payload segments of 128 KiB: the matrix needs several segments.
pub const SEGMENT_SIZE: u32 = 128 << 10;

/// The kvstore app packaged on the tiny base with [`SEGMENT_SIZE`]: the same
/// cached file as the daemon's tests use.
async fn kvstore_overlay() -> PathBuf {
    cloudlet_testkit::packaged_kvstore(Some(SEGMENT_SIZE)).await
}

async fn start_registry(dir: &Path) -> String {
    cloudlet_testkit::local_registry(dir, TOKEN).await
}

async fn cloudlet(args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("CLOUDLET_HOME", test_home())
        .env("CLOUDLET_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .await
        .expect("run cloudlet")
}

/// What one tool said: accepted, or refused with this message.
fn said(out: &Output) -> Result<String, String> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_tool_gives_the_same_verdict_on_every_damaged_copy() {
    let (_, base) = tiny_base().await;
    let good = std::fs::read(kvstore_overlay().await).unwrap();
    let store = tempfile::tempdir().unwrap();
    let registry = start_registry(store.path()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("registry-token");
    cloudlet_testkit::write_private(&token_file, TOKEN).unwrap();
    let mut cases = matrix(&good);
    assert_eq!(cases.len(), 28);
    cases.push(Damaged {
        name: "good".into(),
        bytes: good.clone(),
        area: cloudlet_testkit::damage::Area::Prefix,
        expect: Expect::Valid,
    });
    let base_name = base.manifest.name.clone();
    let mut failures = Vec::new();
    for case in &cases {
        let path = dir.path().join(&case.name);
        std::fs::write(&path, &case.bytes).unwrap();
        let p = path.to_str().unwrap();
        let lib = Validation::full()
            .check_file(&path)
            .map(|v| v.manifest.base_id)
            .map_err(|e| e.to_string());
        let lib_base = Validation::full()
            .base(base.manifest.id.clone())
            .check_file(&path)
            .map(|v| v.manifest.base_id)
            .map_err(|e| e.to_string());
        let inspect = said(&cloudlet(&["overlay", "inspect", p]).await);
        let verify = said(&cloudlet(&["overlay", "verify", p, "--base", &base_name]).await);
        let push = said(
            &cloudlet(&[
                "registry",
                "push",
                p,
                "--registry",
                &registry,
                "--name",
                &case.name,
                "--registry-token-file",
                token_file.to_str().unwrap(),
            ])
            .await,
        );
        let listed = reqwest::get(format!("{registry}/v1/overlays/{}", case.name))
            .await
            .unwrap()
            .status()
            .as_u16();
        eprintln!(
            "{:<32} {}",
            case.name,
            match &lib_base {
                Ok(_) => "valid".to_string(),
                Err(m) => m.clone(),
            }
        );
        let mut check = |ok: bool, what: &str| {
            if !ok {
                failures.push(format!("{}: {what}", case.name));
            }
        };
        match &case.expect {
            Expect::Refused { says } => {
                for (tool, r) in [
                    ("library", &lib),
                    ("library with the base", &lib_base),
                    ("inspect", &inspect),
                    ("verify", &verify),
                    ("push", &push),
                ] {
                    check(
                        matches!(r, Err(m) if m.contains(says.as_str())),
                        &format!("{tool} should refuse with {says:?}, said {r:?}"),
                    );
                }
                check(
                    matches!(&push, Err(m) if m.contains(&format!("invalid_overlay): Overlay refused: {says}"))),
                    &format!("push: {push:?}"),
                );
                check(listed == 404, &format!("refused push stored: {listed}"));
            }
            Expect::Valid => {
                let base_id = &base.manifest.id;
                check(
                    lib.is_ok() && lib_base.is_ok(),
                    &format!("library: {lib:?} {lib_base:?}"),
                );
                check(
                    matches!(&inspect, Ok(t) if t.contains(&format!("base id          {base_id}"))),
                    &format!("inspect: {inspect:?}"),
                );
                check(
                    matches!(&verify, Ok(t) if t.starts_with(&format!("overlay OK against base {base_name}"))),
                    &format!("verify: {verify:?}"),
                );
                check(
                    push.is_ok() && listed == 200,
                    &format!("push: {push:?} {listed}"),
                );
            }
            Expect::OtherBase { base_id } => {
                // Valid, for another base: what knows no base accepts it.
                let wrong = format!(
                    "Overlay is for base {base_id}, this base is {}",
                    base.manifest.id
                );
                check(lib.is_ok(), &format!("library: {lib:?}"));
                check(
                    matches!(&lib_base, Err(m) if m == &wrong),
                    &format!("library with the base: {lib_base:?}"),
                );
                check(
                    matches!(&inspect, Ok(t) if t.contains(&format!("base id          {base_id}"))),
                    &format!("inspect: {inspect:?}"),
                );
                check(
                    matches!(&verify, Err(m) if m.contains(&wrong)),
                    &format!("verify: {verify:?}"),
                );
                check(
                    push.is_ok() && listed == 200,
                    &format!("push (the registry holds no bases): {push:?} {listed}"),
                );
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
