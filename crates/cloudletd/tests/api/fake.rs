//! The REST layer against a fake of the domain trait (`CloudletOps`): the
//! one error -> status map, the bodies a source relies on, and that a
//! request body reaches the domain as a plain byte stream. No QEMU here:
//! the domain itself is tested on real QEMU in the other tests.

use std::sync::Arc;

use cloudlet_api::{
    ApiError, BaseVmInfo, CloudletInfo, CreateVmRequest, HandoffArrival, HandoffCommitted,
    HandoffLoaded, HandoffOffer, HandoffPrepared, HandoffReport, HandoffRequest, VmInfo, VmState,
};
use cloudlet_handoff::memcheck::DiffReport;
use cloudletd::commands::ByteStream;
use cloudletd::commands::Caller;
use cloudletd::core::cloudlet::{BaseOpError, CreateVmError, VmOpError};
use cloudletd::handoff::{HandoffError, ReceiveHandoffError};
use cloudletd::CloudletOps;
use futures::StreamExt;

const TOKEN: &str = "t0ken";

/// Answers by id: each id stands for one outcome.
#[derive(Clone, Default)]
struct Fake;

fn report() -> DiffReport {
    DiffReport {
        chunks: vec![(5, vec![0x1234, u64::MAX])],
    }
}

impl CloudletOps for Fake {
    fn info(&self) -> CloudletInfo {
        serde_json::from_value(serde_json::json!({
            "name": "fake", "version": "0", "capacity": {"vcpus": 1, "memory_mib": 1, "vms": 1},
            "free": {"vcpus": 1, "memory_mib": 1, "vms": 1}, "base_vms": [], "flavors": [],
            "accel": "tcg", "handoff_protocol": 1
        }))
        .expect("a CloudletInfo")
    }
    fn list_bases(&self) -> Result<Vec<BaseVmInfo>, BaseOpError> {
        Ok(Vec::new())
    }
    async fn import_base(&self, _file: std::path::PathBuf) -> Result<BaseVmInfo, BaseOpError> {
        Err(BaseOpError::InUse {
            name: "b".into(),
            vms: vec!["one (1)".into()],
        })
    }
    fn delete_base(&self, name: &str) -> Result<(), BaseOpError> {
        Err(BaseOpError::InUse {
            name: name.into(),
            vms: vec!["one (1)".into(), "two (2)".into()],
        })
    }
    fn list_vms(&self, _caller: &Caller) -> Vec<VmInfo> {
        Vec::new()
    }
    fn get_vm(&self, _caller: &Caller, id: &str) -> Result<VmInfo, VmOpError> {
        Err(match id {
            "moving" => VmOpError::Busy {
                id: id.into(),
                state: VmState::HandingOff,
                what: "get",
            },
            _ => VmOpError::NotFound(id.into()),
        })
    }
    async fn create_vm(
        &self,
        _caller: &Caller,
        _req: CreateVmRequest,
        _source: cloudletd::synth::fetch::OverlaySource,
    ) -> Result<VmInfo, CreateVmError> {
        Err(CreateVmError::OverCapacity {
            detail: "full".into(),
        })
    }
    async fn delete_vm(&self, _caller: &Caller, id: &str) -> Result<(), VmOpError> {
        Err(VmOpError::Busy {
            id: id.into(),
            state: VmState::HandingOff,
            what: "delete",
        })
    }
    fn metrics(&self) -> String {
        String::new()
    }
    async fn handoff_vm(
        &self,
        _caller: &Caller,
        id: &str,
        _req: HandoffRequest,
    ) -> Result<HandoffReport, HandoffError> {
        Err(match id {
            "unknown-outcome" => HandoffError::CommitUnknown {
                url: "http://b".into(),
                detail: "no answer".into(),
            },
            _ => HandoffError::NotFound(id.into()),
        })
    }
    async fn prepare_incoming(
        &self,
        offer: HandoffOffer,
    ) -> Result<HandoffPrepared, ReceiveHandoffError> {
        Err(ReceiveHandoffError::Protocol {
            ours: 1,
            theirs: offer.protocol,
        })
    }
    async fn receive_stream(
        &self,
        hid: &str,
        mut body: ByteStream,
    ) -> Result<HandoffLoaded, ReceiveHandoffError> {
        if hid != "count" {
            return Err(ReceiveHandoffError::Truncated);
        }
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            n += chunk
                .map_err(|e| ReceiveHandoffError::Body(e.to_string()))?
                .len() as u64;
        }
        Ok(HandoffLoaded {
            raw_bytes: n,
            disk_bytes: 0,
            memory_digest: None,
        })
    }
    async fn commit_incoming(&self, hid: &str) -> Result<HandoffCommitted, ReceiveHandoffError> {
        Err(match hid {
            "differs" => ReceiveHandoffError::MemoryDiffers(report()),
            "stale" => ReceiveHandoffError::StaleGeneration {
                id: "vm".into(),
                known: 4,
                offered: 3,
            },
            "busy" => ReceiveHandoffError::WrongStage {
                hid: hid.into(),
                stage: "streaming",
                what: "a commit",
            },
            _ => ReceiveHandoffError::UnknownHandoff(hid.into()),
        })
    }
    fn incoming_arrival(&self, hid: &str) -> Result<HandoffArrival, ReceiveHandoffError> {
        Err(ReceiveHandoffError::UnknownHandoff(hid.into()))
    }
    async fn abort_incoming(&self, hid: &str) -> Result<(), ReceiveHandoffError> {
        Err(ReceiveHandoffError::UnknownHandoff(hid.into()))
    }

    fn events(&self) -> tokio::sync::broadcast::Receiver<cloudlet_api::events::CloudletEvent> {
        tokio::sync::broadcast::channel(1).1
    }

    fn sees(&self, _caller: &Caller, _vm_id: &str) -> bool {
        true
    }

    fn handoffs(
        &self,
        _caller: &Caller,
        _limit: usize,
    ) -> Vec<cloudlet_api::events::HandoffRecord> {
        Vec::new()
    }

    fn handoff(&self, _caller: &Caller, _id: &str) -> Option<cloudlet_api::events::HandoffRecord> {
        None
    }

    fn session_opens(&self, _id: &str, _token: &str) -> Option<String> {
        None
    }

    async fn drain(&self) -> Result<cloudlet_api::DrainReport, cloudletd::drain::DrainError> {
        Ok(cloudlet_api::DrainReport {
            vms: vec![],
            drained: true,
        })
    }

    fn resume(&self) -> Result<(), cloudletd::drain::DrainError> {
        Ok(())
    }
}

async fn serve() -> String {
    let spool = tempfile::tempdir().expect("tempdir").keep();
    let state = Arc::new(cloudletd::api::AppState {
        ops: Fake,
        tokens: vec![TOKEN.into()],
        tenant_tokens: vec![],
        spool,
        fleet_only_handoffs: false,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, cloudletd::api::router(state)).await });
    url
}

async fn call(
    url: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{url}{path}"))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await.expect("an answer");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("a body"))
}

fn error(body: &str) -> ApiError {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not an API error ({e}): {body}"))
}

#[tokio::test]
async fn domain_errors_map_to_their_status_and_kind() {
    let url = serve().await;
    use reqwest::Method as M;
    let cases: &[(M, &str, Option<&str>, u16, &str)] = &[
        (M::GET, "/v1/vms/nope", None, 404, "not_found"),
        // A VM that exists but is busy is never a 404.
        (M::GET, "/v1/vms/moving", None, 409, "busy"),
        (M::DELETE, "/v1/vms/moving", None, 409, "busy"),
        (M::DELETE, "/v1/base-vms/b", None, 409, "busy"),
        (
            M::POST,
            "/v1/vms/unknown-outcome/handoff",
            Some(r#"{"destination":"http://b"}"#),
            504,
            "commit_unknown",
        ),
        (
            M::POST,
            "/v1/handoff/stale/commit",
            Some("{}"),
            409,
            "stale_generation",
        ),
        (
            M::POST,
            "/v1/handoff/busy/commit",
            Some("{}"),
            409,
            "wrong_stage",
        ),
        (
            M::POST,
            "/v1/handoff/gone/commit",
            Some("{}"),
            404,
            "not_found",
        ),
        (
            M::POST,
            "/v1/handoff/x/stream",
            Some("junk"),
            400,
            "invalid_stream",
        ),
    ];
    for (method, path, body, status, kind) in cases {
        let mut req = reqwest::Client::new()
            .request(method.clone(), format!("{url}{path}"))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("an answer");
        let got = resp.status().as_u16();
        let text = resp.text().await.expect("a body");
        assert_eq!(
            (got, error(&text).kind.as_str()),
            (*status, *kind),
            "{method} {path}: {text}"
        );
    }
}

#[tokio::test]
async fn a_memory_difference_refusal_carries_its_report() {
    let url = serve().await;
    let (status, body) = call(
        &url,
        reqwest::Method::POST,
        "/v1/handoff/differs/commit",
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let e = error(&body);
    assert_eq!(e.kind, "memory_differs");
    let wire = e.memory_differs.expect("the report in the body");
    assert_eq!(cloudletd::handoff::peer::diff_report(&wire), Some(report()));
}

#[tokio::test]
async fn a_protocol_mismatch_is_refused_with_its_kind() {
    let url = serve().await;
    let offer = serde_json::json!({
        "protocol": 99, "handoff_id": "h", "vm_id": "v", "name": "n", "generation": 1,
        "base_id": "b", "flavor": "small", "app": {"name": "a", "ports": []}, "overlay": "o", "source": "s"
    });
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/handoff/prepare"))
        .bearer_auth(TOKEN)
        .json(&offer)
        .send()
        .await
        .expect("an answer");
    assert_eq!(resp.status().as_u16(), 409);
    let e = error(&resp.text().await.expect("a body"));
    assert_eq!(e.kind, "protocol_mismatch");
    assert!(e.error.contains("99"), "{}", e.error);
}

#[tokio::test]
async fn a_session_body_reaches_the_domain_whole() {
    let url = serve().await;
    let body: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
    let (status, text) = call(
        &url,
        reqwest::Method::POST,
        "/v1/handoff/count/stream",
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let loaded: HandoffLoaded = serde_json::from_str(&text).expect("loaded");
    assert_eq!(loaded.raw_bytes, 3_000_000);
}

#[tokio::test]
async fn calls_that_change_something_need_the_token() {
    let url = serve().await;
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/handoff/differs/commit"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("an answer");
    assert_eq!(resp.status().as_u16(), 401);
    let (status, _) = call(&url, reqwest::Method::GET, "/v1/vms/nope", None).await;
    assert_eq!(status, 404);
    // The scheme is case-insensitive (RFC 7235); a wrong token or an
    // empty one is still a 401.
    for (header, want) in [
        (format!("bearer {TOKEN}"), 409),
        (format!("BEARER {TOKEN}"), 409),
        ("Bearer wrong".to_string(), 401),
        ("Bearer ".to_string(), 401),
        (format!("Basic {TOKEN}"), 401),
    ] {
        let resp = reqwest::Client::new()
            .delete(format!("{url}/v1/vms/nope"))
            .header("authorization", &header)
            .send()
            .await
            .expect("an answer");
        assert_eq!(resp.status().as_u16(), want, "{header}");
    }
}

#[tokio::test]
async fn bad_bodies_get_the_api_error_body_and_the_right_status() {
    let url = serve().await;
    let send = |path: &'static str, ctype: &'static str, body: Vec<u8>| {
        let url = url.clone();
        async move {
            let resp = reqwest::Client::new()
                .post(format!("{url}{path}"))
                .bearer_auth(TOKEN)
                .header("content-type", ctype)
                .body(body)
                .send()
                .await
                .expect("an answer");
            let status = resp.status().as_u16();
            (status, error(&resp.text().await.unwrap()))
        }
    };
    const JSON: &str = "application/json";
    let huge = {
        let mut b = b"{\"destination\":\"".to_vec();
        b.extend(std::iter::repeat_n(b'x', 3 << 20));
        b.extend(b"\"}");
        b
    };
    for path in ["/v1/vms/x/handoff", "/v1/handoff/prepare", "/v1/vms"] {
        let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
            (
                "application/json",
                b"{not json".to_vec(),
                400,
                "invalid_json",
            ),
            (JSON, b"{\"name\": 5}".to_vec(), 422, "invalid_request"),
            (JSON, huge.clone(), 413, "too_large"),
        ];
        for (ctype, body, status, kind) in cases {
            let (got, e) = send(path, ctype, body).await;
            assert_eq!(
                (got, e.kind.as_str()),
                (status, kind),
                "{path}: {}",
                e.error
            );
        }
    }
    // The JSON-only endpoints name the media type they take (POST
    // /v1/vms also takes an overlay file as application/octet-stream).
    for path in ["/v1/vms/x/handoff", "/v1/handoff/prepare"] {
        let (got, e) = send(path, "text/plain", b"{}".to_vec()).await;
        assert_eq!(
            (got, e.kind.as_str()),
            (415, "unsupported_media_type"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_method_no_route_has_is_a_405_for_everyone() {
    let url = serve().await;
    // Without a credential too: no operation is there to authorize.
    for (method, path, allow) in [
        ("TRACE", "/v1/vms/0", "GET,DELETE"),
        ("PUT", "/v1/vms", "GET,POST"),
        ("PATCH", "/v1/handoff/prepare", "POST"),
        ("DELETE", "/v1/cloudlet", "GET"),
    ] {
        let resp = reqwest::Client::new()
            .request(method.parse().unwrap(), format!("{url}{path}"))
            .send()
            .await
            .expect("an answer");
        assert_eq!(resp.status().as_u16(), 405, "{method} {path}");
        let mut allowed: Vec<String> = resp
            .headers()
            .get("allow")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(',')
            .map(|m| m.trim().to_string())
            .filter(|m| m != "HEAD")
            .collect();
        allowed.sort();
        let mut want: Vec<&str> = allow.split(',').collect();
        want.sort();
        assert_eq!(allowed, want, "{method} {path}");
        let e = error(&resp.text().await.unwrap());
        assert_eq!(e.kind, "method_not_allowed", "{method} {path}: {}", e.error);
    }
    // A route's own methods still need the token.
    let resp = reqwest::Client::new()
        .delete(format!("{url}/v1/vms/0"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}
