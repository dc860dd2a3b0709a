//! End to end: a device finds its cloudlet through the directory, over an
//! emulated WAN, on real QEMU.
//!
//! A hub namespace plays the device (and hosts the cloud tier: the
//! directory and the overlay registry); three cloudlets each sit behind
//! their own link from it (`cloudlet_wan::Wan::attach`): `near` at 2 ms
//! one way, `mid` at 10 ms, `far` at 40 ms. `near` lacks the base VM; `far`
//! is geographically nearest to where the device says it is (so the
//! directory ranks it above `mid`); `mid` has room for one VM only. The
//! device runs the real `cloudlet synthesize --directory`: the first lands
//! on `mid` (the lowest RTT among those that fit, against the directory's
//! own order), the second on `far` (`mid` is now full), and each answer
//! explains the choice and what was left out.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudlet_client::{Client, DirectoryClient};
use cloudlet_testkit::tiny_base;
use cloudlet_wan::{Side, Wan, WanConfig};
use common::{in_ns, kvstore_overlay, TOKEN};

const API_PORT: u16 = 7450;
const DIR_PORT: u16 = 7470;
const REG_PORT: u16 = 7460;
/// The device's position (CMU, Pittsburgh).
const DEVICE: (f64, f64) = (40.4442, -79.9420);

/// The `cloudlet` binary of this build (built with the workspace).
fn cloudlet_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_cloudletd")).with_file_name("cloudlet");
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build -p cloudlet-cli; `make test` does)",
        p.display()
    );
    p
}

/// Processes killed when the test ends (cloudletd's QEMUs included).
struct Procs {
    children: Vec<Child>,
    vm_dirs: Vec<PathBuf>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.vm_dirs {
            cloudlet_testkit::kill_processes_with(&d.display().to_string());
        }
    }
}

fn log_file(path: &std::path::Path) -> (Stdio, Stdio) {
    let f = std::fs::File::create(path).unwrap();
    (f.try_clone().unwrap().into(), f.into())
}

struct Cloudlet {
    name: &'static str,
    url: String,
    log: PathBuf,
}

/// Start `cloudletd` in the leaf of `link`.
fn start_cloudlet(
    link: &Wan,
    procs: &mut Procs,
    dir: &std::path::Path,
    name: &'static str,
    bases: Option<&std::path::Path>,
    extra: &str,
) -> Cloudlet {
    let home = dir.join(name).join("home");
    let vm_dir = dir.join(name).join("run");
    std::fs::create_dir_all(&home).unwrap();
    if let Some(b) = bases {
        std::os::unix::fs::symlink(b, home.join("bases")).unwrap();
    }
    let addr = format!("{}:{API_PORT}", link.addr(Side::B));
    let first = 20000 + (rand::random::<u16>() % 400) * 100;
    let config = dir.join(name).join("cloudletd.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"{name}\"\nlisten = \"{addr}\"\npublic_host = \"{}\"\nhome = \"{}\"\nvm_dir = \"{}\"\ntokens = [\"{TOKEN}\"]\nhost_ports = [{first}, {}]\ndirectory = [\"http://{}:{DIR_PORT}\"]\n{extra}",
            link.addr(Side::B),
            home.display(),
            vm_dir.display(),
            first + 99,
            cloudlet_wan::A_ADDR,
        ),
    )
    .unwrap();
    let log = dir.join(name).join("daemon.log");
    let (out, err) = log_file(&log);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudletd"));
    cmd.arg("--config")
        .arg(&config)
        .env("CLOUDLET_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    procs
        .children
        .push(link.spawn_in(Side::B, cmd).expect("start cloudletd"));
    procs.vm_dirs.push(vm_dir);
    Cloudlet {
        name,
        url: format!("http://{addr}"),
        log,
    }
}

/// Run the `cloudlet` CLI in the device's namespace; its stdout.
fn cli(hub: &Wan, args: &[&str]) -> String {
    let out = hub
        .spawn_in(Side::A, {
            let mut c = Command::new(cloudlet_bin());
            c.args(args)
                .env("CLOUDLET_TOKEN", TOKEN)
                .env("CLOUDLET_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c
        })
        .expect("run cloudlet")
        .wait_with_output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "cloudlet {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn location(lat: f64, lon: f64) -> String {
    format!("[location]\nlabel = \"\"\nlatitude = {lat}\nlongitude = {lon}\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn synthesis_lands_on_the_nearest_cloudlet_that_fits() {
    let overlay = kvstore_overlay().await;
    let (store, _) = tiny_base().await;
    let _ = cloudlet_wan::cleanup_stale();
    let link = |ms| WanConfig::new("dirwan", 200.0, Duration::from_millis(ms));
    let hub = Wan::create(link(2)).expect("the near link");
    let mid_link = Wan::attach(&hub, link(10)).expect("the mid link");
    let far_link = Wan::attach(&hub, link(40)).expect("the far link");
    // Each leaf reaches the hub's every address (the cloud tier listens on
    // link 0's) through its own link.
    for l in [&hub, &mid_link, &far_link] {
        l.route_via_hub().expect("route the leaf through the hub");
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut procs = Procs {
        children: vec![],
        vm_dirs: vec![],
    };

    // The cloud tier, in the hub: the directory and the registry.
    let hub_ip = cloudlet_wan::A_ADDR;
    let (out, err) = log_file(&tmp.path().join("directory.log"));
    let mut c = Command::new(cloudlet_bin());
    c.args(["directory", "serve", "--listen"])
        .arg(format!("0.0.0.0:{DIR_PORT}"))
        .arg("--store")
        .arg(tmp.path().join("directory.redb"))
        .args(["--heartbeat-ms", "1000", "--lease-ms", "2500"])
        .stdout(out)
        .stderr(err);
    procs.children.push(hub.spawn_in(Side::A, c).unwrap());
    let (out, err) = log_file(&tmp.path().join("registry.log"));
    let mut c = Command::new(cloudlet_bin());
    c.args(["registry", "serve"])
        .arg(tmp.path().join("registry"))
        .arg("--listen")
        .arg(format!("0.0.0.0:{REG_PORT}"))
        .args(["--push-token", TOKEN])
        .stdout(out)
        .stderr(err);
    procs.children.push(hub.spawn_in(Side::A, c).unwrap());
    let dir_url = format!("http://{hub_ip}:{DIR_PORT}");
    let reg_url = format!("http://{hub_ip}:{REG_PORT}");
    let up = {
        let (d, r) = (dir_url.clone(), reg_url.clone());
        in_ns(&hub, Side::A, async move {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                let ok = |u: String| async move {
                    reqwest::get(u).await.is_ok_and(|r| r.status().is_success())
                };
                if ok(format!("{d}/v1/health")).await && ok(format!("{r}/health")).await {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        })
        .await
    };
    assert!(up, "the directory or the registry did not come up");
    cli(
        &hub,
        &[
            "registry",
            "push",
            overlay.to_str().unwrap(),
            "--registry",
            &reg_url,
            "--name",
            "kvstore",
            "--registry-token",
            TOKEN,
        ],
    );
    let overlay_url = format!("{reg_url}/v1/overlays/kvstore");

    // Three cloudlets: near lacks the base; far is geographically nearest.
    let bases = store.bases_dir();
    let near = start_cloudlet(
        &hub,
        &mut procs,
        tmp.path(),
        "near",
        None,
        &location(40.4443, -79.9421),
    );
    let mid = start_cloudlet(
        &mid_link,
        &mut procs,
        tmp.path(),
        "mid",
        Some(&bases),
        &format!(
            "{}[capacity]\nvcpus = 4\nmemory_mib = 4096\nvms = 1\n",
            location(40.60, -79.90)
        ),
    );
    let far = start_cloudlet(
        &far_link,
        &mut procs,
        tmp.path(),
        "far",
        Some(&bases),
        &location(40.4450, -79.9430),
    );
    let registered = {
        let d = dir_url.clone();
        in_ns(&hub, Side::A, async move {
            let client = DirectoryClient::new(&[d], None);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(40) {
                if client.health().await.is_ok_and(|h| h.registered == 3) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        })
        .await
    };
    let logs = || {
        [&near, &mid, &far]
            .iter()
            .map(|c| {
                format!(
                    "--- {}\n{}",
                    c.name,
                    std::fs::read_to_string(&c.log).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    assert!(registered, "not all three registered:\n{}", logs());

    let near_arg = format!("{},{}", DEVICE.0, DEVICE.1);
    let synthesize = |name: &str| {
        cli(
            &hub,
            &[
                "synthesize",
                &overlay_url,
                "--name",
                name,
                "--directory",
                &dir_url,
                "--near",
                &near_arg,
            ],
        )
    };
    let first = synthesize("first");
    println!("first synthesis:\n{first}");
    assert!(first.contains("chosen: mid (lowest RTT"), "{first}");
    assert!(
        first.contains("left out: near (does not hold base"),
        "{first}"
    );
    // The directory ranked far first: the device's RTT probes overrode it.
    assert!(first.contains("#1 far"), "{first}");
    let rtt = |text: &str, name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.contains(&format!(" {name} http")))
            .unwrap_or_else(|| panic!("no line of {name}: {text}"));
        let after = line.split("rtt ").nth(1).unwrap();
        after.split(' ').next().unwrap().parse().unwrap()
    };
    let (mid_rtt, far_rtt) = (rtt(&first, "mid"), rtt(&first, "far"));
    assert!(
        (20.0..40.0).contains(&mid_rtt) && (80.0..110.0).contains(&far_rtt),
        "RTTs: mid {mid_rtt} ms, far {far_rtt} ms"
    );

    let on = |c: &Cloudlet| {
        let client = Client::new(&c.url, Some(TOKEN.into()));
        in_ns(&hub, Side::A, async move {
            client
                .list_vms()
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.name)
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(on(&mid).await, ["first"], "{}", logs());
    assert!(on(&far).await.is_empty());

    // mid is full now (one VM slot): the next lands on far.
    let start = Instant::now();
    loop {
        let d = dir_url.clone();
        let free = in_ns(&hub, Side::A, async move {
            reqwest::get(format!("{d}/v1/cloudlets/mid"))
                .await
                .unwrap()
                .json::<cloudlet_api::directory::Registration>()
                .await
                .unwrap()
                .free
                .vms
        })
        .await;
        if free == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "mid never told it is full"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = synthesize("second");
    println!("second synthesis:\n{second}");
    assert!(second.contains("chosen: far (lowest RTT"), "{second}");
    assert!(second.contains("left out: mid (full"), "{second}");
    assert_eq!(on(&far).await, ["second"]);
}
