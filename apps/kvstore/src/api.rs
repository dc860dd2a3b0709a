//! HTTP routes of the key-value store. Handlers validate, call the store or the
//! churner, and map outcomes to status codes here and nowhere else.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use apphttp::{url, Body, Handler, Request, Response};
use serde::Serialize;

use crate::churn::{ChurnConfig, Churner};
use crate::store::{KvStore, PutOutcome, MAX_KEY_BYTES};

/// Where `/id` reads the guest's identity from. Read on every request, because a VM
/// restored from a snapshot gets a new id after this process started.
#[derive(Debug, Clone)]
pub struct IdFiles {
    pub hostname: PathBuf,
    pub vm_id: PathBuf,
}

impl Default for IdFiles {
    fn default() -> Self {
        IdFiles {
            hostname: PathBuf::from("/etc/hostname"),
            vm_id: PathBuf::from("/run/cloudlet/vm-id"),
        }
    }
}

pub struct App {
    pub store: KvStore,
    pub churn: Churner,
    pub started: Instant,
    pub id_files: IdFiles,
}

impl App {
    pub fn new(churn_buffer_bytes: usize, id_files: IdFiles) -> Self {
        App {
            store: KvStore::new(),
            churn: Churner::new(churn_buffer_bytes),
            started: Instant::now(),
            id_files,
        }
    }
}

impl Handler for App {
    fn handle(&self, req: &Request) -> Response {
        route(self, req)
    }
}

fn method_not_allowed(allow: &str) -> Response {
    Response::error(405, "Method not allowed").header("Allow", allow)
}

/// Dispatches one request.
pub fn route(app: &App, req: &Request) -> Response {
    let path = req.path();
    match path {
        "/health" => match req.method() {
            "GET" => Response::text(200, "ok"),
            _ => method_not_allowed("GET, HEAD"),
        },
        "/stats" => match req.method() {
            "GET" => stats(app),
            _ => method_not_allowed("GET, HEAD"),
        },
        "/random" => match req.method() {
            "GET" => random(),
            _ => method_not_allowed("GET, HEAD"),
        },
        "/id" => match req.method() {
            "GET" => id(&app.id_files),
            _ => method_not_allowed("GET, HEAD"),
        },
        "/churn" => match req.method() {
            "GET" => Response::json(200, &app.churn.status()),
            "POST" => start_churn(app, req),
            "DELETE" => Response::json(200, &app.churn.stop()),
            _ => method_not_allowed("GET, HEAD, POST, DELETE"),
        },
        "/kv" | "/kv/" => match req.method() {
            "GET" => list_keys(app, req),
            _ => method_not_allowed("GET, HEAD"),
        },
        _ => match path.strip_prefix("/kv/") {
            Some(raw_key) => key_route(app, req, raw_key),
            None => Response::error(404, "No such route"),
        },
    }
}

fn key_route(app: &App, req: &Request, raw_key: &str) -> Response {
    let Some(key) = url::percent_decode_str(raw_key, false) else {
        return Response::error(400, "Key is not valid percent-encoded UTF-8");
    };
    if key.len() > MAX_KEY_BYTES {
        return Response::error(400, &format!("Key longer than {MAX_KEY_BYTES} bytes"));
    }
    match req.method() {
        "GET" => match app.store.get(&key) {
            Some(value) => Response::bytes(200, Body::Shared(value)),
            None => Response::error(404, "No such key"),
        },
        "PUT" => match app.store.put(key, req.body.clone()) {
            PutOutcome::Created => Response::empty(201),
            PutOutcome::Replaced => Response::empty(204),
        },
        "DELETE" => match app.store.delete(&key) {
            true => Response::empty(204),
            false => Response::error(404, "No such key"),
        },
        _ => method_not_allowed("GET, HEAD, PUT, DELETE"),
    }
}

fn list_keys(app: &App, req: &Request) -> Response {
    let prefix = req.query_param("prefix").unwrap_or_default();
    let keys = app.store.keys(&prefix);
    Response::json(200, &keys)
}

/// `GET /stats`.
#[derive(Serialize)]
struct Stats {
    keys: usize,
    bytes: u64,
    uptime_s: u64,
    pid: u32,
    churn_running: bool,
    churn_mib_per_s: f64,
}

fn stats(app: &App) -> Response {
    let s = app.store.stats();
    let churn = app.churn.status();
    Response::json(
        200,
        &Stats {
            keys: s.keys,
            bytes: s.bytes,
            uptime_s: app.started.elapsed().as_secs(),
            pid: std::process::id(),
            churn_running: churn.running,
            churn_mib_per_s: if churn.running { churn.mib_per_s } else { 0.0 },
        },
    )
}

/// 16 bytes from the kernel on every call: two VMs restored from one snapshot must
/// not return the same values, which a user-space generator seeded at start would.
fn random() -> Response {
    let mut bytes = [0u8; 16];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => Response::text(200, apphttp::hex(&bytes)),
        Err(e) => Response::error(500, &format!("Cannot read /dev/urandom: {e}")),
    }
}

fn read_trimmed(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.trim().to_string())
}

/// `GET /id`.
#[derive(Serialize)]
struct Id {
    hostname: Option<String>,
    vm_id: Option<String>,
}

fn id(files: &IdFiles) -> Response {
    Response::json(
        200,
        &Id {
            hostname: read_trimmed(&files.hostname),
            vm_id: read_trimmed(&files.vm_id),
        },
    )
}

fn start_churn(app: &App, req: &Request) -> Response {
    let mib_per_s = match req.query_param("mib_per_s").map(|v| v.parse::<f64>()) {
        None => return Response::error(400, "Missing query parameter mib_per_s"),
        Some(Err(_)) => return Response::error(400, "mib_per_s is not a number"),
        Some(Ok(v)) => v,
    };
    let seconds = match req.query_param("seconds").map(|v| v.parse::<f64>()) {
        None => None,
        Some(Err(_)) => return Response::error(400, "seconds is not a number"),
        Some(Ok(v)) => Some(v),
    };
    match app.churn.start(ChurnConfig { mib_per_s, seconds }) {
        Ok(status) => Response::json(202, &status),
        Err(e @ crate::churn::StartChurnError::CannotSpawn(_)) => {
            Response::error(500, &e.to_string())
        }
        Err(e) => Response::error(400, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apphttp::request::read_request;
    use apphttp::Limits;

    fn app() -> App {
        let dir = std::env::temp_dir();
        App::new(
            64 * 1024,
            IdFiles {
                hostname: dir.join("kvstore-test-no-such-hostname"),
                vm_id: dir.join("kvstore-test-no-such-vm-id"),
            },
        )
    }

    fn call(app: &App, method: &str, target: &str, body: &[u8]) -> Response {
        let mut raw = format!(
            "{method} {target} HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(body);
        let req = read_request(&mut &raw[..], &Limits::default()).unwrap();
        route(app, &req)
    }

    fn body(r: &Response) -> String {
        String::from_utf8_lossy(r.body.as_slice()).into_owned()
    }

    #[test]
    fn kv_semantics() {
        let a = app();
        assert_eq!(call(&a, "GET", "/kv/x", b"").status, 404);
        assert_eq!(call(&a, "PUT", "/kv/x", b"v1").status, 201);
        assert_eq!(call(&a, "PUT", "/kv/x", b"value2").status, 204);
        let got = call(&a, "GET", "/kv/x", b"");
        assert_eq!((got.status, body(&got)), (200, "value2".to_string()));
        assert_eq!(call(&a, "DELETE", "/kv/x", b"").status, 204);
        assert_eq!(call(&a, "DELETE", "/kv/x", b"").status, 404);
        assert_eq!(call(&a, "GET", "/kv/x", b"").status, 404);
    }

    #[test]
    fn keys_are_percent_decoded_and_listed_as_json() {
        let a = app();
        call(&a, "PUT", "/kv/a%20b", b"1");
        call(&a, "PUT", "/kv/dir/c%22", b"2");
        assert_eq!(body(&call(&a, "GET", "/kv/a%20b", b"")), "1");
        assert_eq!(body(&call(&a, "GET", "/kv", b"")), r#"["a b","dir/c\""]"#);
        assert_eq!(
            body(&call(&a, "GET", "/kv/?prefix=dir%2F", b"")),
            r#"["dir/c\""]"#
        );
    }

    #[test]
    fn bad_keys_and_methods() {
        let a = app();
        assert_eq!(call(&a, "GET", "/kv/%zz", b"").status, 400);
        assert_eq!(call(&a, "GET", "/kv/%ff", b"").status, 400);
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(call(&a, "PUT", &format!("/kv/{long}"), b"x").status, 400);
        let r = call(&a, "POST", "/kv/x", b"x");
        assert_eq!(r.status, 405);
        assert!(r
            .headers
            .iter()
            .any(|(n, v)| n == "Allow" && v.contains("PUT")));
        assert_eq!(call(&a, "DELETE", "/health", b"").status, 405);
        assert_eq!(call(&a, "GET", "/nope", b"").status, 404);
        assert_eq!(call(&a, "GET", "/kvx", b"").status, 404);
    }

    #[test]
    fn stats_health_random_id() {
        let a = app();
        call(&a, "PUT", "/kv/a", b"12345");
        assert_eq!(body(&call(&a, "GET", "/health", b"")), "ok");
        let stats = body(&call(&a, "GET", "/stats", b""));
        assert!(
            stats.starts_with(r#"{"keys":1,"bytes":5,"uptime_s":"#),
            "{stats}"
        );
        assert!(stats.contains(&format!(r#""pid":{}"#, std::process::id())));
        let r1 = body(&call(&a, "GET", "/random", b""));
        let r2 = body(&call(&a, "GET", "/random", b""));
        assert_eq!(r1.len(), 32);
        assert!(r1.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(r1, r2);
        assert_eq!(
            body(&call(&a, "GET", "/id", b"")),
            r#"{"hostname":null,"vm_id":null}"#
        );
    }

    #[test]
    fn churn_routes() {
        let a = app();
        assert_eq!(call(&a, "POST", "/churn", b"").status, 400);
        assert_eq!(call(&a, "POST", "/churn?mib_per_s=abc", b"").status, 400);
        assert_eq!(call(&a, "POST", "/churn?mib_per_s=0", b"").status, 400);
        assert_eq!(
            call(&a, "POST", "/churn?mib_per_s=1&seconds=x", b"").status,
            400
        );
        let started = call(&a, "POST", "/churn?mib_per_s=4&seconds=10", b"");
        assert_eq!(started.status, 202);
        let status: serde_json::Value = serde_json::from_str(&body(&started)).unwrap();
        assert_eq!(
            (&status["running"], &status["mib_per_s"], &status["seconds"]),
            (&true.into(), &4.0.into(), &10.0.into())
        );
        assert!(body(&started).starts_with(r#"{"running":true,"mib_per_s":4.0,"seconds":10.0,"#));
        assert!(body(&call(&a, "GET", "/stats", b"")).contains(r#""churn_running":true"#));
        let stopped = call(&a, "DELETE", "/churn", b"");
        assert_eq!(stopped.status, 200);
        assert!(body(&stopped).starts_with(r#"{"running":false"#));
    }
}
