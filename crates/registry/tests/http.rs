//! The registry over real sockets: a server on 127.0.0.1:0 in this process,
//! a temporary directory as store, real overlays made by `cloudlet-overlay`.

mod common;

use std::path::{Path, PathBuf};

use cloudlet_registry::{
    list_overlays, push_overlay, serve_listener, ErrorBody, PushError, RegistryConfig,
    RegistryState, StorageLocation,
};
use reqwest::{header, StatusCode};
use tempfile::TempDir;

const TOKEN: &str = "s3cret-token";

struct Registry {
    url: String,
    store: TempDir,
    work: TempDir,
    http: reqwest::Client,
}

impl Registry {
    async fn start(tokens: &[&str]) -> Registry {
        Registry::start_with(tokens, Default::default()).await
    }

    async fn start_with(
        tokens: &[&str],
        signatures: cloudlet_overlay::signature::SignaturePolicy,
    ) -> Registry {
        let store = tempfile::tempdir().unwrap();
        let mut config = RegistryConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            StorageLocation::Dir(store.path().join("data")),
        );
        config.push_tokens = tokens.iter().map(|t| t.to_string()).collect();
        config.signatures = signatures;
        let state = RegistryState::open(&config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve_listener(listener, state));
        Registry {
            url,
            store,
            work: tempfile::tempdir().unwrap(),
            http: reqwest::Client::new(),
        }
    }

    fn overlay(&self, name: &str, seed: u64) -> (PathBuf, Vec<u8>) {
        let path = common::make_overlay(self.work.path(), name, seed);
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    fn url(&self, name: &str) -> String {
        format!("{}/v1/overlays/{name}", self.url)
    }

    /// Every file in the store, staging files included.
    fn stored_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(self.store.path(), &mut out);
        out
    }

    async fn put(&self, name: &str, token: Option<&str>, body: Vec<u8>) -> reqwest::Response {
        let mut req = self.http.put(self.url(name)).body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    async fn get_range(&self, name: &str, range: &str) -> reqwest::Response {
        self.http
            .get(self.url(name))
            .header(header::RANGE, range)
            .send()
            .await
            .unwrap()
    }
}

async fn error_kind(response: reqwest::Response) -> String {
    let body: ErrorBody = response.json().await.unwrap();
    assert!(!body.error.is_empty());
    body.kind
}

fn header_of(r: &reqwest::Response, name: header::HeaderName) -> &str {
    r.headers()
        .get(&name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn health() {
    let reg = Registry::start(&[TOKEN]).await;
    let r = reqwest::get(format!("{}/health", reg.url)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = reqwest::get(format!("{}/v2/nothing", reg.url))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_kind(r).await, "not_found");
}

#[tokio::test]
async fn range_requests_of_every_form() {
    let reg = Registry::start(&[TOKEN]).await;
    let (path, file) = reg.overlay("app", 1);
    push_overlay(&reg.url, TOKEN, "app", &path).await.unwrap();
    let n = file.len() as u64;
    assert!(n > 1000, "overlay of {n} bytes is too small for this test");

    // No Range: the whole file.
    let r = reg.http.get(reg.url("app")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header_of(&r, header::ACCEPT_RANGES), "bytes");
    assert_eq!(header_of(&r, header::CONTENT_LENGTH), n.to_string());
    let etag = header_of(&r, header::ETAG).to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let last_modified = header_of(&r, header::LAST_MODIFIED).to_string();
    assert_eq!(r.bytes().await.unwrap(), file);

    // (Range, first byte, end exclusive)
    let cases = [
        ("bytes=0-0".to_string(), 0, 1),
        ("bytes=0-127".to_string(), 0, 128),
        (format!("bytes=128-{}", n - 1), 128, n),
        (format!("bytes=100-{}", n + 1000), 100, n),
        (format!("bytes={}-{}", n - 1, n - 1), n - 1, n),
        ("bytes=10-".to_string(), 10, n),
        (format!("bytes={}-", n - 1), n - 1, n),
        ("bytes=-1".to_string(), n - 1, n),
        ("bytes=-100".to_string(), n - 100, n),
        (format!("bytes=-{n}"), 0, n),
        (format!("bytes=-{}", n + 50), 0, n),
    ];
    for (range, a, b) in cases {
        let r = reg.get_range("app", &range).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header_of(&r, header::CONTENT_RANGE),
            format!("bytes {}-{}/{n}", a, b - 1),
            "{range}"
        );
        assert_eq!(header_of(&r, header::CONTENT_LENGTH), (b - a).to_string());
        assert_eq!(header_of(&r, header::ACCEPT_RANGES), "bytes");
        assert_eq!(header_of(&r, header::ETAG), etag);
        let body = r.bytes().await.unwrap();
        assert!(
            body == file[a as usize..b as usize],
            "{range}: bytes differ"
        );
    }

    // Ranges that must be ignored: the whole file.
    for range in ["bytes=5-3", "bytes=0-1,4-5", "items=0-1", "bytes=x-"] {
        let r = reg.get_range("app", range).await;
        assert_eq!(r.status(), StatusCode::OK, "{range}");
        assert_eq!(r.bytes().await.unwrap(), file, "{range}");
    }

    // If-Range: honoured for the current version only.
    for (if_range, honoured) in [
        (etag.as_str(), true),
        (last_modified.as_str(), true),
        ("\"other\"", false),
        ("Thu, 01 Jan 1970 00:00:00 GMT", false),
    ] {
        let r = reg
            .http
            .get(reg.url("app"))
            .header(header::RANGE, "bytes=0-9")
            .header(header::IF_RANGE, if_range)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.bytes().await.unwrap();
        if honoured {
            assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{if_range}");
            assert_eq!(body, file[..10]);
        } else {
            assert_eq!(status, StatusCode::OK, "{if_range}");
            assert_eq!(body, file);
        }
    }

    // If-Match.
    let r = reg
        .http
        .get(reg.url("app"))
        .header(header::IF_MATCH, "\"stale\"")
        .header(header::RANGE, "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(error_kind(r).await, "precondition_failed");
    let r = reg
        .http
        .get(reg.url("app"))
        .header(header::IF_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), file);
}

#[tokio::test]
async fn unsatisfiable_ranges_are_416() {
    let reg = Registry::start(&[TOKEN]).await;
    let (path, file) = reg.overlay("app", 2);
    push_overlay(&reg.url, TOKEN, "app", &path).await.unwrap();
    let n = file.len();
    for range in [
        format!("bytes={n}-"),
        format!("bytes={n}-{}", n + 10),
        format!("bytes={}-", n + 1),
        "bytes=-0".to_string(),
    ] {
        let r = reg.get_range("app", &range).await;
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header_of(&r, header::CONTENT_RANGE), format!("bytes */{n}"));
        assert_eq!(error_kind(r).await, "range_not_satisfiable");
    }
    let r = reg.get_range("missing", "bytes=0-1").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn head_gives_size_etag_and_ranges() {
    let reg = Registry::start(&[TOKEN]).await;
    let (path, file) = reg.overlay("app", 3);
    push_overlay(&reg.url, TOKEN, "app", &path).await.unwrap();
    let r = reg.http.head(reg.url("app")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header_of(&r, header::CONTENT_LENGTH),
        file.len().to_string()
    );
    assert_eq!(header_of(&r, header::ACCEPT_RANGES), "bytes");
    let etag = header_of(&r, header::ETAG).to_string();
    let g = reg.http.get(reg.url("app")).send().await.unwrap();
    assert_eq!(header_of(&g, header::ETAG), etag);
    let r = reg.http.head(reg.url("missing")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn push_needs_a_valid_token() {
    let reg = Registry::start(&[TOKEN, "second-token"]).await;
    let (path, file) = reg.overlay("app", 4);
    for token in [None, Some("wrong"), Some(""), Some("s3cret-token2")] {
        let r = reg.put("app", token, file.clone()).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(error_kind(r).await, "unauthorized");
    }
    // Not a bearer token.
    let r = reg
        .http
        .put(reg.url("app"))
        .basic_auth("user", Some(TOKEN))
        .body(file.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(reg.stored_files(), Vec::<PathBuf>::new());
    let err = push_overlay(&reg.url, "wrong", "app", &path)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PushError::Refused { status: 401, kind, .. } if kind == "unauthorized"),
        "{err:?}"
    );
    assert_eq!(reg.stored_files(), Vec::<PathBuf>::new());
    assert!(list_overlays(&reg.url).await.unwrap().is_empty());

    // Any configured token works.
    let r = reg.put("app", Some("second-token"), file.clone()).await;
    assert_eq!(r.status(), StatusCode::CREATED);

    // A registry without tokens is read-only.
    let ro = Registry::start(&[]).await;
    let r = ro.put("app", Some(TOKEN), file).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(ro.stored_files(), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn bad_overlays_are_refused_and_leave_nothing() {
    let reg = Registry::start(&[TOKEN]).await;
    let (_, file) = reg.overlay("app", 5);
    let mut corrupted = file.clone();
    let last = corrupted.len() - 10;
    corrupted[last] ^= 1;
    let mut bad_header = file.clone();
    bad_header[20] ^= 1;
    let mut too_long = file.clone();
    too_long.extend_from_slice(b"trailing");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"this is not an overlay at all, just text".repeat(100),
        ),
        ("empty", Vec::new()),
        ("header only", file[..128].to_vec()),
        ("truncated manifest", file[..200].to_vec()),
        ("one byte short", file[..file.len() - 1].to_vec()),
        ("corrupted segment", corrupted),
        ("corrupted header", bad_header),
        ("trailing data", too_long),
    ];
    for (what, body) in cases {
        let r = reg.put("app", Some(TOKEN), body).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{what}");
        let e: ErrorBody = r.json().await.unwrap();
        assert_eq!(e.kind, "invalid_overlay", "{what}");
        assert!(
            e.error.starts_with("Overlay refused: "),
            "{what}: {}",
            e.error
        );
        assert_eq!(reg.stored_files(), Vec::<PathBuf>::new(), "{what}");
        let r = reg.http.get(reg.url("app")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{what}");
    }

    // A Content-Length that disagrees with the overlay header: refused
    // with the same words as `cloudlet overlay inspect`.
    let r = reg
        .http
        .put(reg.url("app"))
        .bearer_auth(TOKEN)
        .header(header::CONTENT_LENGTH, file.len() - 1)
        .body(reqwest::Body::wrap_stream(futures::stream::iter([Ok::<
            _,
            std::io::Error,
        >(
            bytes::Bytes::copy_from_slice(&file[..file.len() - 1]),
        )])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: ErrorBody = r.json().await.unwrap();
    assert!(
        e.error.contains(&format!(
            "Overlay truncated at byte {}, in segment",
            file.len() - 1
        )),
        "{}",
        e.error
    );
    assert_eq!(reg.stored_files(), Vec::<PathBuf>::new());

    // A refused push leaves the previous version in place.
    let r = reg.put("app", Some(TOKEN), file.clone()).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = reg
        .put("app", Some(TOKEN), file[..file.len() / 2].to_vec())
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = reg.http.get(reg.url("app")).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), file);
    assert_eq!(reg.stored_files().len(), 1);
}

#[tokio::test]
async fn invalid_names_are_400() {
    let reg = Registry::start(&[TOKEN]).await;
    let long = "a".repeat(129);
    for name in [".hidden", ".a", "a%20b", "a*b", "caf%C3%A9", long.as_str()] {
        let r = reg.http.get(reg.url(name)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{name}");
        assert_eq!(error_kind(r).await, "invalid_name");
        let r = reg.put(name, Some(TOKEN), b"x".to_vec()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{name}");
    }
    let ok = "A-z_0.9".to_string() + &"x".repeat(121);
    let r = reg.http.get(reg.url(&ok)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (path, _) = reg.overlay("app", 6);
    let err = push_overlay(&reg.url, TOKEN, "../etc", &path)
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::InvalidName(_)), "{err:?}");
}

#[tokio::test]
async fn push_get_list_replace_delete() {
    let reg = Registry::start(&[TOKEN]).await;
    let (a_path, a) = reg.overlay("a.ovl", 7);
    let (b_path, b) = reg.overlay("b.ovl", 8);

    let receipt = push_overlay(&format!("{}/", reg.url), TOKEN, "translator", &a_path)
        .await
        .unwrap();
    assert_eq!(receipt.name, "translator");
    assert_eq!(receipt.size, a.len() as u64);
    assert_eq!(receipt.base_id, "base-7");
    let r = reg.http.get(reg.url("translator")).send().await.unwrap();
    let etag_a = header_of(&r, header::ETAG).to_string();
    assert_eq!(r.bytes().await.unwrap(), a);

    push_overlay(&reg.url, TOKEN, "kvstore", &b_path)
        .await
        .unwrap();
    let list = list_overlays(&reg.url).await.unwrap();
    let names: Vec<_> = list.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["kvstore", "translator"]);
    assert_eq!(list[0].size, b.len() as u64);
    assert_eq!(list[1].size, a.len() as u64);
    assert_eq!(list[1].etag.as_deref(), Some(etag_a.as_str()));
    assert!(!list[0].last_modified.is_empty());

    // Replace: new bytes, new ETag.
    let receipt = push_overlay(&reg.url, TOKEN, "translator", &b_path)
        .await
        .unwrap();
    assert_eq!(receipt.base_id, "base-8");
    let r = reg.http.get(reg.url("translator")).send().await.unwrap();
    assert_ne!(header_of(&r, header::ETAG), etag_a);
    assert_eq!(r.bytes().await.unwrap(), b);

    // Delete.
    let r = reg.http.delete(reg.url("translator")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = reg
        .http
        .delete(reg.url("translator"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = reg.http.get(reg.url("translator")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_kind(r).await, "not_found");
    let r = reg
        .http
        .delete(reg.url("translator"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let list = list_overlays(&reg.url).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "kvstore");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_range_gets() {
    let reg = Registry::start(&[TOKEN]).await;
    let (path, file) = reg.overlay("app", 9);
    push_overlay(&reg.url, TOKEN, "app", &path).await.unwrap();
    let file = std::sync::Arc::new(file);
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let http = reg.http.clone();
        let url = reg.url("app");
        let file = file.clone();
        tasks.push(tokio::spawn(async move {
            let n = file.len() as u64;
            for i in 0..10u64 {
                let a = (t * 7919 + i * 104_729) % n;
                let b = (a + 1 + (t * 31 + i * 1013) % 20_000).min(n);
                let r = http
                    .get(&url)
                    .header(header::RANGE, format!("bytes={a}-{}", b - 1))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
                let body = r.bytes().await.unwrap();
                assert!(
                    body == file[a as usize..b as usize],
                    "task {t} range {a}-{b}"
                );
            }
            let whole = http.get(&url).send().await.unwrap().bytes().await.unwrap();
            assert!(whole == file[..]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn client_errors_are_typed() {
    let reg = Registry::start(&[TOKEN]).await;
    let missing = reg.work.path().join("missing.ovl");
    let err = push_overlay(&reg.url, TOKEN, "x", &missing)
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::Open { .. }), "{err:?}");
    let garbage = reg.work.path().join("garbage.ovl");
    std::fs::write(&garbage, b"CLOVLY\r\n garbage").unwrap();
    let err = push_overlay(&reg.url, TOKEN, "x", &garbage)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PushError::Refused { status: 400, kind, .. } if kind == "invalid_overlay"),
        "{err:?}"
    );
    // Nobody listens on port 1.
    assert!(list_overlays("http://127.0.0.1:1").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_overlay_streams_in_several_parts() {
    let reg = Registry::start(&[TOKEN]).await;
    // About 20 MiB: more than two 8 MiB upload parts.
    let path = common::make_overlay_sized(reg.work.path(), "big", 10, 5000);
    let file = std::fs::read(&path).unwrap();
    assert!(file.len() > 17 << 20, "{}", file.len());
    // Refused before the body is read: the client still gets the answer.
    let err = push_overlay(&reg.url, "wrong", "big", &path)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PushError::Refused { status: 401, .. }),
        "{err:?}"
    );
    let receipt = push_overlay(&reg.url, TOKEN, "big", &path).await.unwrap();
    assert_eq!(receipt.size, file.len() as u64);
    let r = reg.http.get(reg.url("big")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap() == file[..]);
    let a = (9 << 20) - 5;
    let r = reg
        .get_range("big", &format!("bytes={a}-{}", a + (9 << 20)))
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert!(r.bytes().await.unwrap() == file[a..a + (9 << 20) + 1]);
    assert_eq!(reg.stored_files().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_push_leaves_nothing() {
    let reg = Registry::start(&[TOKEN]).await;
    let (_, file) = reg.overlay("app", 11);
    // The client sends the header, manifest and part of the segments, then
    // its body fails and the request is cut off.
    let half = bytes::Bytes::copy_from_slice(&file[..file.len() / 2]);
    let parts: Vec<Result<bytes::Bytes, std::io::Error>> =
        vec![Ok(half), Err(std::io::Error::other("client gave up"))];
    let body = reqwest::Body::wrap_stream(futures::stream::iter(parts));
    let r = reg
        .http
        .put(reg.url("app"))
        .bearer_auth(TOKEN)
        .header(header::CONTENT_LENGTH, file.len())
        .body(body)
        .send()
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
    // The abort may run after the connection is gone.
    for _ in 0..50 {
        if reg.stored_files().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(reg.stored_files(), Vec::<PathBuf>::new());
    let r = reg.http.get(reg.url("app")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn serve_reports_a_busy_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let store = tempfile::tempdir().unwrap();
    let config = RegistryConfig::new(
        taken.local_addr().unwrap(),
        StorageLocation::Dir(store.path().to_path_buf()),
    );
    let err = cloudlet_registry::serve(config).await.unwrap_err();
    assert!(format!("{err:#}").contains("Cannot listen on"), "{err:#}");
}

/// A registry that requires signatures by its trusted key takes an overlay
/// so signed and refuses, storing nothing, an unsigned one and one signed
/// by another key, each with `untrusted_overlay` and why.
#[tokio::test]
async fn a_registry_can_require_signed_pushes() {
    use cloudlet_overlay::signature::{sign_file, unix_now, SignaturePolicy, TrustedKey};
    let trusted = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let policy = SignaturePolicy {
        required: true,
        trusted: vec![TrustedKey {
            signer: "acme".into(),
            public_key: trusted.verifying_key().to_bytes(),
        }],
    };
    let r = Registry::start_with(&[TOKEN], policy).await;
    let (path, unsigned) = r.overlay("app", 3);
    let now = unix_now();
    let signed_path = r.work.path().join("signed");
    sign_file(&path, &signed_path, &trusted, "acme", now, now + 60).unwrap();
    let other_path = r.work.path().join("other");
    let other = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
    sign_file(&path, &other_path, &other, "acme", now, now + 60).unwrap();
    for (what, body, says) in [
        ("unsigned", unsigned, "Unsigned overlay"),
        (
            "other key",
            std::fs::read(&other_path).unwrap(),
            "unknown key",
        ),
    ] {
        let resp = r.put("app", Some(TOKEN), body).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{what}");
        let e: ErrorBody = resp.json().await.unwrap();
        assert_eq!(e.kind, "untrusted_overlay", "{what}: {e:?}");
        assert!(e.error.contains(says), "{what}: {e:?}");
        assert!(r.stored_files().is_empty(), "{what}: nothing stored");
    }
    let signed = std::fs::read(&signed_path).unwrap();
    let resp = r.put("app", Some(TOKEN), signed.clone()).await;
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let got = r
        .http
        .get(r.url("app"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&got[..], &signed[..]);
}
