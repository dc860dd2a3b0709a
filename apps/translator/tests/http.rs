//! Generates a small dictionary with the real `translator` binary, serves it on an
//! ephemeral port and translates over TCP.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudlet_testkit::{request, ClientResponse};

const BIN: &str = env!("CARGO_BIN_EXE_translator");
const TIMEOUT: Duration = Duration::from_secs(5);

struct Fixture {
    child: Option<Child>,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn get(addr: SocketAddr, target: &str) -> ClientResponse {
    request(addr, "GET", target, None, TIMEOUT).unwrap()
}

#[test]
fn translator_over_tcp() {
    let dir = std::env::temp_dir().join(format!("translator-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut fx = Fixture { child: None, dir };
    let dict = fx.dir.join("dict.tsv");
    let dict2 = fx.dir.join("dict2.tsv");

    // gen-dict is deterministic.
    for path in [&dict, &dict2] {
        let out = Command::new(BIN)
            .args(["gen-dict", "--entries", "20000", "--seed", "5", "--out"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("wrote 20000 entries ("));
    }
    let text = std::fs::read_to_string(&dict).unwrap();
    assert_eq!(text, std::fs::read_to_string(&dict2).unwrap());
    // Pick a generated pseudo word to look up later.
    let (pseudo, pseudo_tr) = text.lines().nth(10_000).unwrap().split_once('\t').unwrap();

    let missing = Command::new(BIN)
        .args(["--port", "0", "--dict"])
        .arg(fx.dir.join("missing.tsv"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(missing.code(), Some(1));

    let mut child = Command::new(BIN)
        .args(["--bind", "127.0.0.1", "--port", "0", "--dict"])
        .arg(&dict)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    fx.child = Some(child);
    let addr: SocketAddr = banner
        .trim()
        .strip_prefix("translator listening on ")
        .unwrap_or_else(|| panic!("unexpected banner {banner:?}"))
        .parse()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = get(addr, "/health");
        if health.status == 200 {
            assert_eq!(health.text(), "ok");
            break;
        }
        assert_eq!(health.status, 503);
        assert!(Instant::now() < deadline, "dictionary did not load in time");
        std::thread::sleep(Duration::from_millis(20));
    }

    let stats = get(addr, "/stats").text();
    assert!(stats.starts_with(r#"{"entries":20000,"bytes":"#), "{stats}");
    assert!(stats.contains(r#""loaded":true"#));

    let t = get(addr, "/translate?text=Hello+world%2C+xyzzy%21");
    assert_eq!(t.status, 200);
    assert_eq!(t.header("content-type"), Some("application/json"));
    assert_eq!(
        t.text(),
        r#"{"translation":"Salve mundus, xyzzy!","unknown":["xyzzy"]}"#
    );

    let body = format!("the {pseudo} is good");
    let t = request(addr, "POST", "/translate", Some(body.as_bytes()), TIMEOUT).unwrap();
    assert_eq!(
        t.text(),
        format!(r#"{{"translation":"ille {pseudo_tr} est bonus","unknown":[]}}"#)
    );

    assert_eq!(get(addr, "/translate").status, 400);
    assert_eq!(get(addr, "/elsewhere").status, 404);
    let too_big = vec![b'a'; 1024 * 1024 + 1];
    assert_eq!(
        request(addr, "POST", "/translate", Some(&too_big), TIMEOUT)
            .unwrap()
            .status,
        413
    );
}
