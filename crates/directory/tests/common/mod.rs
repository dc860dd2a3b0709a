//! What the directory's tests share: a directory served in-process over
//! real HTTP, registrations, and the calls a cloudlet and a device make.
#![allow(dead_code)]

use cloudlet_api::directory::{HeldBase, Registration, SearchAnswer};
use cloudlet_api::{Flavor, Location, Resources};
use cloudlet_directory::{Background, DirectoryConfig, Serving};

pub struct Running {
    pub url: String,
    pub directory: std::sync::Arc<cloudlet_directory::Directory>,
    bg: Background,
}

pub async fn start(store: &std::path::Path, heartbeat_ms: u64, lease_ms: u64) -> Running {
    serve(DirectoryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        store: store.to_path_buf(),
        heartbeat_ms,
        lease_ms,
        ..DirectoryConfig::default()
    })
    .await
}

pub async fn serve(config: DirectoryConfig) -> Running {
    Serving::bind(config).await.unwrap().spawn().into()
}

impl From<Background> for Running {
    fn from(bg: Background) -> Self {
        Running {
            url: bg.url(),
            directory: bg.directory.clone(),
            bg,
        }
    }
}

impl Running {
    /// Gone at once, as in a crash: nothing is flushed.
    pub async fn crash(self) {
        self.bg.crash().await
    }

    pub async fn stop(self) {
        self.bg.stop().await.unwrap()
    }
}

pub fn reg(name: &str, lat: f64, lon: f64, bases: &[&str], free_vms: u32) -> Registration {
    Registration {
        format: 1,
        name: name.into(),
        api_url: format!("http://{name}.example:7450"),
        public_host: format!("{name}.example"),
        location: Location {
            label: name.into(),
            latitude: lat,
            longitude: lon,
        },
        networks: vec![],
        base_vms: bases
            .iter()
            .map(|b| HeldBase {
                name: b.to_string(),
                id: format!("id-{b}"),
            })
            .collect(),
        obtainable_bases: vec![],
        overlays_cached: vec![],
        flavors: vec![Flavor {
            name: "small".into(),
            vcpus: 1,
            memory_mib: 512,
        }],
        capacity: Resources {
            vcpus: 8,
            memory_mib: 8192,
            vms: 8,
        },
        free: Resources {
            vcpus: free_vms,
            memory_mib: 512 * free_vms as u64,
            vms: free_vms,
        },
        load: 0.1,
        accel: "tcg".into(),
        release: "test".into(),
        handoff_protocol: 1,
        accepting: true,
        peer_token: Some(format!("peer-{name}")),
        recent_moves: Vec::new(),
    }
}

pub async fn put(url: &str, token: &str, r: &Registration) -> reqwest::Response {
    reqwest::Client::new()
        .put(format!("{url}/v1/cloudlets/{}", r.name))
        .bearer_auth(token)
        .json(r)
        .send()
        .await
        .unwrap()
}

pub async fn search(url: &str, q: &str) -> SearchAnswer {
    let resp = reqwest::get(format!("{url}/v1/cloudlets?{q}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    resp.json().await.unwrap()
}

pub fn names(a: &SearchAnswer) -> Vec<&str> {
    a.candidates.iter().map(|c| c.name.as_str()).collect()
}
