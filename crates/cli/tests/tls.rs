//! The cloud tier over TLS, by the real binary: a fleet CA and
//! certificates from `cloudlet pki`, the registry and the directory served
//! with `--tls-cert/--tls-key/--tls-ca`, and the CLI reaching them with
//! `--ca` (pushing, listing, discovering); without the CA, or over plain
//! HTTP, it does not get through.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlet");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("CLOUDLET_LOG", "warn")
        .env_remove("CLOUDLET_CA")
        .env_remove("RUST_BACKTRACE")
        .env("CLOUDLET_REGISTRY_TOKEN", "tls-test-token-0123456789")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cloudlet {args:?}: {said}");
    said
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str], log: &Path) -> Killed {
    let log = std::fs::File::create(log).unwrap();
    Killed(
        Command::new(BIN)
            .args(args)
            .env("CLOUDLET_REGISTRY_TOKEN", "tls-test-token-0123456789")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// Wait until `args` succeeds (the server is up).
fn until_ok(args: &[&str]) -> String {
    let start = Instant::now();
    loop {
        let out = run(args);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn the_cloud_tier_serves_https_to_clients_of_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    ok(&["pki", "init", "--dir", &d("pki"), "--name", "test"]);
    ok(&["pki", "init", "--dir", &d("other"), "--name", "other"]);
    let issued = ok(&[
        "pki",
        "issue",
        "tier",
        "--host",
        "127.0.0.1",
        "--dir",
        &d("pki"),
    ]);
    assert!(issued.contains("127.0.0.1"), "{issued}");
    let ca = d("pki/ca.pem");
    let (cert, key) = (d("pki/tier.pem"), d("pki/tier.key"));
    let tls = ["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca];

    let reg_port = cloudlet_testkit::free_port();
    let dir_port = cloudlet_testkit::free_port();
    let storage = d("registry");
    let mut args = vec!["registry", "serve", &storage, "--listen"];
    let reg_listen = format!("127.0.0.1:{reg_port}");
    args.push(&reg_listen);
    args.extend(tls);
    let _registry = serve(&args, &dir.path().join("registry.log"));
    let dir_listen = format!("127.0.0.1:{dir_port}");
    let store = d("directory.redb");
    let mut args = vec![
        "directory",
        "serve",
        "--listen",
        &dir_listen,
        "--store",
        &store,
    ];
    args.extend(tls);
    let _directory = serve(&args, &dir.path().join("directory.log"));

    let registry = format!("https://127.0.0.1:{reg_port}");
    until_ok(&["--ca", &ca, "registry", "list", "--registry", &registry]);
    let overlay = cloudlet_testkit::packaged_kvstore(None).await;
    let pushed = ok(&[
        "--ca",
        &ca,
        "registry",
        "push",
        overlay.to_str().unwrap(),
        "--registry",
        &registry,
        "--name",
        "kv",
    ]);
    assert!(pushed.contains("pushed kv"), "{pushed}");
    let listed = ok(&["--ca", &ca, "registry", "list", "--registry", &registry]);
    assert!(listed.contains("kv"), "{listed}");
    let directory = format!("https://127.0.0.1:{dir_port}");
    let found = run(&["--ca", &ca, "discover", "--directory", &directory]);
    let said = String::from_utf8_lossy(&found.stderr).into_owned()
        + &String::from_utf8_lossy(&found.stdout);
    // No cloudlet registered: an answer (not a TLS failure) that says so.
    assert!(!said.contains("certificate"), "{said}");

    // Another fleet's CA, no CA, plain HTTP: no way through.
    for args in [
        vec![
            "--ca",
            &d("other/ca.pem"),
            "registry",
            "list",
            "--registry",
            &registry,
        ],
        vec!["registry", "list", "--registry", &registry],
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} got through");
        assert!(
            err.contains("certificate") || err.contains("UnknownIssuer"),
            "{args:?}: {err}"
        );
    }
    let plain = format!("http://127.0.0.1:{reg_port}");
    assert!(!run(&["registry", "list", "--registry", &plain])
        .status
        .success());
}
