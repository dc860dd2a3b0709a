//! `cloudlet-agent`: the guest side of the agent protocol (see
//! `cloudlet-agent-proto`).
//!
//! Started by the guest's `/init` as `cloudlet-agent --init` (it then is PID
//! 1: it reaps orphans and keeps a serving child alive) or as
//! `cloudlet-agent` to serve directly.

mod ops;
mod port;
mod zero;

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudlet_agent_proto::{Request, Response, ResponseResult, MAX_LINE};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(zero::CHILD_FLAG) {
        std::process::exit(zero::run_child(&args[2..]));
    }
    if args.iter().any(|a| a == "--init") {
        run_init(&args[0]);
    }
    serve();
}

/// PID 1 duties: basic mounts, then spawn the server and reap every child.
fn run_init(self_path: &str) -> ! {
    ops::prepare_system();
    let mut server = spawn_server(self_path);
    ops::autostart();
    loop {
        let mut status = 0;
        // SAFETY: plain syscall, `status` is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        if Some(pid as u32) == server.as_ref().map(|c| c.id()) {
            eprintln!("cloudlet-agent: server exited ({status}), restarting");
            std::thread::sleep(Duration::from_millis(200));
            server = spawn_server(self_path);
        }
    }
}

fn spawn_server(self_path: &str) -> Option<std::process::Child> {
    match std::process::Command::new(self_path).spawn() {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("cloudlet-agent: cannot start server: {e}");
            None
        }
    }
}

/// Serve requests on the virtio-serial port forever.
fn serve() -> ! {
    let started = Instant::now();
    loop {
        let dev = port::wait_for_port();
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("cloudlet-agent: open {}: {e}", dev.display());
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let writer = match file.try_clone() {
            Ok(w) => Arc::new(Mutex::new(w)),
            Err(e) => {
                eprintln!("cloudlet-agent: dup: {e}");
                continue;
            }
        };
        let mut reader = BufReader::with_capacity(64 * 1024, port::HostReader::new(file));
        let mut line = Vec::new();
        loop {
            line.clear();
            match Read::by_ref(&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("cloudlet-agent: read: {e}");
                    break;
                }
            }
            if line.last() != Some(&b'\n') {
                // Over-long line: skip to its end.
                if line.len() > MAX_LINE {
                    let mut sink = Vec::new();
                    let _ = reader.read_until(b'\n', &mut sink);
                }
                continue;
            }
            let req: Request = match serde_json::from_slice(&line) {
                Ok(r) => r,
                Err(e) => {
                    // An operation from a newer host gets an error; anything
                    // else is a fragment from an earlier host session.
                    if let Some((id, name)) = unknown_request(&line) {
                        let resp = Response {
                            id,
                            result: ResponseResult::Err(format!(
                                "Unknown or malformed operation {name:?}: {e}"
                            )),
                        };
                        write_response(&writer, &resp);
                    }
                    continue;
                }
            };
            let writer = Arc::clone(&writer);
            std::thread::spawn(move || {
                let id = req.id;
                let result = match ops::handle(req.op, started) {
                    Ok(r) => ResponseResult::Ok(r),
                    Err(e) => ResponseResult::Err(e),
                };
                let after = ops::after_reply(&result);
                write_response(&writer, &Response { id, result });
                if let Some(f) = after {
                    f();
                }
            });
        }
    }
}

fn write_response(writer: &Mutex<std::fs::File>, resp: &Response) {
    if let Ok(mut out) = serde_json::to_vec(resp) {
        out.push(b'\n');
        if let Ok(mut w) = writer.lock() {
            let _ = w.write_all(&out);
            let _ = w.flush();
        }
    }
}

/// The id and operation name of a request that is well-formed JSON with an
/// id and an op, but whose op this agent does not know (a newer host).
fn unknown_request(line: &[u8]) -> Option<(u64, String)> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    let id = v.get("id")?.as_u64()?;
    let name = match v.get("op")? {
        serde_json::Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
        serde_json::Value::String(s) => s.clone(),
        _ => String::new(),
    };
    Some((id, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_operations_are_recognised_and_fragments_are_not() {
        assert_eq!(
            unknown_request(br#"{"id":4,"op":{"teleport":{"to":"mars"}}}"#),
            Some((4, "teleport".into()))
        );
        assert_eq!(unknown_request(br#"{"id":4,"op":{"pi"#), None);
        assert_eq!(unknown_request(br#"ng":{}}}"#), None);
        assert_eq!(unknown_request(br#"{"op":{"ping":{}}}"#), None);
    }
}
