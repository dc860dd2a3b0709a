//! `translator`: example cloudlet guest app, the "personal language translator".
//! Loads a large dictionary into memory at start, then translates text word by word.
//! See `usage()` for the command line and the HTTP API.

mod api;
mod dict;
mod translate;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use apphttp::{option_value, Limits, ServerConfig};

const DEFAULT_PORT: u16 = 8081;
const DEFAULT_ENTRIES: usize = 1_000_000;
const DEFAULT_SEED: u64 = 1;
/// Largest `POST /translate` body.
const MAX_TEXT_BYTES: usize = 1024 * 1024;

fn usage() -> &'static str {
    "\
usage: translator [--port N] [--bind ADDR] --dict PATH [--access-log]
       translator gen-dict --out PATH [--entries N] [--seed S]

Personal language translator (cloudlet example guest app).

serve options:
  --port N        TCP port (default 8081; 0 picks a free one)
  --bind ADDR     IP address to listen on (default 0.0.0.0)
  --dict PATH     dictionary file, loaded in the background after the port opens
  --access-log    log one line per request to stderr
Prints 'translator listening on ADDR:PORT' on stdout once it accepts connections.
Exits with status 1 if the dictionary cannot be read or parsed.

gen-dict options (deterministic: same N and S give the same file):
  --out PATH      where to write (atomically: temporary file, fsync, rename)
  --entries N     number of entries (default 1000000, about 30 MB)
  --seed S        generator seed, a u64 (default 1)

Dictionary format: UTF-8 lines 'word<TAB>translation'; '#' lines are comments.

HTTP API:
  GET  /translate?text=T   200 {\"translation\": \"...\", \"unknown\": [\"...\"]}
  POST /translate          same, text is the body (UTF-8, at most 1 MiB)
  GET  /health             200 \"ok\" once the dictionary is loaded, 503 \"loading\" before
  GET  /stats              200 {entries, bytes, load_ms, loaded, pid}
/translate answers 503 while loading. Errors are JSON {\"error\": ...}.
"
}

enum Command {
    Serve {
        bind: IpAddr,
        port: u16,
        dict: PathBuf,
        access_log: bool,
    },
    GenDict {
        out: PathBuf,
        entries: usize,
        seed: u64,
    },
    Help,
}

fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("Invalid value for {name}: {v:?}"))
}

fn parse_args(args: Vec<String>) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    if args.peek().map(String::as_str) == Some("gen-dict") {
        args.next();
        let (mut out, mut entries, mut seed) = (None, DEFAULT_ENTRIES, DEFAULT_SEED);
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                return Ok(Command::Help);
            } else if let Some(v) = option_value(&arg, "--out", &mut args)? {
                out = Some(PathBuf::from(v));
            } else if let Some(v) = option_value(&arg, "--entries", &mut args)? {
                entries = num("--entries", &v)?;
            } else if let Some(v) = option_value(&arg, "--seed", &mut args)? {
                seed = num("--seed", &v)?;
            } else {
                return Err(format!("Unknown argument {arg:?}"));
            }
        }
        let out = out.ok_or("gen-dict needs --out PATH")?;
        return Ok(Command::GenDict { out, entries, seed });
    }
    let (mut bind, mut port, mut dict, mut access_log) =
        (IpAddr::from([0, 0, 0, 0]), DEFAULT_PORT, None, false);
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        } else if arg == "--access-log" {
            access_log = true;
        } else if let Some(v) = option_value(&arg, "--port", &mut args)? {
            port = num("--port", &v)?;
        } else if let Some(v) = option_value(&arg, "--bind", &mut args)? {
            bind = num("--bind", &v)?;
        } else if let Some(v) = option_value(&arg, "--dict", &mut args)? {
            dict = Some(PathBuf::from(v));
        } else {
            return Err(format!("Unknown argument {arg:?}"));
        }
    }
    let dict = dict.ok_or("Missing --dict PATH")?;
    Ok(Command::Serve {
        bind,
        port,
        dict,
        access_log,
    })
}

fn main() -> ExitCode {
    match parse_args(std::env::args().skip(1).collect()) {
        Ok(Command::Help) => {
            print!("{}", usage());
            ExitCode::SUCCESS
        }
        Ok(Command::GenDict { out, entries, seed }) => gen_dict(out, entries, seed),
        Ok(Command::Serve {
            bind,
            port,
            dict,
            access_log,
        }) => serve(SocketAddr::new(bind, port), dict, access_log),
        Err(e) => {
            eprintln!("translator: {e}\n\n{}", usage());
            ExitCode::from(2)
        }
    }
}

fn gen_dict(out: PathBuf, entries: usize, seed: u64) -> ExitCode {
    let started = Instant::now();
    match dict::write_dictionary(&out, entries, seed) {
        Ok(info) => {
            let _ = writeln!(
                std::io::stdout(),
                "wrote {} entries ({} bytes) to {} in {} ms",
                info.entries,
                info.file_bytes,
                out.display(),
                started.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("translator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(addr: SocketAddr, dict_path: PathBuf, access_log: bool) -> ExitCode {
    // Open the file first so a wrong path fails before the port opens.
    let load = match dict::open_dictionary(&dict_path) {
        Ok(load) => load,
        Err(e) => {
            eprintln!("translator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("translator: Cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().map_or(addr, |a| a);
    let app = Arc::new(api::App::default());
    {
        let app = Arc::clone(&app);
        let started = Instant::now();
        let spawned = std::thread::Builder::new()
            .name("translator-load".into())
            .spawn(move || match load() {
                Ok(dict) => {
                    let load_time = started.elapsed();
                    eprintln!(
                        "translator: loaded {} entries from {} in {} ms",
                        dict.len(),
                        dict_path.display(),
                        load_time.as_millis()
                    );
                    if dict.is_empty() {
                        eprintln!("translator: warning: the dictionary has no entries");
                    }
                    let _ = app.loaded.set(api::Loaded { dict, load_time });
                }
                Err(e) => {
                    eprintln!("translator: {e}");
                    std::process::exit(1);
                }
            });
        if let Err(e) = spawned {
            eprintln!("translator: Cannot start loader thread: {e}");
            return ExitCode::FAILURE;
        }
    }
    let config = ServerConfig {
        limits: Limits {
            max_body: MAX_TEXT_BYTES,
            ..Limits::default()
        },
        access_log,
        ..ServerConfig::default()
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "translator listening on {local}");
    let _ = stdout.flush();
    apphttp::serve(listener, app, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn parses_serve_and_gen_dict() {
        match parse(&["--port=9", "--dict", "d.tsv"]) {
            Ok(Command::Serve {
                port, dict, bind, ..
            }) => {
                assert_eq!(
                    (port, dict, bind.to_string()),
                    (9, "d.tsv".into(), "0.0.0.0".into())
                )
            }
            _ => panic!("expected serve"),
        }
        match parse(&["gen-dict", "--out", "o", "--entries", "10", "--seed", "3"]) {
            Ok(Command::GenDict { out, entries, seed }) => {
                assert_eq!((out, entries, seed), ("o".into(), 10, 3))
            }
            _ => panic!("expected gen-dict"),
        }
        assert!(parse(&["--port", "1"]).is_err());
        assert!(parse(&["gen-dict"]).is_err());
        assert!(parse(&["gen-dict", "--out", "o", "--entries", "-1"]).is_err());
        assert!(matches!(parse(&["--help"]), Ok(Command::Help)));
    }
}
