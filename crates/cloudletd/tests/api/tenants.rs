//! Tenants and credentials over every operation of the OpenAPI document
//! (read from the code's document, not a hand list), against a live daemon
//! with real VMs of two tenants: no credential and a wrong one get the
//! documented 401, another tenant's credential the documented 403 (calls
//! that are an operator's) or 404 (another tenant's VM), and none of it
//! changes anything. Quotas refuse before a VM starts. Names are each
//! tenant's own.

use std::time::Duration;

use cloudlet_api::VmState;
use cloudlet_client::{Client, ClientError};
use cloudlet_testkit::http;
use serde_json::Value;

use crate::common::{kvstore_overlay, Daemon};

const ACME: &str = "acme-token-0123456789abcdef";
const GLOBEX: &str = "globex-token-0123456789abcdef";

/// Two tenants: acme may hold one VM here, globex is limited only by the
/// cloudlet's capacity.
pub const TENANTS: &str = "[[tenants]]\nname = \"acme\"\ntokens = [\"acme-token-0123456789abcdef\"]\n[tenants.quota]\nvms = 1\n[[tenants]]\nname = \"globex\"\ntokens = [\"globex-token-0123456789abcdef\"]\n";

fn status(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, kind, .. } => (status, kind),
        other => panic!("expected an API refusal, got {other}"),
    }
}

/// A body the operation takes (so that what answers is the credential's
/// check, not the body's): a valid one where it matters.
fn body_for(op_id: &str) -> Option<(&'static str, Vec<u8>)> {
    let json = |v: Value| Some(("application/json", v.to_string().into_bytes()));
    match op_id {
        "create_vm" => json(serde_json::json!({"overlay": "http://127.0.0.1:9/none.overlay"})),
        "handoff_vm" => json(serde_json::json!({"destination": "http://127.0.0.1:9"})),
        "handoff_prepare" => json(serde_json::json!({})),
        "import_base" | "handoff_stream" => Some(("application/octet-stream", Vec::new())),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_operation_keeps_each_tenant_to_its_own_vms() {
    let overlay = kvstore_overlay().await;
    let d = Daemon::start(TENANTS).await;
    let url = d.url();
    let (acme, globex) = (
        Client::new(&url, Some(ACME.into())),
        Client::new(&url, Some(GLOBEX.into())),
    );
    let gx = globex
        .create_vm_upload(&overlay, Some("gx"), None)
        .await
        .unwrap();
    assert_eq!(gx.tenant.as_deref(), Some("globex"));
    let ac = acme
        .create_vm_upload(&overlay, Some("ac"), None)
        .await
        .unwrap();
    assert_eq!(ac.tenant.as_deref(), Some("acme"));
    // acme's quota is one VM: the second is refused before it starts.
    let (s, kind) = status(
        acme.create_vm_upload(&overlay, Some("ac2"), None)
            .await
            .unwrap_err(),
    );
    assert_eq!((s, kind.as_str()), (403, "quota_exceeded"));
    let names = |v: Vec<cloudlet_api::VmInfo>| {
        let mut n: Vec<String> = v.into_iter().map(|v| v.name).collect();
        n.sort();
        n
    };
    assert_eq!(names(acme.list_vms().await.unwrap()), ["ac"]);
    assert_eq!(names(globex.list_vms().await.unwrap()), ["gx"]);
    assert_eq!(names(d.client().list_vms().await.unwrap()), ["ac", "gx"]);
    let port = gx.ports[0].host;
    http(port, "PUT", "/kv/k", Some(b"v".to_vec()))
        .await
        .unwrap();
    // The session credential of gx reads gx, and nothing else.
    let session = Client::new(&url, gx.session_token.clone());
    assert_eq!(session.get_vm("gx").await.unwrap().id, gx.id);
    assert_eq!(status(session.get_vm("ac").await.unwrap_err()).0, 401);
    assert_eq!(status(session.list_vms().await.unwrap_err()).0, 401);

    let bases: Vec<String> = d
        .client()
        .info()
        .await
        .unwrap()
        .base_vms
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert!(!bases.is_empty());
    let doc: Value = serde_json::from_str(&cloudletd::api::openapi_json()).unwrap();
    let raw = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut checked = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or_default().to_string();
            let documented: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .filter_map(|k| k.parse().ok())
                .collect();
            let target = path
                .replace("{id}", &gx.id)
                .replace("{name}", &bases[0])
                .replace("{hid}", "0123456789abcdef")
                .replace("{handoff_id}", "0123456789abcdef");
            let send = |token: Option<&str>| {
                let mut r = raw.request(
                    method.to_uppercase().parse().unwrap(),
                    format!("{url}{target}"),
                );
                if let Some(t) = token {
                    r = r.bearer_auth(t);
                }
                if let Some((ctype, body)) = body_for(&id) {
                    r = r.header("content-type", ctype).body(body);
                }
                async move { r.send().await.unwrap().status().as_u16() }
            };
            let secured = op.get("security").is_some();
            let anonymous = send(None).await;
            if !secured {
                assert_eq!(id, "ping", "only the liveness probe is public");
                assert_eq!(anonymous, 200, "{method} {path}");
                continue;
            }
            assert!(documented.contains(&401), "{id}: 401 documented");
            assert_eq!(anonymous, 401, "{method} {path} without a credential");
            assert_eq!(
                send(Some("not-a-token")).await,
                401,
                "{method} {path} with a wrong credential"
            );
            // acme's credential on globex's VM, and on the cloudlet itself.
            let got = send(Some(ACME)).await;
            let operators = op["responses"]["403"]["description"]
                .as_str()
                .is_some_and(|d| d.contains("Not an operator's credential"));
            let expected = if operators {
                Some(403)
            } else if path.contains("{id}") {
                Some(404)
            } else {
                None
            };
            match expected {
                Some(e) => assert_eq!(got, e, "{method} {path} by another tenant"),
                None => assert!(
                    got != 401 && got != 403,
                    "{method} {path} by a tenant: {got}"
                ),
            }
            assert!(
                documented.contains(&got),
                "{method} {path}: {got} is not among the documented {documented:?}"
            );
            checked.push((id, got));
        }
    }
    // The operator's calls (by the document's own word) are the ones that
    // change the cloudlet, and every operation was tried.
    for op in ["drain", "resume", "import_base", "delete_base", "metrics"] {
        assert!(checked.contains(&(op.into(), 403)), "{op}: {checked:?}");
    }
    for op in ["get_vm", "delete_vm", "handoff_vm"] {
        assert!(checked.contains(&(op.into(), 404)), "{op}: {checked:?}");
    }
    assert!(checked.len() >= 20, "{checked:?}");

    // Nothing changed: both VMs run as they did, gx still holds its data,
    // the cloudlet is not draining, its base VMs are there.
    let op = d.client();
    for (name, id) in [("gx", &gx.id), ("ac", &ac.id)] {
        let v = op.get_vm(name).await.unwrap();
        assert_eq!((&v.id, v.state, v.generation), (id, VmState::Running, 1));
    }
    assert_eq!(names(op.list_vms().await.unwrap()), ["ac", "gx"]);
    assert_eq!(
        http(port, "GET", "/kv/k", None).await.unwrap().text(),
        "v",
        "gx still serves its data"
    );
    let info = op.info().await.unwrap();
    let after: Vec<String> = info.base_vms.into_iter().map(|b| b.name).collect();
    assert_eq!(after, bases, "the base VMs are all there");
    // Not in maintenance (its mark, `home/draining`, is not there).
    assert!(!d.home.join("draining").exists());
    // Names are each tenant's own: globex names a VM "ac" too (acme's is
    // not there for it, nor told by a 409), and each tenant's "ac" is its
    // own; a name is still one VM within a tenant.
    let (s, kind) = status(
        globex
            .create_vm_upload(&overlay, Some("gx"), None)
            .await
            .unwrap_err(),
    );
    assert_eq!((s, kind.as_str()), (409, "name_taken"));
    let gac = globex
        .create_vm_upload(&overlay, Some("ac"), None)
        .await
        .unwrap();
    assert_ne!(gac.id, ac.id);
    assert_eq!(globex.get_vm("ac").await.unwrap().id, gac.id);
    assert_eq!(acme.get_vm("ac").await.unwrap().id, ac.id);
    // The operator names a VM that two tenants have by its id.
    assert_eq!(status(op.get_vm("ac").await.unwrap_err()).0, 404);
    assert_eq!(
        op.get_vm(&gac.id).await.unwrap().tenant.as_deref(),
        Some("globex")
    );
    globex.delete_vm("ac").await.unwrap();
    let v = acme.get_vm("ac").await.unwrap();
    assert_eq!((v.id, v.state), (ac.id.clone(), VmState::Running));
    assert_eq!(
        op.get_vm("ac").await.unwrap().id,
        ac.id,
        "one left: the name is clear"
    );

    // globex deletes its own VM; acme could not.
    globex.delete_vm("gx").await.unwrap();
    assert_eq!(names(op.list_vms().await.unwrap()), ["ac"]);
}
