//! TLS between cloudlets (issue 15): three real daemons serving HTTPS
//! only, two of one fleet (certificates of its CA, `cloudlet_trust::pki`)
//! and one of another. A VM moves between the two of the fleet over mutual
//! TLS; a handoff to the other fleet's cloudlet is refused (the source
//! does not trust its certificate) and the VM keeps serving at the
//! source; a caller without a fleet certificate is refused the handoff
//! endpoints even with the token; plain HTTP gets no answer.

use std::path::Path;

use cloudlet_api::VmState;
use cloudlet_testkit::http;
use cloudlet_trust::pki;

use crate::common::{kvstore_overlay, qemu_running, trusting, Daemon, TOKEN};
use crate::port_of;

fn tls_config(ca_dir: &Path, certs: &Path, name: &str) -> String {
    let issued = pki::issue(ca_dir, name, &["127.0.0.1".into()], certs, 1).unwrap();
    format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
        issued.cert.display(),
        issued.key.display(),
        pki::ca_paths(ca_dir).0.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn handoffs_go_over_mutual_tls_within_one_fleet_only() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, rival, certs) = (
        dir.path().join("fleet"),
        dir.path().join("rival"),
        dir.path().join("certs"),
    );
    pki::init(&fleet, "acme", 1).unwrap();
    pki::init(&rival, "rival", 1).unwrap();
    let overlay = kvstore_overlay().await;
    let a = Daemon::start_named("tls-a", &tls_config(&fleet, &certs, "tls-a")).await;
    let b = Daemon::start_named("tls-b", &tls_config(&fleet, &certs, "tls-b")).await;
    let c = Daemon::start_named("tls-c", &tls_config(&rival, &certs, "tls-c")).await;
    assert!(a.url().starts_with("https://"));

    // Plain HTTP is no way in.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/v1/cloudlet", a.addr))
        .timeout(std::time::Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("tls-mover"), None)
        .await
        .unwrap();
    let port = port_of(&vm.ports[0].endpoint);
    http(port, "PUT", "/kv/k", Some(b"v".to_vec()))
        .await
        .unwrap();

    // To the other fleet's cloudlet: refused, the VM serves on at A.
    let e = a
        .client()
        .handoff("tls-mover", &c.url(), Some(TOKEN))
        .await
        .unwrap_err();
    println!("a handoff to another fleet's cloudlet: {e}");
    let said = e.to_string();
    assert!(
        said.contains("certificate") || said.contains("Cannot reach"),
        "{said}"
    );
    let here = a.client().get_vm(&vm.id).await.unwrap();
    assert_eq!(here.state, VmState::Running);
    assert!(qemu_running(&a, &vm.id));
    assert_eq!(http(port, "GET", "/kv/k", None).await.unwrap().status, 200);
    assert!(c.client().list_vms().await.unwrap().is_empty());

    // A caller that trusts the fleet and has the token, but no fleet
    // certificate: not a cloudlet, no handoff.
    let ca = pki::ca_paths(&fleet).0;
    let r = trusting(&ca)
        .post(format!("{}/v1/handoff/prepare", b.url()))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(body.contains("mutual TLS"), "{body}");

    // Within the fleet: the VM moves over mutual TLS and serves at B.
    let report = a
        .client()
        .handoff("tls-mover", &b.url(), Some(TOKEN))
        .await
        .expect("a handoff within the fleet");
    println!(
        "moved over mutual TLS: {} ms total, {} ms downtime",
        report.total_ms,
        report.downtime_ms()
    );
    let there = b.client().get_vm(&vm.id).await.unwrap();
    assert_eq!(there.state, VmState::Running);
    let port = port_of(&there.ports[0].endpoint);
    let r = http(port, "GET", "/kv/k", None).await.unwrap();
    assert_eq!((r.status, r.text()), (200, "v".to_string()));
    assert!(!qemu_running(&a, &vm.id));
}
