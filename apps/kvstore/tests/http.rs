//! Starts the real `kvstore` binary on an ephemeral port and talks to it over TCP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloudlet_testkit::{request, ClientResponse};

const TIMEOUT: Duration = Duration::from_secs(5);

struct Server {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(extra: &[&str]) -> Server {
    let dir = std::env::temp_dir().join(format!(
        "kvstore-it-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hostname"), "guest-1\n").unwrap();
    std::fs::write(dir.join("vm-id"), "vm-42\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--churn-buffer-mib",
            "4",
        ])
        .arg("--hostname-file")
        .arg(dir.join("hostname"))
        .arg("--vm-id-file")
        .arg(dir.join("vm-id"))
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn kvstore");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("kvstore listening on ")
        .unwrap_or_else(|| panic!("unexpected banner {line:?}"))
        .parse()
        .unwrap();
    Server { child, addr, dir }
}

impl Server {
    fn call(&self, method: &str, target: &str, body: Option<&[u8]>) -> ClientResponse {
        request(self.addr, method, target, body, TIMEOUT).unwrap()
    }

    fn raw(&self, bytes: &[u8]) -> String {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[test]
fn kvstore_over_tcp() {
    let srv = start(&["--max-value-bytes", "2097152"]);

    let health = srv.call("GET", "/health", None);
    assert_eq!((health.status, health.text().as_str()), (200, "ok"));

    // A value bigger than any socket buffer, with every byte value.
    let big: Vec<u8> = (0..(1 << 20) + 17).map(|i| (i * 7 % 256) as u8).collect();
    assert_eq!(srv.call("PUT", "/kv/big%2Fone", Some(&big)).status, 201);
    assert_eq!(srv.call("PUT", "/kv/small", Some(b"v1")).status, 201);
    assert_eq!(srv.call("PUT", "/kv/small", Some(b"v2")).status, 204);
    let got = srv.call("GET", "/kv/big%2Fone", None);
    assert_eq!(got.status, 200);
    assert!(got.body == big, "big value came back different");
    assert_eq!(
        srv.call("GET", "/kv", None).text(),
        r#"["big/one","small"]"#
    );
    let stats = srv.call("GET", "/stats", None).text();
    assert!(
        stats.starts_with(&format!(r#"{{"keys":2,"bytes":{},"#, big.len() + 2)),
        "{stats}"
    );
    assert!(stats.contains(&format!(r#""pid":{}"#, srv.child.id())));
    assert_eq!(srv.call("DELETE", "/kv/small", None).status, 204);
    assert_eq!(srv.call("DELETE", "/kv/small", None).status, 404);
    assert_eq!(srv.call("GET", "/kv/small", None).status, 404);

    // HEAD sends the length but no body.
    let head = srv.call("HEAD", "/kv/big%2Fone", None);
    assert_eq!(
        head.header("content-length"),
        Some(big.len().to_string().as_str())
    );
    assert!(head.body.is_empty());

    let r1 = srv.call("GET", "/random", None).text();
    let r2 = srv.call("GET", "/random", None).text();
    assert_eq!(r1.len(), 32);
    assert_ne!(r1, r2);
    assert_eq!(
        srv.call("GET", "/id", None).text(),
        r#"{"hostname":"guest-1","vm_id":"vm-42"}"#
    );

    // Protocol errors.
    assert!(srv.raw(b"NONSENSE\r\n\r\n").starts_with("HTTP/1.1 400 "));
    assert!(srv
        .raw(b"PUT /kv/x HTTP/1.1\r\nConnection: close\r\n\r\n")
        .starts_with("HTTP/1.1 411 "));
    let too_big = vec![b'x'; 2 * 1024 * 1024 + 1];
    assert_eq!(srv.call("PUT", "/kv/huge", Some(&too_big)).status, 413);
    assert_eq!(srv.call("GET", "/kv/huge", None).status, 404);

    // Keep-alive: two requests on one connection.
    let both =
        srv.raw(b"GET /health HTTP/1.1\r\n\r\nGET /kv/nope HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(both.starts_with("HTTP/1.1 200 OK"));
    assert!(both.contains("HTTP/1.1 404 Not Found"));

    // Memory churn at a known rate.
    let started = srv.call("POST", "/churn?mib_per_s=16", None);
    assert_eq!(started.status, 202, "{}", started.text());
    std::thread::sleep(Duration::from_millis(250));
    assert!(srv
        .call("GET", "/churn", None)
        .text()
        .contains(r#""running":true"#));
    let stopped = srv.call("DELETE", "/churn", None).text();
    let stopped: serde_json::Value = serde_json::from_str(&stopped).unwrap();
    assert_eq!(stopped["running"], false, "{stopped}");
    assert_eq!(stopped["mib_per_s"], 16.0, "{stopped}");
    assert!(stopped["bytes_written"].as_u64().unwrap() > 0, "{stopped}");
    let elapsed = stopped["elapsed_s"].as_f64().unwrap();
    assert_eq!(elapsed, (elapsed * 1000.0).round() / 1000.0, "{stopped}");
}
