//! A fleet CA made by `pki::init`, certificates by `pki::issue`, a real
//! HTTPS server on a real socket (`tls::ServeListener` under axum) and real
//! clients (reqwest, rustls): a client that trusts the fleet reaches it,
//! with its own fleet certificate it is told a member; a client of another
//! fleet neither trusts the server nor is trusted by it; plain HTTP gets
//! no answer.

use std::path::Path;
use std::time::Duration;

use axum::extract::ConnectInfo;
use cloudlet_trust::pki;
use cloudlet_trust::tls::{self, PeerAddr, ServeListener, TlsConfig};

fn client(ca: &Path, identity: Option<&TlsConfig>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(10))
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap());
    if let Some(id) = identity {
        b = b.identity(reqwest::Identity::from_pem(&tls::identity_pem(id).unwrap()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test]
async fn fleet_certificates_serve_and_identify() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet");
    let other = dir.path().join("other");
    let ca = pki::init(&fleet, "acme", 30).unwrap();
    let other_ca = pki::init(&other, "rival", 30).unwrap();
    assert!(matches!(
        pki::init(&fleet, "acme", 30),
        Err(pki::PkiError::Exists(_))
    ));
    let certs = dir.path().join("certs");
    let server = pki::issue(
        &fleet,
        "edge-1",
        &["127.0.0.1".into(), "localhost".into()],
        &certs,
        30,
    )
    .unwrap();
    let peer = pki::issue(&fleet, "edge-2", &[], &certs, 30).unwrap();
    let stranger = pki::issue(&other, "intruder", &[], &certs, 30).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&server.key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "keys are private");

    let served = TlsConfig {
        cert: server.cert.clone(),
        key: server.key.clone(),
        ca: ca.clone(),
    };
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let listener = ServeListener::new(tcp, Some(tls::server_config(&served).unwrap())).unwrap();
    let app = axum::Router::new().route(
        "/who",
        axum::routing::get(|ConnectInfo(p): ConnectInfo<PeerAddr>| async move {
            format!("tls={} member={}", p.tls, p.fleet_member)
        }),
    );
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<PeerAddr>(),
        )
        .await
        .unwrap()
    });
    let url = format!("https://127.0.0.1:{port}/who");

    let said = |r: reqwest::Response| async move { r.text().await.unwrap() };
    // A device: trusts the fleet, no certificate of its own.
    let r = client(&ca, None).get(&url).send().await.unwrap();
    assert_eq!(said(r).await, "tls=true member=false");
    // By name too (the certificate names localhost).
    let r = client(&ca, None)
        .get(format!("https://localhost:{port}/who"))
        .send()
        .await
        .unwrap();
    assert_eq!(said(r).await, "tls=true member=false");
    // A cloudlet of the fleet: told a member.
    let member = TlsConfig {
        cert: peer.cert.clone(),
        key: peer.key.clone(),
        ca: ca.clone(),
    };
    let r = client(&ca, Some(&member)).get(&url).send().await.unwrap();
    assert_eq!(said(r).await, "tls=true member=true");
    // Another fleet's client does not trust this server...
    let e = client(&other_ca, None).get(&url).send().await.unwrap_err();
    println!("another fleet's client: {e:?}");
    // ... and this server does not take another fleet's certificate.
    let intruder = TlsConfig {
        cert: stranger.cert.clone(),
        key: stranger.key.clone(),
        ca: other_ca.clone(),
    };
    assert!(client(&ca, Some(&intruder)).get(&url).send().await.is_err());
    // Plain HTTP is no way in.
    assert!(reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/who"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_err());
    // The server still serves after all of that.
    let r = client(&ca, None).get(&url).send().await.unwrap();
    assert_eq!(said(r).await, "tls=true member=false");
}

#[test]
fn open_keys_and_missing_files_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::init(dir.path(), "acme", 1).unwrap();
    let issued = pki::issue(dir.path(), "a", &[], dir.path(), 1).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&issued.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = TlsConfig {
        cert: issued.cert,
        key: issued.key,
        ca: ca.clone(),
    };
    let e = tls::server_config(&c).err().unwrap().to_string();
    assert!(e.contains("chmod 600"), "{e}");
    let e = tls::load_certs(&dir.path().join("none.pem"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("Cannot read"), "{e}");
    assert!(pki::issue(dir.path(), "bad name", &[], dir.path(), 1).is_err());
    let e = pki::issue(&dir.path().join("no-ca"), "x", &[], dir.path(), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cloudlet pki init"), "{e}");
}
