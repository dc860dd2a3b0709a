//! Bad input through the API: clear 4xx/5xx with a reason, nothing left
//! half-started, the daemon keeps serving.

mod common;
#[path = "bad_input/corruption.rs"]
mod corruption;
#[path = "bad_input/damaged_segments.rs"]
mod damaged_segments;
#[path = "bad_input/signatures.rs"]
mod signatures;

use cloudlet_api::CreateVmRequest;
use cloudlet_client::Client;
use common::{kvstore_overlay, start_registry, Daemon};

fn req(url: String) -> CreateVmRequest {
    CreateVmRequest {
        overlay: url,
        name: None,
        flavor: None,
    }
}

fn api_err(e: cloudlet_client::ClientError) -> (u16, String, String) {
    match e {
        cloudlet_client::ClientError::Api {
            status,
            kind,
            message,
        } => (status, kind, message),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_cleanly() {
    let overlay = kvstore_overlay().await;
    let reg_dir = tempfile::tempdir().unwrap();
    let registry = start_registry(reg_dir.path()).await;
    let d = Daemon::start("[capacity]\nvcpus = 8\nmemory_mib = 8192\nvms = 1\n").await;
    let c = d.client();

    // An overlay URL that 404s.
    let (status, kind, msg) = api_err(
        c.create_vm(&req(format!("{registry}/v1/overlays/nope")))
            .await
            .unwrap_err(),
    );
    assert_eq!((status, kind.as_str()), (422, "overlay_not_found"), "{msg}");
    assert!(msg.contains("404"), "{msg}");

    // Missing and wrong tokens.
    let anon = Client::new(&d.url(), None);
    // (A small JSON body: a refused multi-MB upload may be cut off by the
    // server before the client has finished sending it.)
    let (status, _, msg) = api_err(
        anon.create_vm(&req(format!("{registry}/v1/overlays/kvstore")))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 401, "{msg}");
    let wrong = Client::new(&d.url(), Some("nope".into()));
    let (status, _, _) = api_err(wrong.delete_vm("x").await.unwrap_err());
    assert_eq!(status, 401);

    // A corrupted segment in the middle of the overlay.
    let mut bytes = std::fs::read(&overlay).unwrap();
    let header = cloudlet_overlay::format::Header::parse(&bytes[..128]).unwrap();
    let m = header.manifest_range();
    let manifest =
        cloudlet_overlay::Manifest::parse(&header, &bytes[m.start as usize..m.end as usize])
            .unwrap();
    let mid = manifest.segments.len() / 2;
    let range = manifest.segment_range(mid as u32).unwrap();
    bytes[(range.start + range.end) as usize / 2] ^= 0xff;
    let bad = d.home.join("corrupt.overlay");
    std::fs::write(&bad, &bytes).unwrap();
    let (status, kind, msg) = api_err(
        c.create_vm_upload(&bad, Some("corrupt"), None)
            .await
            .unwrap_err(),
    );
    assert_eq!((status, kind.as_str()), (422, "invalid_overlay"), "{msg}");
    assert!(msg.contains("Segment") || msg.contains("segment"), "{msg}");
    assert!(d.vm_files().is_empty(), "{:?}", d.vm_files());
    let failed = c.get_vm("corrupt").await.unwrap();
    assert_eq!(failed.state, cloudlet_api::VmState::Failed);
    assert!(!common::qemu_running(&d, &failed.id));

    // An overlay for a base this cloudlet does not hold.
    let other = other_base_overlay(&d.home);
    let (status, kind, msg) = api_err(c.create_vm_upload(&other, None, None).await.unwrap_err());
    assert_eq!((status, kind.as_str()), (409, "base_not_held"), "{msg}");

    // Over capacity: one VM allowed. It takes the name of the failed
    // record, which gives it up: the name now means the new VM alone.
    let vm = c
        .create_vm_upload(&overlay, Some("corrupt"), None)
        .await
        .expect("first VM fits");
    assert_eq!(c.get_vm("corrupt").await.unwrap().id, vm.id);
    let renamed = c.get_vm(&failed.id).await.unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.state),
        (
            format!("vm-{}", failed.id).as_str(),
            cloudlet_api::VmState::Failed
        )
    );
    assert_eq!(
        c.list_vms()
            .await
            .unwrap()
            .iter()
            .filter(|v| v.name == "corrupt")
            .count(),
        1
    );
    let (status, kind, msg) = api_err(
        c.create_vm_upload(&overlay, Some("second"), None)
            .await
            .unwrap_err(),
    );
    assert_eq!((status, kind.as_str()), (503, "over_capacity"), "{msg}");
    assert_eq!(c.get_vm("second").await.unwrap_err().status(), Some(404));

    // An unknown flavor, garbage JSON.
    let mut r = req(format!("{registry}/v1/overlays/x"));
    r.flavor = Some("huge".into());
    let (status, kind, msg) = api_err(c.create_vm(&r).await.unwrap_err());
    assert_eq!((status, kind.as_str()), (422, "unknown_flavor"), "{msg}");

    // Still serving, and the good VM still runs.
    assert_eq!(c.info().await.unwrap().name, "test-cloudlet");
    assert_eq!(
        cloudlet_testkit::http(vm.ports[0].host, "GET", "/health", None)
            .await
            .unwrap()
            .status,
        200
    );
}

/// A valid overlay whose base id no cloudlet holds.
fn other_base_overlay(dir: &std::path::Path) -> std::path::PathBuf {
    let d = dir.join("other");
    std::fs::create_dir_all(&d).unwrap();
    let chunk = 4096usize;
    let base = vec![7u8; chunk * 8];
    let mut launch = base.clone();
    launch[0] = 1;
    for (name, data) in [
        ("bd", &base),
        ("bm", &base),
        ("ld", &launch),
        ("lm", &launch),
    ] {
        std::fs::write(d.join(name), data).unwrap();
    }
    let cfg = cloudlet_overlay::CreateConfig::new(
        d.join("bd"),
        d.join("bm"),
        d.join("ld"),
        d.join("lm"),
        b"state".to_vec(),
        "0000-no-such-base",
    );
    let out = d.join("other.overlay");
    cloudlet_overlay::create_overlay(&cfg, &out).unwrap();
    out
}

/// A config that holds tokens and that others may read refuses the start,
/// saying what to run; a daemon that makes its own token keeps it 0600.
#[test]
fn credentials_are_kept_from_other_users() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let (home, vm_dir) = (dir.path().join("home"), dir.path().join("vms"));
    let base = format!(
        "listen = \"127.0.0.1:0\"\nhome = \"{}\"\nvm_dir = \"{}\"\n",
        home.display(),
        vm_dir.display()
    );
    let exposed = dir.path().join("exposed.toml");
    std::fs::write(&exposed, format!("{base}tokens = [\"s3cret-token\"]\n")).unwrap();
    std::fs::set_permissions(&exposed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .arg("--config")
        .arg(&exposed)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "started with an exposed config: {said}"
    );
    assert!(
        said.contains("others may read it (mode 644)") && said.contains("chmod 600"),
        "{said}"
    );
    assert!(
        !said.contains("s3cret-token"),
        "the token is not printed: {said}"
    );

    // Without tokens the file is no secret (0644 is fine); the token the
    // daemon makes for itself is written 0600.
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, &base).unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut d = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .arg("--config")
        .arg(&plain)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let token = home.join("token");
    let start = std::time::Instant::now();
    while !token.exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "no token made"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mode = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
    let _ = d.kill();
    let _ = d.wait();
    assert_eq!(mode, 0o600, "home/token");

    // No credential on a command line (every user sees it in `ps`): the
    // flags that took one are gone, clap points to the file instead; a
    // token file others may read is refused, by the daemon and the CLI.
    let run = |bin: &str, args: &[&std::ffi::OsStr]| {
        let out = Command::new(bin)
            .args(args)
            .env_remove("CLOUDLET_TOKEN")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let daemon = env!("CARGO_BIN_EXE_cloudletd");
    let cli = common::cloudlet_bin();
    let cli = cli.to_str().unwrap();
    for (bin, args) in [
        (
            daemon,
            vec![
                os("--config"),
                plain.clone().into(),
                os("--token"),
                os("s3cret-token"),
            ],
        ),
        (cli, vec![os("--token"), os("s3cret-token"), os("info")]),
        (
            cli,
            vec![
                os("handoff"),
                os("vm"),
                os("--to"),
                os("x"),
                os("--dest-token"),
                os("s3cret-token"),
            ],
        ),
        (
            cli,
            vec![
                os("registry"),
                os("push"),
                os("f"),
                os("--registry-token"),
                os("s3cret-token"),
            ],
        ),
    ] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let (ok, said) = run(bin, &args);
        assert!(
            !ok && said.contains("unexpected argument"),
            "{args:?}: {said}"
        );
        assert!(
            said.contains("-token-file"),
            "{args:?}: the file flag is named: {said}"
        );
    }
    let open_token = dir.path().join("open-token");
    std::fs::write(&open_token, "s3cret-token\n").unwrap();
    std::fs::set_permissions(&open_token, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (bin, args) in [
        (
            daemon,
            vec![
                os("--config"),
                plain.clone().into(),
                os("--token-file"),
                open_token.clone().into(),
            ],
        ),
        (
            cli,
            vec![os("--token-file"), open_token.clone().into(), os("info")],
        ),
    ] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let (ok, said) = run(bin, &args);
        assert!(!ok, "{args:?}: {said}");
        assert!(
            said.contains("others may read it (mode 644)") && said.contains("chmod 600"),
            "{args:?}: {said}"
        );
        assert!(!said.contains("s3cret-token"), "{said}");
    }
}

/// A daemon given its token in a private file takes it, and the CLI given
/// the same file is let in, where a wrong token (from the environment) is
/// refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_file_lets_in_its_holder_only() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let port = cloudlet_testkit::free_port();
    let config = dir.path().join("cloudletd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nhome = \"{}\"\nvm_dir = \"{}\"\n",
            dir.path().join("home").display(),
            dir.path().join("vms").display()
        ),
    )
    .unwrap();
    let token_file = dir.path().join("token");
    cloudlet_testkit::write_private(&token_file, "file-token-0123456789\n").unwrap();
    let mut d = tokio::process::Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .arg("--config")
        .arg(&config)
        .arg("--token-file")
        .arg(&token_file)
        .env_remove("CLOUDLET_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    assert!(
        cloudlet_testkit::until_healthy(
            &[format!("{url}/health")],
            std::time::Duration::from_secs(30)
        )
        .await,
        "the daemon did not come up"
    );
    let cli = |token: Option<&str>, file: Option<&std::path::Path>| {
        let mut c = tokio::process::Command::new(common::cloudlet_bin());
        c.args(["--cloudlet", &url, "vm", "delete", "no-such-vm"])
            .arg("--home")
            .arg(dir.path().join("cli-home"))
            .env_remove("CLOUDLET_TOKEN");
        if let Some(t) = token {
            c.env("CLOUDLET_TOKEN", t);
        }
        if let Some(f) = file {
            c.arg("--token-file").arg(f);
        }
        async move {
            let out = c.output().await.unwrap();
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
    };
    let held = cli(None, Some(&token_file)).await;
    assert!(held.contains("404") || held.contains("not found"), "{held}");
    let wrong = cli(Some("wrong-token-0123456789"), None).await;
    assert!(wrong.contains("401"), "{wrong}");
    assert!(
        !std::fs::exists(dir.path().join("home/token")).unwrap(),
        "the given token is used, none made"
    );
    let _ = d.kill().await;
}

/// Plain HTTP only on loopback, or where the operator says so: the
/// daemon, the registry and the directory each refuse to listen on a
/// network address without TLS (before they bind), and say how to go on.
#[test]
fn plain_http_off_loopback_is_refused_unless_said() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let (home, vm_dir) = (dir.path().join("home"), dir.path().join("vms"));
    let config = |extra: &str| {
        let p = dir.path().join(format!("c{}.toml", extra.len()));
        std::fs::write(
            &p,
            format!(
                "listen = \"0.0.0.0:0\"\nhome = \"{}\"\nvm_dir = \"{}\"\n{extra}",
                home.display(),
                vm_dir.display()
            ),
        )
        .unwrap();
        p
    };
    let said = |out: std::process::Output| {
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let refused = |(ok, said): (bool, String)| {
        assert!(!ok, "plain HTTP on 0.0.0.0 started: {said}");
        assert!(
            said.contains("not a loopback address and there is no TLS")
                && said.contains("plain_http"),
            "{said}"
        );
    };
    let daemon = |cfg: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .arg("--config")
            .arg(cfg)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    refused(said(daemon(&config(""))));
    // Said so: the same config starts (and is stopped at once).
    let mut d = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .arg("--config")
        .arg(config("plain_http = true\n"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = d.stdout.take().unwrap();
    let mut seen = String::new();
    let start = std::time::Instant::now();
    while !seen.contains("cloudletd ready") {
        let mut buf = [0u8; 4096];
        let n = std::io::Read::read(&mut out, &mut buf).unwrap();
        assert!(n > 0 && start.elapsed().as_secs() < 60, "{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let _ = d.kill();
    let _ = d.wait();

    let cli = common::cloudlet_bin();
    let store = dir.path().join("registry");
    let run = |args: &[&str]| {
        Command::new(&cli)
            .args(args)
            .env("CLOUDLET_REGISTRY_TOKEN", "a-push-token-of-some-length")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    refused(said(run(&[
        "registry",
        "serve",
        store.to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
    ])));
    let redb = dir.path().join("d.redb");
    refused(said(run(&[
        "directory",
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--store",
        redb.to_str().unwrap(),
    ])));
}
