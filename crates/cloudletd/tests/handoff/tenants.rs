//! A tenant's VM moves as that tenant's: its own credential starts the
//! move (another tenant's finds no such VM), the destination records the
//! VM under the same tenant and checks that tenant's quota there first (a
//! destination where the quota is full refuses, and the VM serves on at
//! the source).

use cloudlet_api::VmState;
use cloudlet_client::{Client, ClientError};
use cloudlet_testkit::http;

use crate::common::{kvstore_overlay, Daemon, TOKEN};

const ACME: &str = "acme-token-0123456789abcdef";
const GLOBEX: &str = "globex-token-0123456789abcdef";

/// acme and globex, globex allowed `globex_vms` VMs (none: no quota).
fn tenants(globex_vms: Option<u32>) -> String {
    let quota = globex_vms.map_or(String::new(), |n| format!("[tenants.quota]\nvms = {n}\n"));
    format!("[[tenants]]\nname = \"acme\"\ntokens = [\"{ACME}\"]\n[[tenants]]\nname = \"globex\"\ntokens = [\"{GLOBEX}\"]\n{quota}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_vm_moves_as_its_own_within_its_quota_there() {
    let overlay = kvstore_overlay().await;
    let a = Daemon::start(&tenants(None)).await;
    let full = Daemon::start(&tenants(Some(0))).await;
    let c = Daemon::start(&tenants(None)).await;
    let at = |d: &Daemon, token: &str| Client::new(&d.url(), Some(token.into()));
    let vm = at(&a, GLOBEX)
        .create_vm_upload(&overlay, Some("gx"), None)
        .await
        .unwrap();
    let port = vm.ports[0].host;
    http(port, "PUT", "/kv/k", Some(b"v".to_vec()))
        .await
        .unwrap();

    // Another tenant cannot move it: there is no such VM for it.
    match at(&a, ACME).handoff("gx", &c.url(), Some(TOKEN)).await {
        Err(ClientError::Api { status: 404, .. }) => {}
        other => panic!("acme moved globex's VM: {other:?}"),
    }
    // Where globex's quota is full, the destination refuses before
    // anything is sent; the VM serves on here.
    let err = at(&a, GLOBEX)
        .handoff("gx", &full.url(), Some(TOKEN))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("quota"), "{err}");
    let v = at(&a, GLOBEX).get_vm("gx").await.unwrap();
    assert_eq!((v.state, v.generation), (VmState::Running, 1), "{v:?}");
    assert_eq!(http(port, "GET", "/kv/k", None).await.unwrap().text(), "v");
    assert!(full.client().list_vms().await.unwrap().is_empty());

    // Where it fits, it runs as globex's VM.
    let report = at(&a, GLOBEX)
        .handoff("gx", &c.url(), Some(TOKEN))
        .await
        .unwrap_or_else(|e| panic!("{e}\n--- source\n{}\n--- destination\n{}", a.log(), c.log()));
    assert_eq!(report.vm.tenant.as_deref(), Some("globex"));
    let there = at(&c, GLOBEX).get_vm("gx").await.unwrap();
    assert_eq!(
        (there.state, there.generation, there.tenant.as_deref()),
        (VmState::Running, 2, Some("globex"))
    );
    assert!(at(&c, ACME).list_vms().await.unwrap().is_empty());
    match at(&c, ACME).get_vm("gx").await {
        Err(ClientError::Api { status: 404, .. }) => {}
        other => panic!("acme sees globex's VM: {other:?}"),
    }
    let port = there.ports[0].host;
    assert_eq!(http(port, "GET", "/kv/k", None).await.unwrap().text(), "v");
    // The history at the source is globex's, not acme's.
    assert_eq!(at(&a, GLOBEX).handoffs().await.unwrap().len(), 2);
    assert!(at(&a, ACME).handoffs().await.unwrap().is_empty());
}
