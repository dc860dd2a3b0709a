//! The dashboard (`/ui`) in a real browser (headless Chromium): a daemon
//! with a real VM, the page opened with the operator's credential; it shows
//! the VM with its state, a handoff started from the CLI live (phase and
//! bytes rising, its chart), then the VM moved, the downtime and the
//! handoff in the history; the CLI writes its plot (`--plot`).
//! Screenshots of each step and the plot are kept in
//! `$CLOUDLET_TEST_HOME/screenshots/`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloudlet_testkit::browser::Browser;
use serde_json::Value;

use crate::common::{cloudlet_bin, kvstore_overlay, Daemon, TOKEN};

/// What the page shows of the handoff card: phase, bytes sent, done.
const CARD: &str = r#"(() => {
  const c = document.querySelector('.handoff');
  return c ? [c.dataset.phase, Number(c.dataset.sent), c.dataset.done, c.querySelectorAll('svg.chart path').length] : null;
})()"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_the_vm_and_a_handoff_live_until_it_moved() {
    let shots = cloudlet_testkit::test_home().join("screenshots");
    let overlay = kvstore_overlay().await;
    let a = Daemon::start_named("edge-a", "").await;
    let b = Daemon::start("").await;
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("shown"), None)
        .await
        .unwrap();

    let mut page = Browser::launch(1400, 1000).expect("chromium (make deps installs it)");
    page.open(&format!("{}/ui#token={TOKEN}", a.url())).unwrap();
    let row = format!("document.querySelector('[data-vm=\"{}\"] .state')", vm.id);
    let shown = page
        .wait_for(&format!("{row}?.dataset.state"), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    assert_eq!(shown, "running");
    assert_eq!(
        page.eval("document.querySelector('#cloudlet-name').textContent")
            .unwrap(),
        "edge-a"
    );
    assert_eq!(
        page.wait_for(
            "document.querySelector('#status').dataset.status === 'live'",
            Duration::from_secs(10)
        )
        .unwrap(),
        true,
        "the page follows /v1/events"
    );
    let endpoint = page
        .eval(&format!(
            "document.querySelector('[data-vm=\"{}\"] .endpoint').textContent",
            vm.id
        ))
        .unwrap();
    assert!(
        endpoint.as_str().unwrap().contains(&vm.ports[0].endpoint),
        "{endpoint}"
    );
    page.screenshot(&shots.join("ui-1-running.png")).unwrap();

    // The operator moves it with the CLI (and asks for its plot); the
    // page follows.
    let plot = shots.join("handoff.svg");
    let _ = std::fs::remove_file(&plot);
    let cli = Command::new(cloudlet_bin())
        .args(["--cloudlet", &a.url(), "--output", "json"])
        .args(["handoff", "shown", "--to", &b.url()])
        .env("CLOUDLET_TOKEN", TOKEN)
        .env("CLOUDLET_DEST_TOKEN", TOKEN)
        .arg("--plot")
        .arg(&plot)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut seen: Vec<(String, u64)> = Vec::new();
    let mut live_shot = false;
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "the page never showed the end: {seen:?}\n{}",
            a.log()
        );
        let card = page.eval(CARD).unwrap();
        if let Value::Array(c) = &card {
            let (phase, sent, done) = (
                c[0].as_str().unwrap().to_string(),
                c[1].as_u64().unwrap(),
                c[2] == "true",
            );
            if seen.last() != Some(&(phase.clone(), sent)) {
                seen.push((phase.clone(), sent));
            }
            if !live_shot && !done && sent > 0 {
                page.screenshot(&shots.join("ui-2-handoff-live.png"))
                    .unwrap();
                live_shot = true;
            }
            if done {
                assert_eq!(phase, "moved", "{seen:?}");
                assert!(c[3].as_u64().unwrap() >= 1, "a chart of the course");
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = cli.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "cloudlet handoff: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: cloudlet_api::HandoffReport = serde_json::from_slice(&out.stdout).unwrap();

    // Live: the page showed the handoff while it ran, its bytes rising.
    let during: Vec<_> = seen.iter().filter(|(p, _)| p != "moved").collect();
    assert!(
        during.iter().any(|(p, _)| p == "memory" || p == "disk"),
        "phases shown while it ran: {seen:?}"
    );
    let bytes: Vec<u64> = during.iter().map(|(_, b)| *b).collect();
    assert!(
        bytes.windows(2).all(|w| w[0] <= w[1]) && bytes.iter().filter(|b| **b > 0).count() >= 2,
        "bytes rising, told more than once: {seen:?}"
    );

    // The end: downtime as the CLI was told, the VM moved, the history.
    let downtime = page
        .wait_for(
            "document.querySelector('.handoff .downtime')?.dataset.ms",
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(downtime.as_str().unwrap(), report.downtime_ms().to_string());
    let moved = page
        .wait_for(
            &format!("{row}?.dataset.state === 'moved' && {row}.dataset.state"),
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(moved, "moved");
    let history = page
        .wait_for(
            "document.querySelector('#history tr[data-history]')?.dataset.outcome",
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(history, "moved");
    let stages = page
        .eval("[...document.querySelectorAll('#history tr[data-history] svg.timeline rect')].map(r => r.dataset.stage)")
        .unwrap();
    assert_eq!(
        stages,
        serde_json::json!(["preparing", "disk", "memory", "switchover", "committing"]),
        "the history's timeline"
    );
    page.screenshot(&shots.join("ui-3-moved.png")).unwrap();

    // The CLI's plot of the same handoff.
    let svg = std::fs::read_to_string(&plot).expect("the CLI wrote its plot");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for label in [
        "bytes sent",
        "link rate",
        "guest dirty rate",
        "switchover",
        "memory",
    ] {
        assert!(svg.contains(label), "{label} in the plot");
    }
    assert!(svg.contains(&format!("downtime {} ms", report.downtime_ms())));
    println!("screenshots: {}", shots.display());
}
