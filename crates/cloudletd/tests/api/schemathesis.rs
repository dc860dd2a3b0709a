//! schemathesis (PyPI, installed by `make deps`) against a live daemon: every
//! operation of the daemon's own OpenAPI document, every check
//! (`--checks all`), all four phases including the stateful one (the
//! document's links: create a VM, then get, move and delete it), with
//! realistic examples: the document the daemon serves, with the examples of
//! this run added (a VM that exists, the base it has, an overlay URL of a
//! live registry). Any failure fails the test, with schemathesis' report.
//!
//! What the run is told, besides the document (`schemathesis.toml` below):
//! 502, 503 and 504 are this API's documented answers when something
//! outside the request is at fault (the overlay's server or the destination
//! cloudlet failed or did not answer in time; the cloudlet is full or
//! draining), so they are not counted as server errors; every other 5xx
//! is. `GET /v1/events` is left out: an endless stream of server-sent
//! events, which schemathesis would wait on until its timeout (the event
//! stream has its own tests).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{registry_with_kvstore, Daemon, TOKEN};
use cloudlet_api::CreateVmRequest;
use serde_json::{json, Value};

/// The run's settings: see the module doc for why each is there.
const DAEMON_CONFIG: &str = r#"
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "502", "503", "504"]

# A body the schema allows can still name what this cloudlet has not got:
# a flavor of another cloudlet's config, an overlay the registry has not.
[[operations]]
include-name = "POST /v1/vms"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "409", "422", "5xx"]

# Any bytes are a schema-valid body; only a base VM export is a base.
[[operations]]
include-name = "POST /v1/base-vms"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "409", "422"]

[[operations]]
include-name = "POST /v1/vms/{id}/handoff"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "409", "422", "5xx"]
"#;

/// The registry's run: any bytes are a schema-valid push body, but only an
/// intact overlay is accepted (400 `invalid_overlay` otherwise: what an
/// overlay is, no schema can say).
const REGISTRY_CONFIG: &str = r#"
[[operations]]
include-name = "PUT /v1/overlays/{name}"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "409"]
"#;

fn add_examples(doc: &mut Value, overlay_url: &str, vm_id: &str, base: &str) {
    doc["components"]["schemas"]["CreateVmRequest"]["properties"]["overlay"]["example"] =
        json!(overlay_url);
    let paths = doc["paths"].as_object_mut().expect("paths");
    for item in paths.values_mut() {
        for op in item.as_object_mut().expect("path item").values_mut() {
            let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
                continue;
            };
            for p in params {
                let example = match (p["in"].as_str(), p["name"].as_str()) {
                    (Some("path"), Some("id")) => vm_id,
                    (Some("path"), Some("name")) => base,
                    _ => continue,
                };
                p["example"] = json!(example);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing_against_a_live_daemon() {
    let reg_dir = tempfile::tempdir().unwrap();
    let (_, overlay_url) = registry_with_kvstore(reg_dir.path()).await;
    let d = Daemon::start("[capacity]\nvcpus = 8\nmemory_mib = 8192\nvms = 2\n").await;
    let c = d.client();
    let vm = c
        .create_vm(&CreateVmRequest {
            overlay: overlay_url.clone(),
            name: Some("seed".into()),
            flavor: None,
        })
        .await
        .unwrap();
    let base = c.list_bases().await.unwrap()[0].name.clone();

    let mut doc: Value = reqwest::get(format!("{}/openapi.json", d.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    add_examples(&mut doc, &overlay_url, &vm.id, &base);
    doc["paths"].as_object_mut().unwrap().remove("/v1/events");
    assert_clean(&run_schemathesis(&doc, &d.url(), DAEMON_CONFIG).await);
    // The run reached the synthesis itself (a VM made from the example
    // overlay, not only refusals), and the daemon still serves.
    let log = d.log();
    let syntheses = log.matches("synthesis started").count();
    eprintln!("syntheses the run started: {}", syntheses - 1);
    assert!(syntheses >= 2, "schemathesis made no VM");
    let info = tokio::time::timeout(Duration::from_secs(10), c.info())
        .await
        .expect("the daemon answers")
        .unwrap();
    assert!(info.free.vms <= info.capacity.vms, "{info:?}");
}

/// The registry (a real one, over a real directory) with the overlay in it.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing_against_a_live_registry() {
    let reg_dir = tempfile::tempdir().unwrap();
    let (registry, _) = registry_with_kvstore(reg_dir.path()).await;
    let mut doc: Value = reqwest::get(format!("{registry}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for item in doc["paths"].as_object_mut().unwrap().values_mut() {
        for op in item.as_object_mut().unwrap().values_mut() {
            let params = op.get_mut("parameters").and_then(Value::as_array_mut);
            for p in params.into_iter().flatten() {
                if p["name"] == "name" {
                    p["example"] = json!("kvstore");
                }
            }
        }
    }
    assert_clean(&run_schemathesis(&doc, &registry, REGISTRY_CONFIG).await);
    // Still serving.
    assert_eq!(
        reqwest::get(format!("{registry}/health"))
            .await
            .unwrap()
            .status(),
        200
    );
}

/// What schemathesis said, and whether it found nothing.
struct Run {
    ok: bool,
    report: String,
}

fn assert_clean(run: &Run) {
    assert!(
        !run.report.contains("No module named"),
        "schemathesis is not installed: run `make deps`\n{}",
        run.report
    );
    assert!(run.ok, "schemathesis found failures (above)");
}

/// Runs schemathesis (every check, every phase) on `doc` against `url`.
async fn run_schemathesis(doc: &Value, url: &str, config: &str) -> Run {
    let work = tempfile::tempdir().unwrap();
    let schema = work.path().join("openapi.json");
    std::fs::write(&schema, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    let cfg = work.path().join("schemathesis.toml");
    std::fs::write(&cfg, config).unwrap();
    let started = Instant::now();
    let (dir, schema, url, cfg) = (
        work.path().to_path_buf(),
        schema.display().to_string(),
        url.to_string(),
        cfg.display().to_string(),
    );
    let out = tokio::task::spawn_blocking(move || {
        // Its cache (`.schemathesis/`, crashes it replays) in the run's
        // own directory: every run starts from the seed alone.
        Command::new("python3")
            .current_dir(&dir)
            .args([
                "-c",
                "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; schemathesis()",
                "--config-file",
                &cfg,
                "run",
                &schema,
                "--url",
                &url,
                "--checks",
                "all",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--header",
                &format!("Authorization: Bearer {TOKEN}"),
                "--max-examples",
                "25",
                "--seed",
                "20261203",
                "--workers",
                "1",
                "--request-timeout",
                "120",
                "--no-color",
            ])
            .output()
            .expect("run python3 (with schemathesis: `make deps`)")
    })
    .await
    .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "schemathesis ran {:.0} s:\n{}",
        started.elapsed().as_secs_f64(),
        tail(&report, 150)
    );
    Run {
        ok: out.status.success(),
        report,
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
