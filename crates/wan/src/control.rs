//! Changing a running hub's links from another process: `cloudlet-wan up`
//! serves a Unix socket, `cloudlet-wan set` talks to it (a script walks a
//! device from one cloudlet to another by changing delays).
//!
//! The protocol, version 1: one request line, one answer line, then the
//! connection closes.
//!
//! ```text
//! delay LINK MS      one-way delay of link LINK, in ms (fractions allowed)
//! rate LINK MBIT     rate of link LINK, both directions
//! cut LINK | restore LINK
//! ```
//!
//! The answer is `ok` or `error: WHY`. `LINK` is the link's number in the
//! hub ([`Wan::link_index`]): 0 for the first.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::Wan;

/// Where the socket of the hub made under `prefix` lives.
pub fn socket_path(prefix: &str) -> PathBuf {
    Path::new("/run/cloudlet-wan").join(format!("{prefix}.sock"))
}

/// The links a control socket changes (the owner takes them out to tear
/// them down).
pub type Links = Arc<RwLock<Vec<Wan>>>;

/// Serve requests for `links` on `path` (replacing a stale socket) in a
/// thread of its own, until the process ends.
pub fn serve(path: &Path, links: Links) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("wan-control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = answer(conn, &links);
            }
        })?;
    Ok(())
}

fn answer(conn: UnixStream, links: &RwLock<Vec<Wan>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let links = links.read().unwrap_or_else(|p| p.into_inner());
    let reply = match apply(line.trim(), &links) {
        Ok(()) => "ok".to_string(),
        Err(why) => format!("error: {why}"),
    };
    (&conn).write_all(format!("{reply}\n").as_bytes())
}

/// Carry out one request line.
pub fn apply(line: &str, links: &[Wan]) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (verb, link) = match words.as_slice() {
        [verb, link, ..] => (*verb, *link),
        _ => return Err(format!("expected `VERB LINK [VALUE]`, got {line:?}")),
    };
    let k: u8 = link
        .parse()
        .map_err(|_| format!("{link:?} is not a link number"))?;
    let wan = links
        .iter()
        .find(|w| w.link_index() == k)
        .ok_or_else(|| format!("no link {k} (this hub has {})", links.len()))?;
    let value = || -> Result<f64, String> {
        let v = words
            .get(2)
            .ok_or_else(|| format!("{verb} needs a value"))?;
        v.parse().map_err(|_| format!("{v:?} is not a number"))
    };
    match verb {
        "delay" => {
            let ms = value()?;
            if !(ms.is_finite() && ms >= 0.0) {
                return Err(format!("{ms} is not a delay"));
            }
            wan.set_delay(Duration::from_secs_f64(ms / 1000.0))
                .map_err(|e| e.to_string())
        }
        "rate" => wan.set_rate(value()?).map_err(|e| e.to_string()),
        "cut" => {
            wan.cut();
            Ok(())
        }
        "restore" => {
            wan.restore();
            Ok(())
        }
        other => Err(format!(
            "unknown request {other:?} (delay, rate, cut, restore)"
        )),
    }
}

/// Send one request to the hub serving `path`; its answer.
pub fn send(path: &Path, request: &str) -> std::io::Result<Result<(), String>> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let line = line.trim();
    Ok(match line.strip_prefix("error: ") {
        None if line == "ok" => Ok(()),
        None => Err(format!("unexpected answer {line:?}")),
        Some(why) => Err(why.to_string()),
    })
}
