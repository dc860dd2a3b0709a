//! `kvstore`: example cloudlet guest app, an in-memory HTTP key-value store.
//! See `usage()` for the command line and the HTTP API.

mod api;
mod churn;
mod store;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use apphttp::{option_value, Limits, ServerConfig};

/// Largest value accepted by `PUT /kv/{key}`.
const DEFAULT_MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;
const DEFAULT_CHURN_BUFFER_MIB: usize = 64;

fn usage() -> &'static str {
    "\
usage: kvstore [--port N] [--bind ADDR] [--max-value-bytes N] [--churn-buffer-mib N]
               [--hostname-file PATH] [--vm-id-file PATH] [--access-log]

In-memory HTTP key-value store (cloudlet example guest app).

options:
  --port N               TCP port (default 8080; 0 picks a free one)
  --bind ADDR            IP address to listen on (default 0.0.0.0)
  --max-value-bytes N    largest value accepted (default 16777216), else 413
  --churn-buffer-mib N   size of the buffer /churn rewrites (default 64)
  --hostname-file PATH   read by GET /id (default /etc/hostname)
  --vm-id-file PATH      read by GET /id (default /run/cloudlet/vm-id)
  --access-log           log one line per request to stderr

Prints 'kvstore listening on ADDR:PORT' on stdout once it accepts connections.

HTTP API:
  PUT    /kv/{key}        store the body (Content-Length or chunked): 201 new, 204 replaced
  GET    /kv/{key}        200 with the value, 404 if absent
  DELETE /kv/{key}        204, or 404 if absent
  GET    /kv[?prefix=P]   200 JSON array of keys, sorted
  GET    /health          200 \"ok\"
  GET    /stats           200 {keys, bytes, uptime_s, pid, churn_running, churn_mib_per_s}
  GET    /random          200 32 hex digits (16 fresh bytes from /dev/urandom)
  GET    /id              200 {hostname, vm_id} (null when a file is absent)
  POST   /churn?mib_per_s=R[&seconds=S]   202: rewrite R MiB/s of the churn buffer
                                          (for S seconds, or until stopped)
  GET    /churn           200 churn status
  DELETE /churn           200 churn status after stopping it
Keys are percent-decoded UTF-8, at most 1024 bytes. Errors are JSON {\"error\": ...}.
"
}

struct Args {
    bind: IpAddr,
    port: u16,
    max_value_bytes: usize,
    churn_buffer_mib: usize,
    id_files: api::IdFiles,
    access_log: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut out = Args {
        bind: IpAddr::from([0, 0, 0, 0]),
        port: 8080,
        max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        churn_buffer_mib: DEFAULT_CHURN_BUFFER_MIB,
        id_files: api::IdFiles::default(),
        access_log: false,
    };
    fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
        v.parse()
            .map_err(|_| format!("Invalid value for {name}: {v:?}"))
    }
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        if arg == "--access-log" {
            out.access_log = true;
        } else if let Some(v) = option_value(&arg, "--port", &mut args)? {
            out.port = num("--port", &v)?;
        } else if let Some(v) = option_value(&arg, "--bind", &mut args)? {
            out.bind = num("--bind", &v)?;
        } else if let Some(v) = option_value(&arg, "--max-value-bytes", &mut args)? {
            out.max_value_bytes = num("--max-value-bytes", &v)?;
        } else if let Some(v) = option_value(&arg, "--churn-buffer-mib", &mut args)? {
            out.churn_buffer_mib = num("--churn-buffer-mib", &v)?;
            if out.churn_buffer_mib == 0 || out.churn_buffer_mib > 1 << 20 {
                return Err("--churn-buffer-mib must be between 1 and 1048576".into());
            }
        } else if let Some(v) = option_value(&arg, "--hostname-file", &mut args)? {
            out.id_files.hostname = PathBuf::from(v);
        } else if let Some(v) = option_value(&arg, "--vm-id-file", &mut args)? {
            out.id_files.vm_id = PathBuf::from(v);
        } else {
            return Err(format!("Unknown argument {arg:?}"));
        }
    }
    Ok(Some(out))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("kvstore: {e}\n\n{}", usage());
            return ExitCode::from(2);
        }
    };
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kvstore: Cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().map_or(addr, |a| a);
    let app = api::App::new(args.churn_buffer_mib * 1024 * 1024, args.id_files);
    let config = ServerConfig {
        limits: Limits {
            max_body: args.max_value_bytes,
            ..Limits::default()
        },
        access_log: args.access_log,
        ..ServerConfig::default()
    };
    println!("kvstore listening on {local}");
    let _ = std::io::stdout().flush();
    apphttp::serve(listener, Arc::new(app), config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_options() {
        let a = parse(&[
            "--port",
            "9000",
            "--bind=127.0.0.1",
            "--churn-buffer-mib",
            "8",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (a.port, a.bind.to_string(), a.churn_buffer_mib),
            (9000, "127.0.0.1".into(), 8)
        );
        assert_eq!(a.max_value_bytes, DEFAULT_MAX_VALUE_BYTES);
        assert!(parse(&["--help"]).unwrap().is_none());
        assert!(parse(&["--port"]).is_err());
        assert!(parse(&["--port", "70000"]).is_err());
        assert!(parse(&["--churn-buffer-mib", "0"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }
}
